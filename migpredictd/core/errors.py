"""The error tree of migpredictd: every error the daemon and the CLI raise derives from one class here.

::

    MigpredictdError
     +-- InputError             bad user input: a measurement file, a CLI value (names the field)
     |    +-- UnitError         a bandwidth, duration or size that does not parse
     +-- ConfigError            a YAML config with problems (each names file, line and key)
     |    +-- WebConfigError    the --web.config.file
     +-- WebListenError         the listen address cannot be bound
     +-- ZeroPagesUnavailable   no zero-page estimate here (no permission, not on the hypervisor)
     +-- RigError               the lab rig cannot give a guest (defined in lab/rig/, outside the runtime)
     +-- TargetError            measuring one VM failed (names the target and the QMP command)
          +-- QMPConnectError   cannot connect or negotiate
          +-- QMPTimeoutError   a command did not answer within its timeout
          +-- QMPCommandError   QEMU answered with an error (carries error_class)
          +-- QMPProtocolError  the reply is not QMP (garbage, truncated, wrong shape, absurd values)
          +-- UnsafeCommandError a command outside the allowlist was about to be sent
          +-- LibvirtError      libvirt refused an API call or the connection broke (names the call)
          +-- TargetSkipped     the VM cannot be measured now (migrating, not running, busy); retry later

Every ``TargetError`` has a short ``reason`` that becomes the ``reason`` label of
``migpredictd_measurement_failures_total``; the set of reasons is fixed, so the label set stays bounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class MigpredictdError(Exception):
    """Root of every error migpredictd raises on purpose."""


class InputError(MigpredictdError):
    """Bad input; ``field`` names what was wrong (``points[2].dirty_pages``)."""

    def __init__(self, message: str, *, field: str | None = None, source: str | None = None) -> None:
        self.message = message
        self.field = field
        self.source = source
        where = ": ".join(x for x in (source, field) if x)
        super().__init__(f"{where}: {message}" if where else message)


class UnitError(InputError):
    """A value with a unit (``10Gbps``, ``500ms``, ``2GiB``) that does not parse."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem in a config file, located as precisely as the YAML allows."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        line = f":{self.line}" if self.line is not None else ""
        key = f": {self.key}" if self.key else ""
        return f"{self.file}{line}{key}: {self.message}"


class ConfigError(MigpredictdError):
    """A config that cannot be used; ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class WebConfigError(ConfigError):
    """A ``--web.config.file`` that cannot be used; every problem names the file and the key."""


class WebListenError(MigpredictdError):
    """The server cannot listen on the requested address (in use, not permitted, no such host)."""


class ZeroPagesUnavailableError(MigpredictdError):
    """The zero-page estimate cannot be made here (not on the hypervisor, no permission, mapping not found).

    Not a :class:`TargetError`: the measurement goes on with ``zero_pages=None`` and a note carrying this
    message.
    """


# Reasons are label values: keep this set small and fixed.
FAILURE_REASONS = (
    "connect",
    "timeout",
    "qmp_error",
    "protocol",
    "unsafe_command",
    "migrating",
    "not_running",
    "busy",
    "job",
    "libvirt",
    "internal",
)


class TargetError(MigpredictdError):
    """Measuring one target failed; names the target and the QMP command that failed."""

    reason = "internal"

    def __init__(self, message: str, *, target: str, command: str | None = None) -> None:
        self.target = target
        self.command = command
        self.detail = message
        cmd = f" {command}" if command else ""
        super().__init__(f"target {target}{cmd}: {message}")


class QMPConnectError(TargetError):
    """The monitor refused the connection, closed it, or failed capabilities negotiation."""

    reason = "connect"


class QMPTimeoutError(TargetError):
    """No (complete) answer within the configured timeout."""

    reason = "timeout"


class QMPCommandError(TargetError):
    """QEMU answered a command with ``{"error": ...}``; ``error_class`` is QMP's class name."""

    reason = "qmp_error"

    def __init__(
        self, message: str, *, target: str, command: str | None = None, error_class: str = ""
    ) -> None:
        self.error_class = error_class
        super().__init__(message, target=target, command=command)


class QMPProtocolError(TargetError):
    """The peer does not speak QMP, or a reply has the wrong shape or impossible values."""

    reason = "protocol"


class UnsafeCommandError(TargetError):
    """A command outside the allowlist was about to be sent; it was not sent."""

    reason = "unsafe_command"


class LibvirtError(TargetError):
    """libvirt refused an API call on a domain, or the connection to libvirtd broke; ``command`` names the
    libvirt API call (``virDomainStartDirtyRateCalc``)."""

    reason = "libvirt"


class TargetSkipped(TargetError):
    """The VM cannot be measured now; the scheduler tries again at the next interval."""

    def __init__(self, message: str, *, target: str, command: str | None = None, reason: str) -> None:
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.reason = reason
        super().__init__(message, target=target, command=command)
