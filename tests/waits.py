"""Waits on conditions instead of fixed sleeps: poll a predicate often, give up only at a generous deadline.

A fixed ``sleep(N)`` costs N seconds on every run and is still too short on a loaded machine; polling
returns as soon as the condition holds and fails, naming what was awaited, only after ``timeout``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str = "condition",
    detail: Callable[[], str] | None = None,
    *,
    interval: float = 0.05,
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something truthy; return that.

    :raises AssertionError: naming ``what`` and the last value (or ``detail()``), if ``timeout`` s pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            said = detail() if detail is not None else f"last: {result!r}"
            raise AssertionError(f"{what}: not within {timeout:g} s ({said})")
        time.sleep(interval)


async def until(
    predicate: Callable[[], T], within: float, what: str = "condition", *, interval: float = 0.01
) -> T:
    """:func:`wait_until` for code on an event loop (``within`` is its timeout, in seconds): sleeps with
    ``asyncio.sleep`` so that the loop, and whatever the predicate watches, keeps running."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:g} s (last: {result!r})")
        await asyncio.sleep(interval)
