"""What measuring a large guest costs QEMU, and how fast QEMU's migration thread gets through zero pages.

    python benchmarks/largeguest.py cost            # sizes x QEMU generations: QEMU CPU, wall, windows
    python benchmarks/largeguest.py scan            # real loopback migrations of mostly-zero guests

``cost``: an idle guest of each size (untouched RAM maps the host's shared zero page; the guest kernel's
page structures, 1/64 of RAM, are real pages) measured by ``migpredictd measure``'s code path with the
default (per-guest) sample-pages and with a fixed count for comparison. QEMU CPU is the QEMU process's
utime + stime over the measurement minus the same process's CPU over as long a quiet stretch before it
(the idle guest's own vCPU and timers).

``scan``: each guest migrated on loopback at a bandwidth limit, with its zero pages either untouched
(the shared zero page) or allocated and re-zeroed by the dirtier (``zeroed_mib``, as in a long-running
VM). The printed "scan" is the migration's time beyond what its bytes take at the limit, per zero page
(``ram.duplicate``): what the migration thread spends finding each zero page.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, Final

from benchmarks.soak import cpu_seconds
from migpredictd.core.measurement import Measurement
from migpredictd.lab.rig.guest import Guest, GuestSpec, free_tcp_port
from migpredictd.lab.rig.migration import migrate
from migpredictd.qemu.measure import measure
from migpredictd.qemu.settings import MeasureSettings

GIB: Final = 1024


def measured_with_cost(
    guest: Guest, settings: MeasureSettings, *, quiet_seconds: float = 5.0
) -> tuple[Measurement, float, float]:
    """Measure ``guest``; with the QEMU CPU seconds the measurement cost (the process's CPU over it minus
    its idle rate over ``quiet_seconds`` before) and the wall seconds it took."""
    quiet_start, quiet_cpu = time.monotonic(), cpu_seconds(guest.pid)
    time.sleep(quiet_seconds)
    idle_rate = (cpu_seconds(guest.pid) - quiet_cpu) / (time.monotonic() - quiet_start)
    t0, c0 = time.monotonic(), cpu_seconds(guest.pid)
    m = asyncio.run(measure(guest.qmp_address, target="large", settings=settings))
    wall = time.monotonic() - t0
    return m, cpu_seconds(guest.pid) - c0 - idle_rate * wall, wall


def measure_cost(guest: Guest, settings: MeasureSettings) -> dict[str, Any]:
    m, cpu, wall = measured_with_cost(guest, settings)
    requested = settings.periods_ms or ()
    return {
        "wall_s": round(wall, 2),
        "qemu_cpu_s": round(cpu, 2),
        "sample_pages_per_gib": m.sample_pages_per_gib,
        "strategy": m.strategy,
        "periods_ms": [p.period_ms for p in m.points],
        "requested_ms": list(requested),
        "notes": list(m.notes),
    }


def cost(sizes: Sequence[int], generations: Sequence[str], fixed: int | None) -> list[dict[str, Any]]:
    rows = []
    for qemu in generations:
        for gib in sizes:
            spec = GuestSpec(qemu=qemu, memory_mib=gib * GIB, touch_mib=64, wss_mib=0, rate_mib=0)  # type: ignore[arg-type]
            with Guest(spec) as guest:
                for per_gib in (None, fixed) if fixed else (None,):
                    row = {"qemu": qemu, "gib": gib, "asked_sample_pages": per_gib or "auto"}
                    row |= measure_cost(guest, MeasureSettings(sample_pages=per_gib, zero_pages="none"))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def scan(cases: Sequence[tuple[str, int, int, int]]) -> list[dict[str, Any]]:
    """(qemu, GiB, zeroed MiB, bandwidth MB/s) -> one real migration each."""
    rows = []
    for qemu, gib, zeroed, mbs in cases:
        spec = GuestSpec(
            qemu=qemu,  # type: ignore[arg-type]
            memory_mib=gib * GIB, touch_mib=256, wss_mib=0, rate_mib=0, zeroed_mib=zeroed,
        )  # fmt: skip
        port = free_tcp_port()
        with Guest(spec) as source, Guest(spec, incoming=f"tcp:127.0.0.1:{port}") as dest:
            result = migrate(source, dest, max_bandwidth_bytes_per_second=mbs * 1_000_000,
                             downtime_limit_ms=300, cutoff_s=600.0)  # fmt: skip
        ram = result.ram
        total_s = (result.total_time_ms or 0) / 1000.0
        wire = float(ram.transferred_bytes) if ram else 0.0
        zeros = float(ram.zero_pages) if ram else 0.0
        excess = total_s - wire / (mbs * 1_000_000)
        row = {
            "qemu": qemu, "gib": gib, "zeroed_mib": zeroed, "mb_per_s": mbs, "status": result.status,
            "total_s": total_s, "transferred_bytes": wire, "zero_pages": zeros,
            "normal_pages": ram.normal_pages if ram else None, "mbps": ram.mbps if ram else None,
            "scan_us_per_zero_page": round(1e6 * excess / zeros, 4) if zeros else None,
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--sizes", default="1,16,64,256", help="GiB, comma-separated")
    c.add_argument("--qemu", default="10.0,7.2")
    c.add_argument("--fixed", type=int, default=None, help="also measure with this sample-pages per GiB")
    s = sub.add_parser("scan")
    s.add_argument("--cases", default="10.0:16:0:125,10.0:16:8192:125,7.2:16:0:125,7.2:16:8192:125",
                   help="qemu:GiB:zeroed MiB:MB/s, comma-separated")  # fmt: skip
    args = ap.parse_args(argv)
    if args.what == "cost":
        cost([int(x) for x in args.sizes.split(",")], args.qemu.split(","), args.fixed)
    else:
        cases = []
        for item in args.cases.split(","):
            q, g, z, b = item.split(":")
            cases.append((q, int(g), int(z), int(b)))
        scan(cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
