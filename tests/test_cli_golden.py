"""``migpredictd predict`` prints, byte for byte, what it printed before its speed work (issue 17).

``data/cli_golden_input.jsonl`` holds 60 varied VMs (extended replies scaled from the cover letter, some
with few periods or larger guests; canonical documents with zero profiles and QEMU versions); the
``cli_golden_*_table.txt`` files are the tables of commit 02a2f57, before parsing, model building and
rendering were made faster.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from migpredictd import cli
from migpredictd.core.measurement import parse_measurement
from migpredictd.core.model import build_model
from migpredictd.core.predictor import DEFAULT_GRID, PredictorSettings, VMPrediction, predict_grid
from migpredictd.core.table import render_table, render_tables

DATA = Path(__file__).parent / "data"
INPUT = DATA / "cli_golden_input.jsonl"


@pytest.mark.parametrize("mode", ["seed", "qemu"])
def test_table_is_byte_identical_to_before(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["predict", "--mode", mode, "--format", "table", str(INPUT)]) == 0
    out = capsys.readouterr().out
    want = (DATA / f"cli_golden_{mode}_table.txt").read_text()
    assert out.count("Downtime>") == 60
    assert out == want


def test_one_vm_is_the_table_alone(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text(INPUT.read_text().splitlines()[0])
    assert cli.main(["predict", "--mode", "seed", str(one)]) == 0
    out = capsys.readouterr().out
    # the first VM's table from the golden file, without its "# target" line
    first = (DATA / "cli_golden_seed_table.txt").read_text().split("# \n")[1]
    assert out == first


def test_batch_rendering_equals_rendering_each_vm() -> None:
    docs = [json.loads(line) for line in INPUT.read_text().splitlines()]
    models = [build_model(parse_measurement(d), mode="qemu") for d in docs]
    preds = predict_grid(models, DEFAULT_GRID, PredictorSettings(mode="qemu"), derived=False)
    assert render_tables(preds, DEFAULT_GRID) == [render_table(p, DEFAULT_GRID) for p in preds]
    assert render_tables([], DEFAULT_GRID) == []
    # a cell beyond int64's exact range sends the whole batch through the cell-by-cell path
    huge = preds[0].seconds.copy()
    huge[0, 0] = 1e300
    odd = VMPrediction(
        seconds=huge,
        passes=preds[0].passes,
        bytes_sent=huge,
        downtime_seconds=huge,
        min_bandwidth=np.zeros(6),
        min_downtime=np.zeros(8),
    )
    batch = [preds[1], odd]
    assert render_tables(batch, DEFAULT_GRID) == [render_table(p, DEFAULT_GRID) for p in batch]


@pytest.mark.parametrize("mode", ["seed", "qemu"])
def test_tables_in_several_batches_are_the_same_text(
    mode: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table path predicts and renders TABLE_BATCH VMs at a time; batches of 7 (the last one
    shorter) print the same bytes."""
    monkeypatch.setattr(cli, "TABLE_BATCH", 7)
    assert cli.main(["predict", "--mode", mode, "--format", "table", str(INPUT)]) == 0
    assert capsys.readouterr().out == (DATA / f"cli_golden_{mode}_table.txt").read_text()
