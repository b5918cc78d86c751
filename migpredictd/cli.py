"""The ``migpredictd`` command: ``predict``, ``measure``, ``run``, ``check-config``, ``demo``.

Wiring only: each subcommand parses its arguments, calls the core or an edge, and turns our typed
errors into one line on stderr and a non-zero exit status (never a traceback).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from migpredictd import __version__
from migpredictd.core.calibration import limiter_for
from migpredictd.core.errors import InputError, MigpredictdError
from migpredictd.core.measurement import Measurement, parse_measurement
from migpredictd.core.model import build_model
from migpredictd.core.policies import POLICIES, PolicyOutcome, make_policy, outcome_to_json, predict_policy
from migpredictd.core.predictor import (
    DEFAULT_BANDWIDTHS,
    DEFAULT_DOWNTIMES,
    Grid,
    PredictorSettings,
    VMPrediction,
    make_grid,
    predict_grid,
)
from migpredictd.core.table import prediction_to_json, render_table, render_tables
from migpredictd.core.units import format_bandwidth, format_downtime, format_eta, parse_duration

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def read_measurements(stream: TextIO, name: str) -> list[Measurement]:
    """One JSON object, or JSON Lines with one object per VM.

    :raises InputError: naming the line (for JSON Lines) and the field.
    """
    text = stream.read()
    if not text.strip():
        raise InputError("empty input: expected a measurement JSON object", source=name)
    try:
        return [parse_measurement(json.loads(text), source=name)]
    except json.JSONDecodeError:
        pass
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"not JSON: {e.msg} (column {e.colno})", source=where) from e
        out.append(parse_measurement(data, source=where))
    return out


def _split_list(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _cmd_predict(args: argparse.Namespace) -> int:
    # Tens of objects per VM are made and none freed until the command ends, and none is in a cycle:
    # the cycle collector would only walk them again and again (a third of the parse time at 4,000 VMs).
    gc.disable()
    try:
        return _predict(args)
    finally:
        gc.enable()


def _predict(args: argparse.Namespace) -> int:
    grid = make_grid(args.bandwidths, args.downtimes)
    settings = PredictorSettings(mode=args.mode, deadline_seconds=args.deadline)
    if args.file in (None, "-"):
        measurements = read_measurements(sys.stdin, "stdin")
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                measurements = read_measurements(f, args.file)
        except OSError as e:
            raise InputError(e.strerror or str(e), source=args.file) from e
    if args.format == "table" and args.policy is None:  # the common case, thousands of VMs
        sys.stdout.write("".join(_tables(measurements, grid, settings)))
        return EXIT_OK
    predictions = _predict_grid(measurements, grid, settings, derived=args.format == "json")
    policy = None if args.policy is None else make_policy(args.policy, _policy_options(args.policy_option))
    out: list[str] = []
    for m, p in zip(measurements, predictions, strict=True):
        outcomes = (
            None
            if policy is None
            else predict_policy(
                build_model(m, mode="qemu"),
                policy,
                grid.bandwidths,
                downtimes=grid.downtimes,
                vcpu_utilization=m.vcpu_utilization,
                deadline_seconds=settings.deadline_seconds,
                stop_copy_speedup=settings.stop_copy_speedup,
                tcg=m.accelerator == "tcg",
            )
        )
        if args.format == "table":
            if len(measurements) > 1:
                out.append(f"# {m.target or ''}\n")
            out.append(render_table(p, grid))
            if policy is not None and outcomes is not None:
                out.append(render_policy_table(policy.name, outcomes))
        else:
            doc: dict[str, Any] = {"target": m.target, "mode": settings.mode}
            doc.update(prediction_to_json(p, grid))
            if policy is not None and outcomes is not None:
                doc["policy"] = {"name": policy.name, "options": dict(policy.options)}
                doc["policy_predictions"] = [outcome_to_json(o) for o in outcomes]
            out.append(json.dumps(doc) + "\n")
    sys.stdout.write("".join(out))
    return EXIT_OK


# The table path predicts and renders this many VMs at a time: the numpy temporaries of a few thousand
# VMs' grids take tens of MB, which a fresh process pays for in page faults; a batch of a thousand
# reuses its memory, and its fixed cost (the last cells' passes) is paid a few times only.
TABLE_BATCH = 1000


def _predict_grid(
    measurements: Sequence[Measurement], grid: Grid, settings: PredictorSettings, *, derived: bool
) -> list[VMPrediction]:
    return predict_grid(
        [build_model(m, mode=settings.mode) for m in measurements],
        grid,
        settings,
        derived=derived,
        limiters=[limiter_for(m) for m in measurements],
    )


def _tables(measurements: Sequence[Measurement], grid: Grid, settings: PredictorSettings) -> list[str]:
    """Each VM's table, preceded by a ``# target`` line when there are several."""
    out: list[str] = []
    for start in range(0, len(measurements), TABLE_BATCH):
        batch = measurements[start : start + TABLE_BATCH]
        tables = render_tables(_predict_grid(batch, grid, settings, derived=False), grid)
        if len(measurements) == 1:
            return tables
        for m, table in zip(batch, tables, strict=True):
            out += (f"# {m.target or ''}\n", table)
    return out


def _add_predict(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "predict",
        help="predict migration times from a measurement (JSON or JSON Lines)",
        description="Reads a measurement (canonical, extended calc-dirty-rate, or a sweep) and prints the "
        "predicted pre-copy migration time per bandwidth and max downtime. Bandwidths: bare numbers are "
        "bytes/s, or 100Mbps, 10Gbps (binary, as in the seed: 1 Gbps = 2^30/8 B/s), 1GiB/s. Downtimes: "
        "bare numbers are ms, or 500ms, 5s, unlim.",
    )
    p.add_argument("file", nargs="?", help="input file (default: stdin)")
    p.add_argument(
        "--mode", choices=("qemu", "seed"), default="qemu", help="qemu (default) or the seed's algorithm"
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--bandwidths", type=_split_list, default=list(DEFAULT_BANDWIDTHS), metavar="LIST")
    p.add_argument("--downtimes", type=_split_list, default=list(DEFAULT_DOWNTIMES), metavar="LIST")
    p.add_argument(
        "--deadline",
        type=lambda s: parse_duration(s, default_unit="s"),
        default=3600.0,
        help="a migration still running after this is 'does not converge' (default 1h)",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        help="also predict what this orchestrator does with the migration, per bandwidth (docs/policies.md)",
    )
    p.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the policy, by its product's own name (e.g. live_migration_downtime=500)",
    )
    p.set_defaults(handler=_cmd_predict)


def _policy_options(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` items -> a dict; InputError naming the item otherwise."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"expected KEY=VALUE, got {item!r}", field="--policy-option")
        out[key.strip()] = value
    return out


def render_policy_table(name: str, outcomes: list[PolicyOutcome]) -> str:
    """The policy's outcome per bandwidth (and max downtime, for auto-converge and postcopy)."""
    rows = [
        f"Policy {name}:",
        "  bandwidth | max downtime | outcome       |     time | downtime | throttle | post-copy",
    ]
    for o in outcomes:
        dt = "-" if o.max_downtime is None else format_downtime(o.max_downtime)
        secs = "-" if o.seconds is None else format_eta(math.ceil(o.seconds))
        down = "-" if o.downtime_seconds is None else f"{o.downtime_seconds * 1000:.0f}ms"
        post = "-" if o.postcopy_seconds is None else f"{o.postcopy_seconds:.1f}s"
        rows.append(
            f"  {format_bandwidth(o.bandwidth):>9} | {dt:>12} | {o.outcome:<13} | {secs:>8} | {down:>8} | "
            f"{o.max_throttle_percent:>7.0f}% | {post:>9}"
        )
    return "\n".join(rows) + "\n"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser. The edge subcommands' options come from their modules, which import
    the daemon, QMP and HTTP stacks; only the subcommand that ``argv`` names (all of them without
    ``argv``) imports its own, so that ``predict`` starts without them."""
    parser = argparse.ArgumentParser(prog="migpredictd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"migpredictd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    # The top level has no option that takes a value: its first other word is the subcommand.
    named = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    _add_edges(sub, named)
    return parser


def _add_edges(sub: argparse._SubParsersAction[argparse.ArgumentParser], named: str | None) -> None:
    """Subcommands that live in edge modules (QMP, HTTP, the rig): each one's module is imported when
    it is ``named`` (every one when ``named`` is None)."""
    p = sub.add_parser("measure", help="measure one VM over QMP and print the measurement JSON")
    if named in (None, "measure"):
        from migpredictd.qemu.measure import add_measure_arguments, measure_command

        add_measure_arguments(p)
        p.set_defaults(handler=measure_command)
    p = sub.add_parser("run", help="run the daemon: measure every target, serve Prometheus metrics")
    if named in (None, "run"):
        from migpredictd.serve.daemon import add_run_arguments, run_command

        add_run_arguments(p)
        p.set_defaults(handler=run_command)
    p = sub.add_parser("check-config", help="validate a config file; print every problem")
    p.add_argument("file")
    p.set_defaults(handler=lambda a: _check_config(a.file))
    p = sub.add_parser("demo", help="boot two small real QEMU guests (the rig) and run the daemon on them")
    if named in (None, "demo"):
        from migpredictd.lab.demo import add_demo_arguments, demo_command

        add_demo_arguments(p)
        p.set_defaults(handler=demo_command)


def _check_config(file: str) -> int:
    from migpredictd.config.schema import check_config_main

    return check_config_main([file])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        args = parser.parse_args(argv)
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except MigpredictdError as e:
        print(f"migpredictd {getattr(args, 'command', '')}: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, InputError) else EXIT_FAILURE
    except ValueError as e:  # settings and grids validate with ValueError
        print(f"migpredictd: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
