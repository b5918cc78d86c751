"""Run migpredictd as the shipped deployments do: the daemon unprivileged, the helper as root with only
the capabilities its systemd unit grants (for tests and the accuracy benchmark, from a checkout).

- :func:`deployed_venv`: this checkout installed (not editable) into a venv of Debian's own Python at
  :data:`VENV`, world-readable, so uid 9842 can run it (the test runner's Python may live under
  ``/root``, which other users cannot enter).
- :data:`UNPRIVILEGED`: ``setpriv`` to uid/gid 9842, no supplementary groups, no capabilities at all.
- :func:`start_helper`: ``migpredictd-zeropaged`` as root with only ``CAP_SYS_PTRACE`` and
  ``CAP_DAC_OVERRIDE``, on a socket made as systemd's ``migpredictd-zeropaged.socket`` makes it
  (root:9842, mode 0660) and passed as systemd passes it (``LISTEN_FDS``).
- :func:`share_qmp`: give uid 9842 the QMP socket of a rig guest, as the deployments' ACLs do.

Raises (never skips) when any of it cannot run: a test that needs it is about the deployed path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from migpredictd.lab.rig import RigError
from migpredictd.lab.rig.guest import Guest
from migpredictd.qemu.settings import DEFAULT_HELPER_SOCKET

REPO: Final = Path(__file__).resolve().parents[2]
VENV: Final = Path(os.environ.get("MIGPREDICTD_DEPLOYED_VENV", "/opt/migpredictd-deployed-test"))
UID: Final = 9842
# The daemon as shipped: its own uid and gid, no groups, no capabilities (CapabilityBoundingSet= empty).
UNPRIVILEGED: Final = (
    "setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all",
    "--bounding-set=-all", "--no-new-privs",
)  # fmt: skip
# The helper as deploy/systemd/migpredictd-zeropaged.service runs it.
HELPER_CAPABILITIES: Final = ("setpriv", "--bounding-set=-all,+sys_ptrace,+dac_override", "--inh-caps=-all")


@functools.cache
def deployed_venv() -> Path:
    """This checkout installed into :data:`VENV` (made once; the package is reinstalled every session)."""
    if not (REPO / "pyproject.toml").exists():
        raise RigError(f"{REPO} is not a migpredictd checkout: the deployed venv is built from one")
    env = {**os.environ, "PYTHON": "/usr/bin/python3"}
    if not (VENV / "bin" / "python").exists():
        subprocess.run(
            ["bash", str(REPO / "scripts" / "venv.sh"), str(VENV), "--quiet", str(REPO)], check=True, env=env
        )
    subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--force-reinstall",
            str(REPO),
        ],
        check=True,
        cwd="/",
    )
    subprocess.run(["chmod", "-R", "a+rX", str(VENV)], check=True)
    return VENV


def unprivileged(*argv: str, groups: Sequence[int] = ()) -> list[str]:
    """``argv`` (a command of the deployed venv's bin/, or a path) run as uid 9842 without capabilities;
    ``groups`` are its supplementary groups (a unit's ``SupplementaryGroups=``), none by default."""
    first = argv[0] if "/" in argv[0] else str(deployed_venv() / "bin" / argv[0])
    prefix = list(UNPRIVILEGED)
    if groups:
        prefix[prefix.index("--clear-groups")] = "--groups=" + ",".join(str(g) for g in groups)
    return [*prefix, first, *argv[1:]]


@functools.cache
def deployed_venv_with_libvirt() -> Path:
    """:func:`deployed_venv` plus the ``libvirt`` extra (libvirt-python, built once against libvirt-dev)."""
    venv = deployed_venv()
    python = str(venv / "bin" / "python")
    if subprocess.run([python, "-c", "import libvirt"], capture_output=True, check=False).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "--quiet", "libvirt-python>=9"], check=True, cwd="/")
        subprocess.run(["chmod", "-R", "a+rX", str(venv)], check=True)
    return venv


def ensure_user() -> None:
    """The ``migpredictd`` user and group with uid/gid 9842, as the packaging creates them (libvirtd looks
    the uid of each client up and refuses one it cannot find), and a member of group ``libvirt`` in the
    user database where that group exists, as docs/deploy.md has it for polkit's rule."""
    if subprocess.run(["getent", "group", str(UID)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["groupadd", "--system", "--gid", str(UID), "migpredictd"], check=True)
    if subprocess.run(["getent", "passwd", str(UID)], capture_output=True, check=False).returncode != 0:
        subprocess.run(
            ["useradd", "--system", "--uid", str(UID), "--gid", str(UID), "--no-create-home",
             "--shell", "/usr/sbin/nologin", "migpredictd"],
            check=True, capture_output=True,
        )  # fmt: skip
    if subprocess.run(["getent", "group", "libvirt"], capture_output=True, check=False).returncode == 0:
        name = pwd.getpwuid(UID).pw_name
        subprocess.run(["usermod", "-aG", "libvirt", name], check=True, capture_output=True)


def share_qmp(guest: Guest) -> str:
    """Let uid 9842 connect to ``guest``'s QMP socket (as the deployments' ACL or group does); its path."""
    path = Path(guest.qmp_path)
    os.chmod(path.parent, 0o711)  # noqa: S103 (search only: uid 9842 reaches the socket, lists nothing)
    os.chown(path, UID, -1)
    return str(path)


def start_helper(
    socket_path: str | Path, allow: Sequence[str], *, group: int = UID, allow_pid_files: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``migpredictd-zeropaged`` as root with two capabilities, socket-activated at ``socket_path``.

    Returns once the socket accepts; the caller stops the process (``stop_helper``)."""
    path = Path(socket_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chown(path, 0, group)
    os.chmod(path, 0o660)
    listener.listen(16)
    helper = str(deployed_venv() / "bin" / "migpredictd-zeropaged")
    args = [a for pattern in allow for a in ("--allow", pattern)]
    args += [a for pattern in allow_pid_files for a in ("--allow-pid-file", pattern)]
    # systemd's socket activation: the listening socket as fd 3, LISTEN_PID naming the service's process.
    command = [
        *HELPER_CAPABILITIES,
        "sh",
        "-c",
        'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@"',
        helper,
        *args,
    ]
    fd = listener.fileno()

    def as_fd_3() -> None:
        os.dup2(fd, 3)

    # (subprocess closes other descriptors after preexec_fn has run: 3 must be kept as well)
    keep = tuple({fd, 3})
    proc = subprocess.Popen(command, pass_fds=keep, preexec_fn=as_fd_3, stderr=subprocess.PIPE)  # noqa: PLW1509
    listener.close()
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the helper exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(str(path))
                s.sendall(b"{}\n")
                if s.recv(4096):
                    return proc
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the helper did not answer within 20 s")


def stop_helper(proc: subprocess.Popen[bytes]) -> str:
    """Stop the helper; its log (stderr)."""
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode(errors="replace")


# The rig's QMP sockets (tempfile.mkdtemp under /tmp), which a lab helper may inspect.
RIG_QMP_SOCKETS: Final = "/tmp/migpredictd-rig-*/qmp.sock"  # noqa: S108 (a pattern, nothing is created)


@contextlib.contextmanager
def running_helper(
    socket_path: str = DEFAULT_HELPER_SOCKET, *, allow_pid_files: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """The helper at ``socket_path`` (default: where the daemon looks with no flag) for the rig's QMP
    sockets (and the PID files ``allow_pid_files``), as :func:`start_helper` runs it; stopped and its
    socket removed on exit."""
    if Path(socket_path).exists():
        raise RigError(f"{socket_path} exists: another zero-page helper runs on this machine; stop it first")
    proc = start_helper(socket_path, [RIG_QMP_SOCKETS], allow_pid_files=allow_pid_files)
    try:
        yield proc
    finally:
        stop_helper(proc)
        Path(socket_path).unlink(missing_ok=True)
