"""QMP monitor addresses (``unix:/path``, ``tcp:HOST:PORT`` or a plain ``/path``) and libvirt domain
references (:class:`DomainRef`). Pure.

One parser for the measure edge (qmp.py) and the config checker (config.py), which must accept exactly
the same forms.
"""

from __future__ import annotations

from dataclasses import dataclass

from migpredictd.core.errors import InputError

Address = str | tuple[str, int]
"""A unix socket path, or (host, port)."""


def parse_address(text: str) -> Address:
    """``unix:/path``, ``tcp:HOST:PORT`` (``tcp:[::1]:4444`` for IPv6) or a plain ``/path``.

    :raises InputError: when the address has none of these forms.
    """
    if "\x00" in text:  # no socket path or host name can hold it; open() would raise ValueError
        raise InputError(f"contains a NUL byte: {text!r}", field="address")
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise InputError("unix socket path is empty", field="address")
        return path
    if text.startswith("tcp:"):
        host, sep, port_text = text[len("tcp:") :].rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise InputError(f"expected tcp:HOST:PORT, got {text!r}", field="address")
        port = int(port_text)
        if not 0 < port < 65536:
            raise InputError(f"port {port} out of range 1..65535", field="address")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return host, port
    if text.startswith("/") or text.startswith("./"):
        return text
    raise InputError(f"expected unix:/path, tcp:HOST:PORT or /path, got {text!r}", field="address")


def format_address(address: Address) -> str:
    """The inverse of :func:`parse_address`, for messages."""
    if isinstance(address, tuple):
        host, port = address
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
    return f"unix:{address}"


@dataclass(frozen=True, slots=True)
class DomainRef:
    """A libvirt domain to measure: by ``uuid`` on connection ``uri``; ``pid_file`` is libvirt's PID file
    of its QEMU when the URI is this host's system instance (None otherwise)."""

    uri: str
    name: str
    uuid: str
    pid_file: str | None = None
