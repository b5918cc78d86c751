"""The lab's orchestrator control loops: the arithmetic each product does, checked against the numbers
its own code gives (the loops themselves run against real QEMU in benchmarks/policies.py and
tests/test_policies_qemu.py)."""

from __future__ import annotations

from migpredictd.lab.orchestrators import (
    GIB,
    _round_powerof2,
    kubevirt_completion_seconds,
    nova_downtime_steps,
)

MIB = 1 << 20


def test_nova_downtime_steps_defaults_for_a_4_gib_vm() -> None:
    # downtime 500 ms, 10 steps, 75 s/GiB x 4 GiB = 300 s per step: 50 ms at 0 s, 500 ms at 3000 s
    steps = nova_downtime_steps(4 * GIB, {})
    assert steps[0] == (0, 50)
    assert steps[1] == (300, 95)
    assert steps[-1] == (3000, 500)
    assert len(steps) == 11


def test_nova_downtime_steps_clamp_to_novas_minimums_and_two_gib() -> None:
    # 1 step and 1 s/GiB are below Nova's minimums (3 and 3); a 384 MiB VM counts as 2 GiB
    steps = nova_downtime_steps(
        384 * MIB, {"live_migration_downtime_steps": 1, "live_migration_downtime_delay": 1}
    )
    assert steps == [(0, 166), (6, 277), (12, 388), (18, 500)]


def test_kubevirt_completion_time_counts_decimal_gigabytes_rounded_up() -> None:
    assert kubevirt_completion_seconds(384 * MIB, {"completionTimeoutPerGiB": 10}) == 10
    assert kubevirt_completion_seconds(GIB, {"completionTimeoutPerGiB": 10}) == 20  # 1.07 GB -> 2
    assert kubevirt_completion_seconds(4 * GIB, {}) == 150 * 5  # 4.29 GB -> 5


def test_proxmox_xbzrle_cache_is_the_next_power_of_two() -> None:
    assert _round_powerof2(int(384 * MIB / 10)) == 64 * MIB
    assert _round_powerof2(int(4096 * MIB / 10)) == 512 * MIB
    assert _round_powerof2(1) == 1
