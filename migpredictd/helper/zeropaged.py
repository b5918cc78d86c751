"""``migpredictd-zeropaged``: the privileged zero-page helper (docs/security.md has its threat model).

It answers one question on a unix socket, the zero-page count and profile of the QEMU process behind a
configured QMP socket, or named by libvirt's PID file (:mod:`migpredictd.qemu.zerohelper` has the
protocol), so that the network-facing daemon needs neither ``CAP_SYS_PTRACE`` nor QEMU's uid. For every
request it:

1. reads one line of at most 4096 bytes within :data:`READ_TIMEOUT_SECONDS`, else refuses;
2. resolves the named QMP socket and refuses it unless it matches an ``--allow`` pattern and is a socket;
3. connects to it itself and takes the listener's PID from ``SO_PEERCRED`` (it sends nothing on it);
   or, for a PID file: refuses it unless it matches an ``--allow-pid-file`` pattern, is a regular file
   (not a link) owned by root in a directory only root can write, and holds one PID of a process whose
   command line names the domain the file is named after (``-name guest=NAME``);
4. refuses the PID unless ``/proc/PID/exe`` is a QEMU binary (``--exe`` patterns);
5. samples guest pages for zero through ``/proc/PID/mem`` (at most 65536 pages, one at a time, nothing
   kept), or reads ``/proc/PID/smaps`` when that fails;
6. refuses the answer if the process changed meanwhile (start time or executable), and replies.

At most :data:`MAX_CONNECTIONS` clients are served at once and :data:`MAX_ESTIMATES` estimates run at
once; the rest are refused at once. No network, no configuration file, no state between requests.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import grp
import logging
import os
import socket
import stat
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from migpredictd.core.errors import ZeroPagesUnavailableError
from migpredictd.qemu.zerohelper import (
    DEFAULT_HELPER_SOCKET,
    MAX_MESSAGE_BYTES,
    HelperReply,
    HelperRequest,
    ProtocolError,
    encode_error,
    parse_request,
)
from migpredictd.qemu.zeropages import (
    ZeroPageEstimate,
    guest_name_matches,
    guest_sample_estimate,
    smaps_estimate,
)

logger = logging.getLogger("migpredictd.zeropaged")

READ_TIMEOUT_SECONDS: Final = 2.0
CONNECT_TIMEOUT_SECONDS: Final = 1.0
MAX_CONNECTIONS: Final = 16
MAX_ESTIMATES: Final = 2
# Where QEMU's QMP sockets live on the hosts we ship for: Proxmox VE, libvirt (its own monitor socket),
# and the extra sockets docs/deploy.md sets up. A site adds its own with --allow.
DEFAULT_ALLOW: Final = (
    "/run/qemu-server/*.qmp",
    "/var/run/qemu-server/*.qmp",
    "/var/lib/libvirt/qemu/*/monitor.sock",
    "/var/lib/libvirt/qemu/migpredictd/*.qmp",  # the extra sockets docs/deploy.md sets up
    "/run/libvirt/qemu/*/monitor.sock",
    "/run/migpredictd/qmp/*",
)
DEFAULT_EXE: Final = ("qemu-system-*", "qemu-kvm", "kvm")
# libvirtd's PID files of running domains (qemu:///system), written by root.
DEFAULT_ALLOW_PID_FILES: Final = ("/run/libvirt/qemu/*.pid",)
MAX_PID_FILE_BYTES: Final = 32
_DELETED = " (deleted)"  # /proc/PID/exe of a binary replaced by a package upgrade


@dataclass(frozen=True)
class HelperConfig:
    """The helper's whole configuration: command-line flags only."""

    socket_path: str = DEFAULT_HELPER_SOCKET
    allow: tuple[str, ...] = DEFAULT_ALLOW
    exe: tuple[str, ...] = DEFAULT_EXE
    allow_pid_files: tuple[str, ...] = DEFAULT_ALLOW_PID_FILES
    socket_group: str | None = None
    socket_mode: int = 0o660
    proc: Path = Path("/proc")


class Refused(Exception):
    """A request the helper will not answer; the message goes back to the client."""


def allowed_socket(path: str, allow: Sequence[str]) -> str:
    """The real path of ``path`` if it is a unix socket matching one of ``allow``, else :class:`Refused`.

    The patterns are matched against the path with every symlink resolved, so a link from an allowed
    place to a socket elsewhere is judged by where it leads."""
    real = os.path.realpath(path)
    if not any(fnmatch.fnmatchcase(real, pattern) for pattern in allow):
        raise Refused(f"{path} is not a configured QMP socket (allowed: {', '.join(allow)})")
    try:
        st = os.lstat(real)
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(f"{path} is not a unix socket")
    return real


def listener_pid(path: str) -> int:
    """The PID of the process listening on the unix socket ``path`` (``SO_PEERCRED``); nothing is sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONNECT_TIMEOUT_SECONDS)
        try:
            s.connect(path)
        except OSError as exc:
            raise Refused(f"cannot connect to {path}: {exc.strerror or exc.__class__.__name__}") from exc
        creds: tuple[int, int, int] = struct.unpack(
            "3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
    pid = creds[0]
    if pid <= 0:
        raise Refused(f"the process behind {path} is not visible from the helper's PID namespace")
    return pid


def pid_from_file(path: str, allow: Sequence[str], proc: Path) -> int:
    """The PID in libvirt's PID file ``path``, if the file is trustworthy and its process runs the domain the
    file is named after; else :class:`Refused`.

    Trustworthy: matches an ``allow`` pattern with every symlink resolved, is a regular file owned by
    root and lies in a root-owned directory that no one else may write, so only root (libvirtd) can
    have put the PID there. The process's command line must carry ``guest=NAME`` (libvirt's
    ``-name guest=NAME,...``) for the file ``NAME.pid``, so a stale file whose PID was reused is refused.
    """
    real = os.path.realpath(path)
    if not any(fnmatch.fnmatchcase(real, p) for p in allow):
        raise Refused(f"{path} is not a configured PID file (allowed: {', '.join(allow)})")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        parent = os.stat(os.path.dirname(real))
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_size > MAX_PID_FILE_BYTES:
            raise Refused(f"{path} is not a small regular file owned by root")
        if parent.st_uid != 0 or parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise Refused(f"{os.path.dirname(real)} is writable by others than root")
        text = os.read(fd, MAX_PID_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        pid = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise Refused(f"{path} does not hold a PID") from None
    if not 0 < pid < 1 << 22:
        raise Refused(f"{path} does not hold a PID")
    name = os.path.basename(real).removesuffix(".pid")
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError as exc:
        raise Refused(f"cannot inspect PID {pid}: {exc.strerror or exc.__class__.__name__}") from exc
    if not guest_name_matches(argv, name.encode()):
        raise Refused(f"PID {pid} from {path} is not QEMU for domain {name!r}")
    return pid


@dataclass(frozen=True)
class ProcessIdentity:
    """What must not change while the helper reads a process: its executable and start time."""

    exe: str
    start_time: int


def identify(pid: int, exe_patterns: Sequence[str], proc: Path) -> ProcessIdentity:
    """The identity of ``pid`` if its executable is QEMU, else :class:`Refused`."""
    try:
        exe = os.readlink(proc / str(pid) / "exe")
        fields = (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except OSError as exc:
        raise Refused(f"cannot inspect PID {pid}: {exc.strerror or exc.__class__.__name__}") from exc
    name = os.path.basename(exe.removesuffix(_DELETED))
    if not any(fnmatch.fnmatchcase(name, pattern) for pattern in exe_patterns):
        raise Refused(f"PID {pid} runs {name!r}, which is not QEMU (allowed: {', '.join(exe_patterns)})")
    # stat after the comm field: state is field 3, starttime field 22 (proc(5)).
    return ProcessIdentity(exe=exe, start_time=int(fields[19]))


def estimate(request: HelperRequest, config: HelperConfig) -> HelperReply:
    """Answer one request (blocking); :class:`Refused` with the reason otherwise."""
    if request.pid_file is not None:
        pid = pid_from_file(request.pid_file, config.allow_pid_files, config.proc)
    else:
        assert request.qmp_socket is not None  # HelperRequest names exactly one
        pid = listener_pid(allowed_socket(request.qmp_socket, config.allow))
    before = identify(pid, config.exe, config.proc)
    est: ZeroPageEstimate
    try:
        est = guest_sample_estimate(
            pid,
            memory_bytes=request.memory_bytes,
            page_size=request.page_size,
            samples=request.samples,
            proc=config.proc,
        )
    except ZeroPagesUnavailableError as sample_error:
        try:
            est = smaps_estimate(
                pid, memory_bytes=request.memory_bytes, page_size=request.page_size, proc=config.proc
            )
        except ZeroPagesUnavailableError as smaps_error:
            raise Refused(
                f"PID {pid}: guest-sample: {sample_error}; host-smaps: {smaps_error}"
            ) from smaps_error
    try:
        after = identify(pid, config.exe, config.proc)
    except Refused as exc:
        raise Refused(f"PID {pid} changed while it was read: {exc}") from exc
    if after != before:
        raise Refused(f"PID {pid} changed while it was read (another process now has that PID)")
    return HelperReply(
        zero_pages=est.zero_pages,
        method=est.method,
        pid=pid,
        profile=est.profile,
        detail=est.detail,
        allocated_zero_pages=est.allocated_zero_pages,
    )


class Helper:
    """The server: one request per connection, bounded in size, time and concurrency."""

    def __init__(self, config: HelperConfig) -> None:
        self.config = config
        self._connections = 0
        self._estimates = asyncio.Semaphore(MAX_ESTIMATES)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            client = _client_of(writer)
            if self._connections > MAX_CONNECTIONS:
                await self._reply(
                    writer, encode_error(f"busy: more than {MAX_CONNECTIONS} clients"), client, "busy"
                )
                return
            try:
                request = parse_request(await self._read(reader))
                async with self._estimates:
                    reply = await asyncio.to_thread(estimate, request, self.config)
            except (Refused, ProtocolError) as exc:
                await self._reply(writer, encode_error(str(exc)), client, str(exc))
                return
            logger.info(
                "%s: %s PID %d: %s, %.0f zero pages",
                client,
                request.pid_file or request.qmp_socket,
                reply.pid,
                reply.method,
                reply.zero_pages,
            )
            await self._send(writer, reply.encode())
        finally:
            self._connections -= 1
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        buf = bytearray()
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                while not buf.endswith(b"\n"):
                    chunk = await reader.read(MAX_MESSAGE_BYTES + 1 - len(buf))
                    if not chunk:
                        raise Refused("request ended before its newline")
                    buf += chunk
                    if len(buf) > MAX_MESSAGE_BYTES:
                        raise Refused(f"request larger than {MAX_MESSAGE_BYTES} bytes")
        except TimeoutError:
            raise Refused(f"request not complete within {READ_TIMEOUT_SECONDS:g} s") from None
        return bytes(buf)

    async def _reply(self, writer: asyncio.StreamWriter, data: bytes, client: str, why: str) -> None:
        logger.warning("%s: refused: %s", client, why)
        await self._send(writer, data)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            writer.write(data)
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away; nothing else to do


def _client_of(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError):
        return "client ?"
    return f"client uid {uid} pid {pid}"


def listening_socket(config: HelperConfig) -> socket.socket:
    """The listening socket: systemd's (socket activation) if passed, else bound at ``socket_path``
    with ``socket_mode`` and ``socket_group``."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1":
        return socket.socket(fileno=3)
    path = Path(config.socket_path)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    if config.socket_group is not None:
        gid = (
            int(config.socket_group)
            if config.socket_group.isdigit()
            else grp.getgrnam(config.socket_group).gr_gid
        )
        os.chown(path, -1, gid)
    os.chmod(path, config.socket_mode)
    sock.listen(MAX_CONNECTIONS)
    return sock


async def serve(config: HelperConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled."""
    helper = Helper(config)
    sock = listening_socket(config)
    server = await asyncio.start_unix_server(helper.handle, sock=sock, limit=MAX_MESSAGE_BYTES + 1)
    logger.info(
        "zero-page helper on %s, QMP sockets allowed: %s", config.socket_path, ", ".join(config.allow)
    )
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="migpredictd-zeropaged", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--socket", default=DEFAULT_HELPER_SOCKET, help="where to listen (default: %(default)s)"
    )
    parser.add_argument(
        "--allow",
        action="append",
        help="glob of the QMP sockets it may inspect, repeatable (default: " + ", ".join(DEFAULT_ALLOW) + ")",
    )
    parser.add_argument(
        "--allow-pid-file",
        action="append",
        help="glob of the libvirt PID files it may follow, repeatable (default: "
        + ", ".join(DEFAULT_ALLOW_PID_FILES)
        + ")",
    )
    parser.add_argument(
        "--exe",
        action="append",
        help="glob of QEMU executable names, repeatable (default: " + ", ".join(DEFAULT_EXE) + ")",
    )
    parser.add_argument(
        "--socket-group", help="group (name or gid) that may connect; the socket is mode 0660"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    config = HelperConfig(
        socket_path=args.socket,
        allow=tuple(args.allow) if args.allow else DEFAULT_ALLOW,
        exe=tuple(args.exe) if args.exe else DEFAULT_EXE,
        allow_pid_files=tuple(args.allow_pid_file) if args.allow_pid_file else DEFAULT_ALLOW_PID_FILES,
        socket_group=args.socket_group,
    )
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"migpredictd-zeropaged: {config.socket_path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
