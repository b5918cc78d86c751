"""Where the zero pages lie: QEMU sends the first pass in address order, so the profile of zero pages
along guest RAM decides how much of the first pass is throttled and how much is left for the
unthrottled stop-and-copy. The measurement carries it (canonical JSON), the predictor uses it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from migpredictd.core.errors import InputError
from migpredictd.core.measurement import DirtyPoint, Measurement, parse_measurement
from migpredictd.core.model import build_model
from migpredictd.core.predictor import (
    PAGE_HEADER_BYTES,
    ZERO_PAGE_BYTES,
    ModelBatch,
    PredictorSettings,
    simulate,
)

TOTAL = 65536  # 256 MiB
HALF = TOTAL // 2
NORMAL = 4096 + PAGE_HEADER_BYTES
BW = HALF * NORMAL / 10.0  # the non-zero half takes 10 s at this bandwidth
SPEEDUP = 100.0
WINDOW_S = 0.1


def idle_guest(profile: tuple[float, ...] | None) -> Measurement:
    return Measurement(
        page_size_bytes=4096,
        total_pages=TOTAL,
        points=(DirtyPoint(1000.0, 0.0),),
        zero_pages=float(HALF),
        zero_pages_method="guest-sample",
        zero_profile=profile,
    )


def seconds(profile: tuple[float, ...] | None, downtime_s: float) -> float:
    model = build_model(idle_guest(profile), mode="qemu")
    settings = PredictorSettings(mode="qemu", stop_copy_speedup=SPEEDUP)
    res = simulate(
        ModelBatch.of([model]), np.zeros(1, dtype=np.int64), np.array([BW]), np.array([downtime_s]), settings
    )
    return float(res.seconds[0])


def test_an_even_profile_is_the_same_as_none() -> None:
    for downtime in (0.0, 0.3, 5.0, math.inf):
        assert seconds((0.5,) * 64, downtime) == pytest.approx(seconds(None, downtime), rel=1e-12)


def test_zero_pages_at_the_end_keep_the_whole_non_zero_half_throttled() -> None:
    # Threshold = a quarter of RAM. Zeros at the end: all 32768 non-zero pages go out throttled, then
    # zero pages (9 bytes) until fewer than 16384 are pending; the stop-and-copy holds only zeros.
    downtime = (TOTAL / 4) * 4096 / BW
    zeros_last = seconds((0.0, 1.0), downtime)
    assert zeros_last == pytest.approx(10.0, abs=WINDOW_S)
    # Zeros first: they go out almost at once, and the last 16384 non-zero pages are left for the
    # stop-and-copy at SPEEDUP x the bandwidth.
    zeros_first = seconds((1.0, 0.0), downtime)
    throttled = (HALF * ZERO_PAGE_BYTES + (HALF - TOTAL / 4) * NORMAL) / BW
    assert zeros_first == pytest.approx(throttled + (TOTAL / 4) * NORMAL / (SPEEDUP * BW), abs=WINDOW_S)
    # Evenly spread: in between, and both differ from it by far more than a window.
    even = seconds(None, downtime)
    assert zeros_first + 1.0 < even < zeros_last - 1.0


def test_profile_does_not_matter_without_a_downtime_budget() -> None:
    # A zero-second limit: nothing is left for the stop-and-copy, every page goes out throttled.
    expected = (HALF * NORMAL + HALF * ZERO_PAGE_BYTES) / BW
    for profile in ((0.0, 1.0), (1.0, 0.0), None):
        assert seconds(profile, 0.0) == pytest.approx(expected, abs=WINDOW_S)


def test_profile_round_trips_through_the_canonical_json() -> None:
    m = idle_guest((0.25, 0.75))
    doc = m.to_json_dict()
    assert doc["zero_profile"] == [0.25, 0.75]
    assert parse_measurement(doc) == m
    assert "zero_profile" not in idle_guest(None).to_json_dict()


@pytest.mark.parametrize(
    ("profile", "field"),
    [
        ([0.5, 1.5], "zero_profile[1]"),
        ([0.5, -0.1], "zero_profile[1]"),
        ([0.5, "x"], "zero_profile[1]"),
        ([], "zero_profile"),
        ("0.5", "zero_profile"),
    ],
)
def test_bad_profiles_name_the_field(profile: object, field: str) -> None:
    doc = idle_guest(None).to_json_dict()
    doc["zero_profile"] = profile
    with pytest.raises(InputError) as info:
        parse_measurement(doc)
    assert info.value.field == field


def test_a_profile_needs_a_zero_page_count() -> None:
    with pytest.raises(InputError) as info:
        Measurement(page_size_bytes=4096, total_pages=8, points=(DirtyPoint(1.0, 0.0),), zero_profile=(1.0,))
    assert info.value.field == "zero_profile"
