"""migpredictd.qemu.measure against the fake QMP fleet: strategy per QEMU version, guards, typed skips.

The fake samples a known dirtying function (``FakeVM.true_dirty_pages``) on a clock 100x faster than
wall time; ``measure`` gets a matching ``sleep`` so a sweep takes milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from migpredictd.core.errors import (
    InputError,
    QMPCommandError,
    QMPConnectError,
    QMPProtocolError,
    QMPTimeoutError,
    TargetSkipped,
    ZeroPagesUnavailableError,
)
from migpredictd.lab.fakeqmp import FakeQMPFleet, FakeVM, Fault, FaultParams
from migpredictd.qemu.measure import (
    add_measure_arguments,
    as_requested,
    measure,
    measure_command,
    plan_runs,
)
from migpredictd.qemu.qmp import QMPSession
from migpredictd.qemu.settings import DEFAULT_PERIODS_MS, MeasureSettings
from migpredictd.qemu.zeropages import (
    find_guest_ram,
    read_smaps,
    smaps_estimate,
)

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
SCALE = 0.01
V72: tuple[int, int, int] = (7, 2, 22)
V82: tuple[int, int, int] = (8, 2, 0)
V10: tuple[int, int, int] = (10, 0, 2)


async def scaled_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds * SCALE)


@pytest.fixture
async def fleet() -> AsyncIterator[FakeQMPFleet]:
    f = FakeQMPFleet(time_scale=SCALE)
    async with f:
        yield f


def calc_requests(ep: Any) -> list[dict[str, Any]]:
    return [r.get("arguments", {}) for r in ep.requests if r.get("execute") == "calc-dirty-rate"]


FAST = MeasureSettings(connect_timeout=2.0, command_timeout=2.0, zero_pages="none", settle_timeout=2.0)


# --- capabilities from the version ----------------------------------------------------------------------


@pytest.mark.parametrize(("version", "strategy"), [(V72, "sweep-s"), (V82, "sweep-ms"), (V10, "sweep-ms")])
async def test_the_version_alone_decides_and_no_schema_is_fetched(
    fleet: FakeQMPFleet, version: tuple[int, int, int], strategy: str
) -> None:
    ep = await fleet.spawn("vm", FakeVM(version=version, noise=False))
    settings = MeasureSettings(periods_ms=(1000.0,), zero_pages="none", connect_timeout=2.0)
    m = await measure(ep.address, target="vm", settings=settings, sleep=scaled_sleep)
    assert m.strategy == strategy
    # A quarter of a megabyte per VM on the daemon's loop, for what the version says already.
    assert "query-qmp-schema" not in ep.commands


async def test_a_qemu_older_than_5_1_has_no_calc_dirty_rate(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("old", FakeVM(version=(5, 0, 1)))
    with pytest.raises(QMPCommandError, match=r"5\.1\+ needed") as info:
        await measure(ep.address, target="old", settings=FAST, sleep=scaled_sleep)
    assert info.value.command == "calc-dirty-rate"
    assert "calc-dirty-rate" not in ep.commands


# --- strategy per generation ------------------------------------------------------------------------


async def test_qemu_7_2_uses_second_sweep(fleet: FakeQMPFleet) -> None:
    vm = FakeVM(version=V72, noise=False, working_set_bytes=64 * MIB, dirty_bytes_per_second=20 * MIB)
    ep = await fleet.spawn("vm72", vm)
    m = await measure(ep.address, target="vm72", settings=FAST, sleep=scaled_sleep)
    assert m.strategy == "sweep-s"
    assert m.qemu_version == "7.2.22"
    assert [p.period_ms for p in m.points] == [1000.0, 2000.0, 4000.0, 8000.0]
    sent = calc_requests(ep)
    assert [a["calc-time"] for a in sent] == [1, 2, 4, 8]
    assert all("calc-time-unit" not in a for a in sent)  # 7.2 refuses it
    assert all(a["mode"] == "page-sampling" and a["sample-pages"] == 16384 for a in sent)
    # min(64 MiB, 20 MiB/s x t), within QEMU's whole-MiB/s truncation (+0.5 MiB/s correction).
    truth = [vm.true_dirty_pages(t) for t in (1, 2, 4, 8)]
    for point, want, t in zip(m.points, truth, (1, 2, 4, 8), strict=True):
        assert abs(point.dirty_pages - want) <= 0.5 * MIB * t / 4096 + 1, (point, want)
    assert m.memory_bytes == vm.memory_bytes
    assert m.sample_pages_per_gib == 16384


@pytest.mark.parametrize("version", [V82, V10])
async def test_qemu_8_2_and_later_use_millisecond_sweep(
    fleet: FakeQMPFleet, version: tuple[int, int, int]
) -> None:
    ep = await fleet.spawn("vm", FakeVM(version=version, noise=False))
    m = await measure(ep.address, target="vm", settings=FAST, sleep=scaled_sleep)
    assert m.strategy == "sweep-ms"
    assert [p.period_ms for p in m.points] == list(DEFAULT_PERIODS_MS["sweep-ms"])
    sent = calc_requests(ep)
    assert [a["calc-time"] for a in sent] == [125, 250, 500, 1000, 2000, 4000, 8000]
    assert all(a["calc-time-unit"] == "millisecond" for a in sent)


async def test_extended_output_when_offered(fleet: FakeQMPFleet) -> None:
    # No real QEMU has this output: the 2023 series was never merged. Only the fake offers it.
    vm = FakeVM(version=V72, extended_output=True, noise=False, zero_bytes=384 * MIB)
    ep = await fleet.spawn("ext", vm)
    m = await measure(ep.address, target="ext", settings=FAST, sleep=scaled_sleep)
    assert m.strategy == "extended"
    assert m.zero_pages_method == "qemu-sampled"
    assert m.zero_pages == pytest.approx(384 * MIB / 4096, rel=0.01)
    # Recognised by the first run's reply (no version announces it); one 8 s run then reports every period.
    assert [a["calc-time"] for a in calc_requests(ep)] == [1, 8]
    assert m.points[-1].period_ms == 8000.0
    assert len(m.points) > 5


async def test_explicit_strategy_the_qemu_lacks(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("vm72", FakeVM(version=V72))
    with pytest.raises(QMPCommandError, match="calc-time-unit") as info:
        await measure(ep.address, target="vm72", settings=MeasureSettings(strategy="sweep-ms"))
    assert "calc-dirty-rate" not in ep.commands
    assert info.value.error_class == "Unsupported"


async def test_sweep_s_on_new_qemu_and_custom_periods(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("vm", FakeVM(version=V10))
    settings = MeasureSettings(strategy="sweep-s", periods_ms=(1000.0, 3000.0), zero_pages="none")
    m = await measure(ep.address, target="vm", settings=settings, sleep=scaled_sleep)
    assert m.strategy == "sweep-s"
    assert [a["calc-time"] for a in calc_requests(ep)] == [1, 3]
    assert [p.period_ms for p in m.points] == [1000.0, 3000.0]


def test_plan_runs() -> None:
    assert plan_runs("sweep-s", None) == [1000.0, 2000.0, 4000.0, 8000.0]
    assert plan_runs("sweep-s", (500.0, 1500.0)) == [1000.0, 2000.0]
    assert plan_runs("extended", (125.0, 4500.0)) == [5000.0]
    with pytest.raises(InputError, match="same second"):
        plan_runs("sweep-s", (1200.0, 1800.0))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"strategy": "dirty-ring"}, "strategy"),
        ({"zero_pages": "xp"}, "zero_pages"),
        ({"sample_pages": 100}, "sample_pages"),
        ({"periods_ms": (250.0, 125.0)}, "periods_ms[1]"),
        ({"periods_ms": (10.0,)}, "periods_ms[0]"),
        ({"command_timeout": 0}, "command_timeout"),
    ],
)
def test_settings_are_validated(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InputError) as info:
        MeasureSettings(**changes)
    assert info.value.field == field


# --- the dangerous modes are never sent ----------------------------------------------------------------


async def test_only_page_sampling_is_ever_sent_even_with_kvm(fleet: FakeQMPFleet) -> None:
    # dirty-bitmap/dirty-ring SIGSEGV QEMU 7.2 without KVM (the fake crashes too); with KVM they would
    # be allowed by QEMU, but we never need them.
    for name, kvm in (("nokvm", False), ("kvm", True)):
        ep = await fleet.spawn(name, FakeVM(version=V72, kvm_enabled=kvm))
        await measure(ep.address, target=name, settings=FAST, sleep=scaled_sleep)
        assert {a["mode"] for a in calc_requests(ep)} == {"page-sampling"}
        assert not ep.crashed


# --- guards: skip, do not measure ----------------------------------------------------------------------


async def test_migrating_vm_is_skipped_before_any_calc(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("mig", faults=Fault.MIGRATING)
    with pytest.raises(TargetSkipped) as info:
        await measure(ep.address, target="mig", settings=FAST, sleep=scaled_sleep)
    assert info.value.reason == "migrating"
    assert info.value.command == "query-migrate"
    assert "calc-dirty-rate" not in ep.commands


async def test_completed_migration_does_not_block(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("done", FakeVM(migration={"status": "completed"}))
    m = await measure(ep.address, target="done", settings=FAST, sleep=scaled_sleep)
    assert m.strategy == "sweep-s"


async def test_paused_vm_is_skipped(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("paused", faults=Fault.PAUSED)
    with pytest.raises(TargetSkipped) as info:
        await measure(ep.address, target="paused", settings=FAST, sleep=scaled_sleep)
    assert info.value.reason == "not_running"
    assert "calc-dirty-rate" not in ep.commands


async def test_busy_measurement_is_a_skip_and_monitor_is_left_free(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("busy", faults=Fault.MEASURING_FOREVER)
    settings = MeasureSettings(zero_pages="none", settle_timeout=0.3, command_timeout=1.0)
    started = time.monotonic()
    # First: our own run never finishes -> a timeout naming query-dirty-rate, within settle_timeout.
    with pytest.raises(QMPTimeoutError) as first:
        await measure(ep.address, target="busy", settings=settings, sleep=scaled_sleep)
    assert first.value.command == "query-dirty-rate"
    assert time.monotonic() - started < 0.3 + 1.0
    # Then: a run is still in progress -> "busy", retry later, and no second calc-dirty-rate is sent.
    with pytest.raises(TargetSkipped) as second:
        await measure(ep.address, target="busy", settings=settings, sleep=scaled_sleep)
    assert second.value.reason == "busy"
    assert ep.commands.count("calc-dirty-rate") == 1
    async with QMPSession.connect(ep.address, target="probe", timeout=1.0) as s:
        assert (await s.execute_dict("query-status"))["running"] is True


async def test_already_being_measured_error_is_busy(fleet: FakeQMPFleet) -> None:
    params = FaultParams(command="calc-dirty-rate", error_desc="the dirty rate is already being measured.")
    ep = await fleet.spawn("race", faults=Fault.COMMAND_ERROR, params=params)
    with pytest.raises(TargetSkipped) as info:
        await measure(ep.address, target="race", settings=FAST, sleep=scaled_sleep)
    assert info.value.reason == "busy"
    assert info.value.command == "calc-dirty-rate"


async def test_other_qemu_error_is_not_busy(fleet: FakeQMPFleet) -> None:
    params = FaultParams(command="calc-dirty-rate", error_desc="out of memory")
    ep = await fleet.spawn("err", faults=Fault.COMMAND_ERROR, params=params)
    with pytest.raises(QMPCommandError) as info:
        await measure(ep.address, target="err", settings=FAST, sleep=scaled_sleep)
    assert not isinstance(info.value, TargetSkipped)


async def test_monitor_released_while_qemu_samples(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("polite", FakeVM(version=V10))
    others: list[str] = []

    async def sleep_and_intrude(seconds: float) -> None:
        if seconds >= 0.1:  # a calc-time wait, not a poll: another tool uses the monitor meanwhile
            async with QMPSession.connect(ep.address, target="other", timeout=0.5) as s:
                others.append((await s.execute_dict("query-status"))["status"])
        await scaled_sleep(seconds)

    await measure(ep.address, target="polite", settings=FAST, sleep=sleep_and_intrude)
    assert others == ["running"] * len(DEFAULT_PERIODS_MS["sweep-ms"])
    assert ep.max_concurrent == 1


# --- connection failures -----------------------------------------------------------------------------


async def test_refused_connection(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("dead", faults=Fault.REFUSE_CONNECT)
    with pytest.raises(QMPConnectError) as info:
        await measure(ep.address, target="dead", settings=FAST)
    assert info.value.target == "dead"


async def test_hung_monitor_times_out_within_the_timeout(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn(
        "hung", faults=Fault.SLOW, params=FaultParams(command="query-version", delay_seconds=1)
    )
    settings = MeasureSettings(connect_timeout=0.3, command_timeout=0.3, zero_pages="none")
    started = time.monotonic()
    with pytest.raises(QMPTimeoutError) as info:
        await measure(ep.address, target="hung", settings=settings)
    assert time.monotonic() - started < 1.0
    assert info.value.command == "query-version"
    # The fake finishes its slow reply to nobody (1 s after the command); then a probe is greeted, which
    # it would not be if the measurement still held the monitor. Its connect timeout covers the wait.
    async with QMPSession.connect(ep.address, target="probe", timeout=1.0 + 1.0) as s:
        await s.execute("query-status")


# --- bad values at the edge ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "command"),
    [
        (Fault.NEGATIVE_DIRTY_RATE, "query-dirty-rate"),
        (Fault.ZERO_MEMORY, "query-memory-size-summary"),
        (Fault.HUGE_MEMORY, "query-memory-size-summary"),
    ],
)
async def test_absurd_values_are_protocol_errors(fleet: FakeQMPFleet, fault: Fault, command: str) -> None:
    ep = await fleet.spawn("bad", faults=fault)
    with pytest.raises(QMPProtocolError) as info:
        await measure(ep.address, target="bad", settings=FAST, sleep=scaled_sleep)
    assert info.value.command == command


# --- zero pages -------------------------------------------------------------------------------------------


async def test_zero_pages_unknown_over_tcp_with_a_note() -> None:
    f = FakeQMPFleet(transport="tcp", time_scale=SCALE)
    ep = f.add("tcp", FakeVM(version=V10))
    async with f:
        settings = MeasureSettings(zero_pages="auto", periods_ms=(250.0,))
        m = await measure(ep.address, target="tcp", settings=settings, sleep=scaled_sleep)
    assert m.zero_pages is None
    assert m.zero_pages_method == "none"
    assert any("unix socket" in n for n in m.notes)


async def test_zero_pages_none_is_silent(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("vm", FakeVM(version=V10))
    settings = MeasureSettings(zero_pages="none", periods_ms=(250.0,))
    m = await measure(ep.address, target="vm", settings=settings, sleep=scaled_sleep)
    assert (m.zero_pages, m.zero_pages_method, m.notes) == (None, "none", ())


async def test_zero_pages_when_peer_is_not_qemu(fleet: FakeQMPFleet) -> None:
    # The fake runs inside pytest: the PID is ours and has no 64 GiB guest-RAM mapping.
    ep = await fleet.spawn("vm", FakeVM(version=V10, memory_bytes=64 << 30))
    settings = MeasureSettings(zero_pages="host-smaps", periods_ms=(250.0,))
    m = await measure(ep.address, target="vm", settings=settings, sleep=scaled_sleep)
    assert m.zero_pages is None
    assert any("no anonymous rw mapping" in n for n in m.notes)


SMAPS = """\
55d0c0000000-55d0c0100000 r-xp 00000000 08:01 123 /usr/bin/qemu-system-x86_64
Rss:                 800 kB
Swap:                  0 kB
7f0000000000-7f0040000000 rwxp 00000000 00:00 0
Rss:               43008 kB
Swap:                  0 kB
7f0100000000-7f0108000000 rw-p 00000000 00:00 0
Rss:               40960 kB
Swap:               4096 kB
7f0108000000-7f0110000000 rw-p 00000000 00:00 0
Rss:               20480 kB
Swap:                  0 kB
7f0110000000-7f0110001000 ---p 00000000 00:00 0
Rss:                   0 kB
"""


def test_smaps_finds_guest_ram_not_the_tcg_buffer(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "smaps").write_text(SMAPS)
    regions = read_smaps(4242, proc=tmp_path)
    ram = find_guest_ram(regions, 256 * MIB)
    # Two adjacent rw VMAs of 128 MiB each are one 256 MiB region; the 1 GiB rwx one is TCG's code.
    assert (ram.start, ram.size) == (0x7F0100000000, 256 * MIB)
    est = smaps_estimate(4242, memory_bytes=256 * MIB, proc=tmp_path)
    resident = (40960 + 4096 + 20480) * 1024
    assert est.zero_pages == (256 * MIB - resident) / 4096
    assert est.method == "host-smaps"
    with pytest.raises(ZeroPagesUnavailableError):
        smaps_estimate(4242, memory_bytes=2048 * MIB, proc=tmp_path)
    with pytest.raises(ZeroPagesUnavailableError):
        smaps_estimate(999999, memory_bytes=256 * MIB, proc=tmp_path)


# --- CLI ---------------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_measure_arguments(parser)
    return parser.parse_args(argv)


def test_cli_prints_canonical_json(capsys: pytest.CaptureFixture[str]) -> None:
    f = FakeQMPFleet()  # real time: short periods keep it fast
    ep = f.add("cli", FakeVM(version=V10, noise=False))
    with f.run_in_thread():
        args = _cli([f"unix:{ep.address}", "--periods", "50,100", "--zero-pages", "none", "--target", "vm1"])
        assert measure_command(args) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["format"] == "migpredictd.measurement/v1"
    assert doc["target"] == "vm1"
    assert [p["period_ms"] for p in doc["points"]] == [50.0, 100.0]
    assert doc["strategy"] == "sweep-ms"
    assert "calc-dirty-rate 50 ms" in err


def test_cli_error_is_one_line_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert measure_command(_cli([f"unix:{tmp_path}/none.sock", "--timeout", "1"])) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("migpredictd measure: target unix:")
    assert measure_command(_cli(["unix:/x", "--sample-pages", "5"])) == 1
    assert "sample_pages" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("window", "label_period"),
    [(1000, 1000), (1001, 1000), (1003, 1000), (1025, 1000), (1026, 1026), (3000, 3000)],
)
def test_a_window_overshot_by_timing_noise_counts_as_the_period_asked(window: int, label_period: int) -> None:
    reply = {"status": "measured", "dirty-rate": 12, "calc-time": window, "calc-time-unit": "millisecond"}
    assert as_requested(reply, 1000.0)["calc-time"] == label_period
    seconds = {"status": "measured", "dirty-rate": 12, "calc-time": 1}  # 7.2: whole seconds, never touched
    assert as_requested(seconds, 1000.0) is seconds


# --- sample-pages per guest --------------------------------------------------------------------------


async def test_sample_pages_follow_the_guest_size(fleet: FakeQMPFleet) -> None:
    """131072 pages per run on 8.2+, 65536 before, within QEMU's 128..16384 per GiB."""
    for version, gib, per_gib in [
        (V10, 1, 16384),
        (V10, 64, 2048),
        (V10, 256, 512),
        (V72, 16, 4096),
        (V10, 2048, 128),
    ]:
        ep = await fleet.spawn(
            f"vm{gib}-{version[0]}", FakeVM(version=version, memory_bytes=gib << 30, noise=False)
        )
        m = await measure(ep.address, target="vm", settings=FAST, sleep=scaled_sleep)
        assert m.sample_pages_per_gib == per_gib
        assert {a["sample-pages"] for a in calc_requests(ep)} == {per_gib}
    # a number in the settings is used as given, whatever the size
    ep = await fleet.spawn("fixed", FakeVM(version=V10, memory_bytes=256 << 30, noise=False))
    m = await measure(
        ep.address, target="vm", settings=dataclasses.replace(FAST, sample_pages=16384), sleep=scaled_sleep
    )
    assert {a["sample-pages"] for a in calc_requests(ep)} == {16384}


async def test_a_window_stretched_by_the_hash_pass_is_measured_again_with_fewer_pages(
    fleet: FakeQMPFleet,
) -> None:
    """A sparse 256 GiB guest: each sampled page costs the first pass 2.5 us (a page fault), so 131072
    pages take 327 ms and stretch the 250 and 125 ms windows. A large guest runs its longest window
    first; the first stretched run shows the cost, that period is measured again with the pages that
    fit in 80% of it, and shorter periods get no more than fit theirs."""
    vm = FakeVM(version=V10, memory_bytes=256 << 30, noise=False, hash_seconds_per_page=2.5e-6)
    ep = await fleet.spawn("sparse", vm)
    m = await measure(ep.address, target="sparse", settings=FAST, sleep=scaled_sleep)
    assert [p.period_ms for p in m.points] == list(DEFAULT_PERIODS_MS["sweep-ms"])  # no stretched window
    sent = [(a["calc-time"], a["sample-pages"]) for a in calc_requests(ep)]
    # the cost read from the window (327 ms / 131072 pages): 0.8 x 250 ms fits 80166 pages = 313 per GiB,
    # 125 ms 156; 500 ms and longer absorb the 327 ms pass
    assert sent == [
        (8000, 512), (4000, 512), (2000, 512), (1000, 512), (500, 512), (250, 512), (250, 313), (125, 156)
    ]  # fmt: skip
    assert any("the 250 ms window took 327 ms with 512 sample-pages per GiB" in n for n in m.notes), m.notes
    # a small guest keeps the short-first order and 16384 per GiB
    ep = await fleet.spawn("small", FakeVM(version=V10, memory_bytes=1 << 30, noise=False))
    await measure(ep.address, target="small", settings=FAST, sleep=scaled_sleep)
    assert [a["calc-time"] for a in calc_requests(ep)] == [125, 250, 500, 1000, 2000, 4000, 8000]
