"""The zero-page helper: its protocol, everything it refuses, and zero pages as deployed.

The real tests run as the shipped units do: ``migpredictd-zeropaged`` as root with only
``CAP_SYS_PTRACE`` and ``CAP_DAC_OVERRIDE`` on a socket-activated socket (root:9842, 0660), and
``migpredictd`` as uid 9842 with no capabilities (tests/deployed.py), on real QEMU guests.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migpredictd.core.errors import ZeroPagesUnavailableError
from migpredictd.helper.zeropaged import DEFAULT_EXE, Refused, allowed_socket, identify, pid_from_file
from migpredictd.lab.deployed import UID, share_qmp, start_helper, stop_helper, unprivileged
from migpredictd.lab.rig.guest import GuestSpec
from migpredictd.qemu.settings import DEFAULT_HELPER_SOCKET
from migpredictd.qemu.zerohelper import (
    MAX_MESSAGE_BYTES,
    HelperRequest,
    ProtocolError,
    parse_reply,
    parse_request,
)
from migpredictd.qemu.zeropages import guest_sample_estimate, smaps_estimate
from tests.rig_fixtures import StartGuest

MIB = 1 << 20
GOOD = {
    "version": 1,
    "qmp_socket": "/run/qemu-server/100.qmp",
    "memory_bytes": 256 * MIB,
    "page_size": 4096,
    "samples": 16384,
}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# --- the protocol (no process) ------------------------------------------------------------------------


def test_a_good_request_round_trips() -> None:
    req = parse_request(line(GOOD))
    assert req == HelperRequest(qmp_socket="/run/qemu-server/100.qmp", memory_bytes=256 * MIB)
    assert parse_request(req.encode()) == req


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (line({**GOOD, "version": 2}), "version"),
        (line({**GOOD, "version": True}), "version"),
        (line({**GOOD, "pid": 1}), "unknown field 'pid'"),
        (line({**GOOD, "qmp_socket": "relative.qmp"}), "qmp_socket"),
        (line({**GOOD, "qmp_socket": "/x" * 60}), "qmp_socket"),
        (line({**GOOD, "memory_bytes": 256 * MIB + 1}), "memory_bytes: must be a whole number of pages"),
        (line({**GOOD, "memory_bytes": 1 << 50}), "memory_bytes"),
        (line({**GOOD, "memory_bytes": True}), "memory_bytes"),
        (line({**GOOD, "page_size": 8192}), "page_size"),
        (line({**GOOD, "samples": 1 << 17}), "samples"),
        (line({**GOOD, "samples": 0}), "samples"),
        (b'{"version": 1, "samples": NaN}\n', "NaN is not a number"),
        (line(GOOD)[:-1], "one line"),
        (line(GOOD) + line(GOOD), "one line"),
        (b'{"version": 1, "x": "' + b"a" * MAX_MESSAGE_BYTES + b'"}\n', "larger than 4096"),
        (b"[" * 3000 + b"\n", "not JSON"),
        (line({**GOOD, "pid_file": "/run/libvirt/qemu/a.pid"}), "exactly one of qmp_socket and pid_file"),
        (
            line({k: v for k, v in GOOD.items() if k != "qmp_socket"}),
            "exactly one of qmp_socket and pid_file",
        ),
        (line({**GOOD, "qmp_socket": None}), "qmp_socket: must be an absolute path"),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(data: bytes, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        parse_request(data)


def test_a_libvirt_pid_file_request_round_trips() -> None:
    data = {k: v for k, v in GOOD.items() if k != "qmp_socket"} | {"pid_file": "/run/libvirt/qemu/vm1.pid"}
    req = parse_request(line(data))
    assert req.pid_file == "/run/libvirt/qemu/vm1.pid"
    assert req.qmp_socket is None
    assert parse_request(req.encode()) == req
    with pytest.raises(ValueError, match="exactly one"):
        HelperRequest(qmp_socket="/run/a.qmp", pid_file="/run/libvirt/qemu/vm1.pid", memory_bytes=MIB)


def test_only_root_owned_pid_files_of_that_domains_qemu_are_followed(tmp_path: Path) -> None:
    """A PID file is trusted only from root, in a place only root writes, for a process whose command
    line is QEMU's for that very domain (this test process is not)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    good = run / "vm1.pid"
    good.write_text(f"{os.getpid()}\n")
    allow = [str(run / "*.pid")]
    with pytest.raises(Refused, match="is not a configured PID file"):
        pid_from_file(str(good), ["/run/libvirt/qemu/*.pid"], Path("/proc"))
    with pytest.raises(Refused, match=f"PID {os.getpid()} from .* is not QEMU for domain 'vm1'"):
        pid_from_file(str(good), allow, Path("/proc"))
    (run / "junk.pid").write_text("12ab\n")
    with pytest.raises(Refused, match="does not hold a PID"):
        pid_from_file(str(run / "junk.pid"), allow, Path("/proc"))
    os.chown(good, UID, -1)
    with pytest.raises(Refused, match="owned by root"):
        pid_from_file(str(good), allow, Path("/proc"))
    os.chown(good, 0, -1)
    run.chmod(0o777)
    with pytest.raises(Refused, match="writable by others than root"):
        pid_from_file(str(good), allow, Path("/proc"))
    run.chmod(0o755)
    # A fake /proc whose process does run QEMU for vm1: followed.
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cmdline").write_bytes(
        b"/usr/bin/qemu-system-x86_64\0-name\0guest=vm1,debug-threads=on\0"
    )
    good.write_text("4242\n")
    assert pid_from_file(str(good), allow, proc) == 4242
    (proc / "4242" / "cmdline").write_bytes(b"/usr/bin/qemu-system-x86_64\0-name\0guest=vm10\0")
    with pytest.raises(Refused, match="not QEMU for domain 'vm1'"):
        pid_from_file(str(good), allow, proc)


def test_a_reply_out_of_range_is_not_believed() -> None:
    req = HelperRequest(qmp_socket="/run/q.qmp", memory_bytes=MIB)  # 256 pages
    ok = {
        "version": 1,
        "ok": True,
        "zero_pages": 100.0,
        "method": "guest-sample",
        "pid": 7,
        "profile": None,
        "detail": "",
    }
    assert parse_reply(line(ok), req).zero_pages == 100.0
    for bad in (
        {"zero_pages": 257.0},
        {"zero_pages": -1},
        {"method": "host-status"},
        {"pid": 0},
        {"profile": [1.5]},
    ):
        with pytest.raises(ZeroPagesUnavailableError, match="bad reply"):
            parse_reply(line({**ok, **bad}), req)
    with pytest.raises(ZeroPagesUnavailableError, match="refused: nope"):
        parse_reply(line({"version": 1, "ok": False, "error": "nope"}), req)


# --- what the helper checks (in process) ------------------------------------------------------------


def test_only_configured_unix_sockets_are_inspected(tmp_path: Path) -> None:
    allowed = tmp_path / "qmp"
    allowed.mkdir()
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    good = allowed / "vm.qmp"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(good))
        assert allowed_socket(str(good), [f"{allowed}/*.qmp"]) == str(good)
    with pytest.raises(Refused, match="not a configured QMP socket"):
        allowed_socket(str(elsewhere / "vm.qmp"), [f"{allowed}/*.qmp"])
    # a link in the allowed place that leads elsewhere is judged by where it leads
    target = elsewhere / "secret.qmp"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(target))
        (allowed / "link.qmp").symlink_to(target)
        with pytest.raises(Refused, match="not a configured QMP socket"):
            allowed_socket(str(allowed / "link.qmp"), [f"{allowed}/*.qmp"])
    (allowed / "file.qmp").write_text("")
    with pytest.raises(Refused, match="not a unix socket"):
        allowed_socket(str(allowed / "file.qmp"), [f"{allowed}/*.qmp"])
    with pytest.raises(Refused, match="No such file"):
        allowed_socket(str(allowed / "gone.qmp"), [f"{allowed}/*.qmp"])


def test_a_process_that_is_not_qemu_is_refused() -> None:
    with pytest.raises(Refused, match=r"runs 'python3?[0-9.]*', which is not QEMU"):
        identify(os.getpid(), DEFAULT_EXE, Path("/proc"))


# --- the real helper, as deployed -------------------------------------------------------------------


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A helper on tmp_path/zp.sock that may inspect tmp_path/qmp/* and the rig's QMP sockets."""
    allowed = tmp_path / "qmp"
    allowed.mkdir()
    os.chmod(tmp_path, 0o755)  # noqa: S103 (uid 9842 must reach the helper's socket)
    sock = tmp_path / "zp.sock"
    proc = start_helper(sock, [f"{allowed}/*", "/tmp/migpredictd-rig-*/qmp.sock"])
    try:
        yield str(sock), allowed
    finally:
        log = stop_helper(proc)
        print(log)


def raw(sock: str, data: bytes, *, timeout: float = 10.0) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(data)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(8192)
            if not chunk:
                break
            reply += chunk
    obj: dict[str, object] = json.loads(reply)
    return obj


@pytest.mark.qemu
@pytest.mark.timeout(300)
def test_the_helper_refuses_everything_else(helper: tuple[str, Path]) -> None:
    sock, allowed = helper
    # a socket that is not configured
    got = raw(sock, line({**GOOD, "qmp_socket": "/run/elsewhere.qmp"}))
    assert got["ok"] is False
    assert "is not a configured QMP socket" in str(got["error"])
    # a configured socket whose listener is not QEMU (this Python)
    fake = allowed / "fake.qmp"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(fake))
        listener.listen(1)
        got = raw(sock, line({**GOOD, "qmp_socket": str(fake)}))
    assert got["ok"] is False
    assert "which is not QEMU" in str(got["error"])
    # oversized and malformed requests
    got = raw(sock, b"{" + b" " * 5000 + b"}\n")
    assert "larger than 4096 bytes" in str(got["error"])
    got = raw(sock, line({**GOOD, "samples": 1 << 20}))
    assert "samples: must be an integer in 1..65536" in str(got["error"])
    # a client that never finishes its request is cut off, and does not hold up another client
    with socket.socket(socket.AF_UNIX) as slow:
        slow.connect(sock)
        slow.sendall(b'{"version": 1,')
        started = time.monotonic()
        got = raw(sock, line({**GOOD, "qmp_socket": "/run/elsewhere.qmp"}))
        assert time.monotonic() - started < 1.0
        assert "not a configured QMP socket" in str(got["error"])
        slow.settimeout(10)
        reply = slow.recv(4096)
        waited = time.monotonic() - started
    assert b"request not complete within 2 s" in reply
    assert 1.5 < waited < 5.0


@pytest.mark.qemu
@pytest.mark.timeout(300)
def test_a_user_outside_the_socket_group_cannot_ask(helper: tuple[str, Path]) -> None:
    sock, _ = helper
    code = (
        "import sys\nfrom migpredictd.qemu.zerohelper import ask_helper, HelperRequest\n"
        "try:\n    ask_helper(sys.argv[1], HelperRequest(qmp_socket='/run/x.qmp', memory_bytes=4096))\n"
        "except Exception as e:\n    print(e)\n"
    )
    venv_python = unprivileged("python")[-1]
    out = subprocess.run(
        ["setpriv", f"--reuid={UID + 1}", f"--regid={UID + 1}", "--clear-groups",
         venv_python, "-c", code, sock],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "Permission denied" in out.stdout


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_unprivileged_measure_gets_guest_sampled_zero_pages_from_the_helper(
    rig_guest_factory: StartGuest,
) -> None:
    """As deployed: the helper at its default path, `migpredictd measure` as uid 9842 with no flags."""
    if Path(DEFAULT_HELPER_SOCKET).exists():
        pytest.fail(f"{DEFAULT_HELPER_SOCKET} exists: another helper runs on this machine; stop it first")
    guest = rig_guest_factory(GuestSpec(qemu="10.0", memory_mib=256, touch_mib=96))
    qmp = share_qmp(guest)
    proc = start_helper(DEFAULT_HELPER_SOCKET, ["/tmp/migpredictd-rig-*/qmp.sock"])
    try:
        out = subprocess.run(
            unprivileged("migpredictd", "measure", f"unix:{qmp}", "--quiet", "--periods", "125,250"),
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        log = stop_helper(proc)
        Path(DEFAULT_HELPER_SOCKET).unlink(missing_ok=True)
    assert out.returncode == 0, out.stderr + log
    m = json.loads(out.stdout)
    direct = guest_sample_estimate(guest.pid, memory_bytes=m["total_pages"] * 4096)  # as root, to compare
    total = m["total_pages"]
    assert m["zero_pages_method"] == "guest-sample", m["notes"]
    assert any("by the zero-page helper" in n for n in m["notes"]), m["notes"]
    assert len(m["zero_profile"]) == 64
    # 16384 samples each: the two estimates differ by under 2% of the guest (5 standard errors)
    assert abs(m["zero_pages"] - direct.zero_pages) < 0.02 * total
    assert 0.3 * total < m["zero_pages"] < 0.8 * total  # 96 of 256 MiB touched, the kernel's own use besides
    # The helper reads the page map too: how many zero pages are allocated, as root reads it directly.
    assert direct.allocated_zero_pages is not None
    assert abs(m["zero_allocated_pages"] - direct.allocated_zero_pages) < 0.02 * total
    # ... and the unprivileged daemon probed its host's zero-page reading itself.
    assert 0.0 < m["host_shared_zero_read_seconds"] < 1e-5
    assert 0.0 < m["host_allocated_read_seconds"] < 1e-5
    assert f"uid {UID}" in log


@pytest.mark.qemu
@pytest.mark.timeout(600)
def test_without_the_helper_unprivileged_measure_falls_back_to_host_status_and_says_why(
    rig_guest_factory: StartGuest,
) -> None:
    guest = rig_guest_factory(GuestSpec(qemu="10.0", memory_mib=1024, touch_mib=96))
    qmp = share_qmp(guest)
    out = subprocess.run(
        unprivileged("migpredictd", "measure", f"unix:{qmp}", "--quiet", "--periods", "125",
                     "--zero-pages-helper", "/run/migpredictd-test-absent/zp.sock"),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    notes = "\n".join(m["notes"])
    assert m["zero_pages_method"] == "host-status", notes
    assert "guest-sample unavailable: cannot read /proc/" in notes
    assert "helper unavailable: no zero-page helper at /run/migpredictd-test-absent/zp.sock" in notes
    assert "host-smaps unavailable: cannot read /proc/" in notes
    total = m["total_pages"]
    smaps = smaps_estimate(guest.pid, memory_bytes=total * 4096).zero_pages  # as root, to compare
    # QEMU's own anonymous memory counts as guest pages: a lower bound below host-smaps by that much
    # (about 77 MiB here under TCG, code buffers included), and far from "none" at this size (measured:
    # host-status 0.720 of the guest, host-smaps 0.797, guest-sample 0.812).
    assert m["zero_pages"] <= smaps + 0.01 * total
    assert m["zero_pages"] >= smaps - (128 * MIB) // 4096
    assert m["zero_pages"] > 0.6 * total


def test_the_helper_entry_point_is_installed_beside_migpredictd() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "migpredictd.helper.zeropaged", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--allow" in out.stdout
    assert "--socket-group" in out.stdout
