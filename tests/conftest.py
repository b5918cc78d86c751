"""Shared fixtures, and the rule that a real part never silently drops out of CI.

Real-QEMU tests fail (never skip) when the rig is missing; on top of that, under CI any skipped test
marked ``qemu`` or ``prometheus`` turns the run red, so "skipped" can never pass for "done".
"""

from __future__ import annotations

import os

import pytest

from tests.rig_fixtures import rig_guest_factory  # noqa: F401  (fixture)

_REAL_PARTS = ("qemu", "prometheus")
_skipped_real: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and any(item.get_closest_marker(m) for m in _REAL_PARTS):
        _skipped_real.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_real and os.environ.get("CI"):
        print(f"\nreal-part tests skipped under CI (not allowed): {', '.join(_skipped_real)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
