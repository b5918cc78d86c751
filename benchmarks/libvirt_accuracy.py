"""The libvirt path's accuracy against the direct QMP path, both against real live migrations.

For every case (a guest workload and a max-bandwidth x downtime-limit cell, QEMU 7.2, the QEMU Debian's
libvirt runs): boot the guest as a transient libvirt domain and measure it through libvirt's API as the
daemon does (:func:`migpredictd.libvirt.measure.measure_domain`, default settings: whole-second windows
at QEMU's 512 sample pages per GiB, repeated up to four times); destroy it; boot the same guest from the
rig with an incoming destination on 127.0.0.1, measure it over QMP as the daemon does
(:func:`migpredictd.qemu.measure.measure`), really migrate it (cancelled at the cutoff = "did not
converge"), and predict the cell from each measurement in the default ``qemu`` mode. The dirtier paces
itself by the clock, so the domain and the rig guest dirty the same pages at the same rate. One JSON
line per case, then the summary.

    python -m benchmarks.libvirt_accuracy --out benchmarks/results/accuracy-libvirt.jsonl
    python -m benchmarks.libvirt_accuracy --summarize benchmarks/results/accuracy-libvirt.jsonl

The cases (:data:`HOLDOUT_LIBVIRT`) were committed before they ran. Needs root, the rig and libvirtd
(``bash scripts/install-rig.sh --libvirt``; the rig starts libvirtd if none answers).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks.accuracy import MBIT, Case, _g, outcome, predict_modes, verdict
from migpredictd.core.address import DomainRef
from migpredictd.core.measurement import Measurement
from migpredictd.lab.rig.guest import Guest, free_tcp_port
from migpredictd.lab.rig.libvirt import URI, LibvirtGuest, ensure_libvirtd
from migpredictd.lab.rig.migration import migrate
from migpredictd.libvirt.api import Connection
from migpredictd.libvirt.measure import measure_domain, pid_file_for
from migpredictd.qemu.measure import measure

Row = dict[str, Any]

# Defined before it ran (QEMU 7.2: Debian 12's libvirt runs its own QEMU): idle, paced sequential and
# random working sets, converging and not, 384 MiB-2 GiB, 20-150 MB/s.
HOLDOUT_LIBVIRT: Final[tuple[Case, ...]] = (
    Case("v01", _g("7.2", 512, 10, 64), 200 * MBIT, 100, cutoff_s=60.0),
    Case("v02", _g("7.2", 768, 25, 128), 400 * MBIT, 300, cutoff_s=60.0),
    Case("v03", _g("7.2", 1024, touch=64), 600 * MBIT, 300, cutoff_s=60.0),
    Case("v04", _g("7.2", 512, 40, 96), 240 * MBIT, 50, cutoff_s=40.0),
    Case("v05", _g("7.2", 1536, 15, 200, "random"), 1000 * MBIT, 200, cutoff_s=60.0),
    Case("v06", _g("7.2", 640, 5, 32), 160 * MBIT, 100, cutoff_s=60.0),
    Case("v07", _g("7.2", 2048, 30, 256), 1200 * MBIT, 150, cutoff_s=60.0),
    Case("v08", _g("7.2", 384, 60, 48), 480 * MBIT, 300, cutoff_s=40.0),
)


def measure_libvirt(case: Case) -> Measurement:
    """The case's guest as a libvirt domain, measured through libvirt as the daemon measures it."""
    name = f"mp-acc-{case.case_id}-{os.getpid()}"
    with LibvirtGuest(case.spec, name) as guest:
        conn = Connection(URI)
        try:
            ref = DomainRef(uri=URI, name=name, uuid=guest.uuid, pid_file=pid_file_for(URI, name))
            return asyncio.run(measure_domain(conn, ref, target=case.case_id))
        finally:
            conn.close()


def _prediction(m: Measurement, case: Case) -> Row:
    return dict(predict_modes(m, m.zero_pages, case, m.zero_profile)["qemu"])


def run_case(case: Case) -> Row:
    started = time.time()
    lv = measure_libvirt(case)
    port = free_tcp_port()
    with Guest(case.spec) as source, Guest(case.spec, incoming=f"tcp:127.0.0.1:{port}") as destination:
        qmp = asyncio.run(measure(source.qmp_address, target=case.case_id))
        result = migrate(
            source,
            destination,
            max_bandwidth_bytes_per_second=case.bandwidth,
            downtime_limit_ms=case.downtime_ms,
            cutoff_s=case.cutoff_s,
        )
    return {
        "set": "libvirt",
        "case": case.case_id,
        "started_at": round(started, 3),
        "load_after": os.getloadavg(),
        "guest": dataclasses.asdict(case.spec),
        "settings": {
            "max_bandwidth_bytes_per_second": case.bandwidth,
            "downtime_limit_ms": case.downtime_ms,
            "cutoff_s": case.cutoff_s,
        },
        "libvirt": {"measurement": lv.to_json_dict(), "prediction": _prediction(lv, case)},
        "qmp": {"measurement": qmp.to_json_dict(), "prediction": _prediction(qmp, case)},
        "outcome": outcome(result),
    }


def error(row: Row, path: str) -> float | None:
    """|predicted - real| / real for a migration that completed (inf if the path said it would not);
    None when the real migration did not complete."""
    real = row["outcome"]
    pred = row[path]["prediction"]
    if not real["converged"] or not real["total_time_ms"]:
        return None
    if not verdict(pred, row["settings"]["cutoff_s"]):
        return math.inf
    real_s = real["total_time_ms"] / 1000.0
    return float(abs(pred["seconds"] - real_s) / real_s)


def summarize(rows: Sequence[Row]) -> str:
    lines = [
        "| case | guest | cell | real | libvirt: predicted (error), sampling error, duration "
        "| QMP: predicted (error), duration |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, s, o = r["guest"], r["settings"], r["outcome"]
        real = f"{o['total_time_ms'] / 1000:.1f} s" if o["converged"] else "not converged"

        def cell(path: str, row: Row = r) -> str:
            p, m = row[path]["prediction"], row[path]["measurement"]
            e = error(row, path)
            said = f"{p['seconds']:.1f} s" if verdict(p, row["settings"]["cutoff_s"]) else "not converged"
            err = "" if e is None else (" (wrong verdict)" if e == math.inf else f" ({e:.1%})")
            extra = f", {m['sampling_error']:.0%}" if path == "libvirt" and m.get("sampling_error") else ""
            return f"{said}{err}{extra}, {m['duration_seconds']:.0f} s"

        lines.append(
            f"| {r['case']} | {g['memory_mib']} MiB, {g['rate_mib']:g} MiB/s over {g['wss_mib']} MiB "
            f"{g['pattern']} | {s['max_bandwidth_bytes_per_second'] / MBIT:g} Mbit/s, "
            f"{s['downtime_limit_ms']} ms | {real} | {cell('libvirt')} | {cell('qmp')} |"
        )
    for path in ("libvirt", "qmp"):
        errors = [e for r in rows if (e := error(r, path)) is not None]
        wrong = sum(
            verdict(r[path]["prediction"], r["settings"]["cutoff_s"]) != bool(r["outcome"]["converged"])
            for r in rows
        )
        finite = [e for e in errors if e != math.inf]
        median = statistics.median(finite) if finite else math.nan
        worst = max(finite) if finite else math.nan
        lines.append(
            f"\n{path}: {len(rows)} cases, {len(errors)} completed; median error {median:.1%}, "
            f"worst {worst:.1%}; wrong verdicts {wrong}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="append one JSON line per case here")
    ap.add_argument("--only", action="append", help="run only these case ids")
    ap.add_argument("--summarize", type=Path, help="print the summary of recorded rows and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        rows = [json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()]
        print(summarize(rows))
        return 0
    ensure_libvirtd()
    rows = []
    for case in HOLDOUT_LIBVIRT:
        if args.only and case.case_id not in args.only:
            continue
        row = run_case(case)
        rows.append(row)
        print(summarize([row]).splitlines()[2], file=sys.stderr, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
