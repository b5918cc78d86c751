"""The status page in a real browser: Debian's headless chromium loads it from a daemon that measures
real QEMU guests, behind basic auth, and the grid it shows is checked against ``/api/v1``.

Fails (never skips) when chromium is missing: ``bash scripts/install-rig.sh`` installs it.
"""

from __future__ import annotations

import base64
import json
import math
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from migpredictd.core.units import format_eta
from migpredictd.lab.rig.guest import GuestSpec
from tests.daemon_helpers import DaemonProcess, free_port
from tests.rig_fixtures import StartGuest
from tests.test_status_page import Cells
from tests.waits import wait_until

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
USER, PASSWORD = "operator", "s3cret-Pa55"


def get(url: str, *, auth: bool = True) -> tuple[int, bytes]:
    req = urllib.request.Request(url)  # noqa: S310 (a loopback http URL we built)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (a loopback URL we built)
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError):  # not listening yet
        return 0, b""


def chromium_dom(url: str, profile: Path) -> str:
    """The page's DOM after chromium loaded it (credentials in the URL answer the basic-auth challenge)."""
    browser = shutil.which("chromium")
    assert browser, "chromium missing: bash scripts/install-rig.sh (apt-get install chromium)"
    out = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout


@pytest.mark.timeout(300)
def test_chromium_shows_the_grid_of_real_guests_behind_basic_auth(
    rig_guest_factory: StartGuest, tmp_path: Path
) -> None:
    idle = rig_guest_factory(GuestSpec(qemu="10.0", memory_mib=256, touch_mib=32))
    busy = rig_guest_factory(GuestSpec(qemu="7.2", memory_mib=256, touch_mib=96, wss_mib=64, rate_mib=48))
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(8)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "global:\n  interval: 30s\n  jitter: 1s\ntargets:\n"
        f"  - {{name: idle, qmp: '{idle.qmp_address}', labels: {{role: db}},\n"
        "      measurement: {periods: [250ms, 1s]}}\n"
        f"  - {{name: busy, qmp: '{busy.qmp_address}', labels: {{role: web}},\n"
        "      measurement: {periods: [1s, 2s]}}\n"
    )
    d = DaemonProcess(config, free_port(), f"--web.config.file={web}")
    base = f"http://127.0.0.1:{d.port}"
    try:

        def derived() -> bool:
            code, body = get(f"{base}/api/v1/targets")
            if code != 200:
                return False
            ts = json.loads(body)["targets"]
            return len(ts) == 2 and all(
                t["prediction"] is not None and t["prediction"]["derived"] for t in ts
            )

        wait_until(derived, timeout=150, what="both guests measured and derived", detail=d.logs)
        # basic auth guards the page and the API like /metrics
        assert get(f"{base}/", auth=False)[0] == 401
        assert get(f"{base}/api/v1/targets", auth=False)[0] == 401
        code, body = get(f"{base}/api/v1/targets/nobody")
        assert code == 404
        assert "error" in json.loads(body)

        api = {t["name"]: t for t in json.loads(get(f"{base}/api/v1/targets")[1])["targets"]}
        # the API's numbers are /metrics' numbers (read from the same snapshot, a moment apart: both
        # guests are measured every 30 s, so compare the ones whose measurement did not change)
        metrics = {
            (smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(get(f"{base}/metrics")[1].decode())
            for smp in fam.samples
        }
        compared = 0
        for name, t in api.items():
            grid = t["prediction"]["grid"]
            nd = len(grid["max_downtimes"])
            if (
                metrics.get(("migpredictd_last_success_timestamp_seconds", (("vm", name),)))
                != t["health"]["last_success_timestamp_seconds"]
            ):
                continue
            for k, cell in enumerate(t["prediction"]["predictions"]):
                bw, dt = grid["bandwidths"][k // nd], grid["max_downtimes"][k % nd]
                labels = (("bandwidth", bw), ("max_downtime", dt), ("vm", name))
                exposed = metrics.get(("migpredictd_predicted_migration_seconds", labels))
                assert (exposed is None) == (cell["migration_seconds"] is None), (name, cell)
                if exposed is not None:
                    assert exposed == pytest.approx(cell["migration_seconds"], rel=1e-9)
                    compared += 1
        assert compared > 0
        dom = chromium_dom(f"http://{USER}:{PASSWORD}@127.0.0.1:{d.port}/", tmp_path / "chromium")
        assert 'id="summary"' in dom
        cells = Cells()
        cells.feed(dom)
        assert {vm for vm, *_ in cells.cells} == {"idle", "busy"}
        dashes = 0
        for name, t in api.items():
            pred = t["prediction"]
            nd = len(pred["grid"]["max_downtimes"])
            shown = {(r, c): (text, conv) for vm, r, c, text, conv in cells.cells if vm == name}
            for k, cell in enumerate(pred["predictions"]):
                i, j = divmod(k, nd)
                text, conv = shown[(i + 1, j)]
                if cell["converges"]:
                    assert conv == "true", (name, cell)
                    assert text == format_whole(cell["migration_seconds"]), (name, cell, text)
                else:
                    assert (text, conv) == ("-", "false"), (name, cell)
                    dashes += 1
        # the busy guest (48 MiB/s over 64 MiB) cannot converge at the grid's slowest links
        assert dashes > 0

        # the host summary counts what the API says
        def at_policy(t: dict[str, Any]) -> bool:
            """Whether ``t`` converges at 10Gbps and 500ms, the summary's cell (by the grid's labels)."""
            grid = t["prediction"]["grid"]
            i, j = grid["bandwidths"].index("10Gbps"), grid["max_downtimes"].index("500ms")
            return bool(t["prediction"]["predictions"][i * len(grid["max_downtimes"]) + j]["converges"])

        stuck = sum(not at_policy(t) for t in api.values())
        assert f'<b id="not-converging">{stuck}</b> of 2 predicted VMs' in dom
        # filtering by label, through the browser too
        dom = chromium_dom(
            f"http://{USER}:{PASSWORD}@127.0.0.1:{d.port}/?label=role%3Dweb", tmp_path / "chromium"
        )
        assert 'data-vm="busy"' in dom
        assert 'data-vm="idle"' not in dom
    finally:
        d.stop()


def format_whole(seconds: float) -> str:
    return format_eta(math.ceil(seconds))
