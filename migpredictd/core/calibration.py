"""Calibrated constants the daemon's predictions use, with the evidence for each: how each QEMU
generation honours ``max-bandwidth``.

Fitted on the ``calibration`` set of ``benchmarks/accuracy.py`` and checked on disjoint held-out sets;
the runs are committed in ``benchmarks/results/`` and summarised in ``docs/accuracy.md``. The constants of
the lab's loopback transport live in :mod:`migpredictd.lab.loopback`. Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from migpredictd.core.predictor import RateLimiter

# QEMU's rate limiter allows max-bandwidth / 10 bytes per 100 ms window. 7.2 counts bytes as they are
# queued (qemu_file_rate_limit) and holds the limit exactly; from 8.1 on migration_rate_exceeded()
# counts migration_transferred_bytes(), i.e. bytes already flushed, so whatever sits in the QEMUFile
# buffer when a window's budget runs out goes out on top: a fraction of max-bandwidth, capped. The fit
# and its evidence: docs/accuracy.md, "The calibrated constants". 8.1 .. 9.x were not measured; they
# share 10.0's limiter code, so they get its constants.
EXACT: Final = RateLimiter()
FLUSH_COUNTING: Final = RateLimiter(excess_fraction=0.050, excess_cap_bytes_per_second=1.085e6)
FLUSH_COUNTING_SINCE: Final = (8, 1)
_VERSION: Final = re.compile(r"(\d+)(?:\.(\d+))?")  # major[.minor] at the start


@functools.lru_cache(maxsize=256)  # a fleet reports a handful of versions; pure, so cached
def rate_limiter_for(qemu_version: str | None) -> RateLimiter:
    """How the QEMU that reported ``qemu_version`` ("10.0.2", "7.2.22", "9.2.0-rc1") honours
    max-bandwidth; exact when the version is unknown or unparsable (the prediction then errs a few
    percent long on 8.1+, never short)."""
    match = _VERSION.match(qemu_version or "")
    if match is None:
        return EXACT
    version = (int(match.group(1)), int(match.group(2) or 0))
    return FLUSH_COUNTING if version >= FLUSH_COUNTING_SINCE else EXACT
