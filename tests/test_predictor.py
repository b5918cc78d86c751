"""The predictor: seed mode reproduces the 2023 script, qemu mode is pinned and obeys the properties an
operator relies on, and the shortcuts that detect non-convergence early agree with plain iteration."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migpredictd.core.measurement import DirtyPoint, Measurement, parse_measurement
from migpredictd.core.model import MemoryModel, build_model
from migpredictd.core.predictor import (
    DEFAULT_BANDWIDTHS,
    DEFAULT_DOWNTIMES,
    PAGE_HEADER_BYTES,
    ZERO_PAGE_BYTES,
    Grid,
    ModelBatch,
    PredictorSettings,
    RateLimiter,
    make_grid,
    predict_derived,
    predict_grid,
    simulate,
)
from migpredictd.core.table import render_table
from migpredictd.lab.reference import brute_force_derived, seed_cell_ms

DATA = Path(__file__).parent / "data"
SEED = PredictorSettings(mode="seed")
QEMU = PredictorSettings(mode="qemu")
MIB = float(1 << 20)


def cover_letter_model() -> MemoryModel:
    return build_model(parse_measurement(json.loads((DATA / "cover_letter_sample.json").read_text())))


def model_of(points: list[tuple[float, float]], total: int = 65536, zero: float | None = None) -> MemoryModel:
    return build_model(
        Measurement(
            page_size_bytes=4096,
            total_pages=total,
            points=tuple(DirtyPoint(p, d) for p, d in points),
            zero_pages=zero,
        )
    )


@st.composite
def models(draw: st.DrawFn) -> MemoryModel:
    """Small guests (4-512 MiB) whose dirtying ranges from idle to everything-at-once."""
    total = draw(st.sampled_from([1024, 16384, 65536, 131072]))
    n = draw(st.integers(1, 5))
    periods = sorted(
        draw(
            st.sets(
                st.sampled_from([50.0, 100.0, 125.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0]),
                min_size=n,
                max_size=n,
            )
        )
    )
    scale = draw(st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]))
    dirty = sorted(draw(st.lists(st.floats(0, total * scale, allow_nan=False), min_size=n, max_size=n)))
    zero = draw(st.one_of(st.none(), st.floats(0, total * 0.9, allow_nan=False)))
    return model_of(list(zip(periods, dirty, strict=True)), total=total, zero=zero)


BANDWIDTHS = st.floats(0.5 * MIB, 2048 * MIB, allow_nan=False)
# Below a microsecond no downtime is told apart from zero (the derived search's floor); drawing 1e-75 s
# made the seed-mode derived search run for minutes without saying anything about real limits.
DOWNTIMES = st.one_of(st.just(0.0), st.floats(1e-6, 10.0, allow_nan=False), st.just(math.inf))


def one(model: MemoryModel, bw: list[float], dt: list[float], cfg: PredictorSettings) -> np.ndarray:
    """Seconds for each (bw[i], dt[i]) cell of one VM (nan: does not converge)."""
    res = simulate(ModelBatch.of([model]), np.zeros(len(bw), dtype=np.int64), np.array(bw), np.array(dt), cfg)
    return res.seconds


# --- seed mode: the 2023 script -----------------------------------------------------------------------


def test_cover_letter_table_seed_byte_for_byte() -> None:
    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    [pred] = predict_grid([cover_letter_model()], grid, SEED, derived=False)
    assert render_table(pred, grid) == (DATA / "cover_letter_table.txt").read_text()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(models(), min_size=1, max_size=3),
    st.lists(BANDWIDTHS, min_size=1, max_size=4),
    st.lists(st.one_of(st.floats(1e-3, 10.0), st.just(math.inf)), min_size=1, max_size=4),
)
def test_seed_mode_equals_the_reference_cell_for_cell(
    ms: list[MemoryModel], bws: list[float], dts: list[float]
) -> None:
    cfg = PredictorSettings(mode="seed", deadline_seconds=600.0)
    grid = Grid(bandwidths=tuple(bws), downtimes=tuple(dts))
    preds = predict_grid(ms, grid, cfg, derived=False)
    for model, pred in zip(ms, preds, strict=True):
        for i, bw in enumerate(bws):
            for j, dt in enumerate(dts):
                want = seed_cell_ms(model, bw, dt * 1000.0, 600_000.0)
                got = pred.seconds[i, j]
                assert (None if math.isnan(got) else round(got * 1000.0)) == want


def test_seed_idle_vm_is_one_pass() -> None:
    model = model_of([(1000.0, 0.0), (5000.0, 0.0)], total=65536, zero=1000.0)
    bw = 10 * MIB
    res = simulate(
        ModelBatch.of([model]),
        np.zeros(3, dtype=np.int64),
        np.full(3, bw),
        np.array([0.0, 0.1, math.inf]),
        SEED,
    )
    pass_bytes = 64536 * (4096 + PAGE_HEADER_BYTES) + 1000 * PAGE_HEADER_BYTES
    # Every byte goes in the first pass (26 s here). If that pass fits in the downtime (unlim) it is the
    # only one; otherwise the seed runs a second, empty pass (0 pages, 0 ms <= any downtime): 2 passes.
    # Either way the time is the first pass's bytes / bandwidth, rounded up to a millisecond.
    assert res.passes.tolist() == [2, 2, 1]
    assert res.seconds.tolist() == [math.ceil(pass_bytes * 1000.0 / bw) / 1000.0] * 3
    assert res.bytes_sent.tolist() == [pass_bytes] * 3


# --- qemu mode ----------------------------------------------------------------------------------------

# The cover letter in qemu mode. Where it differs from the seed's table, and why (QEMU's rules):
# - 2 and 2.5 Gbps at 5000 ms, 5 Gbps at 125-1000 ms: sooner than the seed (1m27s vs 1m41s, 1m01s vs
#   1m07s, 44s vs 48s...). The seed needs a whole pass to fit in the downtime; QEMU only needs the
#   pages pending at a sync (pages x page size, without headers) below bandwidth x downtime, and a sync
#   happens as soon as the remaining pages drop below it.
# - 25 Gbps at 5000 ms: a second more (5s vs 4s): with the 100 ms rate-limiter windows the last pass
#   ends on a window boundary, and the stop-and-copy then sends what is pending.
# - 1 Gbps and below at every finite downtime: no convergence, as in the seed: one window dirties more
#   pages than one window sends (the barrier rule, docs/model.md).
# - unlimited downtime: the same as the seed (one pass, everything sent in the stop-and-copy).
QEMU_COVER_LETTER_TABLE = "".join(
    f"{line}\n"
    for line in [
        "Downtime> |   125ms |   250ms |   500ms |  1000ms |  5000ms |   unlim |",
        "-----------------------------------------------------------------------",
        " 100 Mbps |        - |        - |        - |        - |        - |   16m59s |  ",
        "   1 Gbps |        - |        - |        - |        - |        - |    1m40s |  ",
        "   2 Gbps |        - |        - |        - |        - |    1m27s |      50s |  ",
        " 2.5 Gbps |        - |        - |        - |        - |    1m01s |      40s |  ",
        "   5 Gbps |      44s |      34s |      28s |      26s |      25s |      20s |  ",
        "  10 Gbps |      13s |      12s |      12s |      12s |      12s |      10s |  ",
        "  25 Gbps |       5s |       5s |       5s |       5s |       5s |       4s |  ",
        "  40 Gbps |       3s |       3s |       3s |       3s |       3s |       3s |  ",
    ]
)


def test_cover_letter_table_qemu_snapshot() -> None:
    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    [pred] = predict_grid([cover_letter_model()], grid, QEMU, derived=False)
    assert render_table(pred, grid) == QEMU_COVER_LETTER_TABLE
    # unlimited downtime: one pass, all of it in the stop-and-copy; the time is the first pass's bytes
    normal, zero = 3241984, 5150720
    wire = normal * (4096 + PAGE_HEADER_BYTES) + zero * ZERO_PAGE_BYTES
    assert pred.passes[:, -1].tolist() == [1] * 8
    assert pred.seconds[0, -1] == pytest.approx(wire / (100 * MIB / 8), rel=1e-12)
    assert pred.bytes_sent[0, -1] == pytest.approx(wire, rel=1e-12)


@pytest.mark.parametrize("downtime", [0.0, 0.05, 0.3, math.inf])
def test_qemu_idle_vm_is_one_pass_plus_stop_and_copy(downtime: float) -> None:
    # Nothing dirtied: the first pass sends every page (zero pages as 9 bytes), the sync finds nothing,
    # the stop-and-copy is empty: passes == 2. Unless the whole RAM is below the threshold from the
    # start (total pages x page size < bandwidth x downtime, e.g. unlimited): then passes == 1 and it
    # all goes in the stop-and-copy. Either way, at stop_copy_speedup 1 the time is bytes / bandwidth.
    model = model_of([(1000.0, 0.0)], total=65536, zero=40000.0)
    bw = 100 * MIB
    res = simulate(
        ModelBatch.of([model]), np.zeros(1, dtype=np.int64), np.array([bw]), np.array([downtime]), QEMU
    )
    wire = (65536 - 40000) * (4096 + PAGE_HEADER_BYTES) + 40000 * ZERO_PAGE_BYTES
    below_threshold = bw * downtime > 65536 * 4096
    assert res.passes.tolist() == [1 if below_threshold else 2]
    assert res.seconds[0] == pytest.approx(wire / bw, rel=1e-12)
    assert res.bytes_sent[0] == pytest.approx(wire, rel=1e-12)
    # The first pass ends at the first window boundary with fewer than threshold pages pending: those
    # go in the stop-and-copy, which therefore stays within the limit (0 for a 0 ms limit).
    if below_threshold:
        assert res.downtime_seconds[0] == pytest.approx(wire / bw, rel=1e-12)
    else:
        assert 0.0 <= res.downtime_seconds[0] <= downtime
    if downtime == 0.0:
        assert res.downtime_seconds[0] == 0.0


def test_qemu_settings_setup_switchover_overhead() -> None:
    model = model_of([(1000.0, 0.0)], total=65536, zero=0.0)
    bw = 100 * MIB
    wire = 65536 * (4096 + PAGE_HEADER_BYTES)
    cfg = PredictorSettings(
        setup_seconds=0.5, switchover_seconds=0.02, transport_overhead=0.05, stop_copy_speedup=4.0
    )
    [t] = one(model, [bw], [math.inf], cfg)
    assert t == pytest.approx(0.5 + wire * 1.05 / bw / 4.0 + 0.02, rel=1e-12)


# --- properties, both modes ---------------------------------------------------------------------------


QEMU_DOWNTIME_SLACK = 0.03


def _slower(a: float, b: float) -> bool:
    """Is ``b`` a worse outcome than ``a`` (nan = does not converge)?"""
    if math.isnan(b):
        return not math.isnan(a)
    return not math.isnan(a) and b > a * (1 + 1e-12)


@pytest.mark.parametrize("mode", ["seed", "qemu"])
@settings(max_examples=120, deadline=None)
@given(m=models(), bw=BANDWIDTHS, k=st.floats(1.0, 8.0), dt=DOWNTIMES)
def test_more_bandwidth_never_stops_convergence(
    mode: str, m: MemoryModel, bw: float, k: float, dt: float
) -> None:
    lo, hi = one(m, [bw, bw * k], [dt, dt], PredictorSettings(mode=mode))  # type: ignore[arg-type]
    assert not _slower(lo, hi)


@pytest.mark.parametrize("mode", ["seed", "qemu"])
@settings(max_examples=120, deadline=None)
@given(m=models(), bw=BANDWIDTHS, dt=st.floats(0.0, 10.0), k=st.floats(1.0, 8.0), unlim=st.booleans())
def test_larger_downtime_never_slows_a_converging_migration(
    *, mode: str, m: MemoryModel, bw: float, dt: float, k: float, unlim: bool
) -> None:
    small, large = one(m, [bw, bw], [dt, math.inf if unlim else dt * k], PredictorSettings(mode=mode))  # type: ignore[arg-type]
    if mode == "seed":
        assert not _slower(small, large)  # seed mode: convergence and time are both monotone
        return
    # qemu mode: a larger threshold makes QEMU sync the bitmap earlier (migration_iteration_run syncs as
    # soon as pending < threshold), and pages re-dirtied after being sent are sent again, so a larger
    # limit can cost a little more time (measured: 47 of 3000 random cells above 0, worst +2.2%).
    # Convergence itself is not monotone in qemu mode (see the pinned cases below), so this checks time
    # where both converge, and an unlimited downtime, which always converges.
    if unlim:
        assert not math.isnan(large)
    if not (math.isnan(small) or math.isnan(large)):
        assert large <= small * (1 + QEMU_DOWNTIME_SLACK)


def test_qemu_convergence_is_not_monotone_in_downtime() -> None:
    """QEMU compares pending with the threshold once per rate-limiter window, so a pass that ends below
    the threshold leaves R unsent pages, R in [threshold - one window, threshold), and the next sync
    holds R plus what one window dirtied. Converging needs that below the threshold: what a window
    dirties must fit in threshold - R, which depends on where R falls in its window, not on the
    threshold's size. This 4 MiB guest at 4 MiB/s (a window: 100 pages) converges at 200 ms, where
    R >= 100 and 100 + D(100 ms) = 209 can fall below 200 pages once R is small; at 300 ms, R >= 200
    and every sync holds at least min(200 + D(100 ms), D(100 ms + age(200))) = 308 pages, above the
    300-page threshold, forever (docs/model.md, section 3)."""
    m = MemoryModel(
        page_size_bytes=4096, total_pages=1024, zero_pages=0.0,
        period_ms=(0.0, 100.0, 250.0, 500.0, 2000.0, 30000.0, 45419.512750128946, math.inf),
        dirty_pages=(78.03060066567805, 108.84836204697879, 155.0750041189299, 524.4355705282147,
                     676.8561115223537, 900.7192611000796, 1024.0, 1024.0),
        slopes=(0.0, 0.3081776138130074, 0.30817761381300746, 1.4774422656371393, 0.10161369399609263,
                0.007995112484918784, 0.007995112484918788, 0.0),
        offsets=(78.03060066567805, 78.03060066567805, 78.03060066567805, -214.28556229035493,
                 473.62872353016843, 660.8658865525161, 660.865886552516, 1024.0),
        zero_profile=None,
    )  # fmt: skip
    at_200, at_300 = one(m, [4 * MIB, 4 * MIB], [0.2, 0.3], QEMU)
    assert at_200 == pytest.approx(3.848, abs=0.001)
    assert math.isnan(at_300)
    # The derived answer does not claim 200 ms as the smallest downtime: every grid downtime at or
    # above the answer converges.
    grid = Grid(bandwidths=(4 * MIB,), downtimes=(0.2, 0.3, math.inf))
    [pred] = predict_grid([m], grid, QEMU)
    assert math.isnan(pred.seconds[0, 1])
    assert pred.min_downtime[0] > 0.3
    assert not math.isnan(one(m, [4 * MIB], [pred.min_downtime[0]], QEMU)[0])


def test_derived_downtime_settles_above_a_non_converging_grid_point() -> None:
    """The counterexample CI's hypothesis run found: a guest that dirties nothing within 50 ms converges
    at 64 MiB/s with a zero downtime (passes shorten until they dirty nothing), but not at 50 or 100 ms.
    The search used to answer 0 (the bottom converges) beside a non-converging 50 ms grid cell."""
    m = MemoryModel(
        page_size_bytes=4096, total_pages=16384, zero_pages=0.0,
        period_ms=(0.0, 50.0, 100.0, 125.0, 1000.0, 1084.664745940283, math.inf),
        dirty_pages=(0.0, 0.0, 1635.0, 1728.0, 15091.0, 16384.0, 16384.0),
        slopes=(0.0, 0.0, 32.7, 3.72, 15.272, 15.271999999999984, 0.0),
        offsets=(0.0, 0.0, -1635.0000000000002, 1263.0, -181.0, -180.99999999998363, 16384.0),
        zero_profile=None,
    )  # fmt: skip
    cfg = PredictorSettings(mode="qemu", deadline_seconds=600.0)
    zero, at_50, at_100, at_200 = one(m, [64 * MIB] * 4, [0.0, 0.05, 0.1, 0.2], cfg)
    assert not math.isnan(zero)
    assert not math.isnan(at_200)
    assert math.isnan(at_50)
    assert math.isnan(at_100)
    grid = Grid(bandwidths=(64 * MIB,), downtimes=(0.05, 0.5, math.inf))
    [pred] = predict_grid([m], grid, cfg)
    d = pred.min_downtime[0]
    assert 0.05 < d <= 0.5
    assert not math.isnan(one(m, [64 * MIB], [d], cfg)[0])
    _, want_dt = brute_force_derived(ModelBatch.of([m]), grid, cfg)
    assert pred.min_downtime[0] == want_dt[0, 0]


# Former counterexamples of qemu mode's time monotonicity (a 256 MiB guest, two points), from when the
# bound on re-counted hot pages only reset once the bitmap emptied (docs/model.md): pinned as regressions.
def test_qemu_time_is_monotone_in_downtime_former_counterexample() -> None:
    m = model_of([(100.0, 250.0), (1000.0, 500.0)])
    t100, t200 = one(m, [16 * MIB, 16 * MIB], [0.1, 0.2], QEMU)
    assert t200 <= t100


def test_qemu_time_is_monotone_in_bandwidth_former_counterexample() -> None:
    m = model_of([(100.0, 1000.0), (1000.0, 1500.0)])
    slow, fast = one(m, [64 * MIB, 64.64 * MIB], [0.1, 0.1], QEMU)
    assert fast <= slow


@pytest.mark.parametrize("mode", ["seed", "qemu"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=models())
def test_derived_answers_match_the_grid(mode: str, m: MemoryModel) -> None:
    cfg = PredictorSettings(mode=mode, deadline_seconds=600.0)  # type: ignore[arg-type]
    downtimes = (0.05, 0.5, math.inf)
    bandwidths = (4 * MIB, 64 * MIB, 1024 * MIB)
    [pred] = predict_grid([m], Grid(bandwidths=bandwidths, downtimes=downtimes), cfg)
    for j, dt in enumerate(downtimes):
        b = pred.min_bandwidth[j]
        if math.isnan(b):
            assert np.all(np.isnan(pred.seconds[:, j]))  # no grid bandwidth converges either
            continue
        if b == 0.0:  # converges at any bandwidth, the search floor (1 kB/s) included
            assert not math.isnan(one(m, [1e3], [dt], cfg)[0])
            assert not np.any(np.isnan(pred.seconds[:, j]))
            continue
        at, below = one(m, [b, 0.99 * b], [dt, dt], cfg)
        assert not math.isnan(at)
        assert math.isnan(below)
        # the grid agrees: every grid bandwidth >= b converges (convergence is not monotone
        # everywhere, so a grid bandwidth below b may converge too)
        for i, bw in enumerate(bandwidths):
            if bw >= b:
                assert not math.isnan(pred.seconds[i, j])
    for i, bw in enumerate(bandwidths):
        d = pred.min_downtime[i]
        if math.isnan(d):
            assert np.all(np.isnan(pred.seconds[i, :-1]))
            continue
        at, below = one(m, [bw, bw], [d, 0.99 * d], cfg)
        assert not math.isnan(at)
        if d > 1e-6 * 1.0001:
            assert math.isnan(below)
        for j, dt in enumerate(downtimes):
            if dt >= d:
                assert not math.isnan(pred.seconds[i, j])


# seed mode's derived answers for this hopeless guest take about 6 s (no closed-form shortcuts)
@pytest.mark.parametrize("mode", [pytest.param("seed", marks=pytest.mark.slow), "qemu"])
def test_non_convergence_is_nan_never_an_exception(mode: str) -> None:
    # 64 MiB guest rewriting all of it within 100 ms, 1 MiB/s link, 10 ms downtime: hopeless.
    m = model_of([(100.0, 16384.0)], total=16384)
    cfg = PredictorSettings(mode=mode)  # type: ignore[arg-type]
    grid = Grid(bandwidths=(MIB,), downtimes=(0.01,))
    [pred] = predict_grid([m], grid, cfg)
    assert math.isnan(pred.seconds[0, 0])
    assert math.isnan(pred.downtime_seconds[0, 0])
    assert pred.passes[0, 0] >= 1
    assert pred.bytes_sent[0, 0] > 0
    assert pred.min_bandwidth[0] > MIB
    # only a downtime that fits all 64 MiB at 1 MiB/s converges: the whole guest in the stop-and-copy
    # (seed: one 64.0156 s pass, headers included; qemu: 64 s of pending pages, headers not counted)
    assert pred.min_downtime[0] == pytest.approx(64.0 * (4104 / 4096 if mode == "seed" else 1.0), rel=1e-4)


def test_bad_arguments_raise_value_error() -> None:
    m = model_of([(100.0, 1.0)])
    batch = ModelBatch.of([m])
    vm = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="same length"):
        simulate(batch, vm, np.array([1.0, 2.0]), np.array([0.1]), QEMU)
    with pytest.raises(ValueError, match="positive"):
        simulate(batch, vm, np.array([0.0]), np.array([0.1]), QEMU)
    with pytest.raises(ValueError, match="non-negative"):
        simulate(batch, vm, np.array([1.0]), np.array([-0.1]), QEMU)
    with pytest.raises(ValueError, match="mode"):
        PredictorSettings(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_syncs"):
        PredictorSettings(max_syncs=1)
    with pytest.raises(ValueError, match="grid"):
        Grid(bandwidths=(), downtimes=(0.1,))
    with pytest.raises(ValueError, match="no models"):
        ModelBatch.of([])


# --- the shortcuts agree with plain iteration ---------------------------------------------------------


def plain_qemu(model: MemoryModel, bw: float, dt: float, cfg: PredictorSettings) -> tuple[float, int]:
    """qemu mode re-stated one cell and one sync at a time, without the barrier and emptied shortcuts:
    it iterates until the migration converges, the deadline passes or max_syncs is reached."""
    page = float(model.page_size_bytes)
    nw = page + PAGE_HEADER_BYTES
    rate = bw / (1.0 + cfg.transport_overhead)
    threshold = math.inf if math.isinf(dt) else rate * dt / page
    step = rate * cfg.iteration_seconds
    total, zero = float(model.total_pages), model.zero_pages
    cw = ((total - zero) * nw + zero * ZERO_PAGE_BYTES) / total
    cold, hot = total, 0.0
    elapsed = cfg.setup_seconds
    syncs = 0
    while True:
        pending = cold + hot
        wire = cold * cw + hot * nw
        if pending < threshold or pending < 1.0:
            return elapsed + wire / (rate * cfg.stop_copy_speedup) + cfg.switchover_seconds, syncs + 1
        excess = pending - threshold
        cold_part = min(excess, cold)
        needed = cold_part * cw + (excess - cold_part) * nw
        pass_bytes = min((math.floor(needed / step) + 1.0) * step, wire)
        pass_s = pass_bytes / rate
        cold_sent = min(cold, pass_bytes / cw)
        hot_left = hot - min(hot, (pass_bytes - cold_sent * cw) / nw)
        cold -= cold_sent
        pass_ms = pass_s * 1000.0
        hot = min(hot_left + model.dirty(pass_ms), model.dirty(pass_ms + model.age(hot_left)), total - cold)
        elapsed += pass_s
        syncs += 1
        if elapsed > cfg.deadline_seconds * (1.0 + 1e-9) or syncs >= cfg.max_syncs:
            return math.nan, syncs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=models(),
    bws=st.lists(BANDWIDTHS, min_size=1, max_size=4),
    dts=st.lists(DOWNTIMES, min_size=1, max_size=4),
)
def test_qemu_shortcuts_match_plain_iteration(m: MemoryModel, bws: list[float], dts: list[float]) -> None:
    cfg = PredictorSettings(mode="qemu", deadline_seconds=600.0, max_syncs=500)
    [pred] = predict_grid([m], Grid(bandwidths=tuple(bws), downtimes=tuple(dts)), cfg, derived=False)
    for i, bw in enumerate(bws):
        for j, dt in enumerate(dts):
            want, syncs = plain_qemu(m, bw, dt, cfg)
            got = pred.seconds[i, j]
            if math.isnan(want):
                assert math.isnan(got)
            else:
                assert got == pytest.approx(want, rel=1e-9)
                assert pred.passes[i, j] == syncs


def test_qemu_shortcuts_answer_early_on_the_cover_letter() -> None:
    # Non-converging cells stop at the barrier / emptied rule, long before max_syncs (2000).
    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    [pred] = predict_grid([cover_letter_model()], grid, QEMU, derived=False)
    stuck = np.isnan(pred.seconds)
    assert stuck.sum() == 18  # 100 Mbps to 2.5 Gbps at every finite downtime but 5000 ms at 2 and 2.5 Gbps
    assert pred.passes[stuck].max() < 20
    for i, bw in enumerate(grid.bandwidths):
        for j, dt in enumerate(grid.downtimes):
            if stuck[i, j]:
                assert math.isnan(plain_qemu(cover_letter_model(), bw, dt, QEMU)[0])


# --- the derived answers agree with the brute-force oracle ----------------------------------------

# One step of the oracle's lattice: its answers are exp(log(low) + k x step), bandwidths over
# [1 kB/s, 10 TB/s] in 2**20 steps (the widest of the two searches, relative 2.2e-5).
LATTICE_STEP = math.expm1(math.log(1e13 / 1e3) / 2**20)


def assert_same_answers(got: np.ndarray, want: np.ndarray) -> None:
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got == 0.0, want == 0.0)
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=LATTICE_STEP)


# Usually 2-12 s per mode, depending on the guests drawn; a seed-mode draw with a near-zero downtime
# can take minutes (its derived answers alone: 101 s for one such guest).
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["seed", "qemu"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=models(),
    bws=st.lists(BANDWIDTHS, min_size=1, max_size=3, unique=True),
    dts=st.lists(DOWNTIMES, min_size=1, max_size=3, unique=True),
)
def test_derived_answers_equal_the_brute_force_oracle(
    mode: str, m: MemoryModel, bws: list[float], dts: list[float]
) -> None:
    cfg = PredictorSettings(mode=mode, deadline_seconds=600.0, max_syncs=500)  # type: ignore[arg-type]
    grid = Grid(bandwidths=tuple(bws), downtimes=tuple(dts))
    [pred] = predict_grid([m], grid, cfg)
    want_bw, want_dt = brute_force_derived(ModelBatch.of([m]), grid, cfg)
    assert_same_answers(pred.min_bandwidth, want_bw[0])
    assert_same_answers(pred.min_downtime, want_dt[0])


def test_derived_answers_equal_the_oracle_on_a_fleet() -> None:
    # The cover letter's VM and the benchmark's scaled copies of it, at the default settings
    # (max_syncs 2000, a one-hour deadline), where cells near the boundary creep for hundreds of syncs.
    from benchmarks.predict import fleet

    models_ = [
        build_model(
            parse_measurement(json.loads((DATA / "cover_letter_sample.json").read_text())), mode="qemu"
        )
    ]
    models_ += fleet(12)
    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    preds = predict_grid(models_, grid, QEMU)
    want_bw, want_dt = brute_force_derived(ModelBatch.of(models_), grid, QEMU)
    assert_same_answers(np.array([p.min_bandwidth for p in preds]), want_bw)
    assert_same_answers(np.array([p.min_downtime for p in preds]), want_dt)


def test_creeping_cells_are_skipped_not_iterated() -> None:
    # Just above its smallest converging bandwidth at 125 ms, the cover letter's VM converges after
    # hundreds of syncs that each shrink pending by a few pages; the closed form takes them at once
    # and lands on the same answer as plain iteration.
    m = build_model(
        parse_measurement(json.loads((DATA / "cover_letter_sample.json").read_text())), mode="qemu"
    )
    batch, vm = ModelBatch.of([m]), np.zeros(1, dtype=np.int64)
    bw, dt = np.array([6.615e8]), np.array([0.125])
    fast = simulate(batch, vm, bw, dt, QEMU)
    slow = simulate(batch, vm, bw, dt, QEMU, shortcut=False)
    assert slow.passes[0] > 500
    assert fast.passes[0] == slow.passes[0]
    assert fast.seconds[0] == pytest.approx(slow.seconds[0], rel=1e-12)
    assert fast.seconds[0] == pytest.approx(plain_qemu(m, 6.615e8, 0.125, QEMU)[0], rel=1e-9)


@pytest.mark.parametrize("downtime", [0.125, 1.0, 5.0])
def test_constant_rate_guest_near_its_boundary_takes_levels_at_once(downtime: float) -> None:
    # A guest that rewrites RAM at a constant 20 MiB/s (one measured point: a line through the origin)
    # on a link barely faster: hundreds of hot-only syncs, on many levels of whole windows, each level
    # several syncs long. The shortcut takes them level by level and lands where plain iteration does.
    m = build_model(
        Measurement(page_size_bytes=4096, total_pages=131072, points=(DirtyPoint(50.0, 256.0),)), mode="qemu"
    )
    assert len(m.period_ms) == 3  # 0, saturation, inf: the measured point is on the line
    batch, vm = ModelBatch.of([m]), np.zeros(1, dtype=np.int64)
    for bw in (21.1e6, 21.2e6, 21.5e6, 22.0e6):
        fast = simulate(batch, vm, np.array([bw]), np.array([downtime]), QEMU)
        slow = simulate(batch, vm, np.array([bw]), np.array([downtime]), QEMU, shortcut=False)
        assert slow.passes[0] > 100
        assert fast.passes[0] == slow.passes[0]
        assert fast.seconds[0] == pytest.approx(slow.seconds[0], rel=1e-9, nan_ok=True)
        want, syncs = plain_qemu(m, bw, downtime, QEMU)
        assert fast.seconds[0] == pytest.approx(want, rel=1e-9, nan_ok=True)
        assert fast.passes[0] == syncs


def _idle(total: int, zero: float, profile: tuple[float, ...] | None, allocated: float = 0.0) -> MemoryModel:
    return build_model(
        Measurement(page_size_bytes=4096, total_pages=total, points=(DirtyPoint(1000.0, 0.0),),
                    zero_pages=zero, zero_profile=profile, zero_allocated_pages=allocated)
    )  # fmt: skip


def _seconds(m: MemoryModel, limiter: RateLimiter, bw: float) -> tuple[float, float]:
    res = simulate(ModelBatch.of([m], [limiter]), np.zeros(1, dtype=np.int64), np.array([bw]),
                   np.array([0.3]), QEMU)  # fmt: skip
    return float(res.seconds[0]), float(res.bytes_sent[0])


def test_zero_pages_set_the_pace_only_where_reading_them_outlasts_their_bytes() -> None:
    """A stretch of RAM takes the longer of its bytes at the limit and the migration thread's reading of
    its zero pages (qemu mode, RateLimiter.zero_scan_seconds): the bytes sent never change."""
    total, zero = 1 << 24, float((1 << 24) - (1 << 18))  # 64 GiB, all but 1 GiB zero
    bw, per_page = 125e6, 0.25e-6  # reading a zero page outlasts its 9 bytes at 125 MB/s (0.072 us)
    scan = RateLimiter(zero_scan_seconds=per_page)
    # Zero pages in slices of their own (the last 1/64 holds the 1 GiB of data): each zero slice takes
    # its reading, beyond its bytes by (0.25 us - 9 B / bw) per zero page.
    clustered = _idle(total, zero, (1.0,) * 63 + (0.0,))
    (free, sent_free), (slow, sent_slow) = (_seconds(clustered, r, bw) for r in (RateLimiter(), scan))
    assert sent_slow == sent_free
    # (less one window's worth: the last window of zero pages shares its time with the first data)
    window = 0.1
    assert zero * (per_page - ZERO_PAGE_BYTES / bw) - window <= slow - free
    assert slow - free <= zero * (per_page - ZERO_PAGE_BYTES / bw)
    # Spread evenly among the data, the same zero pages are read while the thread waits for the limiter.
    even = _idle(total, zero, None)
    assert _seconds(even, scan, bw)[0] == pytest.approx(_seconds(even, RateLimiter(), bw)[0], rel=1e-12)
    # At a bandwidth where 9 bytes take longer than the reading, zero pages never set the pace.
    assert _seconds(clustered, scan, 20e6)[0] == pytest.approx(_seconds(clustered, RateLimiter(), 20e6)[0])


def test_zero_pages_between_data_are_read_in_the_windows_the_data_waits_in() -> None:
    """A rate-limiter window pools its bytes and its reading: 64 MiB of zero pages (4 ms of reading)
    between slices of data several windows long cost nothing, where a slice-by-slice maximum would
    charge each its reading beyond its 9-byte markers."""
    total = 1 << 20  # 4 GiB in 64 slices of 64 MiB, zero and data alternating
    m = _idle(total, float(total // 2), (1.0, 0.0) * 32)
    bw, per_page = 125e6, 0.25e-6
    free = _seconds(m, RateLimiter(), bw)[0]
    scanning = _seconds(m, RateLimiter(zero_scan_seconds=per_page), bw)[0]
    slice_by_slice = total / 2 * (per_page - ZERO_PAGE_BYTES / bw)  # 0.093 s
    assert scanning - free < 0.05 * slice_by_slice


def test_allocated_zero_pages_are_read_at_their_own_cost() -> None:
    """The allocated share of the zero pages (Measurement.zero_allocated_pages) is read at
    RateLimiter.allocated_zero_scan_seconds, the rest at zero_scan_seconds."""
    total, zero = 1 << 24, float((1 << 24) - (1 << 18))
    bw = 125e6
    scan = RateLimiter(zero_scan_seconds=0.13e-6, allocated_zero_scan_seconds=0.31e-6)
    profile = (1.0,) * 63 + (0.0,)
    base = _seconds(_idle(total, zero, profile), RateLimiter(), bw)[0]
    quarter = _seconds(_idle(total, zero, profile, allocated=zero / 4), scan, bw)[0]
    per_zero = 0.75 * 0.13e-6 + 0.25 * 0.31e-6
    assert quarter - base == pytest.approx(zero * (per_zero - ZERO_PAGE_BYTES / bw), abs=0.1)  # one window


@pytest.mark.parametrize("mode", ["seed", "qemu"])
def test_derived_answers_reuse_the_grid_exactly(mode: str) -> None:
    """Given the grid predict_grid computed, predict_derived skips simulating it again for the settling
    step and returns the very same answers (60 random guests)."""
    rng = np.random.default_rng(3)
    ms = []
    for _ in range(60):
        periods = sorted({float(t) for t in rng.choice([50, 125, 500, 1000, 4000], 3)})
        pages = sorted(float(rng.uniform(0, 16384)) for _ in periods)
        ms.append(
            model_of(list(zip(periods, pages, strict=True)), total=16384, zero=float(rng.uniform(0, 8000)))
        )
    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    cfg = PredictorSettings(mode=mode, deadline_seconds=600.0)  # type: ignore[arg-type]
    preds = predict_grid(ms, grid, cfg, derived=False)
    reused = predict_derived(ms, grid, cfg, grid_seconds=[p.seconds for p in preds])
    fresh = predict_derived(ms, grid, cfg)
    np.testing.assert_array_equal(reused[0], fresh[0])
    np.testing.assert_array_equal(reused[1], fresh[1])


@pytest.mark.parametrize("deadline", [3600.0, 30.0, 0.5])
def test_seed_grid_by_bandwidth_lanes_equals_every_cell_alone(deadline: float) -> None:
    """predict_grid's seed mode simulates each (VM, bandwidth) once for all downtimes: every cell's
    seconds, passes, bytes and downtime equal simulate()'s, cell by cell, bit for bit (nan where both
    are nan), on the golden CLI inputs (varied shapes) and 200 scaled cover-letter VMs, with a grid
    whose downtimes include 0 and unlimited."""
    from benchmarks.predict import inputs
    from migpredictd.core.predictor import _simulate_seed_grid

    docs = [json.loads(line) for line in (DATA / "cli_golden_input.jsonl").read_text().splitlines()]
    models = [build_model(parse_measurement(d), mode="seed") for d in [*docs, *inputs(200)]]
    grid = make_grid(
        ["1MB/s", "100Mbps", "1Gbps", "2.5Gbps", "10Gbps", "40Gbps"], ["0", "5ms", "125ms", "1s", "unlim"]
    )
    s = PredictorSettings(mode="seed", deadline_seconds=deadline)
    batch = ModelBatch.of(models, first_pass=False)
    nv, nb, nd = len(models), len(grid.bandwidths), len(grid.downtimes)
    vm = np.repeat(np.arange(nv), nb * nd)
    bw = np.tile(np.repeat(np.array(grid.bandwidths), nd), nv)
    dt = np.tile(np.array(grid.downtimes), nv * nb)
    want = simulate(batch, vm, bw, dt, s)
    got = _simulate_seed_grid(batch, np.array(grid.bandwidths), np.array(grid.downtimes), s)
    for field in ("seconds", "passes", "bytes_sent", "downtime_seconds"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert got.passes.dtype == want.passes.dtype
    # the cases cover converging, never converging and creeping cells
    assert 0 < np.count_nonzero(got.converges) < got.seconds.size


def test_cells_whose_reading_never_outlasts_a_window_skip_it_with_the_same_answers() -> None:
    """A cell whose stream rate times the VM's most reading per byte is at most 1 reads every zero page
    while it waits for the limiter: it skips the reading (and may take the closed-form shortcuts), with
    the same answers as computing it, on 60 random profiled guests over the default grid."""
    rng = np.random.default_rng(11)
    ms = []
    for _ in range(60):
        total = int(rng.choice([1 << 18, 1 << 20, 1 << 22]))
        profile = tuple(float(x) for x in rng.choice([0.0, 0.5, 0.97, 1.0], 64))
        zero = float(np.mean(profile)) * total
        rate = float(rng.uniform(1e-4, 0.05)) * total
        points = tuple(DirtyPoint(p, min(rate * p / 1000.0, total - zero)) for p in (250.0, 1000.0, 4000.0))
        ms.append(build_model(Measurement(page_size_bytes=4096, total_pages=total, points=points,
                                          zero_pages=zero, zero_profile=profile,
                                          zero_allocated_pages=zero * float(rng.uniform(0, 1)))))  # fmt: skip
    limiter = RateLimiter(zero_scan_seconds=0.15e-6, allocated_zero_scan_seconds=0.37e-6)
    batch = ModelBatch.of(ms, [limiter] * len(ms))
    always = dataclasses.replace(batch, scan_peak=np.full(len(ms), np.inf))
    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    vm = np.repeat(np.arange(len(ms)), len(grid.bandwidths) * len(grid.downtimes))
    bw = np.tile(np.repeat(np.array(grid.bandwidths), len(grid.downtimes)), len(ms))
    dt = np.tile(np.array(grid.downtimes), len(ms) * len(grid.bandwidths))
    fast, slow = (simulate(b, vm, bw, dt, QEMU) for b in (batch, always))
    assert np.any(batch.scan_peak[vm] * bw > 1.0)  # some cells do read beyond their bytes
    assert np.any(batch.scan_peak[vm] * bw <= 1.0)
    np.testing.assert_allclose(fast.seconds, slow.seconds, rtol=1e-9)
    np.testing.assert_array_equal(fast.passes, slow.passes)


# --- the row search behind every model lookup ----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=40), min_size=1, max_size=6),
    st.integers(1, 600),
    st.integers(0, 2**32 - 1),
)
def test_count_below_equals_a_plain_count(rows: list[list[float]], n: int, seed: int) -> None:
    """_count_below (row copies for a few values, a bisection for many) counts what a comparison of
    the whole row counts: duplicates, values equal to an entry, below every entry, above, inf, nan."""
    from migpredictd.core.predictor import _count_below, _rank_table

    width = max(len(r) for r in rows)
    table = np.array([sorted(r) + [math.inf] * (width - len(r)) for r in rows])
    rng = np.random.default_rng(seed)
    vm = rng.integers(0, len(rows), n)
    entries = table[np.isfinite(table)]
    special = np.array([math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 2e6])
    values = np.where(
        rng.random(n) < 0.4,
        rng.choice(entries, n),
        np.where(rng.random(n) < 0.2, rng.choice(special, n), rng.uniform(-10.0, 1.1e6, n)),
    )
    want = np.count_nonzero(table[vm] < values[:, None], axis=1)
    assert _count_below(_rank_table(table), vm, values).tolist() == want.tolist()
