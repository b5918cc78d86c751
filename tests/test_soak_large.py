"""The soak's large-guest check (benchmarks/soak.py): how it adds up the cost in flight, that it sees large
guests hashed at once when nothing weighs them, and that the real daemon's scheduler keeps them within
``max_concurrent`` once it knows their cost."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks import soak
from benchmarks.soak import FleetRecorder, Run, peak_in_flight, run_cost
from migpredictd.lab.fakeqmp import FakeQMPFleet, FakeVM, GiB
from migpredictd.qemu.measure import measure
from migpredictd.qemu.settings import SAMPLES_PER_RUN, MeasureSettings


def test_a_run_costs_one_unit_per_131072_pages_per_run_capped_at_the_limit() -> None:
    assert run_cost(0, 16) == 1
    assert run_cost(SAMPLES_PER_RUN, 16) == 1
    assert run_cost(SAMPLES_PER_RUN + 1, 16) == 2
    assert run_cost(256 * 4096, 16) == 8  # 256 GiB pinned at 4096 per GiB
    assert run_cost(256 * 16384, 16) == 16


def test_the_peak_adds_only_windows_open_at_the_same_instant() -> None:
    big = 8 * SAMPLES_PER_RUN
    runs = [
        Run("a", 0.0, 2.0, big, 1),
        Run("b", 1.0, 3.0, big, 1),  # overlaps a: 16
        Run("c", 2.0, 2.5, SAMPLES_PER_RUN, 1),  # starts as a ends: b + c = 9
        Run("d", 2.9, 4.0, SAMPLES_PER_RUN, 1),  # b + d = 9
    ]
    peak = peak_in_flight(runs, lambda r: run_cost(r.pages, 16))
    assert (peak.total, peak.at, peak.runs) == (16, 1.0, 2)
    assert peak_in_flight(runs, lambda _r: 1).total == 2
    assert peak_in_flight(runs[2:], lambda r: run_cost(r.pages, 16)).total == 1
    assert peak_in_flight([], lambda _r: 1).total == 0


async def test_the_recorder_sees_large_guests_hashed_at_once_when_nothing_weighs_them() -> None:
    """Three 256 GiB guests pinned at 4096 per GiB, measured at once without a scheduler: 24 units."""
    fleet = FakeQMPFleet()
    recorder = FleetRecorder(fleet)
    for i in range(3):
        vm = FakeVM(version=soak.V10, package=soak.PKG10, memory_bytes=256 * GiB, hash_seconds_per_page=2e-7)
        recorder.attach(fleet.add(f"big{i}", vm))
    settings = MeasureSettings(periods_ms=(50.0,), sample_pages=4096, zero_pages="none")
    async with fleet:
        await asyncio.gather(
            *(measure(ep.address, target=ep.name, settings=settings) for ep in fleet.endpoints)
        )
    assert [r.pages for r in recorder.runs] == [256 * 4096] * 3
    assert all(r.end - r.start == pytest.approx(256 * 4096 * 2e-7, abs=0.002) for r in recorder.runs)
    assert {name: len(t) for name, t in recorder.attempts.items()} == {"big0": 1, "big1": 1, "big2": 1}
    peak = peak_in_flight(recorder.runs, lambda r: run_cost(r.pages, 16))
    assert (peak.total, peak.runs) == (24, 3)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_daemon_never_hashes_a_large_guest_beside_more_than_the_limit_allows() -> None:
    """The real daemon, 12 s: a 256 GiB guest pinned at 4096 per GiB costs 8 units, all of max_concurrent
    8, so no other window may be open beside its own; its first measurement too, when its size is not
    known yet (a pinned target is charged the whole limit until then)."""
    args = soak.parse_args(
        ["--minutes", "0.2", "--healthy", "4", "--no-hostile", "--large", "2", "--max-concurrent", "8",
         "--sample-seconds", "1", "--reload-seconds", "4"]
    )  # fmt: skip
    s = soak.run(args)
    assert s.rc == 0
    assert [(g.gib, g.sample_pages) for g in s.big] == [(64, None), (256, 4096)]
    pinned = s.big[1].name
    mine = [r for r in s.runs if r.vm == pinned]
    assert len({r.attempt for r in mine}) >= 2, "the pinned guest was measured only once"
    assert {run_cost(r.pages, 8) for r in mine} == {8}
    beside = [o for r in mine for o in s.runs if o.vm != pinned and o.start < r.end and r.start < o.end]
    assert beside == []
    cost = peak_in_flight(s.runs, lambda r: run_cost(r.pages, 8))
    assert cost.total <= 8
    # The default-sampled one (1 unit) is measured again whenever the pinned one, which takes the whole
    # limit, is not hashing: at least twice in 12 s even beside CI's other tests (6 alone).
    assert len(s.attempts[s.big[0].name]) >= 2
