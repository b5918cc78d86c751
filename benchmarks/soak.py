"""Accelerated soak: the real daemon for minutes over a mixed healthy + hostile fake fleet.

Intervals are 2 s instead of 5 min, so 10 minutes of wall time are about 300 measurement rounds per
target (a day and more at the default interval). Every few seconds it samples the daemon's RSS, open
file descriptors, threads and asyncio tasks (``migpredictd_asyncio_tasks``) and reports whether each
stays flat: the slope of a least-squares line over the second half of the run (after warm-up).

    python -m benchmarks.soak                       # 10 minutes
    python -m benchmarks.soak --minutes 60 --write  # the hour run; summary to benchmarks/results/soak.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from migpredictd.lab.fakeqmp import FakeQMPFleet, FakeVM, Fault, FaultParams

V10 = (10, 0, 2)
PKG10 = "Debian 1:10.0.2+ds-2~bpo12+1"
RESULTS = Path(__file__).parent / "results" / "soak.md"
HOSTILE = [f for f in Fault if f.name and f not in (Fault.NONE, Fault.EVENTS)]


@dataclass
class Series:
    name: str
    unit: str
    points: list[tuple[float, float]] = field(default_factory=list)

    def add(self, t: float, v: float) -> None:
        self.points.append((t, v))

    def slope_per_hour(self) -> float:
        """Least-squares slope over the second half (the first half is warm-up: caches, pools)."""
        pts = self.points[len(self.points) // 2 :]
        if len(pts) < 3:
            return 0.0
        ts, vs = [p[0] for p in pts], [p[1] for p in pts]
        mt, mv = statistics.fmean(ts), statistics.fmean(vs)
        den = sum((t - mt) ** 2 for t in ts)
        return 0.0 if den == 0 else sum((t - mt) * (v - mv) for t, v in pts) / den * 3600

    def summary(self) -> tuple[float, float, float, float, float, float]:
        vs = [p[1] for p in self.points]
        half = vs[len(vs) // 2 :]
        return vs[0], vs[-1], min(vs), max(vs), max(half) - min(half), self.slope_per_hour()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, method: str = "GET") -> bytes:
    req = urllib.request.Request(url, method=method)  # noqa: S310 - our own http:// loopback URL
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - loopback only
        return bytes(r.read())


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(body: bytes, name: str) -> float | None:
    m = re.search(rb"^" + name.encode() + rb"(?:\{[^}]*\})? (\S+)$", body, re.M)
    return float(m.group(1)) if m else None


@contextlib.contextmanager
def banner_service() -> Iterator[int]:
    """Not QMP: greets like an SSH server."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(OSError):
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        t.join(2)
        listener.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--healthy", type=int, default=40)
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--write", action="store_true", help=f"write the summary to {RESULTS}")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    (tmp / "s").mkdir()
    fleet = FakeQMPFleet(directory=tmp / "s")
    for i in range(args.healthy):
        fleet.add(f"ok{i:03d}", FakeVM(version=V10, package=PKG10, seed=i))
    fleet.add("events", FakeVM(version=V10, package=PKG10), faults=Fault.EVENTS)
    for f in HOSTILE:
        params = FaultParams(
            huge_line_bytes=20_000_000,
            delay_seconds=3.0,
            command="query-status" if f is Fault.HUGE_LINE else None,
        )
        fleet.add(f"bad-{str(f.name).lower()}", FakeVM(version=V10, package=PKG10), faults=f, params=params)

    with fleet.run_in_thread(), banner_service() as banner:
        config = tmp / "config.yaml"
        lines = [
            "global:",
            "  interval: 2s",
            "  jitter: 1s",
            "  max_concurrent: 16",
            "  measurement: {periods: [50ms, 100ms], zero_pages: none, connect_timeout: 1s,",
            "                command_timeout: 1s, settle_timeout: 1s}",
            "targets:",
        ]
        lines += [f"  - {{name: {ep.name}, qmp: 'unix:{ep.address}'}}" for ep in fleet.endpoints]
        lines.append(f"  - {{name: not-qmp, qmp: 'tcp:127.0.0.1:{banner}'}}")
        config.write_text("\n".join(lines) + "\n")
        port = free_port()
        log = (tmp / "daemon.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "migpredictd.cli", "run", f"--config.file={config}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warning"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        series = {
            "rss": Series("RSS", "MiB"),
            "fds": Series("open fds", ""),
            "threads": Series("threads", ""),
            "tasks": Series("asyncio tasks", ""),
            "scrape": Series("scrape", "ms"),
        }
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_reload = t0 + 30
        reloads = 0
        cpu0 = 0.0
        try:
            while True:
                try:
                    get(url + "/-/healthy")
                    break
                except OSError:
                    time.sleep(0.2)
            cpu0 = cpu_seconds(proc.pid)
            while time.monotonic() < end:
                assert proc.poll() is None, "daemon died"
                now = time.monotonic() - t0
                s0 = time.perf_counter()
                body = get(url + "/metrics")
                series["scrape"].add(now, (time.perf_counter() - s0) * 1e3)
                st = proc_status(proc.pid)
                series["rss"].add(now, int(st["VmRSS"].split()[0]) / 1024)
                series["threads"].add(now, float(st["Threads"]))
                series["fds"].add(now, float(len(list(Path(f"/proc/{proc.pid}/fd").iterdir()))))
                series["tasks"].add(now, metric(body, "migpredictd_asyncio_tasks") or 0.0)
                if time.monotonic() >= next_reload:  # a reload every 30 s, alternately by HTTP and SIGHUP
                    if reloads % 2:
                        proc.send_signal(signal.SIGHUP)
                    else:
                        get(url + "/-/reload", "POST")
                    reloads += 1
                    next_reload += 30
                time.sleep(args.sample_seconds)
            body = get(url + "/metrics")
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            rc = proc.wait(15)
        wall = time.monotonic() - t0
        up = len(re.findall(rb"^migpredictd_up\{[^}]*\} 1\.0$", body, re.M))
        failures = sum(
            float(v)
            for v in re.findall(rb"^migpredictd_measurement_failures_total\{[^}]*\} (\S+)$", body, re.M)
        )
        lag = metric(body, "migpredictd_event_loop_lag_max_seconds")
        crashed = [ep.name for ep in fleet.endpoints if ep.crashed]
        calc_runs = sum(ep.commands.count("calc-dirty-rate") for ep in fleet.endpoints)

    out = [
        f"# Soak: {args.minutes:g} minutes, accelerated (2 s interval)",
        "",
        f"Command: `python -m benchmarks.soak --minutes {args.minutes:g}{' --write' if args.write else ''}` "
        f"on an {platform.machine()} host with 2 cores shared with other work, Python "
        f"{platform.python_version()}.",
        "",
        f"Fleet: {args.healthy} healthy fake QEMU 10.0 VMs + 1 emitting events + {len(HOSTILE)} hostile "
        "(one per fault: refused, no greeting, no replies, garbage, truncated, 20 MB line, reset mid reply, "
        "command error, measuring for ever, negative rate, zero/huge memory, 3 s stalls, migrating, paused) "
        "+ 1 non-QMP banner service. A reload every 30 s (HTTP and SIGHUP in turn).",
        "",
        f"- wall {wall:.0f} s, daemon exit code {rc}, daemon CPU {cpu:.0f} s "
        f"({cpu / wall * 100:.0f}% of a core)",
        f"- calc-dirty-rate runs served: {calc_runs}; failures counted: {failures:.0f}; reloads: {reloads}",
        f"- at the end: {up} targets up of {args.healthy + 1} healthy; worst event-loop lag {lag or 0:.3f} s",
        f"- endpoints crashed (forbidden calc-dirty-rate mode): {len(crashed)}",
        "",
        "| series | first | last | min | max | range (2nd half) | slope (2nd half, per hour) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in series.values():
        first, last, lo, hi, rng, slope = s.summary()
        u = f" {s.unit}" if s.unit else ""
        out.append(
            f"| {s.name} | {first:.1f}{u} | {last:.1f}{u} | {lo:.1f}{u} | {hi:.1f}{u} | {rng:.1f}{u} | "
            f"{slope:+.2f}{u}/h |"
        )
    text = "\n".join(out) + "\n"
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    return 0 if rc == 0 and not crashed else 1


if __name__ == "__main__":
    sys.exit(main())
