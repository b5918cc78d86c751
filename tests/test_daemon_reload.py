"""Reload without restart: targets added and removed, a broken config kept out, targets_dir files.

The VMs are the protocol-faithful fake QMP server (QEMU 10.0 shapes, millisecond sweeps) so each
measurement takes under a second; real-QEMU coverage of the same daemon is in test_daemon_e2e.py.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from migpredictd.lab.fakeqmp import FakeQMPFleet, FakeVM
from tests.daemon_helpers import DaemonProcess, free_port, http, value, vms, wait_for

pytestmark = pytest.mark.slow  # 4 s and 10 s: measurement intervals and the 5 s targets_dir poll

V10 = (10, 0, 2)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FakeQMPFleet]:
    (tmp_path / "sockets").mkdir()
    f = FakeQMPFleet(directory=tmp_path / "sockets")
    for name in ("a", "b", "c"):
        f.add(name, FakeVM(version=V10, package="Debian 1:10.0.2+ds-2~bpo12+1", seed=ord(name)))
    with f.run_in_thread():
        yield f


def config_text(fleet: FakeQMPFleet, names: list[str], targets_dir: Path | None = None) -> str:
    lines = [
        "global:",
        "  interval: 2s",
        "  jitter: 0s",
        "  measurement: {periods: [125ms, 250ms], zero_pages: none}",
    ]
    if targets_dir is not None:
        lines.append(f"targets_dir: {targets_dir}")
    lines.append("targets:" if names else "targets: []")
    lines += [f"  - {{name: {n}, qmp: 'unix:{fleet[n].address}'}}" for n in names]
    return "\n".join(lines) + "\n"


def measured(*names: str) -> object:
    return lambda s: all(value(s, "migpredictd_up", vm=n) == 1.0 for n in names)


def test_reload_adds_removes_and_rejects_a_broken_config(fleet: FakeQMPFleet, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(config_text(fleet, ["a", "b"]))
    d = DaemonProcess(config, free_port())
    try:
        s = wait_for(d.port, measured("a", "b"), timeout=30)  # type: ignore[arg-type]
        assert vms(s) == {"a", "b"}
        assert value(s, "migpredictd_config_last_reload_successful") == 1.0

        # Add c, remove a, by HTTP.
        config.write_text(config_text(fleet, ["b", "c"]))
        status, body = http(d.port, "/-/reload", "POST")
        assert status == 200, body
        s = wait_for(d.port, measured("b", "c"), timeout=30)  # type: ignore[arg-type]
        assert "a" not in vms(s)  # every series of the removed target is gone
        assert value(s, "migpredictd_targets") == 2.0

        # A broken config (duplicate name) by SIGHUP: old config kept, reload metric 0, still measuring.
        config.write_text(
            config_text(fleet, ["b", "c"]) + f"  - {{name: b, qmp: 'unix:{fleet['a'].address}'}}\n"
        )
        d.proc.send_signal(signal.SIGHUP)
        s = wait_for(
            d.port, lambda x: value(x, "migpredictd_config_last_reload_successful") == 0.0, timeout=10
        )
        assert vms(s) == {"b", "c"}
        status, body = http(d.port, "/-/reload", "POST")
        assert status == 500
        assert b"duplicate" in body.lower()
        before = value(s, "migpredictd_last_success_timestamp_seconds", vm="c") or 0.0
        s = wait_for(
            d.port,
            lambda x: (value(x, "migpredictd_last_success_timestamp_seconds", vm="c") or 0.0) > before,
            timeout=15,
        )
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.logs()


def test_targets_dir_files_are_picked_up_without_reload(fleet: FakeQMPFleet, tmp_path: Path) -> None:
    tdir = tmp_path / "targets.d"
    tdir.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(config_text(fleet, ["a"], targets_dir=tdir))
    d = DaemonProcess(config, free_port())
    try:
        wait_for(d.port, measured("a"), timeout=30)  # type: ignore[arg-type]
        (tdir / "c.yaml").write_text(f"- {{name: c, qmp: 'unix:{fleet['c'].address}'}}\n")
        s = wait_for(d.port, measured("a", "c"), timeout=30)  # type: ignore[arg-type]
        (tdir / "c.yaml").unlink()
        s = wait_for(d.port, lambda x: "c" not in vms(x), timeout=30)
        assert vms(s) == {"a"}
    finally:
        assert d.stop() == 0, d.logs()
