"""Rendering predictions: the seed's text table (byte for byte) and the JSON document. Pure."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from migpredictd.core.predictor import Grid, VMPrediction
from migpredictd.core.units import format_bandwidth, format_downtime, format_eta


@functools.lru_cache(maxsize=8)
def _frame(grid: Grid) -> tuple[str, tuple[str, ...]]:
    """A grid's table header (with its rule) and row labels: the same for every VM."""
    header = "Downtime> |" + "".join(f" {format_downtime(d):>7} |" for d in grid.downtimes)
    labels = tuple(f"{format_bandwidth(bw, space=True):>9} |  " for bw in grid.bandwidths)
    return f"{header}\n{'-' * len(header)}\n", labels


_EXACT_INTS = 2.0**53  # every whole number below is a float exactly


@functools.lru_cache(maxsize=65536)
def _cell(total_seconds: int) -> str:
    """One cell of a row, padded: whole seconds rounded up, or ``-`` (passed as -1) for no convergence."""
    return f"{format_eta(total_seconds) if total_seconds >= 0 else '-':>7} |  "


def render_table(prediction: VMPrediction, grid: Grid) -> str:
    """The seed's table: bandwidths down, max downtimes across, ``-`` where it does not converge."""
    head, labels = _frame(grid)
    seconds = prediction.seconds
    finite = np.isfinite(seconds)
    if (seconds[finite] >= _EXACT_INTS).any():  # beyond int64: format each cell as it comes
        cells = [[f"{format_eta(x):>7} |  " for x in row] for row in seconds.tolist()]
    else:  # whole seconds rounded up, as format_eta does; -1 where it does not converge
        totals = np.where(finite, np.ceil(np.where(finite, seconds, 0.0)), -1.0).astype(np.int64)
        cells = [list(map(_cell, row)) for row in totals.tolist()]
    rows = [label + "".join(row) for label, row in zip(labels, cells, strict=True)]
    return head + "\n".join(rows) + "\n"


def render_tables(predictions: Sequence[VMPrediction], grid: Grid) -> list[str]:
    """:func:`render_table` of each prediction, the same text, with the cells' whole seconds computed
    for all of them at once (the CLI renders thousands)."""
    if not predictions:
        return []
    seconds = np.array([p.seconds for p in predictions], dtype=float)
    finite = np.isfinite(seconds)
    if (seconds[finite] >= _EXACT_INTS).any():  # beyond int64 somewhere: each VM on its own
        return [render_table(p, grid) for p in predictions]
    head, labels = _frame(grid)
    totals = np.where(finite, np.ceil(np.where(finite, seconds, 0.0)), -1.0).astype(np.int64).tolist()
    join, cell = "".join, _cell
    return [
        head + "\n".join([label + join(map(cell, row)) for label, row in zip(labels, vm, strict=True)]) + "\n"
        for vm in totals
    ]


def _num(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _downtime(value: float) -> float | None:
    return None if math.isinf(value) else float(value)


def prediction_to_json(prediction: VMPrediction, grid: Grid) -> dict[str, Any]:
    """Per VM: every cell, then the derived answers (``null``: unlimited downtime / no convergence)."""
    cells = []
    for i, bw in enumerate(grid.bandwidths):
        for j, dt in enumerate(grid.downtimes):
            seconds = _num(prediction.seconds[i, j])
            cells.append(
                {
                    "bandwidth_bytes_per_second": bw,
                    "max_downtime_seconds": _downtime(dt),
                    "migration_seconds": seconds,
                    "converges": seconds is not None,
                    "passes": int(prediction.passes[i, j]),
                    "bytes_sent": float(prediction.bytes_sent[i, j]),
                    "downtime_seconds": _num(prediction.downtime_seconds[i, j]),
                }
            )
    return {
        "predictions": cells,
        "min_bandwidth": [
            {
                "max_downtime_seconds": _downtime(dt),
                "bandwidth_bytes_per_second": _num(prediction.min_bandwidth[j]),
            }
            for j, dt in enumerate(grid.downtimes)
        ],
        "min_downtime": [
            {"bandwidth_bytes_per_second": bw, "max_downtime_seconds": _num(prediction.min_downtime[i])}
            for i, bw in enumerate(grid.bandwidths)
        ],
    }
