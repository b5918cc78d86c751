"""What an orchestrator really does with a migration: downtime steps, timeouts, throttling, post-copy.

Pure. Each policy takes its product's own option names and defaults, so an operator can paste them:

- ``nova`` (nova/conf/libvirt.py, nova/virt/libvirt/migration.py): the max downtime rises in
  ``live_migration_downtime_steps`` steps, one every ``live_migration_downtime_delay`` x data GiB
  seconds, from ``live_migration_downtime / steps`` to ``live_migration_downtime`` (ms), data GiB being
  max(RAM GiB, 2); after ``live_migration_completion_timeout`` x data GiB seconds (0: never) it aborts
  (``live_migration_timeout_action=abort``) or forces completion (``force_complete``: post-copy if
  permitted, else it pauses the guest and copies the rest). With ``live_migration_permit_post_copy`` it
  also switches to post-copy after the first pass as soon as an iteration cuts the remaining data by
  less than 10% (``should_switch_to_postcopy``), and it then wins over
  ``live_migration_permit_auto_converge``, as in Nova.
- ``kubevirt`` (MigrationPolicy and migration configuration): ``completionTimeoutPerGiB`` x
  max(RAM GiB, 1) seconds, then post-copy if ``allowPostCopy`` else abort; ``progressTimeout`` seconds
  without progress (the remaining data not falling below its lowest) aborts; ``allowAutoConverge``;
  ``bandwidthPerMigration`` (bytes/s, 0: the link) caps the bandwidth. The downtime is QEMU's 300 ms.
- ``proxmox`` (QemuMigrate.pm): ``migrate_downtime`` seconds (0.1), doubled whenever the remaining data
  has not shrunk for 5 polls of a second; ``migrate_speed`` in MB/s (0: no limit) caps the bandwidth.
  No timeout.
- ``auto-converge`` (QEMU, migration/ram.c and cpu-throttle.c): at a bitmap sync, if the bytes dirtied
  since the previous one exceed ``throttle-trigger-threshold`` % of the bytes sent meanwhile, at every
  second such sync (as QEMU counts them, not necessarily consecutive) the vCPUs are throttled:
  ``cpu-throttle-initial`` %, then ``cpu-throttle-increment`` more each time, up to ``max-cpu-throttle``.
  With ``cpu-throttle-tailslow`` the last steps follow the overshoot instead of the fixed increment.
  The grid's downtimes apply.
- ``postcopy``: ``migrate-start-postcopy`` after ``switch_after_seconds`` or ``switch_after_passes``
  (whichever comes first); the pages still dirty are then pulled once by the destination.

A throttle of p % slows a guest only once (1 - p/100) is below the share ``u`` of its vCPU time the
guest uses (measured on real QEMU, QEMU_FACTS.md): the dirtying rate is scaled by
min(1, (1 - p/100) / u). ``u`` is the measured vCPU utilisation (1 = CPU-bound, the default when unknown).

The simulation is per pass: the first pass sends every page (zero pages as 9 bytes), each later one what
the previous pass dirtied; after each pass comes a bitmap sync, where the orchestrator's clock and the
throttle are checked, and the migration stops when what is dirty fits in the current max downtime. It
is coarser than the predictor's qemu mode (no rate-limiter windows): docs/policies.md compares them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from migpredictd.core.errors import InputError
from migpredictd.core.model import MemoryModel
from migpredictd.core.predictor import PAGE_HEADER_BYTES, ZERO_PAGE_BYTES

POLICIES: Final = ("nova", "kubevirt", "proxmox", "auto-converge", "postcopy")
Outcome = Literal["completed", "aborted", "postcopy", "not_converged"]
OUTCOMES: Final = ("completed", "aborted", "postcopy", "not_converged")
GIB: Final = 1 << 30
QEMU_DEFAULT_DOWNTIME_S: Final = 0.3
PROXMOX_POLL_S: Final = 1.0
PROXMOX_STALL_POLLS: Final = 5
MAX_PASSES: Final = 100_000

_BOOL = {
    "true": True,
    "yes": True,
    "1": True,
    "on": True,
    "false": False,
    "no": False,
    "0": False,
    "off": False,
}

# Every option: (default, kind) with kind "float", "int", "bool" or a tuple of choices. Units are the
# products' own (documented in docs/policies.md).
OPTIONS: Final[Mapping[str, Mapping[str, tuple[object, object]]]] = {
    "nova": {
        "live_migration_downtime": (500.0, "float"),
        "live_migration_downtime_steps": (10, "int"),
        "live_migration_downtime_delay": (75.0, "float"),
        "live_migration_completion_timeout": (800.0, "float"),
        "live_migration_timeout_action": ("abort", ("abort", "force_complete")),
        "live_migration_permit_auto_converge": (False, "bool"),
        "live_migration_permit_post_copy": (False, "bool"),
    },
    "kubevirt": {
        "completionTimeoutPerGiB": (150.0, "float"),
        "progressTimeout": (150.0, "float"),
        "allowAutoConverge": (False, "bool"),
        "allowPostCopy": (False, "bool"),
        "bandwidthPerMigration": (0.0, "float"),
    },
    "proxmox": {
        "migrate_downtime": (0.1, "float"),
        "migrate_speed": (0.0, "float"),
    },
    "auto-converge": {},
    "postcopy": {
        "switch_after_seconds": (60.0, "float"),
        "switch_after_passes": (0, "int"),
    },
}
THROTTLE_OPTIONS: Final[Mapping[str, tuple[object, object]]] = {
    "cpu-throttle-initial": (20, "int"),
    "cpu-throttle-increment": (10, "int"),
    "max-cpu-throttle": (99, "int"),
    "throttle-trigger-threshold": (50, "int"),
    "cpu-throttle-tailslow": (False, "bool"),
}


@dataclass(frozen=True)
class Policy:
    """A policy and its options (every one of its product's options, defaults filled in)."""

    name: str
    options: Mapping[str, object] = field(default_factory=dict)

    def __getitem__(self, key: str) -> object:
        return self.options[key]


def make_policy(name: str, given: Mapping[str, str] | None = None) -> Policy:
    """``name`` with ``given`` option values (text, as on a command line or in YAML).

    :raises InputError: an unknown policy or option, or a value of the wrong kind or range, naming it.
    """
    if name not in POLICIES:
        raise InputError(f"unknown policy {name!r}; one of {', '.join(POLICIES)}", field="policy")
    known = {**OPTIONS[name], **THROTTLE_OPTIONS}
    values: dict[str, object] = {k: default for k, (default, _) in known.items()}
    for key, text in (given or {}).items():
        if key not in known:
            raise InputError(f"{name} has no option {key!r}; known: {', '.join(known)}", field=key)
        values[key] = _value(key, str(text), known[key][1])
    _check_ranges(values)
    return Policy(name=name, options=values)


def _value(key: str, text: str, kind: object) -> object:
    t = text.strip()
    if isinstance(kind, tuple):
        if t not in kind:
            raise InputError(f"must be one of {', '.join(map(str, kind))}, not {t!r}", field=key)
        return t
    if kind == "bool":
        if t.lower() not in _BOOL:
            raise InputError(f"must be true or false, not {t!r}", field=key)
        return _BOOL[t.lower()]
    try:
        number = int(t) if kind == "int" else float(t)
    except ValueError:
        raise InputError(
            f"must be {'an integer' if kind == 'int' else 'a number'}, not {t!r}", field=key
        ) from None
    if not math.isfinite(number) or number < 0:
        raise InputError(f"must be a non-negative finite number, not {t!r}", field=key)
    return number


def _check_ranges(v: Mapping[str, object]) -> None:
    def num(key: str) -> float:
        x = v.get(key)
        return float(x) if isinstance(x, int | float) else 0.0

    if "live_migration_downtime_steps" in v and num("live_migration_downtime_steps") < 1:
        raise InputError("must be at least 1", field="live_migration_downtime_steps")
    if "live_migration_downtime" in v and num("live_migration_downtime") < 100:
        raise InputError("must be at least 100 (ms), as in Nova", field="live_migration_downtime")
    if "migrate_downtime" in v and num("migrate_downtime") <= 0:
        raise InputError("must be positive (seconds)", field="migrate_downtime")
    for key in ("cpu-throttle-initial", "cpu-throttle-increment", "max-cpu-throttle"):
        if not 1 <= num(key) <= 99:
            raise InputError("must be in 1..99 (%), as in QEMU", field=key)
    if not 1 <= num("throttle-trigger-threshold") <= 100:
        raise InputError("must be in 1..100 (%), as in QEMU", field="throttle-trigger-threshold")


@dataclass(frozen=True, slots=True)
class PolicyOutcome:
    """What the orchestrator ends up doing at one bandwidth (and max downtime, for auto-converge)."""

    bandwidth: float
    outcome: Outcome
    seconds: float | None  # total time until the guest runs on the destination; None unless it does
    downtime_seconds: float | None
    max_throttle_percent: float
    postcopy_seconds: float | None
    max_downtime: float | None = None  # auto-converge only: the grid's downtime of this cell
    passes: int = 0


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one policy does with one VM's migration, whatever the bandwidth: its options read and
    converted once, the model's curve ready for bisection (the same values and float operations as
    reading them at every pass)."""

    name: str
    page_size: int
    page_wire: int
    first_pass_bytes: float
    normal: float
    # MemoryModel.dirty's breakpoints, slopes and offsets
    period_ms: tuple[float, ...]
    dirty_pages: tuple[float, ...]
    slopes: tuple[float, ...]
    offsets: tuple[float, ...]
    rate_cap: float  # kubevirt's bandwidthPerMigration, proxmox's migrate_speed; inf = none
    auto_converge: bool
    postcopy_allowed: bool
    timeout: float
    force_complete: bool
    downtime_fixed: float | None  # proxmox's migrate_downtime; None = the cell's, else QEMU's default
    step_starts: tuple[float, ...]  # nova's downtime steps: from when, and the downtime then
    step_values: tuple[float, ...]
    switch_at: float
    switch_passes: int
    progress_timeout: float
    # auto-converge's options (throttle-trigger-threshold as a share)
    threshold: float
    initial: float
    increment: float
    ceiling: float
    tailslow: bool


def _plan(m: MemoryModel, policy: Policy) -> _Plan:
    o = policy.options
    name = policy.name
    ram_gib = m.total_pages * m.page_size_bytes / GIB
    rate_cap = math.inf
    if name == "kubevirt" and float(o["bandwidthPerMigration"]) > 0:  # type: ignore[arg-type]
        rate_cap = float(o["bandwidthPerMigration"])  # type: ignore[arg-type]
    if name == "proxmox" and float(o["migrate_speed"]) > 0:  # type: ignore[arg-type]
        rate_cap = float(o["migrate_speed"]) * 1e6  # type: ignore[arg-type]
    auto_converge = name == "auto-converge"
    postcopy_allowed = name == "postcopy"
    timeout = math.inf
    timeout_action = "abort"
    downtime_fixed = None
    steps: list[tuple[float, float]] = []
    if name == "nova":
        data_gib = max(ram_gib, 2.0)
        n_steps = int(o["live_migration_downtime_steps"])  # type: ignore[call-overload]
        total_ms = float(o["live_migration_downtime"])  # type: ignore[arg-type]
        delay = int(float(o["live_migration_downtime_delay"]) * data_gib)  # type: ignore[arg-type]
        base = total_ms / n_steps
        offset = (total_ms - base) / n_steps
        steps = [(float(delay * i), (base + offset * i) / 1000.0) for i in range(n_steps + 1)]
        if float(o["live_migration_completion_timeout"]) > 0:  # type: ignore[arg-type]
            timeout = int(float(o["live_migration_completion_timeout"]) * data_gib)  # type: ignore[arg-type]
        timeout_action = str(o["live_migration_timeout_action"])
        postcopy_allowed = bool(o["live_migration_permit_post_copy"])
        auto_converge = bool(o["live_migration_permit_auto_converge"]) and not postcopy_allowed
    elif name == "kubevirt":
        timeout = float(o["completionTimeoutPerGiB"]) * max(ram_gib, 1.0)  # type: ignore[arg-type]
        postcopy_allowed = bool(o["allowPostCopy"])
        timeout_action = "force_complete" if postcopy_allowed else "abort"
        auto_converge = bool(o["allowAutoConverge"])
    elif name == "proxmox":
        downtime_fixed = float(o["migrate_downtime"])  # type: ignore[arg-type]
    normal_wire = m.page_size_bytes + PAGE_HEADER_BYTES
    return _Plan(
        name=name,
        page_size=m.page_size_bytes,
        page_wire=normal_wire,
        first_pass_bytes=(m.total_pages - m.zero_pages) * normal_wire + m.zero_pages * ZERO_PAGE_BYTES,
        normal=float(m.total_pages) - m.zero_pages,
        period_ms=m.period_ms,
        dirty_pages=m.dirty_pages,
        slopes=m.slopes,
        offsets=m.offsets,
        rate_cap=rate_cap,
        auto_converge=auto_converge,
        postcopy_allowed=postcopy_allowed,
        timeout=timeout,
        force_complete=timeout_action == "force_complete",
        downtime_fixed=downtime_fixed,
        step_starts=tuple(start for start, _ in steps),
        step_values=tuple(value for _, value in steps),
        switch_at=float(o["switch_after_seconds"]) if name == "postcopy" else math.inf,  # type: ignore[arg-type]
        switch_passes=int(o["switch_after_passes"]) if name == "postcopy" else 0,  # type: ignore[call-overload]
        progress_timeout=float(o["progressTimeout"]) if name == "kubevirt" else math.inf,  # type: ignore[arg-type]
        threshold=float(o["throttle-trigger-threshold"]) / 100.0,  # type: ignore[arg-type]
        initial=float(o["cpu-throttle-initial"]),  # type: ignore[arg-type]
        increment=float(o["cpu-throttle-increment"]),  # type: ignore[arg-type]
        ceiling=float(o["max-cpu-throttle"]),  # type: ignore[arg-type]
        tailslow=bool(o["cpu-throttle-tailslow"]),
    )


def simulate_policy(
    m: MemoryModel,
    policy: Policy,
    bandwidth: float,
    *,
    max_downtime: float | None = None,
    vcpu_utilization: float | None = None,
    deadline_seconds: float = 3600.0,
    fast_forward: bool = True,
) -> PolicyOutcome:
    """One migration of ``m`` at ``bandwidth`` bytes/s under ``policy`` (``max_downtime`` seconds is the
    limit where the policy has none of its own: auto-converge and postcopy; default QEMU's 300 ms).

    ``fast_forward`` takes the passes of a steady state (each pass sends exactly what the one before
    dirtied, nothing scheduled changes) up to the orchestrator's next event at once; ``False`` runs them
    one by one (the reference the tests compare with)."""
    return _simulate(
        _plan(m, policy),
        bandwidth,
        max_downtime=max_downtime,
        vcpu_utilization=vcpu_utilization,
        deadline_seconds=deadline_seconds,
        fast_forward=fast_forward,
    )


def _finish(  # noqa: PLR0917 (_simulate's exits pass its loop's state as it stands)
    plan: _Plan,
    bandwidth: float,
    rate: float,
    max_downtime: float | None,
    outcome: Outcome,
    t: float,
    max_throttle: float,
    passes: int,
    *,
    postcopy_bytes: float = 0.0,
    down_bytes: float = 0.0,
) -> PolicyOutcome:
    post = postcopy_bytes / rate if outcome == "postcopy" else None
    seconds: float | None = None
    downtime: float | None = None
    if outcome == "completed":
        downtime = down_bytes / rate
        seconds = t + downtime
    elif outcome == "postcopy":
        downtime = 0.0
        seconds = t + (post or 0.0)
    return PolicyOutcome(
        bandwidth=bandwidth, outcome=outcome, seconds=seconds, downtime_seconds=downtime,
        max_throttle_percent=max_throttle, postcopy_seconds=post,
        max_downtime=max_downtime if plan.name in ("auto-converge", "postcopy") else None, passes=passes,
    )  # fmt: skip


def _simulate(  # noqa: PLR0911 (one control loop, every orchestrator's exit in sight)
    plan: _Plan,
    bandwidth: float,
    *,
    max_downtime: float | None,
    vcpu_utilization: float | None,
    deadline_seconds: float,
    fast_forward: bool,
) -> PolicyOutcome:
    name = plan.name
    util = 1.0 if vcpu_utilization is None else min(max(vcpu_utilization, 1e-3), 1.0)
    rate = min(bandwidth, plan.rate_cap)
    page_wire = plan.page_wire
    auto_converge = plan.auto_converge
    postcopy_allowed = plan.postcopy_allowed
    postcopy_switch = postcopy_allowed and name == "postcopy"
    nova_switch = postcopy_allowed and name == "nova"
    timeout = plan.timeout
    switch_at = plan.switch_at
    switch_passes = plan.switch_passes
    is_kubevirt, is_proxmox = name == "kubevirt", name == "proxmox"
    if plan.downtime_fixed is not None:
        downtime_fixed = plan.downtime_fixed
    else:
        downtime_fixed = QEMU_DEFAULT_DOWNTIME_S if max_downtime is None else max_downtime
    starts, values = plan.step_starts, plan.step_values
    xs, ys, slopes, offsets = plan.period_ms, plan.dirty_pages, plan.slopes, plan.offsets
    last = len(xs)
    bisect_left, bisect_right, isnan = bisect.bisect_left, bisect.bisect_right, math.isnan

    # The migration's state.
    t = 0.0
    throttle = 0.0
    high = 0
    passes = 0
    max_throttle = 0.0
    proxmox_downtime = downtime_fixed
    stalled_since: float | None = None
    lowest_pending = math.inf
    lowest_at = 0.0
    previous_pending = math.inf
    doubled = False
    pending_bytes = plan.first_pass_bytes  # the first pass: every page
    normal = plan.normal
    stall_s = PROXMOX_STALL_POLLS * PROXMOX_POLL_S

    while True:
        # One pass: send what is pending at the rate, while the guest dirties (slowed by the throttle).
        sent = pending_bytes
        dt = sent / rate
        t += dt
        passes += 1
        speed = min(1.0, (1.0 - throttle / 100.0) / util)
        # MemoryModel.dirty(ms): the first breakpoint at or after ms, by bisection.
        ms = dt * 1000.0 * speed
        i = last if isnan(ms) else bisect_left(xs, ms)  # (nan: the last point, as dirty's scan)
        dirty = ys[-1] if i == last else ys[i] if xs[i] == ms else offsets[i] + slopes[i] * ms
        dirty_pages = min(dirty, normal)
        pending_bytes = dirty_pages * page_wire
        # The bitmap sync: the orchestrator looks, QEMU may throttle.
        if is_proxmox:
            limit = proxmox_downtime
        elif starts:  # nova's step in force: the last one started
            limit = values[max(bisect_right(starts, t) - 1, 0)]
        else:
            limit = downtime_fixed
        if pending_bytes / rate <= limit:
            return _finish(
                plan, bandwidth, rate, max_downtime, "completed", t, max_throttle, passes,
                down_bytes=pending_bytes,
            )  # fmt: skip
        if postcopy_switch and (t >= switch_at or (switch_passes and passes >= switch_passes)):
            return _finish(
                plan, bandwidth, rate, max_downtime, "postcopy", t, max_throttle, passes,
                postcopy_bytes=pending_bytes,
            )  # fmt: skip
        # should_switch_to_postcopy(): after the first pass, an iteration that cut the remaining data by
        # less than 10% switches to post-copy.
        if (
            nova_switch
            and passes >= 2
            and previous_pending < math.inf
            and (previous_pending - pending_bytes) * 100.0 / previous_pending < 10.0
        ):
            return _finish(
                plan, bandwidth, rate, max_downtime, "postcopy", t, max_throttle, passes,
                postcopy_bytes=pending_bytes,
            )  # fmt: skip
        if t >= timeout:
            if plan.force_complete:
                if postcopy_allowed:
                    return _finish(
                        plan, bandwidth, rate, max_downtime, "postcopy", t, max_throttle, passes,
                        postcopy_bytes=pending_bytes,
                    )  # fmt: skip
                return _finish(  # Nova pauses the guest
                    plan, bandwidth, rate, max_downtime, "completed", t, max_throttle, passes,
                    down_bytes=pending_bytes,
                )  # fmt: skip
            return _finish(plan, bandwidth, rate, max_downtime, "aborted", t, max_throttle, passes)
        if is_kubevirt:
            if pending_bytes < lowest_pending:
                lowest_pending, lowest_at = pending_bytes, t
            elif t - lowest_at >= plan.progress_timeout:
                if postcopy_allowed:
                    return _finish(
                        plan, bandwidth, rate, max_downtime, "postcopy", t, max_throttle, passes,
                        postcopy_bytes=pending_bytes,
                    )  # fmt: skip
                return _finish(plan, bandwidth, rate, max_downtime, "aborted", t, max_throttle, passes)
        elif is_proxmox:
            if pending_bytes < previous_pending:
                stalled_since = None
            elif stalled_since is None:
                stalled_since = t - dt
            if stalled_since is not None and t - stalled_since >= stall_s:
                proxmox_downtime *= 2.0
                stalled_since = t
                doubled = True
        # (not right after the downtime doubled: the next pass is checked against the new limit)
        steady = pending_bytes == sent and not doubled
        doubled = False
        previous_pending = pending_bytes
        throttle_before = throttle
        if auto_converge and passes >= 2:
            # migration_trigger_throttle(): every second period dirtying more than the threshold's
            # share of what was sent raises the throttle (mig_throttle_guest_down).
            dirty_bytes = dirty_pages * plan.page_size
            threshold = plan.threshold
            if not dirty_bytes <= threshold * sent:
                high += 1
                if high >= 2:
                    high = 0
                    increment, ceiling = plan.increment, plan.ceiling
                    if throttle == 0.0:
                        throttle = plan.initial
                    elif plan.tailslow and throttle + increment >= ceiling:
                        # tailslow: near the top, step by what the dirtying overshoots the threshold
                        overshoot = 1.0 - threshold * sent / dirty_bytes
                        throttle = min(
                            ceiling, throttle + max(1.0, min(increment, overshoot * (100.0 - throttle)))
                        )
                    else:
                        throttle = min(ceiling, throttle + increment)
                    max_throttle = max(max_throttle, throttle)
        if t >= deadline_seconds or passes >= MAX_PASSES:
            return _finish(plan, bandwidth, rate, max_downtime, "not_converged", t, max_throttle, passes)
        if (
            fast_forward
            and steady
            and throttle == throttle_before
            and not (auto_converge and throttle < plan.ceiling)
        ):
            # Every pass from here is this one again until the orchestrator's next event: take them at once.
            events = [deadline_seconds, timeout, switch_at]
            events += [start for start in starts if start > t]
            if is_kubevirt:
                events.append(lowest_at + plan.progress_timeout)
            if is_proxmox:
                # a steady pass does not shrink the remaining data: the stall runs from here at the latest
                since = t if stalled_since is None else stalled_since
                events.append(since + stall_s)
            skip = math.floor((min(events) - t) / dt) - 1
            if switch_passes:  # postcopy after a number of passes: that pass is an event too
                skip = min(skip, switch_passes - passes - 1)
            if skip > 0:
                skip = min(skip, MAX_PASSES - passes - 1)
                t += skip * dt
                passes += skip


def predict_policy(
    m: MemoryModel,
    policy: Policy,
    bandwidths: Sequence[float],
    *,
    downtimes: Sequence[float] = (),
    vcpu_utilization: float | None = None,
    deadline_seconds: float = 3600.0,
) -> list[PolicyOutcome]:
    """Every bandwidth under ``policy``; for auto-converge (and postcopy) every (bandwidth, downtime) of
    ``downtimes`` when given."""
    per_downtime = policy.name in ("auto-converge", "postcopy") and bool(downtimes)
    cells: list[tuple[float, float | None]] = (
        [(b, d) for b in bandwidths for d in downtimes] if per_downtime else [(b, None) for b in bandwidths]
    )
    plan = _plan(m, policy)  # once for every cell
    return [
        _simulate(
            plan, b, max_downtime=d, vcpu_utilization=vcpu_utilization, deadline_seconds=deadline_seconds,
            fast_forward=True,
        )
        for b, d in cells
    ]  # fmt: skip


def outcome_to_json(p: PolicyOutcome) -> dict[str, object]:
    """One entry of the CLI's ``policy_predictions``."""
    out: dict[str, object] = {
        "bandwidth_bytes_per_second": p.bandwidth,
        "outcome": p.outcome,
        "migration_seconds": p.seconds,
        "downtime_seconds": p.downtime_seconds,
        "max_throttle_percent": p.max_throttle_percent,
        "postcopy_seconds": p.postcopy_seconds,
    }
    if p.max_downtime is not None:
        out["max_downtime_seconds"] = None if math.isinf(p.max_downtime) else p.max_downtime
    return out
