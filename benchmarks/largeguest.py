"""What measuring a large guest costs QEMU, and how fast QEMU's migration thread gets through zero pages.

    python benchmarks/largeguest.py cost            # sizes x QEMU generations: QEMU CPU, wall, windows
    python benchmarks/largeguest.py scan            # real loopback migrations of mostly-zero guests
    python -m benchmarks.largeguest trace           # the same, polled: migration thread CPU per zero page

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
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
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


def trace(cases: Sequence[tuple[str, int, int, int]], *, poll_s: float = 0.1) -> list[dict[str, Any]]:
    """(qemu, GiB, zeroed MiB, bandwidth MB/s) -> one real migration each, with ``query-migrate`` and the
    migration thread's CPU time polled every ``poll_s``: per 0.5 s, the zero and normal pages QEMU sent
    and the thread's CPU per zero page. In stretches of zero pages alone that CPU is what reading one
    zero page costs the thread (its CPU time, so another process on the host does not change it); the
    host's own scan speed (:func:`migpredictd.qemu.hostscan.probe`) is printed beside it."""
    from migpredictd.qemu.hostscan import probe

    rows = []
    for qemu, gib, zeroed, mbs in cases:
        host = probe()
        spec = GuestSpec(
            qemu=qemu,  # type: ignore[arg-type]
            memory_mib=gib * GIB, touch_mib=256, wss_mib=0, rate_mib=0, zeroed_mib=zeroed,
        )  # fmt: skip
        port = free_tcp_port()
        samples: list[tuple[float, int, int, float]] = []
        final: Any = {}
        with (
            Guest(spec) as source,
            Guest(spec, incoming=f"tcp:127.0.0.1:{port}") as dest,
            source.qmp(timeout=10.0) as qmp,
        ):
            qmp.execute("migrate-set-parameters", {"max-bandwidth": mbs * 1_000_000, "downtime-limit": 300})
            before = set(_thread_cpu(source.pid))
            t0 = time.monotonic()
            qmp.execute("migrate", {"uri": dest.incoming})
            while True:
                final = qmp.execute("query-migrate")
                # The threads QEMU started for the migration (its migration thread), and their CPU.
                cpu = sum(v for tid, v in _thread_cpu(source.pid).items() if tid not in before)
                if isinstance(final, dict) and "ram" in final:
                    ram = final["ram"]
                    samples.append((time.monotonic() - t0, int(ram["duplicate"]), int(ram["normal"]), cpu))
                if not isinstance(final, dict) or final.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(poll_s)
        stretches: list[dict[str, Any]] = []
        last = samples[0]
        for sample in samples[1:]:
            if sample[0] - last[0] >= 0.5:
                dt = sample[0] - last[0]
                zeros, normals, cpu = sample[1] - last[1], sample[2] - last[2], sample[3] - last[3]
                stretches.append({
                    "t": round(sample[0], 2), "zero_per_s": round(zeros / dt),
                    "normal_per_s": round(normals / dt), "thread_cpu_share": round(cpu / dt, 3),
                    "cpu_us_per_zero_page": round(1e6 * cpu / zeros, 4) if zeros else None,
                })  # fmt: skip
                last = sample
        zero_only = [
            x["cpu_us_per_zero_page"]
            for x in stretches
            if x["zero_per_s"] > 300_000 and x["normal_per_s"] < 0.002 * x["zero_per_s"]
        ]
        row = {
            "qemu": qemu, "gib": gib, "zeroed_mib": zeroed, "mb_per_s": mbs,
            "status": final.get("status") if isinstance(final, dict) else None,
            "total_s": (final.get("total-time") or 0) / 1000 if isinstance(final, dict) else None,
            "host_scan_s_per_page": [host.shared_zero_seconds, host.allocated_seconds],
            "zero_only_cpu_us_per_zero_page": zero_only, "stretches": stretches,
        }  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of process ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


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
    t = sub.add_parser("trace")
    t.add_argument("--cases", default="10.0:64:0:125,10.0:16:8192:125,7.2:64:0:125,7.2:16:8192:125",
                   help="qemu:GiB:zeroed MiB:MB/s, comma-separated")  # fmt: skip
    args = ap.parse_args(argv)
    if args.what == "cost":
        cost([int(x) for x in args.sizes.split(",")], args.qemu.split(","), args.fixed)
    else:
        cases = []
        for item in args.cases.split(","):
            q, g, z, b = item.split(":")
            cases.append((q, int(g), int(z), int(b)))
        (scan if args.what == "scan" else trace)(cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
