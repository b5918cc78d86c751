"""The daemon's log line when a target's zero-page method changes: which method, and why."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from migpredictd.core.measurement import DirtyPoint, Measurement
from migpredictd.serve.daemon import _log_zero_page_method


def measured(method: str, notes: tuple[str, ...] = ()) -> Measurement:
    return Measurement(
        page_size_bytes=4096,
        total_pages=65536,
        points=(DirtyPoint(1000.0, 100.0),),
        zero_pages=None if method == "none" else 1000.0,
        zero_pages_method=method,
        strategy="sweep-ms",
        notes=notes,
    )


def test_a_degraded_method_is_a_warning_with_every_reason(caplog: pytest.LogCaptureFixture) -> None:
    why = (
        "zero pages: guest-sample unavailable: cannot read /proc/7/smaps: Permission denied",
        "zero pages: helper unavailable: no zero-page helper at /run/migpredictd/zeropages.sock",
        "dirty rate: something else",
    )
    with caplog.at_level(logging.INFO, logger="migpredictd"):
        _log_zero_page_method("vm1", measured("host-status", why), None)
    [rec] = caplog.records
    assert rec.levelno == logging.WARNING
    assert rec.getMessage().startswith("zero pages by host-status (degraded: predictions err long): ")
    assert "Permission denied" in rec.getMessage()
    assert "no zero-page helper at /run/migpredictd/zeropages.sock" in rec.getMessage()
    assert "something else" not in rec.getMessage()
    assert rec.target == "vm1"  # type: ignore[attr-defined]


def test_one_line_per_change_not_per_measurement(caplog: pytest.LogCaptureFixture) -> None:
    old = measured("host-status")
    with caplog.at_level(logging.INFO, logger="migpredictd"):
        _log_zero_page_method("vm1", dataclasses.replace(old), old)  # same method again: nothing
        assert caplog.records == []
        _log_zero_page_method(
            "vm1", measured("guest-sample", ("zero pages: guest-sample by the helper",)), old
        )
    [rec] = caplog.records
    assert rec.levelno == logging.INFO
    assert rec.getMessage() == "zero pages by guest-sample"
    assert rec.why == "zero pages: guest-sample by the helper"  # type: ignore[attr-defined]
