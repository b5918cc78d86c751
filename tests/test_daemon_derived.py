"""A VM whose derived answers take long never holds back another VM's results: grids, health and
timestamps are published as soon as the measurements end, derived answers follow on their own worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from migpredictd.lab.fakeqmp import FakeQMPFleet, FakeVM
from tests.daemon_helpers import DaemonProcess, Samples, free_port, value, wait_for

pytestmark = pytest.mark.slow  # the expensive VM's derived answers take seconds by design

MIB = 1 << 20
V10, PKG10 = (10, 0, 2), "Debian 1:10.0.2+ds-2~bpo12+1"
CHEAP = [f"cheap{i}" for i in range(4)]
# In seed mode the pass loop has no closed-form shortcuts, and with a long deadline a VM near its
# convergence boundary takes its bisections through many thousands of passes: this 1 GiB guest,
# rewriting a 784 MiB working set at 2.6 GiB/s, takes 12.5 s of derived answers alone on an idle core
# (the default guests 3 s each), while every grid takes milliseconds.
EXPENSIVE = FakeVM(
    memory_bytes=1024 * MIB,
    working_set_bytes=784 * MIB,
    dirty_bytes_per_second=2686 * MIB,
    zero_bytes=0,
    version=V10,
    package=PKG10,
    noise=False,
)


def has_grid(s: Samples, vm: str) -> bool:
    return any(name == "migpredictd_migration_converges" and dict(lb).get("vm") == vm for name, lb in s)


def has_derived(s: Samples, vm: str) -> bool:
    return any(
        name in ("migpredictd_min_converging_bandwidth_bytes_per_second", "migpredictd_min_downtime_seconds")
        and dict(lb).get("vm") == vm
        for name, lb in s
    )


def test_slow_derived_answers_never_hold_back_other_results(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    fleet = FakeQMPFleet(directory=tmp_path / "s")
    for i, name in enumerate(CHEAP):
        fleet.add(name, FakeVM(version=V10, package=PKG10, seed=i, noise=False))
    fleet.add("expensive", EXPENSIVE)
    config = tmp_path / "config.yaml"
    lines = [
        "global: {interval: 1h, jitter: 0s, max_concurrent: 8,",
        "         measurement: {periods: [50ms, 100ms], zero_pages: none, connect_timeout: 1s},",
        "         prediction: {mode: seed, deadline: 100000s}}",
        "targets:",
    ]
    with fleet.run_in_thread():  # addresses exist once the fleet serves
        lines += [f"  - {{name: {n}, qmp: 'unix:{fleet[n].address}'}}" for n in [*CHEAP, "expensive"]]
        config.write_text("\n".join(lines) + "\n")
        d = DaemonProcess(config, free_port())
        try:
            t0 = time.monotonic()
            # Every VM, the expensive one included, has its grid and is up within seconds of its
            # measurement (one 50 ms and one 100 ms window each) ...
            s = wait_for(d.port, lambda x: all(has_grid(x, n) for n in [*CHEAP, "expensive"]), timeout=15)
            grids_at = time.monotonic() - t0
            # ... while the expensive VM's derived answers are still being computed.
            assert not has_derived(s, "expensive"), d.logs()[-2000:]
            # They arrive later, for every VM.
            s = wait_for(d.port, lambda x: all(has_derived(x, n) for n in [*CHEAP, "expensive"]), timeout=180)
            derived_at = time.monotonic() - t0
            assert derived_at > grids_at + 1.0, (grids_at, derived_at)
            # The prediction workers account for both stages: five targets each, and CPU for both.
            assert value(s, "migpredictd_predicted_targets_total", stage="grid") == 5
            assert value(s, "migpredictd_predicted_targets_total", stage="derived") == 5
            grid_cpu = value(s, "migpredictd_prediction_cpu_seconds_total", stage="grid")
            derived_cpu = value(s, "migpredictd_prediction_cpu_seconds_total", stage="derived")
            assert grid_cpu is not None
            assert derived_cpu is not None
            assert 0 < grid_cpu < derived_cpu
            # no policies configured: none computed
            assert value(s, "migpredictd_predicted_targets_total", stage="policies") == 0
            assert value(s, "migpredictd_prediction_cpu_seconds_total", stage="policies") == 0
            assert d.proc.poll() is None, d.logs()[-3000:]
        finally:
            d.stop()


def test_configured_policies_are_published_with_the_derived_answers(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    fleet = FakeQMPFleet(directory=tmp_path / "s")
    fleet.add("vm", FakeVM(version=V10, package=PKG10, noise=False))
    fleet.add("vm2", FakeVM(version=V10, package=PKG10, seed=2, noise=False))
    config = tmp_path / "config.yaml"
    lines = [
        "global: {interval: 1h, jitter: 0s,",
        "         measurement: {periods: [50ms, 100ms], zero_pages: none, connect_timeout: 1s},",
        "         policies: [nova, {name: kubevirt, options: {completionTimeoutPerGiB: 1}}]}",
        "targets:",
    ]
    with fleet.run_in_thread():
        lines.append(f"  - {{name: vm, qmp: 'unix:{fleet['vm'].address}'}}")
        # a target's own list replaces global.policies for it
        lines.append(f"  - {{name: vm2, qmp: 'unix:{fleet['vm2'].address}', policies: [proxmox]}}")
        config.write_text("\n".join(lines) + "\n")
        d = DaemonProcess(config, free_port())
        try:
            s = wait_for(d.port, lambda x: has_derived(x, "vm") and has_derived(x, "vm2"), timeout=60)
            outcomes = {
                (dict(lb)["policy"], dict(lb)["bandwidth"]): dict(lb)["outcome"]
                for name, lb in s
                if name == "migpredictd_policy_outcome" and dict(lb)["vm"] == "vm"
            }
            vm2 = {
                dict(lb)["policy"]
                for name, lb in s
                if name == "migpredictd_policy_outcome" and dict(lb)["vm"] == "vm2"
            }
            assert vm2 == {"proxmox"}
            # one outcome per policy and grid bandwidth (8 x 2), each exposed as 1
            assert len(outcomes) == 16, outcomes
            assert {p for p, _ in outcomes} == {"nova", "kubevirt"}
            for (policy, bw), outcome in outcomes.items():
                labels = {"vm": "vm", "policy": policy, "bandwidth": bw}
                assert value(s, "migpredictd_policy_outcome", **labels, outcome=outcome) == 1.0
                secs = value(s, "migpredictd_policy_migration_seconds", **labels)
                assert (secs is not None) == (outcome in ("completed", "postcopy"))
            # the default fake guest (512 MiB, 20 MiB/s over 64 MiB) completes at 10 Gbit/s under Nova
            assert outcomes[("nova", "10Gbps")] == "completed"
            # the policies' CPU is a stage of its own, counted for both targets (each has policies)
            assert value(s, "migpredictd_predicted_targets_total", stage="policies") == 2
            policy_cpu = value(s, "migpredictd_prediction_cpu_seconds_total", stage="policies")
            assert policy_cpu is not None
            assert policy_cpu > 0
        finally:
            d.stop()
