"""Pre-copy migration prediction: time, passes and bytes for every (VM, bandwidth, max downtime) cell.

Two modes share one vectorised engine (numpy, all cells of all VMs advance one pass per step):

``seed``
    The 2023 patch's algorithm, reproduced exactly: every pass sends every dirty page (8-byte header per
    page, zero pages as a bare header in the first pass); a pass that takes no longer than the max
    downtime is the last one; past the deadline the answer is "does not converge".

``qemu`` (default)
    What QEMU's migration thread does (migration/migration.c and migration/ram.c, 7.2 to 10.x):

    - ``ram_save_setup`` marks every page dirty, so the first pass covers all of RAM; ``save_zero_page``
      sends a zero page as header + 1 byte, ``save_normal_page`` as header + page (header: 8 bytes,
      ``save_page_header``);
    - ``migration_iteration_run`` compares the pending dirty bytes (pages x page size, without headers;
      ``ram_state_pending_estimate``) with ``threshold_size`` = measured throughput x downtime-limit
      (``migration_update_counters``); below it, ``migration_bitmap_sync`` collects the pages dirtied since
      the last sync, and if the total is still below the threshold the VM stops
      (``migration_completion``); so a pass ends when the remaining pages drop below the threshold, not
      when the bitmap is empty;
    - the rate limiter lets ``max-bandwidth`` / 10 bytes out per 100 ms window; from QEMU 8.1 on it
      counts bytes when they are flushed, not queued, so the stream runs a little above the limit
      (:class:`RateLimiter`, per VM, measured by the accuracy lab);
    - the stop-and-copy phase is not rate-limited (``migration_rate_limit`` is only called while
      iterating), so it runs at the link's speed: ``stop_copy_speedup`` times the bandwidth;
    - setup time and the stop-and-copy phase count in the total, as in ``query-migrate``'s total-time;
    - ``transport_overhead`` adds TCP/IP framing when the bandwidth is the link's rather than QEMU's
      ``max-bandwidth`` (the reviewers' first objection to the seed).

Non-convergence is a value (``nan`` seconds), never an exception. In seed mode, from the second pass
on the recurrence "pending pages at the next sync = f(pending pages at this sync)" is monotone, so once
a sync finds at least as many pages as the previous one the migration can never converge: that fixed
point is detected at once instead of iterating until the deadline. In qemu mode, barrier, emptied and
trap rules prove non-convergence early, and stretches of syncs with a closed form are taken at once
(docs/model.md, "Non-convergence, detected early" and "Syncs taken in closed form");
``simulate(..., shortcut=False)`` runs every sync, the oracle the shortcuts are tested against.

Pure: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from migpredictd.core.model import MemoryModel
from migpredictd.core.units import format_bandwidth, format_downtime, parse_bandwidth, parse_duration

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
IntegerArray = npt.NDArray[np.integer[Any]]
Mode = Literal["seed", "qemu"]

# migration/ram.c: save_page_header() writes an 8-byte offset+flags word before every page.
PAGE_HEADER_BYTES: Final = 8
# migration/ram.c: save_zero_page_to_file() sends the header and one byte for a zero page.
ZERO_PAGE_BYTES: Final = PAGE_HEADER_BYTES + 1

# Bisection steps for the derived answers: 2**-20 of the search range, i.e. 0.002% of a bandwidth.
BISECTION_STEPS: Final = 20
# How many rate-limiter windows the non-convergence barrier looks at (see _simulate_qemu).
_BARRIER_WINDOWS: Final = 16
# Vectorised steps over this many values or fewer cost their calls more than their arithmetic; beyond
# about _CACHE_CELLS values, their temporaries leave the CPU's cache.
_FEW_CELLS: Final = 128
_CACHE_CELLS: Final = 16384


@dataclass(frozen=True, slots=True)
class PredictorSettings:
    """Constants of the prediction; calibrated values and their evidence live in
    :mod:`migpredictd.core.calibration`."""

    mode: Mode = "qemu"
    deadline_seconds: float = 3600.0
    # qemu mode only:
    setup_seconds: float = 0.0
    switchover_seconds: float = 0.0
    stop_copy_speedup: float = 1.0
    transport_overhead: float = 0.0
    # migration.c BUFFER_DELAY: the rate limiter's window, after which the pending check runs.
    iteration_seconds: float = 0.1
    # A migration still iterating after this many bitmap syncs is reported as not converging.
    max_syncs: int = 2000

    def __post_init__(self) -> None:
        if self.mode not in ("seed", "qemu"):
            raise ValueError(f"mode must be 'seed' or 'qemu', not {self.mode!r}")
        if self.max_syncs < 2:
            raise ValueError(f"max_syncs must be at least 2, not {self.max_syncs!r}")
        for name in ("deadline_seconds", "stop_copy_speedup", "iteration_seconds"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, not {value!r}")
        for name in ("setup_seconds", "switchover_seconds", "transport_overhead"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be non-negative and finite, not {value!r}")


@dataclass(frozen=True, slots=True)
class RateLimiter:
    """How far above ``max-bandwidth`` a QEMU's rate limiter lets the migration stream run:
    ``max-bandwidth + min(excess_fraction x max-bandwidth, excess_cap_bytes_per_second)`` (qemu mode).

    The default is an exact limiter (QEMU 7.2 counts bytes as it queues them). Calibrated values per
    QEMU generation, with their evidence, are in :mod:`migpredictd.core.calibration`.
    """

    excess_fraction: float = 0.0
    excess_cap_bytes_per_second: float = 0.0
    # Seconds of the migration thread's CPU per zero page of the first pass (reading it to find it zero),
    # for a never-written page (the shared zero page) and for an allocated one. The thread reads while
    # it would otherwise wait for the limiter, so a rate-limiter window lasts the longer of its 100 ms
    # and the reading of the zero pages it carries (qemu mode; 0 = free, the seed's assumption).
    zero_scan_seconds: float = 0.0
    allocated_zero_scan_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "excess_fraction",
            "excess_cap_bytes_per_second",
            "zero_scan_seconds",
            "allocated_zero_scan_seconds",
        ):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be non-negative and finite, not {value!r}")

    def stream_rate(self, max_bandwidth: float) -> float:
        """Bytes/s the limited stream really runs at for this ``max-bandwidth`` (scalar reference of
        what the vectorised predictor computes)."""
        return max_bandwidth + min(self.excess_fraction * max_bandwidth, self.excess_cap_bytes_per_second)


EXACT_RATE_LIMITER: Final = RateLimiter()


_FirstPass = tuple[list[float], list[float], list[float], list[float]]


def _first_pass_cost(m: MemoryModel, limiter: RateLimiter = EXACT_RATE_LIMITER) -> _FirstPass:
    """Knots of the first pass's cost counted from the end of RAM: (pages, wire bytes, wire bytes per
    page of the segment ending there, the migration thread's seconds reading zero pages). Zero pages
    cost ZERO_PAGE_BYTES, others page + header; the profile's slices are scaled so that they hold
    ``zero_pages`` in total, allocated ones in the same share in every slice. Without a profile it is
    one segment at the average cost, i.e. zero pages spread evenly."""
    normal_wire = m.page_size_bytes + PAGE_HEADER_BYTES
    total, zero = float(m.total_pages), m.zero_pages
    shares = m.zero_profile or (1.0,)
    weight = sum(shares)
    # Each slice's zero pages in proportion to its sampled share (evenly if no slice had any).
    zeros = [zero * sh / weight for sh in shares] if weight > 0 else [zero / len(shares)] * len(shares)
    allocated = min(m.zero_allocated_pages / zero, 1.0) if zero > 0 else 0.0
    per_zero = (1.0 - allocated) * limiter.zero_scan_seconds + allocated * limiter.allocated_zero_scan_seconds
    size = total / len(shares)
    pages, wire, per_page, scan = [0.0], [0.0], [1.0], [0.0]
    for z in reversed(zeros):
        zero_in_slice = min(z, size)
        cost = (size - zero_in_slice) * normal_wire + zero_in_slice * ZERO_PAGE_BYTES
        pages.append(pages[-1] + size)
        wire.append(wire[-1] + cost)
        per_page.append(cost / size)
        scan.append(scan[-1] + zero_in_slice * per_zero)
    pages[-1] = total  # exact end, whatever the rounding of the slices
    return pages, wire, per_page, scan


def _along(xs: FloatArray, ys: FloatArray, slopes: FloatArray, x: FloatArray) -> FloatArray:
    """Row ``i`` of piece-wise linear functions (knots ``xs[i] -> ys[i]``, ``slopes[i, j]`` on the
    segment that ends at knot ``j``) at ``x[i]``; beyond the last knot, the last segment goes on."""
    rows = np.arange(len(x))
    j = np.clip(np.count_nonzero(xs < x[:, None], axis=1), 1, xs.shape[1] - 1)
    y: FloatArray = ys[rows, j - 1] + (x - xs[rows, j - 1]) * slopes[rows, j]
    return y


def _segment_slopes(xs: FloatArray, ys: FloatArray) -> FloatArray:
    """Slopes of each row's segments, for :func:`_along` (column j: the segment ending at knot j)."""
    dx, dy = np.diff(xs, axis=1), np.diff(ys, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.where(dx > 0.0, dy / dx, 0.0)
    slopes: FloatArray = np.concatenate([np.zeros((xs.shape[0], 1)), inner], axis=1)
    return slopes


def _scan_peak(cold_bytes: FloatArray, cold_scan: FloatArray) -> FloatArray:
    """Per row, the most seconds of reading per wire byte over the first pass's slices (0: none)."""
    dw, ds = np.diff(cold_bytes, axis=1), np.diff(cold_scan, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_byte = np.where(dw > 0.0, ds / dw, 0.0)
    peak: FloatArray = per_byte.max(axis=1, initial=0.0)
    return peak


def _rank_table(table: FloatArray) -> FloatArray:
    """``table`` (rows ascending) widened to a power of two above its width with +inf, for
    :func:`_count_below`: the padding is below no value, so counts stay those of the table."""
    width = 1 << table.shape[1].bit_length()
    padded = np.full((table.shape[0], width), np.inf)
    padded[:, : table.shape[1]] = table
    return padded


def _gather(table: FloatArray, vm: IntArray, j: IntArray) -> FloatArray:
    """``table[vm, j]``, by a flat index: half the time of numpy's two-array indexing."""
    picked: FloatArray = table.ravel()[vm * table.shape[1] + j]
    return picked


def _count_below(rank: FloatArray, vm: IntArray, values: FloatArray) -> IntArray:
    """How many entries of row ``vm[i]`` of ``rank`` (from :func:`_rank_table`) are below ``values[i]``
    (0 for nan, which is below nothing). For many values, a branch-free bisection, one gather per
    halving for each value, instead of a copy of every row; for a few, the copy, in fewer calls."""
    if len(vm) <= _FEW_CELLS:
        few: IntArray = np.count_nonzero(rank[vm] < values[:, None], axis=1)
        return few
    width = rank.shape[1]
    flat = rank.ravel()
    base = vm * width
    pos = base.copy()  # the start of each row, then of the entries below the value so far
    step = width >> 1
    while step:
        pos += (flat[pos + (step - 1)] < values) * step
        step >>= 1
    counts: IntArray = pos - base
    return counts


def _segment(rank: FloatArray, columns: int, vm: IntArray, values: FloatArray) -> IntArray:
    """Per cell, the index ``j`` of the knot that ends the segment of row ``vm[i]`` holding ``values[i]``
    (``row[j-1] < value <= row[j]``), clipped to ``1 .. columns - 1``; ``rank`` is the table from
    :func:`_rank_table`, ``columns`` its width before padding."""
    j: IntArray = np.clip(_count_below(rank, vm, values), 1, columns - 1)
    return j


@dataclass(frozen=True, slots=True)
class ModelBatch:
    """Many memory models packed into padded arrays, one row per VM."""

    x: FloatArray  # breakpoints, ms; padded with inf
    y: FloatArray
    slope: FloatArray
    offset: FloatArray
    page_size: FloatArray
    total_pages: FloatArray
    zero_pages: FloatArray
    excess_fraction: FloatArray  # RateLimiter per VM
    excess_cap: FloatArray
    # The most seconds of reading zero pages per wire byte in any slice of the first pass: a cell whose
    # stream rate times this is at most 1 reads every zero page while it would wait for the limiter.
    scan_peak: FloatArray
    # The first pass's cost along RAM, counted from the end of RAM (the cold pages left unsent are the
    # highest ones: QEMU scans in ascending offset): knots of pages and wire bytes, and the wire bytes
    # per page of the segment that ends at each knot. Padded with repeats of the last knot.
    cold_pages: FloatArray
    cold_bytes: FloatArray
    cold_slope: FloatArray
    cold_scan: FloatArray  # seconds of reading their zero pages, at the same knots
    # x, y, cold_pages and cold_bytes widened for _count_below.
    x_rank: FloatArray
    y_rank: FloatArray
    cold_pages_rank: FloatArray
    cold_bytes_rank: FloatArray

    @classmethod
    def of(
        cls,
        models: Sequence[MemoryModel],
        limiters: Sequence[RateLimiter] | None = None,
        *,
        first_pass: bool = True,
    ) -> ModelBatch:
        """Pack ``models``; ``limiters[i]`` is VM i's rate limiter (default: exact for every VM).
        ``first_pass=False`` leaves out the first pass's cost along RAM, which only qemu mode reads."""
        if not models:
            raise ValueError("no models")
        if limiters is None:
            limiters = [EXACT_RATE_LIMITER] * len(models)
        if len(limiters) != len(models):
            raise ValueError("one rate limiter per model")
        k = max(len(m.period_ms) for m in models)
        inf = math.inf
        # Rows padded in Python tuples and converted once: a loop of row assignments costs more.
        x = np.array([m.period_ms + (inf,) * (k - len(m.period_ms)) for m in models])
        y = np.array([m.dirty_pages + m.dirty_pages[-1:] * (k - len(m.dirty_pages)) for m in models])
        slope = np.array([m.slopes + (0.0,) * (k - len(m.slopes)) for m in models])
        offset = np.array([m.offsets + m.dirty_pages[-1:] * (k - len(m.offsets)) for m in models])
        profiles = (
            [_first_pass_cost(m, r) for m, r in zip(models, limiters, strict=True)]
            if first_pass
            else [([0.0], [0.0], [1.0], [0.0])] * len(models)
        )
        kp = max(len(pages) for pages, _, _, _ in profiles)
        cold_pages = np.array([pages + pages[-1:] * (kp - len(pages)) for pages, _, _, _ in profiles])
        cold_bytes = np.array([wire + wire[-1:] * (kp - len(wire)) for _, wire, _, _ in profiles])
        cold_slope = np.array([per + [1.0] * (kp - len(per)) for _, _, per, _ in profiles])
        cold_scan = np.array([z + z[-1:] * (kp - len(z)) for _, _, _, z in profiles])
        return cls(
            x=x,
            y=y,
            slope=slope,
            offset=offset,
            page_size=np.array([float(m.page_size_bytes) for m in models]),
            total_pages=np.array([float(m.total_pages) for m in models]),
            zero_pages=np.array([m.zero_pages for m in models]),
            excess_fraction=np.array([r.excess_fraction for r in limiters]),
            excess_cap=np.array([r.excess_cap_bytes_per_second for r in limiters]),
            scan_peak=_scan_peak(cold_bytes, cold_scan),
            cold_pages=cold_pages,
            cold_bytes=cold_bytes,
            cold_slope=cold_slope,
            cold_scan=cold_scan,
            x_rank=_rank_table(x),
            y_rank=_rank_table(y),
            cold_pages_rank=_rank_table(cold_pages),
            cold_bytes_rank=_rank_table(cold_bytes),
        )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def x_segment(self, vm: IntArray, ms: FloatArray) -> IntArray:
        """Per cell, the index ``j`` of the breakpoint that ends the segment of row ``vm[i]`` of ``x``
        holding ``ms[i]`` (``x[j-1] < ms <= x[j]``), clipped to ``1 .. columns - 1``."""
        return _segment(self.x_rank, self.x.shape[1], vm, ms)

    def y_segment(self, vm: IntArray, pages: FloatArray) -> IntArray:
        """:meth:`x_segment` on the pages axis ``y``."""
        return _segment(self.y_rank, self.y.shape[1], vm, pages)

    def cold_segment(self, vm: IntArray, pages: FloatArray) -> IntArray:
        """:meth:`x_segment` on the first pass's knots of pages, ``cold_pages``."""
        return _segment(self.cold_pages_rank, self.cold_pages.shape[1], vm, pages)

    def cold_wire(self, vm: IntArray, cold: FloatArray) -> FloatArray:
        """Wire bytes of the first pass's last ``cold`` pages (what is left of it, unsent)."""
        j = self.cold_segment(vm, cold)
        wire: FloatArray = _gather(self.cold_bytes, vm, j - 1) + (
            cold - _gather(self.cold_pages, vm, j - 1)
        ) * _gather(self.cold_slope, vm, j)
        return wire

    def scan_excess(
        self, vm: IntArray, lo: FloatArray, hi: FloatArray, rate: FloatArray, window_bytes: FloatArray
    ) -> FloatArray:
        """Seconds beyond its bytes at ``rate`` that sending the first pass's pages between the last
        ``hi`` and the last ``lo`` takes, in rate-limiter windows of ``window_bytes``: a window lasts the
        longer of its share of time and the migration thread's reading of the zero pages in it. A window
        pools its bytes and its reading, so zero pages among data are read while the thread would wait;
        only where they are dense (their bytes fill no window in the time their reading takes) do they
        set the pace."""
        cp, cw, cs = self.cold_pages[vm], self.cold_bytes[vm], self.cold_scan[vm]
        w_lo, w_hi = self.cold_wire(vm, lo), self.cold_wire(vm, hi)
        slopes = _segment_slopes(cp, cs)
        s_lo, s_hi = _along(cp, cs, slopes, lo), _along(cp, cs, slopes, hi)
        # The knots along the way, in sending order (highest RAM first): bytes sent since the start, and
        # F = the reading's seconds beyond those bytes' seconds at the rate. A window's excess is its
        # rise of F; windows start every window_bytes from the pass's start.
        u = (w_hi[:, None] - np.clip(cw, w_lo[:, None], w_hi[:, None]))[:, ::-1]
        f = (s_hi[:, None] - np.clip(cs, s_lo[:, None], s_hi[:, None]))[:, ::-1] - u / rate[:, None]
        du, df = np.diff(u, axis=1), np.diff(f, axis=1)
        b = window_bytes
        excess = np.zeros(len(vm))
        filled = np.zeros(len(vm))  # bytes of the current window so far
        rise = np.zeros(len(vm))  # its rise of F so far
        for j in range(du.shape[1]):  # segment by segment, every row at once
            d, g = du[:, j], df[:, j]
            with np.errstate(divide="ignore", invalid="ignore"):
                per_byte = np.where(d > 0.0, g / d, 0.0)
            inside = filled + d < b
            # A segment that ends the current window: the window's rest, whole windows, a new window.
            part = np.where(inside, d, b - filled)
            closed = rise + per_byte * part
            after = np.maximum(d - part, 0.0)
            whole = np.floor(after / b)
            excess += np.where(inside, 0.0, np.maximum(closed, 0.0) + whole * np.maximum(per_byte * b, 0.0))
            rest = after - whole * b
            rise = np.where(inside, rise + g, per_byte * rest)
            filled = np.where(inside, filled + d, rest)
        excess += np.maximum(rise, 0.0)  # the last window, partly filled
        return excess

    def cold_left(self, vm: IntArray, wire: FloatArray) -> FloatArray:
        """The inverse of :meth:`cold_wire`: how many last pages of the first pass cost ``wire`` bytes."""
        j = _segment(self.cold_bytes_rank, self.cold_bytes.shape[1], vm, wire)
        pages: FloatArray = _gather(self.cold_pages, vm, j - 1) + (
            wire - _gather(self.cold_bytes, vm, j - 1)
        ) * (1.0 / _gather(self.cold_slope, vm, j))
        return pages

    def dirty(self, vm: IntArray, ms: FloatArray) -> FloatArray:
        """Pages dirtied within ``ms`` for VM ``vm``, cell by cell: the same formula and float operations
        as :meth:`MemoryModel.dirty` (exact breakpoint hit, else ``offset + slope * t``)."""
        return self.dirty_segment(vm, ms)[0]

    def age(self, vm: IntArray, pages: FloatArray) -> FloatArray:
        """The inverse of :meth:`dirty`: the shortest window (ms) within which ``pages`` pages get
        dirtied (0 for what the jump at t = 0 covers, inf beyond the ceiling)."""
        idx = _count_below(self.y_rank, vm, pages)
        inside = (idx > 0) & (idx < self.y.shape[1])
        j = np.where(inside, idx, 1)
        x0, y0 = _gather(self.x, vm, j - 1), _gather(self.y, vm, j - 1)
        # A denormal slope overflows to inf: "never within any finite window", which is the answer.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            t = x0 + (pages - y0) / _gather(self.slope, vm, j)
        return np.where(idx == 0, 0.0, np.where(inside, t, np.inf))

    def dirty_segment(self, vm: IntArray, ms: FloatArray) -> tuple[FloatArray, IntArray]:
        """:meth:`dirty`, plus the index of the breakpoint that ends each point's segment."""
        k = self.x.shape[1]
        # How many of the VM's breakpoints lie below ms.
        idx = np.minimum(_count_below(self.x_rank, vm, ms), k - 1)
        at = vm * k + idx
        hit = self.x.ravel()[at] == ms
        with np.errstate(invalid="ignore"):  # 0 * inf on the last, flat segment; `hit` picks y there
            line = self.offset.ravel()[at] + self.slope.ravel()[at] * ms
        return np.where(hit, self.y.ravel()[at], line), idx


@dataclass(frozen=True, slots=True)
class CellResults:
    """Results for a flat list of cells; ``seconds`` is nan where the migration does not converge."""

    seconds: FloatArray
    passes: IntArray
    bytes_sent: FloatArray
    downtime_seconds: FloatArray

    @property
    def converges(self) -> npt.NDArray[np.bool_]:
        return ~np.isnan(self.seconds)


def simulate(
    batch: ModelBatch,
    vm: IntArray,
    bandwidth: FloatArray,
    downtime_s: FloatArray,
    settings: PredictorSettings,
    *,
    shortcut: bool = True,
) -> CellResults:
    """Predict each cell ``(vm[i], bandwidth[i] bytes/s, downtime_s[i] seconds or inf)``.

    ``shortcut=False`` (qemu mode) runs every bitmap sync one by one instead of skipping the stretches
    that have a closed form: the brute-force oracle that tests and benchmarks compare with.
    """
    n = len(vm)
    if not (len(bandwidth) == n and len(downtime_s) == n):
        raise ValueError("vm, bandwidth and downtime_s must have the same length")
    if n and not (np.all(bandwidth > 0) and np.all(np.isfinite(bandwidth))):
        raise ValueError("bandwidths must be positive and finite")
    if n and np.any(downtime_s < 0):
        raise ValueError("downtimes must be non-negative")
    if settings.mode == "seed":
        return _simulate_seed(batch, vm, bandwidth, downtime_s, settings)
    return _simulate_qemu(batch, vm, bandwidth, downtime_s, settings, shortcut=shortcut)


def _simulate_seed(
    batch: ModelBatch, vm: IntArray, bw: FloatArray, dt_s: FloatArray, settings: PredictorSettings
) -> CellResults:
    n = len(vm)
    out_ms = np.full(n, np.nan)
    out_passes = np.zeros(n, dtype=np.int64)
    out_bytes = np.zeros(n)
    out_down = np.full(n, np.nan)
    deadline_ms = settings.deadline_seconds * 1000.0
    dt_ms = dt_s * 1000.0
    header = float(PAGE_HEADER_BYTES)

    live = np.arange(n)
    normal = batch.total_pages[vm] - batch.zero_pages[vm]
    zero = batch.zero_pages[vm].copy()
    total_ms = np.zeros(n)
    sent = np.zeros(n)
    last_iter = np.full(n, np.inf)
    passes = np.zeros(n, dtype=np.int64)
    while live.size:
        v = vm[live]
        iter_bytes = normal * (batch.page_size[v] + header) + zero * header
        iter_ms = iter_bytes * 1000.0 / bw[live]
        total_ms = total_ms + iter_ms
        sent = sent + iter_bytes
        passes = passes + 1
        done = iter_ms <= dt_ms[live]
        # From the second pass on every pass is f(previous pass) with f monotone: no shrink, no end.
        stuck = ~done & ((total_ms > deadline_ms) | ((passes > 2) & (iter_ms >= last_iter)))
        finished = done | stuck
        idx = live[finished]
        out_ms[live[done]] = np.ceil(total_ms[done])
        out_down[live[done]] = iter_ms[done] / 1000.0
        out_passes[idx] = passes[finished]
        out_bytes[idx] = sent[finished]
        keep = ~finished
        live, total_ms, sent, passes = live[keep], total_ms[keep], sent[keep], passes[keep]
        last_iter = iter_ms[keep]
        v = vm[live]
        normal, seg = batch.dirty_segment(v, last_iter)
        zero = np.zeros(live.size)
        # Within one linear segment the next pass time is a * this one + b. With 0 < a < 1 the passes
        # shrink towards b / (1 - a) without leaving the segment; a limit above the max downtime means
        # the seed would iterate until its deadline and answer "does not converge": answer it now.
        per_page_ms = (batch.page_size[v] + header) * 1000.0 / bw[live]
        a = _gather(batch.slope, v, seg) * per_page_ms
        with np.errstate(divide="ignore", invalid="ignore"):
            limit = _gather(batch.offset, v, seg) * per_page_ms / (1.0 - a)
        lower = _gather(batch.x, v, np.maximum(seg - 1, 0))
        creeping = (
            (a > 0) & (a < 1) & (limit < last_iter) & (limit >= lower) & (limit > dt_ms[live] * (1 + 1e-9))
        )
        if passes.size and np.any(creeping & (passes >= 2)):
            gone = creeping & (passes >= 2)
            out_passes[live[gone]] = passes[gone]
            out_bytes[live[gone]] = sent[gone]
            stay = ~gone
            live, total_ms, sent, passes = live[stay], total_ms[stay], sent[stay], passes[stay]
            last_iter, normal, zero = last_iter[stay], normal[stay], zero[stay]
    return CellResults(
        seconds=out_ms / 1000.0, passes=out_passes, bytes_sent=out_bytes, downtime_seconds=out_down
    )


def _simulate_seed_grid(
    batch: ModelBatch, bandwidths: FloatArray, downtimes_s: FloatArray, settings: PredictorSettings
) -> CellResults:
    """:func:`_simulate_seed` of every (VM, bandwidth, downtime) of a grid, cells in that order, with
    each (VM, bandwidth) simulated once: a cell's passes do not depend on its downtime, which only
    decides when it stops (converged, or creeping towards a limit above it). The same float operations
    per cell, so the same results bit for bit."""
    nv, nb, nd = len(batch), len(bandwidths), len(downtimes_s)
    n = nv * nb
    out_ms = np.full((n, nd), np.nan)
    out_passes = np.zeros((n, nd), dtype=np.int64)
    out_bytes = np.zeros((n, nd))
    out_down = np.full((n, nd), np.nan)
    deadline_ms = settings.deadline_seconds * 1000.0
    dt_ms = downtimes_s * 1000.0
    creep_floor = dt_ms * (1 + 1e-9)
    header = float(PAGE_HEADER_BYTES)

    lane_vm = np.repeat(np.arange(nv), nb)
    lane_bw = np.tile(bandwidths, nv)
    live = np.arange(n)  # lanes with a cell still going
    waiting = np.ones((n, nd), dtype=bool)  # of those lanes' cells, the ones still going
    normal = batch.total_pages[lane_vm] - batch.zero_pages[lane_vm]
    zero = batch.zero_pages[lane_vm].copy()
    total_ms = np.zeros(n)
    sent = np.zeros(n)
    last_iter = np.full(n, np.inf)
    passes = np.zeros(n, dtype=np.int64)
    while live.size:
        v, b = lane_vm[live], lane_bw[live]
        iter_bytes = normal * (batch.page_size[v] + header) + zero * header
        iter_ms = iter_bytes * 1000.0 / b
        total_ms = total_ms + iter_ms
        sent = sent + iter_bytes
        passes = passes + 1
        done = waiting & (iter_ms[:, None] <= dt_ms)
        # From the second pass on every pass is f(previous pass) with f monotone: no shrink, no end.
        lane_stuck = (total_ms > deadline_ms) | ((passes > 2) & (iter_ms >= last_iter))
        finished = done | (waiting & lane_stuck[:, None])
        rows, cols = np.nonzero(done)
        out_ms[live[rows], cols] = np.ceil(total_ms[rows])
        out_down[live[rows], cols] = iter_ms[rows] / 1000.0
        rows, cols = np.nonzero(finished)
        out_passes[live[rows], cols] = passes[rows]
        out_bytes[live[rows], cols] = sent[rows]
        waiting &= ~finished
        keep = waiting.any(axis=1)
        live, total_ms, sent, passes, waiting = (
            live[keep],
            total_ms[keep],
            sent[keep],
            passes[keep],
            waiting[keep],
        )
        last_iter = iter_ms[keep]
        v, b = lane_vm[live], lane_bw[live]
        normal, seg = batch.dirty_segment(v, last_iter)
        zero = np.zeros(live.size)
        # Within one linear segment the next pass time is a * this one + b: see _simulate_seed.
        per_page_ms = (batch.page_size[v] + header) * 1000.0 / b
        a = _gather(batch.slope, v, seg) * per_page_ms
        with np.errstate(divide="ignore", invalid="ignore"):
            limit = _gather(batch.offset, v, seg) * per_page_ms / (1.0 - a)
        lower = _gather(batch.x, v, np.maximum(seg - 1, 0))
        creeping = (a > 0) & (a < 1) & (limit < last_iter) & (limit >= lower) & (passes >= 2)
        gone = waiting & creeping[:, None] & (limit[:, None] > creep_floor)
        if gone.any():
            rows, cols = np.nonzero(gone)
            out_passes[live[rows], cols] = passes[rows]
            out_bytes[live[rows], cols] = sent[rows]
            waiting &= ~gone
            stay = waiting.any(axis=1)
            live, total_ms, sent, passes = live[stay], total_ms[stay], sent[stay], passes[stay]
            waiting, last_iter, normal, zero = waiting[stay], last_iter[stay], normal[stay], zero[stay]
    return CellResults(
        seconds=(out_ms / 1000.0).ravel(),
        passes=out_passes.ravel(),
        bytes_sent=out_bytes.ravel(),
        downtime_seconds=out_down.ravel(),
    )


def _creep(
    batch: ModelBatch,
    v: IntArray,
    hot: FloatArray,
    *,
    threshold: FloatArray,
    step_pages: FloatArray,
    ms_per_page: FloatArray,
    budget: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """Skip syncs of the hot-only phase where the next sync is an affine function of this one.

    With no cold page left, a pass of ``n`` whole windows leaves ``r = hot - n x step_pages`` pages
    unsent and the next sync holds ``min(r + D(n windows), D(n windows + age(r)))``; a pass that empties
    the bitmap (``r <= 0``) takes ``hot x ms_per_page`` and the next sync holds ``D(hot x ms_per_page)``.
    While the number of windows, the branch of the min and the model's segments that the arguments of
    ``D`` and ``age`` fall in stay the same, the next sync is ``a x hot + c``: a constant drift
    (``a = 1``), a geometric approach to the fixed point ``c / (1 - a)`` (``a < 1``) or a geometric
    flight from it (``a > 1``). A falling sequence stays in
    that region for a number of syncs known in closed form, so those syncs are taken at once. Only
    falling sequences are skipped: what they skip can neither converge (every skipped sync is above
    the threshold) nor hit the barrier (the sync before them did not). At most ``budget`` syncs are
    skipped, and only syncs that start inside the region: the one that leaves it runs as a plain pass.

    A geometric approach to a fixed point inside the region never falls below the threshold: such
    cells are returned as certain not to converge.

    Returns (syncs skipped, hot after them, hot pages sent by them, cells that cannot converge).
    """
    n = np.floor((hot - threshold) / step_pages) + 1.0
    windowed = hot > n * step_pages
    r = np.where(windowed, hot - n * step_pages, 0.0)
    pass_ms = np.where(windowed, n * step_pages, hot) * ms_per_page
    # age(r) on segment j of the model's pages axis: x[j-1] + (r - y[j-1]) / slope[j] (0 when emptied).
    j = batch.y_segment(v, r)
    yj0, xj0, sj = _gather(batch.y, v, j - 1), _gather(batch.x, v, j - 1), _gather(batch.slope, v, j)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        age = np.where(windowed, xj0 + (r - yj0) / sj, 0.0)
        # D at u = pass + age(r), on segment i: offset[i] + slope[i] x u.
        i = batch.x_segment(v, pass_ms + age)
        si, oi, xi0 = _gather(batch.slope, v, i), _gather(batch.offset, v, i), _gather(batch.x, v, i - 1)
        d_pass = batch.dirty(v, pass_ms)
        # Windowed: t1 = hot + c1 (slope 1), t2 = a2 x hot + c2. Emptied: D(hot x ms_per_page).
        c1 = d_pass - n * step_pages
        a2 = np.where(windowed, si / sj, si * ms_per_page)
        c2 = np.where(windowed, oi + si * (pass_ms + xj0 - (n * step_pages + yj0) / sj), oi)
        t1 = np.where(windowed, hot + c1, np.inf)
        t2 = a2 * hot + c2
        first = t1 <= t2
        a = np.where(first, 1.0, a2)
        c = np.where(first, c1, c2)
        nxt = np.minimum(t1, t2)
        # The region, as a lower bound on hot (the sequence only falls): above the threshold and the
        # start of this number of windows; windowed: r above the start of its segment and above 0,
        # u above the start of its segment, the same branch; emptied: u above the start of its
        # segment; and at least one page (below that, nothing is pending: done).
        lo = np.maximum(threshold + (n - 1.0) * step_pages, 1.0)
        lo_w = np.maximum(
            n * step_pages + np.maximum(yj0, 0.0), n * step_pages + yj0 + (xi0 - pass_ms - xj0) * sj
        )
        cross = (c2 - c1) / (1.0 - a2)  # where t1 = t2
        switches = np.where(first, a2 > 1.0, a2 < 1.0) & np.isfinite(cross)
        lo_w = np.where(switches, np.maximum(lo_w, cross), lo_w)
        lo = np.where(windowed, np.maximum(lo, lo_w), np.maximum(lo, xi0 / ms_per_page))
        usable = (
            (nxt < hot)
            & (nxt > lo)
            & (a > 1e-12)
            & (a < 1e6)
            & np.isfinite(lo)
            & np.isfinite(c)
            & (~windowed | ((sj > 0) & np.isfinite(sj)))
        )
        # How many syncs from this one on start strictly inside the region.
        drift = hot - nxt
        fixed = c / (1.0 - a)
        linear = np.abs(1.0 - a) < 1e-9
        inside = np.where(
            linear,
            np.floor((hot - lo) / drift),
            np.where(
                (a > 1.0) | (lo > fixed),
                np.floor((np.log(np.abs(lo - fixed)) - np.log(np.abs(hot - fixed))) / np.log(a)),
                np.inf,
            ),
        )
        k = np.minimum(inside, budget)  # (nan and inf: no skip)
        k = np.where(usable & (linear | (a > 1.0) | (lo > fixed)) & (k >= 2.0) & (k < np.inf), k, 0.0)
        ak = a**k
        after = np.where(linear, hot - k * drift, fixed + ak * (hot - fixed))
        # Pages the skipped passes sent: k whole-window passes, or the sum of the emptied bitmaps.
        emptied_sum = np.where(
            linear, k * hot - drift * k * (k - 1.0) / 2.0, k * fixed + (hot - fixed) * (1.0 - ak) / (1.0 - a)
        )
        pages = np.where(windowed, k * n * step_pages, emptied_sum)
    skip = k > 0
    never = usable & ~linear & (a < 1.0) & (lo <= fixed)
    return k, np.where(skip, after, hot), np.where(skip, pages, 0.0), never


def _levels(
    batch: ModelBatch,
    v: IntArray,
    hot: FloatArray,
    *,
    threshold: FloatArray,
    step_pages: FloatArray,
    unsent_segment: IntArray,
    window_ms: float,
    pass_limit: FloatArray,
    time_left: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Run the hot-only passes that cross many levels at once with their short formula.

    With the threshold above one window, a pass of ``n`` windows leaves ``r`` in [threshold - one
    window, threshold) unsent. For cells whose whole unsent range lies on segment ``unsent_segment`` of
    the model's pages axis (the caller finds those once per simulation), ``age`` is affine on it; where
    ``D`` at ``n`` windows and at ``n`` windows plus that age lies on one segment each, for every ``n``
    down to some ``n_lo``, and the first term of the min is the smaller at every corner of that range,
    the next sync is ``hot - n x (one window - slope x window) + offset``: only ``n`` changes from pass
    to pass. Cells whose sequence falls that way take those passes here, every pass on one level at
    once, until ``n`` drops below ``n_lo`` or the threshold, or a pass would reach ``pass_limit``
    passes or overrun ``time_left`` seconds; the plain loop goes on from there.

    Returns (hot after, passes taken, windows sent).
    """
    r_lo, r_hi = threshold - step_pages, threshold
    j = unsent_segment
    xj0, yj0, sj = _gather(batch.x, v, j - 1), _gather(batch.y, v, j - 1), _gather(batch.slope, v, j)
    n0 = np.floor((hot - threshold) / step_pages) + 1.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        age_lo = xj0 + (r_lo - yj0) / sj
        age_hi = xj0 + (r_hi - yj0) / sj
        i = batch.x_segment(v, n0 * window_ms)
        i2 = batch.x_segment(v, n0 * window_ms + age_lo)
        same_d = i2 == batch.x_segment(v, n0 * window_ms + age_hi)
        si, oi, si2, oi2 = (
            _gather(batch.slope, v, i),
            _gather(batch.offset, v, i),
            _gather(batch.slope, v, i2),
            _gather(batch.offset, v, i2),
        )
        n_lo = np.maximum(
            np.floor(np.maximum(_gather(batch.x, v, i - 1), _gather(batch.x, v, i2 - 1) - age_lo) / window_ms)
            + 1.0,
            1.0,
        )
        # t1 - t2 at the corners (r, n) of the range, both affine in r and n on these segments.
        first = np.ones(len(v), dtype=bool)
        for r, age in ((r_lo, age_lo), (r_hi, age_hi)):
            for n in (n_lo, n0):
                t1 = r + oi + si * n * window_ms
                t2 = oi2 + si2 * (n * window_ms + age)
                first &= t1 <= t2 + 1e-9 * np.abs(t2)  # equal lines (D through 0) tie, either will do
        shrink = step_pages - si * window_ms  # pages each window of a pass takes off pending
        active = same_d & first & (sj > 0) & np.isfinite(age_hi) & (n_lo * shrink > oi) & (n0 >= n_lo)
    out = hot.copy()
    taken = np.zeros(len(v))
    windows = np.zeros(len(v))
    # One step per level: on level n pending falls by n x shrink - offset per pass, so it stays there
    # for floor(depth / drop) + 1 passes, depth being how far it is above the level's floor. The
    # working arrays hold the cells still going, and shrink only when some stop.
    idx = np.flatnonzero(active)
    h, t, sp, sh, off, low = hot[idx], threshold[idx], step_pages[idx], shrink[idx], oi[idx], n_lo[idx]
    passes_left = pass_limit[idx] - 1.0
    windows_left = np.floor(time_left[idx] * 1000.0 / window_ms)
    done_passes, done_windows = np.zeros(idx.size), np.zeros(idx.size)
    while idx.size:
        n = np.floor((h - t) / sp) + 1.0
        drop = n * sh - off
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # stopping cells: n, drop <= 0
            m = np.minimum(np.floor((h - (t + (n - 1.0) * sp)) / drop) + 1.0, passes_left)
            m = np.minimum(m, np.floor(windows_left / n))
        go = (h >= t) & (n >= low) & (m >= 1.0) & (drop > 0)
        if not go.all():
            stop = ~go
            out[idx[stop]] = h[stop]
            taken[idx[stop]] = done_passes[stop]
            windows[idx[stop]] = done_windows[stop]
            idx, h, t, sp, sh, off, low = idx[go], h[go], t[go], sp[go], sh[go], off[go], low[go]
            passes_left, windows_left = passes_left[go], windows_left[go]
            done_passes, done_windows = done_passes[go], done_windows[go]
            n, m, drop = n[go], m[go], drop[go]
            if not idx.size:
                break
        h = h - m * drop
        done_passes += m
        done_windows += m * n
        passes_left -= m
        windows_left -= m * n
    return out, taken, windows


def _cold_levels(
    batch: ModelBatch,
    v: IntArray,
    cold: FloatArray,
    hot: FloatArray,
    *,
    threshold: FloatArray,
    step_bytes: FloatArray,
    window_ms: float,
    pass_limit: FloatArray,
    time_left: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Run the passes that send only cold pages, level by level, where their formula is short.

    While pending is above the threshold by less than the cold pages, a pass of ``n`` windows sends
    ``n x step_bytes / cost`` cold pages (``cost``: wire bytes per cold page on this stretch of the
    zero profile) and no hot page, so the next sync holds ``min(hot + D(n windows), D(n windows +
    age(hot)))`` hot pages. Where ``age(hot)`` and ``n windows + age(hot)`` lie on segments of equal
    slope, both terms grow by the same amount each pass, so hot grows by a constant, cold falls by a
    constant and every pass on one level (pending that takes ``n`` windows) is known at once; so are
    those where every page is pending and stays so (hot then grows by what cold loses). Each
    step takes them until pending leaves the level, cold would run short or leave its stretch, hot
    would leave its segments, or a limit (``pass_limit`` passes, ``time_left`` seconds) is near.

    Returns (cold, hot, passes taken, windows sent).
    """
    cold, hot = cold.copy(), hot.copy()
    taken = np.zeros(len(v))
    windows = np.zeros(len(v))
    idx = np.arange(len(v))
    while idx.size:
        vi, c, h = v[idx], cold[idx], hot[idx]
        t, sb = threshold[idx], step_bytes[idx]
        seg = batch.cold_segment(vi, c)
        cost, cold_lo = _gather(batch.cold_slope, vi, seg), _gather(batch.cold_pages, vi, seg - 1)
        per_window = sb / cost
        pending = c + h
        n = np.floor((pending - t) / per_window) + 1.0
        n_ms = n * window_ms
        ja = batch.y_segment(vi, h)
        ya, xa, sa = _gather(batch.y, vi, ja - 1), _gather(batch.x, vi, ja - 1), _gather(batch.slope, vi, ja)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            u = n_ms + xa + (h - ya) / sa
            j2 = batch.x_segment(vi, u)
            s2, o2, x2_end = (
                _gather(batch.slope, vi, j2),
                _gather(batch.offset, vi, j2),
                _gather(batch.x, vi, j2),
            )
            grow = np.minimum(batch.dirty(vi, n_ms), o2 + s2 * u - h)
            # With every page pending and the guest re-dirtying more than a pass sends, the cap
            # (no more pending than pages) holds pending where it is: hot grows by what cold loses.
            sends = n * per_window
            capped = (pending >= batch.total_pages[vi] * (1.0 - 1e-12)) & (grow >= sends)
            inc = np.where(capped, sends, grow)
            drop = np.where(capped, 0.0, sends - grow)
            stay = np.where(capped, np.inf, np.floor((pending - (t + (n - 1.0) * per_window)) / drop) + 1.0)
            m = np.minimum(stay, np.floor((c - cold_lo) / sends))
            m = np.minimum(m, np.where(inc > 0, np.floor((_gather(batch.y, vi, ja) - h) / inc), np.inf))
            m = np.minimum(m, np.where(inc > 0, np.floor((x2_end - u) * sa / inc), np.inf))
            m = np.minimum(m, pass_limit[idx] - 1.0 - taken[idx])
            m = np.minimum(m, np.floor((time_left[idx] * 1000.0 / window_ms - windows[idx]) / n))
        go = (
            (pending >= t)
            & (n >= 1.0)
            & ((drop > 0) | capped)
            & (grow >= 0)
            & (sa > 0)
            & np.isfinite(sa)
            & (h >= ya)
            & (np.abs(s2 - sa) <= 1e-9 * sa)
            & (m >= 1.0)
        )
        idx, m, n = idx[go], m[go], n[go]
        if not idx.size:
            break
        cold[idx] -= m * sends[go]
        hot[idx] += m * inc[go]
        taken[idx] += m
        windows[idx] += m * n
    return cold, hot, taken, windows


def _count_windows(
    e: IntArray,
    taken: FloatArray,
    windows: FloatArray,
    *,
    passes: IntArray,
    elapsed: FloatArray,
    sent: FloatArray,
    step_bytes: FloatArray,
    rate: FloatArray,
) -> None:
    """Add passes skipped in whole windows to cells ``e``: their time and bytes follow from the
    number of windows."""
    passes[e] += taken.astype(np.int64)
    elapsed[e] += windows * step_bytes / rate
    sent[e] += windows * step_bytes


def _simulate_qemu(
    batch: ModelBatch,
    vm: IntArray,
    bw: FloatArray,
    dt_s: FloatArray,
    settings: PredictorSettings,
    *,
    shortcut: bool,
) -> CellResults:
    """QEMU's loop, one bitmap sync per step of the vectorised loop.

    The dirty bitmap holds "cold" pages (first-pass pages not sent yet, zero pages among them) and
    "hot" pages (dirtied since an earlier sync). Pages go out oldest first (the scan goes on where it
    stopped), so cold pages leave before hot ones, and the ``h`` hot pages still unsent at a sync are
    the most recently dirtied ones: those of the last ``age(h)`` ms. The next sync then holds at most
    ``h`` plus what the pass dirtied, and at most every page dirtied within the pass plus ``age(h)``:
    a hot working set is not counted twice, and the bound moves continuously with ``h`` (so more
    bandwidth or downtime cannot make it jump up). Sending happens in rate-limiter windows of
    ``iteration_seconds`` (``BUFFER_DELAY``), and the pending check runs after each window
    (``migration_iteration_run``), so a pass ends within one window after the pending bytes drop
    below the threshold.
    """
    n = len(vm)
    # Passes are whole windows, so a migration can end a pass exactly at the deadline; a sum of
    # windows rounded either way must not decide whether that pass counts: it is within the deadline.
    deadline = settings.deadline_seconds * (1.0 + 1e-9)
    out_s = np.full(n, np.nan)
    out_passes = np.zeros(n, dtype=np.int64)
    out_bytes = np.zeros(n)
    out_down = np.full(n, np.nan)

    page = batch.page_size[vm]
    normal_wire = page + PAGE_HEADER_BYTES
    # What the rate limiter really lets through, then the payload bytes/s that reach the destination.
    stream = bw + np.minimum(batch.excess_fraction[vm] * bw, batch.excess_cap[vm])
    rate = stream / (1.0 + settings.transport_overhead)
    # threshold_size = throughput x downtime-limit, compared with pending pages x page size.
    with np.errstate(invalid="ignore"):
        threshold = np.where(np.isinf(dt_s), np.inf, rate * dt_s / page)
    stop_rate = rate * settings.stop_copy_speedup
    step_bytes = rate * settings.iteration_seconds
    step_pages = step_bytes / normal_wire
    # Once only hot pages are left, a pass of n >= m windows (pending >= threshold + (m - 1) windows)
    # leaves R pages unsent and the next sync holds at least min(R + D(m windows), D(m windows +
    # age(R))). With the threshold above one window, R >= threshold - one window; if both terms are at
    # least threshold + (m - 1) windows, pending never falls below that again (docs/model.md). With
    # the threshold at most one window, a pass may empty the bitmap instead: it then takes at least
    # (threshold + (m - 1) windows) x ms_per_page, so D of that (a lower bound of both cases) being at
    # least threshold + (m - 1) windows is the same barrier. Either holds only where that is at least
    # one page (less is nothing pending: done). `barrier` is the smallest such m (0: none up to
    # _BARRIER_WINDOWS).
    window_ms = settings.iteration_seconds * 1000.0
    small = threshold <= step_pages
    unsent_age = batch.age(vm, np.maximum(threshold - step_pages, 0.0))
    lead_ms = np.where(small, threshold, 0.0) * normal_wire * 1000.0 / rate
    # Only cells with no cold page left use it: each cell's barrier is found when it first has none
    # and is pending at least the threshold.
    barrier_pages = np.full(n, np.nan)  # nan: not found yet; inf: no barrier
    ms_col = np.arange(1.0, _BARRIER_WINDOWS + 1.0)[:, None]
    per_vm: FloatArray | None = None  # D(m windows) per VM of the batch, found with the first barrier

    def find_barriers(c: IntArray) -> None:
        """Fill ``barrier_pages[c]``. One evaluation of the model per cell and m: D(m windows) depends
        on the VM alone, and each cell needs only its own case's other term. Several m at a time while
        the cells are few (fewer calls), one at a time when they are many (cache-sized arrays)."""
        nonlocal per_vm
        if per_vm is None:
            rows = np.arange(len(batch))
            every = batch.dirty(
                np.tile(rows, _BARRIER_WINDOWS), np.repeat(ms_col[:, 0] * window_ms, rows.size)
            )
            per_vm = every.reshape(_BARRIER_WINDOWS, rows.size)
        v, t, sp, sm = vm[c], threshold[c], step_pages[c], small[c]
        barrier = np.zeros(c.size)
        group = max(1, min(_BARRIER_WINDOWS, _CACHE_CELLS // c.size))
        for first in range(_BARRIER_WINDOWS - group, -group, -group):  # the largest m first
            m = ms_col[max(first, 0) : first + group]
            floor = t + (m - 1.0) * sp
            at = np.where(sm, lead_ms[c] + (m - 1.0) * window_ms, m * window_ms + unsent_age[c])
            term = batch.dirty(np.tile(v, m.size), at.ravel()).reshape(at.shape) >= floor
            hit = term & (sm | (per_vm[m[:, 0].astype(np.intp) - 1][:, v] >= m * sp)) & (floor >= 1.0)
            barrier = np.where(hit.any(axis=0), m[hit.argmax(axis=0), 0], barrier)
        barrier_pages[c] = np.where(barrier > 0, t + (barrier - 1.0) * sp, np.inf)

    # _levels needs the whole unsent range [threshold - one window, threshold) on one segment of the
    # model's pages axis, which depends on the cell alone: found once, not at every sync.
    if shortcut:
        unsent_lo = threshold - step_pages
        unsent_segment = batch.y_segment(vm, unsent_lo)
        levels_ok = (
            (threshold > step_pages)
            & (unsent_segment == batch.y_segment(vm, threshold))
            & (_gather(batch.y, vm, unsent_segment - 1) < unsent_lo)
        )

    total = batch.total_pages[vm]
    live = np.arange(n)
    cold = total.copy()
    hot = np.zeros(n)
    elapsed = np.full(n, settings.setup_seconds)
    sent = np.zeros(n)
    passes = np.zeros(n, dtype=np.int64)
    while live.size:
        # Cold pages are priced along the zero profile; only the cells that still have some pay for it.
        with_cold = np.flatnonzero(cold > 0.0)
        pending = cold + hot
        cold_wire = np.zeros(live.size)
        if with_cold.size:
            cold_wire[with_cold] = batch.cold_wire(vm[live[with_cold]], cold[with_cold])
        # Pages are whole: less than one pending page is none, which even a zero downtime-limit lets
        # through (QEMU completes when nothing is pending).
        done = (pending < threshold[live]) | (pending < 1.0)
        if np.any(done):
            i = live[done]
            wire_done = cold_wire[done] + hot[done] * normal_wire[i]
            stop_s = wire_done / stop_rate[i] + settings.switchover_seconds
            # The stop-and-copy reads the first pass's remaining zero pages too.
            scanning = np.flatnonzero((cold[done] > 0.0) & (batch.scan_peak[vm[i]] * stop_rate[i] > 1.0))
            if scanning.size:
                c, left = i[scanning], cold[done][scanning]
                stop_s[scanning] += batch.scan_excess(
                    vm[c], np.zeros(c.size), left, stop_rate[c], stop_rate[c] * settings.iteration_seconds
                )
            out_s[i] = elapsed[done] + stop_s
            out_down[i] = stop_s
            out_passes[i] = passes[done] + 1  # the stop-and-copy is the last pass
            out_bytes[i] = sent[done] + wire_done
            go = ~done
            live, elapsed, sent, passes = live[go], elapsed[go], sent[go], passes[go]
            cold, hot, pending, cold_wire = cold[go], hot[go], pending[go], cold_wire[go]
            if not live.size:
                break
            with_cold = np.flatnonzero(cold > 0.0)
        v = vm[live]
        nw = normal_wire[live]
        wire = cold_wire + hot * nw
        # Bytes to send until fewer than `threshold` pages are pending, oldest (cold) pages first,
        # rounded up to whole rate-limiter windows, and never more than the bitmap holds.
        hot_only = cold <= 0.0
        excess = np.maximum(pending - threshold[live], 0.0)
        needed = excess * nw
        if with_cold.size:
            w, vw = with_cold, v[with_cold]
            cold_part = np.minimum(excess[w], cold[w])
            needed[w] = (
                cold_wire[w] - batch.cold_wire(vw, cold[w] - cold_part) + (excess[w] - cold_part) * nw[w]
            )
        windows = np.floor(needed / step_bytes[live]) + 1.0
        pass_bytes = np.minimum(windows * step_bytes[live], wire)
        pass_s = pass_bytes / rate[live]
        cold_sent_bytes = cold_wire.copy()
        if with_cold.size:
            left = cold_wire[w] - pass_bytes[w]
            cold_after = np.where(left <= 0.0, 0.0, batch.cold_left(vw, np.maximum(left, 0.0)))
            cold_after = np.clip(cold_after, 0.0, cold[w])
            cold_sent_bytes[w] = cold_wire[w] - batch.cold_wire(vw, cold_after)
            scanning = np.flatnonzero(batch.scan_peak[vw] * rate[live[w]] > 1.0)
            if scanning.size:
                # Where reading zero pages takes longer than their slice's bytes at the rate, it sets
                # the pace.
                sw = w[scanning]
                pass_s = pass_s.copy()
                pass_s[sw] += batch.scan_excess(
                    v[sw], cold_after[scanning], cold[sw], rate[live[sw]], step_bytes[live[sw]]
                )
            cold = cold.copy()
            cold[w] = cold_after
        hot_sent = np.clip((pass_bytes - cold_sent_bytes) / nw, 0.0, hot)
        hot_left = hot - hot_sent
        sync_at = elapsed + pass_s
        pass_ms = pass_s * 1000.0
        hot = np.minimum(hot_left + batch.dirty(v, pass_ms), batch.dirty(v, pass_ms + batch.age(v, hot_left)))
        hot = np.minimum(hot, batch.total_pages[v] - cold)
        # The whole bitmap went out and the sync found at least as many pages again: the guest dirties
        # this scale of memory at least as fast as it is sent (sending P pages takes time t(P), and
        # D(t(P)) >= P repeats, since D and t are monotone).
        emptied = (cold <= 0.0) & (hot_left <= 0.0) & (hot >= pending) & (pending >= threshold[live])
        # A pass of hot pages only, n windows long, that did not lower pending. On one level (the
        # pending that takes n windows) the next sync grows with pending, both terms of its min do,
        # and on every higher level it is at least the barrier's bound at n + 1 windows. So with B the
        # lower of pending and that bound, if B is on this level and its next sync is at least B, no
        # sync ever falls below B again: a trap, such as a cycle across a level's edge that rises
        # below it and falls above it (docs/model.md).
        rising = np.flatnonzero(hot_only & (hot >= pending) & ~emptied)
        if rising.size:
            c, vr, n_w = live[rising], v[rising], windows[rising]
            next_ms = n_w * window_ms
            bound = np.where(
                small[c],
                batch.dirty(vr, lead_ms[c] + next_ms),
                np.minimum(
                    threshold[c] - step_pages[c] + batch.dirty(vr, next_ms + window_ms),
                    batch.dirty(vr, next_ms + window_ms + unsent_age[c]),
                ),
            )
            b = np.minimum(pending[rising], bound)
            r_b = b - n_w * step_pages[c]
            after_b = np.where(
                r_b > 0.0,
                np.minimum(
                    r_b + batch.dirty(vr, next_ms),
                    batch.dirty(vr, next_ms + batch.age(vr, np.maximum(r_b, 0.0))),
                ),
                batch.dirty(vr, b * normal_wire[c] * 1000.0 / rate[c]),
            )
            after_b = np.minimum(after_b, batch.total_pages[vr])
            on_level = b >= np.maximum(threshold[c] + (n_w - 1.0) * step_pages[c], 1.0)
            emptied[rising] = on_level & (after_b >= b)
        elapsed = sync_at
        sent = sent + pass_bytes
        passes = passes + 1
        # (a barrier is at or above the threshold: below it, pending is done next, whatever its value)
        unknown = (cold <= 0.0) & (hot >= threshold[live]) & np.isnan(barrier_pages[live])
        if np.any(unknown):
            find_barriers(live[unknown])
        stuck = (
            (elapsed > deadline)
            | (passes >= settings.max_syncs)
            | ((cold <= 0.0) & (hot >= barrier_pages[live]))
            | emptied
        )
        if np.any(stuck):
            i = live[stuck]
            out_passes[i] = passes[stuck]
            out_bytes[i] = sent[stuck]
        keep = ~stuck
        # How far this sync moved pending: _creep's regions are levels one window wide, so a cell that
        # moved a window or more will not stay in its region for another sync.
        moved = np.abs(cold + hot - pending)[keep]
        live, elapsed, sent, passes = live[keep], elapsed[keep], sent[keep], passes[keep]
        cold, hot = cold[keep], hot[keep]
        # The shortcuts cost about what a sync does; most cells end within a few syncs, so they start
        # from the third.
        if shortcut and np.any(passes >= 3):
            # (not with a zero-page scan cost: its closed form prices passes by bytes alone)
            e = np.flatnonzero(
                (cold > 0.0)
                & (cold + hot > threshold[live])
                & (passes >= 3)
                & (batch.scan_peak[vm[live]] * rate[live] <= 1.0)
            )
            if e.size:
                c = live[e]
                cold[e], hot[e], taken, windows_sent = _cold_levels(
                    batch, vm[c], cold[e], hot[e], threshold=threshold[c], step_bytes=step_bytes[c],
                    window_ms=window_ms, pass_limit=settings.max_syncs - passes[e].astype(np.float64),
                    time_left=deadline - elapsed[e],
                )  # fmt: skip
                _count_windows(
                    e, taken, windows_sent, passes=passes, elapsed=elapsed, sent=sent,
                    step_bytes=step_bytes[c], rate=rate[c],
                )  # fmt: skip
            e = np.flatnonzero((cold <= 0.0) & (hot > threshold[live]) & levels_ok[live] & (passes >= 3))
            if e.size:
                c = live[e]
                hot[e], taken, windows_sent = _levels(
                    batch, vm[c], hot[e], threshold=threshold[c], step_pages=step_pages[c],
                    unsent_segment=unsent_segment[c], window_ms=window_ms,
                    pass_limit=settings.max_syncs - passes[e].astype(np.float64),
                    time_left=deadline - elapsed[e],
                )  # fmt: skip
                _count_windows(
                    e, taken, windows_sent, passes=passes, elapsed=elapsed, sent=sent,
                    step_bytes=step_bytes[c], rate=rate[c],
                )  # fmt: skip
            sp = step_pages[live]
            slow = (moved < sp) | (threshold[live] <= sp)  # (passes that empty the bitmap: any pace)
            e = np.flatnonzero((cold <= 0.0) & (hot > threshold[live]) & (passes >= 3) & slow)
            if e.size:
                c = live[e]
                # A pass takes at most its whole windows: a safe bound for the deadline.
                windows = np.floor((hot[e] - threshold[c]) / step_pages[c]) + 1.0
                budget = np.minimum(
                    settings.max_syncs - 1.0 - passes[e],
                    np.floor((deadline - elapsed[e]) / (windows * settings.iteration_seconds)),
                )
                ms_per_page = normal_wire[c] * 1000.0 / rate[c]
                k, hot[e], pages, never = _creep(
                    batch,
                    vm[c],
                    hot[e],
                    threshold=threshold[c],
                    step_pages=step_pages[c],
                    ms_per_page=ms_per_page,
                    budget=budget,
                )
                elapsed[e] += pages * ms_per_page / 1000.0
                sent[e] += pages * normal_wire[c]
                passes[e] += k.astype(np.int64)
                if np.any(never):
                    out_passes[c[never]] = passes[e[never]]
                    out_bytes[c[never]] = sent[e[never]]
                    keep = np.ones(live.size, dtype=bool)
                    keep[e[never]] = False
                    live, elapsed, sent, passes = live[keep], elapsed[keep], sent[keep], passes[keep]
                    cold, hot = cold[keep], hot[keep]
    return CellResults(seconds=out_s, passes=out_passes, bytes_sent=out_bytes, downtime_seconds=out_down)


# --- grids and derived answers -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grid:
    """Bandwidths (bytes/s) x max downtimes (seconds, inf = unlimited), with their labels."""

    bandwidths: tuple[float, ...]
    downtimes: tuple[float, ...]
    bandwidth_labels: tuple[str, ...] = field(default=())
    downtime_labels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.bandwidths or not self.downtimes:
            raise ValueError("a grid needs at least one bandwidth and one downtime")
        if any(not (b > 0 and math.isfinite(b)) for b in self.bandwidths):
            raise ValueError("bandwidths must be positive and finite")
        if any(not d >= 0 for d in self.downtimes):
            raise ValueError("downtimes must be non-negative (inf = unlimited)")


# The seed's grid (scripts/predict_migration.py of the 2023 patch series): the default of the CLI and the
# config.
DEFAULT_BANDWIDTHS: Final = ("100Mbps", "1Gbps", "2Gbps", "2.5Gbps", "5Gbps", "10Gbps", "25Gbps", "40Gbps")
DEFAULT_DOWNTIMES: Final = ("125ms", "250ms", "500ms", "1000ms", "5000ms", "unlim")


def make_grid(bandwidths: Sequence[str], downtimes: Sequence[str]) -> Grid:
    """A grid from human-readable values; labels are normalised (``1 Gbps`` -> ``1Gbps``).

    :raises UnitError: a value that does not parse.
    """
    bws = tuple(parse_bandwidth(b) for b in bandwidths)
    dts = tuple(parse_duration(d, allow_unlimited=True) for d in downtimes)
    return Grid(
        bandwidths=bws,
        downtimes=dts,
        bandwidth_labels=tuple(format_bandwidth(b) for b in bws),
        downtime_labels=tuple(format_downtime(d) for d in dts),
    )


DEFAULT_GRID: Final = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)


class VMPrediction:
    """Everything predicted for one VM over a grid. Arrays are [bandwidth, downtime]; nan = no convergence.

    ``passes`` may be a narrower integer type than int64. A prediction is one row of arrays shared by its
    batch (:meth:`row`), and each field is a view made when read: a daemon keeps one prediction per
    target, and six numpy views each (about 0.1 kB apiece) were a large part of its memory at 10,000
    targets (docs/performance.md). Immutable: :meth:`with_derived` makes a new one.
    """

    __slots__ = ("_derived", "_grid", "_i", "_j")
    _grid: tuple[FloatArray, IntegerArray, FloatArray, FloatArray]  # [vm, bandwidth, downtime] each
    _i: int
    _derived: tuple[FloatArray, FloatArray]  # [vm, downtime] min bandwidth, [vm, bandwidth] min downtime
    _j: int

    def __init__(
        self,
        *,
        seconds: FloatArray,
        passes: IntegerArray,
        bytes_sent: FloatArray,
        downtime_seconds: FloatArray,
        min_bandwidth: FloatArray,
        min_downtime: FloatArray,
    ) -> None:
        self._grid = (seconds[None], passes[None], bytes_sent[None], downtime_seconds[None])
        self._i = 0
        self._derived = (min_bandwidth[None], min_downtime[None])
        self._j = 0

    @classmethod
    def row(
        cls,
        grid: tuple[FloatArray, IntegerArray, FloatArray, FloatArray],
        i: int,
        derived: tuple[FloatArray, FloatArray],
        j: int,
    ) -> VMPrediction:
        """Row ``i`` of a batch's (seconds, passes, bytes_sent, downtime_seconds) and row ``j`` of its
        (min_bandwidth, min_downtime), without copying."""
        p = cls.__new__(cls)
        p._grid, p._i, p._derived, p._j = grid, i, derived, j
        return p

    def with_derived(self, derived: tuple[FloatArray, FloatArray], j: int) -> VMPrediction:
        """The same grid with row ``j`` of (min_bandwidth [vm, downtime], min_downtime [vm, bandwidth])."""
        return VMPrediction.row(self._grid, self._i, derived, j)

    def with_derived_of(self, other: VMPrediction) -> VMPrediction:
        """The same grid with ``other``'s derived answers."""
        return VMPrediction.row(self._grid, self._i, other._derived, other._j)

    @property
    def seconds(self) -> FloatArray:
        a: FloatArray = self._grid[0][self._i]
        return a

    @property
    def passes(self) -> IntegerArray:
        a: IntegerArray = self._grid[1][self._i]
        return a

    @property
    def bytes_sent(self) -> FloatArray:
        a: FloatArray = self._grid[2][self._i]
        return a

    @property
    def downtime_seconds(self) -> FloatArray:
        a: FloatArray = self._grid[3][self._i]
        return a

    @property
    def min_bandwidth(self) -> FloatArray:
        """Per downtime: smallest converging bytes/s (nan: none up to the search cap)."""
        a: FloatArray = self._derived[0][self._j]
        return a

    @property
    def min_downtime(self) -> FloatArray:
        """Per bandwidth: smallest max-downtime (s) that converges (nan: none)."""
        a: FloatArray = self._derived[1][self._j]
        return a


# Derived answers search these ranges: bytes/s, and seconds from a floor up to the deadline (a downtime
# that converges at the floor but not at 0 is reported as the floor).
MIN_BANDWIDTH_SEARCH: Final = (1e3, 1e13)
MIN_DOWNTIME_FLOOR: Final = 1e-6


def predict_grid(
    models: Sequence[MemoryModel],
    grid: Grid,
    settings: PredictorSettings,
    *,
    derived: bool = True,
    limiters: Sequence[RateLimiter] | None = None,
) -> list[VMPrediction]:
    """Predict the whole grid for every model at once; with ``derived``, also the smallest bandwidth per
    downtime and the smallest downtime per bandwidth (:func:`predict_derived`; nan without).
    Bandwidths are QEMU ``max-bandwidth`` values; ``limiters[i]`` says how VM i's QEMU honours them
    (default: exactly)."""
    batch = ModelBatch.of(models, limiters, first_pass=settings.mode == "qemu" or derived)
    nv, nb, nd = len(models), len(grid.bandwidths), len(grid.downtimes)
    vm = np.repeat(np.arange(nv), nb * nd)
    bw = np.tile(np.repeat(np.array(grid.bandwidths), nd), nv)
    dt = np.tile(np.array(grid.downtimes), nv * nb)
    if settings.mode == "seed":  # each (VM, bandwidth) once for all downtimes: the same cells
        res = _simulate_seed_grid(batch, np.array(grid.bandwidths), np.array(grid.downtimes), settings)
    else:
        res = simulate(batch, vm, bw, dt, settings)
    shape = (nv, nb, nd)
    if derived:
        min_bw, min_dt = _derived(batch, grid, settings, grid_converges=res.converges.reshape(shape))
    else:
        min_bw = np.full((nv, nd), np.nan)
        min_dt = np.full((nv, nb), np.nan)
    # One block per batch, each VM a row of it (VMPrediction.row); passes fit in 32 bits (max_syncs is at
    # most 1,000,000), half the memory of int64.
    block = (
        res.seconds.reshape(shape),
        res.passes.astype(np.int32).reshape(shape),
        res.bytes_sent.reshape(shape),
        res.downtime_seconds.reshape(shape),
    )
    derived_block = (min_bw, min_dt)
    return [VMPrediction.row(block, i, derived_block, i) for i in range(nv)]


def predict_derived(
    models: Sequence[MemoryModel],
    grid: Grid,
    settings: PredictorSettings,
    *,
    limiters: Sequence[RateLimiter] | None = None,
    grid_seconds: Sequence[FloatArray] | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Only the derived answers of :func:`predict_grid`: ([vm, downtime] smallest converging bytes/s,
    [vm, bandwidth] smallest converging max downtime in seconds), 0 where the bottom of the search
    range converges, nan where nothing up to its top does. ``grid_seconds[i]``, VM i's grid from
    :func:`predict_grid` with the same settings, saves simulating the grid again (the same answers)."""
    known = None if grid_seconds is None else ~np.isnan(np.array(grid_seconds, dtype=float))
    return _derived(ModelBatch.of(models, limiters), grid, settings, grid_converges=known)


def _derived(
    batch: ModelBatch,
    grid: Grid,
    settings: PredictorSettings,
    *,
    grid_converges: npt.NDArray[np.bool_] | None = None,
) -> tuple[FloatArray, FloatArray]:
    """The smallest converging bandwidth per downtime and downtime per bandwidth, for every VM.

    Each is a bisection of the logarithm of the whole search range, BISECTION_STEPS halvings. Both
    searches share their simulations, so a step is one call for every VM. Convergence is not always
    monotone (docs/model.md, section 3): where a grid point at or above an answer does not converge,
    :func:`settle_on_grid` moves the answer above it, so that every grid point at or above an answer
    converges. Returns ([vm, downtime] bytes/s, [vm, bandwidth] seconds): 0 where the bottom of the
    range (1 kB/s; a downtime of exactly 0) converges, nan where the top does not.
    """
    nv, nb, nd = len(batch), len(grid.bandwidths), len(grid.downtimes)
    n_bw = nv * nd
    vm = np.concatenate([np.repeat(np.arange(nv), nd), np.repeat(np.arange(nv), nb)])
    fixed = np.concatenate([np.tile(np.array(grid.downtimes), nv), np.tile(np.array(grid.bandwidths), nv)])
    is_bw = np.arange(len(vm)) < n_bw
    cap = max(settings.deadline_seconds, MIN_DOWNTIME_FLOOR)
    lo = np.where(is_bw, math.log(MIN_BANDWIDTH_SEARCH[0]), math.log(MIN_DOWNTIME_FLOOR))
    hi = np.where(is_bw, math.log(MIN_BANDWIDTH_SEARCH[1]), math.log(cap))

    def converges(rows: IntArray, value: FloatArray) -> npt.NDArray[np.bool_]:
        return _converges_at(
            batch, vm[rows], is_bandwidth=is_bw[rows], value=value, fixed=fixed[rows], settings=settings
        )

    # The ends: the bottom (the search floor for bandwidths, exactly 0 for downtimes) and the top.
    every = np.arange(len(vm))
    ends = converges(
        np.concatenate([every, every]), np.concatenate([np.where(is_bw, np.exp(lo), 0.0), np.exp(hi)])
    )
    bottom, top = ends[: len(vm)], ends[len(vm) :]
    searched = np.flatnonzero(~bottom & top)
    answer = np.where(bottom, 0.0, np.nan)
    answer[searched] = np.exp(bisect_log(lo[searched], hi[searched], lambda v: converges(searched, v)))
    # The grid points of each row's searched axis: downtimes are searched per bandwidth, and so on.
    points = np.full((len(vm), max(nb, nd)), np.nan)
    points[:n_bw, :nb] = np.tile(np.array(grid.bandwidths), (n_bw, 1))
    points[n_bw:, :nd] = np.tile(np.array(grid.downtimes), (nv * nb, 1))
    known = None
    if grid_converges is not None and grid_converges.shape == (nv, nb, nd):
        # The grid's own verdicts, in the rows' layout: bandwidth rows (vm, downtime j) read a column,
        # downtime rows (vm, bandwidth i) a row.
        known = np.ones((len(vm), max(nb, nd)), dtype=bool)
        known[:n_bw, :nb] = grid_converges.transpose(0, 2, 1).reshape(n_bw, nb)
        known[n_bw:, :nd] = grid_converges.reshape(nv * nb, nd)
    answer = settle_on_grid(
        answer, points, top=top, log_floor=lo, log_cap=hi, converges=converges, known=known
    )
    return answer[:n_bw].reshape(nv, nd), answer[n_bw:].reshape(nv, nb)


def bisect_log(
    lo: FloatArray, hi: FloatArray, converges: Callable[[FloatArray], npt.NDArray[np.bool_]]
) -> FloatArray:
    """BISECTION_STEPS halvings of ``[lo, hi]`` (logarithms; ``hi`` converges, ``lo`` is taken not to):
    the logarithm of the smallest converging value found."""
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2.0
        ok = converges(np.exp(mid))
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return hi


def settle_on_grid(
    answer: FloatArray,
    points: FloatArray,
    *,
    top: npt.NDArray[np.bool_],
    log_floor: FloatArray,
    log_cap: FloatArray,
    converges: Callable[[IntArray, FloatArray], npt.NDArray[np.bool_]],
    known: npt.NDArray[np.bool_] | None = None,
) -> FloatArray:
    """Make each row's answer agree with its grid: every grid point at or above it converges.

    ``points[r]`` are row r's grid values on the searched axis (nan-padded), ``top[r]`` whether the top
    of the search range (``exp(log_cap[r])``) converges, and ``converges(rows, values)`` simulates. A
    row with a grid point at or above its answer that does not converge (convergence is not monotone
    everywhere) is searched again, between the largest such point and the next value that converges:
    the grid point above it, or the top. nan if there is none. ``known[r, k]``, where given, is
    whether ``points[r, k]`` converges, already simulated (the grid's own prediction).
    """
    rows = np.flatnonzero(~np.isnan(answer))
    if not rows.size:
        return answer
    pts = points[rows]
    check = (
        ~np.isnan(pts) & np.isfinite(pts) & (pts >= answer[rows, None]) & (pts <= np.exp(log_cap[rows, None]))
    )
    r_idx, p_idx = np.nonzero(check)
    if not r_idx.size:
        return answer
    ok = np.ones(pts.shape, dtype=bool)
    ok[r_idx, p_idx] = (
        known[rows[r_idx], p_idx] if known is not None else converges(rows[r_idx], pts[r_idx, p_idx])
    )
    failing = np.where(check & ~ok, pts, -np.inf).max(axis=1)
    bad = np.flatnonzero(np.isfinite(failing))
    if not bad.size:
        return answer
    out = answer.copy()
    rows, low, pts = rows[bad], failing[bad], pts[bad]
    above = np.where(~np.isnan(pts) & (pts > low[:, None]), pts, np.inf).min(axis=1)
    high = np.where(
        np.isfinite(above) & (above <= np.exp(log_cap[rows])),
        above,
        np.where(top[rows], np.exp(log_cap[rows]), np.nan),
    )
    out[rows] = np.nan
    go = np.flatnonzero(~np.isnan(high))
    if go.size:
        r = rows[go]
        lo = np.maximum(np.log(np.maximum(low[go], 1e-300)), log_floor[r])
        out[r] = np.exp(bisect_log(lo, np.log(high[go]), lambda v: converges(r, v)))
    return out


def _converges_at(
    batch: ModelBatch,
    vm: IntArray,
    *,
    is_bandwidth: npt.NDArray[np.bool_],
    value: FloatArray,
    fixed: FloatArray,
    settings: PredictorSettings,
) -> npt.NDArray[np.bool_]:
    """Convergence of cells whose searched axis (bandwidth where ``is_bandwidth``, else downtime) is
    at ``value`` and whose other axis is at ``fixed``."""
    bw = np.where(is_bandwidth, value, fixed)
    dt = np.where(is_bandwidth, fixed, value)
    return simulate(batch, vm, bw, dt, settings).converges
