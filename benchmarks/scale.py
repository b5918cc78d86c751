"""Scale: /metrics latency, memory and CPU of the daemon at 100, 1,000 and 10,000 VMs.

Two parts, both printed as Markdown (``--write`` puts them in ``benchmarks/results/scale.md``):

1. The exposition alone, in a fresh process per variant (so peak RSS is the variant's own): the renderer
   as first committed (every target's text cached as str, all five per-cell families, the whole body
   joined per state change; kept below as ``LegacyRenderer``, the baseline) against the streaming
   renderer, with and without per-cell details. Ratios are against the baseline of the same run.
2. The real daemon as a subprocess over a fake fleet in another process
   (``python -m migpredictd.lab.fakeqmp``, QEMU 10.0 shapes, one 50 ms calc-dirty-rate per VM):
   time until every target has a prediction, CPU seconds of that first round, event-loop lag, RSS,
   scrape latency (median, p99) with and without gzip, and how the jitter spreads the first round.

    python -m benchmarks.scale                   # 100, 1,000, 10,000 (about 5 minutes on 2 cores)
    python -m benchmarks.scale --sizes 100 1000  # quicker
    python -m benchmarks.scale --sizes 10000 --part 2 --policies nova kubevirt   # with policies configured
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "scale.md"
SAMPLE = Path(__file__).parent.parent / "tests" / "data" / "cover_letter_sample.json"
V10 = "10.0.2"
PKG10 = "Debian 1:10.0.2+ds-2~bpo12+1"


# --------------------------------------------------------------------------------------------------
# Part 1: the exposition alone


def _state(n: int) -> object:
    """A State with ``n`` measured targets (one prediction shared: the renderer does not care)."""
    from migpredictd.core.measurement import parse_measurement
    from migpredictd.core.model import build_model
    from migpredictd.core.predictor import (
        DEFAULT_BANDWIDTHS,
        DEFAULT_DOWNTIMES,
        PredictorSettings,
        make_grid,
        predict_grid,
    )
    from migpredictd.serve.state import State

    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    m = parse_measurement(json.loads(SAMPLE.read_text()))
    (p,) = predict_grid([build_model(m)], grid, PredictorSettings())
    state = State()
    state.set_targets({f"vm{i:05d}": (f"unix:/run/qemu/vm{i:05d}.qmp", {"team": "db"}) for i in range(n)})
    for i in range(n):
        state.record_success(f"vm{i:05d}", m, p, grid, at=1.7e9 + i, duration=8.123)
    return state


class LegacyRenderer:
    """The renderer as first committed (the baseline): per-target str cache, whole body joined."""

    def __init__(self, state: object) -> None:
        self._state = state
        self._per_target: dict[str, tuple[int, dict[str, str]]] = {}
        self._body: tuple[int, bytes] | None = None

    def render(self) -> bytes:
        from migpredictd.serve.collector import FAMILIES, _escape, _format_value, target_samples
        from migpredictd.serve.state import State

        state = self._state
        assert isinstance(state, State)
        version = state.version
        if self._body is not None and self._body[0] == version:
            return self._body[1]
        cache: dict[str, tuple[int, dict[str, str]]] = {}
        for name, t in state.snapshot().items():
            hit = self._per_target.get(name)
            if hit is not None and hit[0] == t.version:
                cache[name] = hit
                continue
            out: dict[str, list[str]] = {}
            for fam, labels, value in target_samples(t, details=True):
                lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                out.setdefault(fam, []).append(f"{fam}{{{lab}}} {_format_value(value)}\n")
            cache[name] = (t.version, {k: "".join(v) for k, v in out.items()})
        self._per_target = cache
        parts: list[str] = []
        for f in FAMILIES:
            parts.append(f"# HELP {f.name.removesuffix('_total')} {f.help}\n")
            parts.append(f"# TYPE {f.name.removesuffix('_total')} {f.kind}\n")
            parts.extend(chunks[f.name] for _, chunks in cache.values() if f.name in chunks)
        body = "".join(parts).encode()
        self._body = (version, body)
        return body


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def exposition_variant(variant: str, n: int) -> dict[str, float]:
    """Run one variant in this process; peak RSS is ru_maxrss after a baseline taken before rendering."""
    from prometheus_client import CollectorRegistry

    from migpredictd.serve.collector import MetricsRenderer
    from migpredictd.serve.state import State

    state = _state(n)
    assert isinstance(state, State)
    base = _rss_mib()
    t0 = time.perf_counter()
    if variant == "legacy":
        legacy = LegacyRenderer(state)
        size = len(legacy.render())
        first = time.perf_counter() - t0
        cached = []
        for _ in range(5):
            t = time.perf_counter()
            legacy.render()
            cached.append(time.perf_counter() - t)
        # One target changes: the legacy renderer rebuilds the whole body.
        state.record_failure("vm00000", "timeout", "x", at=2e9, duration=1.0)
        t = time.perf_counter()
        body = legacy.render()
        changed = time.perf_counter() - t
        t = time.perf_counter()
        gzip.compress(body, compresslevel=6, mtime=0)  # what the legacy server did to it at every gzip scrape
        gz = time.perf_counter() - t
    else:
        r = MetricsRenderer(state, CollectorRegistry(), details=variant == "details")
        r.refresh()  # done by the daemon in a worker thread as results arrive
        first = time.perf_counter() - t0

        def serve() -> int:
            return sum(len(c) for c in r.chunks())

        size = serve()
        cached = []
        for _ in range(5):
            t = time.perf_counter()
            serve()
            cached.append(time.perf_counter() - t)
        state.record_failure("vm00000", "timeout", "x", at=2e9, duration=1.0)
        t = time.perf_counter()
        serve()
        changed = time.perf_counter() - t
        t = time.perf_counter()
        gz = sum(len(c) for c in r.gzip_chunks())
        gz = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n": n,
        "body_mb": size / 1e6,
        "first_s": first,
        "scrape_ms": statistics.median(cached) * 1e3,
        "after_change_ms": changed * 1e3,
        "gzip_ms": gz * 1e3,
        "rss_added_mib": _rss_mib() - base,
        "peak_rss_mib": peak,
    }


def part1(sizes: list[int]) -> list[str]:
    out = [
        "## 1. The exposition alone (in-process, one fresh process per variant)",
        "",
        "`legacy` = the renderer as first committed (baseline); `stream` = the streaming renderer with the "
        "default `per_cell_details: false`; `stream+details` = the same with all five per-cell families "
        "(the legacy body's content). `first` = rendering every target once (the daemon does it in a worker "
        "thread as results arrive); `scrape` = serving /metrics with nothing changed; `after change` = "
        "serving it after one target changed; `RSS added` = resident memory the renderer holds after the "
        "scrapes; `peak` = the process's peak RSS.",
        "",
        "| VMs | variant | body | first | scrape | after change | gzip scrape | RSS added | peak RSS | "
        "scrape vs legacy | RSS vs legacy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        rows: dict[str, dict[str, float]] = {}
        for variant in ("legacy", "stream", "details"):
            r = subprocess.run(
                [sys.executable, "-m", "benchmarks.scale", "--variant", variant, "--n", str(n)],
                capture_output=True, text=True, check=True, timeout=1200,
            )  # fmt: skip
            rows[variant] = json.loads(r.stdout.strip().splitlines()[-1])
        base = rows["legacy"]
        for variant, row in rows.items():
            name = {"legacy": "legacy", "stream": "stream", "details": "stream+details"}[variant]
            gz = f"{row['gzip_ms']:.0f} ms"
            out.append(
                f"| {n:,} | {name} | {row['body_mb']:.1f} MB | {row['first_s']:.2f} s | "
                f"{row['scrape_ms']:.0f} ms | {row['after_change_ms']:.0f} ms | {gz} | "
                f"{row['rss_added_mib']:.0f} MiB | {row['peak_rss_mib']:.0f} MiB | "
                f"{row['after_change_ms'] / base['after_change_ms']:.2f}x | "
                f"{max(row['rss_added_mib'], 0.1) / max(base['rss_added_mib'], 0.1):.2f}x |"
            )
        print("\n".join(out[-3:]), flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Part 2: the real daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(port: int, gz: bool) -> tuple[bytes, float]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if gz:
        req.add_header("Accept-Encoding", "gzip")
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 - loopback
        body = bytes(r.read())
    took = time.perf_counter() - t0
    return (gzip.decompress(body) if gz else body), took


def family(body: bytes, name: str) -> bytes:
    start = body.find(f"# TYPE {name} ".encode())
    if start < 0:
        return b""
    end = body.find(b"# HELP", start)
    return body[start : end if end >= 0 else len(body)]


def gauge(body: bytes, name: str) -> float:
    m = re.search(rb"^" + name.encode() + rb" (\S+)$", body, re.M)
    return float(m.group(1)) if m else float("nan")


def stage_counter(body: bytes, name: str, stage: str) -> float:
    m = re.search(rb"^" + name.encode() + rb'\{stage="' + stage.encode() + rb'"\} (\S+)$', body, re.M)
    return float(m.group(1)) if m else float("nan")


def proc_stat(pid: int) -> tuple[float, float, float]:
    """(CPU seconds, RSS MiB, peak RSS MiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return cpu, int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def start_fleet(n: int, directory: Path) -> tuple[subprocess.Popen[str], list[tuple[str, str]]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "migpredictd.lab.fakeqmp", "--count", str(n), "--dir", str(directory),
         "--qemu-version", V10, "--package", PKG10],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    endpoints = []
    for line in proc.stdout:
        if line.strip() == "ready":
            break
        name, address = line.split()
        endpoints.append((name, address))
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    return proc, endpoints


def write_fleet_config(
    path: Path,
    endpoints: list[tuple[str, str]],
    *,
    jitter: str,
    slots: int,
    interval: str = "1h",
    policies: list[str] | None = None,
) -> None:
    """The daemon's config for a fake fleet: one 50 ms calc-dirty-rate per VM, no zero pages, and
    ``policies`` (names, with their products' defaults) as ``global.policies``."""
    lines = [
        "global:",
        f"  interval: {interval}",
        f"  jitter: {jitter}",
        f"  max_concurrent: {slots}",
        "  measurement: {periods: [50ms], zero_pages: none, connect_timeout: 30s, command_timeout: 30s}",
        f"  policies: [{', '.join(policies or [])}]",
        "targets:",
    ]
    lines += [f"  - {{name: {name}, qmp: 'unix:{address}'}}" for name, address in endpoints]
    path.write_text("\n".join(lines) + "\n")


def daemon_run(
    n: int, *, jitter: float, max_concurrent: int, scrapes: int, policies: list[str] | None = None
) -> dict[str, float]:
    tmp = Path(
        tempfile.mkdtemp(prefix=f"scale{n}-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    )
    (tmp / "s").mkdir()
    fleet, endpoints = start_fleet(n, tmp / "s")
    config = tmp / "config.yaml"
    write_fleet_config(config, endpoints, jitter=f"{jitter:g}s", slots=max_concurrent, policies=policies)
    port = free_port()
    log = tmp / "daemon.log"
    t0 = time.monotonic()
    wall0 = time.time()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "migpredictd.cli", "run", f"--config.file={config}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    try:
        body = b""
        while True:
            try:
                body, _ = fetch(port, gz=True)
                break
            except OSError:
                time.sleep(0.1)
        listening = time.monotonic() - t0
        poll = max(1.0, n / 2500)
        up = 0
        while up < n:
            time.sleep(poll)
            assert daemon.poll() is None, log.read_text()[-2000:]
            body, _ = fetch(port, gz=True)
            up = family(body, "migpredictd_up").count(b"} 1.0\n")
            if time.monotonic() - t0 > 1800:
                raise TimeoutError(f"{up}/{n} predicted after 30 minutes")
        all_predicted = time.monotonic() - t0
        cpu_round, _, _ = proc_stat(daemon.pid)
        # Derived answers follow the grids from their own worker: wait for every target's.
        while stage_counter(body, "migpredictd_predicted_targets_total", "derived") < n:
            time.sleep(poll)
            assert daemon.poll() is None, log.read_text()[-2000:]
            body, _ = fetch(port, gz=True)
            if time.monotonic() - t0 > 1800:
                raise TimeoutError("derived answers not done after 30 minutes")
        all_derived = time.monotonic() - t0
        time.sleep(1.0)  # let the last batch's rendering settle
        plain, gz = [], []
        size = 0
        for _ in range(scrapes):
            b, took = fetch(port, gz=False)
            plain.append(took)
            size = len(b)
            _, took = fetch(port, gz=True)
            gz.append(took)
        _, rss, hwm = proc_stat(daemon.pid)
        body, _ = fetch(port, gz=False)
        lag = gauge(body, "migpredictd_event_loop_lag_max_seconds")
        tasks = gauge(body, "migpredictd_asyncio_tasks")
        cpu_grid = stage_counter(body, "migpredictd_prediction_cpu_seconds_total", "grid")
        cpu_derived = stage_counter(body, "migpredictd_prediction_cpu_seconds_total", "derived")
        cpu_policies = stage_counter(body, "migpredictd_prediction_cpu_seconds_total", "policies")
        predicted = stage_counter(body, "migpredictd_predicted_targets_total", "grid")
    finally:
        daemon.terminate()
        daemon.wait(30)
        fleet.terminate()
        fleet.wait(30)
    # The first round's spread: when each "measured" line was logged, relative to the start.
    done = []
    for line in log.read_text().splitlines():
        if 'msg="measured"' in line or "msg=measured" in line:
            ts = re.search(r"ts=(\S+)", line)
            if ts:
                when = datetime.fromisoformat(ts.group(1).replace("Z", "+00:00")).timestamp()
                done.append(when - wall0)
    per_second: dict[int, int] = {}
    for d in done:
        per_second[int(d)] = per_second.get(int(d), 0) + 1
    return {
        "n": n,
        "listening_s": listening,
        "all_predicted_s": all_predicted,
        "all_derived_s": all_derived,
        "prediction_ms_per_vm": (cpu_grid + cpu_derived + cpu_policies) / predicted * 1e3,
        "grid_ms_per_vm": cpu_grid / predicted * 1e3,
        "derived_ms_per_vm": cpu_derived / predicted * 1e3,
        "policies_ms_per_vm": cpu_policies / predicted * 1e3,
        "cpu_round_s": cpu_round,
        "plain_median_ms": statistics.median(plain) * 1e3,
        "plain_p99_ms": pct(plain, 0.99) * 1e3,
        "gzip_median_ms": statistics.median(gz) * 1e3,
        "gzip_p99_ms": pct(gz, 0.99) * 1e3,
        "body_mb": size / 1e6,
        "rss_mib": rss,
        "peak_rss_mib": hwm,
        "loop_lag_max_s": lag,
        "tasks": tasks,
        "first_done_s": min(done) if done else float("nan"),
        "last_done_s": max(done) if done else float("nan"),
        "max_per_second": float(max(per_second.values())) if per_second else 0.0,
        "jitter_s": jitter,
        "max_concurrent": max_concurrent,
    }


def part2(sizes: list[int], scrapes: int, policies: list[str] | None = None) -> list[str]:
    out = [
        "## 2. The daemon over a fake fleet",
        "",
        "Default 8 x 6 grid, `per_cell_details: false`, one 50 ms calc-dirty-rate per VM (QEMU 10.0 "
        "shapes), interval 1h (one round). The fleet runs in its own process on the same 2 cores. "
        "`all predicted` = from starting the daemon until every target has a prediction (polled with "
        "gzip scrapes); `derived` = until every target's derived answers are published too; `CPU` = the "
        "daemon's user+system seconds until all predicted; `prediction CPU` = what the prediction workers "
        "spent per VM, grid + derived answers + the configured policies' outcomes (each stage in brackets), "
        "from `migpredictd_prediction_cpu_seconds_total` and `migpredictd_predicted_targets_total`; "
        f"`policies` = `global.policies` ({'none' if not policies else ', '.join(policies)}, with their "
        "products' defaults); `lag` = the worst delay of the event loop "
        "(`migpredictd_event_loop_lag_max_seconds`); `spread` = when the first and last measurements of "
        "the first round finished, and the most that finished in one second.",
        "",
        "| VMs | jitter | slots | all predicted | derived | CPU (per VM) | policies "
        "| prediction CPU per VM (grid + derived + policies) | lag | "
        "spread | scrape median / p99 | gzip median / p99 | body | RSS (peak) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        jitter = max(1.0, n / 500)
        slots = min(256, max(16, n // 20))
        r = daemon_run(
            n,
            jitter=jitter,
            max_concurrent=slots,
            scrapes=scrapes if n < 10000 else max(5, scrapes // 2),
            policies=policies,
        )
        out.append(
            f"| {n:,} | {jitter:g} s | {slots} | {r['all_predicted_s']:.1f} s | {r['all_derived_s']:.1f} s | "
            f"{r['cpu_round_s']:.1f} s ({r['cpu_round_s'] / n * 1e3:.1f} ms) | "
            f"{', '.join(policies) if policies else 'none'} | "
            f"{r['prediction_ms_per_vm']:.2f} ms ({r['grid_ms_per_vm']:.2f} + {r['derived_ms_per_vm']:.2f} + "
            f"{r['policies_ms_per_vm']:.2f} ms) | "
            f"{r['loop_lag_max_s'] * 1e3:.0f} ms | "
            f"{r['first_done_s']:.1f}..{r['last_done_s']:.1f} s, max {r['max_per_second']:.0f}/s | "
            f"{r['plain_median_ms']:.0f} / {r['plain_p99_ms']:.0f} ms | "
            f"{r['gzip_median_ms']:.0f} / {r['gzip_p99_ms']:.0f} ms | {r['body_mb']:.1f} MB | "
            f"{r['rss_mib']:.0f} ({r['peak_rss_mib']:.0f}) MiB |"
        )
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--scrapes", type=int, default=20, help="scrapes per size and encoding")
    ap.add_argument("--part", choices=("1", "2", "both"), default="both")
    ap.add_argument(
        "--policies",
        nargs="*",
        default=[],
        metavar="NAME",
        help="part 2: orchestrator policies to configure (global.policies, defaults), e.g. nova kubevirt",
    )
    ap.add_argument("--write", action="store_true", help=f"write the tables to {RESULTS}")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.variant:  # a part-1 child process
        print(json.dumps(exposition_variant(args.variant, args.n)))
        return 0
    out = [
        "# Scale",
        "",
        f"`python -m benchmarks.scale --sizes {' '.join(map(str, args.sizes))}` on an {platform.machine()} "
        f"host, 2 cores shared with other engineers' work, Python {platform.python_version()}.",
        "",
    ]
    if args.part in ("1", "both"):
        out += [*part1([n for n in args.sizes if n >= 1000] or args.sizes), ""]
    if args.part in ("2", "both"):
        out += [*part2(args.sizes, args.scrapes, args.policies), ""]
    text = "\n".join(out)
    print(text)
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
