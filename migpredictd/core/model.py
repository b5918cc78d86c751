"""The memory model: how many pages a VM dirties within ``t`` ms, starting from a clean bitmap.

Piece-wise linear through the measured points, extrapolated pessimistically on both sides (the seed's
rules): to the left, the first segment's line cut at ``t = 0`` (a convex curve is at worst a jump at zero
followed by that slope); to the right, the last segment's slope until every page that can be dirty is
dirty, then flat. Monotone non-decreasing and saturating, so the pre-copy recurrence built on it is
monotone too. Pure: no I/O.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from dataclasses import dataclass
from typing import Literal

from migpredictd.core.measurement import Measurement


@dataclass(frozen=True, slots=True)
class MemoryModel:
    """Breakpoints ``(period_ms[i], dirty_pages[i])`` of the piece-wise linear curve; the last is at inf.

    ``slopes[i]``/``offsets[i]`` describe the segment that ends at breakpoint ``i`` (``i >= 1``), so
    ``dirty(t) = offsets[i] + slopes[i] * t`` for ``period_ms[i-1] < t < period_ms[i]``.
    """

    page_size_bytes: int
    total_pages: int
    zero_pages: float
    period_ms: tuple[float, ...]
    dirty_pages: tuple[float, ...]
    slopes: tuple[float, ...]
    offsets: tuple[float, ...]
    # Zero share of equal slices of RAM in scan order (Measurement.zero_profile); None = even spread.
    zero_profile: tuple[float, ...] | None = None
    # Of zero_pages, those that are allocated memory (Measurement.zero_allocated_pages; 0 = unknown or
    # none): QEMU's migration thread reads them slower than never-written ones.
    zero_allocated_pages: float = 0.0

    @property
    def normal_pages(self) -> float:
        """Pages that are not zero: the most that can ever be dirty at once."""
        return self.total_pages - self.zero_pages

    def dirty(self, ms: float) -> float:
        """Pages dirtied within ``ms`` milliseconds from a clean state (readable reference; the
        predictor evaluates the same formula vectorised)."""
        i = bisect.bisect_left(self.period_ms, ms)  # the first breakpoint at or above ms
        if i == len(self.period_ms) or math.isnan(ms):  # beyond every breakpoint, or nan: the ceiling
            return self.dirty_pages[-1]
        if self.period_ms[i] == ms:
            return self.dirty_pages[i]
        return self.offsets[i] + self.slopes[i] * ms

    def age(self, pages: float) -> float:
        """The inverse of :meth:`dirty`: the shortest window (ms) within which ``pages`` pages get
        dirtied; 0 for what the jump at t = 0 covers, inf beyond the ceiling and where the curve gets
        there only at inf (a segment of slope 0 up to it), as
        :meth:`~migpredictd.core.predictor.ModelBatch.age` has it."""
        for i, y in enumerate(self.dirty_pages):
            if y >= pages:
                if i == 0:
                    return 0.0
                if self.slopes[i] == 0.0:
                    return math.inf
                return self.period_ms[i - 1] + (pages - self.dirty_pages[i - 1]) / self.slopes[i]
        return math.inf


def _line(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """Slope and intercept of the line through two points (intercept taken at the left point)."""
    slope = (y1 - y0) / (x1 - x0)
    return slope, y0 - slope * x0


def build_model(m: Measurement, *, mode: Literal["seed", "qemu"] = "seed") -> MemoryModel:
    """Build the model of one VM from its measurement (see the module docstring for the rules).

    ``mode="qemu"`` extrapolates below the shortest window through the origin at that window's rate
    instead of the seed's jump at t = 0: on QEMU 7.2 the shortest window is 1 s, a working set that
    fills within it made the seed's line through the first two points claim the whole set was dirty at
    once, and four real migrations at 0.35-0.7x of the bandwidth were predicted never to converge
    (docs/accuracy.md). The seed's rule stays for ``mode="seed"``, which must reproduce it exactly.
    """
    zero = m.zero_pages if m.zero_pages is not None else 0.0
    ceiling = m.total_pages - zero
    periods, counts = zip(*m.points, strict=True)
    xs = list(periods)
    # A sampled count can exceed what is possible when zero pages are estimated separately; clamp so the
    # curve stays monotone (a no-op for consistent input, so seed mode is unaffected).
    # A longer window sees at least the pages a shorter one saw: a noisy measurement that dips is read
    # as its running maximum (pessimistic, and a no-op for monotone input, so seed mode is unaffected).
    if all(map(operator.le, counts, counts[1:])) and counts[-1] <= ceiling and 0.0 not in counts[1:]:
        ys = list(counts)  # the common case, where both are no-ops (a later zero may be a -0.0: not here)
    else:
        ys = list(itertools.accumulate(map(min, counts, itertools.repeat(ceiling)), max))
    if len(xs) == 1 or mode == "qemu":
        # The rate the shortest window saw, from a clean start (a line through the origin).
        xs.insert(0, 0.0)
        ys.insert(0, 0.0)
    else:
        _, intercept = _line(xs[0], ys[0], xs[1], ys[1])
        xs.insert(0, 0.0)
        ys.insert(0, max(intercept, 0.0))
    slope, intercept = _line(xs[-2], ys[-2], xs[-1], ys[-1])
    # A denormal slope puts the saturation point at inf; the breakpoint at inf below covers that case.
    saturation = (ceiling - intercept) / slope if slope > 0.0 else math.inf
    if math.isfinite(saturation) and saturation > xs[-1]:
        xs.append(saturation)
        ys.append(ceiling)
    xs.append(math.inf)
    ys.append(ceiling)
    if mode == "qemu":
        # A breakpoint on the line through its neighbours, to 1e-12 (the origin and one measured
        # point, or a constant rate measured twice), is no breakpoint: the same curve with fewer
        # segments, which lets the predictor take more syncs in closed form. Seed mode keeps the
        # seed's breakpoints.
        i = 1
        while i < len(xs) - 2:
            left = (ys[i] - ys[i - 1]) * (xs[i + 1] - xs[i])
            right = (ys[i + 1] - ys[i]) * (xs[i] - xs[i - 1])
            if abs(left - right) <= 1e-12 * max(abs(left), abs(right)):
                del xs[i], ys[i]
            else:
                i += 1
    # _line's operations per segment, in C loops: (y1 - y0) / (x1 - x0), then y0 - slope * x0.
    slopes = list(map(operator.truediv, map(operator.sub, ys[1:], ys), map(operator.sub, xs[1:], xs)))
    offsets = list(map(operator.sub, ys, map(operator.mul, slopes, xs)))
    return MemoryModel(
        page_size_bytes=m.page_size_bytes,
        total_pages=m.total_pages,
        zero_pages=zero,
        period_ms=tuple(xs),
        dirty_pages=tuple(ys),
        slopes=(0.0, *slopes),
        offsets=(ys[0], *offsets),
        zero_profile=m.zero_profile,  # Measurement only allows one next to zero_pages
        zero_allocated_pages=m.zero_allocated_pages or 0.0,  # at most zero_pages, as Measurement checks
    )
