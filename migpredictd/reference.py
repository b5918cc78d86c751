"""Plain cell-by-cell implementation of the seed's algorithm: the oracle and the speed baseline.

It re-states the 2023 script's rules one cell and one pass at a time, with a linear scan of the
breakpoints for every evaluation, as the script does. Tests check that the vectorised ``seed`` mode of
:mod:`migpredictd.predictor` gives identical milliseconds; ``benchmarks/predict.py`` times both.
"""

from __future__ import annotations

import math

from migpredictd.model import MemoryModel
from migpredictd.predictor import PAGE_HEADER_BYTES


def seed_cell_ms(model: MemoryModel, bandwidth: float, downtime_ms: float, deadline_ms: float) -> int | None:
    """Milliseconds the seed predicts for one cell, or None if it does not converge by the deadline."""
    normal = model.total_pages - model.zero_pages
    zero = model.zero_pages
    elapsed = 0.0
    previous = math.nan
    while True:
        pass_bytes = normal * (model.page_size_bytes + PAGE_HEADER_BYTES) + zero * PAGE_HEADER_BYTES
        pass_ms = pass_bytes * 1000.0 / bandwidth
        before, elapsed = elapsed, elapsed + pass_ms
        if pass_ms <= downtime_ms:
            return math.ceil(elapsed)
        if elapsed > deadline_ms:
            return None
        # The script checks only the deadline, which a pass too small to change `elapsed` never brings
        # closer: it hangs (e.g. the cover letter at 5 Gbps and 0 ms, where passes shrink to a denormal
        # fixed point). The next pass depends only on this one, so such a repeat is forever: no answer.
        if elapsed == before and pass_ms == previous:
            return None
        previous = pass_ms
        zero = 0.0
        normal = model.dirty(pass_ms)
