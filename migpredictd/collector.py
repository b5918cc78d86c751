"""Prometheus exposition of the latest results.

:func:`target_samples` is the single definition of every per-target series. Two consumers read it:

- :class:`TargetCollector`, a prometheus_client custom collector (fresh families at each collect());
- :class:`MetricsRenderer`, which renders each target's text once per result and serves the joined
  bytes, because 10,000 VMs x 48 grid cells is a million samples and re-rendering them all at each
  scrape would take seconds (issue 7).

Nothing here talks to a VM: a scrape reads a :class:`~migpredictd.state.State` snapshot.
"""

from __future__ import annotations

import math
import platform
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from migpredictd import __version__
from migpredictd.errors import FAILURE_REASONS
from migpredictd.state import State, TargetState
from migpredictd.units import format_bandwidth, format_downtime

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
        "Smallest bandwidth at which the migration converges with this max downtime; absent if none. " + _AGE,
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
        "migpredictd_zero_pages_estimate_bytes", "gauge",
        "Estimated guest RAM in zero pages (sent as 9 bytes per page); absent when unknown. " + _AGE, ("vm",),
    ),
)  # fmt: skip
_BY_NAME: Final = {f.name: f for f in FAMILIES}

Sample = tuple[str, Mapping[str, str], float]


def _period_label(seconds: float) -> str:
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def target_samples(t: TargetState) -> Iterator[Sample]:
    """Every per-target sample as (family name, labels, value), in family order."""
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
    p, g = t.prediction, t.grid
    if p is not None and g is not None:
        bw_labels = g.bandwidth_labels or tuple(format_bandwidth(b) for b in g.bandwidths)
        dt_labels = g.downtime_labels or tuple(format_downtime(d) for d in g.downtimes)
        cells = [
            (i, j, {"vm": t.name, "bandwidth": b, "max_downtime": d})
            for i, b in enumerate(bw_labels)
            for j, d in enumerate(dt_labels)
        ]
        for i, j, lab in cells:
            yield "migpredictd_migration_converges", lab, 0.0 if math.isnan(p.seconds[i, j]) else 1.0
        for i, j, lab in cells:
            if not math.isnan(p.seconds[i, j]):
                yield "migpredictd_predicted_migration_seconds", lab, float(p.seconds[i, j])
        for i, j, lab in cells:
            if not math.isnan(p.downtime_seconds[i, j]):
                yield "migpredictd_predicted_downtime_seconds", lab, float(p.downtime_seconds[i, j])
        for i, j, lab in cells:
            yield "migpredictd_predicted_passes", lab, float(p.passes[i, j])
        for i, j, lab in cells:
            yield "migpredictd_predicted_transferred_bytes", lab, float(p.bytes_sent[i, j])
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
        yield "migpredictd_guest_memory_bytes", vm, float(m.memory_bytes)
        if m.zero_pages is not None:
            yield "migpredictd_zero_pages_estimate_bytes", vm, m.zero_pages * m.page_size_bytes


class TargetCollector(Collector):
    """prometheus_client collector over a :class:`State`: fresh families at every collect()."""

    def __init__(self, state: State) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for f in FAMILIES:
            cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
            name = f.name.removesuffix("_total") if f.kind == "counter" else f.name
            families[f.name] = cls(name, f.help, labels=None)
        for t in self._state.snapshot().values():
            for name, labels, value in target_samples(t):
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
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _render_target(t: TargetState) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for name, labels, value in target_samples(t):
        lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        out.setdefault(name, []).append(f"{name}{{{lab}}} {_format_value(value)}\n")
    return {k: "".join(v) for k, v in out.items()}


class MetricsRenderer:
    """Serves ``/metrics`` bytes: each target is rendered once per change; the body once per state version."""

    def __init__(self, state: State, registry: CollectorRegistry) -> None:
        self._state = state
        self._registry = registry  # process, build info, reload status
        self._lock = threading.Lock()
        self._per_target: dict[str, tuple[int, dict[str, str]]] = {}
        self._body: tuple[int, bytes] | None = None

    def render(self) -> bytes:
        with self._lock:
            version = self._state.version
            if self._body is not None and self._body[0] == version:
                return self._body[1] + generate_latest(self._registry)
            snapshot = self._state.snapshot()
            cache: dict[str, tuple[int, dict[str, str]]] = {}
            for name, t in snapshot.items():
                hit = self._per_target.get(name)
                cache[name] = (
                    hit if hit is not None and hit[0] == t.version else (t.version, _render_target(t))
                )
            self._per_target = cache
            parts: list[str] = []
            for f in FAMILIES:
                parts.append(f"# HELP {f.name.removesuffix('_total')} {f.help}\n")
                parts.append(f"# TYPE {f.name.removesuffix('_total')} {f.kind}\n")
                parts.extend(chunks[f.name] for _, chunks in cache.values() if f.name in chunks)
            body = "".join(parts).encode()
            self._body = (version, body)
            return body + generate_latest(self._registry)
