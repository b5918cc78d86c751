"""The zero-page helper's protocol, and the daemon's client of it.

The daemon runs without the rights to read another user's ``/proc/PID/mem``; the helper
(:mod:`migpredictd.helper.zeropaged`, started as root with only ``CAP_SYS_PTRACE`` and
``CAP_DAC_OVERRIDE``) has them and answers one question on a unix socket: "the zero-page count and
profile of the QEMU process listening on this QMP socket" (or, on libvirt hosts, "... whose PID libvirt
wrote to this PID file"). docs/security.md has its threat model.

One request and one reply per connection, each one line of JSON (UTF-8, at most
:data:`MAX_MESSAGE_BYTES` including the newline)::

    {"version": 1, "qmp_socket": "/run/qemu-server/100.qmp", "memory_bytes": 4294967296,
     "page_size": 4096, "samples": 16384}
    {"version": 1, "ok": true, "zero_pages": 1003520.0, "method": "guest-sample", "pid": 4242,
     "profile": [0.98, ...], "detail": "...", "allocated_zero_pages": 1024.0}
    {"version": 1, "ok": false, "error": "... is not a configured QMP socket"}

A request names exactly one of ``qmp_socket`` and ``pid_file`` (libvirt's ``/run/libvirt/qemu/NAME.pid``,
for domains whose monitor socket belongs to libvirtd). The helper finds the PID itself: from
``SO_PEERCRED`` of its own connection to the socket, or from a root-owned PID file in an allowed place whose
process runs QEMU for that domain. The client only names a socket or a file, so it cannot point the helper
at an arbitrary process.
"""

from __future__ import annotations

import json
import math
import socket
from dataclasses import dataclass
from typing import Any, Final

from migpredictd.core.errors import ZeroPagesUnavailableError
from migpredictd.qemu.settings import DEFAULT_HELPER_SOCKET

PROTOCOL_VERSION: Final = 1
MAX_MESSAGE_BYTES: Final = 4096
# The helper refuses more work than this per request: 64 Ki pages, 256 MiB of 4 KiB pages (4 GiB at the
# largest page size), read one page at a time and nothing kept.
MAX_HELPER_SAMPLES: Final = 1 << 16
MAX_MEMORY_BYTES: Final = 1 << 44  # 16 TiB, above any guest QEMU runs today
PAGE_SIZES: Final = (4096, 16384, 65536)
REPLY_METHODS: Final = ("guest-sample", "host-smaps")
_REQUEST_KEYS: Final = frozenset(
    {"version", "qmp_socket", "pid_file", "memory_bytes", "page_size", "samples"}
)


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says which field and why."""


@dataclass(frozen=True, slots=True)
class HelperRequest:
    """What the daemon asks: the zero pages of the QEMU behind ``qmp_socket``, or of the QEMU whose PID
    libvirt keeps in ``pid_file`` (exactly one of the two is set)."""

    qmp_socket: str | None
    memory_bytes: int
    page_size: int = 4096
    samples: int = 16384
    pid_file: str | None = None

    def __post_init__(self) -> None:
        if (self.qmp_socket is None) == (self.pid_file is None):
            raise ValueError("a helper request names exactly one of qmp_socket and pid_file")

    def encode(self) -> bytes:
        where = {"qmp_socket": self.qmp_socket} if self.pid_file is None else {"pid_file": self.pid_file}
        return _line(
            {
                "version": PROTOCOL_VERSION,
                **where,
                "memory_bytes": self.memory_bytes,
                "page_size": self.page_size,
                "samples": self.samples,
            }
        )


@dataclass(frozen=True, slots=True)
class HelperReply:
    """The helper's estimate: zero pages, the method it used, the guest's PID and the profile."""

    zero_pages: float
    method: str
    pid: int
    profile: tuple[float, ...] | None
    detail: str
    allocated_zero_pages: float | None = None  # of zero_pages, those that are allocated memory

    def encode(self) -> bytes:
        return _line(
            {
                "version": PROTOCOL_VERSION,
                "ok": True,
                "zero_pages": self.zero_pages,
                "method": self.method,
                "pid": self.pid,
                "profile": None if self.profile is None else list(self.profile),
                "detail": self.detail,
                "allocated_zero_pages": self.allocated_zero_pages,
            }
        )


def encode_error(message: str) -> bytes:
    """A refusal, as the helper sends it."""
    return _line({"version": PROTOCOL_VERSION, "ok": False, "error": message})


def _line(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes is over {MAX_MESSAGE_BYTES}")
    return data


def _object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message larger than {MAX_MESSAGE_BYTES} bytes")
    if not data.endswith(b"\n") or b"\n" in data[:-1]:
        raise ProtocolError("message must be exactly one line ending in a newline")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object")
    if obj.get("version") != PROTOCOL_VERSION or isinstance(obj.get("version"), bool):
        raise ProtocolError(f"version: must be {PROTOCOL_VERSION}")
    return obj


def _no_constant(name: str) -> Any:
    raise ProtocolError(f"not JSON: {name} is not a number")


def _int(obj: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"{key}: must be an integer in {lo}..{hi}, got {value!r}")
    return value


def parse_request(data: bytes) -> HelperRequest:
    """The request in ``data`` (one line, newline included).

    :raises ProtocolError: naming the field that is missing, unknown or out of range.
    """
    obj = _object(data)
    unknown = sorted(set(obj) - _REQUEST_KEYS)
    if unknown:
        raise ProtocolError(f"unknown field {unknown[0]!r}")
    if ("qmp_socket" in obj) == ("pid_file" in obj):
        raise ProtocolError("exactly one of qmp_socket and pid_file must be given")
    path = obj.get("qmp_socket")
    pid_file = obj.get("pid_file")
    if "qmp_socket" in obj and (
        not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > 107
    ):
        raise ProtocolError("qmp_socket: must be an absolute path of at most 107 bytes")
    if "pid_file" in obj and (
        not isinstance(pid_file, str)
        or not pid_file.startswith("/")
        or "\0" in pid_file
        or len(pid_file) > 4095
    ):
        raise ProtocolError("pid_file: must be an absolute path of at most 4095 bytes")
    page_size = _int(obj, "page_size", 1, 65536)
    if page_size not in PAGE_SIZES:
        raise ProtocolError(f"page_size: must be one of {', '.join(map(str, PAGE_SIZES))}")
    memory = _int(obj, "memory_bytes", page_size, MAX_MEMORY_BYTES)
    if memory % page_size:
        raise ProtocolError("memory_bytes: must be a whole number of pages")
    samples = _int(obj, "samples", 1, MAX_HELPER_SAMPLES)
    return HelperRequest(
        qmp_socket=path if isinstance(path, str) else None,
        pid_file=pid_file if isinstance(pid_file, str) else None,
        memory_bytes=memory,
        page_size=page_size,
        samples=samples,
    )


def parse_reply(data: bytes, request: HelperRequest) -> HelperReply:
    """The helper's reply to ``request``.

    :raises ZeroPagesUnavailableError: a refusal (with the helper's reason) or a malformed reply.
    """
    try:
        obj = _object(data)
    except ProtocolError as exc:
        raise ZeroPagesUnavailableError(f"zero-page helper: bad reply: {exc}") from exc
    if obj.get("ok") is False:
        error = obj.get("error")
        raise ZeroPagesUnavailableError(
            f"zero-page helper refused: {error if isinstance(error, str) else '?'}"
        )
    total = request.memory_bytes // request.page_size
    zero = obj.get("zero_pages")
    method = obj.get("method")
    pid = obj.get("pid")
    profile = obj.get("profile")
    detail = obj.get("detail")
    if (
        obj.get("ok") is not True
        or not isinstance(zero, int | float)
        or isinstance(zero, bool)
        or not (math.isfinite(zero) and 0.0 <= zero <= total)
        or method not in REPLY_METHODS
        or not isinstance(pid, int)
        or isinstance(pid, bool)
        or pid <= 0
        or not isinstance(detail, str)
    ):
        raise ZeroPagesUnavailableError("zero-page helper: bad reply: fields out of range")
    shares: tuple[float, ...] | None = None
    if profile is not None:
        if not (
            isinstance(profile, list)
            and 0 < len(profile) <= 1024
            and all(
                isinstance(x, int | float) and not isinstance(x, bool) and 0.0 <= x <= 1.0 for x in profile
            )
        ):
            raise ZeroPagesUnavailableError("zero-page helper: bad reply: profile must be shares in 0..1")
        shares = tuple(float(x) for x in profile)
    allocated = obj.get("allocated_zero_pages")
    if allocated is not None and not (
        isinstance(allocated, int | float)
        and not isinstance(allocated, bool)
        and math.isfinite(allocated)
        and 0.0 <= allocated <= zero
    ):
        raise ZeroPagesUnavailableError("zero-page helper: bad reply: allocated_zero_pages out of range")
    return HelperReply(
        zero_pages=float(zero),
        method=method,
        pid=pid,
        profile=shares,
        detail=detail[:500],
        allocated_zero_pages=None if allocated is None else float(allocated),
    )


def ask_helper(helper_socket: str, request: HelperRequest, *, timeout: float = 10.0) -> HelperReply:
    """Send ``request`` to the helper at ``helper_socket`` and wait for its reply (blocking, bounded).

    :raises ZeroPagesUnavailableError: no helper there, a refusal, a timeout or a malformed reply.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(helper_socket)
            s.sendall(request.encode())
            buf = bytearray()
            while len(buf) <= MAX_MESSAGE_BYTES and not buf.endswith(b"\n"):
                chunk = s.recv(MAX_MESSAGE_BYTES + 1 - len(buf))
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError as exc:
        raise ZeroPagesUnavailableError(f"no zero-page helper at {helper_socket}") from exc
    except OSError as exc:
        raise ZeroPagesUnavailableError(
            f"zero-page helper at {helper_socket}: {exc.strerror or exc.__class__.__name__}"
        ) from exc
    return parse_reply(bytes(buf), request)


__all__ = [
    "DEFAULT_HELPER_SOCKET",
    "MAX_HELPER_SAMPLES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "HelperReply",
    "HelperRequest",
    "ProtocolError",
    "ask_helper",
    "encode_error",
    "parse_reply",
    "parse_request",
]
