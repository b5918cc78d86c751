"""Measurement readers: every accepted format gives the right points, and every bad input an InputError
naming the field (and nothing else ever escapes, whatever JSON arrives)."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migpredictd.core.errors import InputError
from migpredictd.core.measurement import (
    FORMAT,
    MIB,
    DirtyPoint,
    Measurement,
    isotonic_increasing,
    measurement_from_sweep,
    parse_measurement,
)

DATA = Path(__file__).parent / "data"


def cover_letter() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "cover_letter_sample.json").read_text())
    return data


def canonical() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "target": "vm1",
        "page_size_bytes": 4096,
        "total_pages": 131072,
        "zero_pages": 107000,
        "zero_pages_method": "host-smaps",
        "points": [{"period_ms": 250.0, "dirty_pages": 1234.0}, {"period_ms": 1000.0, "dirty_pages": 4000.0}],
        "strategy": "sweep-ms",
        "sample_pages_per_gib": 4096,
        "qemu_version": "10.0.2",
        "measured_at": 1764090000.0,
        "duration_seconds": 7.4,
        "notes": ["a note"],
    }


def sweep() -> dict[str, Any]:
    return {
        "memory_bytes": 256 * MIB,
        "page_size_bytes": 4096,
        "zero_pages": None,
        "target": "vm2",
        "runs": [
            {"calc-time": 1, "dirty-rate": 10, "status": "measured"},
            {"calc-time": 250, "calc-time-unit": "millisecond", "dirty-rate": 20, "status": "measured"},
            {"calc-time": 250, "calc-time-unit": "millisecond", "dirty-rate": 30, "status": "measured"},
            {"calc-time": 2, "calc-time-unit": "second", "dirty-rate": 3, "status": "measured"},
        ],
    }


# --- the formats --------------------------------------------------------------------------------------


def test_canonical_round_trip() -> None:
    doc = canonical()
    m = parse_measurement(doc)
    assert m.points == (DirtyPoint(250.0, 1234.0), DirtyPoint(1000.0, 4000.0))
    assert (m.page_size_bytes, m.total_pages, m.zero_pages) == (4096, 131072, 107000.0)
    assert m.memory_bytes == 512 * MIB
    assert m.to_json_dict() == doc
    assert parse_measurement(json.loads(json.dumps(m.to_json_dict()))) == m


def test_accelerator_round_trips_and_only_kvm_or_tcg_is_accepted() -> None:
    """The policy model's throttle depends on it (TCG's sync waits for a sleeping vCPU)."""
    doc = {**canonical(), "accelerator": "tcg"}
    m = parse_measurement(doc)
    assert m.accelerator == "tcg"
    assert m.to_json_dict() == doc
    assert parse_measurement(canonical()).accelerator is None
    with pytest.raises(InputError) as err:
        parse_measurement({**canonical(), "accelerator": "hvf"})
    assert err.value.field == "accelerator"


def test_canonical_minimal_defaults() -> None:
    m = parse_measurement(
        {
            "format": FORMAT,
            "page_size_bytes": 4096,
            "total_pages": 10,
            "points": [{"period_ms": 1, "dirty_pages": 0}],
        }
    )
    assert m.zero_pages is None
    assert m.zero_pages_method == "none"
    assert m.strategy == "manual"
    assert m.target is None
    # zero pages given without a method: assumed sampled by QEMU
    doc = canonical()
    del doc["zero_pages_method"]
    assert parse_measurement(doc).zero_pages_method == "qemu-sampled"


def test_dirty_rate_view() -> None:
    m = parse_measurement(canonical())
    assert m.dirty_rate_bytes_per_second() == [(0.25, 1234 * 4096 * 4.0), (1.0, 4000 * 4096.0)]


def test_extended_is_the_cover_letter_scaled_to_the_guest() -> None:
    data = cover_letter()
    m = parse_measurement(data)
    ratio = 16392 / 8392704
    assert m.strategy == "extended"
    assert m.zero_pages_method == "qemu-sampled"
    assert m.page_size_bytes == 4096
    assert m.total_pages == 8392704
    assert m.sample_pages_per_gib == 512
    assert [p.period_ms for p in m.points] == [float(x) for x in data["periods"]]
    # the seed's order of operations: n / (sampled / total), bit for bit
    assert [p.dirty_pages for p in m.points] == [n / ratio for n in data["n-dirty-pages"]]
    assert m.points[0].dirty_pages == 16896.0
    assert m.zero_pages == 10060 / ratio == 5150720.0


def test_sweep_several_runs_ms_unit_duplicates_and_isotonic() -> None:
    m = parse_measurement(sweep())
    assert m.strategy == "sweep-ms"  # at least one run in milliseconds
    assert m.total_pages == 65536
    assert m.target == "vm2"
    assert m.zero_pages is None
    assert m.zero_pages_method == "none"
    # 250 ms: duplicate periods averaged, each rate + 0.5 MiB/s for the truncation: 25.5 MiB/s x 0.25 s.
    # 1 s: 10.5 MiB; 2 s: 3.5 MiB/s x 2 s = 7 MiB < 10.5 MiB: pooled by isotonic regression to 8.75 MiB.
    assert m.points == (
        DirtyPoint(250.0, 25.5 * 0.25 * 256),
        DirtyPoint(1000.0, 8.75 * 256),
        DirtyPoint(2000.0, 8.75 * 256),
    )


def test_sweep_in_seconds_only_and_zero_pages() -> None:
    doc = sweep()
    doc["runs"] = [{"calc-time": 1, "dirty-rate": 0}, {"calc-time": 2, "dirty-rate": 1}]
    doc["zero_pages"] = 1000
    m = parse_measurement(doc)
    assert m.strategy == "sweep-s"
    assert m.zero_pages == 1000.0
    assert m.zero_pages_method == "host-smaps"
    # An idle guest's "0 MiB/s" still means half a MiB/s dirtied on average: 0.5 MiB in 1 s, 3 MiB in
    # 2 s. A longer window cannot see a higher rate (1.5 > 0.5 MiB/s), so the rates are pooled, weighted
    # by window length: (0.5 * 1 + 1.5 * 2) / 3 MiB/s for both windows.
    rate = (0.5 * 1 + 1.5 * 2) / 3 * 256
    assert [p.period_ms for p in m.points] == [1000.0, 2000.0]
    assert [p.dirty_pages for p in m.points] == pytest.approx([rate, 2 * rate])


def test_truncation_correction_stops_growing_after_two_seconds() -> None:
    """An idle guest reads 0 MiB/s in every window: what QEMU truncated away is taken as half a MiB/s
    for the first two seconds of a window only, so 8 s hide 1 MiB, not 4 (docs/accuracy.md, round 6)."""
    doc = sweep()
    doc["runs"] = [{"calc-time": t, "dirty-rate": 0} for t in (1, 2, 4, 8)]
    m = parse_measurement(doc)
    assert [p.dirty_pages for p in m.points] == pytest.approx([0.5 * 256, 256.0, 256.0, 256.0])
    # a reading above zero keeps its whole rate: 3 MiB/s x 8 s + 1 MiB
    doc["runs"] = [{"calc-time": 8, "dirty-rate": 3}]
    [point] = parse_measurement(doc).points
    assert point.dirty_pages == pytest.approx(25 * 256)


def test_sweep_caps_at_the_pages_that_are_not_zero() -> None:
    doc = sweep()
    doc["memory_bytes"] = 4 * MIB  # 1024 pages
    doc["zero_pages"] = 600
    doc["runs"] = [{"calc-time": 1, "dirty-rate": 1}, {"calc-time": 4, "dirty-rate": 100}]
    m = parse_measurement(doc)
    # 1.5 MiB/s over 1 s, 100.5 MiB/s over 4 s: a longer window cannot see a higher rate, so both take
    # the pooled 80.7 MiB/s, and both exceed the 1024 - 600 = 424 pages that can be dirty at all.
    assert m.points == (DirtyPoint(1000.0, 424.0), DirtyPoint(4000.0, 424.0))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1e6, allow_nan=False), st.floats(0.1, 10, allow_nan=False)),
        min_size=1,
        max_size=12,
    )
)
def test_isotonic_regression_properties(pairs: list[tuple[float, float]]) -> None:
    values = [v for v, _ in pairs]
    weights = [w for _, w in pairs]
    fit = isotonic_increasing(values, weights)
    assert len(fit) == len(values)
    assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(fit))
    # pooling preserves the weighted mean
    mean = sum(v * w for v, w in pairs) / sum(weights)
    assert sum(f * w for f, w in zip(fit, weights, strict=True)) / sum(weights) == pytest.approx(
        mean, rel=1e-9
    )
    if all(a <= b for a, b in itertools.pairwise(values)):
        assert fit == values


def test_isotonic_regression_weighted_pooling() -> None:
    assert isotonic_increasing([1, 3, 2, 4], [1, 1, 1, 1]) == [1, 2.5, 2.5, 4]
    assert isotonic_increasing([5, 1], [1, 3]) == [2.0, 2.0]


# --- bad input ---------------------------------------------------------------------------------------


def _without(doc: dict[str, Any], key: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    del out[key]
    return out


def _with(doc: dict[str, Any], path: tuple[Any, ...], value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target: Any = out
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return out


BAD: list[tuple[str, object, str]] = [
    # canonical: missing fields
    ("canonical missing points", _without(canonical(), "points"), "points"),
    ("canonical missing total_pages", _without(canonical(), "total_pages"), "total_pages"),
    ("canonical missing page size", _without(canonical(), "page_size_bytes"), "page_size_bytes"),
    (
        "canonical missing period",
        _with(canonical(), ("points", 1), {"dirty_pages": 1}),
        "points[1].period_ms",
    ),
    # wrong types, negative, non-numeric, bool, NaN/inf
    ("points not a list", _with(canonical(), ("points",), {"a": 1}), "points"),
    ("point not an object", _with(canonical(), ("points", 0), 5), "points[0]"),
    ("negative dirty", _with(canonical(), ("points", 0, "dirty_pages"), -1), "points[0].dirty_pages"),
    ("string dirty", _with(canonical(), ("points", 1, "dirty_pages"), "12"), "points[1].dirty_pages"),
    ("bool dirty", _with(canonical(), ("points", 0, "dirty_pages"), True), "points[0].dirty_pages"),
    ("nan dirty", _with(canonical(), ("points", 0, "dirty_pages"), float("nan")), "points[0].dirty_pages"),
    ("inf period", _with(canonical(), ("points", 1, "period_ms"), float("inf")), "points[1].period_ms"),
    ("zero period", _with(canonical(), ("points", 0, "period_ms"), 0), "points[0].period_ms"),
    ("huge period", _with(canonical(), ("points", 0, "period_ms"), 10**400), "points[0].period_ms"),
    ("float total", _with(canonical(), ("total_pages",), 10.5), "total_pages"),
    ("bool page size", _with(canonical(), ("page_size_bytes",), True), "page_size_bytes"),
    ("zero total", _with(canonical(), ("total_pages",), 0), "total_pages"),
    ("negative zero pages", _with(canonical(), ("zero_pages",), -5), "zero_pages"),
    ("too many zero pages", _with(canonical(), ("zero_pages",), 10**6), "zero_pages"),
    ("dirty above total", _with(canonical(), ("points", 1, "dirty_pages"), 131073), "points[1].dirty_pages"),
    ("empty points", _with(canonical(), ("points",), []), "points"),
    ("non-increasing periods", _with(canonical(), ("points", 1, "period_ms"), 250.0), "points[1].period_ms"),
    ("unknown method", _with(canonical(), ("zero_pages_method",), "guess"), "zero_pages_method"),
    ("unknown strategy", _with(canonical(), ("strategy",), "magic"), "strategy"),
    ("notes not strings", _with(canonical(), ("notes",), [1]), "notes"),
    ("target not string", _with(canonical(), ("target",), 7), "target"),
    ("unknown key", _with(canonical(), ("colour",), "blue"), "colour"),
    ("wrong format", _with(canonical(), ("format",), "v0"), "format"),
    # extended
    ("extended missing periods", _without(cover_letter(), "periods"), "periods"),
    ("extended missing sampled", _without(cover_letter(), "n-sampled-pages"), "n-sampled-pages"),
    ("extended missing page size", _without(cover_letter(), "page-size"), "page-size"),
    ("extended inconsistent lengths", _with(cover_letter(), ("periods",), [125, 250]), "n-dirty-pages"),
    ("extended periods not a list", _with(cover_letter(), ("periods",), "125"), "periods"),
    ("extended negative count", _with(cover_letter(), ("n-dirty-pages", 3), -1), "n-dirty-pages[3]"),
    ("extended string period", _with(cover_letter(), ("periods", 2), "375"), "periods[2]"),
    ("extended count above sample", _with(cover_letter(), ("n-dirty-pages", 0), 20000), "n-dirty-pages[0]"),
    ("extended zero above sample", _with(cover_letter(), ("n-zero-pages",), 20000), "n-zero-pages"),
    ("extended sampled above total", _with(cover_letter(), ("n-sampled-pages",), 10**7), "n-sampled-pages"),
    ("extended non-increasing", _with(cover_letter(), ("periods", 5), 750), "periods[5]"),
    # sweep
    ("sweep missing memory", _without(sweep(), "memory_bytes"), "memory_bytes"),
    ("sweep runs not a list", _with(sweep(), ("runs",), {}), "runs"),
    ("sweep empty runs", _with(sweep(), ("runs",), []), "runs"),
    ("sweep memory not page multiple", _with(sweep(), ("memory_bytes",), 4097), "memory_bytes"),
    ("sweep run not object", _with(sweep(), ("runs", 1), [1]), "runs[1]"),
    ("sweep missing rate", _with(sweep(), ("runs", 2), {"calc-time": 1}), "runs[2].dirty-rate"),
    ("sweep negative rate", _with(sweep(), ("runs", 0, "dirty-rate"), -3), "runs[0].dirty-rate"),
    ("sweep zero calc-time", _with(sweep(), ("runs", 0, "calc-time"), 0), "runs[0].calc-time"),
    ("sweep bad unit", _with(sweep(), ("runs", 1, "calc-time-unit"), "hour"), "runs[1].calc-time-unit"),
    ("sweep not measured", _with(sweep(), ("runs", 3, "status"), "measuring"), "runs[3].status"),
    # not a measurement at all
    ("a list", [1, 2], "expected a JSON object"),
    ("empty object", {}, "not a measurement"),
    ("a string", "hello", "expected a JSON object"),
]


@pytest.mark.parametrize(("doc", "field"), [pytest.param(d, f, id=i) for i, d, f in BAD])
def test_bad_input_names_the_field(doc: object, field: str) -> None:
    with pytest.raises(InputError) as info:
        parse_measurement(doc)
    assert field in str(info.value)
    if not field.startswith(("expected", "not a")):
        assert info.value.field == field


def test_source_prefixes_the_message_and_keeps_the_field() -> None:
    with pytest.raises(InputError, match=r"^stdin line 3: points\[0\]\.dirty_pages: must be") as info:
        parse_measurement(_with(canonical(), ("points", 0, "dirty_pages"), -1), source="stdin line 3")
    assert info.value.source == "stdin line 3"
    assert info.value.field == "points[0].dirty_pages"


def test_measurement_validates_when_built_directly() -> None:
    with pytest.raises(InputError, match="points"):
        Measurement(page_size_bytes=4096, total_pages=10, points=())
    with pytest.raises(InputError, match="runs"):
        measurement_from_sweep([], memory_bytes=4096)
    with pytest.raises(InputError, match="memory_bytes"):
        measurement_from_sweep([{"calc-time": 1, "dirty-rate": 1}], memory_bytes=0)


# --- fuzz: only InputError escapes -------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(),
    st.floats(),
    st.text(max_size=6),
    st.sampled_from([FORMAT, "millisecond", "second", "measured"]),
)
_JSONISH = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def _mutated(draw: st.DrawFn) -> object:
    """A valid document of one format with one to three values replaced or deleted: near-misses reach
    far deeper into the readers than random JSON does."""
    doc: Any = draw(st.sampled_from([canonical, cover_letter, sweep]))()
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent: Any = doc
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(_JSONISH)
    return doc


@settings(max_examples=600, deadline=None)
@given(st.one_of(_mutated(), _JSONISH))
def test_only_input_error_escapes(doc: object) -> None:
    try:
        m = parse_measurement(doc, source="fuzz")
    except InputError as e:
        message = str(e)
    else:
        assert m.points
        assert all(p.dirty_pages <= m.total_pages for p in m.points)
        return
    assert message.startswith("fuzz: ")


def test_the_extended_fast_path_builds_what_the_checked_constructor_accepts() -> None:
    """measurement_from_extended skips Measurement's re-validation of what it checked itself: every
    result must still pass that validation unchanged (200 random cover-letter-shaped replies)."""
    from benchmarks.predict import inputs

    for doc in inputs(200):
        m = parse_measurement(doc)
        assert dataclasses.replace(m) == m  # replace() runs __post_init__ on the same fields
