"""The lab's loopback transport (127.0.0.1, TCG guests): the predictor settings that describe it.

The accuracy benchmark (``benchmarks/accuracy.py``) and its tests predict real loopback migrations with
these; a deployment describes its own network in ``global.prediction`` instead. Fitted with
``python benchmarks/accuracy.py --fit benchmarks/results/accuracy-calibration.jsonl``; the evidence is in
``docs/accuracy.md``. Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

from migpredictd.core.predictor import PredictorSettings, RateLimiter

# The final stop-and-copy is not rate-limited (QEMU_FACTS.md), so it runs at whatever the path sustains
# with the guest stopped: a line fit of downtime against ram.downtime-bytes gives the link's speed (the
# slope) and the switchover's fixed cost (the intercept). query-migrate's setup-time gives the setup.
# The fits and their evidence: docs/accuracy.md, "The calibrated constants".
LOOPBACK_LINK_BYTES_PER_SECOND: Final = 1149e6
LOOPBACK_SWITCHOVER_SECONDS: Final = 0.00035
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
