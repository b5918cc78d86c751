"""Pytest fixtures for real-QEMU tests (the rig). Import them from tests/conftest.py.

Assets are resolved inside the test body, not in a fixture, so a missing QEMU or kernel makes the test
FAIL with the RigError's install hint (a fixture error would read as a setup problem).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from migpredictd.lab.rig.guest import Guest, GuestSpec

StartGuest = Callable[..., Guest]


@pytest.fixture
def rig_guest_factory() -> Iterator[StartGuest]:
    """`start(spec, **guest_kwargs) -> Guest`: a started guest, killed by PID at teardown."""
    started: list[Guest] = []

    def start(spec: GuestSpec, **kwargs: Any) -> Guest:
        guest = Guest(spec, **kwargs)
        started.append(guest)  # registered before start so a half-started guest is also stopped
        return guest.start()

    yield start
    for guest in reversed(started):
        guest.stop()
