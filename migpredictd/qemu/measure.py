"""Measure one VM over QMP: guards, a calc-dirty-rate strategy per QEMU generation, zero pages.

Flow: connect; ``query-version``, which tells the capabilities (``calc-time-unit`` on 8.2+; the
unmerged 2023 extended output, ``periods``, is recognised by its reply); guards (``query-status``
running, no active migration, no calc-dirty-rate already in progress); ``query-memory-size-summary``;
then one ``calc-dirty-rate`` (page-sampling only) per period, each on its own connection and with the monitor
*released while QEMU samples* (a QMP socket serves one client at a time: other tools, libvirt or
Proxmox's ``qm``, must get in). Strategies:

- ``extended``: one run; the reply lists dirty pages per period and zero pages (no upstream QEMU has it);
- ``sweep-ms`` (8.2+): runs of 125 ms .. 8 s (``calc-time-unit: millisecond``);
- ``sweep-s`` (7.2 .. 8.1): runs of 1 .. 8 s (whole seconds is all 7.2 takes).

The result is :func:`~migpredictd.core.measurement.measurement_from_sweep` (or ``_from_extended``) with
zero pages from :mod:`migpredictd.qemu.zeropages` and metadata. Every failure is a typed
:class:`~migpredictd.core.errors.TargetError`; ``TargetSkipped`` means "retry later".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from migpredictd.core.address import Address, parse_address
from migpredictd.core.errors import (
    InputError,
    MigpredictdError,
    QMPCommandError,
    QMPProtocolError,
    QMPTimeoutError,
    TargetSkipped,
)
from migpredictd.core.measurement import Measurement, measurement_from_extended, measurement_from_sweep
from migpredictd.qemu.hostscan import HostScan, host_scan
from migpredictd.qemu.qmp import READ_ONLY_COMMANDS, SAFE_DIRTY_RATE_MODE, QMPSession
from migpredictd.qemu.settings import (
    DEFAULT_HELPER_SOCKET,
    DEFAULT_PERIODS_MS,
    DEFAULT_SAMPLE_PAGES,
    MAX_SAMPLE_PAGES,
    MIN_SAMPLE_PAGES,
    STRATEGIES,
    ZERO_PAGE_METHODS,
    MeasureSettings,
    auto_sample_pages,
)
from migpredictd.qemu.zerohelper import MAX_HELPER_SAMPLES, HelperRequest, ask_helper
from migpredictd.qemu.zeropages import (
    ZeroPagesUnavailableError,
    guest_sample_estimate,
    smaps_estimate,
    status_estimate,
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

CALC_DIRTY_RATE_SINCE: Final = (5, 1, 0)
CALC_TIME_UNIT_SINCE: Final = (8, 2, 0)
MAX_SANE_MEMORY_BYTES: Final = 1 << 48  # 256 TiB: beyond any x86 guest; a larger answer is garbage
PAGE_SIZE: Final = 4096  # x86 target page size; calc-dirty-rate samples target pages

# query-migrate statuses in which the dirty rate measures the migration, not the guest.
ACTIVE_MIGRATION_STATUSES: Final = frozenset(
    {
        "setup",
        "active",
        "pre-switchover",
        "device",
        "wait-unplug",
        "postcopy-active",
        "postcopy-paused",
        "postcopy-recover",
        "postcopy-recover-setup",
        "cancelling",
        "colo",
    }
)
BUSY_MESSAGE: Final = "already being measured"

Progress = Callable[[str], None]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this QEMU's calc-dirty-rate can do, from its version. The extended output of the 2023 series
    (never merged, so no version has it) is known only once a reply shows it (:func:`measure`)."""

    version: tuple[int, int, int]
    version_text: str
    calc_time_unit: bool


def choose_strategy(requested: str, caps: Capabilities, *, target: str) -> str:
    """``auto`` picks sweep-ms where calc-time-unit exists, else sweep-s; an explicit one must be supported
    (``extended`` is checked against the reply).

    :raises QMPCommandError: the requested strategy needs a capability this QEMU lacks.
    """
    if requested == "auto":
        return "sweep-ms" if caps.calc_time_unit else "sweep-s"
    if requested == "sweep-ms" and not caps.calc_time_unit:
        raise QMPCommandError(
            f"QEMU {caps.version_text} has no calc-time-unit (8.2+); use strategy sweep-s or auto",
            target=target,
            command="calc-dirty-rate",
            error_class="Unsupported",
        )
    return requested


def plan_runs(strategy: str, periods_ms: Sequence[float] | None) -> list[float]:
    """The calc-times (ms) to run, in order. Second-granular strategies round up to whole seconds.

    :raises InputError: a period that the strategy cannot express.
    """
    periods = list(periods_ms) if periods_ms is not None else list(DEFAULT_PERIODS_MS[strategy])
    if strategy == "sweep-ms":
        return periods
    if strategy == "extended":
        # One run as long as the longest period: QEMU reports every shorter period itself.
        return [float(math.ceil(max(periods) / 1000.0) * 1000)]
    seconds = [math.ceil(p / 1000.0) for p in periods]
    if len(set(seconds)) != len(seconds):
        raise InputError(
            "sweep-s runs whole seconds; these periods round to the same second", field="periods_ms"
        )
    return [s * 1000.0 for s in seconds]


async def measure(
    address: str | tuple[str, int],
    *,
    target: str,
    settings: MeasureSettings | None = None,
    progress: Progress | None = None,
    sleep: Sleep = asyncio.sleep,
) -> Measurement:
    """Measure one VM and return its :class:`Measurement`.

    ``address`` is the monitor's address as text (``unix:/path``, ``tcp:HOST:PORT`` or ``/path``, parsed
    by :func:`~migpredictd.core.address.parse_address`), or ``(host, port)``.

    ``sleep`` waits out each calc-time (tests pass a scaled one for a fake QEMU with a fast clock).

    :raises TargetSkipped: not running, migrating, or another calc-dirty-rate in progress (retry later).
    :raises TargetError: any other failure, typed (connect, timeout, QEMU error, bad reply, unsafe).
    """
    settings = settings or MeasureSettings()
    say = progress or (lambda _msg: None)
    addr = parse_address(address) if isinstance(address, str) else address
    started_wall, started = time.time(), time.monotonic()

    async with _session(addr, target, settings) as s:
        caps = await _capabilities(s)
        strategy = choose_strategy(settings.strategy, caps, target=target)
        await _guards(s)
        kvm = await s.execute_dict("query-kvm")
        memory_bytes = await _memory_bytes(s)
        peer_pid = s.peer_pid
        vcpu_threads = await _vcpu_threads(s) if peer_pid is not None else []
    vcpu_start = (time.monotonic(), _threads_cpu_seconds(peer_pid, vcpu_threads))
    adaptive = settings.sample_pages is None and caps.calc_time_unit
    if settings.sample_pages is None:
        per_gib = auto_sample_pages(memory_bytes, calc_time_unit=caps.calc_time_unit)
        settings = dataclasses.replace(settings, sample_pages=per_gib)
    # Seconds per sampled page of QEMU's first hash pass, once a window shows it (auto sample-pages on
    # 8.2+ only): the pass can take longer than a short window, which QEMU then stretches.
    pass_cost: float | None = None
    say(
        f"{target}: QEMU {caps.version_text}, {memory_bytes >> 20} MiB, strategy {strategy}, "
        f"kvm {'on' if kvm.get('enabled') is True else 'off'}, sample-pages {settings.sample_pages}/GiB"
    )

    async def run_once(run_settings: MeasureSettings, calc_ms: float) -> dict[str, Any]:
        return await _one_run(
            addr,
            target=target,
            settings=run_settings,
            caps=caps,
            strategy=strategy,
            calc_ms=calc_ms,
            sleep=sleep,
        )

    runs: list[dict[str, Any]] = []
    notes_runs: list[str] = []
    plan = plan_runs(strategy, settings.periods_ms)
    if adaptive and (settings.sample_pages or MAX_SAMPLE_PAGES) < MAX_SAMPLE_PAGES and strategy != "extended":
        # A large guest's sampled pages may be untouched RAM, which the first hash pass faults in (a page
        # table at a time on a sparse guest): longest window first, so that the passes of the long runs,
        # which their windows absorb, leave the short ones little to fault in.
        plan.sort(reverse=True)
    while plan:
        calc_ms = plan.pop(0)
        run_settings = settings
        if adaptive and pass_cost is not None:
            run_settings = _fitting_sample_pages(settings, memory_bytes, calc_ms, pass_cost)
        say(f"{target}: calc-dirty-rate {calc_ms:g} ms, sample-pages {run_settings.sample_pages}/GiB")
        reply = await run_once(run_settings, calc_ms)
        window = _stretched_window(reply, calc_ms)
        if adaptive and window is not None and "periods" not in reply:
            # QEMU's first hash pass outlasted the window: learn its cost per page and, if fewer pages
            # fit, run this period again with them (once).
            sampled = max((memory_bytes * (run_settings.sample_pages or 1)) >> 30, 1)
            pass_cost = window / 1000.0 / sampled
            retry = _fitting_sample_pages(settings, memory_bytes, calc_ms, pass_cost)
            if (retry.sample_pages or 0) < (run_settings.sample_pages or 0):
                notes_runs.append(
                    f"the {calc_ms:g} ms window took {window} ms with {run_settings.sample_pages} "
                    f"sample-pages per GiB (QEMU's first hash pass); measured again with {retry.sample_pages}"
                )
                reply = await run_once(retry, calc_ms)
        runs.append(as_requested(reply, calc_ms))
        if "periods" in reply and strategy != "extended":
            # The extended output of the 2023 series: one run reports every period up to its calc-time,
            # so the sweep ends with one run as long as the extended plan asks (if this one was shorter).
            strategy = "extended"
            longest = plan_runs("extended", settings.periods_ms)[0]
            plan = [longest] if calc_ms < longest else []
    if strategy == "extended" and "periods" not in runs[-1]:
        raise QMPCommandError(
            f"QEMU {caps.version_text} has no extended calc-dirty-rate output; use auto",
            target=target,
            command="query-dirty-rate",
            error_class="Unsupported",
        )

    meta: dict[str, Any] = {
        "qemu_version": caps.version_text,
        "target": target,
        "measured_at": started_wall,
    }
    vcpu = vcpu_share(
        vcpu_start, (time.monotonic(), _threads_cpu_seconds(peer_pid, vcpu_threads)), len(vcpu_threads)
    )
    notes: list[str] = list(notes_runs)
    try:
        if strategy == "extended":
            result = measurement_from_extended(runs[-1], **meta, notes=())
            if result.memory_bytes != memory_bytes:
                raise QMPProtocolError(
                    f"extended reply covers {result.memory_bytes} bytes, guest has {memory_bytes}",
                    target=target,
                    command="query-dirty-rate",
                )
        else:
            # Reading sampled guest pages takes tens of ms: off the event loop, so scrapes never wait.
            zeros = await asyncio.to_thread(
                zero_pages,
                settings,
                peer_pid,
                addr if isinstance(addr, str) else None,
                memory_bytes,
                notes,
                target,
            )
            result = measurement_from_sweep(
                runs,
                memory_bytes=memory_bytes,
                page_size_bytes=PAGE_SIZE,
                zero_pages=zeros.count,
                zero_pages_method=zeros.method,
                strategy=strategy,
                sample_pages_per_gib=settings.sample_pages,
                zero_profile=zeros.profile,
                **meta,
            )
            result = zeros.into(result)
    except InputError as exc:
        raise QMPProtocolError(f"unusable calc-dirty-rate results: {exc}", target=target) from exc
    duration = time.monotonic() - started
    say(f"{target}: done in {duration:.1f} s")
    return dataclasses.replace(
        result,
        duration_seconds=round(duration, 3),
        notes=tuple(notes) + result.notes,
        vcpu_utilization=vcpu,
        accelerator="kvm" if kvm.get("enabled") is True else "tcg",
    )


async def _vcpu_threads(s: QMPSession) -> list[int]:
    """The host thread ids of the guest's vCPUs (``query-cpus-fast``); none when QEMU cannot say."""
    try:
        cpus = await s.execute("query-cpus-fast")
    except QMPCommandError:
        return []
    if not isinstance(cpus, list) or len(cpus) > 4096:
        return []
    tids = [c.get("thread-id") for c in cpus if isinstance(c, dict)]
    return [t for t in tids if isinstance(t, int) and not isinstance(t, bool) and t > 0]


def _threads_cpu_seconds(pid: int | None, tids: Sequence[int]) -> float | None:
    """utime + stime of the threads ``tids`` of process ``pid`` (``/proc/PID/task/TID/stat``, readable by
    every user who can see the process); None if any cannot be read."""
    if pid is None or not tids:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            return None
    return total / ticks


def vcpu_share(
    start: tuple[float, float | None], end: tuple[float, float | None], vcpus: int
) -> float | None:
    """The share of their time ``vcpus`` vCPUs ran between ``start`` and ``end``, each (monotonic seconds,
    the vCPUs' CPU seconds together); None when either is unknown or less than a second apart."""
    (t0, c0), (t1, c1) = start, end
    if c0 is None or c1 is None or t1 - t0 < 1.0 or vcpus <= 0:
        return None
    return round(min(max((c1 - c0) / ((t1 - t0) * vcpus), 0.0), 1.0), 4)


def _session(
    addr: Address, target: str, settings: MeasureSettings
) -> contextlib.AbstractAsyncContextManager[QMPSession]:
    return QMPSession.connect(
        addr,
        target=target,
        timeout=settings.connect_timeout,
        allowed=READ_ONLY_COMMANDS,
    )


async def _capabilities(s: QMPSession) -> Capabilities:
    """What calc-dirty-rate can do here, from ``query-version`` alone: calc-dirty-rate since 5.1,
    ``calc-time-unit`` since 8.2.

    Not from ``query-qmp-schema``: its reply is a quarter of a megabyte of JSON (QEMU_FACTS.md), and
    decoding it for each of thousands of VMs kept the daemon's event loop busy for minutes. The extended
    output of the unmerged 2023 series is recognised by its reply instead (:func:`measure`).
    """
    version = await s.execute_dict("query-version")
    qemu = version.get("qemu")
    if not isinstance(qemu, dict) or not all(
        isinstance(qemu.get(k), int) and not isinstance(qemu.get(k), bool)
        for k in ("major", "minor", "micro")
    ):
        raise QMPProtocolError(f"unexpected reply {version!r}", target=s.target, command="query-version")
    triple = (int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
    text = ".".join(str(x) for x in triple)
    if triple < CALC_DIRTY_RATE_SINCE:
        raise QMPCommandError(
            f"QEMU {text} has no calc-dirty-rate (5.1+ needed)",
            target=s.target,
            command="calc-dirty-rate",
            error_class="CommandNotFound",
        )
    return Capabilities(version=triple, version_text=text, calc_time_unit=triple >= CALC_TIME_UNIT_SINCE)


async def _guards(s: QMPSession) -> None:
    """Skip a VM that is not running, is migrating, or is already being measured by someone else."""
    status = await s.execute_dict("query-status")
    run_status = status.get("status")
    if not isinstance(run_status, str):
        raise QMPProtocolError(f"unexpected reply {status!r}", target=s.target, command="query-status")
    if run_status != "running":
        raise TargetSkipped(
            f"VM is {run_status}, not running", target=s.target, command="query-status", reason="not_running"
        )
    await _check_not_migrating(s)
    current = await s.execute_dict("query-dirty-rate")
    if current.get("status") == "measuring":
        raise TargetSkipped(
            "another calc-dirty-rate is in progress",
            target=s.target,
            command="query-dirty-rate",
            reason="busy",
        )


async def _check_not_migrating(s: QMPSession) -> None:
    migration = await s.execute_dict("query-migrate")
    mig_status = migration.get("status")
    if mig_status is not None and not isinstance(mig_status, str):
        raise QMPProtocolError(f"unexpected status {mig_status!r}", target=s.target, command="query-migrate")
    if mig_status in ACTIVE_MIGRATION_STATUSES:
        raise TargetSkipped(
            f"migration is {mig_status}: dirty rates would measure the migration",
            target=s.target,
            command="query-migrate",
            reason="migrating",
        )


async def _memory_bytes(s: QMPSession) -> int:
    reply = await s.execute_dict("query-memory-size-summary")
    base, plugged = reply.get("base-memory"), reply.get("plugged-memory", 0)
    for v in (base, plugged):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise QMPProtocolError(
                f"unexpected reply {reply!r}", target=s.target, command="query-memory-size-summary"
            )
    assert isinstance(base, int)
    assert isinstance(plugged, int)
    total = base + plugged
    if not 0 < total <= MAX_SANE_MEMORY_BYTES or total % PAGE_SIZE:
        raise QMPProtocolError(
            f"implausible guest memory size {total} bytes",
            target=s.target,
            command="query-memory-size-summary",
        )
    return total


async def _one_run(
    addr: Address,
    *,
    target: str,
    settings: MeasureSettings,
    caps: Capabilities,
    strategy: str,
    calc_ms: float,
    sleep: Sleep,
) -> dict[str, Any]:
    """Start one calc-dirty-rate, let go of the monitor while QEMU samples, then collect the result."""
    sample_pages = settings.sample_pages or DEFAULT_SAMPLE_PAGES  # measure() has resolved "auto"
    args: dict[str, object] = {"mode": SAFE_DIRTY_RATE_MODE, "sample-pages": sample_pages}
    query_args: dict[str, object] | None = None
    if caps.calc_time_unit and strategy != "sweep-s":
        args.update({"calc-time": int(calc_ms), "calc-time-unit": "millisecond"})
        query_args = {"calc-time-unit": "millisecond"}
        expect_calc_time = int(calc_ms)
    else:
        expect_calc_time = int(calc_ms // 1000)
        args["calc-time"] = expect_calc_time
    async with _session(addr, target, settings) as s:
        try:
            await s.execute("calc-dirty-rate", args, timeout=settings.command_timeout)
        except QMPCommandError as exc:
            if BUSY_MESSAGE in exc.detail:
                raise TargetSkipped(
                    "another calc-dirty-rate is in progress",
                    target=target,
                    command="calc-dirty-rate",
                    reason="busy",
                ) from exc
            raise
        # Remember which run is ours: another client may start its own while we are away.
        started = await s.execute_dict("query-dirty-rate", query_args, timeout=settings.command_timeout)
        start_time = started.get("start-time")
        started_at = time.monotonic()
    # Monitor released: QEMU samples on its own thread while other clients may use the socket.
    await sleep(calc_ms / 1000.0)
    async with _session(addr, target, settings) as s:
        deadline = time.monotonic() + settings.settle_timeout
        while True:
            reply = await s.execute_dict("query-dirty-rate", query_args, timeout=settings.command_timeout)
            status = reply.get("status")
            if status == "measured":
                break
            if status != "measuring":
                raise QMPProtocolError(
                    f"unexpected status {status!r}", target=target, command="query-dirty-rate"
                )
            if time.monotonic() >= deadline:
                raise QMPTimeoutError(
                    f"calc-dirty-rate of {calc_ms:g} ms still measuring "
                    f"{settings.settle_timeout:g} s after its end",
                    target=target,
                    command="query-dirty-rate",
                )
            await sleep(settings.poll_interval)
        # A migration that started meanwhile would have measured its own dirtying: check again.
        await _check_not_migrating(s)
    _check_run(
        reply,
        target=target,
        start_time=start_time,
        expect_calc_time=expect_calc_time,
        sample_pages=sample_pages,
        elapsed=time.monotonic() - started_at,
        calc_seconds=calc_ms / 1000.0,
    )
    return reply


def same_run(started: object, measured: object, *, elapsed: float, calc_seconds: float) -> bool:
    """Whether a measured run whose ``start-time`` is ``measured`` is the one that read ``started`` right
    after it was started, ``elapsed`` seconds ago.

    QEMU sets ``start-time`` (whole seconds) when the command arrives and again when its sampling thread
    takes its first hash (``DirtyStat.start_time = initial_time / 1000``), so a thread that starts late
    across a second boundary moves it by one. Another client cannot start a run while ours measures (QEMU
    refuses it), so a run of at least our length that replaced ours needs ``2 x calc_seconds`` after our
    start; one second later within that is our own run. (A shorter foreign run shows as a shorter
    ``calc-time``, checked by the caller.)"""
    if measured == started:
        return True
    return (
        isinstance(started, int)
        and isinstance(measured, int)
        and measured == started + 1
        and elapsed < 2.0 * calc_seconds
    )


# QEMU 8.2+ reports the window it really measured, which a sleep's overshoot makes a millisecond or two
# longer than asked. Within this much the run counts as the period asked for, so that each period keeps
# one value (it is a label of migpredictd_dirty_rate_bytes_per_second); a window stretched further
# (hashing the samples took longer than the period) is kept as it was.
WINDOW_OVERSHOOT_MS: Final = 5.0
WINDOW_OVERSHOOT_FRACTION: Final = 0.02


# A short window's first hash pass should leave it this much headroom when pages are chosen to fit.
PASS_SHARE_OF_WINDOW: Final = 0.8


def _stretched_window(reply: Mapping[str, Any], calc_ms: float) -> int | None:
    """The window QEMU 8.2+ really measured, if it is more than 10% longer than ``calc_ms``."""
    window = reply.get("calc-time")
    if (
        reply.get("calc-time-unit") != "millisecond"
        or not isinstance(window, int)
        or isinstance(window, bool)
    ):
        return None
    return window if window > calc_ms * 1.1 else None


def _fitting_sample_pages(
    settings: MeasureSettings, memory_bytes: int, calc_ms: float, pass_cost: float
) -> MeasureSettings:
    """``settings`` with as many sample-pages per GiB (at most its own) as let the first hash pass,
    at ``pass_cost`` seconds per page, take PASS_SHARE_OF_WINDOW of a ``calc_ms`` window."""
    pages = int(PASS_SHARE_OF_WINDOW * calc_ms / 1000.0 / pass_cost)
    per_gib = max(
        MIN_SAMPLE_PAGES, min(settings.sample_pages or MAX_SAMPLE_PAGES, (pages << 30) // memory_bytes)
    )
    return dataclasses.replace(settings, sample_pages=per_gib)


def as_requested(reply: dict[str, Any], calc_ms: float) -> dict[str, Any]:
    """``reply`` with its ``calc-time`` set back to the requested ``calc_ms`` when QEMU's measured window
    overshot it by no more than timing noise; otherwise ``reply`` itself."""
    if reply.get("calc-time-unit") != "millisecond":
        return reply
    window = reply.get("calc-time")
    if not isinstance(window, int) or isinstance(window, bool):
        return reply
    if calc_ms < window <= calc_ms * (1.0 + WINDOW_OVERSHOOT_FRACTION) + WINDOW_OVERSHOOT_MS:
        return {**reply, "calc-time": int(calc_ms)}
    return reply


def _check_run(
    reply: Mapping[str, Any],
    *,
    target: str,
    start_time: object,
    expect_calc_time: int,
    sample_pages: int,
    elapsed: float = 0.0,
    calc_seconds: float = 0.0,
) -> None:
    """Validate a measured reply, and that it is *our* run (another client may have started its own)."""
    rate = reply.get("dirty-rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
        raise QMPProtocolError(
            f"dirty-rate must be a non-negative integer, got {rate!r}",
            target=target,
            command="query-dirty-rate",
        )
    if reply.get("mode", SAFE_DIRTY_RATE_MODE) != SAFE_DIRTY_RATE_MODE:
        raise TargetSkipped(
            f"result is from a {reply.get('mode')} run, not ours",
            target=target,
            command="query-dirty-rate",
            reason="busy",
        )
    calc_time = reply.get("calc-time")
    if isinstance(calc_time, bool) or not isinstance(calc_time, int):
        raise QMPProtocolError(
            f"calc-time must be an integer, got {calc_time!r}", target=target, command="query-dirty-rate"
        )
    # 8.2+ reports the window it really measured (1001 for a requested 1000 ms); a shorter one, another
    # start time or other sample-pages mean the run is someone else's.
    if (
        calc_time < expect_calc_time
        or not same_run(start_time, reply.get("start-time"), elapsed=elapsed, calc_seconds=calc_seconds)
        or reply.get("sample-pages", sample_pages) != sample_pages
    ):
        raise TargetSkipped(
            "another client's calc-dirty-rate replaced ours",
            target=target,
            command="query-dirty-rate",
            reason="busy",
        )


def zero_pages(  # noqa: PLR0917
    settings: MeasureSettings,
    pid: int | None,
    socket_path: str | None,
    memory_bytes: int,
    notes: list[str],
    target: str,
    *,
    pid_file: str | None = None,
) -> ZeroPages:
    """Zero pages by the configured method, where they lie and how many are allocated memory
    (guest-sample only); when impossible, None ("unknown": assume none) plus a note. Every method tried
    and why it failed goes into ``notes``.

    ``auto`` tries, best first: guest-sample here (the daemon can read ``/proc/PID/mem``: root or QEMU's
    uid); the zero-page helper (the hardened deployments: the same guest-sample, done by a privileged
    helper); host-smaps here; host-status (unprivileged: QEMU's resident memory from
    ``/proc/PID/status``). Held-out errors of each: docs/accuracy.md.

    The helper is told the QMP socket ``socket_path``, or libvirt's ``pid_file`` when that is given (the
    libvirt edge: the monitor socket belongs to libvirtd).
    """
    method = settings.zero_pages
    if method == "none":
        return ZeroPages(None, "none")
    methods = ("guest-sample", "helper", "host-smaps", "host-status") if method == "auto" else (method,)
    for m in methods:
        try:
            if m == "helper":
                if socket_path is None and pid_file is None:
                    raise ZeroPagesUnavailableError("the helper needs a unix QMP socket or a PID file")
                request = HelperRequest(
                    qmp_socket=None
                    if pid_file is not None or socket_path is None
                    else os.path.abspath(socket_path),
                    pid_file=pid_file,
                    memory_bytes=memory_bytes,
                    page_size=PAGE_SIZE,
                    samples=min(settings.guest_sample_pages, MAX_HELPER_SAMPLES),
                )
                reply = ask_helper(settings.zero_pages_helper, request, timeout=settings.command_timeout)
                if pid is not None and reply.pid != pid:
                    raise ZeroPagesUnavailableError(
                        f"the helper read PID {reply.pid}, the QMP socket's peer is PID {pid}"
                    )
                notes.append(
                    f"zero pages: {reply.method} by the zero-page helper at {settings.zero_pages_helper}"
                )
                logger.debug("%s: zero pages %s (helper): %s", target, reply.method, reply.detail)
                return ZeroPages(
                    reply.zero_pages, reply.method, reply.profile, reply.allocated_zero_pages, host_scan()
                )
            if pid is None:
                raise ZeroPagesUnavailableError("the QEMU PID is only known over a local unix socket")
            if m == "guest-sample":
                est = guest_sample_estimate(
                    pid, memory_bytes=memory_bytes, page_size=PAGE_SIZE, samples=settings.guest_sample_pages
                )
            elif m == "host-smaps":
                est = smaps_estimate(pid, memory_bytes=memory_bytes, page_size=PAGE_SIZE)
            else:
                est = status_estimate(pid, memory_bytes=memory_bytes, page_size=PAGE_SIZE)
        except ZeroPagesUnavailableError as exc:
            notes.append(f"zero pages: {m} unavailable: {exc}")
            continue
        logger.debug("%s: zero pages %s: %s", target, est.method, est.detail)
        return ZeroPages(est.zero_pages, est.method, est.profile, est.allocated_zero_pages, host_scan())
    notes.append("zero pages unknown: prediction assumes no zero pages, so it errs long")
    return ZeroPages(None, "none")


@dataclass(frozen=True, slots=True)
class ZeroPages:
    """What :func:`zero_pages` found (see there), and, when it found zero pages, this host's speed at
    reading them (:func:`migpredictd.qemu.hostscan.host_scan`: probed once per process, in the same
    worker thread)."""

    count: float | None
    method: str
    profile: tuple[float, ...] | None = None
    allocated: float | None = None
    host: HostScan | None = None

    def into(self, m: Measurement) -> Measurement:
        """``m`` with the allocated zero pages and the host's zero-page read speed, when known."""
        host = self.host
        if self.count is None or host is None:
            return m
        return dataclasses.replace(
            m,
            zero_allocated_pages=None if self.allocated is None else min(self.allocated, self.count),
            host_shared_zero_read_seconds=host.shared_zero_seconds,
            host_allocated_read_seconds=host.allocated_seconds,
        )


# --- CLI --------------------------------------------------------------------------------------------


def add_measure_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``migpredictd measure ADDRESS``."""
    parser.add_argument("address", help="QMP monitor: unix:/path, tcp:HOST:PORT or /path")
    parser.add_argument("--target", help="name recorded in the measurement (default: the address)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto")
    parser.add_argument(
        "--periods",
        help="comma-separated calc-times in ms (default per strategy: "
        + "; ".join(f"{k} {','.join(f'{p:g}' for p in v)}" for k, v in DEFAULT_PERIODS_MS.items())
        + ")",
    )
    parser.add_argument(
        "--sample-pages",
        type=int,
        default=None,
        help="calc-dirty-rate sample-pages per GiB (default: as many as fit in a bounded number per run: "
        "16384 per GiB up to 8 GiB on QEMU 8.2+, fewer per GiB on larger guests)",
    )
    parser.add_argument(
        "--zero-pages",
        choices=ZERO_PAGE_METHODS,
        default="auto",
        help="auto (default): the first that works of guest-sample (tests sampled guest pages for zero; "
        "needs /proc/PID/mem), helper (the same, by migpredictd-zeropaged), host-smaps (QEMU's guest-RAM "
        "mapping) and host-status (QEMU's resident memory, readable by anyone); none = assume no zero pages",
    )
    parser.add_argument(
        "--zero-pages-helper",
        default=DEFAULT_HELPER_SOCKET,
        help="the zero-page helper's socket (default: %(default)s)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="per QMP command and connect, seconds")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def settings_from_args(args: argparse.Namespace) -> MeasureSettings:
    """:class:`MeasureSettings` from parsed CLI arguments.

    :raises InputError: a value out of range (names the option).
    """
    periods: tuple[float, ...] | None = None
    if args.periods:
        try:
            periods = tuple(float(p) for p in str(args.periods).split(",") if p.strip())
        except ValueError as exc:
            raise InputError(f"not a list of numbers: {args.periods!r}", field="--periods") from exc
    return MeasureSettings(
        connect_timeout=args.timeout,
        command_timeout=args.timeout,
        strategy=args.strategy,
        periods_ms=periods,
        sample_pages=args.sample_pages,
        zero_pages=args.zero_pages,
        zero_pages_helper=args.zero_pages_helper,
    )


def measure_command(args: argparse.Namespace) -> int:
    """Run ``migpredictd measure``: canonical JSON on stdout, progress on stderr; 1 on any error."""
    try:
        settings = settings_from_args(args)
        progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        result = asyncio.run(
            measure(args.address, target=args.target or args.address, settings=settings, progress=progress)
        )
    except MigpredictdError as exc:
        print(f"migpredictd measure: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json_dict()))
    return 0


__all__ = [
    "DEFAULT_PERIODS_MS",
    "DEFAULT_SAMPLE_PAGES",
    "Capabilities",
    "MeasureSettings",
    "add_measure_arguments",
    "as_requested",
    "choose_strategy",
    "measure",
    "measure_command",
    "plan_runs",
    "same_run",
    "settings_from_args",
    "vcpu_share",
    "zero_pages",
]
