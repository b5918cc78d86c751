"""render_table's fast path (whole seconds per batch, cached cells) equals formatting each cell alone."""

from __future__ import annotations

import numpy as np
import pytest

from migpredictd.core.predictor import DEFAULT_GRID, VMPrediction
from migpredictd.core.table import _frame, render_table
from migpredictd.core.units import format_eta


def _cell_by_cell(seconds: np.ndarray) -> str:
    head, labels = _frame(DEFAULT_GRID)
    rows = [
        label + "".join(f"{format_eta(s):>7} |  " for s in row)
        for label, row in zip(labels, seconds.tolist(), strict=True)
    ]
    return head + "\n".join(rows) + "\n"


@pytest.mark.parametrize("trial", range(50))
def test_fast_table_equals_the_cell_by_cell_one(trial: int) -> None:
    rng = np.random.default_rng(trial)
    seconds = rng.uniform(0, 5000, (8, 6))
    seconds[rng.random((8, 6)) < 0.3] = np.nan  # does not converge
    seconds[2, 2] = float(trial)  # a whole number: no rounding up
    seconds[3, 3] = trial + 1e-9  # just above one: rounds up
    if trial % 5 == 0:
        seconds[0, 0] = np.inf  # never finishes
    if trial % 7 == 0:
        seconds[1, 1] = 1e300  # beyond int64: the slow path
    p = VMPrediction(
        seconds=seconds,
        passes=np.zeros((8, 6), np.int64),
        bytes_sent=seconds,
        downtime_seconds=seconds,
        min_bandwidth=np.zeros(6),
        min_downtime=np.zeros(8),
    )
    assert render_table(p, DEFAULT_GRID) == _cell_by_cell(seconds)
