"""Calibrated constants for predicting real migrations, with the evidence for each.

Fitted on the ``calibration`` set of ``benchmarks/accuracy.py`` (loopback 127.0.0.1, TCG guests, QEMU
7.2 and 10.0, 256 MiB) and checked on four disjoint held-out sets; the runs are committed in
``benchmarks/results/`` and summarised in ``docs/accuracy.md``. Refit with
``python benchmarks/accuracy.py --fit benchmarks/results/accuracy-calibration.jsonl``.

Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Final

from migpredictd.core.predictor import PredictorSettings, RateLimiter

# --- loopback transport --------------------------------------------------------------------------

# The final stop-and-copy is not rate-limited (QEMU_FACTS.md), so it runs at whatever the path
# sustains with the guest stopped. Evidence: least squares of downtime against ram.downtime-bytes over
# the 11 completed calibration migrations: downtime = 0.35 ms + bytes / 1149 MB/s (e.g. 36.5 MB of
# stop-and-copy took 35 ms on 7.2, c08; an idle guest's 3.2 MB took 2 ms on 10.0, c01). Measured
# unthrottled pre-copy on the same host is slower (2.4-3.0 Gbit/s: the guest competes for the CPU).
LOOPBACK_LINK_BYTES_PER_SECOND: Final = 1149e6

# Fixed cost of the switchover (stop the VM, device state, last sync) on top of sending the pages:
# the intercept of the same fit (0.35 ms). Immaterial next to total times of 1-40 s.
LOOPBACK_SWITCHOVER_SECONDS: Final = 0.00035

# query-migrate's setup-time: 1 ms median and max over the calibration migrations (0-1 ms on both).
LOOPBACK_SETUP_SECONDS: Final = 0.001

# max-bandwidth counts QEMU's own stream bytes, so no TCP/IP framing is added on top.
LOOPBACK_TRANSPORT_OVERHEAD: Final = 0.0


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


def loopback_predictor(max_bandwidth_bytes_per_second: float, limiter: RateLimiter) -> PredictorSettings:
    """The ``qemu``-mode settings for a loopback migration at QEMU ``max-bandwidth`` = the argument, on a
    QEMU whose rate limiter is ``limiter``.

    ``stop_copy_speedup`` is a ratio in :class:`PredictorSettings`, but what is constant is the link's
    speed: the unthrottled stop-and-copy runs at the link rate whatever max-bandwidth says, so the ratio
    is link / stream rate (never below 1: a link slower than max-bandwidth throttles both phases).
    """
    if not max_bandwidth_bytes_per_second > 0:
        raise ValueError("max_bandwidth_bytes_per_second must be positive")
    stream = limiter.stream_rate(max_bandwidth_bytes_per_second)
    return PredictorSettings(
        mode="qemu",
        setup_seconds=LOOPBACK_SETUP_SECONDS,
        switchover_seconds=LOOPBACK_SWITCHOVER_SECONDS,
        stop_copy_speedup=max(1.0, LOOPBACK_LINK_BYTES_PER_SECOND / stream),
        transport_overhead=LOOPBACK_TRANSPORT_OVERHEAD,
    )


SEED_PREDICTOR: Final = PredictorSettings(mode="seed")
"""The seed's algorithm, unchanged: the baseline the ``qemu`` mode is compared with."""
