"""Fuzzing every parser at the edges: no input may raise anything but the project's typed errors.

Measurement JSON (all three formats), the QMP reply checks of the measure edge, the YAML config, units
and the web config. Inputs are generated near the valid shapes (known keys, numbers at the limits) as
well as at random, because a parser's bugs live just past what it expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from migpredictd.config.schema import load_config
from migpredictd.core.errors import (
    ConfigError,
    InputError,
    QMPProtocolError,
    TargetError,
    WebConfigError,
)
from migpredictd.core.measurement import FORMAT, Measurement, measurement_from_sweep, parse_measurement
from migpredictd.core.units import (
    format_bandwidth,
    format_downtime,
    format_eta,
    parse_bandwidth,
    parse_duration,
    parse_size,
)
from migpredictd.qemu import measure
from migpredictd.web.webconfig import load_web_config

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON as json.loads gives it (ints are unbounded there, but at most 4,300 digits).
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.sampled_from([0, 1, -1, 2**53, 2**53 + 1, 2**63, 2**70, 4096, 10**300])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=25,
)
NUMBER = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, 50, 125, 1000, 4096, 2**53, 1e308, -0.0])
)
NUMBERISH = NUMBER | JSON


def near(
    required: Mapping[str, st.SearchStrategy[Any]], optional: Mapping[str, st.SearchStrategy[Any]]
) -> Any:
    """Objects with a format's own keys (each possibly missing or of the wrong type) plus stray ones."""
    return st.fixed_dictionaries(
        {k: v | JSON for k, v in required.items()}, optional={k: v | JSON for k, v in optional.items()}
    ) | st.fixed_dictionaries({}, optional={k: v for k, v in {**required, **optional}.items()})


POINT = st.fixed_dictionaries({"period_ms": NUMBERISH, "dirty_pages": NUMBERISH}) | JSON
CANONICAL = near(
    {"format": st.just(FORMAT), "page_size_bytes": NUMBER, "total_pages": NUMBER,
     "points": st.lists(POINT, max_size=6)},
    {"zero_pages": NUMBER, "zero_pages_method": st.text(max_size=5), "strategy": st.text(max_size=5),
     "sample_pages_per_gib": NUMBER, "qemu_version": st.text(max_size=5), "target": st.text(max_size=5),
     "measured_at": NUMBER, "duration_seconds": NUMBER, "notes": st.lists(st.text(max_size=5), max_size=3),
     "extra": JSON},
)  # fmt: skip
EXTENDED = near(
    {"periods": st.lists(NUMBER, max_size=6), "n-dirty-pages": st.lists(NUMBER, max_size=6),
     "n-sampled-pages": NUMBER, "n-total-pages": NUMBER, "n-zero-pages": NUMBER, "page-size": NUMBER},
    {"sample-pages": NUMBER, "dirty-rate": NUMBER, "status": st.just("measured")},
)  # fmt: skip
RUN = near(
    {"calc-time": NUMBER, "dirty-rate": NUMBER},
    {"calc-time-unit": st.sampled_from(["second", "millisecond", "minute"]), "status": st.text(max_size=9),
     "sample-pages": NUMBER, "start-time": NUMBER, "mode": st.text(max_size=9)},
)  # fmt: skip
SWEEP = near(
    {"memory_bytes": NUMBER, "runs": st.lists(RUN, max_size=5)},
    {"page_size_bytes": NUMBER, "zero_pages": NUMBER, "zero_pages_method": st.text(max_size=5),
     "target": st.text(max_size=5)},
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Measurement JSON


@FUZZ
@given(st.one_of(JSON, CANONICAL, EXTENDED, SWEEP))
def test_parse_measurement_raises_only_input_error(data: Any) -> None:
    try:
        m = parse_measurement(data, source="fuzz")
    except InputError as e:
        error: InputError | None = e
    else:
        error = None
    if error is not None:
        assert "fuzz" in str(error)  # located errors name their source
        return
    # Whatever parses is a valid measurement that survives its own round trip.
    assert isinstance(m, Measurement)
    assert all(math.isfinite(p.dirty_pages) and p.period_ms > 0 for p in m.points)
    again = parse_measurement(m.to_json_dict())
    assert again.points == m.points
    assert again.total_pages == m.total_pages


@FUZZ
@given(
    st.lists(RUN | JSON, max_size=5),
    NUMBER,
    st.sampled_from([4096, 1, 2**53]),  # a program constant (the document path checks its own)
    st.none() | NUMBER,
)
def test_measurement_from_sweep_raises_only_input_error(
    runs: list[Any], memory: Any, page: int, zero: Any
) -> None:
    assume(isinstance(memory, int) and not isinstance(memory, bool))  # the measure edge checked it
    assume(zero is None or isinstance(zero, float))
    try:
        m = measurement_from_sweep(runs, memory_bytes=memory, page_size_bytes=page, zero_pages=zero)
    except InputError:
        return
    assert m.points
    assert all(b.dirty_pages >= a.dirty_pages for a, b in zip(m.points, m.points[1:], strict=False))


# --------------------------------------------------------------------------------------------------
# QMP replies as the measure edge checks them


class ReplyStub:
    """Answers the measure edge's queries from fixed replies, as QMPSession.execute(_dict) would."""

    target = "fuzz"

    def __init__(self, replies: Mapping[str, Any]) -> None:
        self.replies = replies

    async def execute(self, command: str, args: object = None, *, timeout: object = None) -> Any:  # noqa: ASYNC109 - QMPSession's signature
        return self.replies.get(command, {})

    async def execute_dict(
        self,
        command: str,
        args: object = None,
        *,
        timeout: object = None,  # noqa: ASYNC109 - QMPSession's signature
    ) -> Any:
        reply = await self.execute(command)
        if not isinstance(reply, dict):  # QMPSession.execute_dict's own check
            raise QMPProtocolError("not an object", target=self.target, command=command)
        return reply


MEMORY = near({"base-memory": NUMBER}, {"plugged-memory": NUMBER})
STATUS = near({"status": st.sampled_from(["running", "paused", "inmigrate"])}, {"running": st.booleans()})
MIGRATE = near({}, {"status": st.sampled_from(["active", "completed", "setup", "none"])})
DIRTY = near(
    {"status": st.sampled_from(["measured", "measuring", "unstarted"]), "dirty-rate": NUMBER,
     "calc-time": NUMBER, "start-time": NUMBER},
    {"sample-pages": NUMBER, "mode": st.sampled_from(["page-sampling", "dirty-ring"]),
     "calc-time-unit": st.sampled_from(["second", "millisecond"])},
)  # fmt: skip
VERSION = near(
    {"qemu": near({"major": NUMBER, "minor": NUMBER, "micro": NUMBER}, {}) | JSON}, {"package": JSON}
)
SCHEMA = st.lists(
    near({"name": st.sampled_from(["calc-dirty-rate", "query-dirty-rate", "0", "1"]) | JSON},
         {"arg-type": st.sampled_from(["0", "1"]) | JSON, "ret-type": st.sampled_from(["0", "1"]) | JSON,
          "members": st.lists(near({"name": st.sampled_from(["calc-time-unit", "periods"])}, {}) | JSON,
                              max_size=3) | JSON}),
    max_size=5,
) | JSON  # fmt: skip


def run_check(coro: Any) -> None:
    with contextlib.suppress(TargetError):
        asyncio.run(coro)


@FUZZ
@given(st.one_of(MEMORY, JSON), st.one_of(STATUS, JSON), st.one_of(MIGRATE, JSON), st.one_of(DIRTY, JSON))
def test_guard_and_memory_replies_raise_only_target_errors(
    mem: Any, status: Any, mig: Any, dirty: Any
) -> None:
    stub = ReplyStub(
        {
            "query-memory-size-summary": mem,
            "query-status": status,
            "query-migrate": mig,
            "query-dirty-rate": dirty,
        }
    )
    run_check(measure._memory_bytes(stub))  # type: ignore[arg-type]
    run_check(measure._guards(stub))  # type: ignore[arg-type]
    run_check(measure._check_not_migrating(stub))  # type: ignore[arg-type]


@FUZZ
@given(VERSION | JSON, SCHEMA)
def test_capability_replies_raise_only_target_errors(version: Any, schema: Any) -> None:
    run_check(measure._capabilities(ReplyStub({"query-version": version, "query-qmp-schema": schema})))  # type: ignore[arg-type]


@FUZZ
@given(DIRTY | st.dictionaries(st.text(max_size=10), JSON, max_size=5), NUMBER | JSON, st.integers(0, 60000))
def test_dirty_rate_reply_check_raises_only_target_errors(reply: Any, start: Any, calc: int) -> None:
    try:
        measure._check_run(reply, target="fuzz", start_time=start, expect_calc_time=calc, sample_pages=16384)
    except TargetError:
        return
    # Accepted: a non-negative integer rate from a page-sampling run at least as long as asked.
    assert isinstance(reply["dirty-rate"], int) and reply["dirty-rate"] >= 0  # noqa: PT018
    assert reply.get("mode", "page-sampling") == "page-sampling"


# --------------------------------------------------------------------------------------------------
# YAML config


DURATION = st.sampled_from(["30s", "5m", "0s", "-1s", "1e999s", "10", "unlim", "1.5h", "500ms", "", "s"])
CONFIG_VALUE = (
    DURATION
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.none()
    | st.text(max_size=10)
)
CONFIG_ANY = st.recursive(
    CONFIG_VALUE,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)
MEASUREMENT = st.dictionaries(
    st.sampled_from(["strategy", "periods", "sample_pages", "zero_pages", "guest_sample_pages",
                     "connect_timeout", "command_timeout", "poll_interval", "settle_timeout", "bogus"]),
    CONFIG_VALUE | st.lists(DURATION, max_size=4),
    max_size=5,
)  # fmt: skip
TARGET = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=10) | CONFIG_VALUE,
        "qmp": st.sampled_from(["unix:/run/a.sock", "tcp:127.0.0.1:4444", "tcp:x:99999", "/a", "ftp:x", ""]),
        "interval": DURATION | CONFIG_VALUE,
        "labels": st.dictionaries(st.text(max_size=6), CONFIG_VALUE, max_size=3) | CONFIG_VALUE,
        "measurement": MEASUREMENT | CONFIG_VALUE,
    },
)
CONFIG = st.fixed_dictionaries(
    {},
    optional={
        "global": st.fixed_dictionaries(
            {},
            optional={
                "interval": DURATION | CONFIG_VALUE,
                "jitter": DURATION | CONFIG_VALUE,
                "max_concurrent": CONFIG_VALUE,
                "measurement": MEASUREMENT | CONFIG_ANY,
                "prediction": CONFIG_ANY,
                "grid": st.fixed_dictionaries(
                    {},
                    optional={
                        "bandwidths": st.lists(st.sampled_from(["1Gbps", "0", "10Gbps", "x", "1e400Gbps"])),
                        "max_downtimes": st.lists(DURATION, max_size=4),
                    },
                )
                | CONFIG_ANY,
                "exposition": st.fixed_dictionaries({}, optional={"per_cell_details": CONFIG_VALUE}),
            },
        )
        | CONFIG_ANY,
        "targets": st.lists(TARGET, max_size=4) | CONFIG_ANY,
        "targets_dir": CONFIG_VALUE,
    },
)
YAML_TEXT = st.text(alphabet=st.sampled_from([*"ab:{}[]-,&*!|>'\"#%@`?\n \t01.e+", "\x00", "é"]), max_size=80)


def _load(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(text)
        problems: tuple[object, ...] = ()
        try:
            load_config(path)
        except ConfigError as e:
            problems = e.problems or (None,)
        # Every refusal says why, and where.
        assert all(p is not None and str(path) in str(p) for p in problems)


@FUZZ
@given(CONFIG)
def test_config_near_valid_raises_only_config_error(doc: Any) -> None:
    _load(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(YAML_TEXT)
def test_config_random_text_raises_only_config_error(text: str) -> None:
    _load(text)


@pytest.mark.parametrize(
    "text",
    [
        "global: {max_concurrent: " + "1" * 5000 + "}\ntargets: []\n",  # int() refuses 4,300+ digits
        "targets: []\nx-when: 2001-02-30\n",  # a timestamp that is no date
        "targets: []\nx-t: 2001-12-14t21:59:43.10+99:00\n",
    ],
    ids=["huge-int", "bad-date", "bad-tz"],
)
def test_config_scalars_that_break_yaml_constructors(text: str) -> None:
    """Found by fuzzing: these raised ValueError from PyYAML's constructors."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match="invalid YAML value"):
            load_config(path)


# --------------------------------------------------------------------------------------------------
# Units


@FUZZ
@given(st.text(max_size=30) | st.floats() | st.integers(min_value=-(10**30), max_value=10**30))
def test_units_raise_only_input_errors(value: Any) -> None:
    for parse in (parse_bandwidth, parse_duration, parse_size):
        try:
            result = parse(value)
        except InputError:
            continue
        assert isinstance(result, int | float)
        assert math.isfinite(result) or (parse is parse_duration and result == math.inf)
        assert result >= 0


@FUZZ
@given(st.floats(min_value=0.0, allow_nan=False, allow_infinity=True))
def test_formatting_never_raises(value: float) -> None:
    if 0 < value < 1e300:  # bits per second of 1e308 bytes overflow to inf
        assert parse_bandwidth(format_bandwidth(value).replace(" ", "")) > 0
    assert format_downtime(value)
    assert format_eta(value)


# --------------------------------------------------------------------------------------------------
# Web config (exporter-toolkit format)


WEB = st.fixed_dictionaries(
    {},
    optional={
        "tls_server_config": st.dictionaries(
            st.sampled_from(["cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version",
                             "cipher_suites", "bogus"]),
            CONFIG_VALUE | st.lists(st.text(max_size=5), max_size=2), max_size=3,
        ) | CONFIG_VALUE,
        "basic_auth_users": st.dictionaries(st.text(max_size=5), CONFIG_VALUE, max_size=2) | CONFIG_VALUE,
        "http_server_config": st.fixed_dictionaries(
            {}, optional={"http2": CONFIG_VALUE, "headers": st.dictionaries(
                st.sampled_from(["X-Frame-Options", "Server", "Strict-Transport-Security"]), CONFIG_VALUE)}
        ) | CONFIG_VALUE,
        "rate_limit": st.dictionaries(st.sampled_from(["interval", "burst"]), CONFIG_VALUE | DURATION)
        | CONFIG_VALUE,
    },
)  # fmt: skip


def _load_web(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "web.yaml"
        path.write_text(text)
        problems: tuple[object, ...] = ()
        try:
            load_web_config(str(path))
        except WebConfigError as e:
            problems = e.problems or (None,)
        assert None not in problems


@FUZZ
@given(WEB)
@example({"tls_server_config": {"cert_file": "\x00"}})  # found in CI: a NUL byte raised ValueError
def test_web_config_near_valid_raises_only_web_config_error(doc: Any) -> None:
    _load_web(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@given(YAML_TEXT)
def test_web_config_random_text_raises_only_web_config_error(text: str) -> None:
    # Digits stay short and dates out: the known PyYAML constructor failures are tested below.
    assume(not re.search(r"[0-9]{4}-[0-9]", text))
    _load_web(text)


@pytest.mark.parametrize(
    "text",
    ["rate_limit: {burst: " + "1" * 5000 + "}\n", "x: 2001-02-30\n", "[" * 3000],
    ids=["huge-int", "bad-date", "deep"],
)
def test_web_config_constructor_failures_are_config_errors(text: str) -> None:
    """Found by fuzzing: PyYAML's constructors raised ValueError/RecursionError through load_web_config."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "web.yaml"
        path.write_text(text)
        with pytest.raises(WebConfigError) as info:
            load_web_config(str(path))
    assert info.value.problems
    assert all(str(path) in str(p) for p in info.value.problems)
