"""Measure one libvirt domain through libvirt's own API: no QMP socket of ours, nothing that taints.

Flow: guards (running, no job, no dirty-rate calculation in progress); memory from the domain; then
whole-second page-sampling windows through ``virDomainStartDirtyRateCalc``, each read back from the
``VIR_DOMAIN_STATS_DIRTYRATE`` statistics and checked to be ours (its start time and period), with the
job checked again after it; zero pages by the QMP path's methods (:func:`migpredictd.qemu.measure.zero_pages`)
on the PID libvirt keeps in ``/run/libvirt/qemu/NAME.pid``; vCPU utilisation from libvirt's vCPU times.

libvirt passes neither ``sample-pages`` nor millisecond windows on, so QEMU samples its default 512
pages per GiB, and a 512 MiB domain's reading moves by a third from one window to the next
(docs/measuring.md, "libvirt"). The sweep therefore runs again, every period once more, until the dirty
pages at its shortest period have at most ``settings.target_sampling_error`` relative sampling error, or
``settings.max_sweeps`` sweeps ran; the error reached goes on the measurement (``sampling_error``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Final

from migpredictd.core.address import DomainRef
from migpredictd.core.errors import InputError, LibvirtError, QMPProtocolError, TargetSkipped
from migpredictd.core.measurement import Measurement, measurement_from_sweep, sampling_error
from migpredictd.libvirt.api import (
    DIRTYRATE_MEASURED,
    DIRTYRATE_MEASURING,
    DOMAIN_RUNNING,
    MIGRATION_OPERATIONS,
    Connection,
)
from migpredictd.libvirt.api import ConnectionError as LibvirtConnectionError
from migpredictd.qemu.measure import PAGE_SIZE, same_run, vcpu_share, zero_pages
from migpredictd.qemu.settings import MeasureSettings, libvirt_windows
from migpredictd.qemu.zeropages import guest_name_matches

__all__ = ["LIBVIRT_SAMPLE_PAGES", "DomainRef", "measure_domain"]

# QEMU's default sample-pages per GiB (DIRTYRATE_DEFAULT_SAMPLE_PAGES), which libvirt leaves in place.
LIBVIRT_SAMPLE_PAGES: Final = 512
DEFAULT_PID_DIR: Final = "/run/libvirt/qemu"

Sleep = Callable[[float], Awaitable[None]]


def read_pid(pid_file: str | None) -> int | None:
    """The PID in libvirt's PID file if that process, as this process sees it, is QEMU for the domain the
    file is named after (``-name guest=NAME``); else None: no file, unreadable, or another PID namespace
    (a container without the host's), where the number names some other process."""
    if pid_file is None:
        return None
    try:
        with open(pid_file, "rb") as f:
            text = f.read(33)
        pid = int(text.decode("ascii").strip())
        if not 0 < pid < 1 << 22:
            return None
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(1 << 20).split(b"\0")
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    name = os.path.basename(pid_file).removesuffix(".pid").encode()
    return pid if guest_name_matches(argv, name) else None


async def _guards(conn: Connection, ref: DomainRef, target: str) -> None:
    """Skip a domain that is not running, has a job (a migration, a dump...), or is being measured."""
    state = await conn.state(ref.uuid, target=target)
    if state != DOMAIN_RUNNING:
        raise TargetSkipped(
            f"domain state is {state}, not running",
            target=target,
            command="virDomainGetState",
            reason="not_running",
        )
    await _check_no_job(conn, ref, target)
    current = await conn.dirty_rate(ref.uuid, target=target)
    if current.status == DIRTYRATE_MEASURING:
        raise TargetSkipped(
            "another dirty-rate calculation is in progress",
            target=target,
            command="virConnectGetAllDomainStats",
            reason="busy",
        )


async def _check_no_job(conn: Connection, ref: DomainRef, target: str) -> None:
    job = await conn.job(ref.uuid, target=target)
    if job.active:
        migrating = job.operation in MIGRATION_OPERATIONS
        raise TargetSkipped(
            f"the domain has an active {job.describe()} job: dirty rates would measure it, not the guest",
            target=target,
            command="virDomainGetJobInfo",
            reason="migrating" if migrating else "job",
        )


async def _one_window(
    conn: Connection, ref: DomainRef, seconds: int, *, target: str, settings: MeasureSettings, sleep: Sleep
) -> dict[str, Any]:
    """One dirty-rate window of ``seconds``, as a ``query-dirty-rate``-shaped reply."""
    try:
        await conn.start_dirty_rate(ref.uuid, seconds, target=target)
    except LibvirtError as exc:
        if "in progress" in exc.detail or "already" in exc.detail:
            raise TargetSkipped(
                "another dirty-rate calculation is in progress",
                target=target,
                command="virDomainStartDirtyRateCalc",
                reason="busy",
            ) from exc
        raise
    started = await conn.dirty_rate(ref.uuid, target=target)
    started_at = time.monotonic()
    await sleep(seconds)
    deadline = time.monotonic() + settings.settle_timeout
    while True:
        stats = await conn.dirty_rate(ref.uuid, target=target)
        if stats.status == DIRTYRATE_MEASURED:
            break
        if stats.status != DIRTYRATE_MEASURING or time.monotonic() >= deadline:
            raise LibvirtError(
                f"the {seconds} s dirty-rate calculation ended in status {stats.status} "
                f"{seconds + settings.settle_timeout:g} s after it started",
                target=target,
                command="virConnectGetAllDomainStats",
            )
        await sleep(settings.poll_interval)
    await _check_no_job(conn, ref, target)  # a job that started meanwhile was measured instead
    if (
        stats.period != seconds
        or stats.mode not in (None, "page-sampling")
        or (
            started.start_time is not None
            and not same_run(
                started.start_time,
                stats.start_time,
                elapsed=time.monotonic() - started_at,
                calc_seconds=float(seconds),
            )
        )
    ):
        raise TargetSkipped(
            "another client's dirty-rate calculation replaced ours",
            target=target,
            command="virConnectGetAllDomainStats",
            reason="busy",
        )
    if stats.mib_per_second is None or stats.mib_per_second < 0:
        raise QMPProtocolError(
            f"no dirty rate in the statistics ({stats!r})",
            target=target,
            command="virConnectGetAllDomainStats",
        )
    return {
        "status": "measured",
        "dirty-rate": stats.mib_per_second,
        "calc-time": seconds,
        "calc-time-unit": "second",
        "sample-pages": LIBVIRT_SAMPLE_PAGES,
        "mode": "page-sampling",
    }


async def measure_domain(
    conn: Connection,
    ref: DomainRef,
    *,
    target: str,
    settings: MeasureSettings | None = None,
    sleep: Sleep = asyncio.sleep,
) -> Measurement:
    """Measure the domain ``ref`` through ``conn`` and return its :class:`Measurement`.

    :raises TargetSkipped: not running, a job, or another dirty-rate calculation (retry later).
    :raises TargetError: any other failure: LibvirtError names the libvirt call.
    """
    settings = settings or MeasureSettings()
    started_wall, started = time.time(), time.monotonic()
    windows = libvirt_windows(settings.periods_ms)
    version = await _version(conn, target)
    await _guards(conn, ref, target)
    memory_bytes = await conn.memory_bytes(ref.uuid, target=target)
    vcpu_start = (time.monotonic(), await conn.vcpu_seconds(ref.uuid, target=target))
    runs: list[dict[str, Any]] = []
    error: float | None = None
    sweeps = 0
    while sweeps < settings.max_sweeps:
        for seconds in windows:
            runs.append(await _one_window(conn, ref, seconds, target=target, settings=settings, sleep=sleep))
        sweeps += 1
        error = sampling_error(runs, memory_bytes=memory_bytes)
        if error is not None and error <= settings.target_sampling_error:
            break
        if error is None and sweeps >= 2:
            break  # two sweeps and not one sampled page changed at the shortest window: the rate is ~0
    (t0, before), t1 = vcpu_start, time.monotonic()
    after = await conn.vcpu_seconds(ref.uuid, target=target)
    vcpu = None
    if before is not None and after is not None and len(before) == len(after):
        vcpu = vcpu_share((t0, sum(before)), (t1, sum(after)), len(before))
    notes = [
        f"libvirt: {sweeps} sweep(s) of {'+'.join(map(str, windows))} s at {LIBVIRT_SAMPLE_PAGES} "
        "sample-pages per GiB (QEMU's default; libvirt passes no other)"
    ]
    if error is None:
        notes.append("libvirt: no sampled page changed within the shortest window")
    elif error > settings.target_sampling_error:
        notes.append(
            f"libvirt: sampling error {error:.0%} after {sweeps} sweeps "
            f"(target {settings.target_sampling_error:.0%}; max_sweeps {settings.max_sweeps})"
        )
    pid = read_pid(ref.pid_file)
    zeros = await asyncio.to_thread(
        zero_pages, settings, pid, None, memory_bytes, notes, target, pid_file=ref.pid_file
    )
    try:
        result = measurement_from_sweep(
            runs,
            memory_bytes=memory_bytes,
            page_size_bytes=PAGE_SIZE,
            zero_pages=zeros.count,
            zero_pages_method=zeros.method,
            strategy="libvirt",
            sample_pages_per_gib=LIBVIRT_SAMPLE_PAGES,
            zero_profile=zeros.profile,
            qemu_version=version,
            target=target,
            measured_at=started_wall,
        )
        result = zeros.into(result)
    except InputError as exc:
        raise QMPProtocolError(
            f"unusable dirty-rate results: {exc}", target=target, command="virConnectGetAllDomainStats"
        ) from exc
    return replace(
        result,
        duration_seconds=round(time.monotonic() - started, 3),
        notes=tuple(notes) + result.notes,
        vcpu_utilization=vcpu,
    )


async def _version(conn: Connection, target: str) -> str:
    try:
        return await conn.version()
    except LibvirtConnectionError as exc:
        raise LibvirtError(exc.detail, target=target, command="virConnectGetVersion") from exc


def pid_file_for(uri: str, name: str, pid_dir: str = DEFAULT_PID_DIR) -> str | None:
    """libvirt's PID file of domain ``name`` on ``uri`` when that is this host's system instance, else None
    (a remote or session URI: its PID is not ours to read)."""
    # A query (?socket=...) points at another libvirtd (KubeVirt's, in a pod): not this host's PID files.
    local = "?" not in uri and uri.rstrip("/") in (
        "qemu:",
        "qemu://",
        "qemu:///system",
        "qemu+unix:///system",
    )
    if not local or "/" in name or name in ("", ".", ".."):
        return None
    return os.path.join(pid_dir, f"{name}.pid")
