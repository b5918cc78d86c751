"""The latest result of every target: what the collector reads and the landing page shows.

Writers (the scheduler's jobs) replace a target's immutable :class:`TargetState`; readers take a
:meth:`State.snapshot`, a plain dict they can walk without locks. A scrape therefore never waits on a
VM, and a target removed from the config disappears from the next snapshot with all its series.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final, get_args

from migpredictd.core.measurement import Measurement
from migpredictd.core.policies import Outcome, PolicyOutcome
from migpredictd.core.predictor import FloatArray, Grid, VMPrediction

# Shared, read-only empty mappings instead of an empty dict per target and field (10,000 targets x 3
# fields): TargetState is immutable, every change builds a new mapping.
_NO_LABELS: Mapping[str, str] = MappingProxyType({})
_NO_FAILURES: Mapping[str, int] = MappingProxyType({})

# What a policy does at each grid bandwidth, as much as the exposition shows, packed in one bytes object
# per policy (:func:`pack_policy`, :func:`unpack_policy`) instead of a PolicyOutcome per bandwidth (about
# 0.15 kB each with its floats, 16 per target with two policies and 8 bandwidths).
PolicyResults = bytes
OUTCOMES: Final[tuple[Outcome, ...]] = get_args(Outcome)
_HAS_SECONDS: Final = 0x80


def pack_policy(outcomes: Sequence[PolicyOutcome]) -> PolicyResults:
    """One byte per bandwidth (the outcome's index in :data:`OUTCOMES`, plus 0x80 if it has seconds),
    then each bandwidth's seconds as a little-endian float64 (0.0 where it has none)."""
    codes = bytes(
        OUTCOMES.index(o.outcome) | (_HAS_SECONDS if o.seconds is not None else 0) for o in outcomes
    )
    seconds = struct.pack(f"<{len(outcomes)}d", *(0.0 if o.seconds is None else o.seconds for o in outcomes))
    return codes + seconds


def unpack_policy(packed: PolicyResults) -> list[tuple[Outcome, float | None]]:
    """Each bandwidth's (outcome, seconds or None), as :func:`pack_policy` got them."""
    n = len(packed) // 9
    seconds = struct.unpack_from(f"<{n}d", packed, n)
    return [
        (OUTCOMES[c & ~_HAS_SECONDS], seconds[i] if c & _HAS_SECONDS else None)
        for i, c in enumerate(packed[:n])
    ]


_NO_POLICIES: Mapping[str, PolicyResults] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class TargetState:
    """What we know about one target. ``measurement``/``prediction`` are from the last success."""

    name: str
    qmp: str
    labels: Mapping[str, str] = field(default_factory=lambda: _NO_LABELS)
    up: bool = False
    measurement: Measurement | None = None
    prediction: VMPrediction | None = None
    grid: Grid | None = None
    last_success: float | None = None
    last_attempt: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    failures: Mapping[str, int] = field(default_factory=lambda: _NO_FAILURES)
    version: int = 0
    # What each configured orchestrator policy does with the migration, per grid bandwidth (with the
    # derived answers, from the same measurement).
    policies: Mapping[str, PolicyResults] = field(default_factory=lambda: _NO_POLICIES)


class State:
    """Thread-safe map of target name -> :class:`TargetState`, with a version that changes on every write."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: dict[str, TargetState] = {}
        self._version = 0
        self.reload_ok = True
        self.reload_success_time: float | None = None
        self.started = time.time()

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> Mapping[str, TargetState]:
        with self._lock:
            return MappingProxyType(dict(self._targets))

    def set_targets(self, targets: Mapping[str, tuple[str, Mapping[str, str]]]) -> None:
        """Keep exactly these targets (name -> (qmp, labels)); new ones start unknown, gone ones vanish."""
        with self._lock:
            kept: dict[str, TargetState] = {}
            for name, (qmp, labels) in targets.items():
                old = self._targets.get(name)
                if old is None:
                    kept[name] = TargetState(
                        name=name, qmp=qmp, labels=dict(labels) if labels else _NO_LABELS
                    )
                elif old.qmp != qmp or dict(old.labels) != dict(labels):
                    kept[name] = replace(
                        old, qmp=qmp, labels=dict(labels) if labels else _NO_LABELS, version=old.version + 1
                    )
                else:
                    kept[name] = old
            self._targets = kept
            self._version += 1

    def record_success(
        self,
        name: str,
        measurement: Measurement,
        prediction: VMPrediction,
        grid: Grid,
        *,
        at: float,
        duration: float,
    ) -> None:
        with self._lock:
            old = self._targets.get(name)
            if old is None:  # removed by a reload while it was being measured
                return
            self._targets[name] = replace(
                old,
                up=True,
                measurement=measurement,
                prediction=prediction,
                grid=grid,
                last_success=at,
                last_attempt=at,
                last_duration=duration,
                last_error=None,
                version=old.version + 1,
            )
            self._version += 1

    def record_derived(
        self,
        name: str,
        measurement: Measurement,
        grid: Grid,
        min_bandwidth: FloatArray,
        min_downtime: FloatArray,
        *,
        row: int | None = None,
        policies: Mapping[str, Sequence[PolicyOutcome]] | None = None,
    ) -> None:
        """Attach derived answers computed from ``measurement`` over ``grid``; dropped if the target has
        a newer measurement, or its prediction is over another grid (a reload changed it meanwhile).
        With ``row``, the arrays are a batch's ([vm, downtime], [vm, bandwidth]) and the target's answers
        are that row (kept without a view of their own)."""
        with self._lock:
            old = self._targets.get(name)
            if (
                old is None
                or old.measurement is not measurement
                or old.prediction is None
                or old.grid != grid
            ):
                return
            if row is None:
                prediction = old.prediction.with_derived((min_bandwidth[None], min_downtime[None]), 0)
            else:
                prediction = old.prediction.with_derived((min_bandwidth, min_downtime), row)
            self._targets[name] = replace(
                old,
                prediction=prediction,
                policies=(
                    {name: pack_policy(outs) for name, outs in policies.items()} if policies else _NO_POLICIES
                ),
                version=old.version + 1,
            )
            self._version += 1

    def record_failure(self, name: str, reason: str, error: str, *, at: float, duration: float) -> None:
        with self._lock:
            old = self._targets.get(name)
            if old is None:
                return
            failures = dict(old.failures)
            failures[reason] = failures.get(reason, 0) + 1
            self._targets[name] = replace(
                old,
                up=False,
                last_attempt=at,
                last_duration=duration,
                last_error=error,
                failures=failures,
                version=old.version + 1,
            )
            self._version += 1

    def record_reload(self, ok: bool, *, at: float) -> None:
        with self._lock:
            self.reload_ok = ok
            if ok:
                self.reload_success_time = at
            self._version += 1
