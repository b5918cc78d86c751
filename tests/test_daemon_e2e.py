"""End to end: `migpredictd run` against two real QEMU guests and a dead address, scraped over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from migpredictd.core.predictor import DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES, make_grid
from migpredictd.lab.rig.guest import GuestSpec
from tests.daemon_helpers import DaemonProcess, Samples, free_port, value, wait_for
from tests.rig_fixtures import StartGuest

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
GRID = make_grid(DEFAULT_BANDWIDTHS, DEFAULT_DOWNTIMES)


def test_daemon_measures_real_guests_and_survives_a_dead_target(
    rig_guest_factory: StartGuest, tmp_path: Path
) -> None:
    idle = rig_guest_factory(GuestSpec(qemu="7.2", memory_mib=256, touch_mib=32, wss_mib=0, rate_mib=0))
    busy = rig_guest_factory(GuestSpec(qemu="10.0", memory_mib=256, touch_mib=96, wss_mib=64, rate_mib=32))
    config = tmp_path / "config.yaml"
    config.write_text(
        "global:\n"
        "  interval: 20s\n"
        "  jitter: 1s\n"
        "targets:\n"
        f"  - {{name: idle, qmp: '{idle.qmp_address}', measurement: {{periods: [1s, 2s]}}}}\n"
        f"  - {{name: busy, qmp: '{busy.qmp_address}', measurement: {{periods: [250ms, 500ms, 1s, 2s]}}}}\n"
        f"  - {{name: dead, qmp: 'unix:{tmp_path}/nobody.qmp'}}\n"
    )
    d = DaemonProcess(config, free_port())
    try:

        def all_measured(s: Samples) -> bool:
            return all(value(s, "migpredictd_last_success_timestamp_seconds", vm=v) for v in ("idle", "busy"))

        s = wait_for(d.port, all_measured, timeout=120)
        assert value(s, "migpredictd_up", vm="idle") == 1.0
        assert value(s, "migpredictd_up", vm="busy") == 1.0
        assert value(s, "migpredictd_up", vm="dead") == 0.0
        for vm in ("idle", "busy"):
            for bw in GRID.bandwidth_labels:
                for dt in GRID.downtime_labels:
                    cell = {"vm": vm, "bandwidth": bw, "max_downtime": dt}
                    conv = value(s, "migpredictd_migration_converges", **cell)
                    assert conv in (0.0, 1.0), cell
                    secs = value(s, "migpredictd_predicted_migration_seconds", **cell)
                    assert (secs is not None) == (conv == 1.0), cell
        # 256 MiB at 100 Mbit/s: the idle guest converges, in less than sending all its RAM would take.
        idle_s = value(
            s, "migpredictd_predicted_migration_seconds", vm="idle", bandwidth="100Mbps", max_downtime="unlim"
        )
        assert idle_s is not None
        assert 1.0 < idle_s < 256 * 2**20 * 1.01 / (100 * 2**20 / 8)
        # The busy guest rewrites a 64 MiB working set at 32 MiB/s (268 Mbit/s): at 100 Mbit/s it can
        # never converge with a 125 ms limit; at 40 Gbit/s it does.
        assert (
            value(s, "migpredictd_migration_converges", vm="busy", bandwidth="100Mbps", max_downtime="125ms")
            == 0
        )
        assert (
            value(s, "migpredictd_migration_converges", vm="busy", bandwidth="40Gbps", max_downtime="125ms")
            == 1
        )
        assert value(s, "migpredictd_guest_memory_bytes", vm="busy") == 256 * 2**20
        rate_1s = value(s, "migpredictd_dirty_rate_bytes_per_second", vm="busy", period="1s")
        assert rate_1s is not None
        assert 24 * 2**20 < rate_1s < 40 * 2**20

        first = value(s, "migpredictd_measurement_failures_total", vm="dead", reason="connect") or 0.0
        assert first >= 1.0
        s = wait_for(
            d.port,
            lambda x: (
                (value(x, "migpredictd_measurement_failures_total", vm="dead", reason="connect") or 0) > first
            ),
            timeout=45,
        )
        assert value(s, "migpredictd_up", vm="idle") == 1.0  # still serving; the others unaffected
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.logs()
