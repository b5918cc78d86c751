"""Calibrated constants the daemon's predictions use, with the evidence for each: how each QEMU
generation honours ``max-bandwidth``.

Fitted on the ``calibration`` set of ``benchmarks/accuracy.py`` and checked on disjoint held-out sets;
the runs are committed in ``benchmarks/results/`` and summarised in ``docs/accuracy.md``. The constants of
the lab's loopback transport live in :mod:`migpredictd.lab.loopback`. Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Final

from migpredictd.core.predictor import RateLimiter

# QEMU's rate limiter allows max-bandwidth / 10 bytes per 100 ms window. 7.2 counts bytes as they are
# queued (qemu_file_rate_limit) and holds the limit exactly; from 8.1 on migration_rate_exceeded()
# counts migration_transferred_bytes(), i.e. bytes already flushed, so whatever sits in the QEMUFile
# buffer when a window's budget runs out goes out on top. Evidence (`accuracy.py --fit` on the
# calibration set): ram.precopy-bytes / (total-time - downtime - setup-time) vs max-bandwidth.
# - 7.2: -0.1% .. +0.5% (n=7, 100-1000 Mbit/s): exact.
# - 10.0 at 100-200 Mbit/s: +4.7% .. +5.5% (c01, c05, c07, c14, c18): a fraction, median 5.0%.
# - 10.0 at 400-1000 Mbit/s: +1.11 and +1.06 MB/s (c10, c16): a bounded overshoot, median 1.085 MB/s.
# - Migrations with under 2 s of live time ran 4.7-7.7% over on both generations (c03, c17, c20): a
#   start-up burst that matters only when the whole migration is about ten windows; not fitted.
# A constant factor 1.05 (the previous model) made every 10.0 prediction above 250 Mbit/s 3-4% short.
# 8.1 .. 9.x were not measured; they share 10.0's limiter code, so they get its constants.
EXACT: Final = RateLimiter()
FLUSH_COUNTING: Final = RateLimiter(excess_fraction=0.050, excess_cap_bytes_per_second=1.085e6)
FLUSH_COUNTING_SINCE: Final = (8, 1)
_VERSION: Final = re.compile(r"(\d+)(?:\.(\d+))?")  # major[.minor] at the start


def rate_limiter_for(qemu_version: str | None) -> RateLimiter:
    """How the QEMU that reported ``qemu_version`` ("10.0.2", "7.2.22", "9.2.0-rc1") honours
    max-bandwidth; exact when the version is unknown or unparsable (the prediction then errs a few
    percent long on 8.1+, never short)."""
    match = _VERSION.match(qemu_version or "")
    if match is None:
        return EXACT
    version = (int(match.group(1)), int(match.group(2) or 0))
    return FLUSH_COUNTING if version >= FLUSH_COUNTING_SINCE else EXACT
