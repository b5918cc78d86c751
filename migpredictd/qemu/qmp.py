"""The one door to QEMU's monitor: connect, execute with timeouts, and refuse what is not allowlisted.

This is the only module of the package that imports ``qemu.qmp`` (pinned, 0.0.x). It adds what that
library leaves to its callers:

- a timeout on every await (``qemu.qmp`` has none: a hung monitor would hang us for ever);
- a command allowlist checked *before* anything is sent (:data:`READ_ONLY_COMMANDS` for the daemon,
  :data:`LAB_COMMANDS` on top for the rig), plus a guard that ``calc-dirty-rate`` only ever runs in
  ``page-sampling`` mode (``dirty-bitmap``/``dirty-ring`` crash QEMU 7.2 without KVM);
- every failure mapped to one typed :class:`~migpredictd.core.errors.TargetError` naming the target and the
  command, raised ``from`` its cause;
- a disconnect that always happens (errors, timeouts, cancellation) and is itself bounded, because a QMP
  socket serves one client at a time and we must not keep other users (libvirt, Proxmox's ``qm``) out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.error import ProtocolError
from qemu.qmp.qmp_client import GreetingError

from migpredictd.core.address import Address, format_address
from migpredictd.core.errors import (
    QMPCommandError,
    QMPConnectError,
    QMPProtocolError,
    QMPTimeoutError,
    TargetError,
    UnsafeCommandError,
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())


READ_ONLY_COMMANDS: Final = frozenset(
    {
        "query-version",
        "query-status",
        "query-kvm",
        "query-migrate",
        "query-memory-size-summary",
        "query-dirty-rate",
        "query-name",
        "query-cpus-fast",  # the vCPU thread ids, for the guest's vCPU utilisation
        # Not strictly read-only (it starts a measurement thread), but it changes no guest state and
        # page-sampling mode only reads guest memory; the guard below pins the mode.
        "calc-dirty-rate",
    }
)
"""What the daemon may send. Everything else raises :class:`UnsafeCommandError` without sending."""

LAB_COMMANDS: Final = READ_ONLY_COMMANDS | frozenset(
    {
        "migrate",
        "migrate-incoming",
        "migrate-set-capabilities",
        "migrate-set-parameters",
        "migrate-start-postcopy",
        "migrate_cancel",
        "query-migrate-capabilities",
        "query-migrate-parameters",
        "query-qmp-schema",
        "quit",
        "stop",
        "cont",
    }
)
"""For the rig and lab tools only (they change the VM); never passed by the daemon."""

SAFE_DIRTY_RATE_MODE: Final = "page-sampling"

# Disconnecting is polite and normally instant; past this we abort the transport instead of waiting.
CLOSE_TIMEOUT_S: Final = 2.0

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def check_allowed(
    command: str, args: Mapping[str, object] | None, *, allowed: frozenset[str], target: str
) -> None:
    """Refuse a command outside ``allowed``, and any ``calc-dirty-rate`` not pinned to page-sampling.

    :raises UnsafeCommandError: the command must not be sent.
    """
    if command not in allowed:
        raise UnsafeCommandError("command is not in the allowlist; not sent", target=target, command=command)
    if command == "calc-dirty-rate":
        mode = (args or {}).get("mode")
        # An absent mode means page-sampling today, but we require it spelled out: the default is QEMU's
        # to change, and dirty-bitmap/dirty-ring SIGSEGV QEMU 7.2 when KVM is off (QEMU_FACTS.md).
        if mode != SAFE_DIRTY_RATE_MODE:
            raise UnsafeCommandError(
                f"calc-dirty-rate mode {mode!r} refused: only {SAFE_DIRTY_RATE_MODE!r} is ever sent",
                target=target,
                command=command,
            )


class QMPSession:
    """One negotiated QMP connection to one target. Create it with :meth:`connect` (an async context)."""

    def __init__(
        self,
        client: QMPClient,
        *,
        target: str,
        address: Address,
        timeout: float,
        allowed: frozenset[str],
        peer_pid: int | None,
    ) -> None:
        self._client = client
        self.target = target
        self.address = address
        self.timeout = timeout
        self.allowed = allowed
        self.peer_pid = peer_pid
        """The QEMU process ID from ``SO_PEERCRED`` (unix sockets only; None for TCP)."""

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        address: Address,
        *,
        target: str,
        # The timeout is ours to own (not the caller's asyncio.timeout): expiry must become a typed
        # QMPTimeoutError naming the target, and qemu.qmp itself has none.
        timeout: float,  # noqa: ASYNC109
        allowed: frozenset[str] = READ_ONLY_COMMANDS,
    ) -> AsyncIterator[QMPSession]:
        """Connect, read the greeting and negotiate within ``timeout``; always disconnect on exit.

        :raises QMPConnectError: refused, no such socket, closed, or negotiation failed.
        :raises QMPTimeoutError: no greeting within ``timeout`` (a hung QEMU, or another client holds
            the single-client monitor).
        :raises QMPProtocolError: the peer does not speak QMP.
        """
        # No name: qemu.qmp would make a logger per name (``qemu.qmp.protocol.<name>``), and loggers
        # are never freed, so every target name ever measured would stay in memory. Our own errors
        # and log lines name the target.
        client = QMPClient()
        peer_pid: int | None = None
        where = format_address(address)
        try:
            try:
                async with asyncio.timeout(timeout):
                    if isinstance(address, tuple):
                        await client.connect(address)
                    else:
                        sock = await _connect_unix(address)
                        peer_pid = _peer_pid(sock)
                        await client.connect(sock)
            except TimeoutError as exc:
                if client.greeting is not None:
                    raise QMPTimeoutError(
                        f"{where} greeted but did not answer within {timeout:g} s",
                        target=target,
                        command="qmp_capabilities",
                    ) from exc
                raise QMPTimeoutError(
                    f"no QMP greeting from {where} within {timeout:g} s "
                    "(QEMU hung, or another client holds the monitor)",
                    target=target,
                ) from exc
            except ConnectError as exc:
                raise _connect_error(exc, target=target, where=where) from exc
            except OSError as exc:
                raise QMPConnectError(f"cannot connect to {where}: {exc}", target=target) from exc
            yield cls(
                client, target=target, address=address, timeout=timeout, allowed=allowed, peer_pid=peer_pid
            )
        finally:
            await _close(client)

    async def execute(
        self,
        command: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (expiry becomes a QMPTimeoutError naming the command)
    ) -> Any:
        """Send one allowlisted command and return its ``return`` value (validate its shape yourself).

        :raises UnsafeCommandError: not allowlisted (or an unsafe calc-dirty-rate mode); nothing sent.
        :raises QMPCommandError: QEMU answered with an error.
        :raises QMPTimeoutError: no answer within ``timeout`` (default: the session's).
        :raises QMPConnectError: the connection was lost.
        :raises QMPProtocolError: the answer was not valid QMP.
        """
        check_allowed(command, args, allowed=self.allowed, target=self.target)
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await self._client.execute(command, dict(args) if args else None)
        except TimeoutError as exc:
            raise QMPTimeoutError(
                f"no answer within {limit:g} s", target=self.target, command=command
            ) from exc
        except ExecuteError as exc:
            raise QMPCommandError(
                exc.error.error.desc, target=self.target, command=command, error_class=exc.error_class
            ) from exc
        except ExecInterruptedError as exc:
            # The reader died; its reason (EOF, garbage) surfaces from disconnect().
            cause = await _close(self._client)
            # ValueError: asyncio's line limit (10 MiB in qemu.qmp) overrun by one reply line.
            if isinstance(cause, ProtocolError | ValueError):
                raise QMPProtocolError(
                    f"not a QMP reply: {cause}", target=self.target, command=command
                ) from cause
            raise QMPConnectError(
                f"connection lost: {cause or exc}", target=self.target, command=command
            ) from (cause or exc)
        except ProtocolError as exc:
            raise QMPProtocolError(f"bad reply: {exc}", target=self.target, command=command) from exc
        except QMPError as exc:  # StateError and anything newer: the session is not usable
            raise QMPConnectError(f"session failed: {exc}", target=self.target, command=command) from exc

    async def execute_dict(
        self,
        command: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (as execute)
    ) -> dict[str, Any]:
        """:meth:`execute` for commands whose reply must be a JSON object.

        :raises QMPProtocolError: the reply is not an object.
        """
        reply = await self.execute(command, args, timeout=timeout)
        if not isinstance(reply, dict):
            raise QMPProtocolError(
                f"expected a JSON object, got {type(reply).__name__}", target=self.target, command=command
            )
        return reply


async def _connect_unix(path: str) -> socket.socket:
    """A connected non-blocking unix socket (ours, so that we can read its peer credentials)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_pid(sock: socket.socket) -> int | None:
    """The PID of the process at the other end of a unix socket (SO_PEERCRED), None if unknown."""
    try:
        pid, _uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except (OSError, AttributeError, struct.error):
        return None
    return pid if pid > 0 else None


def _connect_error(exc: ConnectError, *, target: str, where: str) -> TargetError:
    """Map qemu.qmp's wrapped connect failure to ours: not-QMP is a protocol error, the rest connect."""
    inner = exc.exc
    if isinstance(inner, GreetingError) and not isinstance(inner.exc, EOFError | OSError):
        return QMPProtocolError(f"{where} did not send a QMP greeting: {inner}", target=target)
    if isinstance(inner, ProtocolError) and not isinstance(inner, GreetingError):
        return QMPProtocolError(f"{where} does not speak QMP: {inner}", target=target)
    return QMPConnectError(f"cannot connect to {where}: {exc}", target=target)


async def _close(client: QMPClient) -> BaseException | None:
    """Disconnect within :data:`CLOSE_TIMEOUT_S`, aborting the transport past it; never raises.

    Returns the bottom-half exception qemu.qmp re-raises on disconnect (why a session died), if any.
    """
    cause: BaseException | None = None
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await client.disconnect()
    except TimeoutError:
        logger.warning("QMP disconnect took over %g s; aborting the connection", CLOSE_TIMEOUT_S)
        _abort(client)
    except asyncio.CancelledError:
        # Cancelled while closing: drop the socket at once so the monitor is free, then obey.
        _abort(client)
        raise
    except Exception as exc:  # the bottom half's error (EOF, garbage), already handled by callers
        cause = exc
    return cause


def _abort(client: QMPClient) -> None:
    """Close the socket without any flush or handshake (qemu.qmp has no public way to do this)."""
    writer = getattr(client, "_writer", None)  # pinned 0.0.6: the asyncio StreamWriter of the session
    if writer is not None:
        writer.transport.abort()


__all__ = [
    "LAB_COMMANDS",
    "READ_ONLY_COMMANDS",
    "SAFE_DIRTY_RATE_MODE",
    "QMPSession",
    "check_allowed",
]
