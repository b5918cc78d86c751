"""The real daemon against every way a QMP peer can misbehave, hostile configs, and reload storms.

One daemon process measures a fleet of fake QEMUs (``migpredictd.lab.fakeqmp``): one endpoint per
:class:`Fault`, non-QMP services on QMP addresses, and healthy VMs. Each faulty target must be down with
the right ``reason`` within its (short) timeouts, while the healthy ones keep getting fresh predictions,
``/metrics`` stays fast, the daemon's memory stays bounded (a 100 MB reply line included), and no
endpoint is ever sent a dirty-bitmap/dirty-ring calc-dirty-rate (which crashes QEMU 7.2 without KVM).
"""

from __future__ import annotations

import contextlib
import http.server as http_server
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migpredictd.lab.fakeqmp import Endpoint, FakeQMPFleet, FakeVM, Fault, FaultParams
from tests.daemon_helpers import DaemonProcess, Samples, free_port, http, scrape, value, vms, wait_for

pytestmark = pytest.mark.slow

V10 = (10, 0, 2)
PKG10 = "Debian 1:10.0.2+ds-2~bpo12+1"
MiB = 1 << 20
# Where a faulty target must end up; MEASURING_FOREVER times out first, then finds its own run busy.
EXPECTED: dict[Fault, str] = {
    Fault.REFUSE_CONNECT: "connect",
    Fault.NO_GREETING: "timeout",
    Fault.NO_REPLIES: "timeout",
    Fault.GARBAGE: "protocol",
    Fault.TRUNCATED: "protocol",
    Fault.HUGE_LINE: "protocol",
    # Half a reply then a reset: qemu.qmp hands the partial line it has at EOF to its JSON parser, so
    # this surfaces as "not QMP" (the raw bytes are in the error), not as a lost connection.
    Fault.DISCONNECT_MID_REPLY: "protocol",
    Fault.COMMAND_ERROR: "qmp_error",
    Fault.MEASURING_FOREVER: "timeout",
    Fault.NEGATIVE_DIRTY_RATE: "protocol",
    Fault.ZERO_MEMORY: "protocol",
    Fault.HUGE_MEMORY: "protocol",
    Fault.SLOW: "timeout",
    Fault.MIGRATING: "migrating",
    Fault.PAUSED: "not_running",
}
# Reply faults aimed at a command the measurement sends after negotiating (the others hit every reply,
# qmp_capabilities included): both paths are covered.
PARAMS: dict[Fault, FaultParams] = {
    Fault.COMMAND_ERROR: FaultParams(command="calc-dirty-rate", error_desc="injected failure"),
    Fault.GARBAGE: FaultParams(command="query-memory-size-summary"),
    Fault.SLOW: FaultParams(delay_seconds=3.0),
    # After negotiation: the 100 MB line overruns qemu.qmp's 10 MiB reader limit inside execute().
    Fault.HUGE_LINE: FaultParams(command="query-status"),
}
HEALTHY = ("ok-a", "ok-b", "ok-c")
EVERY_FAULT = [f for f in Fault if f.name and f is not Fault.NONE]
FORBIDDEN_MODES = {"dirty-bitmap", "dirty-ring"}


def fault_name(f: Fault) -> str:
    return "f-" + str(f.name).lower().replace("_", "-")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def reason_table(s: Samples) -> dict[str, tuple[float | None, dict[str, float]]]:
    """vm -> (up, {reason: failures}) for failure messages."""
    out: dict[str, tuple[float | None, dict[str, float]]] = {}
    for name in sorted(vms(s)):
        failures = {
            dict(labels)["reason"]: v
            for (metric, labels), v in s.items()
            if metric == "migpredictd_measurement_failures_total" and dict(labels)["vm"] == name
        }
        out[name] = (value(s, "migpredictd_up", vm=name), failures)
    return out


def timed_scrape(port: int) -> tuple[Samples, float]:
    t0 = time.perf_counter()
    s = scrape(port)
    return s, time.perf_counter() - t0


@contextlib.contextmanager
def http_service() -> Iterator[int]:
    """A plain HTTP server: what a mistyped port often reaches."""

    class Quiet(http_server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    # A short poll so that shutdown() returns at once, not after the default 0.5 s.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def banner_service(banner: bytes) -> Iterator[int]:
    """A service that greets with a line that is not QMP (an SSH server, an SMTP server) and waits."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        conns: list[socket.socket] = []
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            with contextlib.suppress(OSError):
                conn.sendall(banner)
            conns.append(conn)
        for c in conns:
            c.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(2)
        listener.close()


def base_config(measurement: str = "") -> list[str]:
    return [
        "global:",
        "  interval: 2s",
        "  jitter: 0s",
        "  max_concurrent: 32",
        "  measurement: {periods: [50ms, 100ms], zero_pages: none, connect_timeout: 1s,"
        f" command_timeout: 1s, settle_timeout: 1s, poll_interval: 50ms{measurement}}}",
        "targets:",
    ]


# --------------------------------------------------------------------------------------------------
# Every fault in one daemon run


@pytest.fixture(scope="module")
def fault_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeQMPFleet]:
    sockets = tmp_path_factory.mktemp("faults")
    fleet = FakeQMPFleet(directory=sockets)
    for f in EVERY_FAULT:
        fleet.add(fault_name(f), FakeVM(version=V10, package=PKG10), faults=f, params=PARAMS.get(f))
    for i, name in enumerate(HEALTHY):
        fleet.add(name, FakeVM(version=V10, package=PKG10, seed=i))
    fleet.add("ok-qemu72", FakeVM(seed=9))  # 7.2: whole-second sweep (its own periods below)
    with fleet.run_in_thread():
        yield fleet


def test_every_fault_is_contained(fault_fleet: FakeQMPFleet, tmp_path: Path) -> None:
    with http_service() as http_port, banner_service(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n") as ssh_port:
        lines = base_config()
        for ep in fault_fleet.endpoints:
            extra = ", measurement: {periods: [1s]}" if ep.name == "ok-qemu72" else ""
            lines.append(f"  - {{name: {ep.name}, qmp: 'unix:{ep.address}'{extra}}}")
        lines.append(f"  - {{name: not-qmp-http, qmp: 'tcp:127.0.0.1:{http_port}'}}")
        lines.append(f"  - {{name: not-qmp-banner, qmp: 'tcp:127.0.0.1:{ssh_port}'}}")
        config = tmp_path / "config.yaml"
        config.write_text("\n".join(lines) + "\n")
        _run_fault_daemon(fault_fleet, config)


def _run_fault_daemon(fleet: FakeQMPFleet, config: Path) -> None:
    d = DaemonProcess(config, free_port())
    faulty = {fault_name(f): reason for f, reason in EXPECTED.items()}
    # An HTTP server waits for a request as QMP's client waits for a greeting: the connect times out.
    faulty |= {"not-qmp-http": "timeout", "not-qmp-banner": "protocol"}
    healthy = [*HEALTHY, "ok-qemu72", fault_name(Fault.EVENTS)]
    latencies: list[float] = []
    rss: list[float] = []

    def reasons_seen(s: Samples) -> bool:
        rss.append(rss_mib(d.proc.pid))
        return all(
            (value(s, "migpredictd_measurement_failures_total", vm=name, reason=reason) or 0) >= 1
            for name, reason in faulty.items()
        ) and all(value(s, "migpredictd_up", vm=name) == 1.0 for name in healthy)

    try:
        started = time.monotonic()
        s = {}
        while time.monotonic() - started < 40:
            try:
                s = scrape(d.port)
            except OSError:  # not listening yet
                time.sleep(0.1)
                continue
            if reasons_seen(s):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"not contained in time: {reason_table(s)}\n{d.logs()[-3000:]}")
        # Within the timeouts: a 1 s connect/command timeout, a 2 s interval; not minutes.
        assert time.monotonic() - started < 30, d.logs()
        for name, reason in faulty.items():
            assert value(s, "migpredictd_up", vm=name) == 0.0, name
            # The right reason, and no other reason (a timeout must not be counted as, say, connect).
            got = {
                dict(labels)["reason"]
                for (metric, labels), v in s.items()
                if metric == "migpredictd_measurement_failures_total" and dict(labels)["vm"] == name and v
            }
            allowed = {reason, "busy"} if name == fault_name(Fault.MEASURING_FOREVER) else {reason}
            assert reason in got, (name, got, d.logs()[-3000:])
            assert got <= allowed, (name, got)
            assert value(s, "migpredictd_last_success_timestamp_seconds", vm=name) is None

        # Healthy targets keep getting fresh predictions while the faulty ones keep failing.
        before = {n: value(s, "migpredictd_last_success_timestamp_seconds", vm=n) or 0.0 for n in healthy}
        deadline = time.monotonic() + 20
        advanced: set[str] = set()
        while time.monotonic() < deadline and advanced != set(healthy):
            s, took = timed_scrape(d.port)
            latencies.append(took)
            rss.append(rss_mib(d.proc.pid))
            advanced |= {
                n
                for n in healthy
                if (value(s, "migpredictd_last_success_timestamp_seconds", vm=n) or 0.0) > before[n]
            }
            time.sleep(0.2)
        assert advanced == set(healthy), (advanced, d.logs()[-3000:])
        for n in healthy:
            assert value(s, "migpredictd_up", vm=n) == 1.0
            cell = {"vm": n, "bandwidth": "10Gbps", "max_downtime": "unlim"}
            assert value(s, "migpredictd_migration_converges", **cell) == 1.0

        # /metrics never waits on a VM: fast even while a 100 MB line and 3 s stalls are being served.
        assert max(latencies) < 1.0, latencies
        assert statistics.median(latencies) < 0.2, latencies
        # Memory stays bounded: qemu.qmp stops reading a line at 10 MiB; the 100 MB line never lands.
        assert max(rss) < 120, rss
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.logs()[-3000:]

    huge = fleet[fault_name(Fault.HUGE_LINE)]
    assert huge.connections >= 2  # it was tried more than once, not given up on
    _assert_no_dangerous_command(fleet.endpoints)


def _assert_no_dangerous_command(endpoints: list[Endpoint]) -> None:
    """The dirty-bitmap/dirty-ring guard: nothing crashed, nothing but page-sampling was ever asked."""
    for ep in endpoints:
        assert not ep.crashed, ep
        for req in ep.requests:
            if isinstance(req, dict) and req.get("execute") == "calc-dirty-rate":
                assert req.get("arguments", {}).get("mode") == "page-sampling", (ep, req)
                assert not FORBIDDEN_MODES & set(map(str, req.get("arguments", {}).values()))


# --------------------------------------------------------------------------------------------------
# Hostile configs


def run_daemon_once(config: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migpredictd.cli", "run", f"--config.file={config}",
         "--web.listen-address=127.0.0.1:0"],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


HOSTILE = """\
global:
  interval: -5s
  jitter: 10h
  max_concurrent: 0
  grid: {bandwidths: [0Gbps, 1Gbps], max_downtimes: [-1s]}
  measurement: {periods: [1ms, 100h], sample_pages: 99999999999, connect_timeout: 0s}
targets:
  - {name: "bad\\nname", qmp: 'ftp://nowhere'}
  - {name: ok, qmp: 'tcp:127.0.0.1:99999'}
  - {name: labelled, qmp: 'unix:/run/x.sock', labels: {vm: stolen, __meta: x}}
  - {name: labelled, qmp: 'unix:/run/y.sock'}
  - {name: nointerval, qmp: 'unix:/run/z.sock', interval: 10}
"""
# The key (or the fragment of the message) each problem above must be reported under.
HOSTILE_PROBLEMS = [
    "global.interval",
    "global.max_concurrent",
    "global.grid",
    "global.measurement.periods[0]",
    "global.measurement.periods[1]",
    "global.measurement.sample_pages",
    "global.measurement.connect_timeout",
    "targets[0].name",
    "targets[0].qmp",
    "targets[1].qmp",
    "targets[2].labels.vm",
    "targets[2].labels.__meta",
    "targets[3].name",
    "targets[4].interval",
]


def test_hostile_config_at_start_exits_1_listing_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(HOSTILE)
    r = run_daemon_once(config)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    missing = [key for key in HOSTILE_PROBLEMS if key not in r.stderr]
    assert not missing, (missing, r.stderr)
    assert r.stderr.count('msg="invalid config"') >= len(HOSTILE_PROBLEMS)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("global: {interval: 30s\ntargets: []\n", "invalid YAML"),  # unclosed flow mapping
        ("targets:\n  - name: a\n   qmp: x\n", "invalid YAML"),  # bad indentation
        ("[" * 100_000, "nested more than"),  # libyaml recursion: must not crash the process
        ("a: &a [*a, *a]\n", "invalid YAML"),
        (
            "x-l0: &l0 [a, a, a, a, a, a, a, a, a, a]\n"
            + "".join(f"x-l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 9))
            + "targets: []\n",
            "too many nodes",
        ),  # a billion laughs
        ("\xff\xfe not utf-8", "not UTF-8"),
        ("", "empty"),
        ("targets: {name: a}\n", "must be a list"),
        ("!!python/object:os.system {}\n", "YAML"),
    ],
    ids=["unclosed", "indent", "deep", "self-alias", "laughs", "not-utf8", "empty", "not-list", "python-tag"],
)
def test_bad_yaml_at_start_exits_1(tmp_path: Path, text: str, fragment: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    t0 = time.monotonic()
    r = run_daemon_once(config)
    assert r.returncode == 1, r.stderr
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 20  # the alias bomb is cut short, not expanded


def test_thousands_of_targets_with_one_duplicate_name(tmp_path: Path) -> None:
    n = 3000
    lines = ["global: {interval: 1h, jitter: 0s}", "targets:"]
    lines += [f"  - {{name: vm{i:05d}, qmp: 'unix:{tmp_path}/s{i}.sock'}}" for i in range(n)]
    config = tmp_path / "config.yaml"
    config.write_text("\n".join([*lines, f"  - {{name: vm01234, qmp: 'unix:{tmp_path}/dup.sock'}}"]) + "\n")
    r = run_daemon_once(config)
    assert r.returncode == 1
    problems = [line for line in r.stderr.splitlines() if 'msg="invalid config"' in line]
    assert len(problems) == 1, problems
    # Both places are named: the duplicate's line (n + 3) and the first definition's (1234 + 3).
    assert f":{n + 3}: targets[{n}].name" in problems[0]
    assert f"config.yaml:{1234 + 3}" in problems[0]

    # Without the duplicate it starts, lists them all at once, and a scrape of 3,000 stays fast.
    config.write_text("\n".join(lines) + "\n")
    d = DaemonProcess(config, free_port())
    try:
        s = wait_for(d.port, lambda x: value(x, "migpredictd_targets") == n, timeout=30)
        assert len(vms(s)) == n
        s = wait_for(
            d.port,
            lambda x: all(
                value(x, "migpredictd_measurement_failures_total", vm=f"vm{i:05d}", reason="connect")
                for i in range(0, n, 97)
            ),
            timeout=30,
        )
        took = min(timed_scrape(d.port)[1] for _ in range(3))
        assert took < 1.0
    finally:
        assert d.stop() == 0, d.logs()[-2000:]


# --------------------------------------------------------------------------------------------------
# Reload storm


def test_reload_storm(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    fleet = FakeQMPFleet(directory=tmp_path / "s")
    names = [f"vm{i:02d}" for i in range(12)]
    for i, n in enumerate(names):
        fleet.add(n, FakeVM(version=V10, package=PKG10, seed=i))
    config = tmp_path / "config.yaml"

    def write(targets: list[str], *, broken: bool = False) -> None:
        lines = [
            "global: {interval: 1s, jitter: 0s, max_concurrent: 4,",
            "         measurement: {periods: [50ms, 100ms], zero_pages: none, connect_timeout: 1s}}",
            "targets:",
        ]
        lines += [f"  - {{name: {n}, qmp: 'unix:{fleet[n].address}'}}" for n in targets]
        if broken:
            lines.append("  - {name: vm00, qmp: 'unix:/elsewhere', interval: soon}")
        config.write_text("\n".join(lines) + "\n")

    with fleet.run_in_thread():
        write(names)
        d = DaemonProcess(config, free_port())
        try:
            wait_for(d.port, lambda x: all(value(x, "migpredictd_up", vm=n) == 1.0 for n in names), 30)
            calls_before = {n: fleet[n].commands.count("calc-dirty-rate") for n in names}
            t0 = time.monotonic()
            codes: list[int] = []
            for i in range(50):
                # Half the reloads drop the last target, a fifth are broken, the rest restore all.
                if i % 5 == 4:
                    write(names, broken=True)
                else:
                    write(names[:-1] if i % 2 else names)
                if i % 5 == 0:
                    d.proc.send_signal(signal.SIGHUP)
                status, _ = http(d.port, "/-/reload", "POST")
                codes.append(status)
                time.sleep(0.05)
            storm = time.monotonic() - t0
            assert storm < 15
            assert codes.count(500) == 10, codes
            assert codes.count(200) == 40, codes
            assert d.proc.poll() is None, d.logs()[-3000:]

            write(names)
            assert http(d.port, "/-/reload", "POST")[0] == 200
            t1 = time.monotonic()
            s = scrape(d.port)
            assert value(s, "migpredictd_config_last_reload_successful") == 1.0
            assert value(s, "migpredictd_targets") == len(names)
            start = {n: value(s, "migpredictd_last_success_timestamp_seconds", vm=n) or 0.0 for n in names}
            s = wait_for(
                d.port,
                lambda x: all(
                    (value(x, "migpredictd_last_success_timestamp_seconds", vm=n) or 0.0) > start[n]
                    for n in names
                ),
                timeout=20,
            )
            time.sleep(3)
            window = time.monotonic() - t0
        finally:
            assert d.stop() == 0, d.logs()[-3000:]
        assert time.monotonic() - t1 < 30
        for n in names:
            ep = fleet[n]
            # One job per target: never two measurements of one VM at once (a duplicated job would
            # connect while the other holds the monitor), and no more runs than the interval allows.
            assert ep.max_concurrent == 1, (n, ep.max_concurrent)
            if n != names[-1]:  # the last one was re-added 20 times, and a new target runs at once
                runs = (ep.commands.count("calc-dirty-rate") - calls_before[n]) / 2  # two periods a run
                assert runs <= window / 1.0 + 2, (n, runs, window)
        _assert_no_dangerous_command(fleet.endpoints)


def test_reload_with_hostile_values_keeps_the_old_config(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    fleet = FakeQMPFleet(directory=tmp_path / "s")
    fleet.add("a", FakeVM(version=V10, package=PKG10))
    config = tmp_path / "config.yaml"
    with fleet.run_in_thread():
        lines = base_config()
        config.write_text("\n".join([*lines, f"  - {{name: a, qmp: 'unix:{fleet['a'].address}'}}"]) + "\n")
        d = DaemonProcess(config, free_port())
        try:
            wait_for(d.port, lambda x: value(x, "migpredictd_up", vm="a") == 1.0, 20)
            for bad in (HOSTILE, "[" * 100_000, "targets: [\n"):
                config.write_text(bad)
                status, body = http(d.port, "/-/reload", "POST")
                assert status == 500, body
                s = scrape(d.port)
                assert value(s, "migpredictd_config_last_reload_successful") == 0.0
                assert vms(s) == {"a"}
            config.write_text(HOSTILE)
            _, body = http(d.port, "/-/reload", "POST")
            for key in HOSTILE_PROBLEMS:  # every problem is in the answer, not only the first
                assert key.encode() in body, key
            before = value(scrape(d.port), "migpredictd_last_success_timestamp_seconds", vm="a") or 0.0
            wait_for(
                d.port,
                lambda x: (value(x, "migpredictd_last_success_timestamp_seconds", vm="a") or 0) > before,
                15,
            )
        finally:
            assert d.stop() == 0, d.logs()[-2000:]
