"""Calibrated constants the daemon's predictions use, with the evidence for each: how each QEMU
generation honours ``max-bandwidth``, and how fast its migration thread reads zero pages.

Fitted on the ``calibration`` set of ``benchmarks/accuracy.py`` and checked on disjoint held-out sets;
the runs are committed in ``benchmarks/results/`` and summarised in ``docs/accuracy.md``. The constants of
the lab's loopback transport live in :mod:`migpredictd.lab.loopback`. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Final

from migpredictd.core.measurement import Measurement
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


# The migration thread's CPU per zero page of the first pass, as a multiple of what this host's probe
# (qemu/hostscan.py) takes to read a zero page of the same kind (the shared zero page, allocated):
# QEMU's per-page work (the dirty bitmap, the page's lookup, its 9-byte marker) on top of the read
# buffer_is_zero() does. Measured from the thread's CPU time in stretches of zero pages alone
# (``python -m benchmarks.largeguest trace``: 64 and 256 GiB never-written, 16 GiB with 8 GiB re-zeroed;
# docs/measuring.md, "Zero pages at size"). Before 8.1 the 7.2 factors, from 8.1 on the 10.0 ones (not
# measured in between); an unknown version gets the larger (the prediction errs long).
ZERO_SCAN_PER_PROBE: Final = {"7.2": (2.7, 3.3), "10.0": (3.05, 3.5)}
# The probe on the lab host where they were measured: what a measurement without a probe is taken to
# have (seconds per 4 KiB page; shared zero page, allocated).
LAB_HOST_SCAN: Final = (4.9e-8, 1.06e-7)
# A probe further than this from the lab host's is taken as noise, not as the host's speed. Wide: without
# transparent huge pages every never-written page costs a page fault (the probe read 0.8 us per page
# here without MADV_HUGEPAGE, 16x its figure with it), and that is the host's speed.
HOST_SCAN_RANGE: Final = (0.1, 20.0)


@functools.lru_cache(maxsize=256)  # a fleet reports a handful of versions and hosts; pure, so cached
def rate_limiter_for(
    qemu_version: str | None,
    host_shared_zero_read_seconds: float | None = None,
    host_allocated_read_seconds: float | None = None,
) -> RateLimiter:
    """How the QEMU that reported ``qemu_version`` ("10.0.2", "7.2.22", "9.2.0-rc1") honours
    max-bandwidth, and how long its migration thread takes per zero page on a host whose probe read a
    zero page of each kind in the given seconds (the lab host's when not given); the limiter is exact
    when the version is unknown or unparsable (the prediction then errs a few percent long on 8.1+,
    never short)."""
    match = _VERSION.match(qemu_version or "")
    if match is None:
        limiter = EXACT
        factors = tuple(map(max, *ZERO_SCAN_PER_PROBE.values()))
    else:
        newer = (int(match.group(1)), int(match.group(2) or 0)) >= FLUSH_COUNTING_SINCE
        limiter = FLUSH_COUNTING if newer else EXACT
        factors = ZERO_SCAN_PER_PROBE["10.0" if newer else "7.2"]
    lo, hi = HOST_SCAN_RANGE
    probes = (host_shared_zero_read_seconds, host_allocated_read_seconds)
    shared, allocated = (
        factor * min(max(probe or lab, lo * lab), hi * lab)
        for factor, probe, lab in zip(factors, probes, LAB_HOST_SCAN, strict=True)
    )
    return dataclasses.replace(limiter, zero_scan_seconds=shared, allocated_zero_scan_seconds=allocated)


def limiter_for(m: Measurement) -> RateLimiter:
    """:func:`rate_limiter_for` the QEMU and host that measurement ``m`` came from."""
    return rate_limiter_for(m.qemu_version, m.host_shared_zero_read_seconds, m.host_allocated_read_seconds)
