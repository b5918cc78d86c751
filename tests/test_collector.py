"""The exposition: fixed metric names, bounded labels, no stale series, cached text == collector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from migpredictd.core.measurement import DirtyPoint, Measurement, parse_measurement
from migpredictd.core.model import build_model
from migpredictd.core.predictor import (
    DEFAULT_BANDWIDTHS,
    DEFAULT_DOWNTIMES,
    PredictorSettings,
    make_grid,
    predict_grid,
)
from migpredictd.serve.collector import DaemonCollector, MetricsRenderer, TargetCollector
from migpredictd.serve.state import State

DATA = Path(__file__).parent / "data"
GRID = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)


def _state() -> State:
    m = parse_measurement(json.loads((DATA / "cover_letter_sample.json").read_text()))
    (p,) = predict_grid([build_model(m)], GRID, PredictorSettings(mode="seed"))
    state = State()
    state.set_targets({"vm1": ("unix:/run/vm1.qmp", {"team": "db"}), "vm2": ("unix:/run/vm2.qmp", {})})
    state.record_success("vm1", m, p, GRID, at=1000.0, duration=62.5)
    state.record_failure("vm2", "connect", "target vm2: refused", at=1001.0, duration=0.01)
    state.record_failure("vm2", "connect", "target vm2: refused", at=1002.0, duration=0.01)
    return state


def _registry(state: State) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(TargetCollector(state))
    return reg


def test_fixed_names_and_values_follow_the_prediction() -> None:
    reg = _registry(_state())
    assert reg.get_sample_value("migpredictd_up", {"vm": "vm1"}) == 1.0
    assert reg.get_sample_value("migpredictd_up", {"vm": "vm2"}) == 0.0
    cell = {"vm": "vm1", "bandwidth": "100Mbps", "max_downtime": "unlim"}
    # The cover letter's 16m59s cell: converges, 1019 s (seed mode ceil to ms).
    assert reg.get_sample_value("migpredictd_migration_converges", cell) == 1.0
    secs = reg.get_sample_value("migpredictd_predicted_migration_seconds", cell)
    assert secs is not None
    assert math.ceil(secs) == 16 * 60 + 59
    no = {"vm": "vm1", "bandwidth": "1Gbps", "max_downtime": "125ms"}
    assert reg.get_sample_value("migpredictd_migration_converges", no) == 0.0
    assert reg.get_sample_value("migpredictd_predicted_migration_seconds", no) is None  # absent, not NaN
    assert (
        reg.get_sample_value("migpredictd_measurement_failures_total", {"vm": "vm2", "reason": "connect"})
        == 2
    )
    assert reg.get_sample_value("migpredictd_guest_memory_bytes", {"vm": "vm1"}) == 8392704 * 4096
    assert reg.get_sample_value("migpredictd_last_success_timestamp_seconds", {"vm": "vm1"}) == 1000.0


def test_grid_labels_are_bounded_by_the_grid() -> None:
    reg = _registry(_state())
    fams = {f.name: f for f in reg.collect()}
    conv = fams["migpredictd_migration_converges"].samples
    assert len(conv) == len(GRID.bandwidths) * len(GRID.downtimes)  # vm2 never succeeded: no grid
    assert {s.labels["bandwidth"] for s in conv} == set(GRID.bandwidth_labels)
    assert {s.labels["max_downtime"] for s in conv} == {
        "125ms",
        "250ms",
        "500ms",
        "1000ms",
        "5000ms",
        "unlim",
    }


def test_removed_target_leaves_no_series() -> None:
    state = _state()
    state.set_targets({"vm2": ("unix:/run/vm2.qmp", {})})
    text = generate_latest(_registry(state)).decode()
    assert 'vm="vm1"' not in text
    assert 'vm="vm2"' in text


def test_cached_rendering_equals_the_collector_and_parses() -> None:
    state = _state()
    reg = CollectorRegistry()
    reg.register(DaemonCollector(state))
    fast = MetricsRenderer(state, reg).render().decode()
    slow = generate_latest(_registry(state)).decode() + generate_latest(reg).decode()

    def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    assert samples(fast) == samples(slow)
    assert len(samples(fast)) > 48 * 4


def test_renderer_caches_until_the_state_changes() -> None:
    state = _state()
    r = MetricsRenderer(state, CollectorRegistry())
    first = r.render()
    assert r.render() == first
    state.record_failure("vm2", "timeout", "slow", at=1003.0, duration=5.0)
    assert b'reason="timeout"' in r.render()


def test_readme_documents_every_metric() -> None:
    from migpredictd.serve.collector import FAMILIES

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    names = [f.name for f in FAMILIES] + [
        "migpredictd_build_info",
        "migpredictd_config_last_reload_successful",
        "migpredictd_config_last_reload_success_timestamp_seconds",
        "migpredictd_targets",
    ]
    missing = [n for n in names if f"`{n}`" not in readme]
    assert not missing


def test_derived_answers_attach_only_to_their_own_measurement_and_grid() -> None:
    # Grids are published first and derived answers later (daemon): late answers must never land on
    # a newer measurement, or on a prediction over another grid after a reload changed the grid.
    m = parse_measurement(json.loads((DATA / "cover_letter_sample.json").read_text()))
    model = build_model(m)
    settings = PredictorSettings(mode="seed")
    (grid_only,) = predict_grid([model], GRID, settings, derived=False)
    (full,) = predict_grid([model], GRID, settings)
    state = State()
    state.set_targets({"vm1": ("unix:/run/vm1.qmp", {})})
    state.record_success("vm1", m, grid_only, GRID, at=1000.0, duration=1.0)
    reg = _registry(state)
    name = "migpredictd_min_converging_bandwidth_bytes_per_second"
    assert reg.get_sample_value(name, {"vm": "vm1", "max_downtime": "125ms"}) is None  # not derived yet

    other_grid = make_grid(("1Gbps",), ("125ms",))
    state.record_derived("vm1", m, other_grid, full.min_bandwidth[:1], full.min_downtime[:1])
    newer = parse_measurement(json.loads((DATA / "cover_letter_sample.json").read_text()))
    state.record_derived("vm1", newer, GRID, full.min_bandwidth, full.min_downtime)
    assert reg.get_sample_value(name, {"vm": "vm1", "max_downtime": "125ms"}) is None

    state.record_derived("vm1", m, GRID, full.min_bandwidth, full.min_downtime)
    assert reg.get_sample_value(name, {"vm": "vm1", "max_downtime": "125ms"}) == full.min_bandwidth[0]
    assert state.snapshot()["vm1"].prediction is not None
    assert np.array_equal(state.snapshot()["vm1"].prediction.seconds, grid_only.seconds, equal_nan=True)  # type: ignore[union-attr]


def test_hashed_pages_are_the_measurements_cost() -> None:
    """A sweep of 7 runs of a 64 GiB guest at 2048 pages per GiB: 131072 sampled pages, hashed twice per
    run. Extended measurements (QEMU's own sampling, unknown count) have no such line."""
    m = Measurement(
        page_size_bytes=4096,
        total_pages=1 << 24,
        points=tuple(DirtyPoint(float(ms), 100.0) for ms in (125, 250, 500, 1000, 2000, 4000, 8000)),
        strategy="sweep-ms",
        sample_pages_per_gib=2048,
    )
    (p,) = predict_grid([build_model(m)], GRID, PredictorSettings(), derived=False)
    state = State()
    state.set_targets({"big": ("unix:/run/big.qmp", {})})
    state.record_success("big", m, p, GRID, at=1.0, duration=16.0)
    reg = _registry(state)
    assert reg.get_sample_value("migpredictd_measurement_hashed_pages", {"vm": "big"}) == 2 * 131072 * 7
    assert reg.get_sample_value("migpredictd_measurement_hashed_pages", {"vm": "vm1"}) is None


def test_policy_outcomes_one_line_per_policy_and_bandwidth() -> None:
    from migpredictd.core.policies import make_policy, predict_policy

    m = parse_measurement(json.loads((DATA / "cover_letter_sample.json").read_text()))
    model = build_model(m)
    (p,) = predict_grid([model], GRID, PredictorSettings(mode="seed"))
    state = State()
    state.set_targets({"vm1": ("unix:/run/vm1.qmp", {})})
    state.record_success("vm1", m, p, GRID, at=1.0, duration=1.0)
    nova = predict_policy(build_model(m, mode="qemu"), make_policy("nova"), GRID.bandwidths)
    state.record_derived("vm1", m, GRID, p.min_bandwidth, p.min_downtime, policies={"nova": tuple(nova)})
    reg = _registry(state)
    for label, o in zip(GRID.bandwidth_labels, nova, strict=True):
        base = {"vm": "vm1", "policy": "nova", "bandwidth": label}
        assert reg.get_sample_value("migpredictd_policy_outcome", base | {"outcome": o.outcome}) == 1.0
        others = [x for x in ("completed", "aborted", "postcopy", "not_converged") if x != o.outcome]
        assert all(
            reg.get_sample_value("migpredictd_policy_outcome", base | {"outcome": x}) is None for x in others
        )
        assert reg.get_sample_value("migpredictd_policy_migration_seconds", base) == o.seconds
    assert {o.outcome for o in nova} >= {"completed"}


def test_policy_results_pack_round_trip() -> None:
    from migpredictd.core.policies import PolicyOutcome
    from migpredictd.serve.state import pack_policy, unpack_policy

    outs = [
        PolicyOutcome(1e8, "completed", 12.5, 0.3, 0.0, None),
        PolicyOutcome(2e8, "aborted", None, None, 30.0, None),
        PolicyOutcome(3e8, "postcopy", -0.0, None, 99.0, 4.0),
        PolicyOutcome(4e8, "not_converged", None, None, 0.0, None),
        PolicyOutcome(5e8, "completed", 1e300, 1e-9, 0.0, None),
    ]
    back = unpack_policy(pack_policy(outs))
    assert back == [(o.outcome, o.seconds) for o in outs]
    assert [repr(s) for _, s in back] == [repr(o.seconds) for o in outs]  # the same floats, -0.0 included
    assert unpack_policy(pack_policy([])) == []
