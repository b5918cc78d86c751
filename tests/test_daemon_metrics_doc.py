"""Every family a running daemon exposes is documented in the README, and the event-loop histogram counts."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_helpers import DaemonProcess, free_port, http, wait_for

pytestmark = pytest.mark.timeout(60)

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_exposed_family_is_in_the_readme(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("targets: []\n")
    port = free_port()
    daemon = DaemonProcess(config, port)
    try:
        # A few lag checks (4 a second) must have landed in the histogram.
        wait_for(port, lambda s: (s.get(("migpredictd_event_loop_delay_seconds_count", ())) or 0) >= 4, 20)
        status, body = http(port, "/metrics")
        assert status == 200
    finally:
        daemon.stop()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    ours = sorted(n for n in families if n.startswith("migpredictd_"))
    readme = README.read_text()
    assert [n for n in ours if f"`{n}`" not in readme and f"`{n}_total`" not in readme] == []
    assert "migpredictd_event_loop_delay_seconds" in ours

    delay = families["migpredictd_event_loop_delay_seconds"]
    assert delay.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in delay.samples if s.name.endswith("_bucket")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative
    assert buckets[-1][0] == "+Inf"
    count = next(s.value for s in delay.samples if s.name.endswith("_count"))
    assert buckets[-1][1] == count >= 4
    # An idle daemon's loop answers within a quarter of a second (the 0.25 s bucket holds every check).
    assert dict(buckets)["0.25"] == count
