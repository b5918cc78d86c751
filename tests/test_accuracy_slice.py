"""Prediction accuracy on real migrations: the CI slice of benchmarks/accuracy.py (QEMU 7.2 and 10.0).

Four real loopback migrations (about 80 s): each guest is measured as deployed (``migpredictd measure``
as uid 9842 with no capabilities, zero pages by the helper started as root with its two capabilities),
predicted, and migrated; the test fails when the ``qemu`` mode's error regresses past the bounds below
or when any verdict is wrong for a migration far (>20%) from the convergence boundary. Bounds come
from the committed runs (benchmarks/results/accuracy-summary.md) with margin for a shared, loaded host.
Fails (never skips) when QEMU or the kernel is missing: the rig raises RigError.
"""

from __future__ import annotations

import statistics

import pytest

from benchmarks.accuracy import QUICK, error, run_case, summarize, verdict_wrong
from migpredictd.lab.deployed import running_helper

# qemu mode with the opt-out zero-page estimate (host-smaps, an upper bound on non-zero pages), which errs
# long by design: median 16.5% and 28.2% on this slice in two runs,
# 18.6% (p90 25.7%) on the final held-out set. The estimate, not the simulation, dominates
# (docs/accuracy.md); the bound catches a broken method, not its known bias.
MAX_MEDIAN_ERROR_HOST_SMAPS = 0.40
# qemu mode as the daemon runs it by default (guest-sampled zero pages): median 1.5% and 3.0% on this
# slice in two runs of an earlier round (worst case 5.5%); this round 0.1% as root on an idle host and
# 6.1% as deployed inside a CI run (load average 0.4-1.0: the TCG guests' dirtying slows with the host,
# and q01 and q03 both read 6% short). 2.1% on the final held-out set as deployed, 0.4% as root. The bound
# still separates a broken method (host-smaps 21%, seed 24% on the same runs) from load.
MAX_MEDIAN_ERROR_DEFAULT = 0.08


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_qemu_mode_predicts_real_migrations_within_the_committed_bounds() -> None:
    with running_helper():
        rows = [run_case(case, "quick", lambda _msg: None, deployed=True) for case in QUICK]
    table = summarize(rows, "test slice")
    assert all(r["measured_as"] == "deployed" for r in rows)
    assert all(any("by the zero-page helper" in n for n in r["measure_notes"]) for r in rows), table

    # The slice covers both generations and both verdicts, all far from the boundary.
    assert {r["guest"]["qemu"] for r in rows} == {"7.2", "10.0"}, table
    assert {r["outcome"]["converged"] for r in rows} == {True, False}, table
    assert all(r["boundary"]["far"] for r in rows), table

    for mode in ("qemu", "qemu+host-smaps"):
        wrong = [r["case"] for r in rows if r["boundary"]["far"] and verdict_wrong(r, mode)]
        assert not wrong, f"{mode}: wrong verdict far from the boundary in {wrong}\n{table}"

    def median_error(mode: str) -> float:
        errs = [e for r in rows if (e := error(r, mode)) is not None]
        assert len(errs) == 3, table
        return statistics.median(errs)

    assert median_error("qemu") <= MAX_MEDIAN_ERROR_DEFAULT, table
    assert median_error("qemu+host-smaps") <= MAX_MEDIAN_ERROR_HOST_SMAPS, table
