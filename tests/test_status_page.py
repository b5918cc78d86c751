"""The status page and the JSON API, from state snapshots (no daemon, no HTTP)."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import pytest

from migpredictd.core.measurement import DirtyPoint, Measurement
from migpredictd.core.model import build_model
from migpredictd.core.predictor import DEFAULT_GRID, PredictorSettings, predict_grid
from migpredictd.core.table import prediction_to_json
from migpredictd.core.units import format_bandwidth, format_downtime, format_eta
from migpredictd.serve.state import TargetState
from migpredictd.serve.status import api_response, parse_query, policy_cell, render_page

MIB = 1 << 20
NOW = 1_800_000_000.0


def measurement(rate_mib_s: float, *, total_pages: int = 262144, zero: float = 0.5) -> Measurement:
    """A guest dirtying ``rate_mib_s`` over all its non-zero pages (by default half of its 1 GiB)."""
    pages = rate_mib_s * 256
    wss = total_pages * (1.0 - zero)
    return Measurement(
        page_size_bytes=4096,
        total_pages=total_pages,
        points=tuple(DirtyPoint(ms, min(pages * ms / 1000.0, wss)) for ms in (125.0, 1000.0, 8000.0)),
        zero_pages=total_pages * zero,
        zero_pages_method="guest-sample",
        strategy="sweep-ms",
        qemu_version="10.0.2",
    )


def target(name: str, rate: float, m: Measurement | None = None, **kw: object) -> TargetState:
    m = m or measurement(rate)
    [p] = predict_grid([build_model(m)], DEFAULT_GRID, PredictorSettings())
    base: dict[str, object] = {
        "name": name, "qmp": f"unix:/run/{name}.qmp", "up": True, "measurement": m, "prediction": p,
        "grid": DEFAULT_GRID, "last_success": NOW - 30, "last_attempt": NOW - 30, "last_duration": 9.0,
    }  # fmt: skip
    return TargetState(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fleet() -> dict[str, TargetState]:
    # idle, busy (converges only at the faster links) and hopeless (never at the default grid), a down
    # VM that still has its last prediction, a VM never measured, and a hostile name
    ts = [
        target("idle", 0.5, labels={"rack": "a"}),
        target("busy", 600.0, labels={"rack": "b"}),
        # 4 GiB rewritten at 40 GB/s: more than 10 Gbit/s x 500 ms can ever hold
        target("hopeless", 0.0, measurement(40000.0, total_pages=1 << 20, zero=0.0), labels={"rack": "a"}),
        target("flaky", 5.0, up=False, last_attempt=NOW - 5, last_error="QMP timeout"),
        TargetState(name="new", qmp="unix:/run/new.qmp"),
        target('<script>alert("x")</script>', 1.0, labels={"k": "<b>v</b>"}),
    ]
    return {t.name: t for t in ts}


class Cells(HTMLParser):
    """Every grid table's cells: (vm, bandwidth row, column, text, data-converges)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[tuple[str, int, int, str, str | None]] = []
        self._vm: str | None = None
        self._row = -1
        self._col = -1
        self._in: str | None = None
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("class") == "grid":
            self._vm, self._row = a.get("data-vm"), -1
        elif tag == "tr" and self._vm is not None:
            self._row, self._col = self._row + 1, -1
        elif tag == "td" and self._vm is not None:
            self._col += 1
            self._in, self._text = a.get("data-converges"), ""

    def handle_data(self, data: str) -> None:
        self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._vm is not None:
            self.cells.append((self._vm, self._row, self._col, self._text, self._in))
        elif tag == "table":
            self._vm = None


def test_the_grid_cells_are_the_predictions_and_dash_is_no_convergence(fleet: dict[str, TargetState]) -> None:
    page = render_page(fleet, query="", now=NOW, title="t", footer="")
    parser = Cells()
    parser.feed(page)
    nb, nd = len(DEFAULT_GRID.bandwidths), len(DEFAULT_GRID.downtimes)
    for name, t in fleet.items():
        if t.prediction is None:
            continue
        mine = {(r, c): (text, conv) for vm, r, c, text, conv in parser.cells if vm == name}
        for i in range(nb):
            for j in range(nd):
                text, conv = mine[(i + 1, j)]  # row 0 is the header
                seconds = float(t.prediction.seconds[i, j])
                if math.isnan(seconds):
                    assert (text, conv) == ("-", "false")
                else:
                    assert conv == "true"
                    assert text != "-"
        # the last row: the minimum converging bandwidth per downtime
        for j in range(nd):
            b = float(t.prediction.min_bandwidth[j])
            assert mine[(nb + 1, j)][0] == ("-" if math.isnan(b) else format_bandwidth(b))
    assert any(text == "-" for vm, *_, text, _c in parser.cells if vm == "hopeless")
    assert not any(text == "-" for vm, *_, text, _c in parser.cells if vm == "idle")


def test_the_summary_counts_the_fleet_at_the_alert_policy(fleet: dict[str, TargetState]) -> None:
    page = render_page(fleet, query="", now=NOW, title="t", footer="")
    i, j = policy_cell(DEFAULT_GRID, None, None)
    assert (format_bandwidth(DEFAULT_GRID.bandwidths[i]), format_downtime(DEFAULT_GRID.downtimes[j])) == (
        "10Gbps", "500ms"
    )  # fmt: skip
    stuck = [
        n for n, t in fleet.items() if t.prediction is not None and math.isnan(t.prediction.seconds[i, j])
    ]
    assert stuck == ["hopeless"]
    assert f'<b id="not-converging">{len(stuck)}</b> of 5 predicted VMs' in page
    assert 'Host evacuation, one VM at a time: <b id="evacuation">never: 1 VMs would not converge</b>' in page
    assert '<span id="vm-count">6</span> VMs: 4 up, 1 down, 1 not measured yet.' in page
    # without the hopeless VM the evacuation is the sum of the others' times
    calm = {n: t for n, t in fleet.items() if n != "hopeless"}
    total = sum(float(t.prediction.seconds[i, j]) for t in calm.values() if t.prediction is not None)
    page = render_page(calm, query="", now=NOW, title="t", footer="")
    evac = re.search(r'<b id="evacuation">([^<]*)</b>', page)
    assert evac is not None
    assert evac[1] == format_eta(math.ceil(total))
    assert total > 1.0


def test_hostile_names_labels_and_queries_are_escaped(fleet: dict[str, TargetState]) -> None:
    page = render_page(fleet, query="name=%3Cscript%3E", now=NOW, title="t", footer="")
    assert "page 1 of 1 (1 VMs shown)" in page
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>v</b>" not in page
    page = render_page(fleet, query="label=%22%3E%3Cimg%3Dx", now=NOW, title="t", footer="")
    assert "<img" not in page
    assert 'value="&quot;&gt;&lt;img=x"' in page
    q = parse_query("per_page=99999999&page=-3&sort=evil&label=novalue&" + "x=" * 5000)
    assert (q.per_page, q.page, q.sort, q.label) == (100, 1, "name", None)


def test_filter_sort_and_pages_are_plain_links(fleet: dict[str, TargetState]) -> None:
    rows = re.compile(r'<tr class="vm [a-z]+" data-vm="([^"]*)"')
    page = render_page(fleet, query="label=rack%3Da", now=NOW, title="t", footer="")
    assert rows.findall(page) == ["hopeless", "idle"]
    page = render_page(fleet, query="name=USY", now=NOW, title="t", footer="")
    assert rows.findall(page) == ["busy"]
    page = render_page(fleet, query="sort=policy", now=NOW, title="t", footer="")
    order = rows.findall(page)
    assert order.index("idle") < order.index("busy") < order.index("hopeless") < order.index("new")
    page = render_page(fleet, query="sort=name&order=desc&per_page=2&page=2", now=NOW, title="t", footer="")
    assert rows.findall(page) == ["hopeless", "flaky"]
    assert "page 2 of 3 (6 VMs shown)" in page
    assert 'rel="next"' in page
    assert 'rel="prev"' in page


def test_the_api_has_the_measurement_and_the_clis_json(fleet: dict[str, TargetState]) -> None:
    code, body = api_response("/api/v1/targets", fleet)
    assert code == 200
    doc = json.loads(body)
    assert doc["api_version"] == "v1"
    by_name = {t["name"]: t for t in doc["targets"]}
    assert sorted(by_name) == sorted(fleet)
    busy = by_name["busy"]
    t = fleet["busy"]
    assert t.prediction is not None
    assert t.measurement is not None
    assert busy["measurement"] == json.loads(json.dumps(t.measurement.to_json_dict()))
    expected = json.loads(json.dumps(prediction_to_json(t.prediction, DEFAULT_GRID)))
    assert {k: busy["prediction"][k] for k in expected} == expected
    assert busy["prediction"]["grid"]["max_downtimes"] == [format_downtime(d) for d in DEFAULT_GRID.downtimes]
    assert busy["prediction"]["derived"] is True
    assert by_name["new"]["prediction"] is None
    assert by_name["new"]["health"]["status"] == "pending"
    assert by_name["flaky"]["health"] == {
        "status": "down", "up": False, "last_success_timestamp_seconds": NOW - 30,
        "last_attempt_timestamp_seconds": NOW - 5, "last_duration_seconds": 9.0, "last_error": "QMP timeout",
        "failures": {},
    }  # fmt: skip
    code, body = api_response("/api/v1/targets/%3Cscript%3Ealert(%22x%22)%3C%2Fscript%3E", fleet)
    assert code == 200
    assert json.loads(body)["target"]["name"] == '<script>alert("x")</script>'


@pytest.mark.parametrize(
    "path", ["/api/v1/targets/nope", "/api/v1/target", "/api/v2/targets", "/api/v1/targets/"]
)
def test_bad_api_paths_are_404_with_a_json_error(fleet: dict[str, TargetState], path: str) -> None:
    code, body = api_response(path, fleet)
    assert code == 404
    doc = json.loads(body)
    assert doc["api_version"] == "v1"
    assert doc["error"]
