"""``--shard K/N``: N daemons split the targets as Prometheus' ``hashmod`` relabelling would.

Prometheus' hashmod takes md5 of the label value, reads its low 8 bytes as a big-endian uint64 and
takes it modulo N. The test computes that itself and checks the running daemons against it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from migpredictd.core.errors import InputError
from migpredictd.serve.daemon import in_shard, parse_shard
from tests.daemon_helpers import DaemonProcess, free_port, value, vms, wait_for

NAMES = [f"vm-{i:03d}" for i in range(40)] + ["db", "web-01", "ünïcode", "a b"]


def hashmod(name: str, n: int) -> int:
    """Prometheus relabel ``action: hashmod`` on the value ``name``."""
    digest = hashlib.md5(name.encode("utf-8"), usedforsecurity=False).digest()
    return int.from_bytes(digest[8:16], "big") % n


def test_hashmod_matches_prometheus_for_known_values() -> None:
    # Independent fixed points (md5 hex of each name, low 16 hex digits mod N), so that a change of the
    # test's own helper cannot hide a change of the daemon's.
    for name, n in [("db", 3), ("vm-000", 5), ("web-01", 7)]:
        low = int(hashlib.md5(name.encode()).hexdigest()[16:], 16)  # noqa: S324 - what Prometheus uses
        assert hashmod(name, n) == low % n
    for n in (1, 2, 3, 5):
        for name in NAMES:
            assert in_shard(name, (hashmod(name, n), n))
            assert sum(in_shard(name, (k, n)) for k in range(n)) == 1


@pytest.mark.parametrize("text", ["3/2", "2/2", "-1/2", "1/0", "abc", "0/1/2", "1", "/", "0/x", ""])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(InputError, match="--shard"):
        parse_shard(text)


def _config(tmp_path: Path) -> Path:
    lines = ["global: {interval: 1h, jitter: 0s}", "targets:"]
    # Sockets that do not exist: the targets are listed (up 0) whether or not they can be measured.
    lines += [f"  - {{name: '{n}', qmp: 'unix:{tmp_path}/s{i}.sock'}}" for i, n in enumerate(NAMES)]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_n_daemons_cover_every_target_exactly_once(tmp_path: Path) -> None:
    config = _config(tmp_path)
    n = 3
    daemons = []
    try:
        for k in range(n):
            (tmp_path / f"d{k}").mkdir()
            cfg = tmp_path / f"d{k}" / "config.yaml"
            cfg.write_text(config.read_text())
            daemons.append(DaemonProcess(cfg, free_port(), f"--shard={k}/{n}"))
        seen: dict[str, int] = {}
        for k, d in enumerate(daemons):
            want = {name for name in NAMES if hashmod(name, n) == k}
            s = wait_for(d.port, lambda x: value(x, "migpredictd_targets") is not None, timeout=20)
            assert vms(s) == want, (k, d.logs())
            assert value(s, "migpredictd_targets") == float(len(want))
            for name in vms(s):
                seen[name] = seen.get(name, 0) + 1
        assert seen == dict.fromkeys(NAMES, 1)
        # No shard is empty with 44 names over 3 shards (a constant split would fail this).
        assert all(sum(hashmod(x, n) == k for x in NAMES) > 0 for k in range(n))
    finally:
        for d in daemons:
            assert d.stop() == 0, d.logs()


@pytest.mark.parametrize("shard", ["3/3", "x/2", "1/0", "-1/4", "1/2/3"])
def test_bad_shard_exits_non_zero_with_one_line(tmp_path: Path, shard: str) -> None:
    config = _config(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "migpredictd.cli", "run", f"--config.file={config}", f"--shard={shard}",
         "--web.listen-address=127.0.0.1:0"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "--shard" in lines[0]
    assert "Traceback" not in r.stderr
