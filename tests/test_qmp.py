"""migpredictd.qemu.qmp against the fake QMP fleet: addresses, allowlist, typed errors, timeouts, release.

"The monitor is left free" is checked the way a user would notice: QEMU's monitor (and the fake, which
is exclusive like QEMU's chardev) serves one client at a time, so a second client only gets a greeting
once we have really let go.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from migpredictd.core.address import format_address, parse_address
from migpredictd.core.errors import (
    InputError,
    QMPCommandError,
    QMPConnectError,
    QMPProtocolError,
    QMPTimeoutError,
    UnsafeCommandError,
)
from migpredictd.lab.fakeqmp import FakeQMPFleet, FakeVM, Fault, FaultParams
from migpredictd.qemu.qmp import (
    LAB_COMMANDS,
    READ_ONLY_COMMANDS,
    QMPSession,
)
from tests.waits import until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def fleet() -> AsyncIterator[FakeQMPFleet]:
    """A started fleet with one endpoint per behaviour these tests need."""
    f = FakeQMPFleet()
    f.add("ok", FakeVM())
    f.add("refused", faults=Fault.REFUSE_CONNECT)
    f.add("no-greeting", faults=Fault.NO_GREETING)
    f.add("hung", faults=Fault.NO_REPLIES)
    f.add("garbage", faults=Fault.GARBAGE, params=FaultParams(command="query-status"))
    f.add("truncated", faults=Fault.TRUNCATED, params=FaultParams(command="query-status"))
    f.add("reset", faults=Fault.DISCONNECT_MID_REPLY, params=FaultParams(command="query-status"))
    f.add(
        "huge", faults=Fault.HUGE_LINE, params=FaultParams(command="query-status", huge_line_bytes=12 << 20)
    )
    f.add(
        "error",
        faults=Fault.COMMAND_ERROR,
        params=FaultParams(command="query-status", error_class="DeviceNotActive", error_desc="no"),
    )
    async with f:
        yield f


async def _monitor_is_free(address: str | tuple[str, int], wait: float = 1.0) -> bool:
    """A second client gets a greeting and an answer within ``wait`` seconds."""
    async with QMPSession.connect(address, target="probe", timeout=wait) as s:
        return isinstance(await s.execute("query-version"), dict)


# --- addresses -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/qemu/vm1.qmp", "/run/qemu/vm1.qmp"),
        ("/run/qemu/vm1.qmp", "/run/qemu/vm1.qmp"),
        ("tcp:127.0.0.1:4444", ("127.0.0.1", 4444)),
        ("tcp:localhost:1", ("localhost", 1)),
        ("tcp:[::1]:4444", ("::1", 4444)),
    ],
)
def test_parse_address(text: str, expected: str | tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix:",
        "tcp:host",
        "tcp::44",
        "tcp:h:0",
        "tcp:h:65536",
        "tcp:h:x",
        "vm1",
        "unix:/run/a\x00b",
        "/a\x00",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(InputError, match="address"):
        parse_address(text)


def test_format_address_round_trips() -> None:
    for text in ("unix:/a/b", "tcp:127.0.0.1:4444", "tcp:[::1]:5"):
        assert format_address(parse_address(text)) == text


# --- happy paths -----------------------------------------------------------------------------------


async def test_execute_returns_reply_and_knows_qemu_pid(fleet: FakeQMPFleet) -> None:
    ep = fleet["ok"]
    async with QMPSession.connect(parse_address(f"unix:{ep.address}"), target="vm1", timeout=2.0) as s:
        version = await s.execute_dict("query-version")
        # The fake runs in this process, so SO_PEERCRED names us: that is what finds QEMU's smaps.
        assert s.peer_pid == os.getpid()
    assert version["qemu"] == {"micro": 22, "minor": 2, "major": 7}
    assert ep.commands == ["qmp_capabilities", "query-version"]
    assert ep.concurrent == 0


async def test_tcp_transport_has_no_peer_pid() -> None:
    f = FakeQMPFleet(transport="tcp")
    ep = f.add("vm", FakeVM(version=(10, 0, 2)))
    async with f:
        assert isinstance(ep.address, tuple)
        async with QMPSession.connect(ep.address, target="vm", timeout=2.0) as s:
            assert s.peer_pid is None
            assert (await s.execute_dict("query-status"))["status"] == "running"


async def test_events_between_replies_are_ignored(fleet: FakeQMPFleet) -> None:
    # Events are injected by hand: Fault.EVENTS also precedes the qmp_capabilities reply with one,
    # which real QEMU never does and qemu.qmp's negotiation rejects.
    ep = fleet["ok"]
    async with QMPSession.connect(ep.address, target="vm", timeout=2.0) as s:
        for _ in range(3):
            ep.emit_event("RTC_CHANGE", {"offset": 0, "qom-path": "/machine/unattached/device[4]"})
            assert (await s.execute_dict("query-status"))["running"] is True


# --- allowlist --------------------------------------------------------------------------------------


def test_allowlists() -> None:
    assert READ_ONLY_COMMANDS < LAB_COMMANDS
    for dangerous in ("migrate", "migrate-set-parameters", "quit", "stop", "cont", "human-monitor-command"):
        assert dangerous not in READ_ONLY_COMMANDS
    assert "human-monitor-command" not in LAB_COMMANDS  # a gateway to every HMP command


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("quit", None),
        ("migrate", {"uri": "tcp:127.0.0.1:1"}),
        ("human-monitor-command", {"command-line": "info status"}),
        ("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-bitmap"}),
        ("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-ring"}),
        ("calc-dirty-rate", {"calc-time": 1}),  # QEMU's default mode is not ours to rely on
    ],
)
async def test_unsafe_commands_are_refused_without_sending(
    fleet: FakeQMPFleet, command: str, args: dict[str, object] | None
) -> None:
    ep = fleet["ok"]
    async with QMPSession.connect(ep.address, target="vm1", timeout=2.0) as s:
        with pytest.raises(UnsafeCommandError) as info:
            await s.execute(command, args)
        # The session is still usable afterwards.
        await s.execute("query-status")
    assert info.value.command == command
    assert info.value.target == "vm1"
    assert info.value.reason == "unsafe_command"
    assert command not in ep.commands
    assert ep.commands == ["qmp_capabilities", "query-status"]


async def test_lab_allowlist_is_explicit(fleet: FakeQMPFleet) -> None:
    ep = fleet["ok"]
    async with QMPSession.connect(ep.address, target="vm1", timeout=2.0, allowed=LAB_COMMANDS) as s:
        # The fake has no migrate-set-parameters: QEMU's own "not found" comes back typed.
        with pytest.raises(QMPCommandError) as info:
            await s.execute("migrate-set-parameters", {"downtime-limit": 300})
    assert info.value.error_class == "CommandNotFound"
    assert "migrate-set-parameters" in ep.commands


# --- failures -----------------------------------------------------------------------------------


async def test_refused_connection(fleet: FakeQMPFleet) -> None:
    started = time.monotonic()
    with pytest.raises(QMPConnectError) as info:
        async with QMPSession.connect(fleet["refused"].address, target="vm1", timeout=2.0):
            pass
    assert time.monotonic() - started < 1.0
    assert info.value.reason == "connect"
    assert "vm1" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


async def test_missing_socket(tmp_path: object) -> None:
    with pytest.raises(QMPConnectError, match="No such file"):
        async with QMPSession.connect(f"{tmp_path}/nothing.sock", target="vm1", timeout=2.0):
            pass


async def test_no_greeting_times_out_within_the_timeout(fleet: FakeQMPFleet) -> None:
    started = time.monotonic()
    with pytest.raises(QMPTimeoutError, match="no QMP greeting"):
        async with QMPSession.connect(fleet["no-greeting"].address, target="vm1", timeout=0.3):
            pass
    assert time.monotonic() - started < 0.3 + 0.5
    assert fleet["no-greeting"].concurrent == 0


async def test_hung_monitor_times_out_and_is_released(fleet: FakeQMPFleet) -> None:
    ep = fleet["hung"]
    started = time.monotonic()
    with pytest.raises(QMPTimeoutError) as info:
        async with QMPSession.connect(ep.address, target="vm1", timeout=0.5) as s:
            await s.execute("query-status", timeout=0.3)
    elapsed = time.monotonic() - started
    # NO_REPLIES greets but ignores even qmp_capabilities: the connect timeout names that command.
    assert info.value.command == "qmp_capabilities"
    assert info.value.reason == "timeout"
    assert elapsed < 0.5 + 0.5  # the connect timeout plus a bounded close
    await until(lambda: ep.concurrent == 0, 5, "the fake notices the hang-up")


async def test_slow_command_times_out_and_second_client_gets_in() -> None:
    f = FakeQMPFleet()
    ep = f.add("slow", faults=Fault.SLOW, params=FaultParams(command="query-migrate", delay_seconds=1.0))
    async with f:
        started = time.monotonic()
        async with QMPSession.connect(ep.address, target="vm1", timeout=2.0) as s:
            with pytest.raises(QMPTimeoutError) as info:
                await s.execute("query-migrate", timeout=0.2)
        assert time.monotonic() - started < 0.2 + 0.5
        assert info.value.command == "query-migrate"
        # The monitor itself is busy for the rest of its 1 s; after that the next client gets in,
        # which it would not if we still held the connection.
        assert await _monitor_is_free(ep.address, wait=3.0)


async def test_cancellation_disconnects(fleet: FakeQMPFleet) -> None:
    ep = fleet["ok"]
    entered = asyncio.Event()

    async def hold() -> None:
        async with QMPSession.connect(ep.address, target="vm1", timeout=2.0) as s:
            await s.execute("query-status")
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await entered.wait()
    assert ep.concurrent == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _monitor_is_free(ep.address)


async def test_qemu_error_is_typed(fleet: FakeQMPFleet) -> None:
    async with QMPSession.connect(fleet["error"].address, target="vm1", timeout=2.0) as s:
        with pytest.raises(QMPCommandError) as info:
            await s.execute("query-status")
    assert info.value.error_class == "DeviceNotActive"
    assert info.value.detail == "no"
    assert info.value.reason == "qmp_error"


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("garbage", QMPProtocolError),
        ("truncated", QMPProtocolError),
        ("reset", QMPProtocolError),  # half a message then EOF: qemu.qmp parses the half
        ("huge", QMPProtocolError),
    ],
)
async def test_broken_replies(fleet: FakeQMPFleet, name: str, error: type[Exception]) -> None:
    ep = fleet[name]
    started = time.monotonic()
    with pytest.raises(error) as info:
        async with QMPSession.connect(ep.address, target="vm1", timeout=3.0) as s:
            await s.execute("query-status")
    assert time.monotonic() - started < 5.0
    assert getattr(info.value, "command", None) == "query-status"
    assert info.value.__cause__ is not None
    assert await _monitor_is_free(ep.address)


async def test_reply_that_is_not_an_object(fleet: FakeQMPFleet) -> None:
    async with QMPSession.connect(fleet["ok"].address, target="vm1", timeout=2.0, allowed=LAB_COMMANDS) as s:
        with pytest.raises(QMPProtocolError, match="expected a JSON object, got list"):
            await s.execute_dict("query-qmp-schema")
