"""Calibrated constants for predicting real migrations, with the evidence for each.

Fitted on the ``calibration`` set of ``benchmarks/accuracy.py`` (loopback 127.0.0.1, TCG guests, QEMU
7.2 and 10.0, 256-512 MiB) and checked on the disjoint ``holdout`` set; the runs are committed in
``benchmarks/results/`` and summarised in ``docs/accuracy.md``. Refit with
``python benchmarks/accuracy.py --fit benchmarks/results/accuracy-calibration.jsonl``.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from migpredictd.predictor import PredictorSettings

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


# QEMU 10.0's rate limiter lets through more than max-bandwidth; 7.2's holds it exactly. Evidence:
# ram.precopy-bytes / (total-time - downtime - setup-time) / max-bandwidth over the completed
# calibration migrations: 10.0 median 1.0504 (1.022-1.077, n=6, 100-1000 Mbit/s), 7.2 median 1.0002
# (0.999-1.005, n=5). Without it every 10.0 prediction is about 5% long.
RATE_LIMIT_FACTOR: Final[Mapping[str, float]] = {"7.2": 1.0, "10.0": 1.05}


def loopback_predictor(
    max_bandwidth_bytes_per_second: float, generation: str
) -> tuple[float, PredictorSettings]:
    """The bandwidth to predict with and the ``qemu``-mode settings, for a loopback migration at QEMU
    ``max-bandwidth`` = the argument on QEMU ``generation`` ("7.2", "10.0"; others get factor 1).

    ``stop_copy_speedup`` is a ratio in :class:`PredictorSettings`, but what is constant is the link's
    speed: the unthrottled stop-and-copy runs at the link rate whatever max-bandwidth says, so the ratio
    is link / bandwidth (never below 1: a link slower than max-bandwidth throttles both phases).
    """
    if not max_bandwidth_bytes_per_second > 0:
        raise ValueError("max_bandwidth_bytes_per_second must be positive")
    bandwidth = max_bandwidth_bytes_per_second * RATE_LIMIT_FACTOR.get(generation, 1.0)
    return bandwidth, PredictorSettings(
        mode="qemu",
        setup_seconds=LOOPBACK_SETUP_SECONDS,
        switchover_seconds=LOOPBACK_SWITCHOVER_SECONDS,
        stop_copy_speedup=max(1.0, LOOPBACK_LINK_BYTES_PER_SECOND / bandwidth),
        transport_overhead=LOOPBACK_TRANSPORT_OVERHEAD,
    )


SEED_PREDICTOR: Final = PredictorSettings(mode="seed")
"""The seed's algorithm, unchanged: the baseline the ``qemu`` mode is compared with."""
