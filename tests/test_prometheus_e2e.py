"""End to end with a real Prometheus: it scrapes `migpredictd run` measuring real QEMU guests, evaluates a
copy of deploy/prometheus/alerts.yml, and answers every PromQL expression the deployment ships.

The fleet: an idle guest, a guest that dirties memory faster than the policy bandwidth, and a dead QMP
address (so the failure counter and MigpredictdTargetDown have data). The alert policy is 100Mbps / 125ms
and every `for:` is shortened to HOLD, so alerts fire within seconds. Fails (never skips) without
prometheus or QEMU.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import pytest
import yaml

from migpredictd.core.predictor import DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES
from migpredictd.lab.rig.guest import GuestSpec
from tests.daemon_helpers import DaemonProcess, free_port, http
from tests.prometheus_helpers import (
    EVACUATION_RECORD,
    POLICY_RECORD,
    RECORDS,
    PrometheusProcess,
    prometheus_binary,
    prometheus_config,
    rules_for_test,
    write_yaml,
)
from tests.rig_fixtures import StartGuest
from tests.test_deploy_assets import (
    ALERTS,
    EXPECTED_ALERTS,
    JOB,
    DeployExpr,
    dashboard,
    dashboard_panels,
    deploy_exprs,
    substitute_grafana_variables,
)
from tests.waits import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.prometheus, pytest.mark.slow]

# The busy guest rewrites 64 MiB at 32 MiB/s (~268 Mbit/s): it can never converge at 100 Mbit/s with a
# 125 ms limit, while the idle one does. Both labels are in the default grid the daemon runs with.
POLICY_BANDWIDTH: Final = "100Mbps"
POLICY_DOWNTIME: Final = "125ms"
HOLD: Final = "2s"  # every alert's `for:`; non-zero so the pending -> firing path is exercised
RANGE_SECONDS: Final = 60.0
RATE_INTERVAL: Final = "10s"  # what Grafana's $__rate_interval is near for a 1 s scrape and a short range

# Alert expressions that are empty when nothing is wrong. Everything else must return data, so a panel or
# rule whose selector matches nothing fails. Each one is also run with its threshold removed (a "witness"),
# which must return data: that proves its selectors match real series and only the condition is false.
EXPECTED_EMPTY: Final[Mapping[str, str]] = {
    "rules migpredictd/MigpredictdParallelEvacuationExceedsWindow": (
        "the two guests migrate 4 at a time in seconds, not in 4 hours"
    ),
    "rules migpredictd/MigpredictdMeasurementStale": (
        "every VM was measured seconds ago, not 30 minutes ago (the dead target has no last success)"
    ),
    "rules migpredictd/MigpredictdConfigReloadFailed": (
        "the daemon has not been reloaded yet; the test then reloads a broken config and sees it fire"
    ),
    "rules migpredictd/MigpredictdDown": (
        "Prometheus scrapes the daemon; the test then stops the daemon and sees it fire"
    ),
}
# Absent by design while any VM of the host would not converge at the policy pair, as the busy guest here
# does: their witness is the recorded sum without that condition, which must return the idle guest's time.
ABSENT_WHILE_A_VM_IS_STUCK: Final = {
    f"rules migpredictd-policy/{EVACUATION_RECORD}",
    "rules migpredictd/MigpredictdEvacuationExceedsWindow",
    "grafana panel 'Host evacuation, one VM at a time' A",
}
_UNLESS_STUCK = re.compile(
    r"\s*unless on \(job, instance\) \(migpredictd:migration_converges:policy == 0\)\s*$"
)
_THRESHOLD = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*-?\d+(?:\.\d+)?\b")
_FALLBACK = " or vector(0)"
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def daemon_config(tmp_path: Path, idle_qmp: str, busy_qmp: str) -> Path:
    """Short interval and sweeps, no jitter: the first measurement starts at once and ends in ~4 s."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "global:\n"
        "  interval: 8s\n"
        "  jitter: 0s\n"
        "  policies: [nova, kubevirt]\n"
        "targets:\n"
        f"  - {{name: idle, qmp: '{idle_qmp}', measurement: {{periods: [1s, 2s]}}}}\n"
        f"  - {{name: busy, qmp: '{busy_qmp}', measurement: {{periods: [250ms, 500ms, 1s, 2s]}}}}\n"
        f"  - {{name: dead, qmp: 'unix:{tmp_path}/nobody.qmp'}}\n"
    )
    return config


def test_rules_for_test_edits_the_policy_and_every_hold() -> None:
    """The structural edit itself: policy selector replaced, every alert's `for:` shortened, rest intact."""
    original = yaml.safe_load(ALERTS.read_text())
    edited = rules_for_test(original, bandwidth=POLICY_BANDWIDTH, max_downtime=POLICY_DOWNTIME, hold=HOLD)
    before = {r.get("alert") or r["record"]: r for g in original["groups"] for r in g["rules"]}
    after = {r.get("alert") or r["record"]: r for g in edited["groups"] for r in g["rules"]}
    assert before.keys() == after.keys() == EXPECTED_ALERTS | RECORDS
    assert after[POLICY_RECORD]["expr"] == (
        f'migpredictd_migration_converges{{bandwidth="{POLICY_BANDWIDTH}", max_downtime="{POLICY_DOWNTIME}"}}'
    )
    assert before[POLICY_RECORD]["expr"] != after[POLICY_RECORD]["expr"]
    for name in EXPECTED_ALERTS:
        assert before[name]["for"] != HOLD
        assert after[name]["for"] == HOLD
        assert {k: v for k, v in after[name].items() if k != "for"} == {
            k: v for k, v in before[name].items() if k != "for"
        }
    # A policy rule that is not one plain selector is refused, not silently left as it was.
    reshaped = yaml.safe_load(ALERTS.read_text())
    reshaped["groups"][0]["rules"][0]["expr"] = "max by (vm) (migpredictd_migration_converges)"
    with pytest.raises(AssertionError, match="expected one selector"):
        rules_for_test(reshaped, bandwidth=POLICY_BANDWIDTH, max_downtime=POLICY_DOWNTIME, hold=HOLD)


def evacuation_expr() -> str:
    """The evacuation recording rule's expression, as alerts.yml has it."""
    rules = yaml.safe_load(ALERTS.read_text())
    [expr] = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("record") == EVACUATION_RECORD]
    return str(expr)


def range_panel_sources() -> set[str]:
    """deploy_exprs() sources of the dashboard targets Grafana runs as range queries (time series)."""
    return {
        f"grafana panel {panel['title']!r} {target['refId']}"
        for panel in dashboard_panels()
        for target in panel["targets"]
        if target.get("range")
    }


def check_expressions(prom: PrometheusProcess, exprs: list[DeployExpr]) -> list[str]:
    """Run every expression; return one line per problem (does not run, empty, or unexpectedly not)."""
    problems: list[str] = []
    ranged = range_panel_sources()
    for e in exprs:
        status, body = prom.query(e.expr)
        if status != 200 or body.get("status") != "success":
            problems.append(f"{e.source}: does not run (HTTP {status}: {body.get('error')}): {e.expr}")
            continue
        result = body["data"]["result"]
        if e.source in ABSENT_WHILE_A_VM_IS_STUCK:
            if result:
                problems.append(
                    f"{e.source}: should be absent while the busy guest does not converge: {result}"
                )
            witness = _UNLESS_STUCK.sub("", evacuation_expr())
            if witness == evacuation_expr() or not prom.series(witness):
                problems.append(
                    f"{e.source}: its sum without the non-convergence condition is empty: {witness}"
                )
            continue
        if e.source in EXPECTED_EMPTY:
            if result:
                problems.append(f"{e.source}: should be empty ({EXPECTED_EMPTY[e.source]}), got {result}")
            witness = _THRESHOLD.sub("", e.expr)
            if witness == e.expr:
                problems.append(f"{e.source}: no threshold to remove for its witness: {e.expr}")
            elif not prom.series(witness):
                problems.append(f"{e.source}: even without its threshold it matches nothing: {witness}")
            continue
        if not result:
            problems.append(f"{e.source}: returned nothing: {e.expr}")
        # `count(...) or vector(0)` is never empty; what it counts must exist too.
        if e.expr.endswith(_FALLBACK) and not prom.series(e.expr.removesuffix(_FALLBACK)):
            problems.append(f"{e.source}: returns only its fallback vector(0): {e.expr}")
        if e.source in ranged:
            status, body = prom.query_range(e.expr, seconds=RANGE_SECONDS, step=2.0)
            if status != 200 or body.get("status") != "success":
                problems.append(f"{e.source}: range query fails (HTTP {status}: {body.get('error')})")
            elif not body["data"]["result"]:
                problems.append(f"{e.source}: range query over {RANGE_SECONDS:g}s returned nothing")
    return problems


def test_prometheus_runs_every_deploy_query_and_fires_the_policy_alert(
    rig_guest_factory: StartGuest, tmp_path: Path
) -> None:
    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started, 1)

    prometheus_binary()  # before booting anything: a missing binary fails at once
    idle = rig_guest_factory(GuestSpec(qemu="7.2", memory_mib=256, touch_mib=32, wss_mib=0, rate_mib=0))
    busy = rig_guest_factory(GuestSpec(qemu="10.0", memory_mib=256, touch_mib=96, wss_mib=64, rate_mib=32))
    lap("guests booted")
    assert POLICY_BANDWIDTH in DEFAULT_BANDWIDTHS
    assert POLICY_DOWNTIME in DEFAULT_DOWNTIMES
    config = daemon_config(tmp_path, idle.qmp_address, busy.qmp_address)
    daemon = DaemonProcess(config, free_port())
    instance = f"127.0.0.1:{daemon.port}"
    prom: PrometheusProcess | None = None
    try:
        wait_until(lambda: _healthy(daemon), 20, "daemon healthy", daemon.logs)

        rules = write_yaml(
            tmp_path / "alerts.yml",
            rules_for_test(
                yaml.safe_load(ALERTS.read_text()),
                bandwidth=POLICY_BANDWIDTH, max_downtime=POLICY_DOWNTIME, hold=HOLD,
            ),
        )  # fmt: skip
        prom_config = write_yaml(
            tmp_path / "prometheus.yml", prometheus_config(target=instance, rule_file=rules, job=JOB)
        )
        prom = PrometheusProcess(prom_config, tmp_path, free_port())
        prom.wait_ready(30)
        lap("prometheus ready")

        def both_measured() -> bool:
            up = prom.values(f'up{{job="{JOB}"}}', "instance")
            measured = prom.values('migpredictd_up{vm=~"idle|busy"}', "vm")
            return up == {instance: 1.0} and measured == {"idle": 1.0, "busy": 1.0}

        wait_until(both_measured, 60, "both guests measured, as seen by Prometheus", daemon.logs)
        lap("both measured in prometheus")

        # The non-convergence alert: firing for the busy guest, at the policy pair, and nothing for idle.
        firing = wait_until(
            lambda: prom.firing("MigpredictdVMWillNotConverge"), 20, "MigpredictdVMWillNotConverge firing"
        )
        lap("policy alert firing")
        assert [(a["vm"], a["bandwidth"], a["max_downtime"], a["instance"]) for a in firing] == [
            ("busy", POLICY_BANDWIDTH, POLICY_DOWNTIME, instance)
        ]
        assert not [a for a in prom.alerts() if a["labels"].get("vm") == "idle"], prom.alerts()
        assert prom.values(POLICY_RECORD, "vm") == {"busy": 0.0, "idle": 1.0}
        target_down = wait_until(lambda: prom.firing("MigpredictdTargetDown"), 10, "MigpredictdTargetDown")
        assert [a["vm"] for a in target_down] == ["dead"]
        # Nova gives up on the busy guest at the policy pair's 100 Mbit/s (800 s/GiB x 2 GiB < the 1 h
        # deadline), and so does KubeVirt (150 s per GB, 1 GB): each alert fires for that VM only.
        aborts = wait_until(lambda: prom.firing("MigpredictdNovaWouldAbort"), 20, "MigpredictdNovaWouldAbort")
        assert [(a["vm"], a["policy"], a["bandwidth"]) for a in aborts] == [
            ("busy", "nova", POLICY_BANDWIDTH)
        ]
        timeouts = wait_until(
            lambda: prom.firing("MigpredictdKubevirtWouldTimeOut"), 20, "MigpredictdKubevirtWouldTimeOut"
        )
        assert [(a["vm"], a["policy"], a["bandwidth"]) for a in timeouts] == [
            ("busy", "kubevirt", POLICY_BANDWIDTH)
        ]

        # Every rule Prometheus loaded evaluates cleanly: exactly the rules of alerts.yml, health ok.
        loaded = prom.rules()
        assert {r["name"] for r in loaded} == EXPECTED_ALERTS | RECORDS
        assert [(r["name"], r["lastError"]) for r in loaded if r["health"] != "ok"] == []

        # Every shipped expression, with Grafana's variables as a user picking this daemon and "All" VMs.
        variables = {
            "instance": instance,
            "vm": ".*",  # the dashboard's allValue
            "max_downtime": f"({POLICY_DOWNTIME}|unlim)",  # a multi-value pick, as Grafana formats it
            "__rate_interval": RATE_INTERVAL,
        }
        exprs = deploy_exprs(variables)
        sources = {e.source for e in exprs}
        assert EXPECTED_EMPTY.keys() <= sources, "EXPECTED_EMPTY names an expression that no longer exists"
        assert range_panel_sources(), "the dashboard has no time-series targets left to range-query"
        assert range_panel_sources() <= sources
        assert len(exprs) >= 20
        problems = check_expressions(prom, exprs)
        assert not problems, "\n".join(problems)
        lap("all expressions checked")

        # Numbers: 2 VMs measured, 1 failing, 1 not converging at the policy; the grid table adds up.
        stat = {e.source: e.expr for e in exprs}
        assert _scalar(prom, stat["grafana panel 'VMs measured' A"]) == 2
        assert _scalar(prom, stat["grafana panel 'VMs measured' B"]) == 1
        assert _scalar(prom, stat["grafana panel 'Would not converge at the alert policy' A"]) == 1
        table = {
            (s["metric"]["bandwidth"], s["metric"]["max_downtime"]): float(s["value"][1])
            for s in prom.series(
                stat["grafana panel 'VMs that would converge, per bandwidth x max downtime' A"]
            )
        }
        assert len(table) == len(DEFAULT_BANDWIDTHS) * len(DEFAULT_DOWNTIMES)
        assert table[(POLICY_BANDWIDTH, POLICY_DOWNTIME)] == 1  # idle only
        assert table[("40Gbps", POLICY_DOWNTIME)] == 2
        # Dashboard variables list what a user would pick from.
        listed = {}
        for variable in dashboard()["templating"]["list"]:
            if variable["type"] == "query":
                match = _LABEL_VALUES.match(variable["query"]["query"])
                assert match, variable["name"]
                selector = substitute_grafana_variables(match["selector"], {"instance": instance})
                listed[variable["name"]] = set(prom.label_values(match["label"], selector))
        assert listed == {
            "instance": {instance},
            "vm": {"idle", "busy", "dead"},
            "max_downtime": set(DEFAULT_DOWNTIMES),  # the idle guest converges at every downtime limit
        }

        # The expected-empty alerts are live, not vacuous: a rejected reload, then a stopped daemon.
        config.write_text(config.read_text() + "  - {name: idle, qmp: 'unix:/nonexistent'}\n")  # duplicate
        status, _ = http(daemon.port, "/-/reload", "POST")
        assert status == 500
        reload_failed = wait_until(
            lambda: prom.firing("MigpredictdConfigReloadFailed"), 15, "MigpredictdConfigReloadFailed"
        )
        assert [a["instance"] for a in reload_failed] == [instance]
        assert daemon.stop() == 0, daemon.logs()
        down = wait_until(lambda: prom.firing("MigpredictdDown"), 15, "MigpredictdDown")
        assert [a["instance"] for a in down] == [instance]
        lap("reload-failed and down alerts fired")
    finally:
        if prom is not None:
            prom.stop()
        daemon.stop()
        print(f"timings (s since test start): {timings}")


def _healthy(daemon: DaemonProcess) -> bool:
    """Whether the daemon answers /-/healthy; fails at once if the process died."""
    assert daemon.proc.poll() is None, f"migpredictd exited:\n{daemon.logs()[-3000:]}"
    try:
        return http(daemon.port, "/-/healthy")[0] == 200
    except OSError:
        return False


def _scalar(prom: PrometheusProcess, expr: str) -> float:
    """The value of a query that returns exactly one sample (a stat panel)."""
    (sample,) = prom.series(expr)
    return float(sample["value"][1])
