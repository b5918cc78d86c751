"""Orchestrator policies (core/policies.py): each product's rules, and the CLI contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from migpredictd.core.errors import InputError
from migpredictd.core.measurement import DirtyPoint, Measurement
from migpredictd.core.model import MemoryModel, build_model
from migpredictd.core.policies import POLICIES, make_policy, predict_policy, simulate_policy
from migpredictd.core.predictor import ModelBatch, PredictorSettings, simulate

MIB = 1 << 20
GIB = 1 << 30


def guest(gib: float, rate_mib_s: float, wss_mib: float, *, zero_share: float = 0.5) -> MemoryModel:
    """A guest rewriting ``wss_mib`` at ``rate_mib_s`` (saturating), ``zero_share`` of its RAM zero."""
    total = int(gib * GIB) // 4096
    pages, wss = rate_mib_s * 256, wss_mib * 256
    return build_model(
        Measurement(
            page_size_bytes=4096, total_pages=total,
            points=tuple(DirtyPoint(ms, min(pages * ms / 1000.0, wss)) for ms in (125.0, 1000.0, 8000.0)),
            zero_pages=total * zero_share,
        ),
        mode="qemu",
    )  # fmt: skip


def test_options_are_the_products_own_and_bad_ones_are_named() -> None:
    nova = make_policy("nova", {"live_migration_downtime": "400", "live_migration_permit_post_copy": "true"})
    assert nova["live_migration_downtime"] == 400.0
    assert nova["live_migration_permit_post_copy"] is True
    assert nova["live_migration_downtime_steps"] == 10  # the default filled in
    assert make_policy("kubevirt")["completionTimeoutPerGiB"] == 150.0
    assert make_policy("proxmox")["migrate_downtime"] == 0.1
    for name, options, field in [
        ("nova", {"live_migration_downtim": "400"}, "live_migration_downtim"),
        ("nova", {"live_migration_timeout_action": "explode"}, "live_migration_timeout_action"),
        ("kubevirt", {"allowPostCopy": "maybe"}, "allowPostCopy"),
        ("auto-converge", {"max-cpu-throttle": "100"}, "max-cpu-throttle"),
        ("proxmox", {"migrate_speed": "-1"}, "migrate_speed"),
        ("nova", {"live_migration_downtime_steps": "0"}, "live_migration_downtime_steps"),
    ]:
        with pytest.raises(InputError) as err:
            make_policy(name, options)
        assert err.value.field == field
    with pytest.raises(InputError, match="unknown policy"):
        make_policy("vmware")


def test_nova_raises_the_downtime_in_steps_of_its_delay() -> None:
    """A 4 GiB guest whose hot 40 MiB (42 MB on the wire) needs 313 ms at 1 Gbit/s (binary, 134 MB/s):
    Nova starts at 50 ms and adds 45 ms every 75 s/GiB x 4 GiB = 300 s, so the migration completes at the
    first step of at least 313 ms (i = 6: 320 ms at t = 1800 s), not at once."""
    m = guest(4, 400.0, 40, zero_share=0.9)
    bw = GIB / 8  # 1 Gbit/s, binary
    [o] = predict_policy(m, make_policy("nova"), [bw], deadline_seconds=7200)
    assert o.outcome == "completed"
    assert o.seconds is not None
    assert 1800.0 <= o.seconds < 2100.0
    assert o.downtime_seconds is not None
    assert 0.275 < o.downtime_seconds <= 0.320
    # with a downtime already enough at the start (steps of 1, i.e. the whole 500 ms at once) it does
    [fast] = predict_policy(m, make_policy("nova", {"live_migration_downtime_steps": "1"}), [bw])
    assert fast.seconds is not None
    assert fast.seconds < 60


def test_nova_aborts_or_forces_completion_after_its_timeout() -> None:
    m = guest(1, 2000.0, 600, zero_share=0.2)  # rewrites 600 MiB at 2 GB/s: never at 1 Gbit/s
    bw = GIB / 8
    [aborted] = predict_policy(m, make_policy("nova"), [bw], deadline_seconds=7200)
    assert aborted.outcome == "aborted"
    assert aborted.seconds is None
    forced = make_policy("nova", {"live_migration_timeout_action": "force_complete"})
    [paused] = predict_policy(m, forced, [bw], deadline_seconds=7200)
    assert paused.outcome == "completed"  # Nova pauses the guest: everything left in one stop
    assert paused.seconds is not None
    assert paused.seconds >= 800 * 2  # 800 s/GiB x max(1 GiB, 2)
    assert paused.downtime_seconds is not None
    assert paused.downtime_seconds > 1.0
    post = make_policy("nova", {"live_migration_permit_post_copy": "true"})
    [switched] = predict_policy(m, post, [bw], deadline_seconds=7200)
    assert switched.outcome == "postcopy"  # no progress after the first pass: should_switch_to_postcopy
    assert switched.seconds is not None
    assert switched.seconds < 60
    assert switched.postcopy_seconds is not None
    assert switched.postcopy_seconds > 0


def test_kubevirt_times_out_per_gib_and_on_no_progress() -> None:
    m = guest(2, 2000.0, 600, zero_share=0.2)
    bw = GIB / 8
    [o] = predict_policy(
        m, make_policy("kubevirt", {"progressTimeout": "100000"}), [bw], deadline_seconds=7200
    )
    assert o.outcome == "aborted"
    [stuck] = predict_policy(m, make_policy("kubevirt"), [bw], deadline_seconds=7200)
    assert stuck.outcome == "aborted"  # 150 s without progress, before 150 s/GiB x 2 GiB = 300 s
    [post] = predict_policy(m, make_policy("kubevirt", {"allowPostCopy": "true"}), [bw])
    assert post.outcome == "postcopy"
    # bandwidthPerMigration caps the link
    idle = guest(2, 0.0, 0)
    [capped] = predict_policy(idle, make_policy("kubevirt", {"bandwidthPerMigration": str(16 * MIB)}), [bw])
    [free] = predict_policy(idle, make_policy("kubevirt"), [bw])
    assert capped.seconds is not None
    assert free.seconds is not None
    assert capped.seconds == pytest.approx(free.seconds * bw / (16 * MIB), rel=0.01)


def test_proxmox_doubles_its_downtime_when_remaining_stalls() -> None:
    """The hot set needs about 0.33 s at 1 Gbit/s: 0.1 -> 0.2 -> 0.4 s after two stalls of 5 polls."""
    m = guest(1, 400.0, 40, zero_share=0.5)
    [o] = predict_policy(m, make_policy("proxmox"), [GIB / 8])
    assert o.outcome == "completed"
    assert o.downtime_seconds is not None
    assert 0.2 < o.downtime_seconds <= 0.4
    assert o.seconds is not None
    assert 10.0 <= o.seconds < 30.0


def test_auto_converge_throttle_helps_only_a_guest_that_uses_its_vcpu() -> None:
    """A guest using 2% of its vCPU keeps its rate at every throttle below 98% (measured on QEMU 7.2);
    a CPU-bound one is slowed at once."""
    m = guest(1, 300.0, 200, zero_share=0.5)
    bw = 100e6
    policy = make_policy("auto-converge")
    [cpu_bound] = predict_policy(m, policy, [bw], downtimes=[0.3], vcpu_utilization=1.0)
    [paced] = predict_policy(m, policy, [bw], downtimes=[0.3], vcpu_utilization=0.02, deadline_seconds=600)
    assert cpu_bound.outcome == "completed"
    assert 20 <= cpu_bound.max_throttle_percent <= 99
    assert paced.max_throttle_percent == 99
    assert paced.seconds is None or paced.seconds > 5 * (cpu_bound.seconds or 0)


def test_without_intervention_a_policy_agrees_with_the_grid() -> None:
    """auto-converge on a guest that never triggers the throttle is a plain pre-copy: its per-pass time
    is within a few percent of the predictor's qemu mode for the same cell."""
    m = guest(2, 5.0, 32, zero_share=0.6)
    bw, dt = 50e6, 0.3
    [o] = predict_policy(m, make_policy("auto-converge"), [bw], downtimes=[dt])
    grid = simulate(
        ModelBatch.of([m]), np.zeros(1, dtype=np.int64), np.array([bw]), np.array([dt]), PredictorSettings()
    )
    assert o.outcome == "completed"
    assert o.max_throttle_percent == 0
    assert o.seconds == pytest.approx(float(grid.seconds[0]), rel=0.05)


def test_every_policy_gives_one_outcome_per_bandwidth() -> None:
    m = guest(1, 50.0, 64)
    for name in POLICIES:
        out = predict_policy(m, make_policy(name), [1e7, 1e8, 1e9])
        assert [o.bandwidth for o in out] == [1e7, 1e8, 1e9]
        for o in out:
            assert o.outcome in ("completed", "aborted", "postcopy", "not_converged")
            assert (o.seconds is None) == (o.outcome in ("aborted", "not_converged"))
    assert simulate_policy(m, make_policy("postcopy", {"switch_after_passes": "2"}), 1e7).passes <= 2


def run_cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migpredictd.cli", "predict", *args],
        input=stdin, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


COVER = (Path(__file__).parent / "data" / "cover_letter_sample.json").read_text()


def test_cli_contract_policy_predictions() -> None:
    out = run_cli("--format", "json", "--policy", "nova", "--policy-option", "live_migration_downtime=400",
                  "--bandwidths", "1Gbps,10Gbps", stdin=COVER)  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["policy"]["name"] == "nova"
    assert doc["policy"]["options"]["live_migration_downtime"] == 400.0
    preds = doc["policy_predictions"]
    assert [p["bandwidth_bytes_per_second"] for p in preds] == [GIB / 8, 10 * GIB / 8]
    for p in preds:
        assert set(p) == {"bandwidth_bytes_per_second", "outcome", "migration_seconds", "downtime_seconds",
                          "max_throttle_percent", "postcopy_seconds"}  # fmt: skip
        assert (p["migration_seconds"] is None) == (p["outcome"] not in ("completed", "postcopy"))
    # auto-converge honours --downtimes: one entry per (bandwidth, downtime)
    out = run_cli("--format", "json", "--policy", "auto-converge", "--bandwidths", "1Gbps,10Gbps",
                  "--downtimes", "300ms,unlim", stdin=COVER)  # fmt: skip
    preds = json.loads(out.stdout)["policy_predictions"]
    assert [(p["bandwidth_bytes_per_second"], p["max_downtime_seconds"]) for p in preds] == [
        (GIB / 8, 0.3), (GIB / 8, None), (10 * GIB / 8, 0.3), (10 * GIB / 8, None)
    ]  # fmt: skip
    # the table shows the outcome per bandwidth
    out = run_cli("--policy", "proxmox", "--bandwidths", "1Gbps", stdin=COVER)
    assert "Policy proxmox:" in out.stdout
    assert out.stdout.count("\n      1Gbps |") == 1
    # bad names and values: one line naming the option, exit 2 (a usage error, as every bad input)
    out = run_cli("--policy", "nova", "--policy-option", "live_migration_downtime=fast", stdin=COVER)
    assert out.returncode == 2
    assert "live_migration_downtime" in out.stderr
    assert "must be a number" in out.stderr
    out = run_cli("--policy", "kubevirt", "--policy-option", "nonsense", stdin=COVER)
    assert out.returncode == 2
    assert "KEY=VALUE" in out.stderr


def test_fast_forward_through_steady_passes_changes_nothing() -> None:
    """Passes that repeat themselves are taken up to the next event at once: the same outcome, time,
    downtime and throttle as taking them one by one, on 40 random guests under every policy."""
    import random

    rng = random.Random(5)
    for _ in range(40):
        m = guest(
            rng.choice([0.5, 1, 4]), rng.choice([0.0, 5.0, 50.0, 400.0, 3000.0]), rng.choice([16, 64, 300])
        )
        bw = rng.choice([1e7, 1e8, 1e9])
        policies = [make_policy(name) for name in POLICIES]
        policies.append(make_policy("postcopy", {"switch_after_passes": "5", "switch_after_seconds": "600"}))
        for policy in policies:
            name = policy.name
            fast = simulate_policy(m, policy, bw, deadline_seconds=1800.0)
            slow = simulate_policy(m, policy, bw, deadline_seconds=1800.0, fast_forward=False)
            assert (fast.outcome, fast.max_throttle_percent) == (slow.outcome, slow.max_throttle_percent), (
                name
            )
            for a, b in ((fast.seconds, slow.seconds), (fast.downtime_seconds, slow.downtime_seconds)):
                assert (a is None) == (b is None)
                if a is not None and b is not None:
                    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
            assert fast.passes == slow.passes, name


def _option_variants() -> list[tuple[str, dict[str, str]]]:
    """Every policy at its defaults and with the options that change its control flow."""
    return [
        *((name, {}) for name in POLICIES),
        ("nova", {"live_migration_permit_post_copy": "true"}),
        ("nova", {"live_migration_permit_auto_converge": "true", "live_migration_downtime_steps": "3"}),
        (
            "nova",
            {"live_migration_timeout_action": "force_complete", "live_migration_completion_timeout": "1"},
        ),
        ("nova", {"live_migration_downtime_delay": "0", "live_migration_completion_timeout": "0"}),
        ("kubevirt", {"allowPostCopy": "true", "progressTimeout": "5"}),
        ("kubevirt", {"allowAutoConverge": "true", "bandwidthPerMigration": str(16 * MIB)}),
        ("kubevirt", {"completionTimeoutPerGiB": "2"}),
        ("proxmox", {"migrate_speed": "50", "migrate_downtime": "0.01"}),
        ("auto-converge", {"cpu-throttle-tailslow": "true", "throttle-trigger-threshold": "10"}),
        ("auto-converge", {"cpu-throttle-initial": "50", "cpu-throttle-increment": "25"}),
        ("postcopy", {"switch_after_passes": "3", "switch_after_seconds": "600"}),
    ]


def test_outcomes_equal_the_reference_implementation() -> None:
    """predict_policy (each policy's and model's constants computed once for every cell) gives exactly
    the outcomes of the simulation as first written (lab.reference), field for field, on 60 random
    guests, at several bandwidths, downtimes and vCPU utilisations, under every policy variant."""
    import random

    from migpredictd.lab.reference import reference_simulate_policy

    rng = random.Random(17)
    variants = [make_policy(name, options) for name, options in _option_variants()]
    bandwidths = [1e6, 1.25e7, 1e8, 3e8, 1.25e9, 5e9]
    downtimes = [0.01, 0.05, 0.3, 2.0, float("inf")]
    seen: set[tuple[str, str]] = set()
    for _ in range(60):
        gib = rng.choice([0.25, 1, 3, 16])
        m = guest(
            gib,
            rng.choice([0.0, 1.0, 20.0, 200.0, 2000.0]),
            min(rng.choice([4, 64, 500, 4000]), gib * 1024 * 0.9),
            zero_share=rng.choice([0.0, 0.3, 0.9]),
        )
        util = rng.choice([None, 0.05, 0.5, 1.0])
        for policy in variants:
            got = predict_policy(
                m, policy, bandwidths, downtimes=downtimes, vcpu_utilization=util, deadline_seconds=1800.0
            )
            per_downtime = policy.name in ("auto-converge", "postcopy")
            cells = (
                [(b, d) for b in bandwidths for d in downtimes]
                if per_downtime
                else [(b, None) for b in bandwidths]
            )
            want = [
                reference_simulate_policy(
                    m, policy, b, max_downtime=d, vcpu_utilization=util, deadline_seconds=1800.0
                )
                for b, d in cells
            ]
            assert got == want, policy
            seen.update((policy.name, o.outcome) for o in got)
    # the cases cover every outcome each policy can give
    assert seen >= {
        ("nova", "completed"), ("nova", "aborted"), ("nova", "postcopy"), ("nova", "not_converged"),
        ("kubevirt", "completed"), ("kubevirt", "aborted"), ("kubevirt", "postcopy"),
        ("proxmox", "completed"), ("proxmox", "not_converged"),
        ("auto-converge", "completed"), ("auto-converge", "not_converged"),
        ("postcopy", "completed"), ("postcopy", "postcopy"),
    }, seen  # fmt: skip
