"""The daemon's YAML configuration: parse, validate every key, and freeze into a :class:`Config`.

YAML is composed into nodes (``yaml.compose``, libyaml when available), so every mapping key and sequence
item keeps its line; an explicit schema then walks the nodes and records *every* problem it finds as a
:class:`~migpredictd.core.errors.ConfigProblem` (file, line, dotted key such as ``targets[3].interval``)
before raising one :class:`~migpredictd.core.errors.ConfigError`. Nothing here talks to QEMU.

Targets come from the main file and, optionally, from ``targets_dir`` (``*.yaml`` / ``*.yml`` files,
each a list of targets or ``{targets: [...]}``); :func:`load_full_config` reads both. Run
``python -m migpredictd.config.schema FILE`` (or ``migpredictd check-config FILE``) to check a config.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from migpredictd.config.yamlsource import Node, Problems, join, read_yaml, type_name
from migpredictd.core.address import DomainRef, format_address, parse_address
from migpredictd.core.errors import ConfigError, ConfigProblem, InputError, UnitError
from migpredictd.core.policies import OPTIONS, POLICIES, THROTTLE_OPTIONS, Policy, make_policy
from migpredictd.core.predictor import (
    DEFAULT_BANDWIDTHS,
    DEFAULT_DOWNTIMES,
    DEFAULT_GRID,
    Grid,
    PredictorSettings,
)
from migpredictd.core.units import parse_bandwidth, parse_duration
from migpredictd.qemu.settings import (
    DEFAULT_PERIODS_MS,
    MAX_CALC_MS,
    MAX_GUEST_SAMPLE_PAGES,
    MAX_SAMPLE_PAGES,
    MAX_SWEEPS,
    MIN_CALC_MS,
    MIN_SAMPLE_PAGES,
    STRATEGIES,
    ZERO_PAGE_METHODS,
    MeasureSettings,
    libvirt_windows,
)

__all__ = [
    "DEFAULT_GRID",
    "Config",
    "Labels",
    "LibvirtSource",
    "MetadataLabels",
    "TargetConfig",
    "check_config_main",
    "load_config",
    "load_full_config",
    "load_targets_dir",
]

# --- the frozen result ---------------------------------------------------------------------------------


class Labels(Mapping[str, str]):
    """An immutable, hashable ``{label: value}`` mapping, so configs can be compared and hashed on reload."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None) -> None:
        self._items: dict[str, str] = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One VM to measure; ``source`` is ``file:line`` where it was defined, for messages."""

    name: str
    qmp: str
    labels: Mapping[str, str]
    interval_seconds: float
    measurement: MeasureSettings
    source: str
    # Set for a domain found through a ``libvirt:`` entry: measured through libvirt's API, not QMP.
    domain: DomainRef | None = None
    # The target's own ``policies`` (replacing global.policies for it); None: the global list.
    policies: tuple[Policy, ...] | None = None


@dataclass(frozen=True, slots=True)
class MetadataLabels:
    """Which of a domain's libvirt ``<metadata>`` to read: the element of ``namespace``; ``labels`` maps a
    label name to a path in it (``owner/project``, ``owner/project/@uuid``); only domains whose labels
    match every glob of ``match`` are measured, and with ``require`` only domains that have the element."""

    namespace: str
    labels: Mapping[str, str]
    match: Mapping[str, str]
    require: bool


@dataclass(frozen=True, slots=True)
class LibvirtSource:
    """One ``libvirt:`` entry: every running domain on ``uri`` whose name matches ``names`` and no
    ``exclude`` glob (and the metadata filter) becomes a target."""

    uri: str
    names: tuple[str, ...]
    exclude: tuple[str, ...]
    metadata: MetadataLabels | None
    labels: Mapping[str, str]
    interval_seconds: float
    measurement: MeasureSettings
    poll_seconds: float
    pid_dir: str
    source: str
    # The entry's own ``policies`` for its domains (replacing global.policies); None: the global list.
    policies: tuple[Policy, ...] | None = None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration. ``targets``: the main file's from :func:`load_config`, the main
    file's followed by ``targets_dir``'s from :func:`load_full_config`."""

    targets: tuple[TargetConfig, ...]
    interval_seconds: float
    jitter_seconds: float
    max_concurrent: int
    grid: Grid
    prediction: PredictorSettings
    measurement: MeasureSettings
    targets_dir: str | None  # the config file's directory joined with the value: cwd does not matter
    source: str
    # Also expose predicted downtime, passes and transferred bytes per grid cell (global.exposition).
    per_cell_details: bool = False
    # What orchestrators do with each VM's migration (global.policies; core/policies.py).
    policies: tuple[Policy, ...] = ()
    # Where domains are discovered through libvirt (the ``libvirt:`` list).
    libvirt: tuple[LibvirtSource, ...] = ()

    def policies_for(self, target: str) -> tuple[Policy, ...]:
        """The policies predicted for ``target``: its own list when it has one, else global.policies."""
        for t in self.targets:
            if t.name == target:
                return self.policies if t.policies is None else t.policies
        return self.policies


# --- limits and defaults ----------------------------------------------------------------------------------

# The seed's table: the grid everyone compares against.
DEFAULT_INTERVAL_SECONDS: Final = 300.0
DEFAULT_JITTER_SECONDS: Final = 30.0
DEFAULT_MAX_CONCURRENT: Final = 8

# Label cardinality: every grid cell is a label set on four per-VM series (converges, seconds, passes,
# bytes). 64 x 64 is the most a reader can still scan; 1,024 cells x 4 = 4,096 series per VM, so a
# thousand VMs stay at a few million series, about what one Prometheus server can hold.
MAX_GRID_AXIS: Final = 64
MAX_GRID_CELLS: Final = 1024
# QEMU refuses a downtime-limit above 2,000 s (MAX_MIGRATE_DOWNTIME_SECONDS in migration/options.c).
MAX_DOWNTIME_SECONDS: Final = 2000.0
# Each period becomes a `period` label value of migpredictd_dirty_rate_bytes_per_second.
MAX_PERIODS: Final = 32
# Below a second the scheduler would only queue runs that cannot finish: one sweep samples for seconds.
MIN_INTERVAL_SECONDS: Final = 1.0
# Hundreds of concurrent QMP sessions is already more than any host serves; this catches typos.
MAX_CONCURRENT: Final = 1024
# Names and labels end up in every series of the target: keep them bounded.
MAX_NAME_LENGTH: Final = 128
MAX_LABELS: Final = 16
MAX_LABEL_VALUE_LENGTH: Final = 256
# Label names our metrics use, the scraper's target labels, and exposition-reserved ones.
RESERVED_LABELS: Final = frozenset(
    {
        "vm", "bandwidth", "max_downtime", "period", "reason", "strategy", "qemu_version",
        "zero_pages_method", "version", "job", "instance", "le", "quantile", "uuid", "libvirt_uri", "uri",
    }
)  # fmt: skip
_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A YAML document expands aliases; this caps the nodes walked (a "billion laughs" file stops here).

DEFAULT_MEASUREMENT: Final = MeasureSettings()
DEFAULT_PREDICTION: Final = PredictorSettings()
PREDICTION_MODES: Final = ("qemu", "seed")


# --- schema helpers ----------------------------------------------------------------------------------------


def _mapping(
    y: Node, key: str, allowed: Sequence[str], p: Problems, *, extensions: bool = False
) -> dict[str, Node] | None:
    """The mapping's entries, reporting unknown keys (with a did-you-mean) and a non-mapping value.

    With ``extensions``, keys starting with ``x-`` are ignored: a place for YAML anchors, as in Compose files.
    """
    if not isinstance(y.value, dict):
        p.add(y.line, key, f"must be a mapping, not {type_name(y.value)}")
        return None
    for k, v in y.value.items():
        if k not in allowed and not (extensions and k.startswith("x-")):
            close = difflib.get_close_matches(k, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
            p.add(v.line, join(key, k), f"unknown key{hint}")
    return {k: v for k, v in y.value.items() if k in allowed}


def _string(y: Node, key: str, p: Problems) -> str | None:
    if isinstance(y.value, str):
        return y.value
    hint = f" (quote it: '{y.value}')" if isinstance(y.value, int | float | bool) else ""
    p.add(y.line, key, f"must be a string, not {type_name(y.value)}{hint}")
    return None


def _with_unit(y: Node, key: str, what: str, example: str, p: Problems) -> str | None:
    """The text of a value that must carry a unit: a bare ``30`` is ambiguous (ms? s?), so it is refused."""
    if isinstance(y.value, int | float) and not isinstance(y.value, bool):
        p.add(y.line, key, f"{what} {y.value!r} needs a unit, e.g. {example!r}")
        return None
    text = _string(y, key, p)
    if text is None:
        return None
    if not re.search(r"[A-Za-z/]\s*$", text):
        p.add(y.line, key, f"{what} {text!r} needs a unit, e.g. {example!r}")
        return None
    return text.strip()


def _duration(
    y: Node, key: str, p: Problems, *, minimum: float = 0.0, strict: bool = False, unlimited: bool = False
) -> float | None:
    """Seconds from ``30s``/``5m``/``500ms`` (``unlim`` when allowed), at least (or above) ``minimum``."""
    text = _with_unit(y, key, "duration", "30s", p)
    if text is None:
        return None
    try:
        seconds = parse_duration(text, allow_unlimited=unlimited)
    except UnitError as e:
        p.add(y.line, key, str(e))
        return None
    if seconds < minimum or (strict and seconds == minimum):
        bound = "greater than" if strict else "at least"
        p.add(y.line, key, f"must be {bound} {_fmt_seconds(minimum)}, not {text!r}")
        return None
    return seconds


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if 0 < seconds < 1 else f"{seconds:g}s"


def _integer(y: Node, key: str, p: Problems, *, low: int, high: int) -> int | None:
    if not isinstance(y.value, int) or isinstance(y.value, bool):
        p.add(y.line, key, f"must be an integer, not {type_name(y.value)}")
        return None
    if not low <= y.value <= high:
        p.add(y.line, key, f"must be in {low}..{high}, not {y.value}")
        return None
    return y.value


def _number(y: Node, key: str, p: Problems, *, low: float, high: float, strict: bool = False) -> float | None:
    if not isinstance(y.value, int | float) or isinstance(y.value, bool) or not math.isfinite(y.value):
        p.add(y.line, key, f"must be a finite number, not {type_name(y.value)} {y.value!r}")
        return None
    value = float(y.value)
    if not (low < value if strict else low <= value) or value > high:
        p.add(y.line, key, f"must be in {'(' if strict else '['}{low:g}, {high:g}], not {value:g}")
        return None
    return value


def _choice(y: Node, key: str, choices: Sequence[str], p: Problems) -> str | None:
    text = _string(y, key, p)
    if text is not None and text not in choices:
        p.add(y.line, key, f"must be one of {', '.join(choices)}, not {text!r}")
        return None
    return text


def _list(y: Node, key: str, p: Problems, *, high: int, what: str) -> list[Node] | None:
    if not isinstance(y.value, list):
        p.add(y.line, key, f"must be a list, not {type_name(y.value)}")
        return None
    if not y.value:
        p.add(y.line, key, f"needs at least one {what}")
        return None
    if len(y.value) > high:
        p.add(y.line, key, f"has {len(y.value)} {what}s; at most {high} are allowed (label cardinality)")
        return None
    return y.value


_Parser = Callable[[Node, str], object]  # returns the parsed value, or None after recording a problem


def _drop_nulls(entries: dict[str, Node]) -> dict[str, Node]:
    """``key:`` with nothing after it (say, every line below commented out) means "the default"."""
    return {k: v for k, v in entries.items() if v.value is not None}


def _fields(entries: dict[str, Node], key: str, specs: Mapping[str, tuple[str, _Parser]]) -> dict[str, Any]:
    """``{attribute: value}`` for the YAML keys present that parse; failures are already problems."""
    out: dict[str, Any] = {}
    for name, (attr, parse) in specs.items():
        if name in entries:
            value = parse(entries[name], join(key, name))
            if value is not None:
                out[attr] = value
    return out


# --- sections ----------------------------------------------------------------------------------------------

_MEASUREMENT_KEYS: Final = (
    "strategy", "periods", "sample_pages", "zero_pages", "zero_pages_helper", "guest_sample_pages",
    "connect_timeout", "command_timeout", "poll_interval", "settle_timeout",
)  # fmt: skip


def _measurement(y: Node, key: str, base: MeasureSettings, p: Problems) -> MeasureSettings:
    """``base`` with the keys given in ``y`` replaced (a target's section merges over the global one)."""
    entries = _mapping(y, key, _MEASUREMENT_KEYS, p)
    if entries is None:
        return base
    entries = _drop_nulls(entries) | ({"periods": entries["periods"]} if "periods" in entries else {})

    def duration(v: Node, k: str) -> float | None:
        return _duration(v, k, p, strict=True)

    def sample_pages(v: Node, k: str) -> int | None:
        return _integer(v, k, p, low=MIN_SAMPLE_PAGES, high=MAX_SAMPLE_PAGES)

    def guest_sample_pages(v: Node, k: str) -> int | None:
        return _integer(v, k, p, low=1, high=MAX_GUEST_SAMPLE_PAGES)

    def helper_socket(v: Node, k: str) -> str | None:
        text = _string(v, k, p)
        if text is not None and not (text.startswith("/") and len(text.encode()) <= 107):
            p.add(v.line, k, "must be an absolute unix socket path of at most 107 bytes")
            return None
        return text

    out = _fields(entries, key, {
        "strategy": ("strategy", lambda v, k: _choice(v, k, STRATEGIES, p)),
        "zero_pages": ("zero_pages", lambda v, k: _choice(v, k, ZERO_PAGE_METHODS, p)),
        "zero_pages_helper": ("zero_pages_helper", helper_socket),
        "sample_pages": ("sample_pages", sample_pages),
        "guest_sample_pages": ("guest_sample_pages", guest_sample_pages),
        "connect_timeout": ("connect_timeout", duration),
        "command_timeout": ("command_timeout", duration),
        "poll_interval": ("poll_interval", duration),
        "settle_timeout": ("settle_timeout", duration),
    })  # fmt: skip
    if "periods" in entries:
        periods_key = join(key, "periods")
        if entries["periods"].value is None:  # explicit null: back to the strategy's own periods
            out["periods_ms"] = None
        else:
            periods = _periods(entries["periods"], periods_key, p)
            if periods is not None:
                out["periods_ms"] = periods
    return dataclasses.replace(base, **out)


def _periods(y: Node, key: str, p: Problems) -> tuple[float, ...] | None:
    items = _list(y, key, p, high=MAX_PERIODS, what="period")
    if items is None:
        return None
    result: list[float] = []
    ok = True
    for i, item in enumerate(items):
        seconds = _duration(item, f"{key}[{i}]", p)
        if seconds is None:
            ok = False
            continue
        ms = seconds * 1000.0
        if not MIN_CALC_MS <= ms <= MAX_CALC_MS:
            p.add(
                item.line, f"{key}[{i}]", f"must be within 50ms..60s (calc-dirty-rate's range), not {ms:g}ms"
            )
            ok = False
        elif result and ms <= result[-1]:
            p.add(item.line, f"{key}[{i}]", "periods must increase strictly")
            ok = False
        result.append(ms)
    return tuple(result) if ok else None


def _check_measurement(m: MeasureSettings, interval: float, line: int, key: str, p: Problems) -> None:
    """Rules that involve more than one key, checked on the merged section."""
    if m.periods_ms is None:
        return
    if m.strategy == "sweep-s" and any(ms % 1000 or ms < 1000 for ms in m.periods_ms):
        p.add(line, join(key, "periods"), "strategy sweep-s (QEMU 7.2 .. 8.1) takes whole seconds only")
    total = sum(m.periods_ms) / 1000.0
    if total >= interval:
        p.add(
            line,
            join(key, "periods"),
            f"one sweep samples for {total:g}s, not less than the interval ({interval:g}s)",
        )


_PREDICTION_KEYS: Final = (
    "mode", "deadline", "setup", "switchover", "stop_copy_speedup", "transport_overhead", "iteration",
    "max_syncs",
)  # fmt: skip


def _prediction(y: Node, key: str, p: Problems) -> PredictorSettings:
    entries = _mapping(y, key, _PREDICTION_KEYS, p)
    if entries is None:
        return DEFAULT_PREDICTION
    entries = _drop_nulls(entries)

    def speedup(v: Node, k: str) -> float | None:
        return _number(v, k, p, low=0, high=100, strict=True)

    out = _fields(entries, key, {
        "mode": ("mode", lambda v, k: _choice(v, k, PREDICTION_MODES, p)),
        "deadline": ("deadline_seconds", lambda v, k: _duration(v, k, p, strict=True)),
        "setup": ("setup_seconds", lambda v, k: _duration(v, k, p)),
        "switchover": ("switchover_seconds", lambda v, k: _duration(v, k, p)),
        "iteration": ("iteration_seconds", lambda v, k: _duration(v, k, p, strict=True)),
        "stop_copy_speedup": ("stop_copy_speedup", speedup),
        "transport_overhead": ("transport_overhead", lambda v, k: _number(v, k, p, low=0, high=1)),
        "max_syncs": ("max_syncs", lambda v, k: _integer(v, k, p, low=2, high=1_000_000)),
    })  # fmt: skip
    try:
        return dataclasses.replace(DEFAULT_PREDICTION, **out)
    except ValueError as e:  # PredictorSettings' own checks; ours above should have caught it first
        p.add(y.line, key, str(e))
        return DEFAULT_PREDICTION


def _grid(y: Node, key: str, p: Problems) -> Grid:
    entries = _mapping(y, key, ("bandwidths", "max_downtimes"), p)
    if entries is None:
        return DEFAULT_GRID
    entries = _drop_nulls(entries)
    bandwidths: tuple[tuple[float, str], ...] | None = tuple(
        zip(DEFAULT_GRID.bandwidths, DEFAULT_BANDWIDTHS, strict=True)
    )
    downtimes: tuple[tuple[float, str], ...] | None = tuple(
        zip(DEFAULT_GRID.downtimes, DEFAULT_DOWNTIMES, strict=True)
    )
    if "bandwidths" in entries:
        bandwidths = _axis(entries["bandwidths"], join(key, "bandwidths"), p, _bandwidth, "bandwidth")
    if "max_downtimes" in entries:
        downtimes = _axis(entries["max_downtimes"], join(key, "max_downtimes"), p, _downtime, "max downtime")
    if bandwidths is None or downtimes is None:
        return DEFAULT_GRID
    cells = len(bandwidths) * len(downtimes)
    if cells > MAX_GRID_CELLS:
        p.add(
            y.line,
            key,
            f"{len(bandwidths)} x {len(downtimes)} = {cells} cells; at most {MAX_GRID_CELLS}"
            " (each cell is a label set on four series per VM)",
        )
        return DEFAULT_GRID
    return Grid(
        bandwidths=tuple(v for v, _ in bandwidths),
        downtimes=tuple(v for v, _ in downtimes),
        bandwidth_labels=tuple(label for _, label in bandwidths),
        downtime_labels=tuple(label for _, label in downtimes),
    )


def _bandwidth(y: Node, key: str, p: Problems) -> float | None:
    text = _with_unit(y, key, "bandwidth", "1Gbps", p)
    if text is None:
        return None
    try:
        return parse_bandwidth(text)
    except UnitError as e:
        p.add(y.line, key, str(e))
        return None


def _downtime(y: Node, key: str, p: Problems) -> float | None:
    seconds = _duration(y, key, p, unlimited=True)
    if seconds is not None and math.isfinite(seconds) and seconds > MAX_DOWNTIME_SECONDS:
        p.add(
            y.line,
            key,
            f"QEMU's downtime-limit is at most {MAX_DOWNTIME_SECONDS:g}s; use 'unlim' for no limit",
        )
        return None
    return seconds


def _axis(
    y: Node, key: str, p: Problems, parse: Callable[[Node, str, Problems], float | None], what: str
) -> tuple[tuple[float, str], ...] | None:
    """``(value, label)`` pairs, strictly increasing (no duplicates; tables and derived answers read in
    order). The label is the text as written: it is the metric label value."""
    items = _list(y, key, p, high=MAX_GRID_AXIS, what=what)
    if items is None:
        return None
    result: list[tuple[float, str]] = []
    ok = True
    for i, item in enumerate(items):
        value = parse(item, f"{key}[{i}]", p)
        if value is None:
            ok = False
            continue
        label = str(item.value).strip()
        if result and value <= result[-1][0]:
            same = [lbl for v, lbl in result if v == value]
            why = f"same as {same[0]!r}" if same else f"not above {result[-1][1]!r}"
            p.add(item.line, f"{key}[{i}]", f"must increase strictly ({why})")
            ok = False
        result.append((value, label))
    return tuple(result) if ok else None


# --- targets -----------------------------------------------------------------------------------------------

_TARGET_KEYS: Final = ("name", "qmp", "labels", "interval", "measurement", "policies")


@dataclass(frozen=True, slots=True)
class _Defaults:
    interval: float
    jitter: float
    measurement: MeasureSettings


def _qmp_address(y: Node, key: str, p: Problems) -> str | None:
    """Check the address with the measure edge's own parser (``unix:/path``, ``tcp:HOST:PORT``, ``/path``)."""
    text = _string(y, key, p)
    if text is None:
        return None
    problem = _qmp_problem(text)
    if problem:
        p.add(y.line, key, problem)
        return None
    return text


def _qmp_problem(text: str) -> str | None:
    try:
        parse_address(text)
    except InputError as e:
        return e.message
    return None


def _qmp_identity(text: str) -> str:
    """One spelling per socket, so two targets on the same monitor are caught however they write it."""
    address = parse_address(text)
    if isinstance(address, tuple):
        return format_address((address[0].lower(), address[1]))
    return format_address(os.path.normpath(address))


def _name(y: Node, key: str, p: Problems) -> str | None:
    text = _string(y, key, p)
    if text is None:
        return None
    if not text.strip():
        p.add(y.line, key, "must not be empty")
    elif len(text) > MAX_NAME_LENGTH:
        p.add(y.line, key, f"is {len(text)} characters long; at most {MAX_NAME_LENGTH}")
    elif text != text.strip() or not text.isprintable():
        p.add(y.line, key, f"{text!r} has leading/trailing spaces or control characters")
    else:
        return text
    return None


def _labels(y: Node, key: str, p: Problems) -> Labels | None:
    if not isinstance(y.value, dict):
        p.add(y.line, key, f"must be a mapping of label names to strings, not {type_name(y.value)}")
        return None
    if len(y.value) > MAX_LABELS:
        p.add(y.line, key, f"has {len(y.value)} labels; at most {MAX_LABELS} (each is on every series)")
        return None
    out: dict[str, str] = {}
    ok = True
    for name, v in y.value.items():
        k = join(key, name)
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            p.add(
                v.line, k, f"{name!r} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*, no '__' prefix)"
            )
            ok = False
        elif name in RESERVED_LABELS:
            p.add(v.line, k, f"{name!r} is a label migpredictd or Prometheus already uses")
            ok = False
        value = _string(v, k, p)
        if value is None:
            ok = False
        elif len(value) > MAX_LABEL_VALUE_LENGTH:
            p.add(v.line, k, f"value is {len(value)} characters long; at most {MAX_LABEL_VALUE_LENGTH}")
            ok = False
        else:
            out[name] = value
    return Labels(out) if ok else None


def _interval(entries: dict[str, Node], key: str, defaults: _Defaults, p: Problems) -> float | None:
    """The entry's ``interval`` (default: global.interval); None, with a problem, when it is not usable."""
    if "interval" not in entries:
        return defaults.interval
    interval = _duration(entries["interval"], join(key, "interval"), p, minimum=MIN_INTERVAL_SECONDS)
    if interval is not None and defaults.jitter >= interval:
        p.add(
            entries["interval"].line,
            join(key, "interval"),
            f"must be longer than global.jitter ({defaults.jitter:g}s)",
        )
        return None
    return interval


def _target(
    y: Node, key: str, defaults: _Defaults, p: Problems
) -> tuple[TargetConfig | None, dict[str, Node]]:
    """The target, or None when it has problems; also its entries, whose lines locate duplicates."""
    start = len(p.items)
    entries = _mapping(y, key, _TARGET_KEYS, p)
    if entries is None:
        return None, {}
    entries = _drop_nulls(entries)
    for required in ("name", "qmp"):
        if required not in entries:
            p.add(y.line, key, f"missing required key {required!r}")
    name = _name(entries["name"], join(key, "name"), p) if "name" in entries else None
    qmp = _qmp_address(entries["qmp"], join(key, "qmp"), p) if "qmp" in entries else None
    labels: Labels | None = Labels()
    if "labels" in entries:
        labels = _labels(entries["labels"], join(key, "labels"), p)
    interval = _interval(entries, key, defaults, p)
    before = len(p.items)
    measurement = defaults.measurement
    if "measurement" in entries:
        measurement = _measurement(entries["measurement"], join(key, "measurement"), measurement, p)
        if interval is not None and len(p.items) == before:
            _check_measurement(
                measurement, interval, entries["measurement"].line, join(key, "measurement"), p
            )
    elif interval is not None and "interval" in entries:
        _check_measurement(measurement, interval, entries["interval"].line, join(key, "interval"), p)
    policies: tuple[Policy, ...] | None = None
    if "policies" in entries:
        policies = _policies(entries["policies"], join(key, "policies"), p)
    if len(p.items) > start or name is None or qmp is None or labels is None or interval is None:
        return None, entries
    target = TargetConfig(
        name=name,
        qmp=qmp,
        labels=labels,
        interval_seconds=interval,
        measurement=measurement,
        source=f"{p.file}:{y.line}",
        policies=policies,
    )
    return target, entries


class _Registry:
    """Names and QMP sockets seen so far, across files, to report duplicates once with both places."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.sockets: dict[str, tuple[str, str]] = {}

    def add(self, target: TargetConfig, where: str) -> tuple[str | None, str | None]:
        """Register; return a problem for the name and for the socket (None when fine)."""
        name_problem = socket_problem = None
        first = self.names.setdefault(target.name, where)
        if first != where:
            name_problem = f"duplicate target name {target.name!r} (first defined at {first})"
        identity = _qmp_identity(target.qmp)
        other = self.sockets.setdefault(identity, (target.name, where))
        if other[1] != where and name_problem is None:
            socket_problem = (
                f"target {target.name!r} uses the same QMP socket as {other[0]!r} ({other[1]});"
                " a monitor serves one client at a time"
            )
        return name_problem, socket_problem

    def add_name_only(self, name: str, where: str) -> str | None:
        first = self.names.setdefault(name, where)
        return f"duplicate target name {name!r} (first defined at {first})" if first != where else None


def _targets(
    items: list[Node], key: str, defaults: _Defaults, registry: _Registry, p: Problems
) -> list[TargetConfig]:
    result: list[TargetConfig] = []
    for i, item in enumerate(items):
        tkey = f"{key}[{i}]"
        target, entries = _target(item, tkey, defaults, p)
        name_node = entries.get("name")
        if target is not None:
            name_problem, socket_problem = registry.add(target, target.source)
            if name_problem:
                p.add(entries["name"].line, join(tkey, "name"), name_problem)
            elif socket_problem:
                p.add(entries["qmp"].line, join(tkey, "qmp"), socket_problem)
            else:
                result.append(target)
        elif name_node is not None and isinstance(name_node.value, str) and name_node.value.strip():
            # A broken target still claims its name: its duplicate elsewhere is a problem of its own.
            problem = registry.add_name_only(name_node.value, f"{p.file}:{item.line}")
            if problem:
                p.add(name_node.line, join(tkey, "name"), problem)
    return result


# --- files -------------------------------------------------------------------------------------------------

_TOP_KEYS: Final = ("global", "targets_dir", "targets", "libvirt")
_GLOBAL_KEYS: Final = (
    "interval", "jitter", "max_concurrent", "measurement", "prediction", "grid", "exposition", "policies",
)  # fmt: skip
MAX_POLICIES: Final = 8


def _policies(y: Node, key: str, p: Problems) -> tuple[Policy, ...]:
    """``[nova, {name: kubevirt, options: {completionTimeoutPerGiB: 100}}]``: each policy once."""
    if not isinstance(y.value, list):
        p.add(y.line, key, f"must be a list of policies, not {type_name(y.value)}")
        return ()
    if len(y.value) > MAX_POLICIES:
        p.add(y.line, key, f"at most {MAX_POLICIES} policies")
        return ()
    out: list[Policy] = []
    for i, item in enumerate(y.value):
        k = f"{key}[{i}]"
        options: dict[str, str] = {}
        if isinstance(item.value, str):
            name = item.value
        elif isinstance(item.value, dict):
            entries = _mapping(item, k, ("name", "options"), p)
            if entries is None or "name" not in entries:
                p.add(item.line, k, "needs a name")
                continue
            name_text = _string(entries["name"], join(k, "name"), p)
            if name_text is None:
                continue
            name = name_text
            if "options" in entries and entries["options"].value is not None and name in POLICIES:
                known = (*OPTIONS[name], *THROTTLE_OPTIONS)
                for opt, node in (_mapping(entries["options"], join(k, "options"), known, p) or {}).items():
                    if isinstance(node.value, bool):
                        options[opt] = "true" if node.value else "false"
                    elif isinstance(node.value, int | float | str):
                        options[opt] = str(node.value)
                    else:
                        where = join(k, f"options.{opt}")
                        p.add(node.line, where, f"must be a scalar, not {type_name(node.value)}")
        else:
            p.add(item.line, k, f"must be a policy name or a mapping, not {type_name(item.value)}")
            continue
        try:
            policy = make_policy(name, options)
        except InputError as e:
            field = "name" if e.field == "policy" else f"options.{e.field}"
            p.add(item.line, join(k, field), str(e).split(": ", 1)[-1] if e.field else str(e))
            continue
        if any(q.name == policy.name for q in out):
            p.add(item.line, k, f"policy {name!r} is listed twice")
            continue
        out.append(policy)
    return tuple(out)


_EXPOSITION_KEYS: Final = ("per_cell_details",)


def _document(path: Path, p: Problems) -> Node | None:
    y = read_yaml(path, p)
    if y is None and not p.items:
        p.add(1, "", "the file is empty (write 'targets: []' for no targets)")
    return y


def load_config(path: str | Path) -> Config:
    """Read and validate the main config file. ``targets`` are the file's own targets only.

    :raises ConfigError: listing every problem found, each with file, line and key.
    """
    path = Path(path)
    p = Problems(str(path))
    y = _document(path, p)
    if y is None:
        raise ConfigError(p.sorted())
    top = _mapping(y, "", _TOP_KEYS, p, extensions=True)
    if top is None:
        raise ConfigError(p.sorted())

    interval, jitter, max_concurrent = (
        DEFAULT_INTERVAL_SECONDS,
        DEFAULT_JITTER_SECONDS,
        DEFAULT_MAX_CONCURRENT,
    )
    measurement, prediction, grid = DEFAULT_MEASUREMENT, DEFAULT_PREDICTION, DEFAULT_GRID
    top = _drop_nulls(top)
    g = _drop_nulls(_mapping(top["global"], "global", _GLOBAL_KEYS, p) or {}) if "global" in top else {}
    if "interval" in g:
        interval = _duration(g["interval"], "global.interval", p, minimum=MIN_INTERVAL_SECONDS) or interval
    if "jitter" in g:
        j = _duration(g["jitter"], "global.jitter", p)
        if j is not None and j >= interval:
            p.add(g["jitter"].line, "global.jitter", f"must be shorter than global.interval ({interval:g}s)")
            jitter = 0.0  # already a problem: do not hold the targets' intervals against it too
        elif j is not None:
            jitter = j
    if "max_concurrent" in g:
        mc = _integer(g["max_concurrent"], "global.max_concurrent", p, low=1, high=MAX_CONCURRENT)
        max_concurrent = mc if mc is not None else max_concurrent
    if "measurement" in g:
        before = len(p.items)
        measurement = _measurement(g["measurement"], "global.measurement", DEFAULT_MEASUREMENT, p)
        if len(p.items) == before:
            _check_measurement(measurement, interval, g["measurement"].line, "global.measurement", p)
    if "prediction" in g:
        prediction = _prediction(g["prediction"], "global.prediction", p)
    if "grid" in g:
        grid = _grid(g["grid"], "global.grid", p)
    policies: tuple[Policy, ...] = ()
    if "policies" in g:
        policies = _policies(g["policies"], "global.policies", p)
    per_cell_details = False
    if "exposition" in g:
        e = _drop_nulls(_mapping(g["exposition"], "global.exposition", _EXPOSITION_KEYS, p) or {})
        if "per_cell_details" in e:
            y = e["per_cell_details"]
            if isinstance(y.value, bool):
                per_cell_details = y.value
            else:
                p.add(y.line, "global.exposition.per_cell_details", f"must be true or false, not {y.value!r}")

    targets_dir: str | None = None
    if "targets_dir" in top:
        text = _string(top["targets_dir"], "targets_dir", p)
        if text is not None and not text.strip():
            p.add(top["targets_dir"].line, "targets_dir", "must not be empty (omit it or write null)")
        elif text is not None:
            # Relative to the config file, so the daemon's working directory does not matter.
            targets_dir = str(path.parent / os.path.expanduser(text))

    targets: list[TargetConfig] = []
    if "targets" in top:
        if isinstance(top["targets"].value, list):
            defaults = _Defaults(interval, jitter, measurement)
            targets = _targets(top["targets"].value, "targets", defaults, _Registry(), p)
        else:
            p.add(top["targets"].line, "targets", f"must be a list, not {type_name(top['targets'].value)}")
    libvirt: tuple[LibvirtSource, ...] = ()
    if "libvirt" in top:
        libvirt = _libvirt_sources(top["libvirt"], _Defaults(interval, jitter, measurement), p)
    if p.items:
        raise ConfigError(p.sorted())
    return Config(
        targets=tuple(targets),
        interval_seconds=interval,
        jitter_seconds=jitter,
        max_concurrent=max_concurrent,
        grid=grid,
        prediction=prediction,
        measurement=measurement,
        targets_dir=targets_dir,
        source=str(path),
        per_cell_details=per_cell_details,
        policies=policies,
        libvirt=libvirt,
    )


# --- libvirt ------------------------------------------------------------------------------------------------

_LIBVIRT_KEYS: Final = (
    "uri", "names", "exclude", "metadata", "labels", "interval", "measurement", "poll_interval", "pid_dir",
    "policies",
)  # fmt: skip
_LIBVIRT_MEASUREMENT_KEYS: Final = (
    "periods", "zero_pages", "zero_pages_helper", "guest_sample_pages", "target_sampling_error", "max_sweeps",
    "command_timeout", "poll_interval", "settle_timeout",
)  # fmt: skip
_METADATA_KEYS: Final = ("namespace", "labels", "match", "require")
MAX_LIBVIRT_SOURCES: Final = 16
MAX_GLOBS: Final = 64
DEFAULT_LIBVIRT_POLL_SECONDS: Final = 15.0
MIN_LIBVIRT_POLL_SECONDS: Final = 1.0
MAX_LIBVIRT_POLL_SECONDS: Final = 600.0
DEFAULT_LIBVIRT_PID_DIR: Final = "/run/libvirt/qemu"
_METADATA_PATH = re.compile(
    r"^[A-Za-z_][\w.-]*(/[A-Za-z_][\w.-]*)*(/@[A-Za-z_][\w.-]*)?$|^@[A-Za-z_][\w.-]*$"
)


def _globs(y: Node, key: str, p: Problems, *, empty_ok: bool = False) -> tuple[str, ...] | None:
    if empty_ok and y.value == []:
        return ()
    items = _list(y, key, p, high=MAX_GLOBS, what="name pattern")
    if items is None:
        return None
    out = []
    for i, item in enumerate(items):
        text = _string(item, f"{key}[{i}]", p)
        if text is not None and not text:
            p.add(item.line, f"{key}[{i}]", "must not be empty")
        elif text is not None:
            out.append(text)
    return tuple(out) if len(out) == len(items) else None


def _metadata(y: Node, key: str, p: Problems) -> MetadataLabels | None:
    entries = _mapping(y, key, _METADATA_KEYS, p)
    if entries is None:
        return None
    entries = _drop_nulls(entries)
    if "namespace" not in entries:
        p.add(y.line, key, "missing required key 'namespace' (the metadata element's XML namespace URI)")
        return None
    namespace = _string(entries["namespace"], join(key, "namespace"), p)
    if namespace is not None and not namespace.strip():
        p.add(entries["namespace"].line, join(key, "namespace"), "must not be empty")
        namespace = None
    paths: dict[str, str] = {}
    if "labels" in entries:
        lkey = join(key, "labels")
        labels = _labels(entries["labels"], lkey, p)
        for name, path in (labels or {}).items():
            if not _METADATA_PATH.match(path):
                node = entries["labels"].value[name]
                p.add(
                    node.line,
                    join(lkey, name),
                    f"{path!r} is not a path like 'owner/project' or 'owner/project/@uuid'",
                )
            else:
                paths[name] = path
    match: dict[str, str] = {}
    if "match" in entries:
        mkey = join(key, "match")
        m = _mapping(entries["match"], mkey, tuple(paths), p)
        for name, node in (m or {}).items():
            text = _string(node, join(mkey, name), p)
            if text is not None:
                match[name] = text
    require = False
    if "require" in entries:
        node = entries["require"]
        if isinstance(node.value, bool):
            require = node.value
        else:
            p.add(node.line, join(key, "require"), f"must be true or false, not {node.value!r}")
    if namespace is None:
        return None
    return MetadataLabels(namespace=namespace, labels=Labels(paths), match=Labels(match), require=require)


def _libvirt_measurement(y: Node, key: str, base: MeasureSettings, p: Problems) -> MeasureSettings:
    entries = _mapping(y, key, _LIBVIRT_MEASUREMENT_KEYS, p)
    if entries is None:
        return base
    generic = {k: v for k, v in entries.items() if k in _MEASUREMENT_KEYS}
    out = _measurement(Node(generic, y.line), key, base, p) if generic else base
    entries = _drop_nulls(entries)
    if "target_sampling_error" in entries:
        v = _number(
            entries["target_sampling_error"], join(key, "target_sampling_error"), p, low=0.001, high=1.0
        )
        if v is not None:
            out = dataclasses.replace(out, target_sampling_error=v)
    if "max_sweeps" in entries:
        n = _integer(entries["max_sweeps"], join(key, "max_sweeps"), p, low=1, high=MAX_SWEEPS)
        if n is not None:
            out = dataclasses.replace(out, max_sweeps=n)
    return out


def _check_libvirt_periods(m: MeasureSettings, line: int, key: str, p: Problems, *, inherited: bool) -> None:
    try:
        libvirt_windows(m.periods_ms)
    except InputError as e:
        hint = " (from global.measurement: give the entry its own measurement.periods)" if inherited else ""
        index = (e.field or "").removeprefix("periods_ms")
        p.add(line, join(key, f"periods{index}"), f"{e.message}{hint}")


def _libvirt_sources(y: Node, defaults: _Defaults, p: Problems) -> tuple[LibvirtSource, ...]:
    """The ``libvirt:`` list: ``[{uri: "qemu:///system"}]`` at least."""
    items = _list(y, "libvirt", p, high=MAX_LIBVIRT_SOURCES, what="libvirt entry")
    if items is None:
        return ()
    out: list[LibvirtSource] = []
    seen: dict[tuple[str, tuple[str, ...], tuple[str, ...]], int] = {}
    for i, item in enumerate(items):
        key = f"libvirt[{i}]"
        start = len(p.items)
        entries = _mapping(item, key, _LIBVIRT_KEYS, p)
        if entries is None:
            continue
        entries = _drop_nulls(entries)
        if "uri" not in entries:
            p.add(item.line, key, "missing required key 'uri' (e.g. qemu:///system)")
            continue
        uri = _string(entries["uri"], join(key, "uri"), p)
        if uri is not None and (not uri.strip() or "://" not in uri or not uri.isprintable()):
            p.add(
                entries["uri"].line, join(key, "uri"), f"{uri!r} is not a libvirt URI such as qemu:///system"
            )
            uri = None
        names = _globs(entries["names"], join(key, "names"), p) if "names" in entries else ("*",)
        exclude = (
            _globs(entries["exclude"], join(key, "exclude"), p, empty_ok=True) if "exclude" in entries else ()
        )
        metadata = _metadata(entries["metadata"], join(key, "metadata"), p) if "metadata" in entries else None
        labels: Labels | None = Labels()
        if "labels" in entries:
            labels = _labels(entries["labels"], join(key, "labels"), p)
        if labels is not None and metadata is not None:
            for name in set(labels) & set(metadata.labels):
                p.add(
                    entries["labels"].line, join(key, f"labels.{name}"), f"{name!r} is also a metadata label"
                )
            if len(labels) + len(metadata.labels) > MAX_LABELS:
                p.add(
                    item.line,
                    key,
                    f"{len(labels)} labels and {len(metadata.labels)} metadata labels; at most {MAX_LABELS} "
                    "together (each is on every series of the domain, beside uuid and libvirt_uri)",
                )
        interval = _interval(entries, key, defaults, p)
        base = dataclasses.replace(defaults.measurement, strategy="auto", sample_pages=None)
        measurement = base
        mline = entries["measurement"].line if "measurement" in entries else item.line
        if "measurement" in entries:
            measurement = _libvirt_measurement(entries["measurement"], join(key, "measurement"), base, p)
        own_periods = (
            "measurement" in entries
            and isinstance(entries["measurement"].value, dict)
            and ("periods" in entries["measurement"].value)
        )
        _check_libvirt_periods(measurement, mline, join(key, "measurement"), p, inherited=not own_periods)
        if interval is not None:
            sweeps = (
                sum(measurement.periods_ms or DEFAULT_PERIODS_MS["sweep-s"]) / 1000.0 * measurement.max_sweeps
            )
            if sweeps >= interval:
                p.add(
                    mline,
                    join(key, "measurement"),
                    f"{measurement.max_sweeps} sweeps of the periods take up to {sweeps:g}s, not shorter "
                    f"than the interval ({interval:g}s): measurements would never stop",
                )
        poll = DEFAULT_LIBVIRT_POLL_SECONDS
        if "poll_interval" in entries:
            v = _duration(
                entries["poll_interval"], join(key, "poll_interval"), p, minimum=MIN_LIBVIRT_POLL_SECONDS
            )
            if v is not None and v > MAX_LIBVIRT_POLL_SECONDS:
                p.add(
                    entries["poll_interval"].line,
                    join(key, "poll_interval"),
                    f"at most {MAX_LIBVIRT_POLL_SECONDS:g}s",
                )
            elif v is not None:
                poll = v
        policies: tuple[Policy, ...] | None = None
        if "policies" in entries:
            policies = _policies(entries["policies"], join(key, "policies"), p)
        pid_dir = DEFAULT_LIBVIRT_PID_DIR
        if "pid_dir" in entries:
            text = _string(entries["pid_dir"], join(key, "pid_dir"), p)
            if text is not None and not text.startswith("/"):
                p.add(entries["pid_dir"].line, join(key, "pid_dir"), "must be an absolute directory")
            elif text is not None:
                pid_dir = text
        if (
            len(p.items) > start
            or uri is None
            or names is None
            or exclude is None
            or labels is None
            or interval is None
        ):
            continue
        identity = (uri, names, exclude)
        if identity in seen:
            p.add(
                item.line,
                key,
                f"the same URI and name patterns as libvirt[{seen[identity]}]: each domain would be"
                " measured twice",
            )
            continue
        seen[identity] = i
        out.append(
            LibvirtSource(
                uri=uri,
                names=names,
                exclude=exclude,
                metadata=metadata,
                labels=labels,
                interval_seconds=interval,
                measurement=measurement,
                poll_seconds=poll,
                pid_dir=pid_dir,
                source=f"{p.file}:{item.line}",
                policies=policies,
            )
        )
    return tuple(out)


def _target_files(directory: Path) -> list[Path]:
    # Hidden files are editors' swap files and atomic-write temporaries: never half-written targets.
    return sorted(
        f for f in directory.iterdir()
        if f.suffix in (".yaml", ".yml") and not f.name.startswith(".") and f.is_file()
    )  # fmt: skip


def load_targets_dir(directory: str | Path, defaults: Config) -> tuple[TargetConfig, ...]:
    """Targets from every ``*.yaml``/``*.yml`` file in ``directory`` (sorted by file name), with
    ``defaults``' interval and measurement; names must be unique across the files and ``defaults.targets``.

    :raises ConfigError: every problem of every file; a broken file does not hide the others'.
    """
    directory = Path(directory)
    problems: list[ConfigProblem] = []
    registry = _Registry()
    for t in defaults.targets:
        registry.add(t, t.source)
    try:
        files = _target_files(directory)
    except OSError as e:
        raise ConfigError([ConfigProblem(str(directory), None, "", f"cannot list: {e.strerror or e}")]) from e
    base = _Defaults(defaults.interval_seconds, defaults.jitter_seconds, defaults.measurement)
    result: list[TargetConfig] = []
    for file in files:
        p = Problems(str(file))
        y = _document(file, p)
        if y is not None:
            items: list[Node] | None = None
            if isinstance(y.value, list):
                items = y.value
            else:
                entries = _mapping(y, "", ("targets",), p, extensions=True)
                if entries is not None and "targets" not in entries:
                    p.add(y.line, "", "expected a list of targets or a mapping with 'targets'")
                elif entries is not None and not isinstance(entries["targets"].value, list):
                    value = entries["targets"]
                    p.add(value.line, "targets", f"must be a list, not {type_name(value.value)}")
                elif entries is not None:
                    items = entries["targets"].value
            if items is not None:
                result.extend(_targets(items, "targets", base, registry, p))
        problems.extend(p.sorted())
    if problems:
        raise ConfigError(problems)
    return tuple(result)


def load_full_config(path: str | Path) -> Config:
    """The main file plus ``targets_dir``: one :class:`Config` whose ``targets`` holds all of them.

    :raises ConfigError: the main file's problems, or else every problem of the targets directory.
    """
    config = load_config(path)
    if config.targets_dir is None:
        return config
    extra = load_targets_dir(config.targets_dir, config)
    return dataclasses.replace(config, targets=config.targets + extra)


def check_config_main(argv: list[str]) -> int:
    """``migpredictd check-config FILE``: print every problem (exit 1) or ``ok: N targets`` (exit 0)."""
    parser = argparse.ArgumentParser(
        prog="migpredictd check-config", description="Validate a migpredictd config file and its targets_dir."
    )
    parser.add_argument("file", help="the YAML config file")
    args = parser.parse_args(argv)
    try:
        config = load_full_config(args.file)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print(f"{len(e.problems)} problem{'s' if len(e.problems) != 1 else ''}", file=sys.stderr)
        return 1
    sources = f", {len(config.libvirt)} libvirt entries" if config.libvirt else ""
    print(f"ok: {len(config.targets)} targets{sources}")
    return 0


if __name__ == "__main__":
    sys.exit(check_config_main(sys.argv[1:]))
