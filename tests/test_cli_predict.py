"""``migpredictd predict``: inputs, outputs as documented, and one clean stderr line for every bad input."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migpredictd import cli
from migpredictd.core.measurement import FORMAT

DATA = Path(__file__).parent / "data"
SAMPLE = DATA / "cover_letter_sample.json"
TABLE = (DATA / "cover_letter_table.txt").read_text()


def canonical(target: str, dirty: float = 250.0) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "target": target,
        "page_size_bytes": 4096,
        "total_pages": 65536,
        "points": [
            {"period_ms": 100.0, "dirty_pages": dirty},
            {"period_ms": 1000.0, "dirty_pages": dirty * 2},
        ],
    }


def run_main(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stdin: str | None = None,
) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, out: str, err: str, *needles: str) -> None:
    assert code != 0
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.endswith("\n")
    assert err.startswith("migpredictd")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


# --- through a real process -------------------------------------------------------------------------


def test_seed_table_from_stdin_via_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "migpredictd.cli", "predict", "--mode", "seed"],
        input=SAMPLE.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == TABLE
    assert proc.stderr == ""


def test_predict_starts_without_the_daemon_qmp_or_http_modules() -> None:
    """Only the subcommand that runs imports its edge: predict's start-up (within its 1 s budget for
    one VM) does not pay for the daemon's."""
    edges = (
        "migpredictd.serve.daemon",
        "migpredictd.qemu.measure",
        "migpredictd.lab.demo",
        "migpredictd.web.server",
    )
    code = (
        "import sys; from migpredictd.cli import main; rc = main(['predict', '--mode', 'seed']); "
        f"edges = [m for m in {edges!r} if m in sys.modules]; "
        "print(edges, file=sys.stderr); sys.exit(rc or bool(edges))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], input=SAMPLE.read_text(), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == TABLE
    assert proc.stderr.strip() == "[]"


def test_edge_subcommands_still_parse_their_options() -> None:
    for command, option in (
        ("run", "--config.file"),
        ("measure", "--target"),
        ("demo", "--web.listen-address"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "migpredictd.cli", command, "--help"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert option in proc.stdout


def test_bad_input_via_subprocess_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    doc = canonical("vm1")
    doc["points"][1]["dirty_pages"] = -3
    bad.write_text(json.dumps(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "migpredictd.cli", "predict", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert_one_error_line(proc.returncode, proc.stdout, proc.stderr, "points[1].dirty_pages", str(bad))


# --- in process ---------------------------------------------------------------------------------------


def test_seed_table_from_file(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_main(["predict", "--mode", "seed", str(SAMPLE)], capsys, monkeypatch)
    assert (code, out, err) == (0, TABLE, "")


def test_stdin_dash_and_pretty_printed_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = json.dumps(json.loads(SAMPLE.read_text()), indent=2)  # one object over many lines
    code, out, _ = run_main(["predict", "--mode", "seed", "-"], capsys, monkeypatch, stdin=text)
    assert (code, out) == (0, TABLE)


def test_json_lines_table_per_vm(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = "\n".join(json.dumps(canonical(name, d)) for name, d in [("a", 100.0), ("b", 5000.0)]) + "\n\n"
    code, out, _ = run_main(
        ["predict", "--bandwidths", "100Mbps,1Gbps", "--downtimes", "300ms,unlim"], capsys, monkeypatch, stdin
    )
    assert code == 0
    blocks = out.split("# ")
    assert blocks[0] == ""
    assert [b.splitlines()[0] for b in blocks[1:]] == ["a", "b"]
    for block in blocks[1:]:
        lines = block.splitlines()
        assert lines[1] == "Downtime> |   300ms |   unlim |"
        assert [line.split("|")[0].strip() for line in lines[3:]] == ["100 Mbps", "1 Gbps"]


def test_json_output_fields(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = "\n".join(json.dumps(canonical(name, d)) for name, d in [("a", 100.0), ("b", 30000.0)])
    code, out, _ = run_main(
        ["predict", "--format", "json", "--bandwidths", "1Gbps,100Mbps", "--downtimes", "300,unlim"],
        capsys,
        monkeypatch,
        stdin,
    )
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2  # one JSON document per VM, one line each
    docs = [json.loads(line) for line in lines]
    assert [d["target"] for d in docs] == ["a", "b"]
    for doc in docs:
        assert doc["mode"] == "qemu"
        cells = doc["predictions"]
        assert [(c["bandwidth_bytes_per_second"], c["max_downtime_seconds"]) for c in cells] == [
            (2**30 / 8, 0.3),
            (2**30 / 8, None),  # null: unlimited
            (100 * 2**20 / 8, 0.3),
            (100 * 2**20 / 8, None),
        ]
        for c in cells:
            assert set(c) >= {"bandwidth_bytes_per_second", "max_downtime_seconds", "migration_seconds"}
            assert c["converges"] == (c["migration_seconds"] is not None)
            if c["migration_seconds"] is not None:
                assert c["migration_seconds"] > 0
                assert c["downtime_seconds"] <= (c["max_downtime_seconds"] or math.inf)
        assert [m["max_downtime_seconds"] for m in doc["min_bandwidth"]] == [0.3, None]
        assert all(
            set(m) == {"max_downtime_seconds", "bandwidth_bytes_per_second"} for m in doc["min_bandwidth"]
        )
        assert [m["bandwidth_bytes_per_second"] for m in doc["min_downtime"]] == [2**30 / 8, 100 * 2**20 / 8]
    # unlimited downtime always converges: the whole guest in one stop-and-copy
    assert all(c["migration_seconds"] is not None for d in docs for c in d["predictions"][1::2])
    # b dirties 30000 pages within 100 ms: no finite downtime of 300 ms converges at 100 Mbps -> null
    assert docs[1]["predictions"][2]["migration_seconds"] is None
    assert docs[1]["predictions"][2]["converges"] is False
    assert docs[0]["min_bandwidth"][0]["bandwidth_bytes_per_second"] < 2**30 / 8


def test_bare_numbers_and_units(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_main(
        [
            "predict",
            "--format",
            "json",
            "--bandwidths",
            "134217728, 1 Gbps,128MiB/s",
            "--downtimes",
            "500,0.5s,500ms",
            "--mode",
            "seed",
        ],
        capsys,
        monkeypatch,
        json.dumps(canonical("x")),
    )
    assert code == 0
    cells = json.loads(out)["predictions"]
    assert {c["bandwidth_bytes_per_second"] for c in cells} == {134217728.0}
    assert {c["max_downtime_seconds"] for c in cells} == {0.5}
    assert len({c["migration_seconds"] for c in cells}) == 1
    assert json.loads(out)["mode"] == "seed"


def test_deadline_flag(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # An idle 256 MiB guest at 1 MiB/s: one 256.5 s pass that does not fit in 300 ms, then an empty one.
    # With a 100 s deadline the seed gives up after the first pass: "does not converge".
    argv = ["predict", "--format", "json", "--bandwidths", "8Mbps", "--downtimes", "300ms", "--mode", "seed"]
    _, out, _ = run_main([*argv, "--deadline", "100"], capsys, monkeypatch, json.dumps(canonical("x", 0.0)))
    assert json.loads(out)["predictions"][0]["migration_seconds"] is None
    _, out, _ = run_main([*argv, "--deadline", "10m"], capsys, monkeypatch, json.dumps(canonical("x", 0.0)))
    assert json.loads(out)["predictions"][0]["migration_seconds"] == pytest.approx(
        65536 * 4104 / 2**20, abs=1e-3
    )


def _doc_with(path: tuple[Any, ...], value: object) -> str:
    doc: Any = canonical("vm1")
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc)


_DELETE = object()


@pytest.mark.parametrize(
    ("argv", "stdin", "needles"),
    [
        pytest.param(
            [], _doc_with(("total_pages",), _DELETE), ["stdin", "total_pages", "missing"], id="missing"
        ),
        pytest.param(
            [], _doc_with(("points", 0, "dirty_pages"), -1), ["points[0].dirty_pages"], id="negative"
        ),
        pytest.param(
            [], _doc_with(("points", 1, "period_ms"), "x"), ["points[1].period_ms"], id="non-numeric"
        ),
        pytest.param([], _doc_with(("points",), []), ["points"], id="no-points"),
        pytest.param(
            [],
            json.dumps(
                {
                    "page-size": 4096,
                    "periods": [1, 2],
                    "n-dirty-pages": [1],
                    "n-sampled-pages": 1,
                    "n-total-pages": 2,
                    "n-zero-pages": 0,
                }
            ),
            ["n-dirty-pages", "has 1 entries"],
            id="inconsistent-arrays",
        ),
        pytest.param([], "", ["stdin", "empty input"], id="empty"),
        pytest.param([], "  \n\n", ["empty input"], id="blank"),
        pytest.param(
            [],
            json.dumps(canonical("a")) + "\n" + json.dumps(canonical("b")) + "\n{not json\n",
            ["stdin line 3", "not JSON"],
            id="bad-json-line-3",
        ),
        pytest.param(
            [],
            json.dumps(canonical("a")) + "\n" + _doc_with(("points", 0, "dirty_pages"), True),
            ["stdin line 2", "points[0].dirty_pages"],
            id="bad-field-line-2",
        ),
        pytest.param(
            ["--bandwidths", "10Gbbps"],
            json.dumps(canonical("a")),
            ["10Gbbps", "unknown bandwidth unit"],
            id="bad-bandwidth-unit",
        ),
        pytest.param(
            ["--downtimes", "fast"], json.dumps(canonical("a")), ["'fast'", "duration"], id="bad-downtime"
        ),
        pytest.param(["--deadline", "-1"], json.dumps(canonical("a")), ["'-1'"], id="bad-deadline"),
        pytest.param([], "[1, 2]", ["expected a JSON object"], id="not-an-object"),
    ],
)
def test_bad_input_is_one_stderr_line(
    argv: list[str],
    stdin: str,
    needles: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, out, err = run_main(["predict", *argv], capsys, monkeypatch, stdin)
    assert_one_error_line(code, out, err, *needles)
    assert code == cli.EXIT_USAGE


def test_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.json"
    code, out, err = run_main(["predict", str(missing)], capsys, monkeypatch)
    assert_one_error_line(code, out, err, str(missing), "No such file")
