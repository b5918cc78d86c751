"""What an orchestrator really does with a migration: downtime steps, timeouts, throttling, post-copy.

Pure. Each policy takes its product's own option names and defaults, so an operator can paste them, and
follows its product's control loop (polls included: an action comes half a poll after its condition):

- ``nova`` (nova/conf/libvirt.py, nova/virt/libvirt/migration.py, the driver's migration monitor, which
  polls every 0.5 s): the max downtime rises in ``live_migration_downtime_steps`` steps, one every
  ``live_migration_downtime_delay`` x data GiB seconds, from ``live_migration_downtime / steps`` to
  ``live_migration_downtime`` (ms, whole), data GiB being max(RAM GiB, 2); at the first poll past
  ``live_migration_completion_timeout`` x data GiB seconds (0: never) it aborts
  (``live_migration_timeout_action=abort``) or forces completion (``force_complete``: post-copy if
  permitted, else it pauses the guest, and QEMU sends the rest). With ``live_migration_permit_post_copy``
  (which then wins over ``live_migration_permit_auto_converge``, as in Nova) ``should_switch_to_postcopy``
  compares ``data_remaining`` poll to poll: from the second iteration on, the first poll after a sync
  sees it jump up, and switches.
- ``kubevirt`` (virt-launcher's migration monitor, polling every 0.4 s): ``completionTimeoutPerGiB`` x
  the memory in decimal GB rounded up (``ScaledValue(Giga)``: 1 GiB counts 2), fired once the whole
  seconds elapsed exceed it: post-copy if ``allowPostCopy`` else abort. ``progressTimeout`` counts from
  the last poll whose ``remaining`` was below the previous poll's, which a migration sending data has
  at nearly every poll: it never fires here. ``allowAutoConverge``; ``bandwidthPerMigration`` (bytes/s,
  0: the link) caps the bandwidth. The downtime is QEMU's 300 ms.
- ``proxmox`` (QemuMigrate.pm, set_migration_caps): ``migrate_downtime`` seconds (0.1); every poll
  (0.1 s once little remains) that sees ``remaining`` above the previous poll's counts, and the sixth
  doubles the downtime; ``migrate_speed`` in MiB/s (0: no limit) caps the bandwidth; auto-converge and
  XBZRLE are on: from the third pass a re-sent page found in the cache costs a few bytes
  (:func:`_xbzrle_page_bytes`). No timeout.
- ``auto-converge`` (QEMU, migration/ram.c and cpu-throttle.c): at a bitmap sync more than a second
  after the last evaluation, if the bytes dirtied since then exceed ``throttle-trigger-threshold`` % of
  the bytes sent meanwhile, at every
  second such sync (as QEMU counts them, not necessarily consecutive) the vCPUs are throttled:
  ``cpu-throttle-initial`` %, then ``cpu-throttle-increment`` more each time, up to ``max-cpu-throttle``.
  With ``cpu-throttle-tailslow`` the last steps follow the overshoot instead of the fixed increment.
  The grid's downtimes apply.
- ``postcopy``: ``migrate-start-postcopy`` after ``switch_after_seconds`` or ``switch_after_passes``
  (whichever comes first); the pages still dirty are then pulled once by the destination.

A throttle of p % slows a guest only once (1 - p/100) is below the share ``u`` of its vCPU time the
guest uses (measured on real QEMU, issue 15); then it dirties in bursts of the vCPU's 10 ms slices
(:func:`_throttled_dirty`), and under TCG every throttled pass waits for the vCPU's sleep to end
(:func:`_tcg_pass_seconds`). ``u`` is the measured vCPU utilisation (1 = CPU-bound, the default when
unknown).

The simulation is per pass: the first pass sends every page (zero pages as 9 bytes), each later one what
the previous pass dirtied; after each pass comes a bitmap sync, where the throttle and the limit are
checked, and the migration stops when what is dirty fits in the current max downtime. An orchestrator's
action inside a pass (a timeout, a post-copy switch) takes what is left of that pass plus what was
dirtied since its start. The stop-and-copy and the post-copy phase are not rate-limited: they run at
the link's speed (``stop_copy_speedup`` x the bandwidth). It is coarser than the predictor's qemu mode
(no rate-limiter windows): docs/policies.md compares them, and with real migrations.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
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
MIB: Final = 1 << 20
NOVA_POLL_S: Final = 0.5  # LibvirtDriver._live_migration_monitor
KUBEVIRT_POLL_S: Final = 0.4  # virt-launcher's monitorSleepPeriodMS
PROXMOX_FAST_POLL_S: Final = 0.1  # QemuMigrate.pm's usleep once remaining is small
PROXMOX_GROWN_POLLS: Final = 5  # more polls than this with a grown `remaining` double the downtime
MAX_PASSES: Final = 100_000
THROTTLE_PERIOD_S: Final = 1.0  # migration_bitmap_sync(): "more than 1 second = 1000 millisecons"
THROTTLE_TIMESLICE_S: Final = 0.010  # cpu-throttle.c CPU_THROTTLE_TIMESLICE_NS
XBZRLE_FROM_PASS: Final = 3  # the cache fills in the second pass (XBZRLE starts once the first round ends)
XBZRLE_HEADER_BYTES: Final = 3  # ENCODING_FLAG_XBZRLE and the be16 encoded length (save_xbzrle_page)
XBZRLE_DELTA_BYTES: Final = 10  # one rewritten 8-byte word: zero-run and non-zero-run lengths, 8 bytes
SATURATED: Final = 1.1  # a curve whose second window reads at most this times its first is flat

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


@dataclass
class _Run:
    """The mutable state of one simulated migration."""

    t: float = 0.0
    throttle: float = 0.0
    high: int = 0
    passes: int = 0
    max_throttle: float = 0.0
    # migration_bitmap_sync() evaluates the throttle only once more than a second has passed since it
    # last did: the period's dirtied and sent bytes add up over the syncs in between.
    period_start: float = 0.0
    period_dirty: float = 0.0
    period_sent: float = 0.0


def _first_pass_bytes(m: MemoryModel) -> float:
    normal = m.page_size_bytes + PAGE_HEADER_BYTES
    return (m.total_pages - m.zero_pages) * normal + m.zero_pages * ZERO_PAGE_BYTES


def simulate_policy(  # noqa: PLR0911 (one control loop, every orchestrator's exit in sight)
    m: MemoryModel,
    policy: Policy,
    bandwidth: float,
    *,
    max_downtime: float | None = None,
    vcpu_utilization: float | None = None,
    deadline_seconds: float = 3600.0,
    stop_copy_speedup: float = 1.0,
    fast_forward: bool = True,
    tcg: bool = False,
) -> PolicyOutcome:
    """One migration of ``m`` at ``bandwidth`` bytes/s under ``policy`` (``max_downtime`` seconds is the
    limit where the policy has none of its own: auto-converge and postcopy; default QEMU's 300 ms).

    ``stop_copy_speedup`` (as in :class:`~migpredictd.core.predictor.PredictorSettings`): the final
    stop-and-copy and the post-copy phase are not rate-limited (QEMU's ``max-postcopy-bandwidth`` is 0,
    unlimited, by default), so they run at ``bandwidth`` x this, the link's speed.

    ``fast_forward`` takes the passes of a steady state (each pass sends exactly what the one before
    dirtied, nothing scheduled changes) up to the orchestrator's next event at once; ``False`` runs them
    one by one (the reference the tests compare with).

    ``tcg``: the guest runs under TCG (the measurement's ``accelerator``). There a bitmap sync ends with
    ``run_on_cpu()`` on every vCPU (``tcg_log_global_after_sync``), which waits until a throttled vCPU's
    sleep is over: throttled, a pass lasts whole throttle periods and holds a burst of each."""
    o = policy.options
    name = policy.name
    util = 1.0 if vcpu_utilization is None else min(max(vcpu_utilization, 1e-3), 1.0)
    ram_bytes = m.total_pages * m.page_size_bytes
    ram_gib = ram_bytes / GIB
    rate = bandwidth
    link = bandwidth * max(stop_copy_speedup, 1.0)
    if name == "kubevirt" and float(o["bandwidthPerMigration"]) > 0:  # type: ignore[arg-type]
        rate = min(rate, float(o["bandwidthPerMigration"]))  # type: ignore[arg-type]
    if name == "proxmox" and float(o["migrate_speed"]) > 0:  # type: ignore[arg-type]
        # QemuMigrate.pm: migrate_speed x 1024 (KiB/s) x 1024 (B/s)
        rate = min(rate, float(o["migrate_speed"]) * MIB)  # type: ignore[arg-type]
    link = max(link, rate)
    page_wire = m.page_size_bytes + PAGE_HEADER_BYTES

    # What the orchestrator may do, and when it looks (its poll interval: an action comes on average
    # half a poll after its condition holds).
    auto_converge = name in ("auto-converge", "proxmox")  # Proxmox's set_migration_caps turns it on
    postcopy_allowed = name == "postcopy"
    timeout_at = math.inf  # when the timeout's action is taken
    timeout_action = "abort"  # abort, postcopy or pause
    downtime_fixed = QEMU_DEFAULT_DOWNTIME_S if max_downtime is None else max_downtime
    steps: list[tuple[float, float]] = []
    if name == "nova":
        data_gib = max(ram_gib, 2.0)
        n_steps = int(o["live_migration_downtime_steps"])  # type: ignore[call-overload]
        total_ms = float(o["live_migration_downtime"])  # type: ignore[arg-type]
        delay = int(float(o["live_migration_downtime_delay"]) * data_gib)  # type: ignore[arg-type]
        base = total_ms / n_steps
        offset = (total_ms - base) / n_steps
        # update_downtime() runs at every poll: a step from its start on the next poll (the first at once)
        steps = [
            (float(delay * i) + (NOVA_POLL_S / 2 if i else 0.0), int(base + offset * i) / 1000.0)
            for i in range(n_steps + 1)
        ]
        postcopy_allowed = bool(o["live_migration_permit_post_copy"])
        auto_converge = bool(o["live_migration_permit_auto_converge"]) and not postcopy_allowed
        if float(o["live_migration_completion_timeout"]) > 0:  # type: ignore[arg-type]
            timeout = int(float(o["live_migration_completion_timeout"]) * data_gib)  # type: ignore[arg-type]
            timeout_at = timeout + NOVA_POLL_S / 2  # the first poll with elapsed > timeout
        if o["live_migration_timeout_action"] == "force_complete":
            timeout_action = "postcopy" if postcopy_allowed else "pause"
    elif name == "kubevirt":
        # acceptableCompletionTime: per GiB x the memory in GB (10^9 bytes, rounded up: ScaledValue(Giga));
        # it fires at the first poll where the whole seconds elapsed exceed it.
        acceptable = float(o["completionTimeoutPerGiB"]) * math.ceil(ram_bytes / 1e9)  # type: ignore[arg-type]
        if acceptable > 0:
            timeout_at = math.floor(acceptable) + 1.0 + KUBEVIRT_POLL_S / 2
        postcopy_allowed = bool(o["allowPostCopy"])
        timeout_action = "postcopy" if postcopy_allowed else "abort"
        auto_converge = bool(o["allowAutoConverge"])
        # progressTimeout: progress is `remaining` below the previous poll's, which a migration that
        # sends data has at nearly every 0.4 s poll; it never fires here.
    elif name == "proxmox":
        downtime_fixed = float(o["migrate_downtime"])  # type: ignore[arg-type]
    switch_at = math.inf
    switch_passes = 0
    if name == "postcopy":
        switch_at = float(o["switch_after_seconds"])  # type: ignore[arg-type]
        switch_passes = int(o["switch_after_passes"])  # type: ignore[call-overload]
    nova_switch_at = math.inf  # should_switch_to_postcopy(): the first poll after a sync whose jump stalls

    starts = [start for start, _ in steps]  # ascending: the delay is a non-negative option

    def downtime_now(t: float) -> float:
        """The limit at ``t``: that of the last step started by then (the first before any)."""
        if not steps:
            return downtime_fixed
        return steps[max(bisect.bisect_right(starts, t) - 1, 0)][1]

    run = _Run()
    pass_dirty, dirty_at = _throttled_dirty(m, 0.0, util, tcg=tcg), 0.0
    proxmox_downtime = downtime_fixed
    grown = 0.0  # Proxmox's count of polls that saw `remaining` grow
    doubled = False
    pending_bytes = _first_pass_bytes(m)  # the first pass: every page
    pending_send = pending_bytes  # what the next pass sends (less than pending_bytes with XBZRLE hits)
    # Proxmox turns XBZRLE on: from the third pass, re-sent pages found in its cache cost a few bytes
    xbzrle_page = float(page_wire)
    xbzrle_cache = _round_powerof2(int(ram_bytes / 10)) / m.page_size_bytes if name == "proxmox" else 0.0
    normal = float(m.total_pages) - m.zero_pages

    def finish(outcome: Outcome, *, left: float = 0.0, limit: float = 0.0) -> PolicyOutcome:
        """``left``: bytes still to send; ``limit`` the downtime limit (for a paused guest)."""
        post: float | None = None
        seconds: float | None = None
        downtime: float | None = None
        if outcome == "completed":
            # the guest stopped (QEMU's stop-and-copy, or Nova's pause): pre-copy at the rate until what
            # is left fits the limit, then the rest unthrottled
            down_bytes = min(left, limit * rate)
            downtime = down_bytes / link
            seconds = run.t + (left - down_bytes) / rate + downtime
        elif outcome == "postcopy":
            post = left / link
            downtime = 0.0
            seconds = run.t + post
        return PolicyOutcome(
            bandwidth=bandwidth, outcome=outcome, seconds=seconds, downtime_seconds=downtime,
            max_throttle_percent=run.max_throttle, postcopy_seconds=post,
            max_downtime=max_downtime if name in ("auto-converge", "postcopy") else None, passes=run.passes,
        )  # fmt: skip

    while True:
        # One pass: send what is pending at the rate, while the guest dirties (slowed by the throttle).
        sent = pending_send
        dt = sent / rate
        if run.throttle != dirty_at:
            pass_dirty, dirty_at = _throttled_dirty(m, run.throttle, util, tcg=tcg), run.throttle
        if tcg and run.throttle > 0.0:
            dt = _tcg_pass_seconds(dt, run.throttle)
        act_at = min(timeout_at, switch_at, nova_switch_at, deadline_seconds)
        if act_at < run.t + dt:
            # The orchestrator acts within this pass: what is left of it plus what the guest dirtied
            # since its start (pages dirtied among those still to send counted once).
            into = max(act_at - run.t, 0.0)
            run.t += into
            left = max(sent - rate * into, 0.0)
            dirtied = min(pass_dirty(into), normal) * page_wire
            rest = left + dirtied * (1.0 - left / sent if sent > 0 else 1.0)
            if act_at == deadline_seconds and act_at < min(timeout_at, switch_at, nova_switch_at):
                return finish("not_converged")
            if act_at == timeout_at and timeout_action == "abort":
                return finish("aborted")
            if act_at == timeout_at and timeout_action == "pause":
                return finish("completed", left=rest, limit=downtime_now(run.t))
            return finish("postcopy", left=rest)
        run.t += dt
        run.passes += 1
        dirty_pages = min(pass_dirty(dt), normal)
        pending_bytes = dirty_pages * page_wire
        if xbzrle_cache and run.passes == 1:  # the second pass sends these and the cache takes them
            xbzrle_page = _xbzrle_page_bytes(xbzrle_cache, dirty_pages, page_wire)
        pending_send = dirty_pages * (xbzrle_page if run.passes >= XBZRLE_FROM_PASS - 1 else page_wire)
        # The bitmap sync: QEMU checks the limit, the orchestrator looks at its next poll.
        limit = proxmox_downtime if name == "proxmox" else downtime_now(run.t)
        if pending_bytes <= rate * limit:
            return finish("completed", left=pending_send, limit=limit)
        if switch_passes and run.passes >= switch_passes:
            return finish("postcopy", left=pending_bytes)
        if (
            name == "nova"
            and postcopy_allowed
            and math.isinf(nova_switch_at)
            and pending_bytes > 0.9 * rate * NOVA_POLL_S / 2
        ):
            # From the second iteration on, a poll whose data_remaining fell by less than 10 % since the
            # previous poll switches: the first poll after a sync sees remaining jump up (from half a
            # poll's bytes, on average, at the poll before it).
            nova_switch_at = run.t + NOVA_POLL_S / 2
        if name == "proxmox":
            # Each 0.1 s poll (Proxmox polls that often once remaining is below what a 1 s poll moved)
            # that sees remaining above its previous value counts; the sixth doubles the downtime.
            grown += _proxmox_growths(pending_send, rate)
            if grown > PROXMOX_GROWN_POLLS:
                grown = 0.0
                proxmox_downtime *= 2.0
                doubled = True
        # (not right after the downtime doubled: the next pass is checked against the new limit)
        steady = pending_send == sent and not doubled
        doubled = False
        throttle_before = run.throttle
        if auto_converge:
            run.period_dirty += dirty_pages * m.page_size_bytes
            run.period_sent += sent
            if run.t - run.period_start > THROTTLE_PERIOD_S:
                _maybe_throttle(run, dirty_bytes=run.period_dirty, sent_bytes=run.period_sent, o=o)
                run.period_start, run.period_dirty, run.period_sent = run.t, 0.0, 0.0
        if run.passes >= MAX_PASSES:
            return finish("not_converged")
        if (
            fast_forward
            and steady
            and run.throttle == throttle_before
            and not (auto_converge and run.throttle < _max_throttle(o))
        ):
            # Every pass from here is this one again until the orchestrator's next event: take them at once.
            events = [deadline_seconds, timeout_at, switch_at, nova_switch_at]
            events += [start for start, _ in steps if start > run.t]
            skip = math.floor((min(events) - run.t) / dt) - 1
            if switch_passes:  # postcopy after a number of passes: that pass is an event too
                skip = min(skip, switch_passes - run.passes - 1)
            if name == "proxmox":
                per_pass = _proxmox_growths(pending_send, rate)
                if per_pass > 0:  # stop before the pass whose count doubles the downtime
                    skip = min(skip, math.ceil((PROXMOX_GROWN_POLLS - grown) / per_pass) - 1)
            if skip > 0:
                skip = min(skip, MAX_PASSES - run.passes - 1)
                run.t += skip * dt
                run.passes += skip
                if name == "proxmox":
                    grown += skip * per_pass


def _xbzrle_page_bytes(cache_pages: float, working_set: float, page_wire: float) -> float:
    """What a re-sent page costs on average with Proxmox's XBZRLE (migration/ram.c, page_cache.c).

    Proxmox sizes the cache to a tenth of the memory rounded up to a power of two (QemuMigrate.pm):
    ``cache_pages``. XBZRLE starts once the first round ends, so the second pass sends whole pages and
    the cache takes them: the ``working_set`` the first pass left dirty. The cache is direct-mapped by
    page number and keeps a page it holds for two syncs: a contiguous working set of W pages holds
    min(W, C) of its slots, and a re-dirtied page is found with the share min(1, C / W) (a working set
    scattered over guest memory aliases more). A page found costs its header, XBZRLE's 3 bytes and the
    delta, taken as one rewritten word (``XBZRLE_DELTA_BYTES``): the model assumes sparse writes, as
    the rig's dirtier and most in-place updates make them; a guest that rewrites whole pages overflows
    the encoder and costs full pages. A page not found goes whole."""
    hit = min(1.0, cache_pages / working_set) if working_set > 0 else 1.0
    encoded = PAGE_HEADER_BYTES + XBZRLE_HEADER_BYTES + XBZRLE_DELTA_BYTES
    return hit * encoded + (1.0 - hit) * page_wire


def _round_powerof2(x: int) -> int:
    """QemuMigrate.pm's round_powerof2: the next power of two at or above ``x``."""
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def _proxmox_growths(pending_bytes: float, rate: float) -> float:
    """Proxmox polls that see `remaining` grow in one pass: the first poll after its sync does when the
    pass lasts a poll or more; in shorter ones about every second poll does."""
    polls = pending_bytes / rate / PROXMOX_FAST_POLL_S
    return 1.0 if polls >= 1.0 else polls / 2.0


def _tcg_pass_seconds(send_s: float, throttle: float) -> float:
    """A pass under TCG at ``throttle`` %: its sync waits for the vCPU's sleep to end (``run_on_cpu()`` in
    ``tcg_log_global_after_sync``) and the vCPU then runs its slice, so passes start at a wake-up and
    last whole throttle periods (10 ms / (1 - throttle))."""
    period_s = THROTTLE_TIMESLICE_S / (1.0 - throttle / 100.0)
    return max(1, math.ceil(send_s / period_s - 1e-9)) * period_s


def _throttled_dirty(
    m: MemoryModel, throttle: float, util: float, *, tcg: bool = False
) -> Callable[[float], float]:
    """Pages the guest dirties in a pass of ``s`` seconds at ``throttle`` %.

    Unthrottled, or throttled less than the share ``util`` of its vCPU it uses: the curve. Otherwise the
    vCPU runs in bursts (cpu-throttle.c): 10 ms of running every 10 ms / (1 - throttle), each burst
    worth 10 ms / ``util`` of the guest's unthrottled time (a guest paced by the clock catches up on
    what it owes). Under KVM a pass shorter than that period sees a burst with the probability of its
    share of the period (the expected pages are taken); under TCG (``tcg``) every pass holds one burst per
    period it lasts (:func:`_tcg_pass_seconds`). A curve already flat at its first window (the working
    set filled faster than the measurement resolves) cannot tell what a burst shorter than that window
    dirties: the burst is taken to fill it, as a CPU-bound guest does (measured: docs/policies.md)."""
    share = 1.0 - throttle / 100.0
    if throttle <= 0.0 or share >= util:
        return lambda s: m.dirty(s * 1000.0)
    period_s = THROTTLE_TIMESLICE_S / share
    burst_ms = THROTTLE_TIMESLICE_S * 1000.0 / util
    first = 1 if m.period_ms[0] == 0.0 and len(m.period_ms) > 2 else 0
    flat = m.dirty_pages[first + 1] <= SATURATED * m.dirty_pages[first] and m.dirty_pages[first] > 0
    floor_ms = m.period_ms[first] if flat else 0.0

    def burst(ms: float) -> float:
        return m.dirty(max(ms, floor_ms))

    def dirty(s: float) -> float:
        if tcg:
            return burst(max(1, round(s / period_s)) * burst_ms)
        if s >= period_s:
            return burst(s / period_s * burst_ms)
        return s / period_s * burst(burst_ms)

    return dirty


def _max_throttle(o: Mapping[str, object]) -> float:
    return float(o["max-cpu-throttle"])  # type: ignore[arg-type]


def _maybe_throttle(run: _Run, *, dirty_bytes: float, sent_bytes: float, o: Mapping[str, object]) -> None:
    """migration_trigger_throttle(): every second period dirtying more than the threshold's share of
    what was sent raises the throttle (mig_throttle_guest_down)."""
    threshold = float(o["throttle-trigger-threshold"]) / 100.0  # type: ignore[arg-type]
    if dirty_bytes <= threshold * sent_bytes:
        return
    run.high += 1
    if run.high < 2:
        return
    run.high = 0
    initial = float(o["cpu-throttle-initial"])  # type: ignore[arg-type]
    increment = float(o["cpu-throttle-increment"])  # type: ignore[arg-type]
    ceiling = float(o["max-cpu-throttle"])  # type: ignore[arg-type]
    if run.throttle == 0.0:
        run.throttle = initial
    elif o["cpu-throttle-tailslow"] and run.throttle + increment >= ceiling:
        # tailslow: near the top, step by what the dirtying overshoots the threshold
        overshoot = 1.0 - threshold * sent_bytes / dirty_bytes
        run.throttle = min(
            ceiling, run.throttle + max(1.0, min(increment, overshoot * (100.0 - run.throttle)))
        )
    else:
        run.throttle = min(ceiling, run.throttle + increment)
    run.max_throttle = max(run.max_throttle, run.throttle)


def predict_policy(
    m: MemoryModel,
    policy: Policy,
    bandwidths: Sequence[float],
    *,
    downtimes: Sequence[float] = (),
    vcpu_utilization: float | None = None,
    deadline_seconds: float = 3600.0,
    stop_copy_speedup: float = 1.0,
    tcg: bool = False,
) -> list[PolicyOutcome]:
    """Every bandwidth under ``policy``; for auto-converge (and postcopy) every (bandwidth, downtime) of
    ``downtimes`` when given."""
    per_downtime = policy.name in ("auto-converge", "postcopy") and bool(downtimes)
    cells: list[tuple[float, float | None]] = (
        [(b, d) for b in bandwidths for d in downtimes] if per_downtime else [(b, None) for b in bandwidths]
    )
    return [
        simulate_policy(
            m,
            policy,
            b,
            max_downtime=d,
            vcpu_utilization=vcpu_utilization,
            deadline_seconds=deadline_seconds,
            stop_copy_speedup=stop_copy_speedup,
            tcg=tcg,
        )
        for b, d in cells
    ]


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
