"""When each target is measured: APScheduler 3 jobs, one per target, with jitter and a global limit.

The first run of a target comes within ``jitter`` of its being added (so a thousand VMs are not
sampled in the same second), then every ``interval`` (plus up to ``jitter``). A target's runs never
overlap (``max_instances=1``, missed runs coalesce), and at most ``max_concurrent`` measurements run
at once across all targets, each weighted by its cost (:class:`WeightedLimit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Schedule:
    interval_seconds: float
    jitter_seconds: float


class WeightedLimit:
    """At most ``limit`` units in use at once; a holder of ``w`` units (``1 <= w``, capped at the limit,
    so that even the dearest measurement runs, alone) waits until that many are free."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, weight: int) -> AsyncIterator[None]:
        w = max(1, min(weight, self.limit))
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + w <= self.limit)
            self.used += w
        try:
            yield
        finally:
            async with self._changed:
                self.used -= w
                self._changed.notify_all()


async def _run_job(scheduler: MeasurementScheduler, name: str) -> None:
    """What each APScheduler job calls, named by :data:`_JOB_FUNC`."""
    await scheduler._job(name)


# Jobs name their function by this text: APScheduler then keeps the one string for every job (given a
# bound method, it makes a method and a "module:qualname" string per job, about 0.2 kB).
_JOB_FUNC: Final = f"{__name__}:{_run_job.__name__}"


class MeasurementScheduler:
    """Keeps one APScheduler job per target in step with the config.

    ``max_concurrent`` counts measurements of the default cost; ``cost(name)`` says how many such a
    target's measurement is worth (1 by default; the daemon derives it from the pages QEMU hashed for
    the target's last measurement), so that dear ones take more of the limit."""

    def __init__(
        self,
        run: Callable[[str], Awaitable[None]],
        *,
        max_concurrent: int,
        cost: Callable[[str], int] | None = None,
    ) -> None:
        self._run = run
        self._cost = cost or (lambda _name: 1)
        self._limit = WeightedLimit(max_concurrent)
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._schedules: dict[str, Schedule] = {}
        # One trigger (and grace time) per distinct schedule, shared by its jobs: an IntervalTrigger only
        # reads them, and the first run of every job is given (next_run_time), so its start_date is unused.
        self._triggers: dict[Schedule, tuple[Schedule, IntervalTrigger, int]] = {}
        self._running: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._scheduler.start()

    def set_limit(self, max_concurrent: int) -> None:
        self._limit = WeightedLimit(max_concurrent)

    def sync(self, schedules: Mapping[str, Schedule]) -> None:
        """Add, remove and reschedule jobs so there is exactly one per entry."""
        for name in list(self._schedules):
            if name not in schedules:
                self._scheduler.remove_job(name)
                del self._schedules[name]
                log.info("target removed", extra={"target": name})
        now = datetime.now(UTC)
        wanted = set(schedules.values())
        triggers = {k: v for k, v in self._triggers.items() if k in wanted}
        self._triggers = triggers
        for name, sched in schedules.items():
            if self._schedules.get(name) == sched:
                continue
            shared = triggers.get(sched)
            if shared is None:
                trigger = IntervalTrigger(seconds=sched.interval_seconds, jitter=sched.jitter_seconds or None)
                shared = triggers[sched] = (sched, trigger, max(1, int(sched.interval_seconds)))
            first = now + timedelta(seconds=random.uniform(0, sched.jitter_seconds))
            self._scheduler.add_job(
                _JOB_FUNC,
                shared[1],
                args=(self, name),
                id=name,
                name=name,
                replace_existing=True,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=shared[2],
                next_run_time=first,
            )
            if name not in self._schedules:
                log.info("target added", extra={"target": name})
            self._schedules[name] = shared[0]  # one Schedule object per distinct schedule, too

    async def _job(self, name: str) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            async with self._limit.hold(self._cost(name)):
                if name in self._schedules:  # removed while waiting for a slot
                    await self._run(name)
        except asyncio.CancelledError:
            # Shutdown cancels running measurements on purpose (their QMP sessions close on the way out);
            # re-raising would make APScheduler log every one of them as "Error running job".
            log.debug("measurement cancelled", extra={"target": name})
        finally:
            if task is not None:
                self._running.discard(task)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def shutdown(self, grace_seconds: float = 3.0) -> None:
        """Stop scheduling, cancel running measurements (their QMP sessions close), wait briefly."""
        self._scheduler.shutdown(wait=False)
        tasks = list(self._running)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace_seconds)
