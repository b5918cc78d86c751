"""One real migration under Nova's control loop (QEMU 10.0, TCG, loopback): the CI slice of
benchmarks/policies.py.

A 256 MiB guest rewrites 64 MiB at 40 MiB/s, more than 200 Mbit/s carries: no downtime step of Nova's
schedule (3 steps, 3 s per GiB x 2 GiB) fits it, and the completion timeout (3 s per GiB x 2 GiB = 6 s)
aborts it through migrate_cancel. The lab's loop (lab/orchestrators.py, written from Nova's code) drives
the real migration; core/policies.py predicts it from the daemon's own measurement. About 30 s. Fails
(never skips) when QEMU or the kernel is missing: the rig raises RigError.
"""

from __future__ import annotations

import pytest

from benchmarks.policies import NOVA_FAST, PolicyCase, _g, run_case

CASE = PolicyCase(
    "ci1", _g("10.0", 256, 40, 64), "nova", {**NOVA_FAST, "live_migration_completion_timeout": "3"}
)


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_nova_aborts_the_real_migration_when_and_as_predicted() -> None:
    row = run_case(CASE, "ci", lambda _msg: None)
    real, predicted = row["real"], row["prediction"]
    assert row["boundary"]["far"], row["boundary"]
    assert predicted["outcome"] == "aborted"
    assert real["outcome"] == predicted["outcome"], real
    events = {(action, value): t for t, action, value in real["events"]}
    # Nova's first step (166 ms) at its first poll, and the abort at the first 0.5 s poll after
    # int(3 x 2 GiB) = 6 s (no step could have helped: 64 MiB need 2.7 s at 25 MB/s)
    assert events[("downtime-limit", 166)] < 1.0
    cancel = events[("cancel", "completion timeout")]
    assert 6.0 < cancel < 7.5
    assert real["status"] == "cancelled"
