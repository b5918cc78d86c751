"""The lab's loopback transport (127.0.0.1, TCG guests): the predictor settings that describe it.

The accuracy benchmark (``benchmarks/accuracy.py``) and its tests predict real loopback migrations with
these; a deployment describes its own network in ``global.prediction`` instead. Fitted with
``python benchmarks/accuracy.py --fit benchmarks/results/accuracy-calibration.jsonl``; the evidence is in
``docs/accuracy.md``. Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from migpredictd.core.predictor import PredictorSettings, RateLimiter

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
