"""A real pre-copy live migration between two QEMU processes on 127.0.0.1, with a typed result.

This is the ground truth the predictor is checked against: set `max-bandwidth` and `downtime-limit`,
`migrate` to the destination's `-incoming` port, poll `query-migrate`, and cancel past a cutoff
(a migration that does not converge would otherwise run for ever).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final

from migpredictd.lab.rig import RigError
from migpredictd.lab.rig.guest import Guest, GuestSpec, JSONObject, RigQMP, free_tcp_port

TERMINAL: Final = frozenset({"completed", "failed", "cancelled"})
# How long QEMU may take to turn `cancelling` into `cancelled` (measured: about 100 ms).
CANCEL_GRACE_S: Final = 15.0


@dataclass(frozen=True)
class RamStats:
    """The `ram` block of `query-migrate`, in bytes and pages as QEMU reports them."""

    total_bytes: int
    transferred_bytes: int
    remaining_bytes: int
    normal_pages: int
    normal_bytes: int
    zero_pages: int  # QEMU's "duplicate": pages sent as a zero marker (about 9 bytes each)
    dirty_sync_count: int
    dirty_pages_rate: int
    mbps: float
    page_size: int
    precopy_bytes: int  # sent while the guest ran (rate-limited)
    downtime_bytes: int  # sent in the final stop-and-copy (not rate-limited)

    @classmethod
    def from_qmp(cls, ram: JSONObject) -> RamStats:
        """Parse a `ram` block; fields missing in a QEMU generation read as 0."""

        def num(key: str) -> int:
            value = ram.get(key, 0)
            return int(value) if isinstance(value, int | float) else 0

        return cls(
            total_bytes=num("total"),
            transferred_bytes=num("transferred"),
            remaining_bytes=num("remaining"),
            normal_pages=num("normal"),
            normal_bytes=num("normal-bytes"),
            zero_pages=num("duplicate"),
            dirty_sync_count=num("dirty-sync-count"),
            dirty_pages_rate=num("dirty-pages-rate"),
            mbps=float(ram.get("mbps", 0.0)),
            page_size=num("page-size") or 4096,
            precopy_bytes=num("precopy-bytes"),
            downtime_bytes=num("downtime-bytes"),
        )


@dataclass(frozen=True)
class MigrationResult:
    """How one real migration went. Times are QEMU's own (ms); `wall_seconds` is the host's view.

    For a cancelled or failed migration the statistics come from the last sample taken while it was
    still active, because QEMU drops them once it leaves that state.
    """

    status: str
    converged: bool
    max_bandwidth_bytes_per_second: int
    downtime_limit_ms: int
    total_time_ms: int | None
    downtime_ms: int | None
    setup_time_ms: int | None
    expected_downtime_ms: int | None
    ram: RamStats | None
    wall_seconds: float
    cancelled: bool
    error_desc: str | None = None
    last_sample: JSONObject = field(default_factory=dict, compare=False)

    @property
    def dirty_sync_count(self) -> int | None:
        """Passes over memory QEMU made (bitmap syncs); None when no statistics were ever seen."""
        return None if self.ram is None else self.ram.dirty_sync_count


def _int_or_none(sample: JSONObject, key: str) -> int | None:
    value = sample.get(key)
    return int(value) if isinstance(value, int | float) else None


def migrate(
    source: Guest,
    destination: Guest,
    *,
    max_bandwidth_bytes_per_second: int,
    downtime_limit_ms: int,
    cutoff_s: float = 60.0,
    poll_interval_s: float = 0.05,
) -> MigrationResult:
    """Migrate `source` to `destination` (started with `incoming=`) and wait for the outcome.

    Past `cutoff_s` the migration is cancelled and reported as not converged.

    :raises RigError: when the destination is not an incoming guest or QMP fails.
    """
    if destination.incoming is None:
        raise RigError("destination guest was not started with incoming=")
    if max_bandwidth_bytes_per_second <= 0 or downtime_limit_ms <= 0:
        raise ValueError("max_bandwidth_bytes_per_second and downtime_limit_ms must be positive")
    with source.qmp(timeout=10.0) as qmp:
        qmp.execute(
            "migrate-set-parameters",
            {"max-bandwidth": max_bandwidth_bytes_per_second, "downtime-limit": downtime_limit_ms},
        )
        started = time.monotonic()
        qmp.execute("migrate", {"uri": destination.incoming})
        final, last_active, cancelled = _poll(qmp, started, cutoff_s, poll_interval_s)
        wall = time.monotonic() - started

    status = str(final.get("status"))
    stats = final if "ram" in final else last_active
    return MigrationResult(
        status=status,
        converged=status == "completed",
        max_bandwidth_bytes_per_second=max_bandwidth_bytes_per_second,
        downtime_limit_ms=downtime_limit_ms,
        total_time_ms=_int_or_none(stats, "total-time"),
        downtime_ms=_int_or_none(final, "downtime"),
        setup_time_ms=_int_or_none(stats, "setup-time"),
        expected_downtime_ms=_int_or_none(last_active, "expected-downtime"),
        ram=RamStats.from_qmp(stats["ram"]) if "ram" in stats else None,
        wall_seconds=wall,
        cancelled=cancelled,
        error_desc=final.get("error-desc"),
        last_sample=stats,
    )


def _poll(
    qmp: RigQMP, started: float, cutoff_s: float, interval_s: float
) -> tuple[JSONObject, JSONObject, bool]:
    """Poll query-migrate to a terminal state; returns (final, last sample with ram, cancelled)."""
    last_active: JSONObject = {}
    cancelled = False
    cancel_deadline: float | None = None
    while True:
        sample: Any = qmp.execute("query-migrate")
        if not isinstance(sample, dict):
            raise RigError(f"query-migrate returned {sample!r}")
        status = sample.get("status")
        if status in TERMINAL:
            return sample, last_active, cancelled
        if "ram" in sample:
            last_active = sample
        now = time.monotonic()
        if not cancelled and now - started > cutoff_s:
            qmp.execute("migrate_cancel")
            cancelled = True
            cancel_deadline = now + CANCEL_GRACE_S
        if cancel_deadline is not None and now > cancel_deadline:
            raise RigError(f"migration still {status!r} {CANCEL_GRACE_S:.0f} s after migrate_cancel")
        time.sleep(interval_s)


def run_migration(
    spec: GuestSpec,
    *,
    max_bandwidth_bytes_per_second: int,
    downtime_limit_ms: int,
    cutoff_s: float = 60.0,
    settle_s: float = 0.0,
) -> MigrationResult:
    """Boot a source guest and a destination for `spec`, migrate once, and kill both.

    `settle_s` lets the dirtier run a while before migrating (a steady state rather than a fresh one).
    """
    port = free_tcp_port()
    with Guest(spec) as source, Guest(spec, incoming=f"tcp:127.0.0.1:{port}") as destination:
        if settle_s > 0:
            time.sleep(settle_s)
        return migrate(
            source,
            destination,
            max_bandwidth_bytes_per_second=max_bandwidth_bytes_per_second,
            downtime_limit_ms=downtime_limit_ms,
            cutoff_s=cutoff_s,
        )
