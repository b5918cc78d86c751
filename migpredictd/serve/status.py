"""The operator's view: the status page (``/``) and the JSON API (``/api/v1/targets``), from a snapshot.

Both read only :class:`~migpredictd.serve.state.TargetState` snapshots, so nothing here waits on a VM.
The page is server-rendered HTML with no external assets and no JavaScript: sorting, filtering and
pages are plain links and one GET form. docs/api.md documents the JSON.
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, quote, unquote, urlencode

from migpredictd.core.measurement import Measurement
from migpredictd.core.predictor import Grid, VMPrediction
from migpredictd.core.table import prediction_to_json
from migpredictd.core.units import format_bandwidth, format_downtime, format_eta
from migpredictd.serve.state import TargetState

API_VERSION: Final = "v1"
# The alert policy of deploy/prometheus/alerts.yml (its recording rule): the summary's default cell.
DEFAULT_POLICY: Final = ("10Gbps", "500ms")
DEFAULT_PER_PAGE: Final = 100
MAX_PER_PAGE: Final = 1000
SORTS: Final = ("name", "status", "policy", "dirty", "age")
MIB: Final = 1 << 20


@dataclass(frozen=True)
class PageQuery:
    """What the page's URL asks for; every value is checked, bad ones fall back to the default."""

    name: str = ""
    label: tuple[str, str] | None = None
    sort: str = "name"
    descending: bool = False
    page: int = 1
    per_page: int = DEFAULT_PER_PAGE
    bandwidth: str | None = None
    max_downtime: str | None = None


def parse_query(query: str) -> PageQuery:
    """The page's query string -> :class:`PageQuery` (hostile input: bounded, never raises)."""
    q = {k: v[-1] for k, v in parse_qs(query[:4096], keep_blank_values=True).items()}
    label = None
    if "=" in q.get("label", ""):
        k, _, v = q["label"].partition("=")
        label = (k.strip()[:200], v.strip()[:200])

    def number(key: str, default: int, hi: int) -> int:
        text = q.get(key, "")
        return min(max(int(text), 1), hi) if text.isdigit() and len(text) < 8 else default

    return PageQuery(
        name=q.get("name", "")[:200],
        label=label,
        sort=q["sort"] if q.get("sort") in SORTS else "name",
        descending=q.get("order") == "desc",
        page=number("page", 1, 10**6),
        per_page=number("per_page", DEFAULT_PER_PAGE, MAX_PER_PAGE),
        bandwidth=q["bandwidth"][:50] if q.get("bandwidth") else None,
        max_downtime=q["max_downtime"][:50] if q.get("max_downtime") else None,
    )


def policy_cell(grid: Grid, bandwidth: str | None, max_downtime: str | None) -> tuple[int, int]:
    """The grid cell of the summary: the asked labels if the grid has them, else the alert policy's
    (10Gbps, 500ms), else the grid's largest bandwidth and its first downtime of at least 500 ms."""
    bws = [format_bandwidth(b) for b in grid.bandwidths]
    dts = [format_downtime(d) for d in grid.downtimes]
    i = (
        bws.index(bandwidth)
        if bandwidth in bws
        else (bws.index(DEFAULT_POLICY[0]) if DEFAULT_POLICY[0] in bws else len(bws) - 1)
    )
    if max_downtime in dts:
        j = dts.index(max_downtime)
    elif DEFAULT_POLICY[1] in dts:
        j = dts.index(DEFAULT_POLICY[1])
    else:
        j = next((k for k, d in enumerate(grid.downtimes) if d >= 0.5), len(dts) - 1)
    return i, j


def status_of(t: TargetState) -> str:
    return "up" if t.up else ("pending" if t.last_attempt is None else "down")


def derived(t: TargetState) -> bool:
    """Whether the derived answers of the target's grid are in (they follow the grid by a few seconds;
    until then every one is nan, which no computed answer set is: the top of each search converges)."""
    p = t.prediction
    if p is None:
        return False
    return not all(math.isnan(x) for x in [*p.min_bandwidth.tolist(), *p.min_downtime.tolist()])


def dirty_rate(m: Measurement) -> float | None:
    """Bytes/s dirtied over the window nearest to 1 s (what an operator compares with a link)."""
    if not m.points:
        return None
    p = min(m.points, key=lambda p: abs(math.log(p.period_ms / 1000.0)))
    return p.dirty_pages * m.page_size_bytes * 1000.0 / p.period_ms


# --- JSON API ---------------------------------------------------------------------------------------


def target_json(t: TargetState) -> dict[str, Any]:
    """One target: health, the measurement in its canonical format, the predictions in the CLI's JSON."""
    prediction = None
    if t.prediction is not None and t.grid is not None:
        prediction = {
            "grid": {
                "bandwidths": [format_bandwidth(b) for b in t.grid.bandwidths],
                "max_downtimes": [format_downtime(d) for d in t.grid.downtimes],
            },
            **prediction_to_json(t.prediction, t.grid),
            "derived": derived(t),
        }
    return {
        "name": t.name,
        "qmp": t.qmp,
        "labels": dict(t.labels),
        "health": {
            "status": status_of(t),
            "up": t.up,
            "last_success_timestamp_seconds": t.last_success,
            "last_attempt_timestamp_seconds": t.last_attempt,
            "last_duration_seconds": t.last_duration,
            "last_error": t.last_error,
            "failures": dict(t.failures),
        },
        "measurement": None if t.measurement is None else t.measurement.to_json_dict(),
        "prediction": prediction,
    }


def api_response(path: str, targets: Mapping[str, TargetState]) -> tuple[int, bytes]:
    """``/api/v1/targets`` or ``/api/v1/targets/{vm}`` -> (HTTP status, JSON body); 404 with a JSON error
    for any other path or an unknown VM."""
    prefix = f"/api/{API_VERSION}/targets"
    if path == prefix:
        doc: dict[str, Any] = {
            "api_version": API_VERSION,
            "targets": [target_json(targets[n]) for n in sorted(targets)],
        }
        return 200, _dumps(doc)
    if path.startswith(prefix + "/"):
        name = unquote(path[len(prefix) + 1 :])
        t = targets.get(name)
        if t is not None:
            return 200, _dumps({"api_version": API_VERSION, "target": target_json(t)})
        return 404, _dumps({"api_version": API_VERSION, "error": f"no target named {name[:200]!r}"})
    return 404, _dumps({"api_version": API_VERSION, "error": f"no such endpoint: {path[:200]}"})


def _dumps(doc: Mapping[str, Any]) -> bytes:
    # NaN cannot occur (prediction_to_json turns it into null); allow_nan=False makes sure.
    return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode() + b"\n"


# --- the page ---------------------------------------------------------------------------------------

_STYLE: Final = (
    "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
    "td,th{border:1px solid #bbb;padding:2px 6px;text-align:right}td.l,th.l{text-align:left}"
    "tr.down td{background:#fdd}.nc{background:#555;color:#fff}summary{cursor:pointer}"
    "#summary{font-size:1.1em}.grid td,.grid th{font-family:monospace}"
)


@functools.lru_cache(maxsize=4096)
def _heat(whole_seconds: int) -> str:
    """A cell's colour for a migration of that many seconds: green at 1 s or less to red at an hour or
    more, on a log scale."""
    x = min(max(math.log10(max(whole_seconds, 1)) / math.log10(3600.0), 0.0), 1.0)
    return f"hsl({120 - 120 * x:.0f},70%,78%)"


def _cell(seconds: float) -> str:
    if math.isnan(seconds):
        return '<td class="nc" data-converges="false">-</td>'
    whole = math.ceil(seconds)
    return (
        f'<td style="background:{_heat(whole)}" data-converges="true" data-seconds="{seconds:.6g}">'
        f"{format_eta(whole)}</td>"
    )


def _grid_html(t: TargetState, p: VMPrediction, g: Grid) -> str:
    ready = derived(t)
    head = "".join(f"<th>{format_downtime(d)}</th>" for d in g.downtimes)
    rows = []
    for i, bw in enumerate(g.bandwidths):
        cells = "".join(_cell(float(x)) for x in p.seconds[i])
        d = float(p.min_downtime[i])
        min_dt = "…" if not ready else ("-" if math.isnan(d) else format_downtime(d))
        rows.append(f'<tr><th class="l">{format_bandwidth(bw)}</th>{cells}<td>{min_dt}</td></tr>')
    mins = "".join(
        f"<td>{'…' if not ready else ('-' if math.isnan(b) else format_bandwidth(b))}</td>"
        for b in p.min_bandwidth.tolist()
    )
    return (
        f'<table class="grid" data-vm="{html.escape(t.name, quote=True)}">'
        f'<tr><th class="l">bandwidth \\ max downtime</th>{head}<th>min downtime</th></tr>{"".join(rows)}'
        f'<tr><th class="l">min bandwidth</th>{mins}<td></td></tr></table>'
    )


def _filtered(targets: Sequence[TargetState], q: PageQuery) -> list[TargetState]:
    out = [t for t in targets if q.name.lower() in t.name.lower()]
    if q.label is not None:
        k, v = q.label
        out = [t for t in out if t.labels.get(k) == v]
    return out


def _sort_key(q: PageQuery, cell: tuple[int, int] | None, now: float) -> Any:
    def key(t: TargetState) -> Any:
        if q.sort == "status":
            return (status_of(t), t.name)
        if q.sort == "dirty":
            rate = dirty_rate(t.measurement) if t.measurement is not None else None
            return (rate is None, rate or 0.0, t.name)
        if q.sort == "age":
            return (t.last_success is None, now - (t.last_success or now), t.name)
        if q.sort == "policy" and cell is not None and t.prediction is not None:
            s = float(t.prediction.seconds[cell])
            return (0, math.inf if math.isnan(s) else s, t.name)
        if q.sort == "policy":
            return (1, 0.0, t.name)
        return (t.name,)

    return key


def render_page(
    targets: Mapping[str, TargetState],
    *,
    query: str,
    now: float,
    title: str,
    footer: str,
) -> str:
    """The status page for ``query`` (see :func:`parse_query`)."""
    q = parse_query(query)
    everyone = sorted(targets.values(), key=lambda t: t.name)
    grid = next((t.grid for t in everyone if t.grid is not None), None)
    cell = None if grid is None else policy_cell(grid, q.bandwidth, q.max_downtime)

    # Host summary over every VM, not only this page.
    counts = {s: sum(status_of(t) == s for t in everyone) for s in ("up", "down", "pending")}
    summary = (
        f'<span id="vm-count">{len(everyone)}</span> VMs: {counts["up"]} up, {counts["down"]} down, '
        f"{counts['pending']} not measured yet."
    )
    if grid is not None and cell is not None:
        bw, dt = format_bandwidth(grid.bandwidths[cell[0]]), format_downtime(grid.downtimes[cell[1]])
        predicted = {
            t.name: float(t.prediction.seconds[cell])
            for t in everyone
            if t.prediction is not None and t.grid == grid
        }
        stuck = [name for name, x in predicted.items() if math.isnan(x)]
        total = sum(x for x in predicted.values() if not math.isnan(x))
        evac = (
            f"never: {len(stuck)} VMs would not converge"
            if stuck
            else (format_eta(math.ceil(total)) if predicted else "unknown")
        )
        names = ", ".join(html.escape(n) for n in stuck[:20]) + (" ..." if len(stuck) > 20 else "")
        summary += (
            f" At <b>{bw}</b>, max downtime <b>{dt}</b> (the alert policy): "
            f'<b id="not-converging">{len(stuck)}</b> of {len(predicted)} predicted VMs would not converge'
            f"{': ' + names if stuck else ''}. "
            f'Host evacuation, one VM at a time: <b id="evacuation">{evac}</b>.'
        )

    shown = _filtered(everyone, q)
    shown.sort(key=_sort_key(q, cell, now), reverse=q.descending)
    pages = max(1, math.ceil(len(shown) / q.per_page))
    page = min(q.page, pages)
    start = (page - 1) * q.per_page
    rows = []
    for t in shown[start : start + q.per_page]:
        rows.append(_row(t, cell, now))

    def link(**changes: Any) -> str:
        params = {
            "name": q.name,
            "label": f"{q.label[0]}={q.label[1]}" if q.label else "",
            "sort": q.sort,
            "order": "desc" if q.descending else "asc",
            "per_page": str(q.per_page),
            "page": str(page),
            "bandwidth": q.bandwidth or "",
            "max_downtime": q.max_downtime or "",
        }
        params.update({k: str(v) for k, v in changes.items()})
        return "?" + html.escape(urlencode({k: v for k, v in params.items() if v}), quote=True)

    def th(label: str, sort: str) -> str:
        order = "asc" if q.sort == sort and q.descending else ("desc" if q.sort == sort else "asc")
        return f'<th class="l"><a href="{link(sort=sort, order=order, page=1)}">{label}</a></th>'

    nav = f"page {page} of {pages} ({len(shown)} VMs shown)"
    if page > 1:
        nav = f'<a href="{link(page=page - 1)}" rel="prev">previous</a> ' + nav
    if page < pages:
        nav += f' <a href="{link(page=page + 1)}" rel="next">next</a>'
    label_value = f"{q.label[0]}={q.label[1]}" if q.label else ""
    form = (
        '<form method="get">name contains <input name="name" value="'
        + html.escape(q.name, quote=True)
        + '"> label <input name="label" placeholder="key=value" value="'
        + html.escape(label_value, quote=True)
        + f'"> per page <input name="per_page" size="4" value="{q.per_page}">'
        + '<input type="hidden" name="sort" value="'
        + q.sort
        + '">'
        + ' <button type="submit">filter</button></form>'
    )
    policy_head = (
        "at policy"
        if grid is None or cell is None
        else f"{format_bandwidth(grid.bandwidths[cell[0]])}, {format_downtime(grid.downtimes[cell[1]])}"
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>'
        + html.escape(title)
        + f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        '<p><a href="/metrics">Metrics</a> &middot; <a href="/api/v1/targets">JSON API</a> &middot; '
        '<a href="/-/healthy">Health</a> &middot; <a href="/-/ready">Ready</a></p>'
        f'<p id="summary">{summary}</p>{form}<p>{nav}</p>'
        '<table id="vms"><tr>'
        + th("VM", "name")
        + '<th class="l">labels</th>'
        + th("status", "status")
        + th(html.escape(policy_head), "policy")
        + "<th>min bandwidth</th>"
        + th("dirty rate (1 s)", "dirty")
        + '<th class="l">zero pages</th><th class="l">QEMU</th>'
        + th("measured", "age")
        + '<th class="l">last error</th></tr>'
        + "".join(rows)
        + f"</table><p>{nav}</p><p>{footer}</p></body></html>"
    )


def _row(t: TargetState, cell: tuple[int, int] | None, now: float) -> str:
    name = html.escape(t.name)
    labels = ", ".join(f"{html.escape(k)}={html.escape(v)}" for k, v in sorted(t.labels.items()))
    status = status_of(t)
    at_policy = min_bw = dirty = zero = qemu = ""
    m = t.measurement
    if m is not None:
        rate = dirty_rate(m)
        dirty = "" if rate is None else f"{rate / MIB:.1f} MiB/s"
        share = "unknown" if m.zero_pages is None else f"{100 * m.zero_pages / m.total_pages:.0f}%"
        zero = f"{share} ({html.escape(m.zero_pages_method)})"
        qemu = html.escape(m.qemu_version or "")
    grid_html = ""
    if (
        t.prediction is not None
        and t.grid is not None
        and cell is not None
        and cell[0] < len(t.grid.bandwidths)
        and cell[1] < len(t.grid.downtimes)
    ):
        s = float(t.prediction.seconds[cell])
        at_policy = "-" if math.isnan(s) else format_eta(math.ceil(s))
        b = float(t.prediction.min_bandwidth[cell[1]])
        min_bw = "…" if not derived(t) else ("-" if math.isnan(b) else format_bandwidth(b))
        grid_html = f"<details><summary>grid</summary>{_grid_html(t, t.prediction, t.grid)}</details>"
    age = "never" if t.last_success is None else f"{now - t.last_success:.0f} s ago"
    error = html.escape(t.last_error or "")
    api = html.escape(quote(t.name, safe=""), quote=True)
    return (
        f'<tr class="vm {status}" data-vm="{html.escape(t.name, quote=True)}">'
        f'<td class="l"><a href="/api/v1/targets/{api}">{name}</a>{grid_html}</td>'
        f'<td class="l">{labels}</td><td class="l">{status}</td><td>{at_policy}</td><td>{min_bw}</td>'
        f'<td>{dirty}</td><td class="l">{zero}</td><td class="l">{qemu}</td><td>{age}</td>'
        f'<td class="l">{error}</td></tr>'
    )
