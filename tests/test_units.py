"""Units: what people type parses to the numbers the seed used, and nothing else escapes as an exception."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migpredictd.core.errors import InputError, UnitError
from migpredictd.core.units import (
    format_bandwidth,
    format_downtime,
    format_eta,
    parse_bandwidth,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1Gbps", 2**30 / 8),
        ("1 Gbps", 2**30 / 8),
        ("100Mbps", 100 * 2**20 / 8),
        ("2.5Gbps", 2.5 * 2**30 / 8),
        ("10 gbit/s", 10 * 2**30 / 8),
        ("8bps", 1.0),
        ("1MiB/s", 2**20),
        ("1MB/s", 10**6),
        ("1.5 GiB/s", 1.5 * 2**30),
        ("125000000", 125000000.0),  # bare number: bytes/s
        ("125000000 B/s", 125000000.0),
        ("1e9", 1e9),
    ],
)
def test_parse_bandwidth(text: str, expected: float) -> None:
    assert parse_bandwidth(text) == expected


def test_parse_bandwidth_accepts_numbers_as_bytes_per_second() -> None:
    assert parse_bandwidth(1000) == 1000.0
    assert parse_bandwidth(2.5) == 2.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", 0.5),
        ("125 ms", 0.125),
        ("5s", 5.0),
        ("2m", 120.0),
        ("2min", 120.0),
        ("1h", 3600.0),
        ("250us", 250e-6),
        ("250", 0.25),  # bare number: milliseconds, QEMU's downtime-limit unit
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected, rel=1e-15)


def test_parse_duration_default_unit_and_numbers() -> None:
    assert parse_duration("5", default_unit="s") == 5.0
    assert parse_duration(250) == 0.25
    assert parse_duration(3, default_unit="s") == 3.0


@pytest.mark.parametrize("text", ["unlim", "UNLIMITED", " inf ", "none"])
def test_unlimited_duration(text: str) -> None:
    assert parse_duration(text, allow_unlimited=True) == math.inf
    with pytest.raises(UnitError, match="unlimited duration is not allowed"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("4096", 4096),
        ("1.5k", 1536),
        (4096, 4096),
        ("1GB", 10**9),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("fn", "text", "needle"),
    [
        (parse_bandwidth, "", "is not a bandwidth"),
        (parse_bandwidth, "fast", "is not a bandwidth"),
        (parse_bandwidth, "10 Xbps", "unknown bandwidth unit 'xbps'"),
        (parse_bandwidth, "-5Gbps", "is not a bandwidth"),
        (parse_bandwidth, "0Gbps", "must be positive"),
        (parse_bandwidth, "1e999", "not a finite bandwidth"),
        (parse_bandwidth, "1e300Tbps", "must be positive"),
        (parse_bandwidth, "nan", "is not a bandwidth"),
        (parse_bandwidth, "10ms", "unknown bandwidth unit 'ms'"),
        (parse_duration, "soon", "is not a duration"),
        (parse_duration, "10 parsecs", "unknown duration unit 'parsecs'"),
        (parse_duration, "-1s", "is not a duration"),
        (parse_duration, "1e308h", "non-negative number"),
        (parse_duration, "10Gbps", "unknown duration unit 'gbps'"),
        (parse_size, "lots", "is not a size"),
        (parse_size, "3 parsecs", "unknown size unit 'parsecs'"),
        (parse_size, "1e300TiB", "not a finite size"),
        (parse_size, -1, "non-negative"),
    ],
)
def test_bad_input_raises_unit_error_quoting_the_text(fn: object, text: str, needle: str) -> None:
    assert callable(fn)
    with pytest.raises(UnitError, match=needle) as info:
        fn(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, InputError)  # the CLI turns every InputError into one stderr line


@pytest.mark.parametrize(
    ("bps", "text", "spaced"),
    [
        (2**30 / 8, "1Gbps", "1 Gbps"),
        (100 * 2**20 / 8, "100Mbps", "100 Mbps"),
        (2.5 * 2**30 / 8, "2.5Gbps", "2.5 Gbps"),
        (40 * 2**30 / 8, "40Gbps", "40 Gbps"),
        (1.0, "8bps", "8 bps"),
        (2**40 / 8, "1Tbps", "1 Tbps"),
    ],
)
def test_format_bandwidth(bps: float, text: str, spaced: str) -> None:
    assert format_bandwidth(bps) == text
    assert format_bandwidth(bps, space=True) == spaced
    assert parse_bandwidth(text) == bps


def test_format_downtime_and_eta() -> None:
    assert format_downtime(0.125) == "125ms"
    assert format_downtime(5.0) == "5000ms"
    assert format_downtime(math.inf) == "unlim"
    assert format_eta(math.nan) == "-"
    assert format_eta(47.2) == "48s"  # rounds up, like the seed
    assert format_eta(1019.0) == "16m59s"
    assert format_eta(67.0) == "1m07s"
    assert format_eta(0.0) == "0s"


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1.0, max_value=1e15, allow_nan=False))
def test_bandwidth_round_trip(bps: float) -> None:
    # Formatting keeps 6 significant digits, so a round trip is exact to that precision.
    assert parse_bandwidth(format_bandwidth(bps)) == pytest.approx(bps, rel=1e-5)
    assert parse_bandwidth(format_bandwidth(bps, space=True)) == pytest.approx(bps, rel=1e-5)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.0, max_value=1e9, allow_nan=False))
def test_downtime_round_trip(seconds: float) -> None:
    assert parse_duration(format_downtime(seconds)) == pytest.approx(seconds, rel=1e-5, abs=1e-12)


_UNITISH = st.sampled_from(
    ["", "ms", "s", "Gbps", "MiB/s", "unlim", "k", "e", "e5", " ", ".", "-", "/s", "inf"]
)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.text(max_size=20), st.builds(lambda a, b, c: a + b + c, st.text(max_size=5), _UNITISH, _UNITISH)
    )
)
def test_parsers_raise_only_unit_error(text: str) -> None:
    for parse in (
        parse_bandwidth,
        parse_duration,
        lambda t: parse_duration(t, allow_unlimited=True),
        lambda t: parse_duration(t, default_unit="s"),
        parse_size,
    ):
        with contextlib.suppress(UnitError):
            parse(text)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_parsers_given_floats_raise_only_unit_error(value: float) -> None:
    for parse in (parse_bandwidth, parse_duration):
        try:
            result = parse(value)
        except UnitError:
            continue
        assert math.isfinite(result)
        assert result >= 0
