"""The rig against real QEMU 7.2 and 10.0 (TCG): boot, memory size, paced dirtying, live migration.

These fail (never skip) when QEMU or the kernel is missing: the RigError names install-rig.sh.
Needs the `rig_guest_factory` fixture from tests/rig_fixtures.py (imported by tests/conftest.py).
"""

from __future__ import annotations

import math
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from migpredictd.core.address import parse_address
from migpredictd.lab.rig import INSTALL_HINT, RigError
from migpredictd.lab.rig.assets import CpioEntry, QemuGeneration, build_initramfs, guest_assets, newc_archive
from migpredictd.lab.rig.guest import UNPACED, Guest, GuestSpec, free_tcp_port
from migpredictd.lab.rig.migration import migrate
from migpredictd.qemu.qmp import QMPSession

StartGuest = Callable[..., Guest]  # the rig_guest_factory fixture (tests/rig_fixtures.py)

MIB = 1024 * 1024
GBIT = 125_000_000  # bytes per second
CALC_TIME_S = 2


@pytest.mark.qemu
@pytest.mark.parametrize("qemu", ["7.2", "10.0"])
@pytest.mark.parametrize("rate_mib", [8, 32])
def test_guest_boots_and_dirties_at_the_paced_rate(
    rig_guest_factory: StartGuest, qemu: QemuGeneration, rate_mib: int
) -> None:
    # The working set is larger than rate x calc-time, so the measurement cannot saturate and
    # page-sampling must read the paced rate itself.
    spec = GuestSpec(qemu=qemu, memory_mib=256, touch_mib=64, wss_mib=96, rate_mib=rate_mib)
    assert spec.wss_mib > rate_mib * CALC_TIME_S
    guest = rig_guest_factory(spec)

    assert guest.boot_seconds is not None
    assert guest.boot_seconds < 30
    assert guest.execute("query-status")["status"] == "running"
    assert guest.execute("query-memory-size-summary")["base-memory"] == 256 * MIB
    assert "dirtier: ready" in guest.console_text()
    assert f"rate_mib={rate_mib}" in guest.console_text()

    measured = guest.page_sampling_dirty_rate(calc_time_s=CALC_TIME_S, sample_pages=16384)
    # Tolerance: QEMU truncates to whole MiB/s and samples 4096 of 65536 pages (about 3% noise at
    # these fractions), plus the guest kernel's own background writes.
    assert abs(measured - rate_mib) <= max(2.0, 0.15 * rate_mib), measured
    assert guest.alive()


@pytest.mark.qemu
def test_random_pattern_rewrites_pages_with_collisions(rig_guest_factory: StartGuest) -> None:
    # Random order revisits pages: distinct pages after t are W(1 - exp(-r t / W)), below r t.
    wss, rate = 48, 24
    guest = rig_guest_factory(
        GuestSpec(qemu="7.2", memory_mib=256, touch_mib=48, wss_mib=wss, rate_mib=rate, pattern="random")
    )
    measured = guest.page_sampling_dirty_rate(calc_time_s=CALC_TIME_S, sample_pages=16384)
    expected = wss * (1 - math.exp(-rate * CALC_TIME_S / wss)) / CALC_TIME_S  # 15.7 MiB/s
    assert abs(measured - expected) <= 2.5, (measured, expected)
    assert measured < rate - 4  # clearly not the sequential answer


@pytest.mark.qemu
def test_phases_move_the_working_set_to_fresh_pages(rig_guest_factory: StartGuest) -> None:
    # A 16 MiB working set rewritten at 16 MiB/s fills in 1 s. Without phases a 2 s window sees the
    # same 16 MiB twice (8 MiB/s); with 1 s phases it sees two disjoint sets, 32 MiB (16 MiB/s).
    guest = rig_guest_factory(
        GuestSpec(qemu="10.0", memory_mib=256, touch_mib=64, wss_mib=16, rate_mib=16, phase_s=1.0)
    )
    measured = guest.page_sampling_dirty_rate(calc_time_s=CALC_TIME_S, sample_pages=16384)
    assert abs(measured - 16) <= 2.5, measured


@pytest.mark.qemu
@pytest.mark.parametrize("qemu", ["7.2", "10.0"])
def test_idle_guest_migrates_at_the_bandwidth_limit(
    rig_guest_factory: StartGuest, qemu: QemuGeneration
) -> None:
    spec = GuestSpec(qemu=qemu, memory_mib=256, touch_mib=64, wss_mib=0, rate_mib=0)
    port = free_tcp_port()
    source = rig_guest_factory(spec)
    destination = rig_guest_factory(spec, incoming=f"tcp:127.0.0.1:{port}")

    result = migrate(source, destination, max_bandwidth_bytes_per_second=GBIT, downtime_limit_ms=300)

    assert result.status == "completed"
    assert result.converged
    assert not result.cancelled
    assert result.ram is not None
    assert result.total_time_ms is not None
    assert result.downtime_ms is not None
    ram = result.ram
    assert ram.total_bytes >= 256 * MIB  # guest RAM plus small ROM/VGA blocks
    assert ram.normal_pages >= 64 * MIB // 4096  # everything the dirtier touched went in full
    # Wire bytes are 4104 per normal page and about 9 per zero page (QEMU_FACTS.md), plus device
    # state and section headers: 0.2 KB on 7.2, about 110 KB on 10.0.
    assert abs(ram.transferred_bytes - (ram.normal_pages * 4104 + ram.zero_pages * 9)) < 256 * 1024
    # Pre-copy is rate-limited: it cannot beat the bandwidth, and on an idle loopback it nearly hits it.
    floor_ms = ram.precopy_bytes / GBIT * 1000
    assert 0.9 * floor_ms <= result.total_time_ms <= 1.5 * floor_ms + 1000
    assert result.downtime_ms < 300
    assert 2 <= ram.dirty_sync_count <= 5
    assert source.execute("query-status")["status"] == "postmigrate"
    assert destination.execute("query-status")["status"] == "running"


@pytest.mark.qemu
def test_nonconverging_migration_is_cancelled_and_keeps_its_statistics(
    rig_guest_factory: StartGuest,
) -> None:
    # 40 MiB/s of dirtying against about 12 MiB/s of bandwidth: it can never converge.
    spec = GuestSpec(qemu="7.2", memory_mib=256, touch_mib=64, wss_mib=128, rate_mib=40)
    port = free_tcp_port()
    source = rig_guest_factory(spec)
    destination = rig_guest_factory(spec, incoming=f"tcp:127.0.0.1:{port}")

    started = time.monotonic()
    result = migrate(
        source, destination, max_bandwidth_bytes_per_second=GBIT // 10, downtime_limit_ms=50, cutoff_s=3.0
    )

    assert time.monotonic() - started < 10
    assert result.status == "cancelled"
    assert result.cancelled
    assert not result.converged
    assert result.ram is not None  # from the last active sample: QEMU dropped them on cancel
    assert result.ram.transferred_bytes > 20 * MIB
    assert result.total_time_ms is not None
    assert result.total_time_ms >= 2500
    assert source.execute("query-status")["status"] == "running"  # the source keeps going


def test_missing_assets_raise_rig_error_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIGPREDICTD_RIG_DIR", str(tmp_path))
    for generation in ("7.2", "10.0"):
        with pytest.raises(RigError, match=re.escape("bash scripts/install-rig.sh")):
            guest_assets(generation)
    with pytest.raises(RigError, match="unknown QEMU generation"):
        guest_assets("9.9")
    assert "install-rig.sh" in INSTALL_HINT


def test_guest_spec_rejects_impossible_workloads() -> None:
    with pytest.raises(ValueError, match="pattern"):
        GuestSpec(pattern="zigzag")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="48 MiB"):
        GuestSpec(memory_mib=128, touch_mib=100)
    with pytest.raises(ValueError, match=">= 0"):
        GuestSpec(touch_mib=-1)
    with pytest.raises(ValueError, match="-1"):
        GuestSpec(rate_mib=-2)
    assert "dirtier.rate_mib=-1" in GuestSpec(rate_mib=UNPACED).kernel_args()  # CPU-bound
    assert "dirtier.rate_mib=2.5" in GuestSpec(rate_mib=2.5).kernel_args()


def test_newc_archive_is_read_back_by_busybox_cpio(tmp_path: Path) -> None:
    archive = newc_archive(
        [
            CpioEntry("d", stat.S_IFDIR | 0o755),
            CpioEntry("d/f", stat.S_IFREG | 0o644, b"hello"),
            CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        ]
    )
    assert len(archive) % 4 == 0
    assert archive.rstrip(b"\0").endswith(b"TRAILER!!!")
    listing = subprocess.run(
        ["/bin/busybox", "cpio", "-t", "-v"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    assert [line.split()[-1] for line in lines] == ["d", "d/f", "dev/console"]
    assert lines[1].split()[2] == "5"  # file size
    assert lines[2].startswith("crw")


@pytest.mark.qemu
def test_initramfs_is_cached_by_content() -> None:
    first = build_initramfs()
    mtime = os.stat(first).st_mtime_ns
    assert build_initramfs() == first
    assert os.stat(first).st_mtime_ns == mtime
    listing = subprocess.run(
        ["/bin/busybox", "cpio", "-t"], input=first.read_bytes(), capture_output=True, check=True
    ).stdout.decode()
    assert {"init", "bin/busybox", "bin/dirtier", "dev/console"} <= set(listing.split())


@pytest.mark.qemu
def test_guest_is_killed_by_pid_when_the_block_raises() -> None:
    spec = GuestSpec(qemu="10.0", memory_mib=128, touch_mib=16, wss_mib=0)
    seen: list[Guest] = []

    def crash_inside_the_block() -> None:
        with Guest(spec) as guest:
            seen.append(guest)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        crash_inside_the_block()
    (guest,) = seen
    assert not guest.alive()
    assert not Path(f"/proc/{guest.pid}").exists()  # killed and reaped


@pytest.mark.qemu
async def test_rig_works_inside_a_running_event_loop(rig_guest_factory: StartGuest) -> None:
    # Async tests (the daemon's) use the sync rig from inside their own loop; then the daemon's QMP
    # session reaches the same guest through .qmp_address, and SO_PEERCRED names the rig's PID.
    guest = rig_guest_factory(GuestSpec(qemu="7.2", memory_mib=128, touch_mib=16, wss_mib=0))
    assert guest.execute("query-status")["status"] == "running"
    async with QMPSession.connect(parse_address(guest.qmp_address), target="t", timeout=5.0) as session:
        assert session.peer_pid == guest.pid
        reply = await session.execute_dict("query-memory-size-summary")
        assert reply["base-memory"] == 128 * MIB
