"""The daemon predicts each VM with its own QEMU's rate limiter, chosen from the version it reports.

Two fake VMs (protocol-faithful QMP, no noise) that differ only in their QEMU version are measured
identically; QEMU 10.0 sends 5% over max-bandwidth at 100 Mbit/s (the lab's calibration), 7.2 exactly,
so the daemon must predict 10.0 faster by that much. Real-QEMU coverage is in test_daemon_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from migpredictd.core.calibration import FLUSH_COUNTING
from migpredictd.lab.fakeqmp import FakeQMPFleet, FakeVM
from tests.daemon_helpers import DaemonProcess, free_port, value, wait_for

MBPS = float(1 << 20) / 8  # the grid's binary Mbps, as the seed's table
SECONDS = "migpredictd_predicted_migration_seconds"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FakeQMPFleet]:
    (tmp_path / "sockets").mkdir()
    f = FakeQMPFleet(directory=tmp_path / "sockets")
    idle = {"dirty_bytes_per_second": 0.0, "working_set_bytes": 0, "noise": False}
    f.add("old", FakeVM(version=(7, 2, 22), **idle))  # type: ignore[arg-type]
    f.add("new", FakeVM(version=(10, 0, 2), package="Debian 1:10.0.2+ds-2~bpo12+1", **idle))  # type: ignore[arg-type]
    with f.run_in_thread():
        yield f


def test_each_vm_gets_its_qemu_generations_rate_limiter(fleet: FakeQMPFleet, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "global:\n"
        "  interval: 30s\n"
        "  jitter: 0s\n"
        "  measurement: {periods: [1s], zero_pages: none}\n"
        "  grid: {bandwidths: [100Mbps, 10Gbps], max_downtimes: [300ms]}\n"
        "targets:\n"
        f"  - {{name: old, qmp: 'unix:{fleet['old'].address}'}}\n"
        f"  - {{name: new, qmp: 'unix:{fleet['new'].address}'}}\n"
    )
    d = DaemonProcess(config, free_port())
    try:
        s = wait_for(
            d.port,
            lambda x: all(value(x, "migpredictd_up", vm=n) == 1.0 for n in ("old", "new")),
            timeout=30,
        )
        for label, bw in (("100Mbps", 100 * MBPS), ("10Gbps", 10 * 1024 * MBPS)):
            old = value(s, SECONDS, vm="old", bandwidth=label, max_downtime="300ms")
            new = value(s, SECONDS, vm="new", bandwidth=label, max_downtime="300ms")
            assert old is not None, label
            assert new is not None, label
            # An idle guest: one pass of the same bytes, so the time ratio is the stream-rate ratio.
            assert old / new == pytest.approx(FLUSH_COUNTING.stream_rate(bw) / bw, rel=2e-3)
    finally:
        assert d.stop() == 0, d.logs()
