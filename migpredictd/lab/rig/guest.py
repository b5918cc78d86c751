"""One real QEMU guest (TCG) booted into the dirtier workload, and a synchronous QMP wrapper for it.

`Guest` is a context manager: it starts QEMU, waits for the console line `dirtier: ready`, and kills
the process by PID on exit, whatever happened inside the block. A module-level registry plus `atexit`
kill any guest a crashed caller left behind, so a failing test never leaks a QEMU on a shared host.

QMP goes through `migpredictd.qemu.qmp` (the only module that imports `qemu.qmp`) with its lab allowlist
(`LAB_COMMANDS`: the daemon's read-only set plus migrate and friends), wrapped synchronously here.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar

from migpredictd.core.errors import TargetError
from migpredictd.lab.rig import RigError
from migpredictd.lab.rig.assets import GuestAssets, QemuGeneration, guest_assets
from migpredictd.qemu.qmp import LAB_COMMANDS, QMPSession

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

READY_LINE: Final = "dirtier: ready"
UNPACED: Final = -1.0  # rate_mib of a dirtier that writes as fast as its vCPU runs
Pattern = Literal["seq", "random"]
JSONObject = dict[str, Any]


@dataclass(frozen=True)
class GuestSpec:
    """What to boot: QEMU generation, guest RAM, and the dirtier's workload (MiB, MiB/s, seconds)."""

    qemu: QemuGeneration = "7.2"
    memory_mib: int = 256
    touch_mib: int = 64
    wss_mib: int = 32
    rate_mib: float = 0.0  # MiB/s; UNPACED (-1): as fast as the vCPU writes (CPU-bound)
    pattern: Pattern = "seq"
    phase_s: float = 0.0
    zeroed_mib: int = 0  # allocated, written and re-zeroed pages (a long-running guest's zero pages)

    def __post_init__(self) -> None:
        if self.qemu not in ("7.2", "10.0"):
            raise ValueError(f"qemu must be '7.2' or '10.0', not {self.qemu!r}")
        if self.pattern not in ("seq", "random"):
            raise ValueError(f"pattern must be 'seq' or 'random', not {self.pattern!r}")
        if self.memory_mib < 64:
            raise ValueError("memory_mib must be at least 64 (kernel + initramfs)")
        if min(self.touch_mib, self.wss_mib, self.phase_s, self.zeroed_mib) < 0:
            raise ValueError("touch_mib, wss_mib, phase_s and zeroed_mib must be >= 0")
        if self.rate_mib < 0 and self.rate_mib != UNPACED:
            raise ValueError("rate_mib must be >= 0, or -1 (unpaced: CPU-bound)")
        # The kernel, page cache and the initramfs itself need about 40 MiB (and 1/64 of RAM for the
        # kernel's page structures); keep the arena below that.
        if max(self.touch_mib, self.wss_mib) + self.zeroed_mib > self.memory_mib - 48 - self.memory_mib // 64:
            raise ValueError("touch_mib/wss_mib and zeroed_mib must leave 48 MiB + 1/64 of guest memory free")

    def kernel_args(self) -> str:
        """The kernel command line: a quiet serial console, exit on panic, and the dirtier's knobs."""
        return " ".join(
            [
                "console=ttyS0",
                "quiet",
                "panic=-1",  # a dead /init reboots at once, and -no-reboot turns that into QEMU exiting
                f"dirtier.touch_mib={self.touch_mib}",
                f"dirtier.wss_mib={self.wss_mib}",
                f"dirtier.rate_mib={self.rate_mib:g}",
                f"dirtier.pattern={self.pattern}",
                f"dirtier.phase_s={self.phase_s:g}",
                f"dirtier.zeroed_mib={self.zeroed_mib}",
            ]
        )


_T = TypeVar("_T")


class _LabLoop:
    """One private asyncio loop in a daemon thread that runs every rig QMP session.

    `migpredictd.qemu.qmp` is async; the rig is synchronous so that sync tests, benchmarks and async tests
    (whose own loop is already running) can all call it. A separate loop thread serves all three.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run `coro` on the lab loop and wait for its result (exceptions propagate)."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="migpredictd-rig-qmp", daemon=True).start()
                self._loop = loop
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()


_LAB_LOOP: Final = _LabLoop()


class RigQMP:
    """A synchronous QMP connection for the rig, over `migpredictd.qemu.qmp` with the lab allowlist.

    Errors are the project's typed QMP errors (`migpredictd.core.errors.TargetError` and below). Close it
    promptly: a QMP socket serves one client at a time.
    """

    def __init__(self, path: str, *, timeout: float = 10.0, target: str = "rig") -> None:
        self._cm: AbstractAsyncContextManager[QMPSession] = QMPSession.connect(
            path, target=target, timeout=timeout, allowed=LAB_COMMANDS
        )
        self._session = _LAB_LOOP.run(self._cm.__aenter__())
        self._closed = False

    def execute(self, command: str, arguments: JSONObject | None = None) -> Any:
        """Run one command and return its `return` value.

        :raises migpredictd.core.errors.TargetError: QEMU refused it, timed out, or the connection broke.
        """
        return _LAB_LOOP.run(self._session.execute(command, arguments))

    def close(self) -> None:
        """Disconnect (bounded by migpredictd.qemu.qmp); safe to call twice."""
        if not self._closed:
            self._closed = True
            _LAB_LOOP.run(self._cm.__aexit__(None, None, None))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Every QEMU this process started and has not reaped yet, by PID; atexit kills what is left.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL one QEMU by its PID and reap it; QEMU holds no state we want to flush."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    _LIVE.pop(proc.pid, None)


@atexit.register
def kill_all_guests() -> None:
    """Kill every guest this process started that is still alive (test crash, KeyboardInterrupt)."""
    for proc in list(_LIVE.values()):
        _kill(proc)


def free_tcp_port() -> int:
    """A currently free TCP port on 127.0.0.1 for `-incoming` (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Guest:
    """One QEMU process running the dirtier; use as a context manager.

    With `incoming="tcp:127.0.0.1:PORT"` it is a migration destination: same command line plus
    `-incoming`, and it is "ready" once its QMP socket answers (it cannot boot until the migration).
    """

    def __init__(
        self,
        spec: GuestSpec,
        *,
        incoming: str | None = None,
        ready_timeout: float = 90.0,
        assets: GuestAssets | None = None,
        exit_on_reboot: bool = True,
    ) -> None:
        self.spec = spec
        self.incoming = incoming
        # False for a post-copy destination: a guest that panics there (TCG loses hot pages under load,
        # QEMU_FACTS.md) resets inside QEMU instead of ending it, so the source can finish the migration.
        self.exit_on_reboot = exit_on_reboot
        self.ready_timeout = ready_timeout
        self._assets = assets
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self.boot_seconds: float | None = None

    # --- paths and identity -------------------------------------------------------------------

    def _dir(self) -> Path:
        if self._workdir is None:
            raise RigError("guest not started")
        return self._workdir

    @property
    def qmp_path(self) -> str:
        """The QMP unix socket path."""
        return str(self._dir() / "qmp.sock")

    @property
    def qmp_address(self) -> str:
        """The QMP address in the form the daemon's config takes (`unix:/path`)."""
        return f"unix:{self.qmp_path}"

    @property
    def console_path(self) -> Path:
        """The file the guest's serial console is written to."""
        return self._dir() / "console.log"

    @property
    def pid(self) -> int:
        """The QEMU process ID."""
        if self._proc is None:
            raise RigError("guest not started")
        return self._proc.pid

    def alive(self) -> bool:
        """Whether the QEMU process is still running."""
        return self._proc is not None and self._proc.poll() is None

    def console_text(self) -> str:
        """Everything the guest has written to its serial console so far."""
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_stderr(self) -> str:
        """QEMU's own stdout/stderr (warnings, command-line errors)."""
        try:
            return (self._dir() / "qemu.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def host_rss_bytes(self) -> int:
        """Resident memory of the QEMU process on the host (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RigError(f"no VmRSS for PID {self.pid}")

    # --- QMP convenience -------------------------------------------------------------------------

    def qmp(self, *, timeout: float = 10.0) -> RigQMP:
        """A fresh QMP connection (close it: QEMU serves one client at a time)."""
        return RigQMP(self.qmp_path, timeout=timeout, target=f"rig-{self.spec.qemu}-{self.pid}")

    def execute(self, command: str, arguments: JSONObject | None = None) -> Any:
        """Run one QMP command on a short-lived connection."""
        with self.qmp() as q:
            return q.execute(command, arguments)

    def page_sampling_dirty_rate(self, *, calc_time_s: int = 2, sample_pages: int = 16384) -> int:
        """Run `calc-dirty-rate` in page-sampling mode and return QEMU's dirty-rate (MiB/s, truncated).

        Only page-sampling: dirty-bitmap and dirty-ring crash QEMU 7.2 under TCG (QEMU_FACTS.md).

        :raises RigError: when the measurement does not finish within calc_time_s + 10 s.
        """
        with self.qmp() as q:
            q.execute(
                "calc-dirty-rate",
                {"calc-time": calc_time_s, "sample-pages": sample_pages, "mode": "page-sampling"},
            )
            deadline = time.monotonic() + calc_time_s + 10.0
            time.sleep(calc_time_s)
            while True:
                reply = q.execute("query-dirty-rate")
                if reply.get("status") == "measured":
                    return int(reply["dirty-rate"])
                if time.monotonic() > deadline:
                    raise RigError(f"calc-dirty-rate did not finish: {reply}")
                time.sleep(0.02)

    # --- lifecycle ----------------------------------------------------------------------------------

    # Above this, guest RAM is a backend that reserves no host memory (QEMU_FACTS.md, "Large guests"):
    # a 256 GiB guest then boots on a 24 GiB host, its untouched pages mapping the shared zero page.
    UNRESERVED_FROM_MIB: Final = 16384

    def _memory_args(self) -> list[str]:
        mib = self.spec.memory_mib
        if mib < self.UNRESERVED_FROM_MIB:
            return ["-m", str(mib)]
        return [
            "-object", f"memory-backend-ram,id=ram0,size={mib}M,reserve=off",
            "-machine", "memory-backend=ram0",
            "-m", f"{mib}M",
        ]  # fmt: skip

    def command_line(self) -> list[str]:
        """The full QEMU command line for this guest (assets must already be resolved)."""
        assets = self._assets
        if assets is None:
            raise RigError("assets not resolved")
        args = [
            *assets.qemu.base_args(),
            "-accel", "tcg",  # KVM is present but hangs on these hosts (QEMU_FACTS.md)
            "-machine", "pc",
            "-smp", "1",
            *self._memory_args(),
            "-nodefaults", "-no-user-config",  # no NIC/VGA: nothing needs option ROMs
            "-display", "none",
            *(["-no-reboot"] if self.exit_on_reboot else []),
            "-kernel", str(assets.kernel),
            "-initrd", str(assets.initramfs),
            "-append", self.spec.kernel_args(),
            "-serial", f"file:{self.console_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        return args

    def start(self) -> Self:
        """Launch QEMU and wait until the guest is ready (or, for a destination, QMP answers).

        :raises RigError: when an asset is missing, QEMU exits early, or readiness times out; the
            message carries the console tail and QEMU's stderr.
        """
        if self._proc is not None:
            raise RigError("guest already started")
        if self._assets is None:
            self._assets = guest_assets(self.spec.qemu)
        self._workdir = Path(tempfile.mkdtemp(prefix="migpredictd-rig-"))
        started = time.monotonic()
        log = (self._workdir / "qemu.log").open("wb")
        try:
            self._proc = subprocess.Popen(
                self.command_line(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        _LIVE[self._proc.pid] = self._proc
        logger.debug("started QEMU %s pid %d in %s", self.spec.qemu, self._proc.pid, self._workdir)
        try:
            if self.incoming is None:
                self._wait(lambda: READY_LINE in self.console_text(), what=f"'{READY_LINE}' on the console")
            else:
                self._wait(self._qmp_answers, what="the QMP socket")
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _qmp_answers(self) -> bool:
        if not os.path.exists(self.qmp_path):
            return False
        try:
            with self.qmp(timeout=2.0):
                return True
        except TargetError:
            return False

    def _wait(self, ready: Callable[[], bool], *, what: str) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if ready():
                return
            if not self.alive():
                raise RigError(f"QEMU {self.spec.qemu} exited before {what}{self._diagnostics()}")
            if time.monotonic() > deadline:
                raise RigError(
                    f"timed out after {self.ready_timeout:.0f} s waiting for {what}{self._diagnostics()}"
                )
            time.sleep(0.05)

    def _diagnostics(self) -> str:
        console = self.console_text()[-2000:]
        stderr = self.qemu_stderr()[-2000:]
        rc = None if self._proc is None else self._proc.poll()
        return f" (exit status {rc})\n--- console tail ---\n{console}\n--- qemu output ---\n{stderr}"

    def stop(self) -> None:
        """Kill QEMU by PID, reap it, and remove the work dir. Safe to call twice."""
        if self._proc is not None:
            _kill(self._proc)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_destination(spec: GuestSpec, port: int, **kwargs: Any) -> Guest:
    """A started migration destination for `spec` listening on 127.0.0.1:`port` (caller stops it)."""
    return Guest(spec, incoming=f"tcp:127.0.0.1:{port}", **kwargs).start()
