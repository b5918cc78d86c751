"""The **only** module that imports libvirt-python: one connection per URI, every call bounded in time.

libvirt-python's calls block (they release the GIL), so each :class:`Connection` runs them on its own few
threads and the event loop waits with a timeout: a hung libvirtd holds at most those threads, never the
loop or another URI's connection. libvirt's default event loop runs on one daemon thread, which is what
keepalive needs: a libvirtd that dies or hangs closes the connection within about
``KEEPALIVE_INTERVAL x (KEEPALIVE_COUNT + 1)`` seconds, and the next call opens a new one.

Only these calls are made, all on a read-write connection (libvirt refuses ``virDomainStartDirtyRateCalc``
on a read-only one) and none of them taints a domain: ``virConnectListAllDomains``, ``virDomainGetInfo``,
``virDomainGetState``, ``virDomainGetJobInfo``/``virDomainGetJobStats``, ``virDomainGetMetadata``,
``virDomainGetVcpus``, ``virDomainStartDirtyRateCalc``, ``virConnectGetAllDomainStats``
(``VIR_DOMAIN_STATS_DIRTYRATE``), ``virConnectGetVersion``. ``virDomainQemuMonitorCommand``, which taints,
is never called.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from migpredictd.core.errors import LibvirtError, MigpredictdError

try:
    import libvirt
except ImportError:  # an extra: plain QMP users need neither libvirt-python nor a compiler
    libvirt = None

__all__ = [
    "LIBVIRT_MISSING",
    "Connection",
    "ConnectionError",
    "DirtyRate",
    "Domain",
    "Job",
    "available",
]

LIBVIRT_MISSING: Final = "libvirt-python is not installed: pip install 'migpredictd[libvirt]'"
KEEPALIVE_INTERVAL: Final = 5
KEEPALIVE_COUNT: Final = 3
THREADS_PER_CONNECTION: Final = 4
MAX_METADATA_BYTES: Final = 65536  # a domain's metadata element is the management layer's, not ours

# libvirt's enums, by value (stable ABI), so that the rest of migpredictd never imports libvirt.
DOMAIN_RUNNING: Final = 1
JOB_NONE: Final = 0
DIRTYRATE_MEASURING: Final = 1
DIRTYRATE_MEASURED: Final = 2
_DIRTYRATE_MODE_PAGE_SAMPLING: Final = 0
_STATS_DIRTYRATE: Final = 1 << 9
_LIST_ACTIVE: Final = 1
_METADATA_ELEMENT: Final = 2
# virDomainJobOperation: what an active job is doing (virDomainGetJobStats' "operation").
JOB_OPERATIONS: Final[Mapping[int, str]] = {
    0: "unknown",
    1: "start",
    2: "save",
    3: "restore",
    4: "incoming migration",
    5: "outgoing migration",
    6: "snapshot",
    7: "snapshot revert",
    8: "dump",
    9: "backup",
    10: "snapshot delete",
}
MIGRATION_OPERATIONS: Final = frozenset({4, 5})

_T = TypeVar("_T")


def available() -> bool:
    """Whether libvirt-python can be imported here."""
    return libvirt is not None


class ConnectionError(MigpredictdError):
    """The URI cannot be reached, or libvirt-python is missing: the connection's error, not a domain's."""

    def __init__(self, uri: str, message: str) -> None:
        self.uri = uri
        self.detail = message
        super().__init__(f"libvirt {uri}: {message}")


@dataclass(frozen=True, slots=True)
class Domain:
    """A running domain as discovery sees it; ``metadata`` maps each namespace asked for to its XML."""

    name: str
    uuid: str
    domain_id: int
    memory_bytes: int
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Job:
    """The domain's current job: libvirt's type (0 = none) and, if it says, the operation."""

    type: int
    operation: int | None

    @property
    def active(self) -> bool:
        return self.type != JOB_NONE

    def describe(self) -> str:
        return JOB_OPERATIONS.get(self.operation if self.operation is not None else 0, "unknown")


@dataclass(frozen=True, slots=True)
class DirtyRate:
    """``VIR_DOMAIN_STATS_DIRTYRATE`` of one domain; absent fields are None."""

    status: int | None
    start_time: int | None
    period: int | None
    mode: str | None
    mib_per_second: int | None


_EVENT_LOOP_LOCK = threading.Lock()
_EVENT_LOOP_STARTED = False


def _start_event_loop() -> None:
    """libvirt's default event loop on one daemon thread (once per process), and libvirt's own error
    printing to stderr silenced: every error reaches us as an exception."""
    global _EVENT_LOOP_STARTED  # noqa: PLW0603 (process-wide, like libvirt's own)
    with _EVENT_LOOP_LOCK:
        if _EVENT_LOOP_STARTED or libvirt is None:
            return
        lv = libvirt
        lv.registerErrorHandler(lambda _ctx, _err: None, None)
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                lv.virEventRunDefaultImpl()

        threading.Thread(target=run, name="migpredictd-libvirt-events", daemon=True).start()
        _EVENT_LOOP_STARTED = True


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Connection:
    """One read-write connection to ``uri``, opened on first use and again after it broke.

    Every method is a coroutine that runs one libvirt call on this connection's threads, bounded by
    ``timeout`` seconds. Domain calls raise :class:`~migpredictd.core.errors.LibvirtError` naming the
    target and the libvirt call; :meth:`running_domains` and :meth:`version` raise :class:`ConnectionError`.
    """

    def __init__(self, uri: str, *, timeout: float = 30.0) -> None:
        self.uri = uri
        self.timeout = timeout
        self._conn: Any = None
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            THREADS_PER_CONNECTION, thread_name_prefix="migpredictd-libvirt"
        )

    # --- plumbing -------------------------------------------------------------------------------------

    def _connection(self) -> Any:
        """The open connection (opened here if there is none or it died); blocking."""
        if libvirt is None:
            raise ConnectionError(self.uri, LIBVIRT_MISSING)
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive() == 1:
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._drop()
            _start_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                raise ConnectionError(self.uri, _message(exc)) from exc
            # A driver without keepalive (test:///) still works, just without the early close.
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            self._conn = conn
            return conn

    def _drop(self) -> None:
        """Forget the connection and close it (blocking; with ``_lock`` held, never on the event loop)."""
        conn, self._conn = self._conn, None
        if conn is not None and libvirt is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _drop_later(self) -> None:
        """:meth:`_drop` on a thread of its own: the lock may be held by a worker blocked in
        ``virConnectOpen`` for minutes, and closing talks to libvirtd; the event loop waits for neither."""

        def drop() -> None:
            with self._lock:
                self._drop()

        threading.Thread(target=drop, name="migpredictd-libvirt-close", daemon=True).start()

    async def _run(self, fn: Callable[[], _T], *, what: str) -> _T:
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, fn)
        except RuntimeError:  # closed (its libvirt entry was removed by a reload) while a call was due
            raise ConnectionError(self.uri, "the connection was closed") from None
        try:
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            self._drop_later()  # the next call opens a new connection rather than queue behind a hung one
            raise TimeoutError(f"{what} did not answer within {self.timeout:g} s") from None

    async def _domain_call(self, uuid: str, target: str, command: str, call: Callable[[Any], _T]) -> _T:
        """``call(domain)`` for the domain ``uuid``; errors become LibvirtError naming ``command``."""

        def run() -> _T:
            assert libvirt is not None
            conn = self._connection()
            try:
                return call(conn.lookupByUUIDString(uuid))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_SYSTEM_ERROR):
                    with self._lock:
                        if self._conn is conn and conn.isAlive() != 1:
                            self._drop()
                raise LibvirtError(_message(exc), target=target, command=command) from exc

        try:
            return await self._run(run, what=command)
        except ConnectionError as exc:
            raise LibvirtError(exc.detail, target=target, command=command) from exc
        except TimeoutError as exc:
            raise LibvirtError(str(exc), target=target, command=command) from exc

    def close(self) -> None:
        """Close the connection (on a thread of its own) and let its threads end (a hung call's thread ends
        when libvirt gives up); never blocks."""
        self._drop_later()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- the connection -------------------------------------------------------------------------------

    async def running_domains(self, namespaces: Sequence[str] = ()) -> list[Domain]:
        """Every running domain, with the metadata element of each namespace in ``namespaces``.

        :raises ConnectionError: the URI is unreachable, or libvirtd failed the call.
        """

        def run() -> list[Domain]:
            assert libvirt is not None
            conn = self._connection()
            try:
                doms = conn.listAllDomains(_LIST_ACTIVE)
            except libvirt.libvirtError as exc:
                with self._lock:
                    self._drop()
                raise ConnectionError(self.uri, f"virConnectListAllDomains: {_message(exc)}") from exc
            out = []
            failed = False
            for dom in doms:
                try:
                    info = dom.info()  # [state, maxMem KiB, memory KiB, nrVirtCpu, cpuTime]
                    if info[0] != DOMAIN_RUNNING:
                        continue
                    meta = {}
                    for ns in namespaces:
                        try:
                            xml = dom.metadata(_METADATA_ELEMENT, ns, 0)
                        except libvirt.libvirtError:
                            continue  # none in that namespace (or unreadable): the domain has no such labels
                        if isinstance(xml, str) and len(xml) <= MAX_METADATA_BYTES:
                            meta[ns] = xml
                    out.append(
                        Domain(
                            name=dom.name(),
                            uuid=dom.UUIDString(),
                            domain_id=dom.ID(),
                            memory_bytes=int(info[1]) * 1024,
                            metadata=meta,
                        )
                    )
                except libvirt.libvirtError:
                    failed = True  # stopped between the list and the call, or the connection broke
            if failed and conn.isAlive() != 1:
                # libvirtd went away mid-list: an empty or partial list must not look like stopped domains.
                with self._lock:
                    self._drop()
                raise ConnectionError(self.uri, "the connection broke while listing domains")
            return out

        try:
            return await self._run(run, what="virConnectListAllDomains")
        except TimeoutError as exc:
            raise ConnectionError(self.uri, str(exc)) from exc

    async def version(self) -> str:
        """The hypervisor's version (QEMU's, for qemu:// URIs), e.g. ``7.2.22``.

        :raises ConnectionError: the URI is unreachable.
        """

        def run() -> str:
            assert libvirt is not None
            try:
                v = int(self._connection().getVersion())
            except libvirt.libvirtError as exc:
                raise ConnectionError(self.uri, f"virConnectGetVersion: {_message(exc)}") from exc
            return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"

        try:
            return await self._run(run, what="virConnectGetVersion")
        except TimeoutError as exc:
            raise ConnectionError(self.uri, str(exc)) from exc

    # --- one domain -------------------------------------------------------------------------------------

    async def state(self, uuid: str, *, target: str) -> int:
        """libvirt's domain state (1 = running)."""
        state = await self._domain_call(uuid, target, "virDomainGetState", lambda d: d.state(0))
        value = _int(state[0]) if isinstance(state, list | tuple) and state else None
        if value is None:
            raise LibvirtError(f"unexpected state {state!r}", target=target, command="virDomainGetState")
        return value

    async def memory_bytes(self, uuid: str, *, target: str) -> int:
        """The domain's memory (its maximum, which a migration copies), in bytes."""
        kib = await self._domain_call(uuid, target, "virDomainGetMaxMemory", lambda d: d.maxMemory())
        if _int(kib) is None or kib <= 0:
            raise LibvirtError(f"unexpected memory {kib!r}", target=target, command="virDomainGetMaxMemory")
        return int(kib) * 1024

    async def job(self, uuid: str, *, target: str) -> Job:
        """The domain's active job, if any."""

        def call(dom: Any) -> Job:
            info = dom.jobInfo()
            kind = _int(info[0]) if isinstance(info, list) and info else None
            if kind is None:
                raise LibvirtError(
                    f"unexpected job info {info!r}", target=target, command="virDomainGetJobInfo"
                )
            operation = None
            if kind != JOB_NONE:
                stats = dom.jobStats(0)
                operation = _int(stats.get("operation")) if isinstance(stats, dict) else None
            return Job(type=kind, operation=operation)

        return await self._domain_call(uuid, target, "virDomainGetJobInfo", call)

    async def vcpu_seconds(self, uuid: str, *, target: str) -> list[float] | None:
        """CPU time of each vCPU so far, in seconds; None when libvirt cannot say."""

        def call(dom: Any) -> list[float] | None:
            info = dom.vcpus()[0]  # [(number, state, cpuTime ns, host CPU), ...]
            times = [_int(v[2]) for v in info if isinstance(v, tuple | list) and len(v) >= 3]
            if not times or any(t is None for t in times):
                return None
            return [int(t or 0) / 1e9 for t in times]

        try:
            return await self._domain_call(uuid, target, "virDomainGetVcpus", call)
        except LibvirtError:
            return None  # utilisation is optional: the prediction then assumes a CPU-bound guest

    async def start_dirty_rate(self, uuid: str, seconds: int, *, target: str) -> None:
        """Start one page-sampling dirty-rate calculation of ``seconds`` (libvirt: 1..60)."""
        await self._domain_call(
            uuid,
            target,
            "virDomainStartDirtyRateCalc",
            lambda d: d.startDirtyRateCalc(seconds, _DIRTYRATE_MODE_PAGE_SAMPLING),
        )

    async def dirty_rate(self, uuid: str, *, target: str) -> DirtyRate:
        """The domain's dirty-rate statistics (the last or current calculation)."""

        def call(dom: Any) -> DirtyRate:
            assert libvirt is not None
            stats = dom.connect().domainListGetStats([dom], _STATS_DIRTYRATE, 0)
            record = stats[0][1] if stats and isinstance(stats[0], tuple) else {}
            if not isinstance(record, dict):
                record = {}
            mode = record.get("dirtyrate.calc_mode")
            return DirtyRate(
                status=_int(record.get("dirtyrate.calc_status")),
                start_time=_int(record.get("dirtyrate.calc_start_time")),
                period=_int(record.get("dirtyrate.calc_period")),
                mode=mode if isinstance(mode, str) else None,
                mib_per_second=_int(record.get("dirtyrate.megabytes_per_second")),
            )

        return await self._domain_call(uuid, target, "virConnectGetAllDomainStats", call)


def _message(exc: Exception) -> str:
    text = functools.reduce(lambda s, c: s.replace(c, " "), "\r\n\t", str(exc)).strip()
    return text[:500] or exc.__class__.__name__
