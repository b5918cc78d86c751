"""Orchestrators' migration control loops, driven against a real QEMU over QMP (the lab's ground truth).

Each loop is written from its product's own code, not from ``core/policies.py`` (which it validates):

- ``nova``: ``LibvirtDriver._live_migration_monitor`` (nova/virt/libvirt/driver.py) with the helpers of
  nova/virt/libvirt/migration.py. It polls at once and then every 0.5 s; ``downtime_steps(data_gb)``
  (with Nova's minimums: 100 ms, 3 steps, 3 s per GiB) gives ``(int(delay * i), int(base + offset * i))``
  and ``update_downtime`` applies the last step whose start is *below* the elapsed time;
  ``should_trigger_timeout_action`` fires once ``elapsed > int(completion_timeout * data_gb)``: abort
  (``migrate_cancel``) or force completion (post-copy if permitted, else pause the guest: ``stop``);
  ``should_switch_to_postcopy`` compares ``data_remaining`` with the previous *poll's* value: from
  ``memory_iteration`` (QEMU's ``dirty-sync-count``) 2 on, a poll-to-poll progress under 10 % (rounded)
  switches. Auto-converge only when post-copy is not permitted.
- ``kubevirt``: virt-launcher's ``migrationMonitor`` (pkg/virt-launcher/virtwrap/manager.go,
  ``processInflightMigration`` without stall detection). It polls every 0.4 s; the acceptable completion
  time is ``completionTimeoutPerGiB`` x the memory in *decimal GB rounded up* (``ScaledValue(Giga)``);
  progress means ``remaining`` fell below the previous poll's value; past the completion time it
  switches to post-copy when ``allowPostCopy`` (which is ``allowWorkloadDisruption``'s default), else
  aborts; ``progressTimeout`` seconds (integer seconds, strictly more) without progress abort. QEMU's
  300 ms downtime.
- ``proxmox``: ``PVE::QemuMigrate::phase2`` with ``PVE::QemuServer::set_migration_caps``: capabilities
  ``auto-converge`` and ``xbzrle`` on (xbzrle cache: 10 % of memory rounded up to a power of two);
  ``max-bandwidth`` = ``migrate_speed`` x 1024 x 1024 (0: 16 GiB/s); ``downtime-limit`` =
  ``migrate_downtime`` x 1000 ms. It sleeps 1 s before each poll (0.1 s once ``remaining`` is below the
  average transferred per poll); every poll where ``remaining`` *grew* (or is 0) counts, and the sixth
  such poll doubles the downtime and resets the count. No timeout.
- ``auto-converge``: QEMU's own capability with the throttle parameters; the lab only polls.
- ``postcopy``: ``postcopy-ram`` on both sides; ``migrate-start-postcopy`` after ``switch_after_seconds``
  (or ``switch_after_passes`` bitmap syncs).

Lab code: it changes the VM (migrate, cancel, stop), so it uses the lab's QMP allowlist; the daemon never
imports it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from migpredictd.lab.rig import RigError
from migpredictd.lab.rig.guest import JSONObject, RigQMP

GIB: Final = 1 << 30
NOVA_POLL_S: Final = 0.5
KUBEVIRT_POLL_S: Final = 0.4
PROXMOX_POLL_S: Final = 1.0
PROXMOX_FAST_POLL_S: Final = 0.1
PROXMOX_GROWN_POLLS: Final = 5  # more polls than this with a grown `remaining` double the downtime
LAB_POLL_S: Final = 0.1
QEMU_DEFAULT_DOWNTIME_MS: Final = 300
# nova/conf/libvirt.py: the minimums downtime_steps() clamps to.
NOVA_DOWNTIME_MIN_MS: Final = 100
NOVA_STEPS_MIN: Final = 3
NOVA_DELAY_MIN_S: Final = 3
THROTTLE_PARAMETERS: Final = (
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "max-cpu-throttle",
    "throttle-trigger-threshold",
    "cpu-throttle-tailslow",
)
STUCK_GRACE_S: Final = 30.0  # past the cutoff plus this, a migration that never ends is a lab failure
# One row per poll of an active migration: seconds since `migrate`, then query-migrate's values.
TRACE_FIELDS: Final = (
    "t",
    "dirty-sync-count",
    "cpu-throttle-percentage",
    "dirty-pages-rate",
    "remaining",
    "transferred",
    "xbzrle-cache-miss",
    "xbzrle-pages",
    "xbzrle-bytes",
)
ACTIVE: Final = frozenset({"setup", "active", "postcopy-active", "device", "pre-switchover", "cancelling"})


@dataclass(frozen=True)
class Event:
    """One action the control loop took, ``t`` seconds after ``migrate``."""

    t: float
    action: str  # downtime-limit, cancel, postcopy, pause
    value: object = None


@dataclass(frozen=True)
class ControlledMigration:
    """How a migration under an orchestrator's control loop went.

    ``outcome``: ``completed`` (pre-copy, possibly after a pause), ``postcopy`` (completed after
    migrate-start-postcopy), ``aborted`` (the orchestrator cancelled it), ``not_converged`` (still
    running at the lab's cutoff, then cancelled), ``failed`` (QEMU failed it, or the destination went
    away in post-copy: a lab failure, not an orchestrator's outcome). Times are QEMU's
    (``total-time``); for a cancelled migration, the last active sample's.
    """

    policy: str
    outcome: str
    status: str
    total_time_ms: int | None
    downtime_ms: int | None
    setup_time_ms: int | None
    wall_seconds: float
    postcopy_start_s: float | None
    max_throttle_percent: int
    final_downtime_limit_ms: int
    dirty_sync_count: int | None
    max_bandwidth_bytes_per_second: int
    events: tuple[Event, ...] = ()
    last_sample: JSONObject = field(default_factory=dict, compare=False)
    # every query-migrate the loop made while active: TRACE_FIELDS per poll
    trace: tuple[tuple[float, ...], ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (events as [t, action, value])."""
        return {
            "policy": self.policy,
            "outcome": self.outcome,
            "status": self.status,
            "total_time_ms": self.total_time_ms,
            "downtime_ms": self.downtime_ms,
            "setup_time_ms": self.setup_time_ms,
            "wall_seconds": round(self.wall_seconds, 3),
            "postcopy_start_s": None if self.postcopy_start_s is None else round(self.postcopy_start_s, 3),
            "max_throttle_percent": self.max_throttle_percent,
            "final_downtime_limit_ms": self.final_downtime_limit_ms,
            "dirty_sync_count": self.dirty_sync_count,
            "max_bandwidth_bytes_per_second": self.max_bandwidth_bytes_per_second,
            "events": [[round(e.t, 3), e.action, e.value] for e in self.events],
            "ram": self.last_sample.get("ram"),
            "xbzrle": self.last_sample.get("xbzrle-cache"),
            "trace_fields": list(TRACE_FIELDS),
            "trace": [list(p) for p in self.trace],
        }


def _num(options: Mapping[str, object], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return float(str(value))


def _flag(options: Mapping[str, object], key: str) -> bool:
    value = options.get(key, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def nova_downtime_steps(ram_bytes: int, options: Mapping[str, object]) -> list[tuple[int, int]]:
    """nova.virt.libvirt.migration.downtime_steps(data_gb): [(start s, downtime ms)], as Nova yields it."""
    data_gb = max(ram_bytes / GIB, 2.0)
    downtime = max(_num(options, "live_migration_downtime", 500), NOVA_DOWNTIME_MIN_MS)
    steps = max(int(_num(options, "live_migration_downtime_steps", 10)), NOVA_STEPS_MIN)
    delay = max(_num(options, "live_migration_downtime_delay", 75), NOVA_DELAY_MIN_S)
    delay = int(delay * data_gb)
    base = downtime / steps
    offset = (downtime - base) / steps
    return [(int(delay * i), int(base + offset * i)) for i in range(steps + 1)]


def kubevirt_completion_seconds(ram_bytes: int, options: Mapping[str, object]) -> int:
    """acceptableCompletionTime: completionTimeoutPerGiB x memory in GB (10^9 bytes, rounded up)."""
    return int(_num(options, "completionTimeoutPerGiB", 150)) * math.ceil(ram_bytes / 1e9)


def _round_powerof2(x: int) -> int:
    """PVE::QemuMigrate::round_powerof2."""
    if x < 2:
        return 1
    return 2 << int(math.log(x - 1) / math.log(2))


class _Run:
    """The shared part of every loop: QMP, the clock, the actions and the last samples."""

    def __init__(self, qmp: RigQMP, policy: str, cutoff_s: float, bandwidth: int, downtime_ms: int) -> None:
        self.qmp = qmp
        self.policy = policy
        self.cutoff_s = cutoff_s
        self.bandwidth = bandwidth
        self.downtime_ms = downtime_ms
        self.events: list[Event] = []
        self.started = 0.0
        self.last_active: JSONObject = {}
        self.max_throttle = 0
        self.postcopy_at: float | None = None
        self.cancelled_by: str | None = None  # "orchestrator" or "cutoff"
        self.paused = False
        self.trace: list[tuple[float, ...]] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def set_downtime(self, ms: int) -> None:
        self.qmp.execute("migrate-set-parameters", {"downtime-limit": int(ms)})
        self.downtime_ms = int(ms)
        self.events.append(Event(self.elapsed(), "downtime-limit", int(ms)))

    def cancel(self, reason: str) -> None:
        if self.cancelled_by is None:
            self.qmp.execute("migrate_cancel")
            self.cancelled_by = "orchestrator"
            self.events.append(Event(self.elapsed(), "cancel", reason))

    def start_postcopy(self) -> None:
        if self.postcopy_at is None:
            self.qmp.execute("migrate-start-postcopy")
            self.postcopy_at = self.elapsed()
            self.events.append(Event(self.postcopy_at, "postcopy"))

    def pause(self) -> None:
        if not self.paused:
            self.qmp.execute("stop")
            self.paused = True
            self.events.append(Event(self.elapsed(), "pause"))

    def sample(self) -> JSONObject:
        """query-migrate; keeps the last active sample and the highest throttle seen. Cancels at the
        lab's cutoff (a migration that never converges would run for ever)."""
        s: Any = self.qmp.execute("query-migrate")
        if not isinstance(s, dict):
            raise RigError(f"query-migrate returned {s!r}")
        if "ram" in s:
            self.last_active = s
            self.trace.append(_trace_row(self.elapsed(), s))
        throttle = s.get("cpu-throttle-percentage")
        if isinstance(throttle, int):
            self.max_throttle = max(self.max_throttle, throttle)
        cancellable = s.get("status") in ACTIVE and s.get("status") != "postcopy-active"
        if self.cancelled_by is None and cancellable and self.elapsed() > self.cutoff_s:
            self.qmp.execute("migrate_cancel")
            self.cancelled_by = "cutoff"
            self.events.append(Event(self.elapsed(), "cancel", "lab cutoff"))
        if not _terminal(s) and self.elapsed() > self.cutoff_s + STUCK_GRACE_S:
            raise RigError(
                f"migration still {s.get('status')!r} {STUCK_GRACE_S:.0f} s after the lab's cutoff"
            )
        return s

    def finish(self, final: JSONObject) -> ControlledMigration:
        status = str(final.get("status"))
        stats = final if "ram" in final else self.last_active
        if status == "completed":
            outcome = "postcopy" if self.postcopy_at is not None else "completed"
        elif status == "cancelled":
            outcome = "not_converged" if self.cancelled_by == "cutoff" else "aborted"
        else:
            outcome = "failed"

        def num(d: JSONObject, key: str) -> int | None:
            v = d.get(key)
            return int(v) if isinstance(v, int | float) else None

        ram = stats.get("ram") if isinstance(stats.get("ram"), dict) else {}
        return ControlledMigration(
            policy=self.policy,
            outcome=outcome,
            status=status,
            total_time_ms=num(stats, "total-time"),
            downtime_ms=num(final, "downtime"),
            setup_time_ms=num(stats, "setup-time"),
            wall_seconds=self.elapsed(),
            postcopy_start_s=self.postcopy_at,
            max_throttle_percent=self.max_throttle,
            final_downtime_limit_ms=self.downtime_ms,
            dirty_sync_count=num(ram, "dirty-sync-count") if ram else None,
            max_bandwidth_bytes_per_second=self.bandwidth,
            events=tuple(self.events),
            last_sample=stats,
            trace=tuple(self.trace),
        )


def _trace_row(t: float, s: JSONObject) -> tuple[float, ...]:
    def get(d: object, key: str) -> float:
        v = d.get(key, 0) if isinstance(d, dict) else 0
        return float(v) if isinstance(v, int | float) else 0.0

    ram, xb = s.get("ram"), s.get("xbzrle-cache")
    return (
        round(t, 3),
        get(ram, "dirty-sync-count"),
        get(s, "cpu-throttle-percentage"),
        get(ram, "dirty-pages-rate"),
        get(ram, "remaining"),
        get(ram, "transferred"),
        get(xb, "cache-miss"),
        get(xb, "pages"),
        get(xb, "bytes"),
    )


def _terminal(s: JSONObject) -> bool:
    # postcopy-paused: the destination went away in post-copy (the guest runs there, half its memory
    # still here); the lab counts it as a failed run, not as an orchestrator's outcome
    return s.get("status") in ("completed", "failed", "cancelled", "postcopy-paused")


def _wait_end(run: _Run, interval: float = LAB_POLL_S) -> JSONObject:
    """Poll until the migration ends (after an abort, or in post-copy where no loop acts)."""
    while True:
        s = run.sample()
        if _terminal(s):
            return s
        time.sleep(interval)


def _ram(s: JSONObject, key: str) -> int:
    ram = s.get("ram")
    value = ram.get(key, 0) if isinstance(ram, dict) else 0
    return int(value) if isinstance(value, int | float) else 0


def controlled_migration(
    source: RigQMP,
    uri: str,
    policy: str,
    options: Mapping[str, object],
    *,
    ram_bytes: int,
    bandwidth: int,
    downtime_ms: int = QEMU_DEFAULT_DOWNTIME_MS,
    cutoff_s: float = 120.0,
) -> ControlledMigration:
    """Migrate the source (whose QMP is ``source``) to ``uri`` under ``policy``'s control loop.

    ``bandwidth`` is the ``max-bandwidth`` Nova and KubeVirt are given (Proxmox sets its own from
    ``migrate_speed``); ``downtime_ms`` the fixed limit of ``auto-converge`` and ``postcopy``. The
    destination must be listening, with ``postcopy-ram`` set when the policy may switch to post-copy.

    :raises RigError: QMP failed or QEMU reported an unexpected state.
    """
    auto_converge = False
    postcopy = False
    params: dict[str, object] = {"max-bandwidth": int(bandwidth), "downtime-limit": int(downtime_ms)}
    caps: dict[str, bool] = {}
    if policy == "nova":
        postcopy = _flag(options, "live_migration_permit_post_copy")
        auto_converge = _flag(options, "live_migration_permit_auto_converge") and not postcopy
        params["downtime-limit"] = QEMU_DEFAULT_DOWNTIME_MS  # libvirt leaves QEMU's until Nova's first poll
    elif policy == "kubevirt":
        postcopy = _flag(options, "allowPostCopy")
        auto_converge = _flag(options, "allowAutoConverge")
        if _num(options, "bandwidthPerMigration", 0) > 0:
            params["max-bandwidth"] = int(_num(options, "bandwidthPerMigration", 0))
        params["downtime-limit"] = QEMU_DEFAULT_DOWNTIME_MS
    elif policy == "proxmox":
        auto_converge = True
        caps["xbzrle"] = True
        speed = _num(options, "migrate_speed", 0)
        params["max-bandwidth"] = int(speed * 1024 * 1024) if speed > 0 else 16 << 30
        params["downtime-limit"] = int(_num(options, "migrate_downtime", 0.1) * 1000)
        params["xbzrle-cache-size"] = _round_powerof2(int(ram_bytes / 10))
    elif policy == "auto-converge":
        auto_converge = True
    elif policy == "postcopy":
        postcopy = True
    else:
        raise ValueError(f"unknown policy {policy!r}")
    caps["auto-converge"] = auto_converge
    caps["postcopy-ram"] = postcopy
    for key in THROTTLE_PARAMETERS:
        if key in options:
            params[key] = (
                _flag(options, key) if key == "cpu-throttle-tailslow" else int(_num(options, key, 0))
            )
    source.execute(
        "migrate-set-capabilities", {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]}
    )
    source.execute("migrate-set-parameters", params)
    run = _Run(source, policy, cutoff_s, int(params["max-bandwidth"]), int(params["downtime-limit"]))  # type: ignore[call-overload]
    run.started = time.monotonic()
    source.execute("migrate", {"uri": uri})
    loop = {
        "nova": _nova,
        "kubevirt": _kubevirt,
        "proxmox": _proxmox,
        "auto-converge": _plain,
        "postcopy": _postcopy,
    }[policy]
    final = loop(run, options, ram_bytes, postcopy)
    return run.finish(final)


def _nova(run: _Run, o: Mapping[str, object], ram_bytes: int, postcopy: bool) -> JSONObject:
    data_gb = max(ram_bytes / GIB, 2.0)
    steps = nova_downtime_steps(ram_bytes, o)
    completion_timeout = int(_num(o, "live_migration_completion_timeout", 800) * data_gb)
    action = str(o.get("live_migration_timeout_action", "abort"))
    previous_remaining = -1
    current: int | None = None
    while True:
        s = run.sample()
        if _terminal(s):
            return s
        # libvirt reports the job as running (VIR_DOMAIN_JOB_UNBOUNDED) from QEMU's setup on
        if s.get("status") in ("setup", "active", "postcopy-active") and run.cancelled_by is None:
            elapsed = run.elapsed()
            # should_trigger_timeout_action(): never once in post-copy
            if completion_timeout > 0 and elapsed > completion_timeout and run.postcopy_at is None:
                if action == "force_complete":
                    if postcopy:
                        run.start_postcopy()
                    else:
                        run.pause()
                else:
                    run.cancel("completion timeout")
                    return _wait_end(run)
            remaining = _ram(s, "remaining")
            # should_switch_to_postcopy()
            if postcopy and run.postcopy_at is None and previous_remaining > 0:
                iteration = _ram(s, "dirty-sync-count")
                if iteration > 1:
                    progress = round((previous_remaining - remaining) * 100 / previous_remaining)
                    if progress < 10:
                        run.start_postcopy()
            previous_remaining = remaining
            # update_downtime()
            this_step = None
            for step in steps:
                if elapsed > step[0]:
                    this_step = step
            if this_step is not None and this_step[1] != current and run.postcopy_at is None:
                run.set_downtime(this_step[1])
                current = this_step[1]
        time.sleep(NOVA_POLL_S)


def _kubevirt(run: _Run, o: Mapping[str, object], ram_bytes: int, postcopy: bool) -> JSONObject:
    acceptable = kubevirt_completion_seconds(ram_bytes, o)
    progress_timeout = int(_num(o, "progressTimeout", 150))
    watermark = 0
    last_progress = run.started
    while True:
        time.sleep(KUBEVIRT_POLL_S)
        s = run.sample()
        if _terminal(s):
            return s
        if s.get("status") not in ("active", "postcopy-active") or run.cancelled_by is not None:
            continue
        now = time.monotonic()
        elapsed = now - run.started
        remaining = _ram(s, "remaining")
        if watermark == 0 or remaining < watermark:
            last_progress = now
        watermark = remaining
        timed_out = acceptable != 0 and int(elapsed) > acceptable
        if run.postcopy_at is not None:
            continue  # nothing to track in post-copy
        if timed_out and postcopy:
            run.start_postcopy()
        elif progress_timeout != 0 and int(now - last_progress) > progress_timeout:
            run.cancel("progress timeout")
            return _wait_end(run)
        elif timed_out:
            run.cancel("completion timeout")
            return _wait_end(run)


def _proxmox(run: _Run, o: Mapping[str, object], ram_bytes: int, postcopy: bool) -> JSONObject:
    del o, ram_bytes, postcopy
    last_transferred = 0
    sleep = PROXMOX_POLL_S
    i = 0
    last_remaining: int | None = None
    counter = 0
    while True:
        i += 1
        average = last_transferred / i if last_transferred else 0
        time.sleep(sleep)
        s = run.sample()
        if _terminal(s):
            return s
        if s.get("status") == "setup":
            time.sleep(1.0)
            continue
        if s.get("status") != "active" or run.cancelled_by is not None:
            continue
        transferred = _ram(s, "transferred")
        if transferred != last_transferred:
            remaining = _ram(s, "remaining")
            if average and remaining < average:
                sleep = PROXMOX_FAST_POLL_S
            if (last_remaining and remaining > last_remaining) or remaining == 0:
                counter += 1
            last_remaining = remaining
            if counter > PROXMOX_GROWN_POLLS:
                counter = 0
                run.set_downtime(run.downtime_ms * 2)
        last_transferred = transferred


def _plain(run: _Run, o: Mapping[str, object], ram_bytes: int, postcopy: bool) -> JSONObject:
    del o, ram_bytes, postcopy
    return _wait_end(run)


def _postcopy(run: _Run, o: Mapping[str, object], ram_bytes: int, postcopy: bool) -> JSONObject:
    del ram_bytes, postcopy
    after_s = _num(o, "switch_after_seconds", 60)
    after_passes = int(_num(o, "switch_after_passes", 0))
    while True:
        s = run.sample()
        if _terminal(s):
            return s
        if s.get("status") == "active" and run.postcopy_at is None and run.cancelled_by is None:
            syncs = _ram(s, "dirty-sync-count")
            # dirty-sync-count N: N bitmap syncs, the first at setup; pass k ends with sync k + 1.
            if run.elapsed() >= after_s or (after_passes and syncs - 1 >= after_passes):
                run.start_postcopy()
        time.sleep(LAB_POLL_S)
