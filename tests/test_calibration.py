"""The calibrated QEMU behaviour: which rate limiter a QEMU version gets, and what it does to a
prediction (the per-VM limiter of a batch must change only that VM's cells)."""

from __future__ import annotations

import numpy as np
import pytest

from migpredictd.core.calibration import EXACT, FLUSH_COUNTING, rate_limiter_for
from migpredictd.core.measurement import DirtyPoint, Measurement
from migpredictd.core.model import build_model
from migpredictd.core.predictor import Grid, PredictorSettings, RateLimiter, predict_grid
from migpredictd.lab.loopback import LOOPBACK_LINK_BYTES_PER_SECOND, loopback_predictor

MBIT = 125_000.0


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("7.2.22", EXACT),
        ("7.2", EXACT),
        ("8.0.5", EXACT),
        ("8.1.0", FLUSH_COUNTING),
        ("9.2.4", FLUSH_COUNTING),
        ("10.0.2", FLUSH_COUNTING),
        ("11", FLUSH_COUNTING),
        ("9.2.0-rc1", FLUSH_COUNTING),
        ("8.0.90", EXACT),
        (None, EXACT),
        ("", EXACT),
        ("v10.0", EXACT),  # unparsable: exact, i.e. the prediction errs long, never short
    ],
)
def test_rate_limiter_by_qemu_version(version: str | None, expected: RateLimiter) -> None:
    limiter = rate_limiter_for(version)
    assert limiter.excess_fraction == expected.excess_fraction
    assert limiter.excess_cap_bytes_per_second == expected.excess_cap_bytes_per_second


def test_flush_counting_limiter_is_a_fraction_at_low_limits_and_a_cap_at_high_ones() -> None:
    # 100 Mbit/s: 5% of 12.5 MB/s; 1 Gbit/s: the 1.085 MB/s cap, 0.87% of 125 MB/s.
    assert FLUSH_COUNTING.stream_rate(100 * MBIT) == pytest.approx(100 * MBIT * 1.05)
    assert FLUSH_COUNTING.stream_rate(1000 * MBIT) == pytest.approx(1000 * MBIT + 1.085e6)
    assert EXACT.stream_rate(1000 * MBIT) == 1000 * MBIT


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_rate_limiter_rejects_impossible_values(bad: float) -> None:
    with pytest.raises(ValueError, match="excess_fraction"):
        RateLimiter(excess_fraction=bad)
    with pytest.raises(ValueError, match="excess_cap"):
        RateLimiter(excess_cap_bytes_per_second=bad)


def idle_guest() -> Measurement:
    # 256 MiB, 16384 pages never dirtied, the rest zero: one pass of 16384 x 4104 bytes.
    return Measurement(
        page_size_bytes=4096, total_pages=65536, zero_pages=49152.0, points=(DirtyPoint(1000.0, 0.0),)
    )


def test_limiter_speeds_up_only_its_own_vm_in_a_batch() -> None:
    grid = Grid(bandwidths=(100 * MBIT, 1000 * MBIT), downtimes=(0.3,))
    models = [build_model(idle_guest(), mode="qemu")] * 2
    settings = PredictorSettings(mode="qemu")
    exact, flush = predict_grid(models, grid, settings, limiters=[EXACT, FLUSH_COUNTING], derived=False)
    first_pass = 16384 * 4104 + 49152 * 9  # bytes: every normal page with its header, zero pages as 9
    np.testing.assert_allclose(exact.seconds[:, 0], [first_pass / (100 * MBIT), first_pass / (1000 * MBIT)])
    np.testing.assert_allclose(
        flush.seconds[:, 0],
        [first_pass / (100 * MBIT * 1.05), first_pass / (1000 * MBIT + 1.085e6)],
    )
    # Without limiters every VM is exact: the same numbers as the exact one above.
    default, _ = predict_grid(models, grid, settings, derived=False)
    np.testing.assert_array_equal(default.seconds, exact.seconds)


def test_limiters_must_match_models() -> None:
    grid = Grid(bandwidths=(100 * MBIT,), downtimes=(0.3,))
    with pytest.raises(ValueError, match="one rate limiter per model"):
        predict_grid([build_model(idle_guest())], grid, PredictorSettings(), limiters=[EXACT, EXACT])


def test_loopback_stop_and_copy_runs_at_the_link_rate_whatever_the_limiter() -> None:
    for limiter in (EXACT, FLUSH_COUNTING):
        settings = loopback_predictor(100 * MBIT, limiter)
        stream = limiter.stream_rate(100 * MBIT)
        assert stream * settings.stop_copy_speedup == pytest.approx(LOOPBACK_LINK_BYTES_PER_SECOND)
    # A limit above the link: the link throttles both phases, no speed-up.
    assert loopback_predictor(2 * LOOPBACK_LINK_BYTES_PER_SECOND, EXACT).stop_copy_speedup == 1.0
