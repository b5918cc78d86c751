"""The two kinds of zero page, read on this host: guest-sample tells allocated zero pages from never-written
ones by the page map, and the host probe times reading each kind. A real child process stands in for
QEMU (an anonymous mapping with a known layout); tests/test_measure_qemu.py and the large-guest test
read real QEMU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from migpredictd.core.calibration import LAB_HOST_SCAN, ZERO_SCAN_PER_PROBE, limiter_for, rate_limiter_for
from migpredictd.core.errors import InputError, ZeroPagesUnavailableError
from migpredictd.core.measurement import DirtyPoint, Measurement, parse_measurement
from migpredictd.qemu.hostscan import probe, probe_size
from migpredictd.qemu.zerohelper import HelperReply, HelperRequest, parse_reply
from migpredictd.qemu.zeropages import guest_sample_estimate, smaps_estimate

MIB = 1 << 20
SIZE = (
    96 * MIB
)  # "guest RAM": a quarter written then zeroed, a quarter data, a quarter read, the rest untouched

# The child maps SIZE bytes (no other mapping of the process is that large), lays it out, says "ready".
CHILD = textwrap.dedent(
    f"""
    import ctypes, mmap, sys
    size, q = {SIZE}, {SIZE} // 4
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    view = (ctypes.c_char * size).from_buffer(m)
    base = ctypes.addressof(view)
    ctypes.memset(base, 1, q); ctypes.memset(base, 0, q)     # allocated, zero again
    ctypes.memset(base + q, 7, q)                            # data
    bytes(m[2 * q:3 * q])                                    # read: maps the shared zero page
    print("ready", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture(scope="module")
def child() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_guest_sample_counts_allocated_zero_pages_apart(child: int) -> None:
    est = guest_sample_estimate(child, memory_bytes=SIZE, samples=8192, seed=3)
    pages = SIZE // 4096
    # Three quarters are zero; one of those three is allocated. Binomial sampling error at 8192: ~0.5%.
    assert est.zero_pages == pytest.approx(0.75 * pages, rel=0.03)
    assert est.allocated_zero_pages is not None
    assert est.allocated_zero_pages == pytest.approx(0.25 * pages, rel=0.06)
    assert "allocated memory" in est.detail


def test_host_smaps_zero_pages_are_never_allocated(child: int) -> None:
    est = smaps_estimate(child, memory_bytes=SIZE)
    assert est.allocated_zero_pages == 0.0
    # Non-resident only: the untouched quarter (the read quarter maps the shared zero page, resident).
    assert est.zero_pages <= 0.5 * SIZE // 4096


def test_the_probe_times_both_kinds_of_zero_page() -> None:
    scan = probe(16 * MIB, repeats=2)
    for seconds in (scan.shared_zero_seconds, scan.allocated_seconds):
        assert 1e-10 < seconds < 1e-5
    with pytest.raises(ValueError, match="multiple of 1 MiB"):
        probe(4096)


def test_the_probe_outgrows_a_larger_last_level_cache(tmp_path: Path) -> None:
    l3 = tmp_path / "size"
    for text, size in (
        ("32768K", 64 * MIB),
        ("96M", 128 * MIB),
        ("40M", 80 * MIB),
        ("1G", 128 * MIB),
        ("?", 64 * MIB),
    ):
        l3.write_text(text + "\n")
        assert probe_size(l3) == size, text
    assert probe_size(tmp_path / "absent") == 64 * MIB


def test_the_limiter_scales_each_kind_by_the_hosts_probe() -> None:
    (new_shared, new_allocated), (old_shared, old_allocated) = (
        ZERO_SCAN_PER_PROBE["10.0"],
        ZERO_SCAN_PER_PROBE["7.2"],
    )
    lab = rate_limiter_for("10.0.2")
    assert lab.zero_scan_seconds == pytest.approx(new_shared * LAB_HOST_SCAN[0])
    assert lab.allocated_zero_scan_seconds == pytest.approx(new_allocated * LAB_HOST_SCAN[1])
    slow = rate_limiter_for("7.2.22", 2 * LAB_HOST_SCAN[0], 3 * LAB_HOST_SCAN[1])
    assert slow.zero_scan_seconds == pytest.approx(old_shared * 2 * LAB_HOST_SCAN[0])
    assert slow.allocated_zero_scan_seconds == pytest.approx(old_allocated * 3 * LAB_HOST_SCAN[1])
    # A probe far off the lab host's is clamped (a preempted probe is noise, not the host's speed).
    clamped = rate_limiter_for("7.2", 1000 * LAB_HOST_SCAN[0], None)
    assert clamped.zero_scan_seconds == pytest.approx(old_shared * 20 * LAB_HOST_SCAN[0])
    assert clamped.allocated_zero_scan_seconds == pytest.approx(old_allocated * LAB_HOST_SCAN[1])
    # An unknown version errs long: the larger per-generation factor of each kind.
    unknown = rate_limiter_for(None)
    assert unknown.zero_scan_seconds == pytest.approx(max(new_shared, old_shared) * LAB_HOST_SCAN[0])
    assert unknown.allocated_zero_scan_seconds == pytest.approx(
        max(new_allocated, old_allocated) * LAB_HOST_SCAN[1]
    )
    m = Measurement(
        page_size_bytes=4096, total_pages=1024, points=(DirtyPoint(1000.0, 1.0),), zero_pages=512.0,
        qemu_version="7.2.22", host_shared_zero_read_seconds=2 * LAB_HOST_SCAN[0],
        host_allocated_read_seconds=3 * LAB_HOST_SCAN[1],
    )  # fmt: skip
    assert limiter_for(m) == slow


def test_the_measurement_carries_the_kinds_and_the_probe() -> None:
    m = Measurement(
        page_size_bytes=4096, total_pages=1024, points=(DirtyPoint(1000.0, 1.0),), zero_pages=512.0,
        zero_allocated_pages=128.0, host_shared_zero_read_seconds=4.5e-8, host_allocated_read_seconds=1.1e-7,
    )  # fmt: skip
    again = parse_measurement(m.to_json_dict())
    assert again == m
    doc = m.to_json_dict()
    with pytest.raises(InputError, match="zero_allocated_pages"):
        parse_measurement({**doc, "zero_allocated_pages": 600.0})  # more than zero_pages
    with pytest.raises(InputError, match="zero_allocated_pages"):
        parse_measurement({k: v for k, v in doc.items() if k != "zero_pages"})
    with pytest.raises(InputError, match="host_allocated_read_seconds"):
        parse_measurement({**doc, "host_allocated_read_seconds": 0.0})
    with pytest.raises(InputError, match="host_shared_zero_read_seconds"):
        parse_measurement({**doc, "host_shared_zero_read_seconds": 1.0})


def test_the_helper_reply_carries_allocated_zero_pages_within_bounds() -> None:
    request = HelperRequest(qmp_socket="/run/q.sock", memory_bytes=1 << 30)
    reply = HelperReply(zero_pages=1000.0, method="guest-sample", pid=42, profile=None, detail="d",
                        allocated_zero_pages=250.0)  # fmt: skip
    assert parse_reply(reply.encode(), request).allocated_zero_pages == 250.0
    old = HelperReply(zero_pages=1000.0, method="guest-sample", pid=42, profile=None, detail="d")
    assert parse_reply(old.encode(), request).allocated_zero_pages is None
    for bad in (2000.0, -1.0):
        lie = HelperReply(zero_pages=1000.0, method="guest-sample", pid=42, profile=None, detail="d",
                          allocated_zero_pages=bad)  # fmt: skip
        with pytest.raises(ZeroPagesUnavailableError, match="allocated_zero_pages"):
            parse_reply(lie.encode(), request)
