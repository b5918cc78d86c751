"""A 64 GiB guest, for real (QEMU 10.0, TCG, RAM not reserved): the measurement's cost stays bounded and
the prediction holds against a real loopback migration.

The guest is idle with 256 MiB touched; its untouched RAM maps the host's shared zero page and the
guest kernel's page structures (1/64 of RAM) are real pages. benchmarks/largeguest.py has the cost
curve up to 256 GiB and the zero-page scan times (docs/measuring.md, "Large guests").
"""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.accuracy import predict_cell
from benchmarks.largeguest import measured_with_cost
from migpredictd.core.calibration import limiter_for
from migpredictd.lab.loopback import loopback_predictor
from migpredictd.lab.rig.guest import Guest, GuestSpec, free_tcp_port
from migpredictd.lab.rig.migration import migrate
from migpredictd.qemu.hostscan import probe
from migpredictd.qemu.settings import DEFAULT_PERIODS_MS, MeasureSettings
from migpredictd.qemu.zeropages import guest_sample_estimate

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
SPEC = GuestSpec(qemu="10.0", memory_mib=64 * 1024, touch_mib=256, wss_mib=0, rate_mib=0)
BANDWIDTH = 125_000_000  # bytes/s
# The targets at 256 GiB, held here at 64 GiB: QEMU CPU and wall time of one measurement.
MAX_QEMU_CPU_S = 2.0
MAX_WALL_S = 25.0
# The migration thread's reading of zero pages is modelled (docs/measuring.md, "Zero pages at size"):
# this guest read -5.0% alone on the machine; the bound leaves room for CI's other real-QEMU work on
# the same two cores, which slows the thread (before the model: -9.0% alone, -15.5% beside two others).
MAX_ERROR = 0.12


@pytest.mark.timeout(420)
def test_a_64_gib_guest_is_measured_cheaply_and_predicted_against_a_real_migration() -> None:
    port = free_tcp_port()
    with Guest(SPEC) as source, Guest(SPEC, incoming=f"tcp:127.0.0.1:{port}") as destination:
        m, qemu_cpu, wall = measured_with_cost(source, MeasureSettings(zero_pages="none"), quiet_seconds=3.0)
        assert m.sample_pages_per_gib == 2048  # 131072 pages per run
        assert qemu_cpu <= MAX_QEMU_CPU_S, qemu_cpu
        assert wall <= MAX_WALL_S, wall
        assert [p.period_ms for p in m.points] == list(DEFAULT_PERIODS_MS["sweep-ms"])  # no stretched window
        zero = guest_sample_estimate(source.pid, memory_bytes=m.memory_bytes)
        host = probe()
        measured = dataclasses.replace(
            m,
            zero_pages=zero.zero_pages,
            zero_profile=zero.profile,
            zero_allocated_pages=zero.allocated_zero_pages,
            host_shared_zero_read_seconds=host.shared_zero_seconds,
            host_allocated_read_seconds=host.allocated_seconds,
        )
        limiter = limiter_for(measured)
        predicted = predict_cell(measured, BANDWIDTH, 0.3, loopback_predictor(BANDWIDTH, limiter), limiter)
        result = migrate(
            source,
            destination,
            max_bandwidth_bytes_per_second=BANDWIDTH,
            downtime_limit_ms=300,
            cutoff_s=120.0,
        )
    assert result.converged
    assert result.total_time_ms is not None
    assert predicted["converges"]
    real_s = result.total_time_ms / 1000.0
    error = (predicted["seconds"] - real_s) / real_s
    print(f"64 GiB: predicted {predicted['seconds']:.2f} s, real {real_s:.2f} s ({error:+.1%})")
    assert abs(error) <= MAX_ERROR, (
        f"predicted {predicted['seconds']:.2f} s, real {real_s:.2f} s ({error:+.1%})"
    )
