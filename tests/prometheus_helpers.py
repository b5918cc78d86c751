"""A real Prometheus on 127.0.0.1 for end-to-end tests: its config, a test copy of the alert rules, and a
small client for its HTTP API (instant and range queries, alerts, rules).

The binary is Debian's `prometheus` (2.42); a missing binary fails the test with the install hint, it never
skips. The process is started with its own TSDB folder and killed by PID, whatever the test did.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml

from tests.daemon_helpers import LoggedProcess
from tests.waits import wait_until

POLICY_RECORD: Final = "migpredictd:migration_converges:policy"
EVACUATION_RECORD: Final = "migpredictd:evacuation_seconds:policy"
PARALLEL_RECORD: Final = "migpredictd:migration_converges:parallel"
PARALLEL_EVACUATION_RECORD: Final = "migpredictd:evacuation_seconds:parallel"
RECORDS: Final = frozenset({POLICY_RECORD, EVACUATION_RECORD, PARALLEL_RECORD, PARALLEL_EVACUATION_RECORD})
# The one selector the policy rule is allowed to be: metric{bandwidth="...", max_downtime="..."}.
_SELECTOR = re.compile(r"^(?P<metric>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<matchers>[^{}]*)\}$")
_MATCHER = re.compile(r'^\s*(?P<label>[a-zA-Z_]\w*)\s*=\s*"(?P<value>[^"\\]*)"\s*$')

JSON = dict[str, Any]
Series = list[JSON]
T = TypeVar("T")


def prometheus_binary() -> str:
    """Path of the prometheus server; fails (never skips) when it is missing."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: apt-get install prometheus (or scripts/install-rig.sh)"
    return binary


# ------------------------------------------------------------------------------------------- config files


def rules_for_test(rules: Mapping[str, Any], *, bandwidth: str, max_downtime: str, hold: str) -> JSON:
    """A copy of alerts.yml's document with the policy pair replaced and every alert's `for:` set to `hold`.

    Edits the parsed rules, not the text: the policy recording rule must be exactly one selector
    `metric{bandwidth="..", max_downtime=".."}` and every alert must have a `for:`; anything else is an
    AssertionError, so a reshaped alerts.yml is noticed instead of silently tested unchanged.
    """
    doc: JSON = copy.deepcopy(dict(rules))
    all_rules = [rule for group in doc["groups"] for rule in group["rules"]]

    (policy,) = [rule for rule in all_rules if rule.get("record") == POLICY_RECORD]
    selector = _SELECTOR.match(policy["expr"].strip())
    assert selector, f"{POLICY_RECORD}: expected one selector, got {policy['expr']!r}"
    matchers = [_MATCHER.match(m) for m in selector["matchers"].split(",")]
    assert all(matchers), f'{POLICY_RECORD}: expected only label="value" matchers: {policy["expr"]!r}'
    labels = {m["label"]: m["value"] for m in matchers if m}
    assert set(labels) == {"bandwidth", "max_downtime"}, f"{POLICY_RECORD}: matchers {labels}"
    policy["expr"] = f'{selector["metric"]}{{bandwidth="{bandwidth}", max_downtime="{max_downtime}"}}'

    alerts = [rule for rule in all_rules if "alert" in rule]
    assert alerts, "no alerting rules"
    for rule in alerts:
        assert "for" in rule, f"{rule['alert']} has no for:"
        rule["for"] = hold
    return doc


def prometheus_config(*, target: str, rule_file: Path, job: str, interval: str = "1s") -> JSON:
    """One job scraping `target` (host:port) every `interval`, rules evaluated as often."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }


def write_yaml(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write `doc` as YAML (key order kept) and return `path`."""
    path.write_text(yaml.safe_dump(dict(doc), sort_keys=False, width=1000))
    return path


# -------------------------------------------------------------------------------------------- the process


class PrometheusProcess(LoggedProcess):
    """`prometheus` serving 127.0.0.1:`port` with its TSDB under `directory`; logs go to a file."""

    def __init__(self, config: Path, directory: Path, port: int) -> None:
        self.port = port
        super().__init__(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            directory / "prometheus.log",
        )

    # --- HTTP API ---------------------------------------------------------------------------------

    def get(self, path: str, **params: str) -> tuple[int, JSON]:
        """GET an API path; (HTTP status, decoded JSON body). Prometheus answers errors in JSON too."""
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return int(r.status), _decode(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), _decode(e.read())

    def query(self, expr: str) -> tuple[int, JSON]:
        """Instant query at now."""
        return self.get("/api/v1/query", query=expr)

    def query_range(self, expr: str, *, seconds: float, step: float) -> tuple[int, JSON]:
        """Range query over the last `seconds`, as a Grafana time-series panel would ask."""
        end = time.time()
        return self.get(
            "/api/v1/query_range",
            query=expr,
            start=f"{end - seconds:.3f}",
            end=f"{end:.3f}",
            step=f"{step:g}",
        )

    def series(self, expr: str) -> Series:
        """The instant result of `expr`; AssertionError with Prometheus's message if it does not run."""
        status, body = self.query(expr)
        assert status == 200, f"{expr}: HTTP {status}: {body}"
        assert body["status"] == "success", f"{expr}: {body}"
        result: Series = body["data"]["result"]
        return result

    def values(self, expr: str, label: str) -> dict[str, float]:
        """{label value: sample value} of an instant vector query."""
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.series(expr)}

    def alerts(self) -> Series:
        """Active (pending or firing) alerts."""
        status, body = self.get("/api/v1/alerts")
        assert status == 200, body
        alerts: Series = body["data"]["alerts"]
        return alerts

    def firing(self, alertname: str) -> list[dict[str, str]]:
        """Label sets of the firing alerts named `alertname`."""
        return [
            a["labels"]
            for a in self.alerts()
            if a["state"] == "firing" and a["labels"]["alertname"] == alertname
        ]

    def rules(self) -> Series:
        """Every loaded rule (recording and alerting) with its health and last error."""
        status, body = self.get("/api/v1/rules")
        assert status == 200, body
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's `label_values(match, label)` lists."""
        status, body = self.get(f"/api/v1/label/{label}/values", **{"match[]": match})
        assert status == 200, f"label_values({match}, {label}): HTTP {status}: {body}"
        values: list[str] = body["data"]
        return values

    def wait_ready(self, timeout: float) -> None:
        """Wait for /-/ready; fail with the log tail if the process exits or time runs out."""

        def ready() -> bool:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.logs()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    return int(r.status) == 200
            except OSError:
                return False

        wait_until(ready, timeout, "prometheus ready", lambda: self.logs()[-3000:])


def _decode(raw: bytes) -> JSON:
    try:
        body: JSON = json.loads(raw)
    except ValueError:
        return {"status": "error", "error": raw.decode(errors="replace")[:500]}
    return body
