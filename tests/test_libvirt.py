"""The libvirt path against a real libvirtd (Debian's, started without systemd) and real TCG domains.

What an operator of a libvirt host gets with ``libvirt: [{uri: "qemu:///system"}]`` and nothing else: the
daemon, unprivileged as shipped (uid 9842, group ``libvirt``, no capabilities) with the zero-page helper
as root, finds a domain that starts after it, measures it through libvirt's API, follows it when it stops,
and no domain's log gains a taint line. Then the failure modes: a libvirtd restart mid-run, a domain with
a job (``virsh dump --live``, which libvirt runs as a migration to a file), and a guard test of the pure
measurement flow against a scripted connection.

Fails, never skips, when libvirtd, virsh or the rig cannot run: these tests are about libvirt.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migpredictd.lab.deployed import (
    deployed_venv_with_libvirt,
    ensure_user,
    running_helper,
    unprivileged,
)
from migpredictd.lab.rig.guest import GuestSpec
from migpredictd.lab.rig.libvirt import LibvirtGuest, ensure_libvirtd, restart_libvirtd, stop_libvirtd, virsh
from tests.daemon_helpers import LoggedProcess, Samples, free_port, value, vms, wait_for

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

MIB = 1 << 20
HELPER_SOCKET = "/run/migpredictd/zeropages.sock"  # where the daemon looks with no flag
# 25 MiB/s over a 200 MiB working set: the 1, 2 and 4 s windows see 25, 50 and 100 MiB.
SPEC = GuestSpec(memory_mib=512, touch_mib=256, wss_mib=200, rate_mib=25.0)


@pytest.fixture(scope="module")
def libvirtd() -> None:
    ensure_libvirtd()


def _name(tag: str) -> str:
    return f"mp-{tag}-{os.getpid()}"


def _no_taint(guest: LibvirtGuest) -> None:
    text = guest.log_text()
    assert "starting up" in text, f"no libvirt log for {guest.name}"
    assert "taint" not in text.lower(), [line for line in text.splitlines() if "taint" in line.lower()]


def _daemon(config: Path, port: int, *, deployed: bool) -> LoggedProcess:
    args = ["run", f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"]
    if deployed:
        argv = unprivileged("migpredictd", *args, groups=[grp.getgrnam("libvirt").gr_gid])
    else:
        argv = ["python3", "-m", "migpredictd.cli", *args]
    return LoggedProcess(argv, config.parent / "daemon.log")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory uid 9842 can read (pytest's tmp_path is root's, mode 0700)."""
    d = Path(tempfile.mkdtemp(prefix="migpredictd-libvirt-test-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_the_minimum_config_finds_measures_and_follows_domains_unprivileged_without_taint(
    libvirtd: None, shared_dir: Path
) -> None:
    deployed_venv_with_libvirt()
    ensure_user()
    config = shared_dir / "config.yaml"
    config.write_text('libvirt: [{uri: "qemu:///system"}]\n')
    config.chmod(0o644)
    port = free_port()
    name = _name("min")
    with running_helper(HELPER_SOCKET, allow_pid_files=["/run/libvirt/qemu/*.pid"]):
        daemon = _daemon(config, port, deployed=True)
        try:
            wait_for(port, lambda s: value(s, "migpredictd_libvirt_up", uri="qemu:///system") == 1.0, 60)
            with LibvirtGuest(SPEC, name) as guest:
                # Found without a reload (the default poll is 15 s), measured (four sweeps of 1+2+4+8 s at
                # most, after up to 30 s of jitter).
                s = wait_for(port, lambda s: value(s, "migpredictd_up", vm=name) == 1.0, 180)
                info = [dict(k) for (n, k) in s if n == "migpredictd_target_info" and dict(k)["vm"] == name]
                assert len(info) == 1
                assert info[0]["uuid"] == guest.uuid
                assert info[0]["libvirt_uri"] == "qemu:///system"
                assert info[0]["strategy"] == "libvirt"
                assert info[0]["qemu_version"].startswith("7.2.")
                # The unprivileged daemon got sampled zero pages from the helper through the PID file.
                assert info[0]["zero_pages_method"] == "guest-sample", daemon.logs()[-3000:]
                assert value(s, "migpredictd_guest_memory_bytes", vm=name) == 512 * MIB
                zero = value(s, "migpredictd_zero_pages_estimate_bytes", vm=name) or 0.0
                assert 150 * MIB < zero < 256 * MIB + 16 * MIB  # 256 MiB never touched, less the kernel's
                # The dirty rate against the guest's true 25 MiB/s, within 3.5 standard errors.
                error = value(s, "migpredictd_dirty_sampling_error_ratio", vm=name)
                assert error is not None
                assert 0.0 < error < 0.3
                rate = value(s, "migpredictd_dirty_rate_bytes_per_second", vm=name, period="1s") or 0.0
                assert abs(rate / (25 * MIB) - 1.0) < 3.5 * error + 0.05, (rate / MIB, error)
                converges = [v for (n, k), v in s.items() if n == "migpredictd_migration_converges"]
                assert converges
                _no_taint(guest)
            wait_for(port, lambda s: name not in vms(s), 40)  # followed: gone within a poll
        finally:
            daemon.stop()
    assert "Traceback" not in daemon.logs()


def _slow_reader(fifo: Path, stop: threading.Event) -> None:
    """Read a dump from ``fifo`` at about 1 MiB/s, so that the dump job lasts; stop when told."""
    with fifo.open("rb") as f:
        while not stop.is_set() and f.read(64 * 1024):
            time.sleep(0.05)


@pytest.fixture
def fast_daemon(libvirtd: None, tmp_path: Path) -> Iterator[tuple[LoggedProcess, int]]:
    config = tmp_path / "config.yaml"
    config.write_text(
        "global: {interval: 3s, jitter: 0.5s}\n"
        "libvirt:\n"
        '  - uri: "qemu:///system"\n'
        '    names: ["mp-fast-*"]\n'
        "    poll_interval: 1s\n"
        "    measurement: {periods: [1s], max_sweeps: 1}\n"
    )
    port = free_port()
    daemon = _daemon(config, port, deployed=False)
    try:
        yield daemon, port
    finally:
        daemon.stop()


def _successes(s: Samples, name: str) -> float:
    return value(s, "migpredictd_last_success_timestamp_seconds", vm=name) or 0.0


def test_a_libvirtd_restart_a_job_and_a_stop_are_followed(
    fast_daemon: tuple[LoggedProcess, int], tmp_path: Path
) -> None:
    daemon, port = fast_daemon
    name = f"mp-fast-{os.getpid()}"
    with LibvirtGuest(SPEC, name) as guest:
        wait_for(port, lambda s: value(s, "migpredictd_up", vm=name) == 1.0, 60)

        # libvirtd goes away: the connection is down, the domain stays a target, then all recovers.
        stop_libvirtd()
        s = wait_for(port, lambda s: value(s, "migpredictd_libvirt_up", uri="qemu:///system") == 0.0, 30)
        assert name in vms(s)
        before = _successes(s, name)
        restart_libvirtd()
        wait_for(port, lambda s: value(s, "migpredictd_libvirt_up", uri="qemu:///system") == 1.0, 60)
        s = wait_for(port, lambda s: _successes(s, name) > before, 60)
        assert (value(s, "migpredictd_libvirt_poll_failures_total", uri="qemu:///system") or 0) >= 1

        # A dump job (a migration to a file, read slowly): skipped with reason "job" until it ends.
        fifo = tmp_path / "dump.fifo"
        os.mkfifo(fifo)
        fifo.chmod(0o666)
        stop = threading.Event()
        reader = threading.Thread(target=_slow_reader, args=(fifo, stop), daemon=True)
        reader.start()
        dump = subprocess.Popen(
            ["virsh", "-c", "qemu:///system", "dump", "--live", name, str(fifo)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            s = wait_for(
                port,
                lambda s: (
                    (value(s, "migpredictd_measurement_failures_total", vm=name, reason="job") or 0) >= 1
                ),
                60,
            )
            assert value(s, "migpredictd_up", vm=name) == 0.0
            assert "Operation:        Dump" in virsh("domjobinfo", name).stdout
        finally:
            virsh("domjobabort", name, check=False)
            stop.set()
            dump.wait(30)
        s = wait_for(port, lambda s: value(s, "migpredictd_up", vm=name) == 1.0, 60)
        _no_taint(guest)
    wait_for(port, lambda s: name not in vms(s), 30)
    logs = daemon.logs()
    assert "libvirt unreachable" in logs
    assert "active dump job" in logs
    assert "Traceback" not in logs
