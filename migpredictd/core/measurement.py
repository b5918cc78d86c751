"""The canonical measurement of one VM, and readers for every input format we accept.

A measurement says how many distinct guest pages change content within a window of ``t`` ms, for a few
``t`` (``points``), plus the guest's size and its zero pages. It is what the memory model is built from,
what ``migpredictd measure`` prints and what ``migpredictd predict`` reads. Formats (auto-detected):

- canonical: ``{"format": "migpredictd.measurement/v1", ...}`` (see docs/architecture.md);
- extended: the reply of the 2023 patch series' ``calc-dirty-rate`` (``periods``, ``n-dirty-pages``...),
  which upstream QEMU never merged;
- sweep: several upstream ``query-dirty-rate`` replies (``dirty-rate`` in MiB/s, truncated) plus the
  guest's memory size: ``{"memory_bytes": N, "page_size_bytes": 4096, "runs": [...]}``.

Pure: no I/O. Every problem raises :class:`InputError` naming the field.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, cast

from migpredictd.core.errors import InputError

FORMAT: Final = "migpredictd.measurement/v1"
MIB: Final = 1 << 20

ZERO_PAGE_METHODS: Final = ("qemu-sampled", "host-smaps", "guest-sample", "host-status", "none")
STRATEGIES: Final = ("extended", "sweep-ms", "sweep-s", "libvirt", "manual")
MAX_PROFILE_BINS: Final = 1024

# Upstream QEMU truncates dirty-rate to whole MiB/s (dirtyrate.c: update_dirtyrate() divides integers),
# so a window of t seconds hides up to t MiB. A sweep adds back half a MiB/s for at most two seconds
# (0.5 MiB/s x min(t, 2 s)): much of what a window cannot resolve is a small hot set (timers, page
# tables) that saturates, not a steady sub-MiB/s stream. Added as 0.5 x t in every window, it made an
# idle guest's 8 s window 4 MiB, 1024 dirty pages that real migrations never re-sent. The two seconds
# were chosen on the recorded rounds (docs/accuracy.md, round 6).
RATE_TRUNCATION_CORRECTION_MIB_S: Final = 0.5
RATE_TRUNCATION_CORRECTION_UP_TO_MS: Final = 2000.0


class DirtyPoint(NamedTuple):
    """``dirty_pages`` distinct pages changed content within a window of ``period_ms`` milliseconds.

    A named tuple rather than a frozen dataclass: a measurement holds tens of points, and a tuple is
    built several times faster (``migpredictd predict`` reads thousands of measurements).
    """

    period_ms: float
    dirty_pages: float


@dataclass(frozen=True, slots=True)
class Measurement:
    """What the model of one VM is built from; see the module docstring and docs/architecture.md."""

    page_size_bytes: int
    total_pages: int
    points: tuple[DirtyPoint, ...]
    zero_pages: float | None = None
    zero_pages_method: str = "none"
    strategy: str = "manual"
    sample_pages_per_gib: int | None = None
    qemu_version: str | None = None
    target: str | None = None
    measured_at: float | None = None
    duration_seconds: float | None = None
    notes: tuple[str, ...] = field(default=())
    # Zero share of equal slices of guest RAM in QEMU's scan order (ascending RAM offset), from the
    # same sample as zero_pages; None = assume zero pages spread evenly.
    zero_profile: tuple[float, ...] | None = None
    # Share of its vCPUs' time the guest used during the measurement (0..1, from the vCPU threads' CPU
    # time); what auto-converge's throttle acts on (core/policies.py). None = unknown.
    vcpu_utilization: float | None = None
    # "kvm" or "tcg" (query-kvm's enabled); None = unknown. Under TCG a bitmap sync waits for every vCPU,
    # so a throttled vCPU's sleep holds the migration up (core/policies.py). None = unknown (as KVM).
    accelerator: str | None = None
    # Relative standard error, from sampling alone, of the dirty pages at the shortest period (the one
    # with the fewest dirty samples): :func:`sampling_error`. None = unknown, or no sampled page changed.
    sampling_error: float | None = None
    # How many of zero_pages are allocated memory (written and zeroed again, or swapped), the rest being
    # never written (the shared zero page); from the same sample. None = unknown (taken as none).
    zero_allocated_pages: float | None = None
    # Seconds this host took to read one zero page of each kind (qemu/hostscan.py), measured with the
    # rest; what QEMU's migration thread's pace through zero pages is scaled by. None = not measured.
    host_shared_zero_read_seconds: float | None = None
    host_allocated_read_seconds: float | None = None

    def __post_init__(self) -> None:
        _check_int("page_size_bytes", self.page_size_bytes, minimum=1)
        _check_int("total_pages", self.total_pages, minimum=1)
        if not self.points:
            raise InputError("needs at least one point", field="points")
        periods, dirty = zip(*self.points, strict=True)
        _check_numbers("points[{}].period_ms", periods, positive=True)
        _check_numbers("points[{}].dirty_pages", dirty)
        # The common case in C loops; the failing index is looked for only when one fails.
        if not (all(map(operator.lt, periods, periods[1:])) and max(dirty) <= self.total_pages):
            previous = 0.0
            for i, p in enumerate(self.points):
                if p.period_ms <= previous:
                    raise InputError("periods must be strictly increasing", field=f"points[{i}].period_ms")
                if p.dirty_pages > self.total_pages:
                    raise InputError(
                        f"{p.dirty_pages} dirty pages exceed total_pages {self.total_pages}",
                        field=f"points[{i}].dirty_pages",
                    )
                previous = p.period_ms
        if self.zero_pages is not None:
            _check_number("zero_pages", self.zero_pages)
            if self.zero_pages > self.total_pages:
                raise InputError(f"exceeds total_pages {self.total_pages}", field="zero_pages")
        if self.zero_profile is not None:
            if self.zero_pages is None:
                raise InputError("needs zero_pages", field="zero_profile")
            if not 1 <= len(self.zero_profile) <= MAX_PROFILE_BINS:
                raise InputError(f"must have 1..{MAX_PROFILE_BINS} entries", field="zero_profile")
            for i, share in enumerate(self.zero_profile):
                _check_number(f"zero_profile[{i}]", share)
                if share > 1.0:
                    raise InputError("is a share, at most 1", field=f"zero_profile[{i}]")
        if self.zero_allocated_pages is not None:
            if self.zero_pages is None:
                raise InputError("needs zero_pages", field="zero_allocated_pages")
            _check_number("zero_allocated_pages", self.zero_allocated_pages)
            if self.zero_allocated_pages > self.zero_pages:
                raise InputError(f"exceeds zero_pages {self.zero_pages}", field="zero_allocated_pages")
        for name in ("host_shared_zero_read_seconds", "host_allocated_read_seconds"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value)
                if not 0.0 < value <= 1e-3:
                    raise InputError("must be above 0 and at most 1e-3 s per page", field=name)
        if self.zero_pages_method not in ZERO_PAGE_METHODS:
            raise InputError(f"must be one of {', '.join(ZERO_PAGE_METHODS)}", field="zero_pages_method")
        if self.accelerator not in (None, "kvm", "tcg"):
            raise InputError("must be kvm or tcg", field="accelerator")
        if self.vcpu_utilization is not None:
            _check_number("vcpu_utilization", self.vcpu_utilization)
            if self.vcpu_utilization > 1.0:
                raise InputError("is a share of the vCPUs' time, at most 1", field="vcpu_utilization")
        if self.sampling_error is not None:
            _check_number("sampling_error", self.sampling_error)
        if self.strategy not in STRATEGIES:
            raise InputError(f"must be one of {', '.join(STRATEGIES)}", field="strategy")

    @classmethod
    def _checked_by_caller(cls, **fields: Any) -> Measurement:
        """A Measurement from fields a parser has already checked as ``__post_init__`` would (periods
        strictly increasing and positive, counts finite, within total_pages, constants valid): the
        parse path of thousands of VMs skips checking them twice."""
        obj = object.__new__(cls)
        setattr_ = object.__setattr__
        for name, default in _MEASUREMENT_DEFAULTS.items():
            value = fields.pop(name, default)
            if value is _REQUIRED:
                raise TypeError(f"Measurement needs {name}")
            setattr_(obj, name, value)
        if fields:
            raise TypeError(f"unknown Measurement fields: {', '.join(fields)}")
        return obj

    @property
    def memory_bytes(self) -> int:
        return self.page_size_bytes * self.total_pages

    def dirty_rate_bytes_per_second(self) -> list[tuple[float, float]]:
        """(period seconds, bytes/s) for each point: the familiar ``dirty-rate`` view of the points."""
        return [
            (p.period_ms / 1000.0, p.dirty_pages * self.page_size_bytes * 1000.0 / p.period_ms)
            for p in self.points
        ]

    def to_json_dict(self) -> dict[str, Any]:
        """The canonical JSON object (``migpredictd.measurement/v1``)."""
        out: dict[str, Any] = {
            "format": FORMAT,
            "page_size_bytes": self.page_size_bytes,
            "total_pages": self.total_pages,
            "zero_pages": self.zero_pages,
            "zero_pages_method": self.zero_pages_method,
            "points": [{"period_ms": p.period_ms, "dirty_pages": p.dirty_pages} for p in self.points],
            "strategy": self.strategy,
        }
        optional: dict[str, Any] = {
            "target": self.target,
            "sample_pages_per_gib": self.sample_pages_per_gib,
            "qemu_version": self.qemu_version,
            "measured_at": self.measured_at,
            "duration_seconds": self.duration_seconds,
            "vcpu_utilization": self.vcpu_utilization,
            "accelerator": self.accelerator,
            "sampling_error": self.sampling_error,
            "zero_allocated_pages": self.zero_allocated_pages,
            "host_shared_zero_read_seconds": self.host_shared_zero_read_seconds,
            "host_allocated_read_seconds": self.host_allocated_read_seconds,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.zero_profile is not None:
            out["zero_profile"] = list(self.zero_profile)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


_REQUIRED: Final = object()
# Each field's default (_REQUIRED: none), for Measurement._checked_by_caller; no field has a factory.
_MEASUREMENT_DEFAULTS: Final[Mapping[str, Any]] = {
    f.name: _REQUIRED if f.default is dataclasses.MISSING else f.default
    for f in dataclasses.fields(Measurement)
}
assert all(f.default_factory is dataclasses.MISSING for f in dataclasses.fields(Measurement))


def parse_measurement(data: object, *, source: str | None = None) -> Measurement:
    """Read any accepted format (detected by its keys) into a :class:`Measurement`.

    :raises InputError: naming the field (and ``source``, e.g. ``stdin line 3``) that is wrong.
    """
    try:
        if not isinstance(data, Mapping):
            raise InputError(f"expected a JSON object, got {type(data).__name__}")
        if "format" in data:
            return _from_canonical(data)
        if "periods" in data or "n-dirty-pages" in data:
            return measurement_from_extended(data)
        if "runs" in data:
            return _from_sweep_document(data)
        raise InputError(
            "not a measurement: expected a 'format' key (canonical), 'periods' (extended calc-dirty-rate) "
            "or 'runs' (sweep of calc-dirty-rate results)"
        )
    except InputError as e:
        if source is None or e.source is not None:
            raise
        located = InputError(str(e), source=source)
        located.field = e.field  # keep the field for callers; the message already names it
        raise located from e


def _from_canonical(data: Mapping[str, Any]) -> Measurement:
    if data["format"] != FORMAT:
        raise InputError(f"unsupported format {data['format']!r}, expected {FORMAT!r}", field="format")
    allowed = {
        "format",
        "page_size_bytes",
        "total_pages",
        "zero_pages",
        "zero_pages_method",
        "points",
        "strategy",
        "sample_pages_per_gib",
        "qemu_version",
        "target",
        "measured_at",
        "duration_seconds",
        "notes",
        "zero_profile",
        "vcpu_utilization",
        "accelerator",
        "sampling_error",
        "zero_allocated_pages",
        "host_shared_zero_read_seconds",
        "host_allocated_read_seconds",
    }
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InputError("unknown key", field=unknown[0])
    raw_points = _require(data, "points")
    if not isinstance(raw_points, list):
        raise InputError("must be a list", field="points")
    points = []
    for i, p in enumerate(raw_points):
        if not isinstance(p, Mapping):
            raise InputError("must be an object", field=f"points[{i}]")
        points.append(
            DirtyPoint(
                period_ms=_number(p, "period_ms", f"points[{i}].period_ms"),
                dirty_pages=_number(p, "dirty_pages", f"points[{i}].dirty_pages"),
            )
        )
    zero = data.get("zero_pages")
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise InputError("must be a list of strings", field="notes")
    profile = data.get("zero_profile")
    if profile is not None and not isinstance(profile, list):
        raise InputError("must be a list of shares", field="zero_profile")
    return Measurement(
        page_size_bytes=_integer(data, "page_size_bytes"),
        total_pages=_integer(data, "total_pages"),
        points=tuple(points),
        zero_pages=None if zero is None else _number(data, "zero_pages"),
        zero_pages_method=_string(data, "zero_pages_method", "none" if zero is None else "qemu-sampled"),
        strategy=_string(data, "strategy", "manual"),
        sample_pages_per_gib=_optional_integer(data, "sample_pages_per_gib"),
        qemu_version=_optional_string(data, "qemu_version"),
        target=_optional_string(data, "target"),
        measured_at=_optional_number(data, "measured_at"),
        duration_seconds=_optional_number(data, "duration_seconds"),
        notes=tuple(notes),
        zero_profile=None if profile is None else tuple(profile),  # each share checked by Measurement
        vcpu_utilization=_optional_number(data, "vcpu_utilization"),
        accelerator=_optional_string(data, "accelerator"),
        sampling_error=_optional_number(data, "sampling_error"),
        zero_allocated_pages=_optional_number(data, "zero_allocated_pages"),
        host_shared_zero_read_seconds=_optional_number(data, "host_shared_zero_read_seconds"),
        host_allocated_read_seconds=_optional_number(data, "host_allocated_read_seconds"),
    )


def sampling_error(runs: Sequence[Mapping[str, Any]], *, memory_bytes: int) -> float | None:
    """The relative standard error, from page sampling alone, of the dirty pages at the shortest period
    of ``runs`` (``query-dirty-rate`` replies that carry ``sample-pages``), pooled over its runs.

    QEMU hashes ``sample-pages`` random pages per GiB and scales the changed ones to the guest, so a run's
    reading counts ``c`` changed samples out of ``n`` (``c`` = rate x seconds x n / MiB of guest RAM);
    the pooled share ``f = sum(c) / sum(n)`` has a binomial error ``sqrt((1 - f) / (f sum(n)))`` relative
    to it. None when no run says its sample-pages, or no sample changed (the rate is then below one
    sample's worth, and no relative error bounds it).
    """
    mib = memory_bytes / MIB
    by_period: dict[float, list[float]] = {}
    for run in runs:
        pages, rate, calc = run.get("sample-pages"), run.get("dirty-rate"), run.get("calc-time")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (pages, rate, calc)):
            continue
        assert isinstance(pages, int | float)
        assert isinstance(rate, int | float)
        assert isinstance(calc, int | float)
        seconds = calc / (1000.0 if run.get("calc-time-unit") == "millisecond" else 1.0)
        n = pages * mib / 1024.0
        if n <= 0 or seconds <= 0:
            continue
        c = min(rate * seconds * n / mib, n)
        totals = by_period.setdefault(seconds, [0.0, 0.0])
        totals[0] += c
        totals[1] += n
    if not by_period:
        return None
    changed, sampled = by_period[min(by_period)]
    if changed <= 0:
        return None
    share = changed / sampled
    return math.sqrt(max(1.0 - share, 0.0) / (share * sampled))


def measurement_from_extended(data: Mapping[str, Any], **meta: Any) -> Measurement:
    """Read the extended ``query-dirty-rate`` reply of the 2023 patch series (cover letter format).

    Sampled counts are scaled to the whole guest by ``n-total-pages / n-sampled-pages``, in the same
    order of floating-point operations as the seed script, so ``seed`` mode reproduces its numbers bit
    for bit.
    """
    periods = _require(data, "periods")
    dirty = _require(data, "n-dirty-pages")
    if not isinstance(periods, list) or not isinstance(dirty, list):
        raise InputError("'periods' and 'n-dirty-pages' must be lists", field="periods")
    if len(periods) != len(dirty):
        raise InputError(f"has {len(dirty)} entries but 'periods' has {len(periods)}", field="n-dirty-pages")
    sampled = _integer(data, "n-sampled-pages")
    total = _integer(data, "n-total-pages")
    if sampled <= 0 or sampled > total:
        raise InputError(f"must be in 1..n-total-pages ({total})", field="n-sampled-pages")
    zero_sampled = _number(data, "n-zero-pages")
    if zero_sampled > sampled:
        raise InputError("exceeds n-sampled-pages", field="n-zero-pages")
    ratio = sampled / total
    _check_numbers("periods[{}]", periods, positive=True)
    _check_numbers("n-dirty-pages[{}]", dirty)
    if dirty and max(dirty) > sampled:
        i = next(i for i, n in enumerate(dirty) if n > sampled)
        raise InputError("exceeds n-sampled-pages", field=f"n-dirty-pages[{i}]")
    # Named tuples without their Python-level __new__, built in C loops: tens of points per measurement
    # (n / ratio per count, as the seed scales them).
    points = list(
        map(
            tuple.__new__,
            itertools.repeat(DirtyPoint),
            zip(map(float, periods), map(operator.truediv, dirty, itertools.repeat(ratio)), strict=True),
        )
    )
    if not all(map(operator.lt, periods, periods[1:])):
        i = next(i for i in range(1, len(points)) if points[i].period_ms <= points[i - 1].period_ms)
        raise InputError("periods must be strictly increasing", field=f"periods[{i}]")
    page_size = _integer(data, "page-size")  # an int >= 1
    if not points:
        raise InputError("needs at least one period", field="periods")
    fields: dict[str, Any] = {
        "page_size_bytes": page_size,
        "total_pages": total,
        "points": tuple(points),
        "zero_pages": zero_sampled / ratio,
        "zero_pages_method": "qemu-sampled",
        "strategy": "extended",
        "sample_pages_per_gib": _optional_integer(data, "sample-pages"),
    }
    # Everything __post_init__ checks is checked above; metadata from a caller still goes through it.
    if meta:
        return Measurement(**fields, **meta)
    return Measurement._checked_by_caller(**fields)


def measurement_from_sweep(
    runs: Sequence[Mapping[str, Any]],
    *,
    memory_bytes: int,
    page_size_bytes: int = 4096,
    zero_pages: float | None = None,
    zero_pages_method: str | None = None,
    strategy: str | None = None,
    **meta: Any,
) -> Measurement:
    """Build a measurement from several upstream ``query-dirty-rate`` replies of different lengths.

    Each run gives "MiB changed within calc-time" = rate x calc-time. Runs are noisy (a fresh random
    sample each time, rate truncated to whole MiB/s), so the points are made monotone non-decreasing by
    isotonic regression (a longer window can only see more distinct pages) and capped at the pages that
    can be dirty at all.
    """
    if memory_bytes <= 0 or memory_bytes % page_size_bytes:
        raise InputError(
            f"must be a positive multiple of the page size {page_size_bytes}", field="memory_bytes"
        )
    if not runs:
        raise InputError("needs at least one calc-dirty-rate result", field="runs")
    total_pages = memory_bytes // page_size_bytes
    by_period: dict[float, list[float]] = {}
    units = set()
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise InputError("must be an object", field=f"runs[{i}]")
        status = run.get("status", "measured")
        if status != "measured":
            raise InputError(f"status is {status!r}, not 'measured'", field=f"runs[{i}].status")
        unit = run.get("calc-time-unit", "second")
        if unit not in ("second", "millisecond"):
            raise InputError("must be 'second' or 'millisecond'", field=f"runs[{i}].calc-time-unit")
        units.add(unit)
        calc_time = _number(run, "calc-time", f"runs[{i}].calc-time")
        if calc_time <= 0:
            raise InputError("must be positive", field=f"runs[{i}].calc-time")
        rate = _number(run, "dirty-rate", f"runs[{i}].dirty-rate")
        period_ms = calc_time * (1000.0 if unit == "second" else 1.0)
        hidden_ms = min(period_ms, RATE_TRUNCATION_CORRECTION_UP_TO_MS)
        dirty_bytes = (rate * period_ms + RATE_TRUNCATION_CORRECTION_MIB_S * hidden_ms) * MIB / 1000.0
        by_period.setdefault(period_ms, []).append(dirty_bytes / page_size_bytes)
    periods = sorted(by_period)
    means = [sum(by_period[p]) / len(by_period[p]) for p in periods]
    weights = [float(len(by_period[p])) for p in periods]
    fitted = fit_dirty_curve(periods, means, weights, cap=float(total_pages) - (zero_pages or 0.0))
    if strategy is None:
        strategy = "sweep-ms" if "millisecond" in units else "sweep-s"
    return Measurement(
        page_size_bytes=page_size_bytes,
        total_pages=total_pages,
        points=tuple(DirtyPoint(p, d) for p, d in zip(periods, fitted, strict=True)),
        zero_pages=zero_pages,
        zero_pages_method=zero_pages_method or ("none" if zero_pages is None else "host-smaps"),
        strategy=strategy,
        sampling_error=sampling_error(runs, memory_bytes=memory_bytes),
        **meta,
    )


def _from_sweep_document(data: Mapping[str, Any]) -> Measurement:
    runs = _require(data, "runs")
    if not isinstance(runs, list):
        raise InputError("must be a list", field="runs")
    zero = data.get("zero_pages")
    return measurement_from_sweep(
        runs,
        memory_bytes=_integer(data, "memory_bytes"),
        page_size_bytes=_integer(data, "page_size_bytes") if "page_size_bytes" in data else 4096,
        zero_pages=None if zero is None else _number(data, "zero_pages"),
        zero_pages_method=_optional_string(data, "zero_pages_method"),
        target=_optional_string(data, "target"),
    )


def fit_dirty_curve(
    periods_ms: Sequence[float], dirty: Sequence[float], weights: Sequence[float], *, cap: float
) -> list[float]:
    """Noisy "pages dirtied within t" readings made physically possible.

    A longer window sees at least as many distinct pages (D non-decreasing) but never a higher rate
    D(t)/t (a page counts once however often it is rewritten). The rates are fitted non-increasing
    first, weighted by window length (a long window's rate has less sampling noise), then D
    non-decreasing, then capped at the pages that can be dirty. On held-out real migrations this took
    QEMU 10.0's median error from 7.3% to 3.6% (docs/accuracy.md). Idempotent.
    """
    rates = [d / p for d, p in zip(dirty, periods_ms, strict=True)]
    rate_weights = [w * p for w, p in zip(weights, periods_ms, strict=True)]
    rates = [-r for r in isotonic_increasing([-r for r in rates], rate_weights)]
    smoothed = [r * p for r, p in zip(rates, periods_ms, strict=True)]
    return [min(v, cap) for v in isotonic_increasing(smoothed, weights)]


def isotonic_increasing(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators), O(n)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    out: list[float] = []
    for mean, _, count in blocks:
        out.extend([mean] * int(count))
    return out


# --- field readers: each names the field it rejects -------------------------------------------------

# The model computes in float64: integers above 2**53 would silently lose precision (or overflow).
_MAX_EXACT_INT: Final = 2**53


def _require(data: Mapping[str, Any], key: str, name: str | None = None) -> Any:
    if key not in data:
        raise InputError("missing", field=name or key)
    return data[key]


def _plain(value: object, positive: bool) -> bool:
    """The common case in one test (inputs hold tens of numbers per VM): a finite non-negative float
    or an int in range (positive if asked). NaN fails every comparison, so it is not plain."""
    kind = type(value)
    return (
        (kind is float and 0.0 <= value < math.inf) or (kind is int and 0 <= value <= _MAX_EXACT_INT)  # type: ignore[operator]
    ) and bool(value or not positive)


_INT: Final = frozenset({int})  # exactly int: a bool is not a count
_FLOAT: Final = frozenset({float})


def _check_numbers(name: str, values: Sequence[object], *, positive: bool = False) -> None:
    """:func:`_check_number` for each of ``values``, named ``name.format(i)``; the name is only built
    for a value that fails."""
    # Whole lists of plain numbers (the common case) are checked by C loops.
    plain = cast("Sequence[float]", values)
    kinds = set(map(type, values))
    if kinds == _INT:
        if min(plain) >= (1 if positive else 0) and max(plain) <= _MAX_EXACT_INT:
            return
    # Plain floats: a finite sum means none is inf or nan, and then min() is exact.
    elif kinds == _FLOAT:
        low = min(plain)
        if math.isfinite(sum(plain)) and (low > 0.0 if positive else low >= 0.0):
            return
    for i, value in enumerate(values):
        if not _plain(value, positive):
            _check_number(name.format(i), value, positive=positive)


def _check_number(name: str, value: object, *, positive: bool = False) -> None:
    if _plain(value, positive):
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"must be a number, got {value!r}", field=name)
    # JSON integers are unbounded; math.isfinite() would raise OverflowError beyond float range.
    if isinstance(value, int) and abs(value) > _MAX_EXACT_INT:
        raise InputError(f"too large, got {value!r}", field=name)
    if not math.isfinite(value):
        raise InputError(f"must be finite, got {value!r}", field=name)
    if value < 0 or (positive and value == 0):
        raise InputError(f"must be {'positive' if positive else 'non-negative'}, got {value!r}", field=name)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"must be an integer, got {value!r}", field=name)
    if value < minimum:
        raise InputError(f"must be >= {minimum}, got {value!r}", field=name)
    if value > _MAX_EXACT_INT:
        raise InputError(f"too large, got {value!r}", field=name)


def _number(data: Mapping[str, Any], key: str, name: str | None = None) -> float:
    value = _require(data, key, name)
    _check_number(name or key, value)
    return float(value)


def _integer(data: Mapping[str, Any], key: str) -> int:
    value = _require(data, key)
    _check_int(key, value, minimum=1)
    return int(value)


def _optional_integer(data: Mapping[str, Any], key: str) -> int | None:
    return None if data.get(key) is None else _integer(data, key)


def _optional_number(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else _number(data, key)


def _string(data: Mapping[str, Any], key: str, default: str) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise InputError(f"must be a string, got {value!r}", field=key)
    return value


def _optional_string(data: Mapping[str, Any], key: str) -> str | None:
    return None if data.get(key) is None else _string(data, key, "")
