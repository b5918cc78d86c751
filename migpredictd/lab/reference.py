"""Oracles and speed baselines: plain implementations that the fast predictor is checked against.

- :func:`seed_cell_ms` re-states the 2023 script's rules one cell and one pass at a time, with a linear
  scan of the breakpoints for every evaluation, as the script does. Tests check that the vectorised
  ``seed`` mode of :mod:`migpredictd.core.predictor` gives identical milliseconds; ``benchmarks/predict.py``
  times both.
- :func:`brute_force_derived` computes the derived answers without the predictor's shortcuts.
- :func:`reference_simulate_policy` is the orchestrator policies' simulation as first written, one
  migration at a time with every constant looked up again; the fast one must give the same outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from migpredictd.core.model import MemoryModel
from migpredictd.core.policies import (
    GIB,
    MAX_PASSES,
    PROXMOX_POLL_S,
    PROXMOX_STALL_POLLS,
    QEMU_DEFAULT_DOWNTIME_S,
    Outcome,
    Policy,
    PolicyOutcome,
)
from migpredictd.core.predictor import (
    BISECTION_STEPS,
    MIN_BANDWIDTH_SEARCH,
    MIN_DOWNTIME_FLOOR,
    PAGE_HEADER_BYTES,
    ZERO_PAGE_BYTES,
    FloatArray,
    Grid,
    IntArray,
    ModelBatch,
    PredictorSettings,
    settle_on_grid,
    simulate,
)


def seed_cell_ms(model: MemoryModel, bandwidth: float, downtime_ms: float, deadline_ms: float) -> int | None:
    """Milliseconds the seed predicts for one cell, or None if it does not converge by the deadline."""
    normal = model.total_pages - model.zero_pages
    zero = model.zero_pages
    elapsed = 0.0
    previous = math.nan
    while True:
        pass_bytes = normal * (model.page_size_bytes + PAGE_HEADER_BYTES) + zero * PAGE_HEADER_BYTES
        pass_ms = pass_bytes * 1000.0 / bandwidth
        before, elapsed = elapsed, elapsed + pass_ms
        if pass_ms <= downtime_ms:
            return math.ceil(elapsed)
        if elapsed > deadline_ms:
            return None
        # The script checks only the deadline, which a pass too small to change `elapsed` never brings
        # closer: it hangs (e.g. the cover letter at 5 Gbps and 0 ms, where passes shrink to a denormal
        # fixed point). The next pass depends only on this one, so such a repeat is forever: no answer.
        if elapsed == before and pass_ms == previous:
            return None
        previous = pass_ms
        zero = 0.0
        normal = model.dirty(pass_ms)


def brute_force_derived(
    batch: ModelBatch, grid: Grid, settings: PredictorSettings
) -> tuple[FloatArray, FloatArray]:
    """The derived answers as the first version computed them, the oracle of the fast search: every
    sync simulated one by one (``shortcut=False``), and a plain bisection of the logarithm of the whole
    range, 20 halvings, for every (VM, downtime) and (VM, bandwidth). Returns ([vm, downtime] bytes/s,
    [vm, bandwidth] seconds), with 0 and nan as :func:`migpredictd.core.predictor.predict_grid` has them."""
    nv = len(batch)
    downtimes, bandwidths = np.array(grid.downtimes), np.array(grid.bandwidths)

    def converges(vm: IntArray, bw: FloatArray, dt: FloatArray) -> npt.NDArray[np.bool_]:
        return simulate(batch, vm, bw, dt, settings, shortcut=False).converges

    def bisect(
        lo: FloatArray, hi: FloatArray, ok_at: Callable[[FloatArray], npt.NDArray[np.bool_]]
    ) -> FloatArray:
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2.0
            ok = ok_at(np.exp(mid))
            hi = np.where(ok, mid, hi)
            lo = np.where(ok, lo, mid)
        return hi

    vm = np.repeat(np.arange(nv), len(downtimes))
    dt = np.tile(downtimes, nv)
    lo = np.full(vm.size, math.log(MIN_BANDWIDTH_SEARCH[0]))
    hi = np.full(vm.size, math.log(MIN_BANDWIDTH_SEARCH[1]))
    ok_hi, ok_lo = converges(vm, np.exp(hi), dt), converges(vm, np.exp(lo), dt)
    found = bisect(lo, hi, lambda bw: converges(vm, bw, dt))
    min_bw = np.where(ok_lo, 0.0, np.where(ok_hi, np.exp(found), np.nan))
    min_bw = settle_on_grid(
        min_bw, np.tile(bandwidths, (vm.size, 1)), top=ok_hi, log_floor=lo, log_cap=hi,
        converges=lambda rows, bw: converges(vm[rows], bw, dt[rows]),
    )  # fmt: skip

    vm = np.repeat(np.arange(nv), len(bandwidths))
    bw = np.tile(bandwidths, nv)
    floor, cap = MIN_DOWNTIME_FLOOR, max(settings.deadline_seconds, MIN_DOWNTIME_FLOOR)
    lo = np.full(vm.size, math.log(floor))
    hi = np.full(vm.size, math.log(cap))
    ok_zero, ok_hi = converges(vm, bw, np.zeros(vm.size)), converges(vm, bw, np.full(vm.size, cap))
    found = bisect(lo, hi, lambda d: converges(vm, bw, d))
    min_dt = np.where(ok_zero, 0.0, np.where(ok_hi, np.exp(found), np.nan))
    min_dt = settle_on_grid(
        min_dt, np.tile(downtimes, (vm.size, 1)), top=ok_hi, log_floor=lo, log_cap=hi,
        converges=lambda rows, d: converges(vm[rows], bw[rows], d),
    )  # fmt: skip
    return min_bw.reshape(nv, len(downtimes)), min_dt.reshape(nv, len(bandwidths))


@dataclass
class _Run:
    """The mutable state of one simulated migration."""

    t: float = 0.0
    throttle: float = 0.0
    high: int = 0
    passes: int = 0
    max_throttle: float = 0.0


def _first_pass_bytes(m: MemoryModel) -> float:
    normal = m.page_size_bytes + PAGE_HEADER_BYTES
    return (m.total_pages - m.zero_pages) * normal + m.zero_pages * ZERO_PAGE_BYTES


def reference_simulate_policy(  # noqa: PLR0911 (the control loop as first written)
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
    one by one.

    :func:`migpredictd.core.policies.simulate_policy` as it was before it computed each policy's and
    model's constants once for all bandwidths (issue 17), kept verbatim: the oracle its tests compare
    with, outcome for outcome."""
    o = policy.options
    name = policy.name
    util = 1.0 if vcpu_utilization is None else min(max(vcpu_utilization, 1e-3), 1.0)
    ram_gib = m.total_pages * m.page_size_bytes / GIB
    rate = bandwidth
    if name == "kubevirt" and float(o["bandwidthPerMigration"]) > 0:  # type: ignore[arg-type]
        rate = min(rate, float(o["bandwidthPerMigration"]))  # type: ignore[arg-type]
    if name == "proxmox" and float(o["migrate_speed"]) > 0:  # type: ignore[arg-type]
        rate = min(rate, float(o["migrate_speed"]) * 1e6)  # type: ignore[arg-type]
    page_wire = m.page_size_bytes + PAGE_HEADER_BYTES

    # What the orchestrator may do.
    auto_converge = name == "auto-converge"
    postcopy_allowed = name == "postcopy"
    timeout = math.inf
    timeout_action = "abort"
    downtime_fixed = QEMU_DEFAULT_DOWNTIME_S if max_downtime is None else max_downtime
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
    switch_at = math.inf
    switch_passes = 0
    if name == "postcopy":
        switch_at = float(o["switch_after_seconds"])  # type: ignore[arg-type]
        switch_passes = int(o["switch_after_passes"])  # type: ignore[call-overload]

    def downtime_now(t: float) -> float:
        if steps:
            current = steps[0][1]
            for start, value in steps:
                if start <= t:
                    current = value
            return current
        return downtime_fixed

    run = _Run()
    proxmox_downtime = downtime_fixed
    stalled_since: float | None = None
    lowest_pending = math.inf
    lowest_at = 0.0
    previous_pending = math.inf
    doubled = False
    pending_bytes = _first_pass_bytes(m)  # the first pass: every page
    normal = float(m.total_pages) - m.zero_pages

    def finish(outcome: Outcome, *, postcopy_bytes: float = 0.0, down_bytes: float = 0.0) -> PolicyOutcome:
        post = postcopy_bytes / rate if outcome == "postcopy" else None
        seconds: float | None = None
        downtime: float | None = None
        if outcome == "completed":
            downtime = down_bytes / rate
            seconds = run.t + downtime
        elif outcome == "postcopy":
            downtime = 0.0
            seconds = run.t + (post or 0.0)
        return PolicyOutcome(
            bandwidth=bandwidth, outcome=outcome, seconds=seconds, downtime_seconds=downtime,
            max_throttle_percent=run.max_throttle, postcopy_seconds=post,
            max_downtime=max_downtime if name in ("auto-converge", "postcopy") else None, passes=run.passes,
        )  # fmt: skip

    while True:
        # One pass: send what is pending at the rate, while the guest dirties (slowed by the throttle).
        sent = pending_bytes
        dt = sent / rate
        run.t += dt
        run.passes += 1
        speed = min(1.0, (1.0 - run.throttle / 100.0) / util)
        dirty_pages = min(m.dirty(dt * 1000.0 * speed), normal)
        pending_bytes = dirty_pages * page_wire
        # The bitmap sync: the orchestrator looks, QEMU may throttle.
        limit = proxmox_downtime if name == "proxmox" else downtime_now(run.t)
        if pending_bytes / rate <= limit:
            return finish("completed", down_bytes=pending_bytes)
        if (
            postcopy_allowed
            and name == "postcopy"
            and (run.t >= switch_at or (switch_passes and run.passes >= switch_passes))
        ):
            return finish("postcopy", postcopy_bytes=pending_bytes)
        # should_switch_to_postcopy(): after the first pass, an iteration that cut the remaining data by
        # less than 10% switches to post-copy.
        if (
            postcopy_allowed
            and name == "nova"
            and run.passes >= 2
            and previous_pending < math.inf
            and (previous_pending - pending_bytes) * 100.0 / previous_pending < 10.0
        ):
            return finish("postcopy", postcopy_bytes=pending_bytes)
        if run.t >= timeout:
            if timeout_action == "force_complete":
                if postcopy_allowed:
                    return finish("postcopy", postcopy_bytes=pending_bytes)
                return finish("completed", down_bytes=pending_bytes)  # Nova pauses the guest
            return finish("aborted")
        if name == "kubevirt":
            if pending_bytes < lowest_pending:
                lowest_pending, lowest_at = pending_bytes, run.t
            elif run.t - lowest_at >= float(o["progressTimeout"]):  # type: ignore[arg-type]
                if postcopy_allowed:
                    return finish("postcopy", postcopy_bytes=pending_bytes)
                return finish("aborted")
        if name == "proxmox":
            if pending_bytes < previous_pending:
                stalled_since = None
            elif stalled_since is None:
                stalled_since = run.t - dt
            if stalled_since is not None and run.t - stalled_since >= PROXMOX_STALL_POLLS * PROXMOX_POLL_S:
                proxmox_downtime *= 2.0
                stalled_since = run.t
                doubled = True
        # (not right after the downtime doubled: the next pass is checked against the new limit)
        steady = pending_bytes == sent and not doubled
        doubled = False
        previous_pending = pending_bytes
        throttle_before = run.throttle
        if auto_converge and run.passes >= 2:
            _maybe_throttle(run, dirty_bytes=dirty_pages * m.page_size_bytes, sent_bytes=sent, o=o)
        if run.t >= deadline_seconds or run.passes >= MAX_PASSES:
            return finish("not_converged")
        if (
            fast_forward
            and steady
            and run.throttle == throttle_before
            and not (auto_converge and run.throttle < _max_throttle(o))
        ):
            # Every pass from here is this one again until the orchestrator's next event: take them at once.
            events = [deadline_seconds, timeout, switch_at]
            events += [start for start, _ in steps if start > run.t]
            if name == "kubevirt":
                events.append(lowest_at + float(o["progressTimeout"]))  # type: ignore[arg-type]
            if name == "proxmox":
                # a steady pass does not shrink the remaining data: the stall runs from here at the latest
                since = run.t if stalled_since is None else stalled_since
                events.append(since + PROXMOX_STALL_POLLS * PROXMOX_POLL_S)
            skip = math.floor((min(events) - run.t) / dt) - 1
            if switch_passes:  # postcopy after a number of passes: that pass is an event too
                skip = min(skip, switch_passes - run.passes - 1)
            if skip > 0:
                skip = min(skip, MAX_PASSES - run.passes - 1)
                run.t += skip * dt
                run.passes += skip


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
