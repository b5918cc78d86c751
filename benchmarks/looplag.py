"""Event-loop lag of the daemon at 10,000 targets: during reloads, during a full round, and shutdown.

The daemon runs as a subprocess over a fake fleet in another process (``python -m
migpredictd.lab.fakeqmp``, QEMU 10.0 shapes with a schema as large as real QEMU's). ``--tree DIR`` runs
the daemon of another checkout (e.g. a ``git worktree`` of an older commit) against the same fleet, so
one run prints the figures before and after a change:

    git worktree add /tmp/before 3ad27e3
    python -m benchmarks.looplag --tree before=/tmp/before --tree after=. --write

Two phases per tree, each a fresh daemon:

1. **reloads**: interval 1h, jitter 59 min (a few measurements a second), three ``POST /-/reload`` in a row;
   ``lag`` = ``migpredictd_event_loop_lag_max_seconds`` after them (the loop's worst delay since start,
   which start-up and the sparse measurements keep small), ``reload`` = each POST's wall time.
2. **rounds**: the whole fleet measured within 20 s (256 at once), as in ``benchmarks/scale.py``, and again
   two minutes later; ``lag`` after each round, and the event-loop delay histogram over the second round
   (where the daemon has one); then SIGTERM at once, while derived answers are still computing:
   ``shutdown`` = SIGTERM to exit.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.scale import RESULTS, fetch, free_port, gauge, stage_counter, start_fleet, write_fleet_config

SECTION = "## 3. Event-loop lag at 10,000 targets"
LAG = "migpredictd_event_loop_lag_max_seconds"
ROUND_INTERVAL = "2m"  # longer than a round of 10,000 takes here, so the second round starts after the first


def _post_reload(port: int) -> float:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/-/reload", method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:  # noqa: S310 - loopback
            r.read()
    except urllib.error.HTTPError as e:
        raise AssertionError(f"reload failed: {e.code} {e.read()[:300]!r}") from e
    return time.perf_counter() - t0


def _start(tree: Path, config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "migpredictd.cli", "run", f"--config.file={config}",
         f"--web.listen-address=127.0.0.1:{port}"],
        cwd=tree, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip


def _wait_metrics(port: int, daemon: subprocess.Popen[bytes], log: Path) -> bytes:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert daemon.poll() is None, log.read_text()[-2000:]
        try:
            return fetch(port, gz=True)[0]
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the daemon did not serve /metrics within 10 minutes")


def _wait_grids(port: int, daemon: subprocess.Popen[bytes], log: Path, count: int, t0: float) -> bytes:
    """The scrape at which at least ``count`` grid predictions have been made."""
    while True:
        body = fetch(port, gz=True)[0]
        if stage_counter(body, "migpredictd_predicted_targets_total", "grid") >= count:
            return body
        assert daemon.poll() is None, log.read_text()[-2000:]
        if time.monotonic() - t0 > 1800:
            raise TimeoutError(f"fewer than {count} grids after 30 minutes")
        time.sleep(1.0)


def _delay_buckets(body: bytes) -> dict[float, float] | None:
    """``migpredictd_event_loop_delay_seconds``' cumulative buckets; None where the daemon lacks it."""
    found = re.findall(rb'^migpredictd_event_loop_delay_seconds_bucket\{le="([^"]+)"\} (\S+)$', body, re.M)
    return {float(le): float(v) for le, v in found} if found else None


def _worst_bucket(first: dict[float, float] | None, second: dict[float, float] | None) -> float:
    """The upper bound of the worst delay between two scrapes: the smallest bucket holding every check."""
    if first is None or second is None:
        return math.nan
    total = second[math.inf] - first[math.inf]
    return min(le for le in second if second[le] - first.get(le, 0.0) >= total)


def run_tree(tree: Path, n: int, reloads: int) -> dict[str, float]:
    tmp = Path(
        tempfile.mkdtemp(prefix=f"looplag{n}-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    )
    (tmp / "s").mkdir()
    fleet, endpoints = start_fleet(n, tmp / "s")
    out: dict[str, float] = {}
    try:
        # Phase 1: reloads.
        config = tmp / "reload.yaml"
        write_fleet_config(config, endpoints, jitter="59m", slots=16)
        port, log = free_port(), tmp / "reload.log"
        daemon = _start(tree, config, port, log)
        try:
            _wait_metrics(port, daemon, log)
            time.sleep(5.0)
            out["lag_before_reloads_s"] = gauge(
                fetch(port, gz=True)[0], "migpredictd_event_loop_lag_max_seconds"
            )
            walls = [_post_reload(port) for _ in range(reloads)]
            time.sleep(1.0)
            out["lag_reloads_s"] = gauge(fetch(port, gz=True)[0], LAG)
            out["reload_median_s"] = statistics.median(walls)
        finally:
            daemon.terminate()
            daemon.wait(60)
        # Phase 2: two rounds, then SIGTERM while the second round's derived answers are computing.
        config = tmp / "round.yaml"
        jitter, slots = f"{max(1.0, n / 500):g}s", min(256, max(16, n // 20))
        write_fleet_config(config, endpoints, jitter=jitter, slots=slots, interval=ROUND_INTERVAL)
        port, log = free_port(), tmp / "round.log"
        t0 = time.monotonic()
        daemon = _start(tree, config, port, log)
        try:
            body = _wait_metrics(port, daemon, log)
            body = _wait_grids(port, daemon, log, n, t0)
            out["all_predicted_s"] = time.monotonic() - t0
            out["lag_round1_s"] = gauge(body, LAG)
            first = _delay_buckets(body)
            body = _wait_grids(port, daemon, log, 2 * n, t0)
            out["lag_round2_s"] = gauge(body, LAG)
            second = _delay_buckets(body)
            out["round2_worst_bucket_s"] = _worst_bucket(first, second)
            t1 = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(600)
            out["shutdown_s"] = time.monotonic() - t1
            out["exit_code"] = float(daemon.returncode)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(30)
    finally:
        fleet.terminate()
        fleet.wait(30)
    return out


def table(results: list[tuple[str, str, dict[str, float]]], n: int, reloads: int) -> list[str]:
    out = [
        SECTION,
        "",
        f"`python -m benchmarks.looplag` ({n:,} fake QEMU 10.0 targets whose schema replies are as large as "
        f"real QEMU's; {reloads} reloads; see the script's docstring). `lag` = "
        "`migpredictd_event_loop_lag_max_seconds`, the event loop's worst delay since the daemon started: "
        "after the reloads (the daemon idle but for a few measurements a second), after the first round "
        f"(every target measured once, 256 at a time) and after the second ({ROUND_INTERVAL} later); "
        "`round 2 "
        "window` = the smallest bucket of `migpredictd_event_loop_delay_seconds` that holds every check "
        "made between the two (an upper bound on the second round's own worst delay; the histogram is new, "
        "so the old daemon has none); `reload` = the median wall time of `POST /-/reload`; `shutdown` = "
        "SIGTERM to exit, sent as the second round's grids were published.",
        "",
        "| daemon | lag after reloads | reload | all predicted | lag after round 1 | lag after round 2 "
        "| round 2 window | shutdown (exit code) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, tree, r in results:
        window = r["round2_worst_bucket_s"]
        cells = [
            f"{label} (`{tree}`)",
            f"{r['lag_reloads_s'] * 1e3:.0f} ms",
            f"{r['reload_median_s']:.2f} s",
            f"{r['all_predicted_s']:.1f} s",
            f"{r['lag_round1_s'] * 1e3:.0f} ms",
            f"{r['lag_round2_s'] * 1e3:.0f} ms",
            "-" if math.isnan(window) else f"<= {window * 1e3:.0f} ms",
            f"{r['shutdown_s']:.1f} s ({r['exit_code']:.0f})",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--reloads", type=int, default=3)
    ap.add_argument("--tree", action="append", default=[], help="LABEL=DIR: a checkout whose daemon runs")
    ap.add_argument("--write", action="store_true", help=f"put the table in {RESULTS} (section 3)")
    args = ap.parse_args(argv)
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("this tree", ".")]
    results = []
    for label, tree in trees:
        r = run_tree(Path(tree).resolve(), args.n, args.reloads)
        print(label, r, flush=True)
        results.append((label, tree, r))
    lines = table(results, args.n, args.reloads)
    lines.insert(
        2, f"Run on an {platform.machine()} host, 2 cores shared, Python {platform.python_version()}."
    )
    lines.insert(3, "")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        current = RESULTS.read_text() if RESULTS.exists() else ""
        if SECTION in current:
            current = current[: current.index(SECTION)].rstrip() + "\n\n"
        RESULTS.write_text(current + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
