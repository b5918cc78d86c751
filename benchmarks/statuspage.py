"""Server-side cost of the status page and the JSON API at 1,000 VMs (target: the page in < 200 ms).

    python benchmarks/statuspage.py            # prints the figures; benchmarks/results/statuspage.md

1,000 targets with real predictions of the default grid (random guests from 256 MiB to 64 GiB, idle
to busy), as the daemon's state holds them; each figure is the best of 5 runs, in one process.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Final

from migpredictd.core.measurement import DirtyPoint, Measurement
from migpredictd.core.model import build_model
from migpredictd.core.predictor import DEFAULT_GRID, PredictorSettings, predict_grid
from migpredictd.serve.state import TargetState
from migpredictd.serve.status import api_response, render_page

VMS: Final = 1000
TARGET_MS: Final = 200.0


def fleet(n: int, seed: int = 7) -> dict[str, TargetState]:
    rng = random.Random(seed)
    ms = []
    for _ in range(n):
        total = rng.choice([1 << 16, 1 << 18, 1 << 20, 1 << 24])
        rate = rng.choice([0.0, 1.0, 20.0, 200.0, 2000.0]) * 256  # pages/s
        wss = total * rng.uniform(0.01, 0.5)
        ms.append(
            Measurement(
                page_size_bytes=4096,
                total_pages=total,
                points=tuple(DirtyPoint(t, min(rate * t / 1000.0, wss)) for t in (125.0, 1000.0, 8000.0)),
                zero_pages=total * rng.uniform(0.0, 0.9),
                zero_pages_method="guest-sample",
                strategy="sweep-ms",
                qemu_version="10.0.2",
            )
        )
    preds = predict_grid([build_model(m) for m in ms], DEFAULT_GRID, PredictorSettings())
    now = time.time()
    return {
        f"vm{i:04d}": TargetState(
            name=f"vm{i:04d}",
            qmp=f"unix:/run/qemu-server/{i}.qmp",
            labels={"rack": f"r{i % 8}"},
            up=True,
            measurement=m,
            prediction=p,
            grid=DEFAULT_GRID,
            last_success=now - 60,
            last_attempt=now - 60,
            last_duration=15.0,
        )
        for i, (m, p) in enumerate(zip(ms, preds, strict=True))
    }


def best_ms(fn: Callable[[], object], runs: int = 5) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        best = min(best, (time.perf_counter() - t) * 1000.0)
    return best, out


def main() -> int:
    targets = fleet(VMS)
    now = time.time()
    whole, page = best_ms(lambda: render_page(targets, query="per_page=1000", now=now, title="t", footer=""))
    first, _ = best_ms(lambda: render_page(targets, query="", now=now, title="t", footer=""))
    sorted_ms, _ = best_ms(
        lambda: render_page(targets, query="sort=policy&order=desc", now=now, title="t", footer="")
    )
    api_ms, reply = best_ms(lambda: api_response("/api/v1/targets", targets))
    assert isinstance(reply, tuple)
    body: bytes = reply[1]
    one_ms, _ = best_ms(lambda: api_response("/api/v1/targets/vm0500", targets))
    assert isinstance(page, str)
    print(f"status page, all {VMS} VMs on one page: {whole:7.1f} ms, {len(page) / 1e6:.2f} MB "
          f"-> {TARGET_MS / whole:.1f}x under the {TARGET_MS:g} ms target")  # fmt: skip
    print(f"status page, first page (100 VMs):      {first:7.1f} ms")
    print(f"status page, sorted by the policy cell: {sorted_ms:7.1f} ms")
    print(f"/api/v1/targets, {VMS} VMs:              {api_ms:7.1f} ms, {len(body) / 1e6:.2f} MB")
    print(f"/api/v1/targets/vm0500:                 {one_ms:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
