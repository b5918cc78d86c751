"""Prediction speed, each figure measured in this one run on the same inputs.

1. Derived answers in ``qemu`` mode: the marginal cost per VM between a batch of N and one of 2N VMs
   (target <= 1 ms), one VM through the CLI, Python start-up included (target <= 1 s wall), and the
   answers compared with the brute-force oracle (``reference.brute_force_derived``).
2. The grid through the CLI (``predict --mode seed --format table``, parse + predict + render): the
   marginal per-VM cost from two batch sizes against the plain seed algorithm's per-VM time
   (target >= 100x); also the vectorised ``seed`` mode alone, every cell checked against the seed.
3. Each orchestrator policy (defaults) over the grid's bandwidths, per VM, for KVM and for TCG guests
   (whose throttled passes wait for the vCPU), beside the VM's grid (``predict_grid``, qemu mode) on
   the same VMs.

    python benchmarks/predict.py [--vms 200] [--baseline-vms 50] [--before TREE] [--write]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from migpredictd.core.measurement import parse_measurement
from migpredictd.core.model import MemoryModel, build_model
from migpredictd.core.policies import POLICIES, Policy, PolicyOutcome, make_policy, predict_policy
from migpredictd.core.predictor import (
    DEFAULT_BANDWIDTHS,
    DEFAULT_DOWNTIMES,
    ModelBatch,
    PredictorSettings,
    make_grid,
    predict_derived,
    predict_grid,
)
from migpredictd.lab.reference import brute_force_derived, seed_cell_ms

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "cover_letter_sample.json"
RESULTS = ROOT / "benchmarks" / "results" / "predict.md"


def inputs(n: int, seed: int = 1) -> list[dict[str, object]]:
    """The cover letter's VM, scaled: each VM's dirty counts and zero pages vary by up to 4x."""
    base = json.loads(SAMPLE.read_text())
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        k = rnd.uniform(0.25, 1.0)
        d = dict(base)
        d["n-dirty-pages"] = [max(1, round(x * k)) for x in base["n-dirty-pages"]]
        d["n-zero-pages"] = round(base["n-zero-pages"] * rnd.uniform(0.5, 1.0))
        out.append(d)
    return out


def fleet(n: int, seed: int = 1, mode: str = "seed") -> list[MemoryModel]:
    """:func:`inputs` as memory models."""
    return [build_model(parse_measurement(d), mode=mode) for d in inputs(n, seed)]  # type: ignore[arg-type]


def best_of(runs: int, f: Callable[[], object]) -> float:
    """The fewest wall seconds of ``runs`` calls: the machine's other load only ever adds time, and on
    this shared host it moves from one minute to the next, so the fastest run is the one to compare."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def cli(args: list[str], stdin: Path, tree: Path = ROOT) -> float:
    """Wall seconds of one ``migpredictd`` process of the checkout ``tree`` reading ``stdin``."""
    t0 = time.perf_counter()
    with stdin.open("rb") as f:
        subprocess.run(
            [sys.executable, "-m", "migpredictd.cli", *args],
            stdin=f,
            stdout=subprocess.DEVNULL,
            check=True,
            cwd=tree,  # python -m finds the package in the working directory first
        )
    return time.perf_counter() - t0


# Section 1 in another checkout, on inputs given as JSON lines on stdin: its own parser, model and
# predictor, timed as main() times this tree's.
_DERIVED_ELSEWHERE = """
import json, sys, time
from migpredictd.core.measurement import parse_measurement
from migpredictd.core.model import build_model
from migpredictd.core.predictor import DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES, PredictorSettings, make_grid
from migpredictd.core.predictor import predict_derived
n = int(sys.argv[1])
models = [build_model(parse_measurement(json.loads(line)), mode="qemu") for line in sys.stdin]
grid, qemu = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES), PredictorSettings(mode="qemu")
def fastest_of_3(f):
    times = []
    for _ in range(3):
        t0 = time.perf_counter(); f(); times.append(time.perf_counter() - t0)
    return min(times)
small = fastest_of_3(lambda: predict_derived(models[:n], grid, qemu))
print(small, fastest_of_3(lambda: predict_derived(models, grid, qemu)))
"""


def derived_elsewhere(tree: Path, n: int, n2: int) -> tuple[float, float]:
    """The fewest wall seconds of three runs of the derived answers of the first ``n`` and of all
    ``n2`` VMs of :func:`inputs` in the checkout ``tree``."""
    lines = "".join(json.dumps(d) + "\n" for d in inputs(n2))
    out = subprocess.run(
        [sys.executable, "-c", _DERIVED_ELSEWHERE, str(n)],
        input=lines, capture_output=True, text=True, check=True, cwd=tree,
    )  # fmt: skip
    small, large = out.stdout.split()
    return float(small), float(large)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vms", type=int, default=500, help="the smaller batch (the larger is twice as big)")
    ap.add_argument(
        "--cli-vms", type=int, default=1000, help="the CLI's smaller batch (the larger is four times as big)"
    )
    ap.add_argument("--baseline-vms", type=int, default=50, help="VMs timed with the slow baseline")
    ap.add_argument("--oracle-vms", type=int, default=40, help="VMs whose derived answers the oracle checks")
    ap.add_argument("--policy-vms", type=int, default=200, help="VMs whose policy outcomes are timed")
    ap.add_argument(
        "--before",
        type=Path,
        metavar="TREE",
        help="a checkout of an earlier commit: its derived answers and CLI are also timed, on the same "
        "inputs in this run",
    )
    ap.add_argument("--write", action="store_true", help=f"also write {RESULTS.relative_to(ROOT)}")
    args = ap.parse_args()
    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    n, n2 = args.vms, 2 * args.vms
    qemu = PredictorSettings(mode="qemu")
    seed = PredictorSettings(mode="seed")
    deadline_ms = seed.deadline_seconds * 1000.0

    # The plain seed algorithm, cell by cell: the baseline of target 2, timed here and again beside the
    # CLI's runs (the faster of the two counts).
    models = fleet(n2)

    def seed_baseline() -> tuple[list[list[int | None]], float]:
        t0 = time.perf_counter()
        cells = [
            [seed_cell_ms(m, bw, dt * 1000.0, deadline_ms) for bw in grid.bandwidths for dt in grid.downtimes]
            for m in models[: args.baseline_vms]
        ]
        return cells, (time.perf_counter() - t0) * 1000.0 / args.baseline_vms

    base, seed_ms = seed_baseline()

    # 1. Derived answers, qemu mode.
    qmodels = fleet(n2, mode="qemu")
    small = best_of(3, lambda: predict_derived(qmodels[:n], grid, qemu))
    large = best_of(3, lambda: predict_derived(qmodels, grid, qemu))
    derived_marginal_ms = (large - small) * 1000.0 / (n2 - n)
    before = None if args.before is None else derived_elsewhere(args.before, n, n2)
    cover = Path(tempfile.mkstemp(suffix=".json")[1])
    cover.write_text(SAMPLE.read_text())
    one_vm = min(cli(["predict", "--format", "json"], cover) for _ in range(5))
    sample = qmodels[: args.oracle_vms]
    got_bw, got_dt = predict_derived(sample, grid, qemu)
    want_bw, want_dt = brute_force_derived(ModelBatch.of(sample), grid, qemu)
    step = math.log(1e13 / 1e3) / 2**20
    worst = 0.0
    for got, want in ((got_bw, want_bw), (got_dt, want_dt)):
        if not (np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got == 0, want == 0)):
            raise SystemExit("derived answers: nan/0 differ from the oracle")
        ok = ~np.isnan(want) & (want > 0)
        worst = max(worst, float(np.max(np.abs(np.log(got[ok]) - np.log(want[ok])), initial=0.0)))
    say(f"grid: {len(grid.bandwidths)} bandwidths x {len(grid.downtimes)} downtimes")
    say("1. derived answers, qemu mode:")
    say(f"   marginal per VM ({n} -> {n2} VMs):        {derived_marginal_ms:8.3f} ms   (target <= 1 ms)")
    say(
        f"   batch of {n}: {small * 1000 / n:.3f} ms per VM; batch of {n2}: {large * 1000 / n2:.3f} ms per VM"
    )
    if before is not None:
        b_small, b_large = before
        b_marginal = (b_large - b_small) * 1000.0 / (n2 - n)
        say(
            f"   the same, before (--before {args.before}): marginal {b_marginal:.3f} ms;"
            f" batch of {n2}: {b_large * 1000 / n2:.3f} ms per VM -> now {large / b_large:.2f}x its time"
        )
    say(f"   one VM through the CLI (cover letter, json): {one_vm:8.3f} s    (target <= 1 s)")
    say(
        f"   vs the brute-force oracle on {len(sample)} VMs: worst log difference {worst:.1e} "
        f"(one lattice step is {step:.1e})"
    )
    if worst > step:
        raise SystemExit("derived answers differ from the oracle by more than one lattice step")

    # 2. The grid through the CLI, seed mode, table output: parse + predict + render.
    # Process start-up varies by tens of ms from run to run: batches large enough to dwarf it.
    c1, c2 = args.cli_vms, 4 * args.cli_vms
    files = {}
    for size in (c1, c2):
        path = Path(tempfile.mkstemp(suffix=".jsonl")[1])
        path.write_text("".join(json.dumps(d) + "\n" for d in inputs(size)))
        files[size] = path
    argv = ["predict", "--mode", "seed", "--format", "table"]

    def cli_marginal_ms(tree: Path) -> float:
        t_small = min(cli(argv, files[c1], tree) for _ in range(5))
        t_large = min(cli(argv, files[c2], tree) for _ in range(5))
        return float((t_large - t_small) * 1000.0 / (c2 - c1))

    cli_ms = cli_marginal_ms(ROOT)
    seed_ms = min(seed_ms, seed_baseline()[1])
    before_ms = None if args.before is None else cli_marginal_ms(args.before)
    fast_ms = best_of(3, lambda: predict_grid(models, grid, seed, derived=False)) * 1000.0 / n2
    fast = predict_grid(models[: args.baseline_vms], grid, seed, derived=False)
    mismatches = 0
    for ref, pred in zip(base, fast, strict=True):
        cells = [None if math.isnan(s) else round(s * 1000.0) for s in pred.seconds.ravel()]
        mismatches += sum(a != b for a, b in zip(ref, cells, strict=True))
    say("2. the grid, seed mode:")
    say(f"   seed algorithm, cell by cell ({args.baseline_vms} VMs):  {seed_ms:8.3f} ms per VM")
    ratio = seed_ms / cli_ms
    say(f"   CLI, table, marginal per VM ({c1} -> {c2}): {cli_ms:8.3f} ms   -> {ratio:.0f}x (target >= 100x)")
    if before_ms is not None:
        say(
            f"   the same, before (--before {args.before}): {before_ms:8.3f} ms"
            f"   -> {seed_ms / before_ms:.0f}x"
        )
    say(f"   vectorised seed mode alone ({n2} VMs):       {fast_ms:8.3f} ms   -> {seed_ms / fast_ms:.0f}x")
    compared = len(base) * len(grid.bandwidths) * len(grid.downtimes)
    say(f"   cells compared with the seed: {compared}, mismatches: {mismatches}")
    for path in [cover, *files.values()]:
        path.unlink()
    if mismatches:
        raise SystemExit("seed mode does not reproduce the seed algorithm")

    # 3. Orchestrator policies over the grid's bandwidths (auto-converge and postcopy: every cell), per
    # VM, beside the grid of the same VMs in this run.
    pvms = qmodels[: args.policy_vms]
    t_grid = best_of(3, lambda: predict_grid(pvms, grid, PredictorSettings())) * 1000.0 / len(pvms)
    say(f"3. policies, per VM over {len(grid.bandwidths)} bandwidths ({len(pvms)} VMs, qemu-mode models):")
    for name in POLICIES:
        policy = make_policy(name)
        per_downtime = name in ("auto-converge", "postcopy")
        downtimes: tuple[float | None, ...] = grid.downtimes if per_downtime else (None,)
        policy_cells = [(b, d) for b in grid.bandwidths for d in downtimes]

        def new(policy: Policy = policy, tcg: bool = False) -> list[list[PolicyOutcome]]:
            return [
                predict_policy(m, policy, grid.bandwidths, downtimes=grid.downtimes, tcg=tcg) for m in pvms
            ]

        t_new = best_of(3, new) * 1000.0 / len(pvms)
        t_tcg = best_of(3, functools.partial(new, policy, True)) * 1000.0 / len(pvms)
        say(
            f"   {name:<13} ({len(policy_cells):2d} cells): {t_new:6.3f} ms (TCG guests {t_tcg:6.3f} ms), "
            f"the grid {t_grid:6.3f} ms"
        )
    if args.write:
        RESULTS.write_text(
            "# Prediction speed\n\n`python benchmarks/predict.py --write`, one run, 2-core shared host, "
            f"Python {sys.version.split()[0]}.\n\n```\n" + "\n".join(lines) + "\n```\n"
        )


if __name__ == "__main__":
    main()
