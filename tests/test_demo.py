"""The README's first command ends in `migpredictd demo`: it must boot real guests, serve their predictions
and leave no QEMU behind when stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_helpers import free_port, value, wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def qemu_pids(parent: int | None = None) -> set[int]:
    """PIDs of running QEMUs (children of ``parent`` only, when given: the host may run other QEMUs)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if b"qemu-system" in cmdline and (parent is None or ppid == parent):
                pids.add(int(proc.name))
    return pids


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and b"qemu-system" in _cmdline(pid)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_demo_serves_both_guests_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.log"
    demo = subprocess.Popen(
        [sys.executable, "-m", "migpredictd.cli", "demo", "--interval", "10s",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    guests: set[int] = set()
    try:
        s = wait_for(
            port,
            lambda x: all(value(x, "migpredictd_up", vm=v) == 1.0 for v in ("demo-idle", "demo-busy")),
            timeout=90,
        )
        assert value(s, "migpredictd_up", vm="demo-missing") == 0.0
        # 24 MiB/s of a 48 MiB working set: 100 Mbit/s (12.5 MiB/s) can never keep up at 125 ms
        cell = {"vm": "demo-busy", "bandwidth": "100Mbps", "max_downtime": "125ms"}
        assert value(s, "migpredictd_migration_converges", **cell) == 0.0
        assert value(s, "migpredictd_migration_converges", **{**cell, "bandwidth": "10Gbps"}) == 1.0
        guests = qemu_pids(parent=demo.pid)
        assert len(guests) >= 2
    finally:
        demo.send_signal(signal.SIGTERM)
        rc = demo.wait(timeout=30)
    assert rc == 0, log.read_text()
    assert not alive(guests), "the demo left QEMU running"
