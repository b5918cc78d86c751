"""Oracles and speed baselines: plain implementations that the fast predictor is checked against.

- :func:`seed_cell_ms` re-states the 2023 script's rules one cell and one pass at a time, with a linear
  scan of the breakpoints for every evaluation, as the script does. Tests check that the vectorised
  ``seed`` mode of :mod:`migpredictd.core.predictor` gives identical milliseconds; ``benchmarks/predict.py``
  times both.
- :func:`brute_force_derived` computes the derived answers without the predictor's shortcuts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from migpredictd.core.model import MemoryModel
from migpredictd.core.predictor import (
    BISECTION_STEPS,
    MIN_BANDWIDTH_SEARCH,
    MIN_DOWNTIME_FLOOR,
    PAGE_HEADER_BYTES,
    FloatArray,
    Grid,
    IntArray,
    ModelBatch,
    PredictorSettings,
    settle_on_grid,
    simulate,
)


def dirty_by_scan(model: MemoryModel, ms: float) -> float:
    """:meth:`MemoryModel.dirty` (the same values) by a linear scan of the breakpoints, as the script
    evaluates its model: the baseline keeps the script's cost."""
    for i, x in enumerate(model.period_ms):
        if x == ms:
            return model.dirty_pages[i]
        if x > ms:
            return model.offsets[i] + model.slopes[i] * ms
    return model.dirty_pages[-1]


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
        normal = dirty_by_scan(model, pass_ms)


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
