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
    # The markers ride on the report (not its keywords, which also hold parameter ids and folder names):
    # under pytest-xdist (`-n 2`) reports are made in the workers and only reach the controlling
    # process, which decides the exit status, through pytest_runtest_logreport.
    outcome.get_result().real_parts = [m for m in _REAL_PARTS if item.get_closest_marker(m)]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and getattr(report, "real_parts", None):
        _skipped_real.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller does the check
        return
    if _skipped_real and os.environ.get("CI"):
        print(f"\nreal-part tests skipped under CI (not allowed): {', '.join(_skipped_real)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
