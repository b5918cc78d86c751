"""How fast this host reads zero pages: the speed that bounds QEMU's migration thread on a mostly-zero guest.

In its first pass QEMU's migration thread reads every page to find the zero ones (``buffer_is_zero``) and
sends each as a 9-byte marker; where a guest is mostly zero, that reading, not the link, sets the pace
(docs/measuring.md, "Zero pages at size"). How long a read takes depends on the host's memory and on the
kind of zero page:

- a page the guest never wrote maps the kernel's shared zero page (a huge zero page with transparent huge
  pages), so every read hits the same cached memory;
- a page the guest wrote and zeroed again is allocated memory, read from DRAM.

:func:`probe` times both kinds on an anonymous mapping of this process, which is what the model scales its
calibrated per-generation costs by (:func:`migpredictd.core.calibration.rate_limiter_for`). It allocates
:func:`probe_size` bytes (64-128 MiB) for a fraction of a second and unmaps it; it reads no other process's
memory.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# At least twice the last-level cache, so that allocated pages come from DRAM: 64 MiB (twice this
# host's 32 MiB), more on a host whose L3 is larger, never more than PROBE_MAX_BYTES.
PROBE_BYTES: Final = 64 << 20
PROBE_MAX_BYTES: Final = 128 << 20
_L3_SIZE: Final = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
_PAGE: Final = 4096
_CHUNK: Final = 1 << 20


def probe_size(l3: Path = _L3_SIZE) -> int:
    """Bytes the probe maps: :data:`PROBE_BYTES`, or twice the L3 cache ``l3`` reports when that is more
    (capped at :data:`PROBE_MAX_BYTES`, a multiple of 1 MiB)."""
    try:
        text = l3.read_text().strip()
    except OSError:
        return PROBE_BYTES
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "")
    if not number.isdigit():
        return PROBE_BYTES
    twice = 2 * int(number) * units.get(unit, 1)
    return min(max(PROBE_BYTES, -(-twice // _CHUNK) * _CHUNK), PROBE_MAX_BYTES)


@dataclass(frozen=True, slots=True)
class HostScan:
    """Seconds this host takes to read one 4 KiB zero page and find it zero, by kind."""

    shared_zero_seconds: float
    allocated_seconds: float


def _scan_seconds(region: mmap.mmap) -> list[float]:
    """Seconds to read each 1 MiB chunk of ``region``, which must be all zero."""
    # find() of a byte that is not there reads every byte with the C library's vectorised search, as
    # buffer_is_zero() reads a zero page. Chunk by chunk, so that a chunk during which the scheduler ran
    # something else is one outlier among many, not a slower whole.
    times = []
    for start in range(0, len(region), _CHUNK):
        t0 = time.perf_counter()
        found = region.find(b"\x01", start, start + _CHUNK)
        times.append(time.perf_counter() - t0)
        if found != -1:
            raise RuntimeError("the probe's zero memory was not zero")
    return times


def probe(size: int | None = None, *, repeats: int = 2) -> HostScan:
    """Time reading never-written and written-then-zeroed anonymous memory, ``size`` bytes of each kind
    ``repeats`` times (a fresh mapping each time): the median 1 MiB chunk, per 4 KiB page. Takes about
    0.1 s here. ``size`` defaults to :func:`probe_size`."""
    if size is None:
        size = probe_size()
    if size < _CHUNK or size % _CHUNK:
        raise ValueError("size must be a positive multiple of 1 MiB")
    shared: list[float] = []
    allocated: list[float] = []
    for _ in range(repeats):
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            if hasattr(mmap, "MADV_HUGEPAGE"):
                region.madvise(mmap.MADV_HUGEPAGE)  # as QEMU does for guest RAM
            shared += _scan_seconds(region)  # the first read of each page maps the shared zero page
            view = (ctypes.c_char * size).from_buffer(region)
            try:
                ctypes.memset(view, 1, size)
                ctypes.memset(view, 0, size)
            finally:
                del view  # the buffer export must end before the mapping can close
            allocated += _scan_seconds(region)
        finally:
            region.close()
    pages_per_chunk = _CHUNK // _PAGE
    return HostScan(
        shared_zero_seconds=statistics.median(shared) / pages_per_chunk,
        allocated_seconds=statistics.median(allocated) / pages_per_chunk,
    )


@functools.cache
def host_scan() -> HostScan:
    """:func:`probe`, once per process: the daemon probes at its first measurement with zero pages and
    keeps the answer (a host's memory does not change speed; this keeps the 64 MiB probe to one moment)."""
    return probe()


__all__ = ["PROBE_BYTES", "PROBE_MAX_BYTES", "HostScan", "host_scan", "probe", "probe_size"]
