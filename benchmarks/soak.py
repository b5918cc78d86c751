"""Accelerated soak: the real daemon for minutes over a mixed healthy + hostile + large fake fleet.

Intervals are 2 s instead of 5 min, so 10 minutes of wall time are about 300 measurement rounds per
target (a day and more at the default interval). Every few seconds it samples the daemon's RSS, open
file descriptors, threads and asyncio tasks (``migpredictd_asyncio_tasks``) and reports whether each
stays flat: the slope of a least-squares line over the second half of the run (after warm-up).

Beside the small guests it runs ``--large`` fake QEMU 10.0 guests of 64-256 GiB whose first hash pass
costs ``--hash-us-per-page`` per sampled page (docs/measuring.md, "Large guests"); every other one is
pinned at ``--large-sample-pages`` per GiB, so that its runs hash more than the 131072 pages of one
``max_concurrent`` unit. The fake fleet records every calc-dirty-rate window it served; the soak reports
the largest cost those windows had open at once (each worth what the daemon's scheduler charges for it)
against ``max_concurrent`` and fails if it ever exceeded it, and how often each large guest was measured
against the small ones.

    python -m benchmarks.soak                       # 10 minutes
    python -m benchmarks.soak --minutes 60 --write  # the hour run; its section of benchmarks/results/soak.md
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migpredictd.lab.fakeqmp import Endpoint, FakeQMPFleet, FakeVM, Fault, FaultParams, GiB
from migpredictd.qemu.settings import SAMPLES_PER_RUN

V10 = (10, 0, 2)
PKG10 = "Debian 1:10.0.2+ds-2~bpo12+1"
RESULTS = Path(__file__).parent / "results" / "soak.md"
HOSTILE = [f for f in Fault if f.name and f not in (Fault.NONE, Fault.EVENTS)]
INTERVAL_S = 2.0
LARGE_MIN_GIB, LARGE_MAX_GIB = 64, 256
# What the daemon gives a large guest's stretched windows to end (the default; the soak's own is 1 s).
LARGE_SETTLE_TIMEOUT = "10s"


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


# --------------------------------------------------------------------------------------------------
# What the fleet served: calc-dirty-rate windows and measurement starts
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One calc-dirty-rate window QEMU accepted: when it was open, the pages it hashed per pass, and which
    of the target's measurements (1 = its first) it belonged to."""

    vm: str
    start: float
    end: float
    pages: int
    attempt: int


def run_cost(pages: int, limit: int) -> int:
    """What a run is worth in ``max_concurrent`` units, as the daemon charges a measurement
    (``Daemon.measurement_cost``: pages per run over SAMPLES_PER_RUN, rounded up, at least 1) and as
    the scheduler caps it (at the limit, so that the dearest still runs, alone)."""
    return min(limit, max(1, -(-pages // SAMPLES_PER_RUN)))


@dataclass(frozen=True, slots=True)
class Peak:
    total: int  # the largest total open at once
    at: float  # when it was first reached (the runs' clock)
    runs: int  # windows open at that moment


def peak_in_flight(runs: Iterable[Run], cost: Callable[[Run], int]) -> Peak:
    """The largest sum of ``cost`` over windows open at the same instant (a window that ends exactly
    when another starts does not overlap it)."""
    events: list[tuple[float, int, int]] = []  # (time, 0 = end / 1 = start, cost)
    for r in runs:
        c = cost(r)
        events += [(r.start, 1, c), (r.end, 0, c)]
    events.sort()  # at the same instant, ends (0) before starts (1)
    total, n, best = 0, 0, Peak(0, 0.0, 0)
    for t, is_start, c in events:
        total, n = (total + c, n + 1) if is_start else (total - c, n - 1)
        if total > best.total:
            best = Peak(total, t, n)
    return best


class FleetRecorder:
    """Records, on the fleet's loop, every calc-dirty-rate window an endpoint accepted and every
    measurement that began (a measurement's first session asks ``query-kvm``, its runs never do)."""

    def __init__(self, fleet: FakeQMPFleet) -> None:
        self._fleet = fleet
        self.runs: list[Run] = []
        self.attempts: dict[str, list[float]] = defaultdict(list)

    def attach(self, ep: Endpoint) -> None:
        original = ep.dispatch
        fleet, runs, attempts = self._fleet, self.runs, self.attempts

        def dispatch(msg: Any, *, negotiated: bool) -> dict[str, Any]:
            reply = original(msg, negotiated=negotiated)
            command = msg.get("execute") if isinstance(msg, dict) else None
            if "return" not in reply:
                return reply
            if command == "query-kvm":
                attempts[ep.name].append(fleet.clock())
            elif command == "calc-dirty-rate":
                # The window the fake opened, stretched by its first hash pass as QEMU's is.
                run = ep._run
                start = run.finish_at - run.calc_ms / 1000 * fleet.time_scale
                pages = (ep.vm.memory_bytes * run.sample_pages) >> 30
                runs.append(Run(ep.name, start, run.finish_at, pages, len(attempts[ep.name])))
            return reply

        ep.dispatch = dispatch  # type: ignore[method-assign]  # observe, never change, what it answers


def worst_gap(starts: Sequence[float], begin: float, end: float) -> float:
    """The longest time without a measurement starting, from ``begin`` to ``end``."""
    edges = [begin, *sorted(starts), end]
    return max(b - a for a, b in itertools.pairwise(edges))


# --------------------------------------------------------------------------------------------------
# The fleet
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LargeGuest:
    name: str
    gib: int
    sample_pages: int | None  # per GiB, pinned in its config; None: the daemon's default per guest


def large_guests(count: int, pinned_sample_pages: int) -> list[LargeGuest]:
    """``count`` guests spread over 64-256 GiB; every other one (the 2nd, 4th...) pinned at
    ``pinned_sample_pages`` per GiB (0: none)."""
    out = []
    for i in range(count):
        gib = (
            LARGE_MAX_GIB
            if count == 1
            else round(LARGE_MIN_GIB + (LARGE_MAX_GIB - LARGE_MIN_GIB) * i / (count - 1))
        )
        pinned = pinned_sample_pages if i % 2 == 1 and pinned_sample_pages else None
        out.append(LargeGuest(f"big{i:02d}-{gib}g", gib, pinned))
    return out


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


def per_vm(body: bytes, name: str) -> dict[str, float]:
    """``name``'s samples summed per ``vm`` label."""
    out: dict[str, float] = defaultdict(float)
    pattern = rb"^" + name.encode() + rb"\{([^}]*)\} (\S+)$"
    for labels, value in re.findall(pattern, body, re.M):
        vm = re.search(rb'(?:^|,)vm="([^"]*)"', labels)
        if vm:
            out[vm.group(1).decode()] += float(value)
    return out


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


def write_section(path: Path, text: str) -> None:
    """Put ``text`` (a ``## `` section) in ``path``: in place of the section with its heading, else
    appended; the file's other sections stay as they are."""
    heading = text.splitlines()[0]
    old = path.read_text() if path.exists() else "# Soak (`python -m benchmarks.soak`)\n"
    parts = re.split(r"(?m)^(?=## )", old)
    new = [text if p.splitlines()[0] == heading else p for p in parts]
    if new == parts:
        new.append(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(p.rstrip("\n") + "\n" for p in new))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--healthy", type=int, default=40)
    ap.add_argument("--no-hostile", action="store_true", help="leave out the hostile endpoints")
    ap.add_argument("--large", type=int, default=4, help="large guests (64-256 GiB)")
    ap.add_argument(
        "--large-sample-pages",
        type=int,
        default=4096,
        help="sample-pages per GiB pinned on every other large guest (0: all on the daemon's default)",
    )
    ap.add_argument(
        "--hash-us-per-page",
        type=float,
        default=1.5,
        help="QEMU's first hash pass per sampled page of a large guest, µs (10.0 at 256 GiB: 1.5)",
    )
    ap.add_argument("--max-concurrent", type=int, default=16)
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--reload-seconds", type=float, default=30.0)
    ap.add_argument("--write", action="store_true", help=f"write the run's section of {RESULTS}")
    return ap.parse_args(argv)


@dataclass
class Soak:
    """What one soak run saw: the daemon's side (samples, last metrics) and the fleet's (windows, starts)."""

    small: list[str]
    big: list[LargeGuest]
    hostile: int
    t0: float  # the daemon started (monotonic, the fleet's clock)
    ready: float  # it answered /-/healthy
    stopped: float
    rc: int
    cpu: float
    reloads: int
    body: bytes  # the last /metrics
    series: dict[str, Series]
    worst_age: dict[str, float]  # per large guest, the oldest last success seen in a sample
    runs: list[Run]
    attempts: dict[str, list[float]]
    crashed: list[str]
    calc_runs: int


def run(args: argparse.Namespace) -> Soak:
    """Run the daemon over the fleet for ``args.minutes``."""
    limit: int = args.max_concurrent
    hostile = [] if args.no_hostile else HOSTILE

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    (tmp / "s").mkdir()
    fleet = FakeQMPFleet(directory=tmp / "s")
    recorder = FleetRecorder(fleet)
    small = [f"ok{i:03d}" for i in range(args.healthy)]
    for i, name in enumerate(small):
        fleet.add(name, FakeVM(version=V10, package=PKG10, seed=i))
    big = large_guests(args.large, args.large_sample_pages)
    for i, g in enumerate(big):
        vm = FakeVM(
            version=V10,
            package=PKG10,
            seed=1000 + i,
            memory_bytes=g.gib * GiB,
            working_set_bytes=1 * GiB,
            dirty_bytes_per_second=100 * 2**20,
            zero_bytes=g.gib * GiB // 2,
            hash_seconds_per_page=args.hash_us_per_page * 1e-6,
        )
        fleet.add(g.name, vm)
    fleet.add("events", FakeVM(version=V10, package=PKG10), faults=Fault.EVENTS)
    for f in hostile:
        params = FaultParams(
            huge_line_bytes=20_000_000,
            delay_seconds=3.0,
            command="query-status" if f is Fault.HUGE_LINE else None,
        )
        fleet.add(f"bad-{str(f.name).lower()}", FakeVM(version=V10, package=PKG10), faults=f, params=params)
    for ep in fleet.endpoints:
        recorder.attach(ep)
    big_cfg = {g.name: g for g in big}

    with fleet.run_in_thread(), banner_service() as banner:
        config = tmp / "config.yaml"
        lines = [
            "global:",
            f"  interval: {INTERVAL_S:g}s",
            "  jitter: 1s",
            f"  max_concurrent: {limit}",
            "  measurement: {periods: [50ms, 100ms], zero_pages: none, connect_timeout: 1s,",
            "                command_timeout: 1s, settle_timeout: 1s}",
            "targets:",
        ]
        for ep in fleet.endpoints:
            entry = f"  - {{name: {ep.name}, qmp: 'unix:{ep.address}'"
            lg = big_cfg.get(ep.name)
            if lg is not None:
                pin = f"sample_pages: {lg.sample_pages}, " if lg.sample_pages else ""
                entry += f", measurement: {{{pin}settle_timeout: {LARGE_SETTLE_TIMEOUT}}}"
            lines.append(entry + "}")
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
        next_reload = t0 + args.reload_seconds
        reloads = 0
        cpu0 = 0.0
        ready = t0
        worst_age: dict[str, float] = dict.fromkeys(big_cfg, 0.0)
        try:
            while True:
                try:
                    get(url + "/-/healthy")
                    break
                except OSError:
                    time.sleep(0.2)
            cpu0 = cpu_seconds(proc.pid)
            ready = time.monotonic()
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
                now_wall = time.time()
                for name, ts in per_vm(body, "migpredictd_last_success_timestamp_seconds").items():
                    if name in worst_age and ts > 0:
                        worst_age[name] = max(worst_age[name], now_wall - ts)
                if time.monotonic() >= next_reload:  # a reload every 30 s, alternately by HTTP and SIGHUP
                    if reloads % 2:
                        proc.send_signal(signal.SIGHUP)
                    else:
                        get(url + "/-/reload", "POST")
                    reloads += 1
                    next_reload += args.reload_seconds
                time.sleep(args.sample_seconds)
            body = get(url + "/metrics")
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            rc = proc.wait(15)
            log.close()
        stopped = time.monotonic()
        return Soak(
            small=small,
            big=big,
            hostile=len(hostile),
            t0=t0,
            ready=ready,
            stopped=stopped,
            rc=rc,
            cpu=cpu,
            reloads=reloads,
            body=body,
            series=series,
            worst_age=worst_age,
            runs=list(recorder.runs),
            attempts={name: list(ts) for name, ts in recorder.attempts.items()},
            crashed=[ep.name for ep in fleet.endpoints if ep.crashed],
            calc_runs=sum(ep.commands.count("calc-dirty-rate") for ep in fleet.endpoints),
        )


def report(args: argparse.Namespace, s: Soak) -> tuple[str, list[str]]:
    """The run's section of soak.md, and what makes it fail (nothing: it passed)."""
    limit: int = args.max_concurrent
    small, big, runs, attempts = s.small, s.big, s.runs, s.attempts
    t0, ready, stopped, rc, cpu = s.t0, s.ready, s.stopped, s.rc, s.cpu
    wall = stopped - t0
    up_by_vm = per_vm(s.body, "migpredictd_up")
    up = sum(1 for vm in [*small, *(g.name for g in big), "events"] if up_by_vm.get(vm) == 1.0)
    failures_by_vm = per_vm(s.body, "migpredictd_measurement_failures_total")
    failures = sum(failures_by_vm.values())
    took = per_vm(s.body, "migpredictd_measurement_duration_seconds")
    lag = metric(s.body, "migpredictd_event_loop_lag_max_seconds")

    def cost(r: Run) -> int:
        return run_cost(r.pages, limit)

    peak = peak_in_flight(runs, cost)
    peak_known = peak_in_flight((r for r in runs if r.attempt > 1), cost)
    peak_uncapped = peak_in_flight(runs, lambda r: run_cost(r.pages, sys.maxsize))
    most_open = peak_in_flight(runs, lambda _r: 1)
    small_counts = [len(attempts.get(n, [])) for n in small]
    small_gaps = [worst_gap(attempts.get(n, []), ready, stopped) for n in small]
    runs_by_vm: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        runs_by_vm[r.vm].append(r)

    problems: list[str] = []
    if rc != 0:
        problems.append(f"daemon exit code {rc}")
    if s.crashed:
        problems.append(f"endpoints crashed: {', '.join(s.crashed)}")
    if peak.total > limit:
        problems.append(f"cost in flight reached {peak.total} units, above max_concurrent {limit}")
    for g in big:
        if not attempts.get(g.name) or up_by_vm.get(g.name) != 1.0:
            problems.append(f"{g.name} was not measured or not up at the end")

    sizes = ", ".join(f"{g.gib}" for g in big)
    pinned = [g for g in big if g.sample_pages]
    heading = f"## {args.minutes:g} minutes, accelerated (2 s interval), {len(big)} large guests"
    command = f"python -m benchmarks.soak --minutes {args.minutes:g}"
    for flag, value, default in (
        ("--healthy", args.healthy, 40),
        ("--large", args.large, 4),
        ("--large-sample-pages", args.large_sample_pages, 4096),
        ("--hash-us-per-page", args.hash_us_per_page, 1.5),
        ("--max-concurrent", limit, 16),
    ):
        if value != default:
            command += f" {flag} {value:g}"
    command += " --no-hostile" if args.no_hostile else ""
    command += " --write" if args.write else ""
    hostile_text = (
        f" + {s.hostile} hostile (one per fault: refused, no greeting, no replies, garbage, truncated, "
        "20 MB line, reset mid reply, command error, measuring for ever, negative rate, zero/huge memory, "
        "3 s stalls, migrating, paused)"
        if s.hostile
        else ""
    )
    out = [
        heading,
        "",
        f"Command: `{command}` on an {platform.machine()} host with 2 cores shared with other work, Python "
        f"{platform.python_version()}.",
        "",
        f"Fleet: {args.healthy} healthy small (512 MiB) fake QEMU 10.0 VMs + {len(big)} large ones + 1 "
        f"emitting events{hostile_text} + 1 non-QMP banner service; `max_concurrent: {limit}`. A reload "
        f"every {args.reload_seconds:g} s (HTTP and SIGHUP in turn).",
    ]
    if big:
        out += [
            "",
            f"Large guests: {sizes} GiB, QEMU 10.0, whose first hash pass takes {args.hash_us_per_page:g} µs "
            "per sampled page (so a window shorter than the pass is stretched, as QEMU's is); "
            f"`settle_timeout: {LARGE_SETTLE_TIMEOUT}` in their own `measurement`. "
            + (
                f"{', '.join(g.name for g in pinned)} pinned at `sample_pages: {args.large_sample_pages}` "
                f"(per GiB), the others on the daemon's default. "
                if pinned
                else "All on the daemon's default sample-pages. "
            )
            + f"A run is worth ceil(pages per run / {SAMPLES_PER_RUN}) `max_concurrent` units, at least 1 "
            "and at most the limit.",
        ]
    out += [
        "",
        f"- wall {wall:.0f} s, daemon exit code {rc}, daemon CPU {cpu:.0f} s "
        f"({cpu / wall * 100:.0f}% of a core)",
        f"- calc-dirty-rate runs served: {s.calc_runs}; failures counted: {failures:.0f}; "
        f"reloads: {s.reloads}",
        f"- at the end: {up} targets up of {args.healthy + len(big) + 1} healthy; worst event-loop lag "
        f"{lag or 0:.3f} s",
        f"- endpoints crashed (forbidden calc-dirty-rate mode): {len(s.crashed)}",
        f"- cost in flight, from the fleet's side (calc-dirty-rate windows open at the same instant, each at "
        f"its run's cost): max **{peak.total}** units against `max_concurrent` {limit}, first at "
        f"{peak.at - t0:.0f} s with {peak.runs} windows open; {peak_known.total} outside each target's first "
        f"measurement (a pinned target's is weighed at the whole limit); uncapped {peak_uncapped.total}; "
        f"windows open at once: max {most_open.total}",
        f"- small guests: measurements begun per guest median {statistics.median(small_counts or [0]):g} "
        f"(min {min(small_counts or [0])}, max {max(small_counts or [0])}); the longest any went without one "
        f"beginning {max(small_gaps or [0.0]):.1f} s",
    ]
    if big:
        out += [
            "",
            "| large guest | RAM | sample-pages/GiB | pages in its first run | cost (units) "
            "| measurements begun | calc-dirty-rate runs | longest without one beginning | last one took "
            "| oldest last success (5 s samples) | failures | up at end |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in big:
            mine = runs_by_vm.get(g.name, [])
            first_pages = mine[0].pages if mine else 0
            out.append(
                f"| {g.name} | {g.gib} GiB | {g.sample_pages or 'default'} | {first_pages} "
                f"| {run_cost(first_pages, limit)} | {len(attempts.get(g.name, []))} | {len(mine)} "
                f"| {worst_gap(attempts.get(g.name, []), ready, stopped):.1f} s "
                f"| {took.get(g.name, 0.0):.1f} s | {s.worst_age[g.name]:.1f} s "
                f"| {failures_by_vm.get(g.name, 0.0):.0f} "
                f"| {'yes' if up_by_vm.get(g.name) == 1.0 else 'no'} |"
            )
    out += [
        "",
        "| series | first | last | min | max | range (2nd half) | slope (2nd half, per hour) |",
        "|---|---|---|---|---|---|---|",
    ]
    for ser in s.series.values():
        first, last, lo, hi, rng, slope = ser.summary()
        u = f" {ser.unit}" if ser.unit else ""
        out.append(
            f"| {ser.name} | {first:.1f}{u} | {last:.1f}{u} | {lo:.1f}{u} | {hi:.1f}{u} | {rng:.1f}{u} | "
            f"{slope:+.2f}{u}/h |"
        )
    out += ["", "Result: " + ("FAILED: " + "; ".join(problems) if problems else "passed") + "."]
    return "\n".join(out) + "\n", problems


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    text, problems = report(args, run(args))
    print(text)
    if args.write:
        write_section(RESULTS, text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
