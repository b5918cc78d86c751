"""Real libvirt for tests and the accuracy lab: Debian's libvirtd started without systemd, and rig guests
(the same kernel, initramfs and dirtier as :class:`~migpredictd.lab.rig.guest.Guest`) as transient TCG
domains.

- :func:`ensure_libvirtd`: ``virtlogd -d`` and ``libvirtd -d -f RIG_CONF`` unless a libvirtd answers.
  :data:`RIG_CONF` makes the read-write socket ``root:libvirt 0770`` with no authentication, the socket
  permission the deployment docs give the daemon's user through the ``libvirt`` group (the polkit rule is
  the other way; it needs a system bus these machines lack).
- :func:`restart_libvirtd`: kill libvirtd and start it again; its domains keep running.
- :class:`LibvirtGuest`: ``virsh create`` of a transient domain, ready when the console says so;
  destroyed on exit, whatever happened.

Raises :class:`~migpredictd.lab.rig.RigError` (never skips) when libvirt is missing: the tests that use
this are about libvirt.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from pathlib import Path
from types import TracebackType
from typing import Final, Self
from xml.sax.saxutils import escape

from migpredictd.lab.rig import RigError
from migpredictd.lab.rig.assets import guest_assets
from migpredictd.lab.rig.guest import READY_LINE, GuestSpec

URI: Final = "qemu:///system"
ASSET_DIR: Final = Path("/var/lib/migpredictd-rig-libvirt")  # readable by libvirt-qemu, unlike /root
RIG_CONF: Final = ASSET_DIR / "libvirtd.conf"
LIBVIRTD_PID: Final = Path("/run/libvirtd.pid")
QEMU_LOG_DIR: Final = Path("/var/log/libvirt/qemu")
PID_DIR: Final = Path("/run/libvirt/qemu")
_CONF_TEXT: Final = """\
# migpredictd's rig: the read-write socket for root and the libvirt group, no polkit (no system bus here).
unix_sock_group = "libvirt"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
"""


def virsh(*args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``virsh -c qemu:///system ARGS`` (its output as text)."""
    if shutil.which("virsh") is None:
        raise RigError("virsh is missing: apt-get install libvirt-daemon-system libvirt-clients")
    return subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def _answers() -> bool:
    try:
        return virsh("version", check=False, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _kvm_as_debian_sets_it() -> None:
    """``/dev/kvm`` as Debian's udev rule makes it (``root:kvm 0660``). With ``root 0600`` (these machines)
    libvirt probes QEMU as root with KVM but then finds KVM unusable for ``libvirt-qemu``, calls its
    capability cache outdated and probes again, 11 times per ``virsh create``: 44 s instead of 0.4 s
    (QEMU_FACTS.md). The rig's domains are TCG (``type='qemu'``) either way."""
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return
    import grp  # noqa: PLC0415 (only here)

    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    st = kvm.stat()
    if st.st_gid != gid or st.st_mode & 0o060 != 0o060:
        os.chown(kvm, 0, gid)
        kvm.chmod(0o660)


def _start() -> None:
    for tool in ("libvirtd", "virtlogd"):
        if shutil.which(tool) is None:
            raise RigError(
                f"{tool} is missing: apt-get install --no-install-recommends libvirt-daemon-system"
            )
    _kvm_as_debian_sets_it()
    ASSET_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    RIG_CONF.write_text(_CONF_TEXT)
    Path("/run/libvirt").mkdir(parents=True, exist_ok=True)
    if subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True, check=False).returncode != 0:
        subprocess.run(["virtlogd", "-d"], check=True)
    subprocess.run(["libvirtd", "-d", "-f", str(RIG_CONF)], check=True)
    deadline = time.monotonic() + 60
    while not _answers():
        if time.monotonic() > deadline:
            raise RigError("libvirtd started but virsh does not answer within 60 s")
        time.sleep(0.2)


def ensure_libvirtd() -> None:
    """A libvirtd answering on qemu:///system, started here (as the rig's) if none does."""
    _kvm_as_debian_sets_it()
    if not _answers():
        _start()


def libvirtd_pid() -> int | None:
    """The running libvirtd's PID, from its PID file."""
    try:
        pid = int(LIBVIRTD_PID.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def stop_libvirtd() -> None:
    """Kill libvirtd and wait until it is gone (its domains keep running)."""
    pid = libvirtd_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def restart_libvirtd() -> None:
    """Stop libvirtd and start it again with the rig's config."""
    stop_libvirtd()
    _start()


def _assets() -> tuple[Path, Path]:
    """The rig's kernel and initramfs, copied where libvirt-qemu can read them (once per content)."""
    src = guest_assets("7.2")
    ASSET_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    out = []
    for path in (src.kernel, src.initramfs):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        dest = ASSET_DIR / f"{path.stem}-{digest}{path.suffix}"
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            shutil.copyfile(path, tmp)
            tmp.chmod(0o644)
            tmp.rename(dest)
        out.append(dest)
    return out[0], out[1]


def domain_xml(name: str, spec: GuestSpec, *, kernel: Path, initrd: Path, console: Path) -> str:
    """A transient TCG domain booting the rig's kernel into the dirtier (no disk, no NIC, no balloon)."""
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(spec.kernel_args())}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{escape(str(console))}'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtGuest:
    """A rig guest as a transient libvirt domain; a context manager (destroyed on exit)."""

    def __init__(self, spec: GuestSpec, name: str, *, ready_timeout: float = 120.0) -> None:
        if spec.qemu != "7.2":
            raise RigError("libvirt runs Debian's QEMU 7.2 here (the backported 10.0 is not installed)")
        self.spec = spec
        self.name = name
        self.ready_timeout = ready_timeout
        self.console = ASSET_DIR / f"{name}.console"
        self.uuid = ""
        self.started = False

    @property
    def log_path(self) -> Path:
        """libvirt's log of this domain's QEMU (command line, warnings, taint lines)."""
        return QEMU_LOG_DIR / f"{self.name}.log"

    @property
    def pid(self) -> int:
        return int((PID_DIR / f"{self.name}.pid").read_text().strip())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Self:
        ensure_libvirtd()
        kernel, initrd = _assets()
        with contextlib.suppress(FileNotFoundError):
            self.console.unlink()
        xml = ASSET_DIR / f"{self.name}.xml"
        xml.write_text(domain_xml(self.name, self.spec, kernel=kernel, initrd=initrd, console=self.console))
        virsh("destroy", self.name, check=False)
        started = virsh("create", str(xml), check=False, timeout=180)
        if started.returncode != 0:
            raise RigError(f"virsh create {self.name}: {started.stderr.strip()}")
        self.started = True
        self.uuid = virsh("domuuid", self.name).stdout.strip()
        deadline = time.monotonic() + self.ready_timeout
        while READY_LINE not in self._console():
            if time.monotonic() > deadline:
                tail = self._console()[-500:]
                self.destroy()
                raise RigError(f"domain {self.name} not ready within {self.ready_timeout:g} s: {tail!r}")
            time.sleep(0.2)
        return self

    def _console(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except (FileNotFoundError, PermissionError):
            return ""

    def destroy(self) -> None:
        """Stop the domain at once (a transient domain then no longer exists)."""
        if self.started:
            virsh("destroy", self.name, check=False)
            self.started = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()
