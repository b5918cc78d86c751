"""The Prometheus assets under the real promtool: rule syntax, rule unit tests, the example config, and
every PromQL expression the deployment ships (dashboard and rules).

Fails (never skips) when promtool is missing: `apt-get install prometheus` provides it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy_assets import ALERTS, DEPLOY, EXPECTED_ALERTS, deploy_exprs

pytestmark = pytest.mark.prometheus

PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    """Run promtool; fail the test (never skip) when it is not installed."""
    binary = shutil.which("promtool")
    assert binary, "promtool missing: apt-get install prometheus"
    return subprocess.run([binary, *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=120)


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 14 rules found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_firing_and_a_not_firing_unit_test() -> None:
    tests: list[dict[str, Any]] = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert firing == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS


@pytest.mark.parametrize(
    ("original", "mutant"),
    [
        ("> 1800", "> 3600"),  # staleness threshold
        ("for: 15m", "for: 5m"),  # the first `for:` is MigpredictdVMWillNotConverge's
        ('max_downtime="500ms"', 'max_downtime="125ms"'),  # the policy pair
        ('up{job="migpredictd"} == 0 or absent', 'up{job="migpredictd"} == 0 unless absent'),
        (
            'zero_pages_method!~"guest-sample|qemu-sampled"',
            'zero_pages_method!~"guest-sample|qemu-sampled|none"',
        ),
        ("> 14400", "> 28800"),  # the evacuation window
        ("unless on (job, instance) (migpredictd:migration_converges:policy == 0)", ""),
        ('{policy="nova", outcome="aborted"}', '{policy="nova", outcome="postcopy"}'),
        ('{policy="kubevirt", outcome="aborted"}', '{policy="nova", outcome="aborted"}'),
        (") / 4", ") / 2"),  # the parallel evacuation's N
        ("unless on (job, instance) (migpredictd:migration_converges:parallel == 0)", ""),
        ("            or\n", "            and\n"),  # the longest migration when it exceeds the sum over N
    ],
)
def test_rule_unit_tests_catch_a_changed_rule(tmp_path: Path, original: str, mutant: str) -> None:
    """The unit tests have teeth: each of these edits to alerts.yml makes them fail."""
    rules = ALERTS.read_text()
    assert original in rules
    (tmp_path / ALERTS.name).write_text(rules.replace(original, mutant, 1))
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_example_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_shipped_expression_parses(tmp_path: Path) -> None:
    """Dashboard panel and variable queries (Grafana variables substituted) and rules, as recording rules."""
    exprs = deploy_exprs()
    assert len(exprs) >= 20
    rules = {
        "groups": [
            {
                "name": "deploy-exprs",
                "rules": [{"record": f"deploy_expr:{i}", "expr": e.expr} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_an_unparseable_expression_is_reported(tmp_path: Path) -> None:
    """The parse test above has teeth."""
    path = tmp_path / "bad.yml"
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum by (vm"}]}]})
    )
    assert promtool("check", "rules", str(path)).returncode != 0


def _panel_expr(title_prefix: str, vm: str = ".+") -> str:
    (expr,) = [
        e.expr for e in deploy_exprs({"vm": vm}) if e.source.startswith(f"grafana panel '{title_prefix}")
    ]
    return str(expr)


def _grid_series(vm: str, grid: Mapping[tuple[str, str], float | None]) -> list[dict[str, str]]:
    """Input series for one VM: converges (1/0) everywhere, predicted seconds only where it converges."""
    series = []
    for (bandwidth, downtime), seconds in grid.items():
        cell = f'bandwidth="{bandwidth}",max_downtime="{downtime}"'
        labels = f'job="migpredictd",instance="hv1:9842",vm="{vm}",{cell}'
        series.append(
            {
                "series": f"migpredictd_migration_converges{{{labels}}}",
                "values": f"{int(seconds is not None)}x10",
            }
        )
        if seconds is not None:
            series.append(
                {"series": f"migpredictd_predicted_migration_seconds{{{labels}}}", "values": f"{seconds}x10"}
            )
    return series


def test_dashboard_grid_queries_compute_the_tables(tmp_path: Path) -> None:
    """The two grid tables' queries, evaluated by promtool on a small fleet: the fleet table counts
    converging VMs per cell (zeros included), the per-VM table shows seconds, and -1 (rendered "-") where
    the migration does not converge."""
    hot = {
        ("1Gbps", "500ms"): None,
        ("1Gbps", "unlim"): 100.0,
        ("10Gbps", "500ms"): 12.0,
        ("10Gbps", "unlim"): 10.0,
    }
    idle = {
        ("1Gbps", "500ms"): 30.0,
        ("1Gbps", "unlim"): 29.0,
        ("10Gbps", "500ms"): 3.0,
        ("10Gbps", "unlim"): 3.0,
    }
    fleet_expr = _panel_expr("VMs that would converge")
    per_vm_expr = _panel_expr("Predicted migration time", vm="hot")
    common = 'instance="hv1:9842",job="migpredictd"'
    cell = 'bandwidth="{}",max_downtime="{}"'
    test_file = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": _grid_series("hot", hot) + _grid_series("idle", idle),
                "promql_expr_test": [
                    {
                        "expr": fleet_expr,
                        "eval_time": "5m",
                        "exp_samples": [
                            {
                                "labels": "{" + cell.format(b, d) + "}",
                                "value": 1 if hot[(b, d)] is None else 2,
                            }
                            for (b, d) in hot
                        ],
                    },
                    {
                        "expr": per_vm_expr,
                        "eval_time": "5m",
                        "exp_samples": [
                            {
                                "labels": (
                                    "{" + f'{common},vm="hot",' + cell.format(b, d) + "}"
                                    if seconds is None
                                    else "migpredictd_predicted_migration_seconds{"
                                    + f'{common},vm="hot",'
                                    + cell.format(b, d)
                                    + "}"
                                ),
                                "value": -1 if seconds is None else seconds,
                            }
                            for (b, d), seconds in hot.items()
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "dashboard_test.yml"
    path.write_text(yaml.safe_dump(test_file, sort_keys=False))
    result = promtool("test", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS", result.stdout)
