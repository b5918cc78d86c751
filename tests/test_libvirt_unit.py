"""The libvirt edge without libvirtd: the measurement flow against a scripted connection (guards, our own
run, the sweep's stopping rule), discovery's filters and metadata parsing, the config, and deduplication.

The real-libvirtd proof is tests/test_libvirt.py; these pin the decisions one case at a time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from migpredictd.config.schema import load_config
from migpredictd.core.address import DomainRef
from migpredictd.core.errors import ConfigError, LibvirtError, TargetSkipped
from migpredictd.core.measurement import sampling_error
from migpredictd.libvirt.api import (
    DIRTYRATE_MEASURED,
    DIRTYRATE_MEASURING,
    Connection,
    DirtyRate,
    Domain,
    Job,
)
from migpredictd.libvirt.discovery import metadata_values, selected, targets_for
from migpredictd.libvirt.measure import LIBVIRT_SAMPLE_PAGES, measure_domain, pid_file_for
from migpredictd.qemu.measure import same_run
from migpredictd.qemu.settings import MeasureSettings
from migpredictd.qemu.zeropages import guest_name_matches
from migpredictd.serve.daemon import Daemon

MIB = 1 << 20
NO_JOB = Job(0, None)
REF = DomainRef(uri="qemu:///system", name="vm1", uuid="u-1", pid_file=None)


class ScriptedConnection(Connection):
    """A libvirt connection whose answers are scripted: ``rates`` is the MiB/s each window reads."""

    def __init__(self, rates: Sequence[int], *, state: int = 1, job: Job = NO_JOB) -> None:
        super().__init__("test:///scripted")
        self.rates = list(rates)
        self.state_value = state
        self.job_value = job
        self.windows: list[int] = []
        self.start_time = 100
        self.period = 0
        self.measuring = False
        self.steal_after_start = False
        self.job_after_window: Job | None = None

    async def version(self) -> str:
        return "7.2.0"

    async def state(self, uuid: str, *, target: str) -> int:
        return self.state_value

    async def memory_bytes(self, uuid: str, *, target: str) -> int:
        return 512 * MIB

    async def job(self, uuid: str, *, target: str) -> Job:
        return self.job_value

    async def vcpu_seconds(self, uuid: str, *, target: str) -> list[float] | None:
        return None

    async def start_dirty_rate(self, uuid: str, seconds: int, *, target: str) -> None:
        self.windows.append(seconds)
        self.start_time += 1
        self.period = seconds
        self.measuring = True

    async def dirty_rate(self, uuid: str, *, target: str) -> DirtyRate:
        rate = self.rates[min(len(self.windows), len(self.rates)) - 1] if self.windows else 0
        if self.measuring:
            # The first read after the start is "measuring"; the run is done by the next one.
            started = self.start_time
            self.measuring = False
            if self.steal_after_start:
                self.start_time += 5  # another client's run, started seconds after ours ended
            if self.job_after_window is not None:
                self.job_value = self.job_after_window
            return DirtyRate(DIRTYRATE_MEASURING, started, self.period, "page-sampling", None)
        return DirtyRate(DIRTYRATE_MEASURED, self.start_time, self.period, "page-sampling", rate)


async def _no_sleep(_: float) -> None:
    await asyncio.sleep(0)


def _measure(conn: ScriptedConnection, **settings: object) -> object:
    s = MeasureSettings(zero_pages="none", **settings)  # type: ignore[arg-type]
    return asyncio.run(measure_domain(conn, REF, target="vm1", settings=s, sleep=_no_sleep))


@pytest.mark.parametrize(
    ("state", "job", "reason"),
    [
        (3, Job(0, None), "not_running"),  # paused
        (1, Job(2, 8), "job"),  # a dump
        (1, Job(2, 5), "migrating"),  # an outgoing migration
    ],
)
def test_a_domain_that_cannot_be_measured_now_is_skipped_with_its_reason(
    state: int, job: Job, reason: str
) -> None:
    conn = ScriptedConnection([10], state=state, job=job)
    with pytest.raises(TargetSkipped) as err:
        _measure(conn)
    assert err.value.reason == reason
    assert conn.windows == []  # nothing started


def test_a_job_that_starts_during_a_window_discards_it() -> None:
    conn = ScriptedConnection([10])
    conn.job_after_window = Job(2, 8)
    with pytest.raises(TargetSkipped) as err:
        _measure(conn)
    assert err.value.reason == "job"


def test_another_clients_run_is_never_taken_for_ours() -> None:
    conn = ScriptedConnection([10])
    conn.steal_after_start = True
    with pytest.raises(TargetSkipped) as err:
        _measure(conn, periods_ms=(1000.0,))
    assert err.value.reason == "busy"


def test_the_sweep_repeats_until_the_sampling_error_is_reached_or_the_budget_is_spent() -> None:
    # 200 MiB/s over 1 s: 100 of 256 samples changed per window (half a sample per MiB), a 7.8% error:
    # one sweep.
    fast = ScriptedConnection([200])
    m = _measure(fast, periods_ms=(1000.0, 2000.0))
    assert fast.windows == [1, 2]
    assert m.strategy == "libvirt"  # type: ignore[attr-defined]
    assert m.sample_pages_per_gib == LIBVIRT_SAMPLE_PAGES  # type: ignore[attr-defined]
    assert m.sampling_error == pytest.approx(0.0781, abs=0.001)  # type: ignore[attr-defined]
    # 10 MiB/s: 5 samples per 1 s window, 45%, then 32%, 26%, 22%: all four sweeps, and a note says so.
    slow = ScriptedConnection([10])
    m = _measure(slow, periods_ms=(1000.0, 2000.0), max_sweeps=4)
    assert slow.windows == [1, 2] * 4
    assert m.sampling_error == pytest.approx(0.2214, abs=0.002)  # type: ignore[attr-defined]
    assert any("sampling error 22% after 4 sweeps" in n for n in m.notes)  # type: ignore[attr-defined]
    # A guest that changes nothing: two sweeps, then the rate is known to be below one sample's worth.
    idle = ScriptedConnection([0])
    m = _measure(idle, periods_ms=(1000.0,), max_sweeps=8)
    assert idle.windows == [1, 1]
    assert m.sampling_error is None  # type: ignore[attr-defined]


def test_sub_second_periods_are_refused_naming_the_period() -> None:
    with pytest.raises(Exception, match=r"periods_ms\[0\].*whole seconds"):
        _measure(ScriptedConnection([10]), periods_ms=(500.0,))


def test_sampling_error_is_the_binomial_error_of_the_pooled_shortest_period() -> None:
    runs = [{"sample-pages": 512, "dirty-rate": 20, "calc-time": 1}] * 4  # 10 of 256 samples, 4 times
    share = 40 / 1024
    assert sampling_error(runs, memory_bytes=512 * MIB) == pytest.approx(((1 - share) / 40) ** 0.5)
    assert sampling_error([{"dirty-rate": 20, "calc-time": 1}], memory_bytes=512 * MIB) is None


NOVA = """<instance xmlns="http://openstack.org/xmlns/libvirt/nova/1.1">
  <name>web-1</name>
  <owner><user uuid="u1">alice</user><project uuid="p-42">shop</project></owner>
</instance>"""
NS = "http://openstack.org/xmlns/libvirt/nova/1.1"


def test_metadata_paths_read_text_and_attributes_by_local_name() -> None:
    got = metadata_values(NOVA, {"nova_name": "name", "project": "owner/project/@uuid", "x": "owner/none"})
    assert got == {"nova_name": "web-1", "project": "p-42"}


@pytest.mark.parametrize(
    "xml",
    [
        '<!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',  # entities: refused, never expanded
        "<a><b></a>",  # not XML
        "<a>" + "x" * 70000 + "</a>",  # larger than any real metadata element
    ],
)
def test_hostile_metadata_is_ignored(xml: str) -> None:
    assert metadata_values(xml, {"v": "b"}) is None


def test_metadata_values_lose_control_characters_and_are_cut_to_a_label_value() -> None:
    got = metadata_values("<a><b>ok\t\u200b\u2028" + "z" * 400 + "</b></a>", {"v": "b"})
    assert got is not None
    assert got["v"].startswith("okzz")
    assert len(got["v"]) == 256


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _domain(name: str, metadata: dict[str, str] | None = None) -> Domain:
    return Domain(
        name=name, uuid=f"uuid-{name}", domain_id=1, memory_bytes=MIB << 10, metadata=metadata or {}
    )


def test_names_exclude_and_metadata_select_domains_and_label_them(tmp_path: Path) -> None:
    config = load_config(
        _config(
            tmp_path,
            "libvirt:\n"
            '  - uri: "qemu:///system"\n'
            '    names: ["instance-*"]\n'
            '    exclude: ["instance-0000000b"]\n'
            "    labels: {rack: r12}\n"
            "    metadata:\n"
            f"      namespace: {NS}\n"
            "      labels: {nova_name: name, project: owner/project/@uuid}\n"
            '      match: {project: "p-4*"}\n',
        )
    )
    (source,) = config.libvirt
    domains = [
        _domain("instance-0000000a", {NS: NOVA}),
        _domain("instance-0000000b", {NS: NOVA}),  # excluded
        _domain("instance-0000000c", {NS: NOVA.replace("p-42", "p-7")}),  # other project
        _domain("instance-0000000d"),  # no metadata: the match cannot hold
        _domain("manual-vm", {NS: NOVA}),  # not an instance
    ]
    (target,) = targets_for(source, domains)
    assert target.name == "instance-0000000a"
    assert dict(target.labels) == {
        "rack": "r12", "nova_name": "web-1", "project": "p-42",
        "uuid": "uuid-instance-0000000a", "libvirt_uri": "qemu:///system",
    }  # fmt: skip
    assert target.domain == DomainRef(
        uri="qemu:///system",
        name="instance-0000000a",
        uuid="uuid-instance-0000000a",
        pid_file="/run/libvirt/qemu/instance-0000000a.pid",
    )
    assert target.qmp == ""


def test_require_keeps_only_domains_with_the_metadata_element(tmp_path: Path) -> None:
    base = 'libvirt:\n  - uri: "qemu:///system"\n    metadata: {namespace: "urn:x"'
    loose = load_config(_config(tmp_path, base + "}\n")).libvirt[0]
    strict = load_config(_config(tmp_path, base + ", require: true}\n")).libvirt[0]
    plain, tagged = _domain("a"), _domain("b", {"urn:x": "<x/>"})
    assert selected(plain, loose) == {}
    assert selected(tagged, loose) == {}
    assert selected(plain, strict) is None
    assert selected(tagged, strict) == {}


def test_the_minimum_config_is_one_uri(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, 'libvirt: [{uri: "qemu:///system"}]\n'))
    (source,) = config.libvirt
    assert source.names == ("*",)
    assert source.poll_seconds == 15.0
    assert source.measurement.periods_ms is None  # 1, 2, 4 and 8 s
    assert source.measurement.max_sweeps == 4
    assert config.targets == ()


def test_libvirt_config_problems_name_file_line_and_key(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        "libvirt:\n"
        '  - uri: "qemu:///system"\n'
        "    measurement: {periods: [500ms], sample_pages: 4096}\n"
        "    poll_interval: 0.2s\n"
        "    labels: {uuid: x}\n"
        "  - {names: [a]}\n"
        '  - {uri: "nonsense"}\n',
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for expected in (
        f"{path}:3: libvirt[0].measurement.sample_pages: unknown key",
        f"{path}:3: libvirt[0].measurement.periods[0]: libvirt measures whole seconds",
        f"{path}:4: libvirt[0].poll_interval: must be at least 1s",
        f"{path}:5: libvirt[0].labels.uuid: 'uuid' is a label migpredictd or Prometheus already uses",
        f"{path}:6: libvirt[1]: missing required key 'uri'",
        f"{path}:7: libvirt[2].uri: 'nonsense' is not a libvirt URI",
    ):
        assert expected in text, text


def test_pid_files_are_only_for_this_hosts_system_instance() -> None:
    assert pid_file_for("qemu:///system", "vm1") == "/run/libvirt/qemu/vm1.pid"
    assert pid_file_for("qemu+ssh://host/system", "vm1") is None
    assert pid_file_for("qemu:///session", "vm1") is None
    assert pid_file_for("qemu:///system", "../etc") is None
    assert pid_file_for("qemu+unix:///system?socket=/pods/x/libvirt-sock", "vm1") is None  # KubeVirt's


def test_a_domain_that_is_also_a_static_target_is_measured_once(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        'targets: [{name: vm-a, qmp: "unix:/run/qemu/a.qmp"}]\nlibvirt: [{uri: "qemu:///system"}]\n',
    )
    daemon = Daemon(str(path))
    daemon.apply(load_config(path))
    watch = next(iter(daemon._libvirt.values()))
    watch.targets = {t.name: t for t in targets_for(watch.source, [_domain("vm-a"), _domain("vm-b")])}
    daemon._publish_targets()
    assert daemon._targets["vm-a"].domain is None  # the static QMP target wins
    assert daemon._targets["vm-b"].domain is not None
    assert sorted(daemon.state.snapshot()) == ["vm-a", "vm-b"]
    # A libvirt failure of one domain is that target's, with the call named.
    err = LibvirtError("Domain not found", target="vm-b", command="virDomainGetState")
    assert str(err) == "target vm-b virDomainGetState: Domain not found"
    assert err.reason == "libvirt"


def test_a_domain_whose_qemu_listens_on_a_static_targets_socket_is_measured_once(tmp_path: Path) -> None:
    """The second-socket alternative and a libvirt entry on one host: the static target's QMP socket
    leads to the domain's QEMU (a stand-in process with QEMU's ``-name guest=instance-1`` listens on it,
    and the domain's PID file names it)."""
    sock_path = tmp_path / "vm.qmp"
    listen = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", listen, str(sock_path), "-name", "guest=instance-1,debug-threads=on"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        pid_dir = tmp_path / "run"
        pid_dir.mkdir()
        (pid_dir / "instance-1.pid").write_text(f"{child.pid}\n")
        (pid_dir / "instance-2.pid").write_text(f"{child.pid}\n")  # not instance-2's QEMU: not believed
        path = _config(
            tmp_path,
            f'targets: [{{name: web, qmp: "unix:{sock_path}"}}]\n'
            f'libvirt: [{{uri: "qemu:///system", pid_dir: "{pid_dir}"}}]\n',
        )
        daemon = Daemon(str(path))
        daemon.apply(load_config(path))
        watch = next(iter(daemon._libvirt.values()))
        found = targets_for(watch.source, [_domain("instance-1"), _domain("instance-2")])
        watch.targets = {t.name: t for t in found}
        daemon._refresh_static_pids()
        daemon._publish_targets()
    finally:
        child.kill()
        child.wait()
    assert sorted(daemon._targets) == ["instance-2", "web"]


def test_qemus_name_argument_is_read_as_libvirt_writes_it() -> None:
    argv = [b"/usr/bin/qemu-system-x86_64", b"-name", b"guest=a,,b,debug-threads=on"]
    assert guest_name_matches(argv, b"a,b")
    assert not guest_name_matches(argv, b"a")
    assert not guest_name_matches([b"qemu", b"-name", b"guest=ab"], b"a")


def test_a_libvirt_entrys_policies_apply_to_its_domains(tmp_path: Path) -> None:
    config = load_config(_config(tmp_path, 'libvirt: [{uri: "qemu:///system", policies: [nova]}]\n'))
    (target,) = targets_for(config.libvirt[0], [_domain("a")])
    assert target.policies is not None
    assert [p.name for p in target.policies] == ["nova"]
    with pytest.raises(ConfigError, match=r"libvirt\[0\]\.policies\[0\]"):
        load_config(_config(tmp_path, 'libvirt: [{uri: "qemu:///system", policies: [novaa]}]\n'))


def test_a_closed_connection_fails_its_calls_as_the_targets_libvirt_error() -> None:
    conn = Connection("test:///closed")
    conn.close()
    with pytest.raises(LibvirtError, match="virDomainGetState: the connection was closed"):
        asyncio.run(conn.state("u-1", target="vm1"))


def test_libvirt_entries_keep_the_limits_static_targets_have(tmp_path: Path) -> None:
    labels = ", ".join(f"l{i}: v" for i in range(10))
    meta = ", ".join(f"m{i}: p{i}" for i in range(7))
    path = _config(
        tmp_path,
        "global: {interval: 30s, measurement: {periods: [250ms]}}\n"
        "libvirt:\n"
        '  - {uri: "qemu:///system", exclude: [], measurement: {periods: [8s]}}\n'
        '  - {uri: "qemu:///session"}\n'
        f'  - {{uri: "qemu+ssh://h/system", measurement: {{periods: [1s]}}, labels: {{{labels}}},'
        f' metadata: {{namespace: "urn:x", labels: {{{meta}}}}}}}\n',
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "libvirt[0].exclude" not in text  # an empty exclude list is the default, spelt out
    assert (
        f"{path}:3: libvirt[0].measurement: 4 sweeps of the periods take up to 32s, not shorter than the "
        "interval (30s)" in text
    )
    assert (
        f"{path}:4: libvirt[1].measurement.periods[0]: libvirt measures whole seconds of 1..60 s, not 250 ms "
        "(from global.measurement: give the entry its own measurement.periods)" in text
    )
    assert f"{path}:5: libvirt[2]: 10 labels and 7 metadata labels; at most 16 together" in text


class _HungLibvirt:
    """A libvirt-python stand-in whose virConnectOpen hangs for two seconds, as a blackholed URI does."""

    class libvirtError(Exception):  # noqa: N801 (libvirt-python's own name)
        pass

    @staticmethod
    def open(uri: str) -> object:
        time.sleep(2.0)
        raise _HungLibvirt.libvirtError("unreachable")


def test_a_hung_libvirtd_never_stalls_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from migpredictd.libvirt import api

    monkeypatch.setattr(api, "libvirt", _HungLibvirt)
    monkeypatch.setattr(api, "_EVENT_LOOP_STARTED", True)

    async def run() -> tuple[float, float]:
        conn = Connection("qemu+tcp://192.0.2.1/system", timeout=0.3)
        gaps = [0.0]

        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        t0 = time.monotonic()
        for _ in range(3):  # the second and third calls queue behind the first's open, and time out too
            with pytest.raises(LibvirtError, match=r"virDomainGetState: .*did not answer within 0\.3 s"):
                await conn.state("u-1", target="vm1")
        took = time.monotonic() - t0
        ticker.cancel()
        conn.close()
        return took, max(gaps)

    took, worst_gap = asyncio.run(run())
    assert took < 1.5
    assert worst_gap < 0.2


def test_a_start_time_one_second_late_is_our_own_run_only_while_no_other_could_have_run() -> None:
    """QEMU sets start-time again when its sampling thread starts; late across a second boundary, it
    reads one more. A foreign run of our length needs twice our window after our start."""
    assert same_run(100, 100, elapsed=5.0, calc_seconds=1.0)
    assert same_run(100, 101, elapsed=1.1, calc_seconds=1.0)
    assert not same_run(100, 101, elapsed=2.5, calc_seconds=1.0)
    assert not same_run(100, 102, elapsed=1.1, calc_seconds=1.0)
    assert not same_run(None, 101, elapsed=1.1, calc_seconds=1.0)
