"""The YAML config: defaults, every class of problem with its exact line and key, targets.d, scale."""

from __future__ import annotations

import dataclasses
import math
import textwrap
import time
from pathlib import Path

import pytest

from migpredictd.config.schema import (
    DEFAULT_GRID,
    Labels,
    check_config_main,
    load_config,
    load_full_config,
    load_targets_dir,
)
from migpredictd.core.errors import ConfigError, ConfigProblem
from migpredictd.core.predictor import PredictorSettings
from migpredictd.qemu.settings import MeasureSettings

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "example.yaml"

GIB_BITS = (1 << 30) / 8  # bytes/s of 1Gbps in the seed's binary units


def write(directory: Path, text: str, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems_of(path: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_full_config(path)
    return list(info.value.problems)


def where(problems: list[ConfigProblem]) -> list[tuple[int | None, str]]:
    return [(p.line, p.key) for p in problems]


def only(problems: list[ConfigProblem]) -> ConfigProblem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    return problems[0]


# --- defaults and the example -------------------------------------------------------------------------


def test_minimal_config_has_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "targets: []\n"))
    assert config.targets == ()
    assert config.interval_seconds == 300.0
    assert config.jitter_seconds == 30.0
    assert config.max_concurrent == 8
    assert config.targets_dir is None
    assert config.prediction == PredictorSettings()
    assert config.measurement == MeasureSettings()
    assert config.grid == DEFAULT_GRID
    # The seed's table: 100 Mbps .. 40 Gbps (binary) x 125 ms .. unlimited.
    assert DEFAULT_GRID.bandwidths[0] == 100 * (1 << 20) / 8
    assert DEFAULT_GRID.bandwidths[-1] == 40 * GIB_BITS
    assert DEFAULT_GRID.downtimes == (0.125, 0.25, 0.5, 1.0, 5.0, math.inf)
    assert DEFAULT_GRID.downtime_labels[-1] == "unlim"


def test_example_loads_and_its_global_section_equals_the_defaults(tmp_path: Path) -> None:
    example = load_full_config(EXAMPLE)
    defaults = load_config(write(tmp_path, "targets: []\n"))
    same = ("interval_seconds", "jitter_seconds", "max_concurrent", "grid", "prediction", "measurement")
    for name in same:
        assert getattr(example, name) == getattr(defaults, name), name
    assert [t.name for t in example.targets] == ["vm1", "102", "lab-vm"]
    vm1, vm102, lab = example.targets
    assert vm1.qmp == "unix:/run/qemu-server/101.qmp"
    assert dict(vm1.labels) == {"team": "db", "rack": "r12"}
    assert vm1.interval_seconds == 60.0
    # A target's measurement section merges over the global one key by key.
    assert vm1.measurement == dataclasses.replace(MeasureSettings(), sample_pages=8192)
    assert vm1.source == f"{EXAMPLE}:{_line_of(EXAMPLE, '- name: vm1')}"
    # `<<: *db` merged the x-db anchor's labels; defaults fill the rest.
    assert dict(vm102.labels) == {"team": "db"}
    assert vm102.interval_seconds == 300.0
    assert vm102.measurement == MeasureSettings()
    assert lab.qmp == "tcp:127.0.0.1:4444"
    assert dict(lab.labels) == {}


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_config_is_frozen_hashable_and_equal_across_loads() -> None:
    a, b = load_full_config(EXAMPLE), load_full_config(EXAMPLE)
    assert a == b
    assert hash(a) == hash(b)  # reload can diff configs and targets as set members
    assert {a.targets[0], b.targets[0]} == {a.targets[0]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.targets[0].name = "x"  # type: ignore[misc]
    assert Labels({"a": "1"}) == {"a": "1"}
    with pytest.raises(TypeError):
        a.targets[0].labels["team"] = "web"  # type: ignore[index]


def test_every_global_key_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          interval: 2m
          jitter: 500ms
          max_concurrent: 3
          measurement:
            strategy: sweep-s
            periods: [1s, 2s]
            sample_pages: 512
            zero_pages: none
            guest_sample_pages: 100
            connect_timeout: 1s
            command_timeout: 2s
            poll_interval: 10ms
            settle_timeout: 3s
          prediction:
            mode: seed
            deadline: 30m
            setup: 1s
            switchover: 200ms
            stop_copy_speedup: 2.5
            transport_overhead: 0.05
            iteration: 50ms
            max_syncs: 10
          grid:
            bandwidths: [10Gbps, 1.5GiB/s]
            max_downtimes: [300ms, 2000s, unlim]
        targets_dir: more
        targets:
          - {name: a, qmp: /run/a.qmp}
        """,
    )
    config = load_config(path)
    assert (config.interval_seconds, config.jitter_seconds, config.max_concurrent) == (120.0, 0.5, 3)
    assert config.measurement == MeasureSettings(
        strategy="sweep-s", periods_ms=(1000.0, 2000.0), sample_pages=512, zero_pages="none",
        guest_sample_pages=100, connect_timeout=1.0, command_timeout=2.0, poll_interval=0.01,
        settle_timeout=3.0,
    )  # fmt: skip
    assert config.prediction == PredictorSettings(
        mode="seed", deadline_seconds=1800.0, setup_seconds=1.0, switchover_seconds=0.2,
        stop_copy_speedup=2.5, transport_overhead=0.05, iteration_seconds=0.05, max_syncs=10,
    )  # fmt: skip
    assert config.grid.bandwidths == (10 * GIB_BITS, 1.5 * (1 << 30))
    assert config.grid.bandwidth_labels == ("10Gbps", "1.5GiB/s")  # labels are the text as written
    assert config.grid.downtimes == (0.3, 2000.0, math.inf)
    assert config.grid.downtime_labels == ("300ms", "2000s", "unlim")
    assert config.targets_dir == str(tmp_path / "more")  # relative to the config file
    assert config.targets[0].interval_seconds == 120.0
    assert config.targets[0].measurement == config.measurement


def test_target_periods_null_resets_to_the_strategy_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          measurement: {periods: [125ms, 1s]}
        targets:
          - name: a
            qmp: /a
            measurement: {periods: null, strategy: sweep-s}
        """,
    )
    (target,) = load_config(path).targets
    assert target.measurement.periods_ms is None
    assert target.measurement.strategy == "sweep-s"


# --- one class of problem at a time, exact lines --------------------------------------------------------


def test_unknown_keys_everywhere_with_suggestions(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          intervall: 5m
          measurement:
            sample_page: 4096
        target: []
        targets:
          - name: a
            qmp: /a
            label: {x: y}
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [
        (2, "global.intervall"),
        (4, "global.measurement.sample_page"),
        (5, "target"),
        (9, "targets[0].label"),
    ]
    assert "did you mean 'interval'?" in problems[0].message
    assert "did you mean 'sample_pages'?" in problems[1].message
    assert "did you mean 'targets'?" in problems[2].message
    assert all(p.file == str(path) for p in problems)


def test_wrong_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          interval: [5m]
          max_concurrent: "8"
          measurement: 5
          prediction:
            max_syncs: true
            stop_copy_speedup: fast
        targets:
          - name: 101
            qmp: /a
            labels: [team]
          - just-a-string
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [
        (2, "global.interval"),
        (3, "global.max_concurrent"),
        (4, "global.measurement"),
        (6, "global.prediction.max_syncs"),
        (7, "global.prediction.stop_copy_speedup"),
        (9, "targets[0].name"),
        (11, "targets[0].labels"),
        (12, "targets[1]"),
    ]
    messages = [p.message for p in problems]
    assert messages[0] == "must be a string, not a list"
    assert messages[1] == "must be an integer, not a string"
    assert messages[2] == "must be a mapping, not an integer"
    assert messages[3] == "must be an integer, not a boolean"  # YAML true is not 1
    assert messages[5] == "must be a string, not an integer (quote it: '101')"
    assert messages[7] == "must be a mapping, not a string"


def test_top_level_must_be_a_mapping_and_targets_a_list(tmp_path: Path) -> None:
    assert where(problems_of(write(tmp_path, "- a\n- b\n"))) == [(1, "")]
    p = only(problems_of(write(tmp_path, "targets: {name: a}\n")))
    assert (p.line, p.key, p.message) == (1, "targets", "must be a list, not a mapping")


def test_duplicate_yaml_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          interval: 5m
          interval: 1m
        targets:
          - name: a
            qmp: /a
            qmp: /b
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [(3, "global.interval"), (7, "targets[0].qmp")]
    assert problems[0].message == "duplicate key 'interval' (first at line 2)"
    assert problems[1].message == "duplicate key 'qmp' (first at line 6)"


def test_duplicate_target_names_name_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        targets:
          - name: a
            qmp: /a
          - name: b
            qmp: /b
          - name: a
            qmp: /c
        """,
    )
    p = only(problems_of(path))
    assert (p.line, p.key) == (6, "targets[2].name")
    assert p.message == f"duplicate target name 'a' (first defined at {path}:2)"


def test_a_broken_target_still_claims_its_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        targets:
          - name: a
            qmp: nonsense
          - name: a
            qmp: /b
        """,
    )
    assert where(problems_of(path)) == [(3, "targets[0].qmp"), (4, "targets[1].name")]


def test_two_targets_on_one_qmp_socket(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        targets:
          - name: a
            qmp: unix:/run/a.qmp
          - name: b
            qmp: /run/x/../a.qmp
        """,
    )
    p = only(problems_of(path))
    assert (p.line, p.key) == (5, "targets[1].qmp")
    assert f"same QMP socket as 'a' ({path}:2)" in p.message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5", "duration 5 needs a unit, e.g. '30s'"),
        ("'30'", "duration '30' needs a unit, e.g. '30s'"),
        ("5x", "'5x': unknown duration unit 'x' (use ms, s, m, h)"),
        ("soon", "'soon' is not a duration: expected a number with an optional unit"),
        ("unlim", "'unlim': an unlimited duration is not allowed here"),
        ("0s", "must be at least 1s, not '0s'"),
        ("500ms", "must be at least 1s, not '500ms'"),
        ("-1m", "'-1m' is not a duration: expected a number with an optional unit"),
    ],
)
def test_bad_intervals(tmp_path: Path, value: str, message: str) -> None:
    path = write(tmp_path, f"global:\n  jitter: 0s\n  interval: {value}\ntargets: []\n")
    p = only(problems_of(path))
    assert (p.line, p.key, p.message) == (3, "global.interval", message)


def test_bad_target_interval_and_jitter(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          interval: 10s
          jitter: 10s
        targets:
          - {name: a, qmp: /a, interval: 0ms}
          - {name: b, qmp: /b, interval: 20s}
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [(3, "global.jitter"), (5, "targets[0].interval")]
    assert problems[0].message == "must be shorter than global.interval (10s)"


def test_target_interval_must_exceed_jitter(tmp_path: Path) -> None:
    path = write(tmp_path, "targets:\n  - {name: a, qmp: /a, interval: 20s}\n")
    p = only(problems_of(path))
    assert (p.line, p.key, p.message) == (2, "targets[0].interval", "must be longer than global.jitter (30s)")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1000", "bandwidth 1000 needs a unit, e.g. '1Gbps'"),
        ("1Gbit", "'1Gbit': unknown bandwidth unit 'gbit' (use Mbps, Gbps, MiB/s, MB/s, ...)"),
        ("0Gbps", "'0Gbps': a bandwidth must be positive"),
        ("fast", "'fast' is not a bandwidth: expected a number with an optional unit"),
    ],
)
def test_bad_bandwidths(tmp_path: Path, value: str, message: str) -> None:
    path = write(
        tmp_path, f"global:\n  grid:\n    bandwidths:\n      - 1Gbps\n      - {value}\ntargets: []\n"
    )
    p = only(problems_of(path))
    assert (p.line, p.key, p.message) == (5, "global.grid.bandwidths[1]", message)


def test_grid_axes_increase_and_downtimes_fit_qemu(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          grid:
            bandwidths: [1Gbps, 1024Mbps, 100Mbps]
            max_downtimes:
              - 2001s
              - unlim
              - 5s
        targets: []
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [
        (3, "global.grid.bandwidths[1]"),
        (3, "global.grid.bandwidths[2]"),
        (5, "global.grid.max_downtimes[0]"),
        (7, "global.grid.max_downtimes[2]"),
    ]
    assert problems[0].message == "must increase strictly (same as '1Gbps')"
    assert problems[1].message == "must increase strictly (not above '1024Mbps')"
    assert problems[2].message == "QEMU's downtime-limit is at most 2000s; use 'unlim' for no limit"


def test_huge_grids_are_refused(tmp_path: Path) -> None:
    many = ", ".join(f"{i}Mbps" for i in range(1, 66))
    path = write(tmp_path, f"global:\n  grid:\n    bandwidths: [{many}]\ntargets: []\n")
    p = only(problems_of(path))
    assert (p.line, p.key) == (3, "global.grid.bandwidths")
    assert p.message == "has 65 bandwidths; at most 64 are allowed (label cardinality)"
    # 40 x 40 axes are each fine, but 1,600 cells are not.
    bws = ", ".join(f"{i}Mbps" for i in range(1, 41))
    dts = ", ".join(f"{i}ms" for i in range(1, 41))
    path = write(
        tmp_path, f"global:\n  grid:\n    bandwidths: [{bws}]\n    max_downtimes: [{dts}]\ntargets: []\n"
    )
    p = only(problems_of(path))
    assert (p.line, p.key) == (2, "global.grid")
    assert p.message.startswith("40 x 40 = 1600 cells; at most 1024")
    empty = only(problems_of(write(tmp_path, "global:\n  grid:\n    max_downtimes: []\ntargets: []\n")))
    assert (empty.line, empty.key, empty.message) == (
        3,
        "global.grid.max_downtimes",
        "needs at least one max downtime",
    )


@pytest.mark.parametrize(
    ("qmp", "message"),
    [
        ("tcp:host", "expected tcp:HOST:PORT, got 'tcp:host'"),
        ("tcp:host:99999", "port 99999 out of range 1..65535"),
        ("tcp::4444", "expected tcp:HOST:PORT, got 'tcp::4444'"),
        ("unix:", "unix socket path is empty"),
        ("run/a.qmp", "expected unix:/path, tcp:HOST:PORT or /path, got 'run/a.qmp'"),
        ("localhost:4444", "expected unix:/path, tcp:HOST:PORT or /path, got 'localhost:4444'"),
    ],
)
def test_bad_qmp_addresses(tmp_path: Path, qmp: str, message: str) -> None:
    path = write(tmp_path, f"targets:\n  - name: a\n    qmp: '{qmp}'\n")
    p = only(problems_of(path))
    assert (p.line, p.key, p.message) == (3, "targets[0].qmp", message)


def test_nul_byte_in_a_qmp_address_is_a_problem_of_its_line(tmp_path: Path) -> None:
    # YAML's double-quoted "\0" is a NUL byte; no socket path can hold one.
    path = write(tmp_path, 'targets:\n  - name: a\n    qmp: "unix:/run/a\\0b"\n')
    p = only(problems_of(path))
    assert (p.line, p.key, p.message) == (3, "targets[0].qmp", "contains a NUL byte: 'unix:/run/a\\x00b'")


def test_good_qmp_addresses(tmp_path: Path) -> None:
    addresses = ["unix:/run/a", "/run/b", "./c.qmp", "tcp:127.0.0.1:4444", "tcp:[::1]:4445", "tcp:host:1"]
    items = "".join(f"  - {{name: t{i}, qmp: '{a}'}}\n" for i, a in enumerate(addresses))
    config = load_config(write(tmp_path, f"targets:\n{items}"))
    assert [t.qmp for t in config.targets] == addresses


def test_label_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        targets:
          - name: a
            qmp: /a
            labels:
              ok_label: fine
              9lives: x
              __meta: x
              vm: x
              bandwidth: x
              instance: x
              team-name: x
              count: 3
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [
        (6, "targets[0].labels.9lives"),
        (7, "targets[0].labels.__meta"),
        (8, "targets[0].labels.vm"),
        (9, "targets[0].labels.bandwidth"),
        (10, "targets[0].labels.instance"),
        (11, "targets[0].labels.team-name"),
        (12, "targets[0].labels.count"),
    ]
    assert problems[2].message == "'vm' is a label migpredictd or Prometheus already uses"
    assert problems[6].message == "must be a string, not an integer (quote it: '3')"


def test_too_many_labels(tmp_path: Path) -> None:
    labels = ", ".join(f"l{i}: v" for i in range(17))
    p = only(problems_of(write(tmp_path, f"targets:\n  - name: a\n    qmp: /a\n    labels: {{{labels}}}\n")))
    assert (p.line, p.key) == (4, "targets[0].labels")
    assert p.message.startswith("has 17 labels; at most 16")


def test_target_names(tmp_path: Path) -> None:
    long = "v" * 129
    path = write(
        tmp_path,
        f"""
        targets:
          - {{name: '', qmp: /a}}
          - {{name: '   ', qmp: /b}}
          - {{name: {long}, qmp: /c}}
          - {{name: ' padded', qmp: /d}}
          - {{name: "tab\\there", qmp: /e}}
          - {{qmp: /f}}
          - {{name: {"v" * 128}, qmp: /g}}
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [
        (2, "targets[0].name"),
        (3, "targets[1].name"),
        (4, "targets[2].name"),
        (5, "targets[3].name"),
        (6, "targets[4].name"),
        (7, "targets[5]"),
    ]
    assert problems[0].message == "must not be empty"
    assert problems[2].message == "is 129 characters long; at most 128"
    assert problems[5].message == "missing required key 'name'"


def test_measurement_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          measurement:
            strategy: fastest
            zero_pages: guess
            sample_pages: 100
            connect_timeout: 0s
            periods: [10ms, 1s, 1s, 2m]
        targets: []
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [
        (3, "global.measurement.strategy"),
        (4, "global.measurement.zero_pages"),
        (5, "global.measurement.sample_pages"),
        (6, "global.measurement.connect_timeout"),
        (7, "global.measurement.periods[0]"),
        (7, "global.measurement.periods[2]"),
        (7, "global.measurement.periods[3]"),
    ]
    assert problems[0].message == "must be one of auto, extended, sweep-ms, sweep-s, not 'fastest'"
    assert problems[2].message == "must be in 128..16384, not 100"
    assert problems[3].message == "must be greater than 0s, not '0s'"
    assert problems[4].message == "must be within 50ms..60s (calc-dirty-rate's range), not 10ms"
    assert problems[5].message == "periods must increase strictly"


def test_sweeps_must_fit_the_interval_and_the_strategy(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          interval: 10s
          jitter: 1s
          measurement: {periods: [2s, 4s, 8s]}
        targets:
          - name: a
            qmp: /a
            measurement: {strategy: sweep-s, periods: [500ms, 1s]}
          - name: b
            qmp: /b
            interval: 1m
        """,
    )
    problems = problems_of(path)
    assert where(problems) == [(4, "global.measurement.periods"), (8, "targets[0].measurement.periods")]
    assert problems[0].message == "one sweep samples for 14s, not less than the interval (10s)"
    assert problems[1].message == "strategy sweep-s (QEMU 7.2 .. 8.1) takes whole seconds only"


def test_prediction_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          prediction:
            mode: exact
            deadline: 0s
            transport_overhead: 1.5
            stop_copy_speedup: 0
            max_syncs: 1
            iteration: 1
        targets: []
        """,
    )
    assert [p.key.rsplit(".", 1)[1] for p in problems_of(path)] == [
        "mode", "deadline", "transport_overhead", "stop_copy_speedup", "max_syncs", "iteration",
    ]  # fmt: skip


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          interval: 0s
          max_concurrent: 0
          grid: {bandwidths: [1Gbps, 1Gbps]}
        targets:
          - {name: a, qmp: tcp:x}
          - {name: b, qmp: /b, labels: {vm: x}}
          - {name: b, qmp: /c}
          - {name: c, qmp: /d, colour: red}
        """,
    )
    assert where(problems_of(path)) == [
        (2, "global.interval"),
        (3, "global.max_concurrent"),
        (4, "global.grid.bandwidths[1]"),
        (6, "targets[0].qmp"),
        (7, "targets[1].labels.vm"),
        (8, "targets[2].name"),
        (9, "targets[3].colour"),
    ]


# --- the file itself -----------------------------------------------------------------------------------


def test_yaml_syntax_error_has_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "targets:\n  - name: a\n    qmp: /a\n   bad: [\n")
    p = only(problems_of(path))
    assert p.line == 4
    assert p.message.startswith("invalid YAML: ")


def test_tab_indentation_error_line(tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("global:\n  interval: 5m\n\tjitter: 1s\n")
    p = only(problems_of(path))
    assert p.line == 3


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("targets:\n  - name: caf\xe9\n    qmp: /a\n".encode("latin-1"))
    p = only(problems_of(path))
    assert (p.file, p.line, p.message) == (str(path), 2, "not UTF-8: byte 0xe9")


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbftargets: [{name: caf\xc3\xa9, qmp: /a}]\n")
    assert load_config(path).targets[0].name == "café"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    p = only(problems_of(path))
    assert (p.file, p.line, p.key) == (str(path), None, "")
    assert p.message == "cannot read: No such file or directory"


def test_empty_file_and_several_documents(tmp_path: Path) -> None:
    p = only(problems_of(write(tmp_path, "# nothing\n")))
    assert p.message == "the file is empty (write 'targets: []' for no targets)"
    p = only(problems_of(write(tmp_path, "targets: []\n---\ntargets: []\n")))
    assert p.line == 2
    assert "expected a single document" in p.message


def test_unsafe_tags_and_alias_tricks(tmp_path: Path) -> None:
    p = only(problems_of(write(tmp_path, "targets: []\nx-evil: !!python/object/apply:os.system [true]\n")))
    assert (p.line, p.key) == (2, "x-evil")
    p = only(problems_of(write(tmp_path, "targets: []\nx-loop: &a [*a]\n")))
    assert (p.line, p.key, p.message) == (2, "x-loop[0]", "invalid YAML: an alias refers to itself")
    # A "billion laughs" file: 10 levels of 10 aliases would expand to 10**10 nodes.
    lines = ["x-l0: &l0 [a, a, a, a, a, a, a, a, a, a]"]
    lines += [f"x-l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    start = time.perf_counter()
    problems = problems_of(write(tmp_path, "\n".join([*lines, "targets: []", ""])))
    assert time.perf_counter() - start < 10
    assert [p.message for p in problems] == ["invalid YAML: too many nodes after expanding aliases"]


def test_merge_keys_and_extension_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        x-base: &base
          qmp: /base
          labels: {team: db}
          interval: 1m
        targets:
          - <<: *base
            name: a
            interval: 2m
        """,
    )
    (target,) = load_config(path).targets
    assert (target.qmp, dict(target.labels), target.interval_seconds) == ("/base", {"team": "db"}, 120.0)


# --- targets.d -----------------------------------------------------------------------------------------


def test_targets_dir_loads_both_forms_sorted_by_file(tmp_path: Path) -> None:
    write(tmp_path, "global: {interval: 2m}\ntargets_dir: targets.d\ntargets:\n  - {name: main, qmp: /m}\n")
    (tmp_path / "targets.d").mkdir()
    write(tmp_path / "targets.d", "- {name: b1, qmp: /b1}\n- {name: b2, qmp: /b2, interval: 1m}\n", "b.yaml")
    write(tmp_path / "targets.d", "targets:\n  - {name: a1, qmp: /a1}\n", "a.yml")
    write(tmp_path / "targets.d", "[]\n", "c.yaml")
    write(tmp_path / "targets.d", "- {name: ignored, qmp: /i}\n", ".swap.yaml")
    write(tmp_path / "targets.d", "- {name: ignored, qmp: /i}\n", "notes.txt")
    config = load_full_config(tmp_path / "config.yaml")
    assert [t.name for t in config.targets] == ["main", "a1", "b1", "b2"]
    assert [t.interval_seconds for t in config.targets] == [120.0, 120.0, 120.0, 60.0]
    assert config.targets[3].source == f"{tmp_path / 'targets.d' / 'b.yaml'}:2"
    assert (
        load_targets_dir(tmp_path / "targets.d", load_config(tmp_path / "config.yaml")) == config.targets[1:]
    )


def test_a_broken_targets_file_does_not_hide_the_others(tmp_path: Path) -> None:
    main = write(tmp_path, "targets_dir: d\ntargets:\n  - name: vm1\n    qmp: /vm1\n")
    d = tmp_path / "d"
    d.mkdir()
    write(d, "- name: ok\n  qmp: /ok\n- name: vm1\n  qmp: /other\n", "a.yaml")
    write(d, "targets: [\n", "b.yaml")
    (d / "c.yaml").write_bytes(b"\xff\xfe")
    write(d, "- name: ok\n  qmp: /ok2\n", "d.yaml")
    write(d, "- {name: e, qmp: /e, interval: 5}\n", "e.yaml")
    write(d, "", "f.yaml")
    write(d, "hosts: []\n", "g.yaml")
    write(d, "- {name: h, qmp: unix:/ok}\n", "h.yaml")
    problems = problems_of(main)
    files = [Path(p.file).name for p in problems]
    assert files == ["a.yaml", "b.yaml", "c.yaml", "d.yaml", "e.yaml", "f.yaml", "g.yaml", "g.yaml", "h.yaml"]
    a, _, c, dup, e, f, *_, h = problems
    assert (a.line, a.key) == (3, "targets[1].name")
    assert a.message == f"duplicate target name 'vm1' (first defined at {main}:3)"
    assert (c.line, c.message) == (1, "not UTF-8: byte 0xff")
    assert (dup.line, dup.key) == (1, "targets[0].name")
    assert dup.message == f"duplicate target name 'ok' (first defined at {d / 'a.yaml'}:1)"
    assert (e.key, e.message) == ("targets[0].interval", "duration 5 needs a unit, e.g. '30s'")
    assert f.message.startswith("the file is empty")
    assert (h.key, h.line) == ("targets[0].qmp", 1)
    assert h.message.startswith("target 'h' uses the same QMP socket as 'ok'")


def test_missing_targets_dir(tmp_path: Path) -> None:
    main = write(tmp_path, "targets_dir: absent\ntargets: []\n")
    p = only(problems_of(main))
    assert (p.file, p.line, p.message) == (
        str(tmp_path / "absent"),
        None,
        "cannot list: No such file or directory",
    )


# --- scale ---------------------------------------------------------------------------------------------


def _fleet(n: int) -> str:
    rows = [
        f"  - name: vm{i}\n    qmp: unix:/run/qemu-server/{i}.qmp\n    labels: {{team: t{i % 7}}}\n"
        for i in range(n)
    ]
    return "targets:\n" + "".join(rows)


def test_five_thousand_targets_load_quickly(tmp_path: Path) -> None:
    path = write(tmp_path, _fleet(5000))
    start = time.perf_counter()
    config = load_config(path)
    elapsed = time.perf_counter() - start
    assert len(config.targets) == 5000
    assert config.targets[4999].source == f"{path}:{2 + 3 * 4999}"
    assert elapsed < 5.0, f"5,000 targets took {elapsed:.2f}s"


def test_thousands_of_targets_with_one_duplicate_give_exactly_one_problem(tmp_path: Path) -> None:
    text = _fleet(3000) + "  - name: vm1234\n    qmp: /run/dup.qmp\n"
    path = write(tmp_path, text)
    p = only(problems_of(path))
    assert (p.line, p.key) == (2 + 3 * 3000, "targets[3000].name")
    assert p.message == f"duplicate target name 'vm1234' (first defined at {path}:{2 + 3 * 1234})"


# --- check-config --------------------------------------------------------------------------------------


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_config_main([str(EXAMPLE)]) == 0
    assert capsys.readouterr().out == "ok: 3 targets\n"


def test_check_config_prints_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "global:\n  interval: 5\ntargets:\n  - {name: a}\n")
    assert check_config_main([str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}:2: global.interval: duration 5 needs a unit, e.g. '30s'",
        f"{path}:4: targets[0]: missing required key 'qmp'",
        "2 problems",
    ]


def test_check_config_as_a_module(tmp_path: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "migpredictd.config.schema", str(EXAMPLE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (0, "ok: 3 targets\n")


def test_deep_nesting_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    # libyaml's composer recurses in C: 100,000 levels used to kill the process with SIGSEGV.
    path = write(tmp_path, "targets: []\nx-deep: " + "[" * 100_000 + "]" * 100_000 + "\n")
    p = only(problems_of(path))
    assert (p.line, p.message) == (2, "invalid YAML: nested more than 64 levels deep")
    # Aliases can nest deeper than the text does: 40 + 40 levels.
    inner = "[" * 40 + "]" * 40
    outer = "[" * 40 + "*a" + "]" * 40
    p = only(problems_of(write(tmp_path, f"targets: []\nx-a: &a {inner}\nx-b: {outer}\n")))
    assert (p.line, p.message) == (2, "invalid YAML: nested too deeply")


def test_empty_sections_mean_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        global:
          interval:
          measurement:
            sample_pages:
          prediction:
          grid:
            bandwidths:
        targets_dir:
        targets:
          - name: a
            qmp: /a
            labels:
            measurement:
        """,
    )
    config = load_full_config(path)
    defaults = load_config(write(tmp_path, "targets: []\n", "defaults.yaml"))
    assert dataclasses.replace(config, targets=(), source="") == dataclasses.replace(defaults, source="")
    assert config.targets[0].measurement == MeasureSettings()
    assert dict(config.targets[0].labels) == {}


def test_policies_take_their_products_option_names(tmp_path: Path) -> None:
    cfg = load_full_config(
        write(
            tmp_path,
            """
            global:
              policies:
                - nova
                - {name: kubevirt, options: {completionTimeoutPerGiB: 100, allowPostCopy: true}}
            targets: []
            """,
        )
    )
    assert [p.name for p in cfg.policies] == ["nova", "kubevirt"]
    assert cfg.policies[1]["completionTimeoutPerGiB"] == 100.0
    assert cfg.policies[1]["allowPostCopy"] is True
    assert cfg.policies[0]["live_migration_downtime"] == 500.0
    bad = problems_of(
        write(
            tmp_path,
            """
            global:
              policies:
                - {name: proxmox, options: {migrate_downtme: 0.2}}
                - {name: nova, options: {live_migration_timeout_action: explode}}
                - vmware
                - nova
                - nova
            targets: []
            """,
        )
    )
    assert where(bad) == [
        (3, "global.policies[0].options.migrate_downtme"),
        (4, "global.policies[1].options.live_migration_timeout_action"),
        (5, "global.policies[2].name"),
        (7, "global.policies[4]"),
    ]
    assert "did you mean 'migrate_downtime'" in str(bad[0])
    assert "abort, force_complete" in str(bad[1])


def test_a_targets_policies_replace_the_global_list(tmp_path: Path) -> None:
    (tmp_path / "more").mkdir()
    write(
        tmp_path / "more",
        """
        - name: vm3
          qmp: /run/vm3.sock
          policies: [{name: proxmox, options: {migrate_downtime: 0.5}}]
        """,
        "a.yaml",
    )
    cfg = load_full_config(
        write(
            tmp_path,
            """
            global:
              policies: [nova]
            targets_dir: more
            targets:
              - name: vm1
                qmp: /run/vm1.sock
              - name: vm2
                qmp: /run/vm2.sock
                policies: [{name: kubevirt, options: {completionTimeoutPerGiB: 50}}, auto-converge]
              - name: vm4
                qmp: /run/vm4.sock
                policies: []
            """,
        )
    )
    assert [p.name for p in cfg.policies_for("vm1")] == ["nova"]  # inherits global.policies
    assert [p.name for p in cfg.policies_for("vm2")] == ["kubevirt", "auto-converge"]
    assert cfg.policies_for("vm2")[0]["completionTimeoutPerGiB"] == 50.0
    assert cfg.policies_for("vm3")[0]["migrate_downtime"] == 0.5  # from targets_dir
    assert cfg.policies_for("vm4") == ()  # an empty list switches them off for this VM
    assert cfg.policies_for("unknown") == cfg.policies


def test_a_targets_bad_policy_names_its_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "more").mkdir()
    extra = write(
        tmp_path / "more",
        """
        - name: vm3
          qmp: /run/vm3.sock
          policies:
            - {name: nova, options: {live_migration_downtime: 50}}
        """,
        "a.yaml",
    )
    main = write(
        tmp_path,
        """
        targets_dir: more
        targets:
          - name: vm1
            qmp: /run/vm1.sock
            policies: [vmware]
          - name: vm2
            qmp: /run/vm2.sock
            policies:
              - {name: kubevirt, options: {completionTimeoutPerGib: 50}}
        """,
    )
    bad = problems_of(main)
    assert [(p.file, p.line, p.key) for p in bad] == [
        (str(main), 5, "targets[0].policies[0].name"),
        (str(main), 9, "targets[1].policies[0].options.completionTimeoutPerGib"),
    ]
    assert "did you mean 'completionTimeoutPerGiB'" in str(bad[1])
    main.write_text("targets_dir: more\ntargets: []\n")
    bad = problems_of(main)
    assert [(p.file, p.line, p.key) for p in bad] == [
        (str(extra), 4, "targets[0].policies[0].options.live_migration_downtime")
    ]
    assert "at least 100" in str(bad[0])
