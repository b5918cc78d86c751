"""Prometheus exposition of the latest results.

:func:`target_samples` is the single definition of every per-target series. Two consumers read it:

- :class:`TargetCollector`, a prometheus_client custom collector (fresh families at each collect());
- :class:`MetricsRenderer`, which renders each target's text once per result, keeps it compact (the
  grid families as raw-deflate segments) and streams ``/metrics`` family by family, because 10,000 VMs
  x 48 grid cells are a million samples: re-rendering them at each scrape would take seconds and
  holding the joined body hundreds of MB (issue 7, docs/performance.md).

The per-cell downtime, passes and transferred-bytes families are opt-in (``details``; the daemon takes
``global.exposition.per_cell_details``). Nothing here talks to a VM: a scrape reads a
:class:`~migpredictd.serve.state.State` snapshot.
"""

from __future__ import annotations

import itertools
import math
import platform
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from migpredictd import __version__
from migpredictd.core.errors import FAILURE_REASONS
from migpredictd.core.units import format_bandwidth, format_downtime
from migpredictd.serve.state import State, TargetState, unpack_policy

_AGE: Final = (
    "From the last successful measurement; see migpredictd_last_success_timestamp_seconds for its age."
)


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: str  # gauge | counter
    help: str
    labels: tuple[str, ...]


CELL = ("vm", "bandwidth", "max_downtime")
FAMILIES: Final = (
    Family("migpredictd_up", "gauge", "1 if the last measurement of the target succeeded, else 0.", ("vm",)),
    Family(
        "migpredictd_last_success_timestamp_seconds", "gauge",
        "Unix time of the last successful measurement of the target.", ("vm",),
    ),
    Family(
        "migpredictd_last_attempt_timestamp_seconds", "gauge",
        "Unix time the last measurement of the target ended, successful or not.", ("vm",),
    ),
    Family(
        "migpredictd_measurement_duration_seconds", "gauge",
        "How long the last measurement of the target took (the VM is sampled for most of it).", ("vm",),
    ),
    Family(
        "migpredictd_measurement_failures_total", "counter",
        "Failed or skipped measurements of the target, by reason.", ("vm", "reason"),
    ),
    Family(
        "migpredictd_target_info", "gauge",
        "Constant 1 with the target's QMP address, measurement strategy, QEMU version, zero-page method "
        "and configured labels. " + _AGE, ("vm",),
    ),
    Family(
        "migpredictd_migration_converges", "gauge",
        "1 if a pre-copy migration at this bandwidth and max downtime is predicted to converge, else 0. "
        + _AGE,
        CELL,
    ),
    Family(
        "migpredictd_predicted_migration_seconds", "gauge",
        "Predicted total pre-copy migration time; only present where it converges. " + _AGE, CELL,
    ),
    Family(
        "migpredictd_predicted_downtime_seconds", "gauge",
        "Predicted stop-and-copy time (the guest's pause); only present where it converges. " + _AGE, CELL,
    ),
    Family(
        "migpredictd_predicted_passes", "gauge",
        "Predicted number of passes over memory, the final stop-and-copy included. " + _AGE, CELL,
    ),
    Family(
        "migpredictd_predicted_transferred_bytes", "gauge",
        "Predicted bytes sent (RAM pages and headers), until completion or until it is given up. " + _AGE,
        CELL,
    ),
    Family(
        "migpredictd_min_converging_bandwidth_bytes_per_second", "gauge",
        "Smallest bandwidth at which the migration converges with this max downtime; 0 if any does; "
        "absent if none. " + _AGE,
        ("vm", "max_downtime"),
    ),
    Family(
        "migpredictd_min_downtime_seconds", "gauge",
        "Smallest max downtime at which the migration converges at this bandwidth; absent if none. " + _AGE,
        ("vm", "bandwidth"),
    ),
    Family(
        "migpredictd_dirty_rate_bytes_per_second", "gauge",
        "Distinct bytes dirtied within the period divided by the period (QEMU's dirty-rate). " + _AGE,
        ("vm", "period"),
    ),
    Family("migpredictd_guest_memory_bytes", "gauge", "Guest RAM size. " + _AGE, ("vm",)),
    Family(
        "migpredictd_measurement_hashed_pages", "gauge",
        "Guest pages QEMU hashed for the last measurement (two per sampled page and calc-dirty-rate run): "
        "its cost, 0.25-2 microseconds of QEMU CPU per page where measured (docs/measuring.md). " + _AGE,
        ("vm",),
    ),
    Family(
        "migpredictd_dirty_sampling_error_ratio", "gauge",
        "Relative standard error, from QEMU's page sampling alone, of the dirty pages at the shortest "
        "period (binomial over the sampled pages of every run of that period); absent if no sampled page "
        "changed. " + _AGE,
        ("vm",),
    ),
    Family(
        "migpredictd_policy_outcome", "gauge",
        "1 for what the orchestrator policy is predicted to do with the migration at this bandwidth "
        "(outcome: completed, aborted, postcopy or not_converged); global.policies or the target's own. "
        + _AGE,
        ("vm", "policy", "bandwidth", "outcome"),
    ),
    Family(
        "migpredictd_policy_migration_seconds", "gauge",
        "Predicted time until the VM runs on the destination under the policy (completed or post-copy); "
        "absent otherwise. " + _AGE,
        ("vm", "policy", "bandwidth"),
    ),
    Family(
        "migpredictd_zero_pages_estimate_bytes", "gauge",
        "Estimated guest RAM in zero pages (sent as 9 bytes per page); absent when unknown. " + _AGE, ("vm",),
    ),
)  # fmt: skip
_BY_NAME: Final = {f.name: f for f in FAMILIES}

Sample = tuple[str, Mapping[str, str], float]


def _period_label(seconds: float) -> str:
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


# Families with one sample per grid cell that only some users need: opt-in
# (``global.exposition.per_cell_details``), because each one adds a full grid of series per VM.
DETAIL_FAMILIES: Final = frozenset(
    {
        "migpredictd_predicted_downtime_seconds",
        "migpredictd_predicted_passes",
        "migpredictd_predicted_transferred_bytes",
    }
)
# Families whose samples come from the last prediction and measurement only (not the attempt status),
# and the policies' outcomes, which come with the derived answers of the same measurement: the renderer
# keeps their text as deflate segments until the prediction changes, so a failure re-renders a few lines.
RESULT_FAMILIES: Final = frozenset(
    {
        "migpredictd_migration_converges",
        "migpredictd_predicted_migration_seconds",
        "migpredictd_min_converging_bandwidth_bytes_per_second",
        "migpredictd_min_downtime_seconds",
        "migpredictd_dirty_rate_bytes_per_second",
        "migpredictd_policy_outcome",
        "migpredictd_policy_migration_seconds",
    }
    | DETAIL_FAMILIES
)
# Where each family's piece sits in a rendered target's tuple of plain pieces or of deflate segments
# (tuples: the dict per target and kind they replace took 0.2-0.3 kB each).
_PLAIN_SLOT: Final = {f.name: i for i, f in enumerate(f for f in FAMILIES if f.name not in RESULT_FAMILIES)}
_RESULT_SLOT: Final = {f.name: i for i, f in enumerate(f for f in FAMILIES if f.name in RESULT_FAMILIES)}


def families(*, details: bool = True) -> tuple[Family, ...]:
    """The per-target families exposed, in exposition order (detail families only with ``details``)."""
    return tuple(f for f in FAMILIES if details or f.name not in DETAIL_FAMILIES)


def target_samples(t: TargetState, *, details: bool = True) -> Iterator[Sample]:
    """Every per-target sample as (family name, labels, value), in family order.

    ``details`` adds the per-cell downtime, passes and transferred-bytes families.
    """
    yield from _status_samples(t)
    yield from _result_samples(t, details=details)
    yield from _memory_samples(t)
    yield from _policy_samples(t)


def _policy_samples(t: TargetState) -> Iterator[Sample]:
    """Each configured policy's outcome and time per grid bandwidth, from the last derived answers."""
    if not t.policies or t.grid is None:
        return
    g = t.grid
    labels = g.bandwidth_labels or tuple(format_bandwidth(b) for b in g.bandwidths)
    unpacked = {policy: unpack_policy(packed) for policy, packed in t.policies.items()}
    for policy, results in unpacked.items():
        for bw, (outcome, _) in zip(labels, results, strict=False):
            yield (
                "migpredictd_policy_outcome",
                {"vm": t.name, "policy": policy, "bandwidth": bw, "outcome": outcome},
                1.0,
            )
    for policy, results in unpacked.items():
        for bw, (_, s) in zip(labels, results, strict=False):
            if s is not None:
                yield (
                    "migpredictd_policy_migration_seconds",
                    {"vm": t.name, "policy": policy, "bandwidth": bw},
                    s,
                )


def _memory_samples(t: TargetState) -> Iterator[Sample]:
    """Guest memory and zero pages: one line each, from the last measurement."""
    m = t.measurement
    if m is not None:
        yield "migpredictd_guest_memory_bytes", {"vm": t.name}, float(m.memory_bytes)
        if m.sample_pages_per_gib is not None and m.strategy in ("sweep-ms", "sweep-s"):
            # QEMU samples used_length x sample-pages >> 30 pages of each RAM block, hashed at the start and
            # at the end of each run; a sweep is one run per period.
            sampled = (m.memory_bytes * m.sample_pages_per_gib) >> 30
            yield "migpredictd_measurement_hashed_pages", {"vm": t.name}, float(2 * sampled * len(m.points))
        if m.sampling_error is not None:
            yield "migpredictd_dirty_sampling_error_ratio", {"vm": t.name}, m.sampling_error
        if m.zero_pages is not None:
            yield "migpredictd_zero_pages_estimate_bytes", {"vm": t.name}, m.zero_pages * m.page_size_bytes


def _status_samples(t: TargetState) -> Iterator[Sample]:
    """The attempt status and target info: small, and new at every attempt."""
    vm = {"vm": t.name}
    yield "migpredictd_up", vm, 1.0 if t.up else 0.0
    if t.last_success is not None:
        yield "migpredictd_last_success_timestamp_seconds", vm, t.last_success
    if t.last_attempt is not None:
        yield "migpredictd_last_attempt_timestamp_seconds", vm, t.last_attempt
    if t.last_duration is not None:
        yield "migpredictd_measurement_duration_seconds", vm, t.last_duration
    for reason in FAILURE_REASONS:
        if reason in t.failures:
            yield (
                "migpredictd_measurement_failures_total",
                {"vm": t.name, "reason": reason},
                float(t.failures[reason]),
            )
    m = t.measurement
    info = {"vm": t.name, "qmp": t.qmp}
    if m is not None:
        info.update(
            strategy=m.strategy, qemu_version=m.qemu_version or "", zero_pages_method=m.zero_pages_method
        )
    info.update({k: v for k, v in t.labels.items() if k not in info})
    yield "migpredictd_target_info", info, 1.0


def _result_samples(t: TargetState, *, details: bool) -> Iterator[Sample]:
    """The grid and the dirty rates: one family of :data:`RESULT_FAMILIES` after another."""
    p, g, m = t.prediction, t.grid, t.measurement
    if p is not None and g is not None:
        bw_labels = g.bandwidth_labels or tuple(format_bandwidth(b) for b in g.bandwidths)
        dt_labels = g.downtime_labels or tuple(format_downtime(d) for d in g.downtimes)
        cells = [
            (i, j, {"vm": t.name, "bandwidth": b, "max_downtime": d})
            for i, b in enumerate(bw_labels)
            for j, d in enumerate(dt_labels)
        ]
        # Plain lists: indexing numpy arrays element by element costs more than the formatting.
        secs: list[list[float]] = p.seconds.tolist()
        for i, j, lab in cells:
            yield "migpredictd_migration_converges", lab, 0.0 if math.isnan(secs[i][j]) else 1.0
        for i, j, lab in cells:
            if not math.isnan(secs[i][j]):
                yield "migpredictd_predicted_migration_seconds", lab, secs[i][j]
        if details:
            down: list[list[float]] = p.downtime_seconds.tolist()
            passes: list[list[float]] = p.passes.tolist()
            sent: list[list[float]] = p.bytes_sent.tolist()
            for i, j, lab in cells:
                if not math.isnan(down[i][j]):
                    yield "migpredictd_predicted_downtime_seconds", lab, down[i][j]
            for i, j, lab in cells:
                yield "migpredictd_predicted_passes", lab, float(passes[i][j])
            for i, j, lab in cells:
                yield "migpredictd_predicted_transferred_bytes", lab, float(sent[i][j])
        for j, d in enumerate(dt_labels):
            if not math.isnan(p.min_bandwidth[j]):
                yield (
                    "migpredictd_min_converging_bandwidth_bytes_per_second",
                    {"vm": t.name, "max_downtime": d},
                    float(p.min_bandwidth[j]),
                )
        for i, b in enumerate(bw_labels):
            if not math.isnan(p.min_downtime[i]):
                yield (
                    "migpredictd_min_downtime_seconds",
                    {"vm": t.name, "bandwidth": b},
                    float(p.min_downtime[i]),
                )
    if m is not None:
        for period, rate in m.dirty_rate_bytes_per_second():
            yield (
                "migpredictd_dirty_rate_bytes_per_second",
                {"vm": t.name, "period": _period_label(period)},
                rate,
            )


class TargetCollector(Collector):
    """prometheus_client collector over a :class:`State`: fresh families at every collect()."""

    def __init__(self, state: State, *, details: bool = True) -> None:
        self._state = state
        self._details = details

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for f in FAMILIES:
            if not self._details and f.name in DETAIL_FAMILIES:
                continue
            cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
            name = f.name.removesuffix("_total") if f.kind == "counter" else f.name
            families[f.name] = cls(name, f.help, labels=None)
        for t in self._state.snapshot().values():
            for name, labels, value in target_samples(t, details=self._details):
                fam = families[name]
                fam.add_sample(name, dict(labels), value)
        yield from families.values()


class DaemonCollector(Collector):
    """Build info, config reload status and the number of targets."""

    def __init__(self, state: State) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "migpredictd_build_info",
            "Constant 1 with the version of migpredictd.",
            labels=["version", "python"],
        )
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info
        ok = GaugeMetricFamily(
            "migpredictd_config_last_reload_successful", "1 if the last config (re)load succeeded, else 0."
        )
        ok.add_metric([], 1.0 if self._state.reload_ok else 0.0)
        yield ok
        when = GaugeMetricFamily(
            "migpredictd_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        when.add_metric([], self._state.reload_success_time or 0.0)
        yield when
        count = GaugeMetricFamily("migpredictd_targets", "Targets in the current config (this shard).")
        count.add_metric([], float(len(self._state.snapshot())))
        yield count


def _escape(value: str) -> str:
    if "\\" not in value and "\n" not in value and '"' not in value:
        return value
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _render(samples: Iterable[Sample]) -> dict[str, str]:
    """Exposition lines of ``samples``, grouped by family."""
    out: dict[str, list[str]] = {}
    # The grid's label dicts are shared by five families: format each once. The memo keeps the dict
    # alive, so its id() cannot be reused by another dict during this call.
    memo: dict[int, tuple[Mapping[str, str], str]] = {}
    for name, labels, value in samples:
        hit = memo.get(id(labels))
        if hit is None:
            hit = labels, ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            memo[id(labels)] = hit
        out.setdefault(name, []).append(f"{name}{{{hit[1]}}} {_format_value(value)}\n")
    return {k: "".join(v) for k, v in out.items()}


def _deflate(text: str) -> bytes:
    """A raw-deflate segment of ``text`` that decompresses alone and concatenates with others.

    A fresh compressor (no history to refer back to) ended by a sync flush (byte-aligned, not the
    final block): segments can be spliced one after another into a gzip body without recompressing.
    """
    c = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15, 9)
    return c.compress(text.encode()) + c.flush(zlib.Z_SYNC_FLUSH)


def _inflate(segment: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(segment)


_LEVEL: Final = 6  # paid once per result, not per scrape: favour size (RSS) over speed
_FLUSH_BYTES: Final = 256 * 1024  # write in pieces of about this size: few syscalls, bounded buffers
_GZIP_HEADER: Final = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0


@dataclass(slots=True)
class _Rendered:
    """One target's text: status families as plain bytes, result families as deflate segments, each
    at its family's slot (:data:`_PLAIN_SLOT`, :data:`_RESULT_SLOT`; None where it has no samples)."""

    version: int
    plain: tuple[bytes | None, ...]
    result_key: tuple[object, ...]
    deflated: tuple[bytes | None, ...]


def _slots(pieces: Mapping[str, bytes], slot: Mapping[str, int]) -> tuple[bytes | None, ...]:
    out: list[bytes | None] = [None] * len(slot)
    for name, piece in pieces.items():
        out[slot[name]] = piece
    return tuple(out)


class MetricsRenderer:
    """Serves ``/metrics`` as a stream, each target rendered once per change (issue 7).

    10,000 VMs x 48 grid cells are about a million samples (100-200 MB of text): rendering them at
    each scrape would take seconds, and holding the body would take that much memory. So each target's
    text is rendered once when its state changes and kept compact: the few status lines as bytes, the
    grid families (the bulk) as raw-deflate segments, re-rendered only when the prediction changes. A
    scrape streams family after family, inflating the segments, or, for gzip, splicing them into the
    gzip stream as they are (only the CRC needs the inflated bytes).
    """

    def __init__(self, state: State, registry: CollectorRegistry, *, details: bool = True) -> None:
        self._state = state
        self._registry = registry  # process, build info, reload status
        self._lock = threading.Lock()
        self._cache: dict[str, _Rendered] = {}
        self._version: int | None = None
        self._details = details

    @property
    def details(self) -> bool:
        return self._details

    @details.setter
    def details(self, value: bool) -> None:
        with self._lock:
            if value != self._details:
                self._details = value
                self._cache.clear()
                self._version = None

    def refresh(self) -> int:
        """Render every target whose state changed; return how many. Call it off the event loop."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> int:
        version = self._state.version
        if version == self._version:
            return 0
        snapshot = self._state.snapshot()
        cache = self._cache
        for name in [n for n in cache if n not in snapshot]:
            del cache[name]
        rendered = 0
        for name, t in snapshot.items():
            hit = cache.get(name)
            if hit is None or hit.version != t.version:
                cache[name] = self._render_target(t, hit)
                rendered += 1
        self._version = version
        return rendered

    def _render_target(self, t: TargetState, old: _Rendered | None) -> _Rendered:
        key = (t.prediction, t.grid, t.measurement, t.policies, self._details)
        status = _render(itertools.chain(_status_samples(t), _memory_samples(t)))
        plain = _slots({k: v.encode() for k, v in status.items()}, _PLAIN_SLOT)
        # Identity, not equality: a new result is a new object, and numpy arrays do not compare to a bool.
        if (
            old is not None
            and len(old.result_key) == len(key)
            and all(a is b for a, b in zip(old.result_key, key, strict=True))
        ):
            deflated = old.deflated
        else:
            result = _render(itertools.chain(_result_samples(t, details=self._details), _policy_samples(t)))
            deflated = _slots({k: _deflate(v) for k, v in result.items()}, _RESULT_SLOT)
        return _Rendered(t.version, plain, key, deflated)

    def _entries(self) -> tuple[tuple[Family, ...], list[_Rendered]]:
        with self._lock:
            self._refresh()
            return families(details=self._details), list(self._cache.values())

    def chunks(self) -> Iterator[bytes]:
        """The exposition text in pieces of about 256 KiB, in family order."""
        fams, entries = self._entries()
        buf: list[bytes] = []
        size = 0
        for f in fams:
            buf.append(_header(f))
            result = f.name in RESULT_FAMILIES
            slot = _RESULT_SLOT[f.name] if result else _PLAIN_SLOT[f.name]
            for e in entries:
                piece = (e.deflated if result else e.plain)[slot]
                if piece is None:
                    continue
                if result:
                    piece = _inflate(piece)
                buf.append(piece)
                size += len(piece)
                if size >= _FLUSH_BYTES:
                    yield b"".join(buf)
                    buf, size = [], 0
        buf.append(generate_latest(self._registry))
        yield b"".join(buf)

    def gzip_chunks(self) -> Iterator[bytes]:
        """The same text as a gzip stream: result segments are spliced in, the rest compressed here."""
        fams, entries = self._entries()
        crc, length = 0, 0
        plain = zlib.compressobj(1, zlib.DEFLATED, -15, 9)  # per-scrape work: favour speed
        out: list[bytes] = [_GZIP_HEADER]
        size = 0

        def add_plain(data: bytes) -> None:
            nonlocal crc, length
            crc = zlib.crc32(data, crc)
            length += len(data)
            out.append(plain.compress(data))

        for f in fams:
            add_plain(_header(f))
            if f.name not in RESULT_FAMILIES:
                slot = _PLAIN_SLOT[f.name]
                for e in entries:
                    piece = e.plain[slot]
                    if piece is not None:
                        add_plain(piece)
                        size += len(piece)
            else:
                # A full flush ends the plain compressor's blocks and forgets its history, so nothing it
                # writes later refers back across the spliced segments.
                out.append(plain.flush(zlib.Z_FULL_FLUSH))
                slot = _RESULT_SLOT[f.name]
                for e in entries:
                    segment = e.deflated[slot]
                    if segment is None:
                        continue
                    text = _inflate(segment)
                    crc = zlib.crc32(text, crc)
                    length += len(text)
                    out.append(segment)
                    size += len(text)
            if size >= _FLUSH_BYTES:
                yield b"".join(out)
                out, size = [], 0
        add_plain(generate_latest(self._registry))
        out.append(plain.flush(zlib.Z_FINISH))
        out.append(struct.pack("<II", crc & 0xFFFFFFFF, length & 0xFFFFFFFF))
        yield b"".join(out)

    def render(self) -> bytes:
        """The whole exposition text at once (tests, small fleets)."""
        return b"".join(self.chunks())


def _header(f: Family) -> bytes:
    name = f.name.removesuffix("_total")
    return f"# HELP {name} {f.help}\n# TYPE {name} {f.kind}\n".encode()
