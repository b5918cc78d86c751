"""``migpredictd demo``: boot two small real QEMU guests with the rig and run the daemon against them.

One guest is idle (QEMU 7.2), one rewrites a 48 MiB working set at 24 MiB/s (QEMU 10.0); a third target
points at a socket nobody listens on, to show a target that is down. Metrics are served on the usual
port until Ctrl-C; every QEMU started here is killed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path

from migpredictd.lab.rig.guest import Guest, GuestSpec
from migpredictd.serve.daemon import add_run_arguments, serve

DEMO_GUESTS = {
    "demo-idle": GuestSpec(qemu="7.2", memory_mib=256, touch_mib=64, wss_mib=0, rate_mib=0),
    "demo-busy": GuestSpec(qemu="10.0", memory_mib=256, touch_mib=96, wss_mib=48, rate_mib=24),
}


def demo_config(sockets: dict[str, str], dead_socket: str, interval: str) -> str:
    """The YAML the demo runs with: the default grid, short sweeps, a short interval."""
    lines = [
        "global:",
        f"  interval: {interval}",
        "  jitter: 2s",
        "  measurement:",
        "    periods: [1s, 2s, 4s]",
        "targets:",
    ]
    for name, address in [*sockets.items(), ("demo-missing", f"unix:{dead_socket}")]:
        lines += [f"  - name: {name}", f"    qmp: {address}", "    labels: {demo: 'true'}"]
    return "\n".join(lines) + "\n"


def demo_command(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="migpredictd-demo-")))
        sockets = {}
        for name, spec in DEMO_GUESTS.items():
            print(f"booting {name} (QEMU {spec.qemu}, {spec.memory_mib} MiB) ...", flush=True)
            guest = stack.enter_context(Guest(spec))
            sockets[name] = guest.qmp_address
        config = workdir / "demo.yaml"
        config.write_text(demo_config(sockets, str(workdir / "nobody.qmp"), args.interval))
        print(f"config: {config}\nmetrics: http://{args.listen}/metrics (Ctrl-C to stop)", flush=True)
        args.config_file = str(config)
        return serve(args)
    return 1


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.set_defaults(listen="127.0.0.1:9842")
    parser.add_argument("--interval", default="30s", help="measurement interval of the demo targets")
    parser.set_defaults(config_file=None)
