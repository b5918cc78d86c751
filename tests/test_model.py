"""The memory model: monotone, saturating, the seed's extrapolation rules, and one formula in two places."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migpredictd.core.measurement import DirtyPoint, Measurement, parse_measurement
from migpredictd.core.model import MemoryModel, build_model
from migpredictd.core.predictor import ModelBatch
from migpredictd.lab.reference import dirty_by_scan

DATA = Path(__file__).parent / "data"


def _measurement(
    points: list[tuple[float, float]], total: int = 1000, zero: float | None = None
) -> Measurement:
    return Measurement(
        page_size_bytes=4096,
        total_pages=total,
        points=tuple(DirtyPoint(p, d) for p, d in points),
        zero_pages=zero,
    )


@st.composite
def measurements(draw: st.DrawFn) -> Measurement:
    """Random measurements, including noisy non-monotone counts and counts above the non-zero pages."""
    total = draw(st.integers(1, 10**7))
    n = draw(st.integers(1, 8))
    periods = sorted(draw(st.sets(st.floats(0.5, 1e6, allow_nan=False), min_size=n, max_size=n)))
    dirty = draw(st.lists(st.floats(0, total, allow_nan=False), min_size=n, max_size=n))
    zero = draw(st.one_of(st.none(), st.floats(0, total, allow_nan=False)))
    return Measurement(
        page_size_bytes=4096,
        total_pages=total,
        points=tuple(DirtyPoint(p, d) for p, d in zip(periods, dirty, strict=True)),
        zero_pages=zero,
    )


def _probe_times(model: MemoryModel) -> list[float]:
    finite = [x for x in model.period_ms if math.isfinite(x)]
    out = [0.0, math.inf, 1e12]
    for x in finite:
        out += [x, x * 0.5, x * 1.5, math.nextafter(x, 0.0), math.nextafter(x, math.inf)]
    return sorted(out)


@settings(max_examples=300, deadline=None)
@given(measurements())
def test_monotone_and_saturating(m: Measurement) -> None:
    model = build_model(m)
    ceiling = m.total_pages - (m.zero_pages or 0.0)
    values = [model.dirty(t) for t in _probe_times(model)]
    assert all(v >= 0 for v in values)
    # monotone up to the rounding of offset + slope * t
    assert all(b >= a - 1e-9 * max(1.0, abs(a)) for a, b in itertools.pairwise(values))
    assert all(v <= ceiling * (1 + 1e-12) for v in values)
    assert model.normal_pages == ceiling
    assert model.dirty(math.inf) == model.dirty_pages[-1]
    # saturation: the curve ends flat; at the ceiling whenever the last measured segment rises
    assert model.slopes[-1] == 0.0
    assert model.period_ms[-1] == math.inf


@settings(max_examples=300, deadline=None)
@given(
    st.lists(measurements(), min_size=1, max_size=5),
    st.lists(st.floats(0, 1e8, allow_nan=False), max_size=20),
)
def test_dirty_equals_batch_dirty_bit_for_bit(ms: list[Measurement], extra: list[float]) -> None:
    models = [build_model(m) for m in ms]
    batch = ModelBatch.of(models)
    vm_list: list[int] = []
    ts: list[float] = []
    for i, model in enumerate(models):
        for t in [*_probe_times(model), *extra]:
            vm_list.append(i)
            ts.append(t)
    got = batch.dirty(np.array(vm_list, dtype=np.int64), np.array(ts))
    want = [models[i].dirty(t) for i, t in zip(vm_list, ts, strict=True)]
    assert got.tolist() == want


def test_seed_extrapolation_rules() -> None:
    # Two points on a line that would cross zero at t = 50: to the left, the line cut at zero (clamped).
    model = build_model(_measurement([(100.0, 100.0), (200.0, 300.0)], total=1000))
    assert model.period_ms[0] == 0.0
    assert model.dirty_pages[0] == 0.0
    # to the right: the last slope (2 pages/ms) until the 1000 pages are dirty, at t = 550, then flat
    assert model.dirty(300.0) == 500.0
    assert model.dirty(550.0) == 1000.0
    assert model.dirty(10_000.0) == 1000.0
    assert model.period_ms[-2] == 550.0

    # A concave curve: the first segment's line meets t = 0 above zero, a jump at zero (pessimistic).
    model = build_model(_measurement([(100.0, 300.0), (200.0, 400.0)], total=1000))
    assert model.dirty_pages[0] == 200.0
    assert model.dirty(0.0) == 200.0
    assert model.dirty(50.0) == 250.0


def test_saturates_at_total_minus_zero_pages() -> None:
    model = build_model(_measurement([(100.0, 10.0), (200.0, 20.0)], total=1000, zero=600.0))
    assert model.normal_pages == 400.0
    assert model.dirty(4000.0) == 400.0
    assert model.dirty(3900.0) == 390.0
    # counts above what can be dirty (zero pages estimated separately) are clamped to the ceiling
    model = build_model(_measurement([(100.0, 500.0)], total=1000, zero=600.0))
    assert model.dirty(100.0) == 400.0
    assert model.dirty(1e9) == 400.0


def test_single_point_is_a_line_through_the_origin() -> None:
    model = build_model(_measurement([(250.0, 50.0)], total=1000))
    assert model.dirty(0.0) == 0.0
    assert model.dirty(125.0) == 25.0
    assert model.dirty(250.0) == 50.0
    assert model.dirty(1000.0) == 200.0
    assert model.dirty(5000.0) == 1000.0
    assert model.dirty(6000.0) == 1000.0
    # an idle single point stays at zero forever
    idle = build_model(_measurement([(1000.0, 0.0)], total=1000))
    assert idle.dirty(1e9) == 0.0


def test_last_flat_segment_stays_flat() -> None:
    # the seed extrapolates the last slope: zero slope means the working set is fully seen
    model = build_model(_measurement([(100.0, 50.0), (200.0, 50.0)], total=1000))
    assert model.dirty(1e9) == 50.0


def test_noisy_dip_reads_as_running_maximum() -> None:
    model = build_model(_measurement([(100.0, 500.0), (200.0, 300.0), (300.0, 600.0)], total=1000))
    assert model.dirty(200.0) == 500.0
    assert model.dirty(150.0) == 500.0
    assert model.dirty(0.0) <= model.dirty(100.0)


def test_cover_letter_model() -> None:
    model = build_model(parse_measurement(json.loads((DATA / "cover_letter_sample.json").read_text())))
    assert model.zero_pages == 5150720.0
    assert model.normal_pages == 3241984.0
    assert model.dirty(125.0) == 16896.0
    assert model.dirty(0.0) == 0.0  # the line through the first two points crosses below zero
    assert model.dirty(62.5) == pytest.approx(16896.0 / 2)
    # beyond 60 s: the last slope (14.4896 pages/ms) until all 3241984 non-zero pages are dirty
    assert model.period_ms[-2] == pytest.approx(179222.6148409894)
    assert model.dirty(1e6) == 3241984.0


def test_age_inverts_dirty_and_matches_the_batch() -> None:
    import json
    from pathlib import Path

    import numpy as np

    from migpredictd.core.measurement import parse_measurement
    from migpredictd.core.model import build_model
    from migpredictd.core.predictor import ModelBatch

    data = json.loads((Path(__file__).parent / "data" / "cover_letter_sample.json").read_text())
    m = build_model(parse_measurement(data))
    pages = [100.0, 16896.0, 50000.0, 1e6, m.normal_pages * 0.999]
    for p in pages:
        assert m.dirty(m.age(p)) == pytest.approx(p, rel=1e-9)
        assert m.age(p) < m.age(p * 1.001)
    assert m.age(0.0) == 0.0
    assert m.age(m.normal_pages * 1.01) == float("inf")
    batch = ModelBatch.of([m])
    got = batch.age(np.zeros(len(pages), dtype=np.int64), np.array(pages))
    assert got.tolist() == pytest.approx([m.age(p) for p in pages], rel=1e-12)


def test_the_running_maximum_of_a_negative_zero_is_zero() -> None:
    """A count of -0.0 passes validation (it is not below zero); after a 0.0 the running maximum reads
    it as 0.0, as it did before the monotone case skipped the running maximum."""
    m = Measurement(
        page_size_bytes=4096,
        total_pages=1000,
        points=(DirtyPoint(100.0, 0.0), DirtyPoint(200.0, -0.0), DirtyPoint(300.0, 5.0)),
        zero_pages=0.0,
    )
    ys = build_model(m, mode="seed").dirty_pages
    assert [math.copysign(1.0, y) for y in ys[:3]] == [1.0, 1.0, 1.0]
    assert ys[1:4] == (0.0, 0.0, 5.0)


@settings(max_examples=300, deadline=None)
@given(measurements(), st.lists(st.floats(-1e3, 1e9, allow_nan=False), max_size=20))
def test_dirty_by_bisection_equals_the_scripts_scan(m: Measurement, extra: list[float]) -> None:
    """MemoryModel.dirty bisects its breakpoints; the seed script scans them. Same value everywhere:
    at and beside every breakpoint, before 0, past the last one, at inf and at nan (the ceiling)."""
    model = build_model(m)
    for t in [*_probe_times(model), *extra, -0.0, -1.0, math.nan]:
        got, want = model.dirty(t), dirty_by_scan(model, t)
        assert got == want or (math.isnan(got) and math.isnan(want)), t


@settings(max_examples=60, deadline=None)
@given(st.lists(measurements(), min_size=1, max_size=4), st.integers(0, 2**32 - 1))
def test_batch_dirty_and_age_over_many_cells_equal_the_model(ms: list[Measurement], seed: int) -> None:
    """Beyond a few hundred cells the batch searches its rows by bisection instead of copying them:
    still the model's values bit for bit, cell by cell."""
    models = [build_model(m) for m in ms]
    batch = ModelBatch.of(models)
    rng = np.random.default_rng(seed)
    times = np.concatenate([_probe_times(mod) for mod in models])
    n = 1000
    vm = rng.integers(0, len(models), n)
    ts = np.where(rng.random(n) < 0.5, rng.choice(times, n), rng.uniform(0.0, 2e5, n))
    assert batch.dirty(vm, ts).tolist() == [models[i].dirty(float(t)) for i, t in zip(vm, ts, strict=True)]
    pages = np.concatenate([np.array(mod.dirty_pages) for mod in models])
    ps = np.where(rng.random(n) < 0.5, rng.choice(pages, n), rng.uniform(0.0, float(pages.max()) * 1.1, n))
    got = batch.age(vm, ps)
    want = [models[i].age(float(p)) for i, p in zip(vm, ps, strict=True)]
    assert np.allclose(got, want, rtol=1e-12, atol=0.0, equal_nan=True)
