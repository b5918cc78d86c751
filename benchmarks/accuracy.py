"""Prediction accuracy against real live migrations (QEMU 7.2 and 10.0, TCG, loopback).

For every case of a matrix (guest workload x max-bandwidth x downtime-limit): boot a source guest and an
incoming destination on 127.0.0.1, measure the source with :func:`migpredictd.qemu.measure.measure` (the
daemon's own code path), predict that exact cell in ``seed`` and ``qemu`` mode, run the real migration
(cancelled at the cutoff = "did not converge"), and append one JSON line. Then print the summary.

    python benchmarks/accuracy.py --set calibration --out benchmarks/results/accuracy-calibration.jsonl
    python benchmarks/accuracy.py --set holdout --out benchmarks/results/accuracy-holdout.jsonl
    python benchmarks/accuracy.py --quick                  # the CI slice, < 3 minutes
    python benchmarks/accuracy.py --summarize FILE.jsonl   # summary of recorded rows, no QEMU
    python benchmarks/accuracy.py --fit FILE.jsonl         # fits lab/loopback.py, core/calibration.py
    python benchmarks/accuracy.py --set holdout --only h07 --out ...   # re-run one case (appends)

Every QEMU is started by the rig and killed by PID when its case ends, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from migpredictd.core.calibration import limiter_for, rate_limiter_for
from migpredictd.core.errors import ZeroPagesUnavailableError
from migpredictd.core.measurement import DirtyPoint, Measurement, fit_dirty_curve, parse_measurement
from migpredictd.core.model import build_model
from migpredictd.core.predictor import (
    EXACT_RATE_LIMITER,
    ModelBatch,
    PredictorSettings,
    RateLimiter,
    simulate,
)
from migpredictd.lab.deployed import running_helper, share_qmp, unprivileged
from migpredictd.lab.loopback import SEED_PREDICTOR, loopback_predictor
from migpredictd.lab.rig.guest import Guest, GuestSpec, free_tcp_port
from migpredictd.lab.rig.migration import MigrationResult, migrate
from migpredictd.qemu.measure import measure
from migpredictd.qemu.settings import MeasureSettings
from migpredictd.qemu.zeropages import guest_sample_estimate, smaps_estimate, status_estimate

MIB: Final = 1 << 20
PAGE: Final = 4096
MBIT: Final = 125_000  # bytes/s per Mbit/s
BAD_ERROR: Final = 0.25  # a prediction this far off (relative) is "bad"
BOUNDARY_MARGIN: Final = 0.20  # "far from the boundary": the verdict holds for dirty rates x0.8 .. x1.2
DEFAULT_CUTOFF_S: Final = 40.0
Row = dict[str, Any]
LoadAvg = tuple[float, float, float]  # os.getloadavg()
GENERATION_VERSION: Final = {"7.2": "7.2", "10.0": "10.0"}  # the rig's QEMU generations as versions


@dataclass(frozen=True)
class Case:
    """One migration of the matrix: a guest workload and the migration parameters."""

    case_id: str
    spec: GuestSpec
    bandwidth: int  # QEMU max-bandwidth, bytes/s (the grid's bandwidth label)
    downtime_ms: int
    cutoff_s: float = DEFAULT_CUTOFF_S


# Positional on purpose: the case tables below read as columns (qemu, MiB, rate, wss, pattern, phase).
def _g(qemu: str, mem: int, rate: float = 0.0, wss: int = 0, pattern: str = "seq", phase: float = 0.0,  # noqa: PLR0917
       touch: int = 64, zeroed: int = 0) -> GuestSpec:  # fmt: skip
    return GuestSpec(
        zeroed_mib=zeroed,
        qemu=qemu,  # type: ignore[arg-type]
        memory_mib=mem,
        touch_mib=max(touch, wss),
        wss_mib=wss,
        rate_mib=rate,
        pattern=pattern,  # type: ignore[arg-type]
        phase_s=phase,
    )


# Calibration: 256 MiB guests, seq/random/phase workloads at 100-1000 Mbit/s. 100 Mbit/s is 11.9 MiB/s
# of page payload, so 8 MiB/s is below, 11 near and 16+ above the bandwidth.
CALIBRATION: Final[tuple[Case, ...]] = (
    Case("c01", _g("10.0", 256), 100 * MBIT, 300),
    Case("c02", _g("7.2", 256), 100 * MBIT, 300),
    Case("c03", _g("10.0", 256), 1000 * MBIT, 50),
    Case("c04", _g("7.2", 256), 1000 * MBIT, 50),
    Case("c05", _g("10.0", 256, 8, 32), 100 * MBIT, 50),
    Case("c06", _g("7.2", 256, 8, 32), 100 * MBIT, 50),
    Case("c07", _g("10.0", 256, 11, 48), 100 * MBIT, 300),
    Case("c08", _g("7.2", 256, 24, 32), 100 * MBIT, 3000),
    Case("c09", _g("10.0", 256, 24, 32), 100 * MBIT, 50),
    Case("c10", _g("10.0", 256, 24, 48, "random"), 400 * MBIT, 100),
    Case("c11", _g("7.2", 256, 16, 48, "random"), 100 * MBIT, 1000),
    Case("c12", _g("10.0", 256, 48, 64), 400 * MBIT, 50),
    Case("c13", _g("7.2", 256, 32, 64), 400 * MBIT, 300),
    Case("c14", _g("10.0", 256, 16, 16, "seq", 1.0), 200 * MBIT, 100),
    Case("c15", _g("7.2", 256, 16, 16, "seq", 1.0), 200 * MBIT, 100),
    Case("c16", _g("10.0", 256, 64, 96), 1000 * MBIT, 300),
    Case("c17", _g("7.2", 256, 64, 32), 1000 * MBIT, 50),
    Case("c18", _g("10.0", 256, 20, 64), 200 * MBIT, 2000),
    Case("c19", _g("7.2", 256, 4, 64, "random"), 200 * MBIT, 50),
    Case("c20", _g("10.0", 256, 40, 64), 1600 * MBIT, 50),
)

# Held out: other memory sizes, rates, working sets, bandwidths and downtimes than calibration.
HOLDOUT: Final[tuple[Case, ...]] = (
    Case("h01", _g("10.0", 512), 150 * MBIT, 100),
    Case("h02", _g("7.2", 512), 600 * MBIT, 1000),
    Case("h03", _g("10.0", 512, 6, 40), 150 * MBIT, 200),
    Case("h04", _g("7.2", 512, 6, 40), 150 * MBIT, 200),
    Case("h07", _g("10.0", 512, 20, 40), 150 * MBIT, 75),
    Case("h08", _g("7.2", 512, 20, 40), 150 * MBIT, 75),
    Case("h09", _g("10.0", 512, 30, 40, "random"), 300 * MBIT, 150),
    Case("h10", _g("7.2", 512, 30, 40, "random"), 300 * MBIT, 150),
    Case("h11", _g("10.0", 512, 24, 24, "seq", 0.5), 300 * MBIT, 75),
    Case("h12", _g("7.2", 512, 24, 24, "seq", 0.5), 300 * MBIT, 75),
    Case("h13", _g("10.0", 512, 36, 80), 600 * MBIT, 250),
    Case("h14", _g("7.2", 512, 36, 80), 600 * MBIT, 250),
    Case("h15", _g("10.0", 512, 80, 40), 600 * MBIT, 75),
    Case("h16", _g("7.2", 512, 80, 40), 600 * MBIT, 75),
    Case("h18", _g("7.2", 384, 12, 32), 120 * MBIT, 4000),
    Case("h19", _g("10.0", 512, 50, 120), 1200 * MBIT, 150),
    Case("h20", _g("7.2", 512, 50, 120), 1200 * MBIT, 150),
    Case("h22", _g("7.2", 512, 10, 24, "seq", 2.0), 150 * MBIT, 1000),
)

# A second held-out set, defined and run only after the model changes that the first two sets led to
# (age-bounded hot pages, origin extrapolation, rate-fitted sweeps, guest-sampled zero pages), so
# nothing in it informed the model: new sizes, rates, working sets and settings.
HOLDOUT2: Final[tuple[Case, ...]] = (
    Case("f01", _g("10.0", 384), 250 * MBIT, 150),
    Case("f02", _g("7.2", 448), 800 * MBIT, 500),
    Case("f03", _g("10.0", 384, 4, 56), 120 * MBIT, 300),
    Case("f04", _g("7.2", 384, 4, 56), 120 * MBIT, 300),
    Case("f05", _g("10.0", 448, 16, 72, "random"), 400 * MBIT, 200),
    Case("f06", _g("7.2", 448, 16, 72, "random"), 400 * MBIT, 200),
    Case("f07", _g("10.0", 384, 40, 96), 250 * MBIT, 100),
    Case("f08", _g("7.2", 384, 40, 96), 250 * MBIT, 100),
    Case("f09", _g("10.0", 448, 28, 48, "seq", 1.0), 500 * MBIT, 120),
    Case("f10", _g("7.2", 448, 28, 48, "seq", 1.0), 500 * MBIT, 120),
    Case("f11", _g("10.0", 384, 64, 160), 900 * MBIT, 300),
    Case("f12", _g("7.2", 384, 64, 160), 900 * MBIT, 300),
    Case("f13", _g("10.0", 448, 14, 40), 140 * MBIT, 2000),
    Case("f14", _g("7.2", 448, 14, 40), 140 * MBIT, 2000),
)

# A third held-out set, defined and run once, after the per-VM rate limiter and the 8 s window of
# sweep-ms (both chosen on the sets above): sizes, rates, working sets, bandwidths and downtimes that
# none of them used.
HOLDOUT3: Final[tuple[Case, ...]] = (
    Case("k01", _g("10.0", 320), 180 * MBIT, 60),
    Case("k02", _g("7.2", 320), 180 * MBIT, 60),
    Case("k03", _g("10.0", 576, 10, 64), 350 * MBIT, 250),
    Case("k04", _g("7.2", 576, 10, 64), 350 * MBIT, 250),
    Case("k05", _g("10.0", 320, 20, 96, "random"), 700 * MBIT, 80),
    Case("k06", _g("7.2", 320, 20, 96, "random"), 700 * MBIT, 80),
    Case("k07", _g("10.0", 576, 6, 24, "seq", 1.5), 180 * MBIT, 800),
    Case("k08", _g("7.2", 576, 6, 24, "seq", 1.5), 180 * MBIT, 800),
    Case("k09", _g("10.0", 320, 48, 128), 1400 * MBIT, 150),
    Case("k10", _g("7.2", 320, 48, 128), 1400 * MBIT, 150),
    Case("k11", _g("10.0", 576, 30, 64), 180 * MBIT, 100),
    Case("k12", _g("7.2", 576, 30, 64), 180 * MBIT, 100),
    Case("k13", _g("10.0", 320, 12, 48, "random"), 220 * MBIT, 3000),
    Case("k14", _g("7.2", 320, 12, 48, "random"), 220 * MBIT, 3000),
)

# A fourth held-out set, defined and run once, after guest-sample went from 4096 to 16384 pages (chosen
# on holdout3's zero-page errors): again sizes, rates, working sets and settings no earlier set used.
HOLDOUT4: Final[tuple[Case, ...]] = (
    Case("m01", _g("10.0", 352), 450 * MBIT, 200),
    Case("m02", _g("7.2", 352), 450 * MBIT, 200),
    Case("m03", _g("10.0", 640, 16, 80), 300 * MBIT, 400),
    Case("m04", _g("7.2", 640, 16, 80), 300 * MBIT, 400),
    Case("m05", _g("10.0", 416, 28, 64, "random"), 800 * MBIT, 120),
    Case("m06", _g("7.2", 416, 28, 64, "random"), 800 * MBIT, 120),
    Case("m07", _g("10.0", 288, 8, 32, "seq", 0.75), 160 * MBIT, 1500),
    Case("m08", _g("7.2", 288, 8, 32, "seq", 0.75), 160 * MBIT, 1500),
    Case("m09", _g("10.0", 480, 36, 144), 1100 * MBIT, 250),
    Case("m10", _g("7.2", 480, 36, 144), 1100 * MBIT, 250),
    Case("m11", _g("10.0", 352, 56, 48), 320 * MBIT, 90),
    Case("m12", _g("7.2", 352, 56, 48), 320 * MBIT, 90),
    Case("m13", _g("10.0", 640, 6, 128, "random"), 130 * MBIT, 500),
    Case("m14", _g("7.2", 640, 6, 128, "random"), 130 * MBIT, 500),
    Case("m15", _g("10.0", 416, 22, 56), 600 * MBIT, 60),
    Case("m16", _g("7.2", 416, 22, 56), 600 * MBIT, 60),
    Case("m17", _g("10.0", 288, 3, 16), 110 * MBIT, 2500),
    Case("m18", _g("7.2", 288, 3, 16), 110 * MBIT, 2500),
)

# A fifth held-out set, defined and run once, after the zero-page profile (round 5, chosen on a QEMU
# trace of k14): new sizes, rates, working sets and settings again, with larger downtime limits among
# them, where the profile matters most.
HOLDOUT5: Final[tuple[Case, ...]] = (
    Case("n01", _g("10.0", 400), 350 * MBIT, 1200),
    Case("n02", _g("7.2", 400), 350 * MBIT, 1200),
    Case("n03", _g("10.0", 544, 10, 40, "random"), 260 * MBIT, 2200),
    Case("n04", _g("7.2", 544, 10, 40, "random"), 260 * MBIT, 2200),
    Case("n05", _g("10.0", 304, 18, 72), 500 * MBIT, 140),
    Case("n06", _g("7.2", 304, 18, 72), 500 * MBIT, 140),
    Case("n07", _g("10.0", 464, 5, 20, "seq", 1.25), 140 * MBIT, 350),
    Case("n08", _g("7.2", 464, 5, 20, "seq", 1.25), 140 * MBIT, 350),
    Case("n09", _g("10.0", 400, 42, 112, "random"), 1000 * MBIT, 200),
    Case("n10", _g("7.2", 400, 42, 112, "random"), 1000 * MBIT, 200),
    Case("n11", _g("10.0", 336, 26, 40), 230 * MBIT, 80),
    Case("n12", _g("7.2", 336, 26, 40), 230 * MBIT, 80),
    Case("n13", _g("10.0", 608, 14, 96), 420 * MBIT, 900),
    Case("n14", _g("7.2", 608, 14, 96), 420 * MBIT, 900),
    Case("n15", _g("10.0", 304, 2, 12), 120 * MBIT, 70),
    Case("n16", _g("7.2", 304, 2, 12), 120 * MBIT, 70),
    Case("n17", _g("10.0", 512, 32, 80), 750 * MBIT, 3500),
    Case("n18", _g("7.2", 512, 32, 80), 750 * MBIT, 3500),
)

# Round 6, defined before it ran and measured as deployed (--deployed: migpredictd as uid 9842, zero pages
# by the helper): idle and mostly-zero guests, 256 MiB to 4 GiB, 10 to 250 MB/s (80-2000 Mbit/s),
# both QEMU generations; working sets and rates unlike the earlier sets.
HOLDOUT6: Final[tuple[Case, ...]] = (
    Case("o01", _g("10.0", 256), 80 * MBIT, 300, cutoff_s=90.0),
    Case("o02", _g("7.2", 256), 80 * MBIT, 300, cutoff_s=90.0),
    Case("o03", _g("10.0", 1024), 400 * MBIT, 200),
    Case("o04", _g("7.2", 1024), 400 * MBIT, 200),
    Case("o05", _g("10.0", 2048, touch=16), 2000 * MBIT, 100),
    Case("o06", _g("7.2", 2048, touch=16), 2000 * MBIT, 100),
    Case("o07", _g("10.0", 4096), 800 * MBIT, 500, cutoff_s=60.0),
    Case("o08", _g("7.2", 4096), 800 * MBIT, 500, cutoff_s=60.0),
    Case("o09", _g("10.0", 768, 6, 24), 160 * MBIT, 250, cutoff_s=90.0),
    Case("o10", _g("7.2", 768, 6, 24), 160 * MBIT, 250, cutoff_s=90.0),
    Case("o11", _g("10.0", 1536, 20, 64, "random"), 1200 * MBIT, 150),
    Case("o12", _g("7.2", 1536, 20, 64, "random"), 1200 * MBIT, 150),
    Case("o13", _g("10.0", 3072, 40, 96), 600 * MBIT, 400, cutoff_s=60.0),
    Case("o14", _g("7.2", 512, 60, 48), 240 * MBIT, 50, cutoff_s=30.0),
)

# Round 7, defined before it ran, after the truncation correction changed on rounds 1-6 (measured as
# deployed): the same span as round 6 with other sizes, rates, working sets and settings.
HOLDOUT7: Final[tuple[Case, ...]] = (
    Case("p01", _g("10.0", 384), 120 * MBIT, 250, cutoff_s=90.0),
    Case("p02", _g("7.2", 384), 120 * MBIT, 250, cutoff_s=90.0),
    Case("p03", _g("10.0", 1280, touch=200), 600 * MBIT, 300),
    Case("p04", _g("7.2", 1280, touch=200), 600 * MBIT, 300),
    Case("p05", _g("10.0", 3584, touch=32), 1600 * MBIT, 150),
    Case("p06", _g("7.2", 3584, touch=32), 1600 * MBIT, 150),
    Case("p07", _g("10.0", 640, 3, 16), 200 * MBIT, 100, cutoff_s=60.0),
    Case("p08", _g("7.2", 640, 3, 16), 200 * MBIT, 100, cutoff_s=60.0),
    Case("p09", _g("10.0", 2560, 12, 48, "random"), 1000 * MBIT, 300),
    Case("p10", _g("7.2", 2560, 12, 48, "random"), 1000 * MBIT, 300),
    Case("p11", _g("10.0", 896, 25, 80), 480 * MBIT, 600),
    Case("p12", _g("7.2", 896, 25, 80), 480 * MBIT, 600),
    Case("p13", _g("10.0", 448, 50, 64), 200 * MBIT, 100, cutoff_s=30.0),
    Case("p14", _g("7.2", 1792, 8, 40), 1400 * MBIT, 50),
)

# Large guests (issue 13), defined before they ran: 16-256 GiB on the unreserved RAM backend, idle
# (untouched RAM: the shared zero page) and with allocated, re-zeroed pages and working sets, both QEMU
# generations, at 100-250 MB/s. Measured as root (the helper returns the same guest-sample).
GIB: Final = 1024
HOLDOUT_LARGE: Final[tuple[Case, ...]] = (
    Case("g01", _g("10.0", 64 * GIB, touch=512), 1000 * MBIT, 300, cutoff_s=120.0),
    Case("g02", _g("7.2", 64 * GIB, touch=512), 1000 * MBIT, 300, cutoff_s=120.0),
    Case("g03", _g("10.0", 256 * GIB, touch=256), 2000 * MBIT, 500, cutoff_s=180.0),
    Case("g04", _g("7.2", 256 * GIB, touch=256), 2000 * MBIT, 500, cutoff_s=180.0),
    Case("g05", _g("10.0", 64 * GIB, 40, 256, touch=512, zeroed=8192), 1600 * MBIT, 300, cutoff_s=120.0),
    Case("g06", _g("7.2", 64 * GIB, 40, 256, touch=512, zeroed=8192), 1600 * MBIT, 300, cutoff_s=120.0),
    Case("g07", _g("10.0", 16 * GIB, 20, 64, "random", zeroed=4096), 800 * MBIT, 200, cutoff_s=90.0),
    Case("g08", _g("7.2", 16 * GIB, 20, 64, "random", zeroed=4096), 800 * MBIT, 200, cutoff_s=90.0),
)

# The CI slice: one converging and one non-converging migration per QEMU generation, all far from the
# convergence boundary, chosen short (each < 40 s including boot and measurement).
QUICK: Final[tuple[Case, ...]] = (
    Case("q01", _g("10.0", 256, 8, 32), 400 * MBIT, 100, cutoff_s=20.0),
    Case("q02", _g("10.0", 256, 48, 64), 200 * MBIT, 50, cutoff_s=15.0),
    Case("q03", _g("7.2", 256, 8, 32), 400 * MBIT, 100, cutoff_s=20.0),
    Case("q04", _g("7.2", 256), 200 * MBIT, 300, cutoff_s=20.0),
)

# Large guests, second round (issue 13: the zero-page reading model of docs/measuring.md, "Zero pages
# at size"), defined before they ran and after its constants were measured (benchmarks/largeguest.py
# trace, other guests): 64-256 GiB, both QEMU generations, never-written RAM and allocated zero pages
# (2-8 GiB re-zeroed), idle and with working sets, at 125-250 MB/s.
HOLDOUT_LARGE2: Final[tuple[Case, ...]] = (
    Case("r01", _g("10.0", 128 * GIB, touch=384), 1200 * MBIT, 300, cutoff_s=150.0),
    Case("r02", _g("7.2", 128 * GIB, touch=384), 1200 * MBIT, 300, cutoff_s=150.0),
    Case("r03", _g("10.0", 192 * GIB, touch=256, zeroed=4096), 2000 * MBIT, 500, cutoff_s=180.0),
    Case("r04", _g("7.2", 192 * GIB, touch=256, zeroed=4096), 2000 * MBIT, 500, cutoff_s=180.0),
    Case("r05", _g("10.0", 64 * GIB, 30, 128, touch=256, zeroed=8192), 1000 * MBIT, 300, cutoff_s=120.0),
    Case("r06", _g("7.2", 64 * GIB, 30, 128, touch=256, zeroed=8192), 1000 * MBIT, 300, cutoff_s=120.0),
    Case("r07", _g("10.0", 256 * GIB, touch=512, zeroed=2048), 1600 * MBIT, 400, cutoff_s=180.0),
    Case("r08", _g("7.2", 96 * GIB, 20, 96, "random", 0, 1024, 6144), 1400 * MBIT, 300, cutoff_s=150),
)  # fmt: skip

SETS: Final = {
    "calibration": CALIBRATION,
    "holdout": HOLDOUT,
    "holdout2": HOLDOUT2,
    "holdout3": HOLDOUT3,
    "holdout4": HOLDOUT4,
    "holdout5": HOLDOUT5,
    "holdout6": HOLDOUT6,
    "holdout7": HOLDOUT7,
    "large": HOLDOUT_LARGE,
    "large2": HOLDOUT_LARGE2,
    "quick": QUICK,
}


# --- prediction --------------------------------------------------------------------------------------


def predict_cell(
    m: Measurement,
    bandwidth: float,
    downtime_s: float,
    settings: PredictorSettings,
    limiter: RateLimiter = EXACT_RATE_LIMITER,
) -> Row:
    """Predict one (max-bandwidth, downtime) cell for one measurement; ``seconds`` None = does not
    converge."""
    batch = ModelBatch.of([build_model(m, mode=settings.mode)], [limiter])
    res = simulate(
        batch, np.zeros(1, dtype=np.int64), np.array([bandwidth]), np.array([downtime_s]), settings
    )
    seconds = float(res.seconds[0])
    converges = bool(res.converges[0])
    return {
        "converges": converges,
        "seconds": seconds if converges else None,
        "passes": int(res.passes[0]),
        "bytes": float(res.bytes_sent[0]),
        "downtime_seconds": float(res.downtime_seconds[0]) if converges else None,
    }


def predict_modes(
    m: Measurement,
    zero_gs: float | None,
    case: Case,
    profile_gs: Sequence[float] | None = None,
    *,
    zero_status: float | None = None,
    allocated_gs: float | None = None,
) -> Row:
    """Every mode for the case's exact cell. ``seed``: the seed's algorithm, max-bandwidth as its
    bandwidth, the measurement as the daemon records it. ``qemu``: what the daemon predicts by default
    (guest-sampled zero pages, the rate-fitted curve, the calibrated loopback settings);
    ``qemu-even``: ``qemu`` without the sampled zero-page profile; ``qemu+host-smaps``: the same with
    the opt-out zero-page method that never reads guest memory; ``qemu+host-status``: the same with the
    unprivileged fallback (rows recorded with it only)."""
    dt = case.downtime_ms / 1000.0
    fitted = refit(m)
    m_gs = (
        fitted
        if zero_gs is None
        else dataclasses.replace(
            fitted,
            zero_pages=zero_gs,
            zero_pages_method="guest-sample",
            zero_profile=None if profile_gs is None else tuple(profile_gs),
            zero_allocated_pages=None if allocated_gs is None else min(allocated_gs, zero_gs),
        )
    )
    # As the daemon does: the rate limiter of the QEMU version and host the measurement reported.
    limiter = limiter_for(m)
    settings = loopback_predictor(case.bandwidth, limiter)
    bw = float(case.bandwidth)
    out = {
        "seed": predict_cell(m, bw, dt, SEED_PREDICTOR),
        "qemu": predict_cell(m_gs, bw, dt, settings, limiter),
        "qemu-even": predict_cell(dataclasses.replace(m_gs, zero_profile=None), bw, dt, settings, limiter),
        "qemu+host-smaps": predict_cell(fitted, bw, dt, settings, limiter),
    }
    if zero_status is not None:
        m_status = dataclasses.replace(fitted, zero_pages=zero_status, zero_pages_method="host-status")
        out["qemu+host-status"] = predict_cell(m_status, bw, dt, settings, limiter)
    return out


def refit(m: Measurement) -> Measurement:
    """Rows recorded before ``fit_dirty_curve`` joined measure(): apply it (idempotent on newer rows)."""
    periods = [p.period_ms for p in m.points]
    dirty = fit_dirty_curve(
        periods, [p.dirty_pages for p in m.points], [1.0] * len(periods),
        cap=m.total_pages - (m.zero_pages or 0.0),
    )  # fmt: skip
    return dataclasses.replace(m, points=tuple(DirtyPoint(t, d) for t, d in zip(periods, dirty, strict=True)))


def true_dirty_pages(spec: GuestSpec, ms: float) -> float:
    """Distinct pages the dirtier writes within ``ms`` (from its source code, not from a measurement)."""
    t = ms / 1000.0
    w = spec.wss_mib * MIB / PAGE
    r = spec.rate_mib * MIB / PAGE
    arena = max(spec.touch_mib, spec.wss_mib) * MIB / PAGE
    if r <= 0 or w <= 0:
        return 0.0
    if spec.pattern == "random":
        return w * (1.0 - math.exp(-r * t / w))
    if spec.phase_s > 0:
        # Each phase starts over on the next wss of the arena: a window sees one saturating set per phase.
        return min(r * t, w * (1.0 + t / spec.phase_s), arena)
    return min(r * t, w)


def true_measurement(spec: GuestSpec, zero_pages: float | None, scale: float = 1.0) -> Measurement:
    """The workload's exact "dirtied after t" curve as a measurement, every point times ``scale`` (so
    both the dirty rate and the working set scale)."""
    total = spec.memory_mib * MIB // PAGE
    periods = [50.0 * 2**k for k in range(12)]  # 50 ms .. 102 s
    cap = total - (zero_pages or 0.0)
    return Measurement(
        page_size_bytes=PAGE,
        total_pages=total,
        points=tuple(DirtyPoint(p, min(true_dirty_pages(spec, p) * scale, cap)) for p in periods),
        zero_pages=zero_pages,
        zero_pages_method="guest-sample",
        strategy="manual",
    )


def verdict(pred: Row, cutoff_s: float) -> bool:
    """Predicted "completes within the cutoff" (what the real run can show)."""
    return bool(pred["converges"]) and pred["seconds"] is not None and pred["seconds"] <= cutoff_s


def boundary(case: Case, zero_pages: float | None) -> Row:
    """How far the workload is from the convergence boundary: the qemu-mode verdict on the workload's
    *true* curve (from the dirtier's parameters) with every dirty count x0.8, x1 and x1.2; ``far`` when
    all three agree. Measurement errors stay tested; only the model's own boundary is taken as given."""
    dt = case.downtime_ms / 1000.0
    limiter = rate_limiter_for(GENERATION_VERSION[case.spec.qemu])
    settings = loopback_predictor(case.bandwidth, limiter)
    verdicts = {}
    for k in (1.0 - BOUNDARY_MARGIN, 1.0, 1.0 + BOUNDARY_MARGIN):
        pred = predict_cell(
            true_measurement(case.spec, zero_pages, k), float(case.bandwidth), dt, settings, limiter
        )
        verdicts[f"x{k:g}"] = verdict(pred, case.cutoff_s)
    return {"verdicts": verdicts, "far": len(set(verdicts.values())) == 1}


# --- one migration -------------------------------------------------------------------------------------


def measurement_summary(m: Measurement) -> Row:
    """The few facts about a measurement the summary groups by, plus the MiB/s it read per period."""
    return {
        "strategy": m.strategy,
        "zero_pages_method": m.zero_pages_method,
        "zero_pages": m.zero_pages,
        "qemu_version": m.qemu_version,
        "duration_seconds": m.duration_seconds,
        "dirty_mib_s": {f"{p.period_ms:g}ms": round(p.dirty_pages * PAGE / MIB * 1000.0 / p.period_ms, 2)
                        for p in m.points},
        "notes": list(m.notes),
    }  # fmt: skip


def outcome(result: MigrationResult) -> Row:
    """The real migration as recorded: QEMU's own times, RAM statistics and status."""
    return {
        "status": result.status,
        "converged": result.converged,
        "cancelled": result.cancelled,
        "total_time_ms": result.total_time_ms,
        "downtime_ms": result.downtime_ms,
        "setup_time_ms": result.setup_time_ms,
        "expected_downtime_ms": result.expected_downtime_ms,
        "dirty_sync_count": result.dirty_sync_count,
        "ram": None if result.ram is None else dataclasses.asdict(result.ram),
        "wall_seconds": round(result.wall_seconds, 3),
        "error_desc": result.error_desc,
    }


def measure_as_deployed(source: Guest, target: str) -> Measurement:
    """``migpredictd measure`` as the shipped units run it: uid 9842, no capabilities, no flags, from the
    deployed venv; zero pages from the helper at its default path, which the caller runs."""
    out = subprocess.run(
        unprivileged("migpredictd", "measure", f"unix:{share_qmp(source)}", "--target", target, "--quiet"),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"unprivileged measure of {target} failed: {out.stderr}")
    return parse_measurement(json.loads(out.stdout))


def run_case(case: Case, set_name: str, say: Callable[[str], None], *, deployed: bool = False) -> Row:
    """Boot, measure, predict, migrate one case; both QEMUs are killed by PID when it returns.

    ``deployed``: measure as the shipped deployments do (:func:`measure_as_deployed`; the helper must
    run at its default path); else in this process, as root."""
    load_before = os.getloadavg()
    started = time.time()
    port = free_tcp_port()
    notes: list[str] = []
    with Guest(case.spec) as source, Guest(case.spec, incoming=f"tcp:127.0.0.1:{port}") as destination:
        if deployed:
            # Zero pages as the deployed daemon gets them (guest-sample by the helper); host-smaps read
            # here as root, so that every method is predicted from one run.
            measured = measure_as_deployed(source, case.case_id)
            notes = list(measured.notes)
            if measured.zero_pages_method != "guest-sample":
                raise RuntimeError(
                    f"{case.case_id}: deployed zero pages by {measured.zero_pages_method}: {notes}"
                )
            gs, profile = measured.zero_pages, measured.zero_profile
            allocated = measured.zero_allocated_pages
            smaps = smaps_estimate(source.pid, memory_bytes=measured.memory_bytes, page_size=PAGE)
            m = dataclasses.replace(
                measured,
                zero_pages=smaps.zero_pages,
                zero_pages_method="host-smaps",
                zero_profile=None,
                zero_allocated_pages=smaps.allocated_zero_pages,
            )
        else:
            # The daemon's code path with host-smaps zero pages (the opt-out method), recorded as measured;
            # guest-sampled zero pages (the default) separately, so both are predicted from one run.
            settings = MeasureSettings(zero_pages="host-smaps")
            m = asyncio.run(measure(source.qmp_address, target=case.case_id, settings=settings))
            try:
                est = guest_sample_estimate(source.pid, memory_bytes=m.memory_bytes, page_size=PAGE)
                gs, profile, allocated = est.zero_pages, est.profile, est.allocated_zero_pages
            except ZeroPagesUnavailableError:
                gs, profile, allocated = None, None, None
        # What an unprivileged daemon without the helper reads (/proc/PID/status is world-readable).
        status = status_estimate(source.pid, memory_bytes=m.memory_bytes, page_size=PAGE).zero_pages
        predictions = predict_modes(m, gs, case, profile, zero_status=status, allocated_gs=allocated)
        load_mid = os.getloadavg()
        result = migrate(
            source,
            destination,
            max_bandwidth_bytes_per_second=case.bandwidth,
            downtime_limit_ms=case.downtime_ms,
            cutoff_s=case.cutoff_s,
        )
    row: Row = {
        **row_start(set_name, case.case_id, case.spec, started=started, load=(load_before, load_mid)),
        "settings": {
            "max_bandwidth_bytes_per_second": case.bandwidth,
            "downtime_limit_ms": case.downtime_ms,
            "cutoff_s": case.cutoff_s,
        },
        "measurement": m.to_json_dict(),
        "measurement_summary": measurement_summary(m),
        "measured_as": "deployed" if deployed else "root",
        "measure_notes": notes,
        "zero_pages_guest_sample": gs,
        "zero_pages_host_status": status,
        "zero_profile_guest_sample": None if profile is None else list(profile),
        "zero_allocated_guest_sample": allocated,
        "predictions": predictions,
        "boundary": boundary(case, gs),
        "outcome": outcome(result),
    }
    real = row["outcome"]
    q = predictions["qemu"]
    say(
        f"{case.case_id} {case.spec.qemu} {case.spec.memory_mib}M rate {case.spec.rate_mib:g} "
        f"wss {case.spec.wss_mib} {case.spec.pattern} bw {case.bandwidth / MBIT:g}Mbit "
        f"dt {case.downtime_ms}ms: "
        f"real {real['status']} {real['total_time_ms']} ms; qemu {q['seconds']} seed "
        f"{predictions['seed']['seconds']} (load {load_mid[0]:.1f})"
    )
    return row


# --- summary -----------------------------------------------------------------------------------------------

# "qemu-even": the default mode without the zero-page profile (zero pages spread evenly over RAM), to
# show in one run what the profile changes; rows recorded before the profile have no such prediction.
MODES: Final = ("seed", "qemu", "qemu-even", "qemu+host-smaps", "qemu+host-status")


def error(row: Row, mode: str) -> float | None:
    """|predicted - real| / real total time for a migration that completed; inf when the mode said it
    would not (within the cutoff); None when the real migration did not complete."""
    real = row["outcome"]
    if not real["converged"] or not real["total_time_ms"]:
        return None
    pred = row["predictions"][mode]
    if not verdict(pred, row["settings"]["cutoff_s"]):
        return math.inf
    real_s = real["total_time_ms"] / 1000.0
    return float(abs(pred["seconds"] - real_s) / real_s)


def verdict_wrong(row: Row, mode: str) -> bool:
    """The mode's "completes within the cutoff" disagrees with what the real migration did."""
    return verdict(row["predictions"][mode], row["settings"]["cutoff_s"]) != bool(row["outcome"]["converged"])


def is_bad(row: Row, mode: str) -> bool:
    """Wrong verdict, or a completed migration predicted >= 25% off."""
    if verdict_wrong(row, mode):
        return True
    e = error(row, mode)
    return e is not None and e >= BAD_ERROR


def _quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if s[hi] == math.inf:
        return math.inf if pos > lo or s[lo] == math.inf else s[lo]
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def stats(rows: Sequence[Row], mode: str) -> Row:
    """Median / p90 error, bad share and the verdict confusion matrix of one mode over ``rows``."""
    errs = [e for r in rows if (e := error(r, mode)) is not None]
    confusion = {"pred_yes_real_yes": 0, "pred_yes_real_no": 0, "pred_no_real_yes": 0, "pred_no_real_no": 0}
    for r in rows:
        p = "yes" if verdict(r["predictions"][mode], r["settings"]["cutoff_s"]) else "no"
        a = "yes" if r["outcome"]["converged"] else "no"
        confusion[f"pred_{p}_real_{a}"] += 1
    bad = sum(is_bad(r, mode) for r in rows)
    return {
        "n": len(rows),
        "n_completed": len(errs),
        "median": _quantile(errs, 0.5),
        "p90": _quantile(errs, 0.9),
        "bad": bad,
        "bad_share": bad / len(rows) if rows else math.nan,
        "confusion": confusion,
    }


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{100 * x:.1f}%")


def summarize(rows: Sequence[Row], title: str) -> str:
    """The Markdown summary: per mode (the zero-page methods are modes: qemu = guest-sample,
    qemu+host-smaps), overall and per QEMU generation and measurement strategy."""
    groups: list[tuple[str, Callable[[Row], str]]] = [
        ("all", lambda r: "all"),
        ("qemu", lambda r: str(r["guest"]["qemu"])),
        ("strategy", lambda r: str(r["measurement_summary"]["strategy"])),
    ]
    out = [f"### {title}", "", f"{len(rows)} migrations; load average (1 min) at migration start: "
           f"median {statistics.median(r['load']['migration_start'][0] for r in rows):.2f}, "
           f"max {max(r['load']['migration_start'][0] for r in rows):.2f}.", ""]  # fmt: skip
    modes = [mode for mode in MODES if all(mode in r["predictions"] for r in rows)]
    out += [
        "| mode | group | n | completed | median err | p90 err | bad | TP | FP | FN | TN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in modes:
        for gname, key in groups:
            for value in sorted({key(r) for r in rows}):
                sub = [r for r in rows if key(r) == value]
                s = stats(sub, mode)
                c = s["confusion"]
                label = value if gname == "all" else f"{gname}={value}"
                out.append(
                    f"| {mode} | {label} | {s['n']} | {s['n_completed']} | {_pct(s['median'])} | "
                    f"{_pct(s['p90'])} | {s['bad']} ({_pct(s['bad_share'])}) | {c['pred_yes_real_yes']} | "
                    f"{c['pred_yes_real_no']} | {c['pred_no_real_yes']} | {c['pred_no_real_no']} |"
                )
    far = [r for r in rows if r["boundary"]["far"]]
    out += [
        "",
        f"Verdicts far (>20%) from the convergence boundary: {len(far)} of {len(rows)} migrations.",
        "",
    ]
    for mode in modes:
        wrong = [r["case"] for r in far if verdict_wrong(r, mode)]
        out.append(f"- {mode}: {len(far) - len(wrong)} right, {len(wrong)} wrong {wrong if wrong else ''}")
    out += [
        "",
        "| case | qemu | guest | bw Mbit/s | dt ms | strategy | real | "
        + " | ".join(modes)
        + " | far | load |",
        "|---|---|---|---|---|---|---|" + "---|" * len(modes) + "---|---|",
    ]
    for r in rows:
        g, st = r["guest"], r["settings"]
        real = r["outcome"]
        real_txt = f"{real['total_time_ms'] / 1000:.2f} s" if real["converged"] else f"{real['status']}"

        def cell(mode: str, row: Row = r) -> str:
            p = row["predictions"][mode]
            return f"{p['seconds']:.2f} s" if p["converges"] else "no conv."

        out.append(
            f"| {r['case']} | {g['qemu']} | {g['memory_mib']}M {g['pattern']} {g['rate_mib']:g}MiB/s "
            f"wss{g['wss_mib']}{' phase' + format(g['phase_s'], 'g') + 's' if g['phase_s'] else ''} | "
            f"{st['max_bandwidth_bytes_per_second'] / MBIT:g} | {st['downtime_limit_ms']} | "
            f"{r['measurement_summary']['strategy']} | {real_txt} | "
            + "".join(f"{cell(mode)} | " for mode in modes)
            + f"{'yes' if r['boundary']['far'] else 'no'} | "
            f"{r['load']['migration_start'][0]:.1f} |"
        )
    return "\n".join(out) + "\n"


# --- fitting the loopback constants ----------------------------------------------------------------------


def fit(rows: Iterable[Row]) -> str:
    """Least-squares loopback constants from completed migrations: downtime = switchover + bytes / link,
    and setup-time. Printed for migpredictd/lab/loopback.py and migpredictd/core/calibration.py."""
    xs, ys, setups = [], [], []
    factors: dict[str, list[float]] = {}
    excess: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        real = r["outcome"]
        if not real["converged"] or real["ram"] is None or real["downtime_ms"] is None:
            continue
        live_s = (real["total_time_ms"] - real["downtime_ms"] - (real["setup_time_ms"] or 0)) / 1000.0
        if live_s > 0.5:
            rate = real["ram"]["precopy_bytes"] / live_s
            limit = r["settings"]["max_bandwidth_bytes_per_second"]
            factors.setdefault(r["guest"]["qemu"], []).append(rate / limit)
            # The limiter's excess as a fraction (low limits) and in bytes/s (high limits); migrations
            # of under 2 s live time are dominated by their start-up burst and listed apart.
            band = "short" if live_s < 2.0 else ("<=200Mbit/s" if limit <= 200 * MBIT else ">=250Mbit/s")
            excess.setdefault((r["guest"]["qemu"], band), []).append(
                f"{r['case']} {(rate / limit - 1) * 100:+.1f}% {(rate - limit) / 1e6:+.2f}MB/s"
            )
        xs.append(float(real["ram"]["downtime_bytes"]))
        ys.append(real["downtime_ms"] / 1000.0)
        if real["setup_time_ms"] is not None:
            setups.append(real["setup_time_ms"] / 1000.0)
    if len(xs) < 2:
        return "not enough completed migrations to fit"
    slope, intercept = np.polyfit(np.array(xs), np.array(ys), 1)
    link = 1.0 / slope if slope > 0 else math.inf
    return (
        f"completed migrations: {len(xs)}\n"
        f"stop-and-copy: downtime = {intercept * 1000:.2f} ms + bytes / {link / 1e6:.1f} MB/s\n"
        f"setup-time: median {statistics.median(setups) * 1000:.1f} ms, max {max(setups) * 1000:.1f} ms\n"
        + "".join(
            f"QEMU {gen}: pre-copy bytes / (total - downtime - setup) / max-bandwidth: median "
            f"{statistics.median(v):.4f}, min {min(v):.4f}, max {max(v):.4f} (n={len(v)})\n"
            for gen, v in sorted(factors.items())
        )
        + "".join(f"QEMU {gen} {band}: {', '.join(v)}\n" for (gen, band), v in sorted(excess.items()))
    )


def case_of(row: Row) -> Case:
    """The case a recorded row ran."""
    st = row["settings"]
    return Case(
        row["case"],
        GuestSpec(**row["guest"]),
        int(st["max_bandwidth_bytes_per_second"]),
        int(st["downtime_limit_ms"]),
        float(st["cutoff_s"]),
    )


def row_start(
    set_name: str, case_id: str, spec: GuestSpec, *, started: float, load: tuple[LoadAvg, LoadAvg]
) -> Row:
    """The fields every lab row (here and in benchmarks/policies.py) opens with: its set and case, when it
    started, the load average before it, at the migration's start and now, and the guest."""
    before, at_migration = load
    return {
        "set": set_name,
        "case": case_id,
        "started_at": round(started, 3),
        "load": {"before": before, "migration_start": at_migration, "after": os.getloadavg()},
        "guest": dataclasses.asdict(spec),
    }


def repredict(row: Row) -> Row:
    """A recorded row with predictions and boundary recomputed from its measurement (current constants)."""
    case = case_of(row)
    m = parse_measurement(row["measurement"])
    gs = row["zero_pages_guest_sample"]
    profile = row.get("zero_profile_guest_sample")
    allocated = row.get("zero_allocated_guest_sample")
    predictions = predict_modes(m, gs, case, profile, allocated_gs=allocated)
    return {**row, "predictions": predictions, "boundary": boundary(case, gs)}


def read_rows(paths: Iterable[Path]) -> list[Row]:
    """All rows of the given JSON Lines files."""
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(SETS), default="calibration")
    ap.add_argument("--quick", action="store_true", help="the CI slice (same as --set quick)")
    ap.add_argument("--out", type=Path, help="append JSON Lines here (default: print rows only)")
    ap.add_argument("--only", help="comma-separated case ids to run")
    ap.add_argument(
        "--deployed",
        action="store_true",
        help="measure as deployed: migpredictd as uid 9842 without capabilities, zero pages by the helper "
        "(started here as root with its two capabilities)",
    )
    ap.add_argument("--summarize", type=Path, nargs="+", help="summarise recorded rows, run nothing")
    ap.add_argument("--fit", type=Path, nargs="+", help="fit the loopback constants from recorded rows")
    ap.add_argument(
        "--repredict",
        action="store_true",
        help="with --summarize: predict again from the recorded measurements with the current constants",
    )
    args = ap.parse_args(argv)
    if args.fit:
        print(fit(read_rows(args.fit)))
        return 0
    if args.summarize:
        rows = read_rows(args.summarize)
        if args.repredict:
            rows = [repredict(r) for r in rows]
        print(summarize(rows, ", ".join(p.name for p in args.summarize)))
        return 0
    set_name = "quick" if args.quick else args.set
    cases = SETS[set_name]
    if args.only:
        wanted = set(args.only.split(","))
        cases = tuple(c for c in cases if c.case_id in wanted)
    rows = []
    with contextlib.ExitStack() as stack:
        if args.deployed:
            stack.enter_context(running_helper())
        for case in cases:
            row = run_case(
                case, set_name, lambda msg: print(msg, file=sys.stderr, flush=True), deployed=args.deployed
            )
            rows.append(row)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(summarize(rows, set_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
