"""Rig assets: the guest kernel, the QEMU binaries, and the initramfs with busybox and the dirtier.

The kernel and QEMU 10.0 come from `scripts/install-rig.sh` (under `MIGPREDICTD_RIG_DIR`, default
/opt/migpredictd-rig); QEMU 7.2 is Debian 12's own. The dirtier and the initramfs are built here, into a
cache keyed by the hash of everything that goes into them, so a rebuild happens only when an input
changes and concurrent test runs never see a half-written file.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from migpredictd.lab.rig import INSTALL_HINT, RigError

QemuGeneration = Literal["7.2", "10.0"]
QEMU_GENERATIONS: Final[tuple[QemuGeneration, ...]] = ("7.2", "10.0")

DEFAULT_RIG_DIR: Final = Path("/opt/migpredictd-rig")
SYSTEM_QEMU: Final = Path("/usr/bin/qemu-system-x86_64")
BUSYBOX: Final = Path("/bin/busybox")
DIRTIER_SOURCE: Final = Path(__file__).resolve().parent / "guest" / "dirtier.c"
CFLAGS: Final[tuple[str, ...]] = ("-static", "-O2", "-Wall")

# /init: mount the pseudo file systems the dirtier and a curious human need, then become the workload.
INIT_SCRIPT: Final = b"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec /bin/dirtier
"""


@dataclass(frozen=True)
class QemuBinary:
    """One QEMU generation: its binary and, for the extracted 10.0, the firmware dir it needs as -L."""

    generation: QemuGeneration
    binary: Path
    data_dir: Path | None

    def base_args(self) -> list[str]:
        """The binary plus `-L DATA` when the firmware is not in the binary's compiled-in place."""
        args = [str(self.binary)]
        if self.data_dir is not None:
            args += ["-L", str(self.data_dir)]
        return args


def rig_dir() -> Path:
    """Where install-rig.sh put the kernel and QEMU 10 (`MIGPREDICTD_RIG_DIR`, default above)."""
    return Path(os.environ.get("MIGPREDICTD_RIG_DIR", str(DEFAULT_RIG_DIR)))


def cache_dir() -> Path:
    """Build cache for the dirtier and initramfs (`MIGPREDICTD_RIG_CACHE`, else XDG cache)."""
    explicit = os.environ.get("MIGPREDICTD_RIG_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "migpredictd" / "rig"


def find_kernel() -> Path:
    """The guest kernel image.

    :raises RigError: when install-rig.sh has not been run.
    """
    path = rig_dir() / "kernel" / "vmlinuz"
    if not path.is_file() or path.stat().st_size == 0:
        raise RigError(f"guest kernel not found at {path}; {INSTALL_HINT}")
    return path


def find_qemu(generation: str) -> QemuBinary:
    """The QEMU binary of one generation: "7.2" is the system one, "10.0" the extracted backport.

    :raises RigError: for an unknown generation or when the binary (or its firmware dir) is missing.
    """
    if generation == "7.2":
        if not os.access(SYSTEM_QEMU, os.X_OK):
            raise RigError(f"QEMU 7.2 not found at {SYSTEM_QEMU}; {INSTALL_HINT}")
        return QemuBinary("7.2", SYSTEM_QEMU, None)
    if generation == "10.0":
        base = rig_dir() / "qemu-10.0"
        binary = base / "usr" / "bin" / "qemu-system-x86_64"
        data = base / "data"
        if not os.access(binary, os.X_OK):
            raise RigError(f"QEMU 10.0 not found at {binary}; {INSTALL_HINT}")
        if not (data / "bios-256k.bin").exists():
            raise RigError(f"QEMU 10.0 firmware dir {data} is incomplete (no bios-256k.bin); {INSTALL_HINT}")
        return QemuBinary("10.0", binary, data)
    raise RigError(f"unknown QEMU generation {generation!r}; expected one of {', '.join(QEMU_GENERATIONS)}")


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


def _publish(data_or_path: bytes | Path, target: Path, *, mode: int) -> None:
    """Write `target` atomically (temp file + rename) so a concurrent reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(data_or_path, Path):
                with data_or_path.open("rb") as src:
                    shutil.copyfileobj(src, out)
            else:
                out.write(data_or_path)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_dirtier() -> Path:
    """Compile dirtier.c statically (cached by source and flags).

    :raises RigError: when gcc or the static libc is missing, or the build fails.
    """
    source = DIRTIER_SOURCE.read_bytes()
    target = cache_dir() / f"dirtier-{_digest([source, ' '.join(CFLAGS).encode()])}"
    if target.is_file():
        return target
    if shutil.which("gcc") is None:
        raise RigError(f"gcc not found (needed to build the guest's dirtier); {INSTALL_HINT}")
    with tempfile.TemporaryDirectory(prefix="migpredictd-dirtier-") as tmp:
        out = Path(tmp) / "dirtier"
        proc = subprocess.run(
            ["gcc", *CFLAGS, "-o", str(out), str(DIRTIER_SOURCE)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RigError(f"building the dirtier failed ({INSTALL_HINT} for libc6-dev):\n{proc.stderr}")
        _publish(out, target, mode=0o755)
    return target


@dataclass(frozen=True)
class CpioEntry:
    """One newc archive member: a directory, regular file or character device."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise entries as a "newc" cpio archive, the format the kernel unpacks as initramfs.

    Written here because the hosts have no cpio binary. Header: magic 070701 and 13 eight-digit hex
    fields; name and data are each padded to a multiple of 4 bytes; a TRAILER!!! entry ends it.
    """
    buf = io.BytesIO()

    def pad4() -> None:
        buf.write(b"\0" * (-buf.tell() % 4))

    def member(ino: int, entry: CpioEntry) -> None:
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        fields = (
            ino, entry.mode, 0, 0, nlink, 0, len(entry.data),  # ino mode uid gid nlink mtime filesize
            0, 0, entry.rdev[0], entry.rdev[1],  # devmajor devminor rdevmajor rdevminor
            len(name), 0,  # namesize check
        )  # fmt: skip
        buf.write(b"070701" + b"".join(f"{f:08X}".encode() for f in fields))
        buf.write(name)
        pad4()
        buf.write(entry.data)
        pad4()

    ino = 0  # the trailer takes the next inode number after the last entry
    for ino, entry in enumerate(entries, start=1):
        member(ino, entry)
    member(ino + 1, CpioEntry("TRAILER!!!", 0))
    return buf.getvalue()


def build_initramfs() -> Path:
    """The guest's initramfs: busybox as the /init shell, the dirtier, and /dev/console (cached).

    :raises RigError: when busybox-static or the dirtier build is missing.
    """
    if not BUSYBOX.is_file():
        raise RigError(f"{BUSYBOX} not found (busybox-static); {INSTALL_HINT}")
    busybox = BUSYBOX.read_bytes()
    dirtier = build_dirtier().read_bytes()
    target = cache_dir() / f"initramfs-{_digest([busybox, dirtier, INIT_SCRIPT])}.cpio"
    if target.is_file():
        return target
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [
        CpioEntry("bin", d),
        CpioEntry("dev", d),
        # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("proc", d),
        CpioEntry("sys", d),
        CpioEntry("tmp", stat.S_IFDIR | 0o1777),
        CpioEntry("bin/busybox", x, busybox),
        CpioEntry("bin/dirtier", x, dirtier),
        CpioEntry("init", x, INIT_SCRIPT),
        CpioEntry("etc", d),
        CpioEntry("etc/hostname", f, b"migpredictd-rig\n"),
    ]
    _publish(newc_archive(entries), target, mode=0o644)
    return target


@dataclass(frozen=True)
class GuestAssets:
    """Everything one QEMU command line needs besides the spec."""

    qemu: QemuBinary
    kernel: Path
    initramfs: Path


def guest_assets(generation: str) -> GuestAssets:
    """Find or build all assets for a guest on QEMU `generation`.

    :raises RigError: with the install hint when any piece is missing.
    """
    return GuestAssets(qemu=find_qemu(generation), kernel=find_kernel(), initramfs=build_initramfs())
