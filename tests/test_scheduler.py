"""The scheduler with real APScheduler jobs on the running loop: limits, no overlap, jitter."""

from __future__ import annotations

import asyncio
import time

from migpredictd.serve.scheduler import MeasurementScheduler, Schedule
from tests.waits import until


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
    await until(lambda: "a" in running, 5, "the first run")  # the first run holds the "monitor"
    s.sync({})
    s.sync({"a": Schedule(0.1, 0.0)})  # a new job object, same id: APScheduler counts instances per id
    assert "a" in running  # re-added while its first run is still going
    await until(lambda: len(done) >= 2, 5, "a second run after the re-add")
    await s.shutdown(grace_seconds=1.0)
    assert not overlaps
    assert len(done) >= 2


async def test_global_limit_on_concurrent_measurements() -> None:
    now = 0
    peak = 0
    finished = 0

    async def run(name: str) -> None:
        nonlocal now, peak, finished
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.2)
        now -= 1
        finished += 1

    s = MeasurementScheduler(run, max_concurrent=2)
    s.start()
    s.sync({f"vm{i}": Schedule(60.0, 0.0) for i in range(6)})
    await until(lambda: finished == 6, 5, "6 runs of 0.2 s through 2 slots (0.6 s)")
    await s.shutdown(grace_seconds=1.0)
    assert peak == 2


async def test_first_runs_are_spread_over_the_jitter() -> None:
    started: list[float] = []
    t0 = time.monotonic()

    async def run(name: str) -> None:
        started.append(time.monotonic() - t0)

    s = MeasurementScheduler(run, max_concurrent=50)
    s.start()
    s.sync({f"vm{i}": Schedule(60.0, 1.0) for i in range(40)})
    await until(lambda: len(started) == 40, 10, "every first run")
    await s.shutdown(grace_seconds=1.0)
    assert len(started) == 40
    assert max(started) - min(started) > 0.5  # not all at once: spread over the 1 s jitter
    assert max(started) < 1.5  # and all within it (plus scheduling slack)


async def test_a_dear_measurement_takes_more_of_the_limit() -> None:
    """max_concurrent 4: a target worth 4 (a large guest with many sampled pages per run) runs alone,
    one worth 2 beside at most two cheap ones, and a cost above the limit still runs (alone)."""
    cost = {"big": 4, "huge": 40, "mid": 2} | {f"vm{i}": 1 for i in range(6)}
    running: dict[str, int] = {}
    overlaps: list[dict[str, int]] = []
    finished = 0

    async def run(name: str) -> None:
        nonlocal finished
        running[name] = cost[name]
        overlaps.append(dict(running))
        await asyncio.sleep(0.1)
        del running[name]
        finished += 1

    s = MeasurementScheduler(run, max_concurrent=4, cost=cost.__getitem__)
    s.start()
    s.sync({name: Schedule(60.0, 0.0) for name in cost})
    await until(lambda: finished == len(cost), 10, "every target measured once")
    await s.shutdown(grace_seconds=1.0)
    assert all(sum(min(w, 4) for w in seen.values()) <= 4 for seen in overlaps), overlaps
    assert all(len(seen) == 1 for seen in overlaps if "big" in seen or "huge" in seen), overlaps
    assert max(len(seen) for seen in overlaps) == 4  # the cheap ones still run four at once
