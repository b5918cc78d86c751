"""Batch prediction speed: the vectorised ``seed`` mode against the plain seed algorithm, same inputs.

Prints per-VM milliseconds for both and their ratio (target: >= 100x), checks that every cell agrees,
and times ``qemu`` mode (grid only, and with the derived answers) on the same fleet.

    python benchmarks/predict.py [--vms 1000] [--baseline-vms 50]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

from migpredictd.cli import DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES, make_grid
from migpredictd.measurement import parse_measurement
from migpredictd.model import MemoryModel, build_model
from migpredictd.predictor import PredictorSettings, predict_grid
from migpredictd.reference import seed_cell_ms

SAMPLE = Path(__file__).resolve().parent.parent / "tests" / "data" / "cover_letter_sample.json"


def fleet(n: int, seed: int = 1) -> list[MemoryModel]:
    """The cover letter's VM, scaled: each VM's dirty counts and zero pages vary by up to 4x."""
    base = json.loads(SAMPLE.read_text())
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        k = rnd.uniform(0.25, 1.0)
        d = dict(base)
        d["n-dirty-pages"] = [max(1, round(x * k)) for x in base["n-dirty-pages"]]
        d["n-zero-pages"] = round(base["n-zero-pages"] * rnd.uniform(0.5, 1.0))
        out.append(build_model(parse_measurement(d)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--baseline-vms", type=int, default=50, help="VMs timed with the slow baseline")
    args = ap.parse_args()
    grid = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)
    models = fleet(args.vms)
    seed = PredictorSettings(mode="seed")
    deadline_ms = seed.deadline_seconds * 1000.0

    t0 = time.perf_counter()
    base = [
        [seed_cell_ms(m, bw, dt * 1000.0, deadline_ms) for bw in grid.bandwidths for dt in grid.downtimes]
        for m in models[: args.baseline_vms]
    ]
    base_ms = (time.perf_counter() - t0) * 1000.0 / args.baseline_vms

    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        fast = predict_grid(models, grid, seed, derived=False)
        runs.append((time.perf_counter() - t0) * 1000.0 / args.vms)
    fast_ms = statistics.median(runs)

    mismatches = 0
    for ref, pred in zip(base, fast, strict=False):
        got = [None if math.isnan(s) else round(s * 1000.0) for s in pred.seconds.ravel()]
        mismatches += sum(a != b for a, b in zip(ref, got, strict=True))

    qemu = PredictorSettings(mode="qemu")
    t0 = time.perf_counter()
    predict_grid(models, grid, qemu, derived=False)
    qemu_ms = (time.perf_counter() - t0) * 1000.0 / args.vms
    t0 = time.perf_counter()
    predict_grid(models, grid, qemu, derived=True)
    qemu_derived_ms = (time.perf_counter() - t0) * 1000.0 / args.vms

    cells = len(grid.bandwidths) * len(grid.downtimes)
    print(f"grid: {len(grid.bandwidths)} bandwidths x {len(grid.downtimes)} downtimes = {cells} cells per VM")
    print(f"seed algorithm, cell by cell ({args.baseline_vms} VMs): {base_ms:9.3f} ms per VM")
    print(f"seed mode, vectorised ({args.vms} VMs):              {fast_ms:9.3f} ms per VM")
    print(f"speed-up: {base_ms / fast_ms:.0f}x   (target >= 100x)")
    print(f"cells compared: {len(base) * cells}, mismatches: {mismatches}")
    print(f"qemu mode, grid only:                    {qemu_ms:9.3f} ms per VM")
    print(f"qemu mode, grid + derived answers:       {qemu_derived_ms:9.3f} ms per VM")
    if mismatches:
        raise SystemExit("seed mode does not reproduce the seed algorithm")


if __name__ == "__main__":
    main()
