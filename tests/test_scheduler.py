"""The scheduler with real APScheduler jobs on the running loop: limits, no overlap, jitter."""

from __future__ import annotations

import asyncio
import time

from migpredictd.serve.scheduler import MeasurementScheduler, Schedule


async def test_a_target_removed_and_re_added_never_measures_twice_at_once() -> None:
    running: set[str] = set()
    overlaps: list[str] = []
    done: list[str] = []

    async def run(name: str) -> None:
        if name in running:
            overlaps.append(name)
        running.add(name)
        await asyncio.sleep(0.5)
        running.discard(name)
        done.append(name)

    s = MeasurementScheduler(run, max_concurrent=4)
    s.start()
    s.sync({"a": Schedule(0.1, 0.0)})
    await asyncio.sleep(0.2)  # the first run holds the "monitor"
    s.sync({})
    s.sync({"a": Schedule(0.1, 0.0)})  # a new job object, same id: APScheduler counts instances per id
    await asyncio.sleep(1.2)
    await s.shutdown(grace_seconds=1.0)
    assert not overlaps
    assert len(done) >= 2


async def test_global_limit_on_concurrent_measurements() -> None:
    now = 0
    peak = 0

    async def run(name: str) -> None:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.3)
        now -= 1

    s = MeasurementScheduler(run, max_concurrent=2)
    s.start()
    s.sync({f"vm{i}": Schedule(60.0, 0.0) for i in range(6)})
    await asyncio.sleep(1.2)  # 6 runs of 0.3 s through 2 slots: 0.9 s
    await s.shutdown(grace_seconds=1.0)
    assert peak == 2


async def test_first_runs_are_spread_over_the_jitter() -> None:
    started: list[float] = []
    t0 = time.monotonic()

    async def run(name: str) -> None:
        started.append(time.monotonic() - t0)

    s = MeasurementScheduler(run, max_concurrent=50)
    s.start()
    s.sync({f"vm{i}": Schedule(60.0, 2.0) for i in range(40)})
    await asyncio.sleep(2.6)
    await s.shutdown(grace_seconds=1.0)
    assert len(started) == 40
    assert max(started) - min(started) > 1.0  # not all in the same second
    assert max(started) < 2.5
