"""Protocol-faithful fake QMP server with a simulated VM per endpoint and fault injection.

Why: the daemon must be tested against thousands of VMs and every way a QMP peer can misbehave, which real
QEMU guests cannot provide on a 2-core machine. Every reply shape and error wording below was checked
against QEMU 7.2.22 on this machine (see /work/shared/QEMU_FACTS.md); 8.2+ behaviour (``calc-time-unit``)
follows upstream ``migration/dirtyrate.c``.

Usage::

    fleet = FakeQMPFleet(time_scale=0.01)          # unix sockets in a temporary directory
    ep = fleet.add("vm1", FakeVM(memory_bytes=512 * MiB), faults=Fault.SLOW,
                   params=FaultParams(delay_seconds=0.5))
    fleet.add_many(1000)                            # vm0000 .. vm0999, healthy
    async with fleet:
        address = ep.address                        # str path (unix) or ("127.0.0.1", port)
        ...
        assert "calc-dirty-rate" in ep.commands     # every "execute" received, in order

A synchronous test or benchmark uses ``with fleet.run_in_thread(): ...`` instead of ``async with``.
Only loopback is ever bound.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import enum
import functools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypeVar

__all__ = [
    "Address",
    "Endpoint",
    "FakeQMPFleet",
    "FakeVM",
    "Fault",
    "FaultParams",
    "JSONStreamParser",
    "ParseError",
    "StreamOverflowError",
    "main",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

Address: TypeAlias = str | tuple[str, int]
"""Where an endpoint listens: a unix socket path, or ``("127.0.0.1", port)``."""
JSONObject: TypeAlias = dict[str, Any]
Version: TypeAlias = tuple[int, int, int]
Transport: TypeAlias = Literal["unix", "tcp"]
_T = TypeVar("_T")

MiB: Final = 1 << 20
GiB: Final = 1 << 30
LOOPBACK: Final = "127.0.0.1"
# A few more than QEMU's own limits would allow is pointless: QEMU caps a token at 64 MiB.
MAX_PENDING_CHARS: Final = 64 * MiB
MAX_NESTING: Final = 1024
_SHM: Final = "/dev/shm"  # noqa: S108 - only a parent for mkdtemp, which makes a private 0700 directory
# Periods (ms) of the unmerged 2023 extended calc-dirty-rate output, as in its cover letter.
EXTENDED_PERIODS_MS: Final = (
    125,
    250,
    375,
    500,
    750,
    1000,
    1500,
    2000,
    3000,
    4000,
    6000,
    8000,
    10000,
    15000,
    20000,
    25000,
    30000,
    35000,
    40000,
    45000,
    50000,
    60000,
)


class Fault(enum.Flag):
    """Ways an endpoint misbehaves; combine with ``|``. Parameters live in :class:`FaultParams`.

    Reply faults (GARBAGE, TRUNCATED, HUGE_LINE, DISCONNECT_MID_REPLY, COMMAND_ERROR, SLOW) hit only the
    replies to ``FaultParams.command`` when it is set, else every reply (``qmp_capabilities`` included).

    - REFUSE_CONNECT: the address exists but nothing listens, so connect() fails with ECONNREFUSED
      (what a dead QEMU leaves behind).
    - NO_GREETING: accept the connection and never send anything (a wedged QEMU main loop).
    - NO_REPLIES: greet, record the commands, never answer any of them.
    - GARBAGE: answer with a line that is not JSON; the connection stays open.
    - TRUNCATED: answer with the first half of the reply plus "\\r\\n", then close the connection.
    - HUGE_LINE: answer with one valid reply line of ``huge_line_bytes`` (100 MB by default), streamed
      in 1 MiB chunks so the server never holds it in memory.
    - DISCONNECT_MID_REPLY: write half the reply without a line end, then reset the connection.
    - COMMAND_ERROR: answer with ``{"error": {"class": error_class, "desc": error_desc}}``.
    - MEASURING_FOREVER: after calc-dirty-rate, query-dirty-rate says "measuring" for ever (and a second
      calc-dirty-rate gets "the dirty rate is already being measured.").
    - NEGATIVE_DIRTY_RATE: measured ``dirty-rate`` (and extended ``n-dirty-pages``) are negative.
    - ZERO_MEMORY / HUGE_MEMORY: query-memory-size-summary (and extended ``n-total-pages``) report 0 or 2**70.
    - SLOW: sleep ``delay_seconds`` (wall time, not scaled) before each reply.
    - EVENTS: after negotiation, emit an unrelated RTC_CHANGE event (with timestamp) before each reply.
    - MIGRATING: query-migrate reports an active migration (``FakeVM.migration`` or a default one).
    - PAUSED: query-status reports ``{"status": "paused", "running": false}``.
    """

    NONE = 0
    REFUSE_CONNECT = enum.auto()
    NO_GREETING = enum.auto()
    NO_REPLIES = enum.auto()
    GARBAGE = enum.auto()
    TRUNCATED = enum.auto()
    HUGE_LINE = enum.auto()
    DISCONNECT_MID_REPLY = enum.auto()
    COMMAND_ERROR = enum.auto()
    MEASURING_FOREVER = enum.auto()
    NEGATIVE_DIRTY_RATE = enum.auto()
    ZERO_MEMORY = enum.auto()
    HUGE_MEMORY = enum.auto()
    SLOW = enum.auto()
    EVENTS = enum.auto()
    MIGRATING = enum.auto()
    PAUSED = enum.auto()


_REPLY_FAULTS: Final = (
    Fault.GARBAGE
    | Fault.TRUNCATED
    | Fault.HUGE_LINE
    | Fault.DISCONNECT_MID_REPLY
    | Fault.COMMAND_ERROR
    | Fault.SLOW
)


@dataclass(frozen=True, kw_only=True)
class FaultParams:
    """Parameters of the faults in :class:`Fault`; ``command`` narrows reply faults to one command."""

    command: str | None = None
    error_class: str = "GenericError"
    error_desc: str = "injected failure"
    delay_seconds: float = 1.0
    huge_line_bytes: int = 100 * 1000 * 1000


@dataclass(kw_only=True)
class FakeVM:
    """A simulated guest: its QEMU version, memory, and a true dirtying function to be measured.

    Pages dirtied after t seconds from a clean state are ``min(working set, rate * t)``: linear, then
    saturating, as calc-dirty-rate sees a paced dirtier over a fixed working set.
    """

    memory_bytes: int = 512 * MiB
    page_size: int = 4096
    working_set_bytes: int = 64 * MiB
    dirty_bytes_per_second: float = 20 * MiB
    zero_bytes: int = 384 * MiB
    version: Version = (7, 2, 22)
    package: str = "Debian 1:7.2+dfsg-7+deb12u7"
    kvm_enabled: bool = False
    kvm_present: bool = True
    run_status: str = "running"
    migration: JSONObject | None = None
    extended_output: bool = False
    # query-qmp-schema's size: real QEMU's reply (QEMU_FACTS.md) is padded out with filler object types,
    # so a client pays what it pays against QEMU to receive and decode it; 0 = the minimal schema.
    schema_bytes: int | None = None
    noise: bool = True
    seed: int = 0
    # Seconds QEMU's first hash pass spends per sampled page: a pass longer than the window stretches it
    # (the reported calc-time on 8.2+), as on a sparse 256 GiB guest where each sampled page faults in.
    hash_seconds_per_page: float = 0.0

    @property
    def total_pages(self) -> int:
        """Guest pages of ``page_size``."""
        return self.memory_bytes // self.page_size

    @property
    def has_calc_time_unit(self) -> bool:
        """Whether calc-dirty-rate takes ``calc-time-unit`` (QEMU 8.2 and later)."""
        return self.version >= (8, 2, 0)

    def true_dirty_pages(self, seconds: float) -> float:
        """Distinct pages whose content changed during a window of ``seconds``."""
        pages = min(self.working_set_bytes, self.dirty_bytes_per_second * seconds) / self.page_size
        return max(0.0, min(float(self.total_pages), pages))


# --------------------------------------------------------------------------------------------------
# Streaming JSON parser
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseError:
    """A segment of the stream that is not valid JSON; QEMU answers it and carries on."""

    desc: str


class StreamOverflowError(Exception):
    """A pending JSON value grew past the limit; the connection must be dropped."""


_NON_WS = re.compile(r"\S")
_STRUCTURAL = re.compile(r'["{}\[\]]')
# A raw control character cannot occur in a JSON string: QEMU's lexer rejects the token there.
_STRING_SPECIAL = re.compile(r'["\\\x00-\x1f]')
_SCALAR = re.compile(r'[^\s{}\[\]",:]+')


def _reject_constant(name: str) -> Any:
    """QEMU's parser has no NaN or Infinity; neither do we."""
    raise ValueError(f"invalid literal {name}")


class JSONStreamParser:
    """Splits a byte stream into top-level JSON values as QEMU's json-streamer does.

    No line ends needed, several values per packet, values (and UTF-8 characters) split across packets.
    A bracket/string scanner finds where a top-level value ends; ``json.JSONDecoder.raw_decode`` parses it.
    Scanning resumes where it stopped, so a value arriving byte by byte costs linear time.
    """

    def __init__(self, *, max_pending_chars: int = MAX_PENDING_CHARS) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._json = json.JSONDecoder(parse_constant=_reject_constant)
        self._max = max_pending_chars
        self._buf = ""
        self._pos = 0
        self._start: int | None = None
        self._depth = 0
        self._in_string = False

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return the complete values (a :class:`ParseError` for each bad segment).

        :raises StreamOverflowError: when one value exceeds ``max_pending_chars``.
        """
        self._buf += self._decoder.decode(data)
        out: list[Any] = []
        while self._step(out):
            pass
        if self._start is not None and len(self._buf) - self._start > self._max:
            raise StreamOverflowError(f"pending JSON value exceeds {self._max} characters")
        return out

    def _step(self, out: list[Any]) -> bool:  # noqa: PLR0911 - one exit per scanner state
        """Advance the scanner; True while progress is possible without more input."""
        buf, i = self._buf, self._pos
        if self._start is None:
            m = _NON_WS.search(buf, i)
            if m is None:
                self._buf, self._pos = "", 0
                return False
            i = m.start()
            self._start = i
            ch = buf[i]
            if ch in "{[":
                self._depth, self._pos = 1, i + 1
            elif ch == '"':
                self._in_string, self._pos = True, i + 1
            elif ch in "}],:":
                self._emit(out, i + 1)
            else:
                self._pos = i
            return True
        if self._in_string:
            m = _STRING_SPECIAL.search(buf, i)
            if m is None:
                self._pos = len(buf)
                return False
            i = m.start()
            if buf[i] < " ":
                self._emit(out, i + 1)
                return True
            if buf[i] == "\\":
                if i + 1 >= len(buf):
                    self._pos = i  # wait for the escaped character
                    return False
                self._pos = i + 2
                return True
            self._in_string = False
            self._pos = i + 1
            if self._depth == 0:
                self._emit(out, i + 1)
            return True
        if self._depth == 0:  # a pending top-level scalar (number, true, ...)
            m = _SCALAR.match(buf, self._start)
            if m is None or m.end() == len(buf):
                self._pos = self._start
                return False  # it may continue in the next packet
            self._emit(out, m.end())
            return True
        m = _STRUCTURAL.search(buf, i)
        if m is None:
            self._pos = len(buf)
            return False
        i = m.start()
        ch = buf[i]
        self._pos = i + 1
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
            if self._depth > MAX_NESTING:
                raise StreamOverflowError("JSON nesting too deep")
        else:
            self._depth -= 1
            if self._depth == 0:
                self._emit(out, i + 1)
        return True

    def _emit(self, out: list[Any], end: int) -> None:
        """Parse ``buf[start:end]``, append the value or error, and drop it from the buffer."""
        assert self._start is not None
        text = self._buf[self._start : end]
        try:
            value, used = self._json.raw_decode(text)
        except json.JSONDecodeError as exc:
            out.append(ParseError(f"JSON parse error, {exc.msg[:1].lower()}{exc.msg[1:]}"))
        except ValueError as exc:
            out.append(ParseError(f"JSON parse error, {exc}"))
        else:
            out.append(value if used == len(text) else ParseError("JSON parse error, trailing characters"))
        self._buf = self._buf[end:]
        self._pos, self._start, self._depth, self._in_string = 0, None, 0, False


# --------------------------------------------------------------------------------------------------
# Command argument checking, worded like QEMU's QAPI visitor
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    """One QAPI command argument: its JSON kind and whether it may be left out."""

    name: str
    kind: Literal["int", "enum", "enum-list"]
    required: bool = False
    values: tuple[str, ...] = ()


_EXPECTED = {"int": "integer", "enum": "string", "enum-list": "array"}
_INT64 = (-(2**63), 2**63 - 1)


def _check_args(params: Sequence[_Param], args: JSONObject) -> str | None:  # noqa: PLR0911 - one per error
    """Return QEMU's error text for bad ``args``, or None; members first, then unexpected ones."""
    for p in params:
        if p.name not in args:
            if p.required:
                return f"Parameter '{p.name}' is missing"
            continue
        value = args[p.name]
        if p.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int) or not _INT64[0] <= value <= _INT64[1]:
                return f"Invalid parameter type for '{p.name}', expected: integer"
        elif p.kind == "enum":
            if not isinstance(value, str):
                return f"Invalid parameter type for '{p.name}', expected: string"
            if value not in p.values:
                return f"Parameter '{p.name}' does not accept value '{value}'"
        else:
            if not isinstance(value, list):
                return f"Invalid parameter type for '{p.name}', expected: array"
            for n, item in enumerate(value):
                if not isinstance(item, str):
                    return f"Invalid parameter type for '{p.name}[{n}]', expected: string"
                if item not in p.values:
                    return f"Parameter '{p.name}[{n}]' does not accept value '{item}'"
    known = {p.name for p in params}
    for name in args:
        if name not in known:
            return f"Parameter '{name}' is unexpected"
    return None


_TIME_UNIT = ("second", "millisecond")
_MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")


def _command_params(vm: FakeVM) -> dict[str, tuple[_Param, ...]]:
    """The commands this fake knows and their arguments, for ``vm``'s QEMU version."""
    unit = (_Param("calc-time-unit", "enum", values=_TIME_UNIT),) if vm.has_calc_time_unit else ()
    return {
        "qmp_capabilities": (_Param("enable", "enum-list", values=("oob",)),),
        "query-version": (),
        "query-status": (),
        "query-kvm": (),
        "query-migrate": (),
        "query-memory-size-summary": (),
        "query-qmp-schema": (),
        "calc-dirty-rate": (
            _Param("calc-time", "int", required=True),
            *unit,
            _Param("sample-pages", "int"),
            _Param("mode", "enum", values=_MODES),
        ),
        "query-dirty-rate": unit,
    }


# query-qmp-schema's reply from the real QEMU builds of the rig (QEMU_FACTS.md): 10.0.2 sends 1172 entries,
# 235,931 bytes of JSON; 7.2.22 sends 1051 entries, 206,986 bytes. Keyed by "8.2 or later".
REAL_SCHEMA_BYTES: Final[Mapping[bool, int]] = {True: 235_931, False: 206_986}


@functools.lru_cache(maxsize=8)
def _filler_cached(size: int) -> tuple[JSONObject, ...]:
    entry_bytes = len(json.dumps(_filler_entry(0))) + 2
    return tuple(_filler_entry(i) for i in range(max(0, size) // entry_bytes))


def _filler_entry(i: int) -> JSONObject:
    """An object type named past QEMU's own masked numbers, about 200 bytes of JSON."""
    members = [{"name": f"member-{j}", "default": None, "type": "str"} for j in range(3)]
    return {"name": str(100000 + i), "members": members, "meta-type": "object"}


def _filler(size: int) -> list[JSONObject]:
    """Filler entries making up about ``size`` bytes of schema JSON."""
    return list(_filler_cached(size))


def qmp_schema(vm: FakeVM) -> list[JSONObject]:
    """A minimal ``query-qmp-schema`` result shaped like QEMU's: masked numeric type names.

    Enough to tell whether calc-dirty-rate takes ``calc-time-unit``; the names of 7.2's own entries are
    the ones QEMU 7.2.22 reports here.
    """
    builtin = [
        {"name": n, "json-type": j, "meta-type": "builtin"}
        for n, j in (
            ("str", "string"),
            ("int", "int"),
            ("bool", "boolean"),
            ("number", "number"),
            ("any", "value"),
            ("null", "null"),
        )
    ]
    calc_args: list[JSONObject] = [{"name": "calc-time", "type": "int"}]
    info_members: list[JSONObject] = [
        {"name": "dirty-rate", "default": None, "type": "int"},
        {"name": "status", "type": "413"},
        {"name": "start-time", "type": "int"},
        {"name": "calc-time", "type": "int"},
    ]
    query_arg = "0"
    extra: list[JSONObject] = []
    if vm.has_calc_time_unit:
        calc_args.append({"name": "calc-time-unit", "default": None, "type": "610"})
        info_members.append({"name": "calc-time-unit", "type": "610"})
        query_arg = "611"
        extra += [
            {
                "name": "610",
                "members": [{"name": v} for v in _TIME_UNIT],
                "meta-type": "enum",
                "values": list(_TIME_UNIT),
            },
            {
                "name": "611",
                "members": [{"name": "calc-time-unit", "default": None, "type": "610"}],
                "meta-type": "object",
            },
        ]
    calc_args += [
        {"name": "sample-pages", "default": None, "type": "int"},
        {"name": "mode", "default": None, "type": "412"},
    ]
    info_members += [
        {"name": "sample-pages", "type": "int"},
        {"name": "mode", "type": "412"},
        {"name": "vcpu-dirty-rate", "default": None, "type": "[414]"},
    ]
    if vm.extended_output:
        info_members += [
            {"name": n, "default": None, "type": "int"}
            for n in ("page-size", "n-total-pages", "n-sampled-pages", "n-zero-pages")
        ]
        info_members += [{"name": n, "default": None, "type": "[int]"} for n in ("periods", "n-dirty-pages")]
    status_enum = [
        "debug",
        "inmigrate",
        "internal-error",
        "io-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "finish-migrate",
        "restore-vm",
        "running",
        "save-vm",
        "shutdown",
        "suspended",
        "watchdog",
        "guest-panicked",
        "colo",
    ]

    def command(name: str, arg: str, ret: str) -> JSONObject:
        return {"name": name, "ret-type": ret, "meta-type": "command", "arg-type": arg}

    def enum_type(name: str, values: Sequence[str]) -> JSONObject:
        return {
            "name": name,
            "members": [{"name": v} for v in values],
            "meta-type": "enum",
            "values": list(values),
        }

    base: list[JSONObject] = [
        command("query-status", "0", "1"),
        {"name": "RTC_CHANGE", "meta-type": "event", "arg-type": "235"},
        command("qmp_capabilities", "172", "0"),
        command("query-version", "0", "173"),
        command("query-kvm", "0", "196"),
        command("query-migrate", "0", "140"),
        command("query-memory-size-summary", "0", "205"),
        command("calc-dirty-rate", "160", "0"),
        command("query-dirty-rate", query_arg, "161"),
        command("query-qmp-schema", "0", "[175]"),
        {"name": "0", "members": [], "meta-type": "object"},
        {
            "name": "1",
            "members": [
                {"name": "running", "type": "bool"},
                {"name": "singlestep", "type": "bool"},
                {"name": "status", "type": "262"},
            ],
            "meta-type": "object",
        },
        enum_type("262", status_enum),
        {
            "name": "140",
            "members": [
                {"name": "status", "default": None, "type": "402"},
                {"name": "ram", "default": None, "type": "403"},
                {"name": "total-time", "default": None, "type": "int"},
                {"name": "expected-downtime", "default": None, "type": "int"},
                {"name": "downtime", "default": None, "type": "int"},
                {"name": "setup-time", "default": None, "type": "int"},
            ],
            "meta-type": "object",
        },
        enum_type(
            "402",
            [
                "none",
                "setup",
                "cancelling",
                "cancelled",
                "active",
                "postcopy-active",
                "postcopy-paused",
                "postcopy-recover",
                "completed",
                "failed",
                "colo",
                "pre-switchover",
                "device",
                "wait-unplug",
            ],
        ),
        {
            "name": "403",
            "members": [{"name": n, "type": "number" if n == "mbps" else "int"} for n in _RAM_KEYS],
            "meta-type": "object",
        },
        {"name": "160", "members": calc_args, "meta-type": "object"},
        {"name": "161", "members": info_members, "meta-type": "object"},
        enum_type("412", _MODES),
        enum_type("413", ["unstarted", "measuring", "measured"]),
        {"name": "[414]", "element-type": "414", "meta-type": "array"},
        {
            "name": "414",
            "members": [{"name": "id", "type": "int"}, {"name": "dirty-rate", "type": "int"}],
            "meta-type": "object",
        },
        {"name": "[int]", "element-type": "int", "meta-type": "array"},
        {
            "name": "172",
            "members": [{"name": "enable", "default": None, "type": "[418]"}],
            "meta-type": "object",
        },
        {"name": "[418]", "element-type": "418", "meta-type": "array"},
        enum_type("418", ["oob"]),
        {
            "name": "173",
            "members": [{"name": "qemu", "type": "419"}, {"name": "package", "type": "str"}],
            "meta-type": "object",
        },
        {
            "name": "419",
            "members": [
                {"name": "major", "type": "int"},
                {"name": "minor", "type": "int"},
                {"name": "micro", "type": "int"},
            ],
            "meta-type": "object",
        },
        {
            "name": "196",
            "members": [{"name": "enabled", "type": "bool"}, {"name": "present", "type": "bool"}],
            "meta-type": "object",
        },
        {
            "name": "205",
            "members": [
                {"name": "base-memory", "type": "int"},
                {"name": "plugged-memory", "default": None, "type": "int"},
            ],
            "meta-type": "object",
        },
        {
            "name": "235",
            "members": [{"name": "offset", "type": "int"}, {"name": "qom-path", "type": "str"}],
            "meta-type": "object",
        },
        {"name": "[175]", "element-type": "175", "meta-type": "array"},
        {
            "name": "175",
            "members": [{"name": "name", "type": "str"}, {"name": "meta-type", "type": "str"}],
            "meta-type": "object",
        },
        *extra,
        *builtin,
    ]
    size = vm.schema_bytes if vm.schema_bytes is not None else REAL_SCHEMA_BYTES[vm.version >= (8, 2, 0)]
    return base + _filler(size - len(json.dumps(base))) if size else base


_RAM_KEYS: Final = (
    "transferred",
    "remaining",
    "total",
    "duplicate",
    "skipped",
    "normal",
    "normal-bytes",
    "dirty-pages-rate",
    "mbps",
    "dirty-sync-count",
    "postcopy-requests",
    "page-size",
    "multifd-bytes",
    "pages-per-second",
    "precopy-bytes",
    "downtime-bytes",
    "postcopy-bytes",
    "dirty-sync-missed-zero-copy",
)


def default_migration(vm: FakeVM) -> JSONObject:
    """An active migration half way through its first pass, shaped like QEMU 7.2's query-migrate."""
    total = vm.memory_bytes
    normal = total // vm.page_size // 4
    ram: dict[str, float] = dict.fromkeys(_RAM_KEYS, 0)
    ram.update(
        {
            "transferred": normal * (vm.page_size + 8),
            "remaining": total // 2,
            "total": total,
            "duplicate": total // vm.page_size // 4,
            "normal": normal,
            "normal-bytes": normal * vm.page_size,
            "mbps": 1073.741824,
            "dirty-sync-count": 1,
            "page-size": vm.page_size,
            "pages-per-second": 32768,
            "precopy-bytes": normal * (vm.page_size + 8),
        }
    )
    return {"expected-downtime": 300, "status": "active", "setup-time": 12, "total-time": 2071, "ram": ram}


def _binomial(rng: random.Random, n: int, p: float) -> int:
    """A binomial draw: exact for small n, normal approximation beyond (enough for sampling noise)."""
    if n <= 0 or p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    if n <= 2048:
        return sum(1 for _ in range(n) if rng.random() < p)
    draw = round(rng.gauss(n * p, math.sqrt(n * p * (1.0 - p))))
    return min(n, max(0, draw))


# --------------------------------------------------------------------------------------------------
# Endpoints and sessions
# --------------------------------------------------------------------------------------------------


@dataclass
class _DirtyRateRun:
    """calc-dirty-rate state of one VM, as QEMU's DirtyStat + CalculatingState."""

    status: str = "unstarted"
    calc_ms: int = 0
    sample_pages: int = 0
    mode: str = "page-sampling"
    start_time: int = 0
    finish_at: float = 0.0
    result: JSONObject = field(default_factory=dict)


class _CommandError(Exception):
    """A command failed; becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class _SimulatedCrashError(Exception):
    """The simulated QEMU died while handling a command (SIGSEGV in real QEMU 7.2)."""


class _SessionClosedError(Exception):
    """The session ended on purpose (fault injection) or because the peer went away."""


def _line(obj: Any) -> bytes:
    """Serialise one message the way QEMU does: ``", "``/``": "`` separators and CRLF."""
    return json.dumps(obj).encode() + b"\r\n"


class Endpoint:
    """One fake QEMU monitor: a simulated VM, its faults, and what clients did to it.

    Read ``commands`` (every ``execute`` name received, in order, negotiated or not), ``requests`` (every
    parsed message), ``connections``, ``concurrent`` and ``max_concurrent`` in assertions. Mutated only by
    the fleet's event loop; reading from another thread is safe enough for counters and list snapshots.
    """

    def __init__(
        self,
        fleet: FakeQMPFleet,
        name: str,
        vm: FakeVM,
        faults: Fault,
        params: FaultParams,
        *,
        exclusive: bool,
    ) -> None:
        self.name = name
        self.vm = vm
        self.faults = faults
        self.params = params
        self.exclusive = exclusive
        self.address: Address = ""
        self.commands: list[str] = []
        self.requests: list[Any] = []
        self.connections = 0
        self.concurrent = 0
        self.max_concurrent = 0
        self.crashed = False
        self._fleet = fleet
        self._rng = random.Random(vm.seed)
        self._run = _DirtyRateRun()
        self._server: asyncio.AbstractServer | None = None
        self._refuser: socket.socket | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Endpoint({self.name!r}, {self.address!r}, faults={self.faults!r})"

    def emit_event(self, event: str, data: JSONObject | None = None) -> None:
        """Send an event to every negotiated client now (call from the fleet's loop)."""
        for session in list(self._sessions):
            session.send_event(event, data)

    # ---- commands ------------------------------------------------------------------------------

    def dispatch(self, msg: Any, *, negotiated: bool) -> JSONObject:
        """Answer one parsed message as QEMU would; the reply carries the request's ``id`` if any.

        :raises _SimulatedCrashError: when the command kills the simulated QEMU.
        """
        if not isinstance(msg, dict):
            return {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        result = self._execute(msg, negotiated=negotiated)
        if "id" in msg:
            # QEMU puts "id" after "return" but before "error".
            if "return" in result:
                return {"return": result["return"], "id": msg["id"]}
            return {"id": msg["id"], **result}
        return result

    def _execute(self, msg: JSONObject, *, negotiated: bool) -> JSONObject:  # noqa: PLR0911 - QEMU's checks
        for key, value in msg.items():
            if key in ("execute", "exec-oob"):
                if not isinstance(value, str):
                    return _error("GenericError", f"QMP input member '{key}' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    return _error("GenericError", "QMP input member 'arguments' must be an object")
            elif key != "id":
                return _error("GenericError", f"QMP input member '{key}' is unexpected")
        name = msg.get("execute", msg.get("exec-oob"))
        if name is None:
            return _error("GenericError", "QMP input lacks member 'execute'")
        args: JSONObject = msg.get("arguments", {})
        if not negotiated and name != "qmp_capabilities":
            return _error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        if negotiated and name == "qmp_capabilities":
            return _error("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        params = _command_params(self.vm).get(name)
        if params is None:
            return _error("CommandNotFound", f"The command {name} has not been found")
        problem = _check_args(params, args)
        if problem is not None:
            return _error("GenericError", problem)
        if Fault.COMMAND_ERROR in self.faults and self._targets(name):
            return _error(self.params.error_class, self.params.error_desc)
        return self._answer(name, args)

    def _targets(self, command: str | None) -> bool:
        return self.params.command is None or self.params.command == command

    def _answer(self, name: str, args: JSONObject) -> JSONObject:
        handlers: dict[str, Callable[[JSONObject], Any]] = {
            "qmp_capabilities": lambda _: {},
            "query-version": self._query_version,
            "query-status": self._query_status,
            "query-kvm": lambda _: {"enabled": self.vm.kvm_enabled, "present": self.vm.kvm_present},
            "query-migrate": self._query_migrate,
            "query-memory-size-summary": lambda _: {
                "base-memory": self._reported_memory(),
                "plugged-memory": 0,
            },
            "query-qmp-schema": lambda _: qmp_schema(self.vm),
            "calc-dirty-rate": self._calc_dirty_rate,
            "query-dirty-rate": lambda a: self._query_dirty_rate(a.get("calc-time-unit", "second")),
        }
        try:
            return {"return": handlers[name](args)}
        except _CommandError as exc:
            return _error(exc.error_class, exc.desc)

    def _query_version(self, _: JSONObject) -> JSONObject:
        major, minor, micro = self.vm.version
        return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": self.vm.package}

    def _query_status(self, _: JSONObject) -> JSONObject:
        status = "paused" if Fault.PAUSED in self.faults else self.vm.run_status
        info: JSONObject = {"status": status}
        if self.vm.version < (9, 1, 0):  # "singlestep" was dropped from StatusInfo in 9.1
            info["singlestep"] = False
        info["running"] = status == "running"
        return info

    def _query_migrate(self, _: JSONObject) -> JSONObject:
        migration = self.vm.migration
        if migration is None and Fault.MIGRATING in self.faults:
            migration = default_migration(self.vm)
        return migration or {}

    def _reported_memory(self) -> int:
        if Fault.ZERO_MEMORY in self.faults:
            return 0
        if Fault.HUGE_MEMORY in self.faults:
            return 2**70
        return self.vm.memory_bytes

    def _calc_dirty_rate(self, args: JSONObject) -> JSONObject:
        vm, run = self.vm, self._run
        self._settle()
        if run.status == "measuring":
            raise _CommandError("the dirty rate is already being measured.")
        calc_time: int = args["calc-time"]
        if vm.has_calc_time_unit:
            calc_ms = calc_time if args.get("calc-time-unit") == "millisecond" else calc_time * 1000
            if not 50 <= calc_ms <= 60000:
                raise _CommandError("Calculation time is out of range [50ms, 60000ms].")
        else:
            if not 1 <= calc_time <= 60:
                raise _CommandError("calc-time is out of range[1, 60].")
            calc_ms = calc_time * 1000
        mode: str = args.get("mode", "page-sampling")
        if "sample-pages" in args and mode != "page-sampling":
            raise _CommandError("sample-pages is used only in page-sampling mode")
        sample_pages: int = args.get("sample-pages", 512)
        if not 128 <= sample_pages <= 16384:
            raise _CommandError("sample-pages is out of range[128, 16384].")
        if mode != "page-sampling" and not vm.kvm_enabled:
            # QEMU 7.2 asks kvm_dirty_ring_enabled() with no KVM state and segfaults (measured here).
            raise _SimulatedCrashError(f"calc-dirty-rate mode {mode} without KVM")
        if mode == "dirty-ring":
            raise _CommandError("mode dirty-ring is not enabled, use other method instead.")
        now = self._fleet.clock()
        start_time = int(time.time()) if vm.version >= (8, 2, 0) else int(now)
        if mode == "page-sampling" and vm.hash_seconds_per_page > 0:
            first_pass_ms = ((vm.memory_bytes * sample_pages) >> 30) * vm.hash_seconds_per_page * 1000.0
            calc_ms = max(calc_ms, int(first_pass_ms))
        self._run = _DirtyRateRun(
            status="measuring",
            calc_ms=calc_ms,
            mode=mode,
            start_time=start_time,
            sample_pages=sample_pages if mode == "page-sampling" else 0,
            finish_at=now + calc_ms / 1000 * self._fleet.time_scale,
        )
        return {}

    def _settle(self) -> None:
        """Finish a measurement whose simulated calc-time has elapsed on the fleet's clock."""
        run = self._run
        if run.status != "measuring" or Fault.MEASURING_FOREVER in self.faults:
            return
        if self._fleet.clock() >= run.finish_at:
            run.result = self._measure(run)
            run.status = "measured"

    def _measure(self, run: _DirtyRateRun) -> JSONObject:
        """Sample the true dirty function the way QEMU's page sampling does (integer MiB/s, truncated)."""
        vm, rng = self.vm, self._rng
        total = vm.total_pages
        mem_mib = vm.memory_bytes >> 20
        seconds = run.calc_ms / 1000
        if run.mode != "page-sampling":
            rate = int(vm.true_dirty_pages(seconds) * vm.page_size / MiB / seconds)
            return {"dirty-rate": -max(rate, 1) if Fault.NEGATIVE_DIRTY_RATE in self.faults else rate}
        n = (vm.memory_bytes * run.sample_pages) >> 30
        periods = [p for p in EXTENDED_PERIODS_MS if p < run.calc_ms] + [run.calc_ms]
        if not vm.extended_output:
            periods = [run.calc_ms]
        counts: list[int] = []
        dirty, prev_p = 0, 0.0
        for period in periods:
            p = vm.true_dirty_pages(period / 1000) / total if total else 0.0
            if vm.noise:
                # Sampled pages stay dirty: draw only the newly dirtied among the still-clean ones.
                fresh = (p - prev_p) / (1.0 - prev_p) if prev_p < 1.0 else 0.0
                dirty += _binomial(rng, n - dirty, fresh)
            else:
                dirty = round(n * p)
            counts.append(dirty)
            prev_p = p
        rate = dirty * mem_mib * 1000 // (n * run.calc_ms) if n else 0
        negative = Fault.NEGATIVE_DIRTY_RATE in self.faults
        result: JSONObject = {"dirty-rate": -max(rate, 1) if negative else rate}
        if vm.extended_output:
            zero_p = vm.zero_bytes / vm.memory_bytes if vm.memory_bytes else 0.0
            zero = _binomial(rng, n, zero_p) if vm.noise else round(n * zero_p)
            result.update(
                {
                    "page-size": vm.page_size,
                    "periods": periods,
                    "n-dirty-pages": [-c for c in counts] if negative else counts,
                    "n-sampled-pages": n,
                    "n-zero-pages": zero,
                    "n-total-pages": self._reported_memory() // vm.page_size,
                }
            )
        return result

    def _query_dirty_rate(self, unit: str) -> JSONObject:
        self._settle()
        run, vm = self._run, self.vm
        measured = run.status == "measured"
        calc_time = run.calc_ms if unit == "millisecond" else run.calc_ms // 1000
        info: JSONObject = {}
        if measured and vm.extended_output and "periods" in run.result:
            info["page-size"] = run.result["page-size"]
            info["periods"] = run.result["periods"]
        info["status"] = run.status
        info["sample-pages"] = run.sample_pages
        if measured:
            info["dirty-rate"] = run.result["dirty-rate"]
        info["mode"] = run.mode
        if measured and vm.extended_output and "periods" in run.result:
            for key in ("n-dirty-pages", "n-sampled-pages", "n-zero-pages", "n-total-pages"):
                info[key] = run.result[key]
        info["start-time"] = run.start_time
        info["calc-time"] = calc_time
        if vm.has_calc_time_unit:
            info["calc-time-unit"] = unit
        return info


def _unlink(path: str) -> None:
    """Remove a socket file; a local metadata call, too quick to be worth a thread."""
    Path(path).unlink(missing_ok=True)


def _error(cls: str, desc: str) -> JSONObject:
    return {"error": {"class": cls, "desc": desc}}


class _Session:
    """One client connection: greeting, negotiation state, and fault-shaped replies."""

    def __init__(
        self, endpoint: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.endpoint = endpoint
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.parser = JSONStreamParser()

    def abort(self) -> None:
        """Drop the connection at once, as a dying process does."""
        self.writer.transport.abort()

    def send_event(self, event: str, data: JSONObject | None = None) -> None:
        """Write an event if the client has negotiated (QEMU sends none before)."""
        if not self.negotiated or self.writer.is_closing():
            return
        now = time.time()
        msg: JSONObject = {
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
            "event": event,
        }
        if data is not None:
            msg["data"] = data
        self.writer.write(_line(msg))

    async def run(self) -> None:
        ep = self.endpoint
        faults = ep.faults
        if Fault.NO_GREETING in faults:
            while await self.reader.read(65536):
                pass
            return
        major, minor, micro = ep.vm.version
        self.writer.write(
            _line(
                {
                    "QMP": {
                        "version": {
                            "qemu": {"micro": micro, "minor": minor, "major": major},
                            "package": ep.vm.package,
                        },
                        "capabilities": ["oob"],
                    }
                }
            )
        )
        await self.writer.drain()
        while True:
            data = await self.reader.read(65536)
            if not data:
                return
            try:
                items = self.parser.feed(data)
            except StreamOverflowError:
                logger.warning("%s: client sent an oversized JSON value; dropping it", ep.name)
                return
            for item in items:
                await self._handle(item)

    async def _handle(self, item: Any) -> None:
        ep = self.endpoint
        command: str | None = None
        if not isinstance(item, ParseError):
            ep.requests.append(item)
            if isinstance(item, dict) and isinstance(item.get("execute"), str):
                command = item["execute"]
                ep.commands.append(item["execute"])
        if Fault.NO_REPLIES in ep.faults:
            return
        if isinstance(item, ParseError):
            reply: JSONObject = _error("GenericError", item.desc)
        else:
            try:
                reply = ep.dispatch(item, negotiated=self.negotiated)
            except _SimulatedCrashError as exc:
                logger.info("%s: simulated QEMU crash: %s", ep.name, exc)
                await ep._fleet._crash(ep)
                raise _SessionClosedError from exc
        await self._reply(reply, command)
        if command == "qmp_capabilities" and "return" in reply:
            self.negotiated = True  # after the reply: no event may precede it

    async def _reply(self, reply: JSONObject, command: str | None) -> None:
        ep = self.endpoint
        faults = ep.faults if ep._targets(command) else ep.faults & ~_REPLY_FAULTS
        if Fault.SLOW in faults:
            await asyncio.sleep(ep.params.delay_seconds)
        if Fault.EVENTS in faults:
            self.send_event("RTC_CHANGE", {"offset": 0, "qom-path": "/machine/unattached/device[4]"})
        data = _line(reply)
        if Fault.GARBAGE in faults:
            data = b"\x00\xff garbage }{ not-json\r\n"
        elif Fault.TRUNCATED in faults:
            self.writer.write(data[: len(data) // 2] + b"\r\n")
            await self.writer.drain()
            self.writer.close()
            raise _SessionClosedError("truncated reply sent")
        elif Fault.DISCONNECT_MID_REPLY in faults:
            self.writer.write(data[: len(data) // 2])
            await self.writer.drain()
            self.abort()
            raise _SessionClosedError("disconnected mid reply")
        elif Fault.HUGE_LINE in faults:
            await self._huge_line(reply)
            return
        self.writer.write(data)
        await self.writer.drain()

    async def _huge_line(self, reply: JSONObject) -> None:
        """Stream one valid reply line of about ``huge_line_bytes``, 1 MiB at a time."""
        reply_id = json.dumps(reply["id"]) if "id" in reply else None
        head = b'{"return": {"padding": "'
        tail = b'"}' + (b', "id": ' + reply_id.encode() if reply_id is not None else b"") + b"}\r\n"
        chunk = b"x" * MiB
        remaining = max(0, self.endpoint.params.huge_line_bytes - len(head) - len(tail))
        self.writer.write(head)
        while remaining > 0:
            piece = chunk if remaining >= len(chunk) else chunk[:remaining]
            self.writer.write(piece)
            remaining -= len(piece)
            await self.writer.drain()  # bounded memory: wait for the peer to take each chunk
        self.writer.write(tail)
        await self.writer.drain()


# --------------------------------------------------------------------------------------------------
# The fleet
# --------------------------------------------------------------------------------------------------


class FakeQMPFleet:
    """Many fake QMP endpoints served by one event loop, on unix sockets or 127.0.0.1 ports.

    ``time_scale`` maps simulated seconds to wall seconds: at 0.01 a 1 s calc-dirty-rate is measured
    after 10 ms. ``exclusive`` (default, as QEMU's socket chardev) serves one client per endpoint at a
    time: a second client connects but gets no greeting until the first leaves.
    """

    def __init__(
        self,
        *,
        transport: Transport = "unix",
        directory: Path | str | None = None,
        time_scale: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        exclusive: bool = True,
    ) -> None:
        if transport not in ("unix", "tcp"):
            raise ValueError(f"transport must be 'unix' or 'tcp', not {transport!r}")
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.transport: Transport = transport
        self.time_scale = time_scale
        self.clock = clock
        self.exclusive = exclusive
        self._directory = Path(directory) if directory is not None else None
        self._own_directory = False
        self._endpoints: dict[str, Endpoint] = {}
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- building --------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        vm: FakeVM | None = None,
        *,
        faults: Fault = Fault.NONE,
        params: FaultParams | None = None,
    ) -> Endpoint:
        """Declare an endpoint (before start; use :meth:`spawn` on a running fleet)."""
        if self._running:
            raise RuntimeError("fleet is running: use 'await fleet.spawn(...)'")
        return self._declare(name, vm, faults, params)

    def add_many(
        self,
        count: int,
        *,
        prefix: str = "vm",
        vm_factory: Callable[[int], FakeVM] | None = None,
        faults: Fault = Fault.NONE,
        params: FaultParams | None = None,
    ) -> list[Endpoint]:
        """Declare ``count`` endpoints named ``{prefix}0000``...; ``vm_factory(i)`` builds each VM."""
        width = max(4, len(str(count - 1)))
        return [
            self.add(
                f"{prefix}{i:0{width}d}",
                vm_factory(i) if vm_factory else FakeVM(seed=i),
                faults=faults,
                params=params,
            )
            for i in range(count)
        ]

    def _declare(self, name: str, vm: FakeVM | None, faults: Fault, params: FaultParams | None) -> Endpoint:
        if name in self._endpoints:
            raise ValueError(f"duplicate endpoint name {name!r}")
        if not name or "/" in name:
            raise ValueError(f"bad endpoint name {name!r}")
        ep = Endpoint(self, name, vm or FakeVM(), faults, params or FaultParams(), exclusive=self.exclusive)
        self._endpoints[name] = ep
        return ep

    def __getitem__(self, name: str) -> Endpoint:
        return self._endpoints[name]

    def __len__(self) -> int:
        return len(self._endpoints)

    @property
    def endpoints(self) -> list[Endpoint]:
        """All endpoints in the order they were added."""
        return list(self._endpoints.values())

    def addresses(self) -> dict[str, Address]:
        """Endpoint name -> address (valid once started)."""
        return {name: ep.address for name, ep in self._endpoints.items()}

    @property
    def directory(self) -> Path | None:
        """Where the unix sockets live (None for tcp)."""
        return self._directory

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and listen on every endpoint."""
        if self._running:
            raise RuntimeError("fleet already started")
        self._loop = asyncio.get_running_loop()
        if self.transport == "unix" and self._directory is None:
            # tmpfs when we can: binding a unix socket on ext4 costs ~0.8 ms, on tmpfs ~0.03 ms.
            shm = _SHM if os.access(_SHM, os.W_OK) else None
            self._directory = Path(tempfile.mkdtemp(prefix="fakeqmp-", dir=shm))
            self._own_directory = True
        self._running = True
        try:
            for ep in self._endpoints.values():
                await self._listen(ep)
        except BaseException:
            await self.stop()
            raise

    async def spawn(
        self,
        name: str,
        vm: FakeVM | None = None,
        *,
        faults: Fault = Fault.NONE,
        params: FaultParams | None = None,
    ) -> Endpoint:
        """Add and start an endpoint on a running fleet (a VM that appears later)."""
        ep = self._declare(name, vm, faults, params)
        await self._listen(ep)
        return ep

    async def stop(self) -> None:
        """Close every listener and connection; remove the sockets (and our temporary directory)."""
        self._running = False
        tasks: list[asyncio.Task[None]] = []
        for ep in self._endpoints.values():
            self._close_listener(ep)
            for session in list(ep._sessions):
                session.abort()
            tasks.extend(ep._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.transport == "unix" and self._directory is not None:
            for ep in self._endpoints.values():
                if isinstance(ep.address, str):
                    _unlink(ep.address)
            if self._own_directory:
                shutil.rmtree(self._directory, ignore_errors=True)
                self._directory, self._own_directory = None, False

    async def crash(self, name: str) -> None:
        """Make endpoint ``name`` die like a killed QEMU: connections drop, connects are refused."""
        await self._crash(self._endpoints[name])

    async def __aenter__(self) -> FakeQMPFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @contextlib.contextmanager
    def run_in_thread(self, *, timeout: float = 60.0) -> Iterator[FakeQMPFleet]:
        """Serve the fleet from a background thread with its own loop (sync tests, benchmarks)."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="fakeqmp-fleet", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
            try:
                yield self
            finally:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            loop.close()

    def call(self, coro: Coroutine[Any, Any, _T], *, timeout: float = 60.0) -> _T:
        """Run ``coro`` on the fleet's loop from another thread (with :meth:`run_in_thread`)."""
        if self._loop is None:
            raise RuntimeError("fleet not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---- internals -------------------------------------------------------------------------------

    async def _listen(self, ep: Endpoint) -> None:
        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.get_running_loop().create_task(self._serve(ep, reader, writer))
            ep._tasks.add(task)
            task.add_done_callback(ep._tasks.discard)

        refuse = Fault.REFUSE_CONNECT in ep.faults
        if self.transport == "unix":
            assert self._directory is not None
            path = self._directory / f"{ep.name}.sock"
            if len(str(path).encode()) > 107:
                raise ValueError(f"unix socket path too long: {path}")
            path.unlink(missing_ok=True)
            ep.address = str(path)
            if refuse:
                # Bound but never listening: connect() gets ECONNREFUSED, like a dead QEMU's socket.
                ep._refuser = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                ep._refuser.bind(str(path))
            else:
                ep._server = await asyncio.start_unix_server(on_connect, path=str(path), backlog=128)
        elif refuse:
            ep._refuser = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ep._refuser.bind((LOOPBACK, 0))
            ep.address = (LOOPBACK, ep._refuser.getsockname()[1])
        else:
            ep._server = await asyncio.start_server(on_connect, host=LOOPBACK, port=0, backlog=128)
            ep.address = (LOOPBACK, ep._server.sockets[0].getsockname()[1])

    async def _serve(self, ep: Endpoint, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ep.connections += 1
        ep.concurrent += 1
        ep.max_concurrent = max(ep.max_concurrent, ep.concurrent)
        session = _Session(ep, reader, writer)
        ep._sessions.add(session)
        try:
            if ep.exclusive:
                # QEMU's chardev takes one client at a time; the others wait unanswered.
                async with ep._lock:
                    if not ep.crashed:
                        await session.run()
            else:
                await session.run()
        except (_SessionClosedError, ConnectionError):
            pass
        finally:
            ep._sessions.discard(session)
            ep.concurrent -= 1
            if not writer.is_closing():
                writer.close()

    def _close_listener(self, ep: Endpoint) -> None:
        if ep._server is not None:
            ep._server.close()
            ep._server = None
        if ep._refuser is not None:
            ep._refuser.close()
            ep._refuser = None

    async def _crash(self, ep: Endpoint) -> None:
        ep.crashed = True
        self._close_listener(ep)
        # A crashed QEMU leaves its socket behind: keep the address bound but not listening, so
        # connects are refused (and a tcp port is not handed to someone else).
        family = socket.AF_UNIX if isinstance(ep.address, str) else socket.AF_INET
        refuser = socket.socket(family, socket.SOCK_STREAM)
        try:
            if isinstance(ep.address, str):
                _unlink(ep.address)
            else:
                refuser.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            refuser.bind(ep.address)
        except OSError:
            refuser.close()
        else:
            ep._refuser = refuser
        for session in list(ep._sessions):
            session.abort()
        await asyncio.sleep(0)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parse_version(text: str) -> Version:
    parts = [int(p) for p in text.split(".")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("version must be MAJOR.MINOR.MICRO")
    return parts[0], parts[1], parts[2]


def _parse_fault(text: str) -> Fault:
    try:
        return Fault[text.upper().replace("-", "_")]
    except KeyError:
        names = ", ".join(f.name.lower().replace("_", "-") for f in Fault if f.name and f is not Fault.NONE)
        raise argparse.ArgumentTypeError(f"unknown fault {text!r}; one of: {names}") from None


async def _serve_cli(args: argparse.Namespace) -> None:
    fleet = FakeQMPFleet(
        transport="tcp" if args.tcp else "unix", directory=args.dir, time_scale=args.time_scale
    )
    faults = Fault.NONE
    for fault in args.fault:
        faults |= fault
    params = FaultParams(command=args.fault_command, delay_seconds=args.delay)

    def make_vm(i: int) -> FakeVM:
        return FakeVM(
            memory_bytes=args.memory_mib * MiB,
            version=args.qemu_version,
            package=args.package,
            extended_output=args.extended,
            seed=i,
        )

    fleet.add_many(args.count, prefix=args.prefix, vm_factory=make_vm, faults=faults, params=params)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with fleet:
        for name, address in fleet.addresses().items():
            shown = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
            print(f"{name} {shown}")
        print("ready", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m migpredictd.lab.fakeqmp``: serve N fake VMs until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m migpredictd.lab.fakeqmp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=1, help="number of endpoints")
    parser.add_argument("--dir", type=Path, help="directory for the unix sockets (default: a temp dir)")
    parser.add_argument("--tcp", action="store_true", help="listen on 127.0.0.1 ephemeral ports instead")
    parser.add_argument("--prefix", default="vm", help="endpoint name prefix")
    parser.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per simulated second")
    parser.add_argument("--qemu-version", type=_parse_version, default=(7, 2, 22))
    parser.add_argument("--package", default="Debian 1:7.2+dfsg-7+deb12u7")
    parser.add_argument("--memory-mib", type=int, default=512)
    parser.add_argument(
        "--extended", action="store_true", help="extended calc-dirty-rate output (the unmerged 2023 patch)"
    )
    parser.add_argument(
        "--fault",
        type=_parse_fault,
        action="append",
        default=[],
        help="inject a fault into every endpoint (repeatable), e.g. slow, garbage",
    )
    parser.add_argument("--fault-command", help="reply faults hit only this command")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds of delay for --fault slow")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_cli(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
