"""The fake QMP server speaks QMP the way QEMU 7.2 does, simulates calc-dirty-rate, and injects faults.

Driven with raw asyncio streams, so the bytes on the wire are what is tested. Expected replies were
captured from QEMU 7.2.22 on this machine (see /work/shared/QEMU_FACTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest

from migpredictd.lab.fakeqmp import (
    Address,
    Endpoint,
    FakeQMPFleet,
    FakeVM,
    Fault,
    FaultParams,
    JSONStreamParser,
    MiB,
    ParseError,
    StreamOverflowError,
    main,
)
from tests.waits import until

GREETING_7_2 = {
    "QMP": {
        "version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2+dfsg-7+deb12u7"},
        "capabilities": ["oob"],
    }
}
NOT_NEGOTIATED = {
    "class": "CommandNotFound",
    "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
}
COVER_LETTER_SAMPLE = Path("/work/shared/seed/cover_letter_sample.json")
QUICK = 0.5  # seconds to wait for something that must not arrive


_open_clients: list[Client] = []


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    """Close every raw client a test opened, so no transport outlives its test."""
    yield
    while _open_clients:
        await _open_clients.pop().close()


class Client:
    """A raw QMP client over asyncio streams: sends bytes, reads CRLF-terminated JSON lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: Address, *, limit: int = 10 * 2**20) -> Client:  # as qemu.qmp
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address, limit=limit)
        else:
            reader, writer = await asyncio.open_connection(address[0], address[1], limit=limit)
        client = cls(reader, writer)
        _open_clients.append(client)
        return client

    async def raw_line(self, wait: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), wait)

    async def read(self, wait: float = 5.0) -> Any:
        line = await self.raw_line(wait)
        assert line.endswith(b"\r\n"), line[:200]
        return json.loads(line)

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, execute: str, arguments: dict[str, Any] | None = None, **extra: Any) -> Any:
        msg: dict[str, Any] = {"execute": execute, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        await self.send_raw(json.dumps(msg).encode())  # no newline: QEMU does not need one
        reply = await self.read()
        while "event" in reply:
            reply = await self.read()
        return reply

    async def negotiated(self) -> Client:
        assert "QMP" in await self.read()
        assert await self.cmd("qmp_capabilities") == {"return": {}}
        return self

    async def at_eof(self, wait: float = 5.0) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(), wait) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()  # a fault may have reset the connection already


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def is_socket_file(address: Address) -> bool:
    return isinstance(address, str) and Path(address).is_socket()


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[FakeQMPFleet]:
    """A started, empty fleet on unix sockets; tests add endpoints with ``spawn``."""
    async with FakeQMPFleet(directory=tmp_path, time_scale=0.01) as f:
        yield f


async def session(
    fleet: FakeQMPFleet,
    vm: FakeVM | None = None,
    *,
    faults: Fault = Fault.NONE,
    params: FaultParams | None = None,
    name: str = "vm",
) -> tuple[Endpoint, Client]:
    ep = await fleet.spawn(name, vm, faults=faults, params=params)
    return ep, await Client.connect(ep.address)


# ---------------------------------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------------------------------


async def test_greeting_is_qemu_7_2_and_ends_with_crlf(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet)
    line = await client.raw_line()
    assert line.endswith(b"\r\n")
    assert json.loads(line) == GREETING_7_2


async def test_greeting_version_is_configurable(fleet: FakeQMPFleet) -> None:
    vm = FakeVM(version=(10, 0, 2), package="Debian 1:10.0.2+ds-1~bpo12+1")
    _, client = await session(fleet, vm)
    greeting = await client.read()
    assert greeting["QMP"]["version"] == {
        "qemu": {"major": 10, "minor": 0, "micro": 2},
        "package": "Debian 1:10.0.2+ds-1~bpo12+1",
    }
    assert (await client.cmd("qmp_capabilities"))["return"] == {}
    reply = await client.cmd("query-version")
    assert reply["return"]["qemu"] == {"major": 10, "minor": 0, "micro": 2}


async def test_every_command_before_negotiation_is_refused_with_id(fleet: FakeQMPFleet) -> None:
    ep, client = await session(fleet)
    await client.read()
    assert await client.cmd("query-status", id=[1, 2]) == {"id": [1, 2], "error": NOT_NEGOTIATED}
    assert await client.cmd("no-such-command") == {"error": NOT_NEGOTIATED}
    assert await client.cmd("qmp_capabilities", id=5) == {"return": {}, "id": 5}
    again = await client.cmd("qmp_capabilities")
    assert again == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        }
    }
    assert ep.commands == ["query-status", "no-such-command", "qmp_capabilities", "qmp_capabilities"]


@pytest.mark.parametrize("ident", [5, "abc", {"a": [1, None]}, [1, 2], 1.5, None, True])
async def test_id_is_echoed_verbatim_on_success_and_error(fleet: FakeQMPFleet, ident: Any) -> None:
    _, client = await session(fleet)
    await client.negotiated()
    ok = await client.cmd("query-kvm", id=ident)
    assert ok == {"return": {"enabled": False, "present": True}, "id": ident}
    err = await client.cmd("nope", id=ident)
    assert err == {
        "id": ident,
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
    }


async def test_no_newline_several_commands_per_packet_and_split_packets(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet)
    await client.read()
    # Two commands in one packet, no separators, no newline (qemu.qmp sends no newline either).
    await client.send_raw(b'{"execute":"qmp_capabilities","id":1}{"execute":"query-kvm","id":2}')
    assert await client.read() == {"return": {}, "id": 1}
    assert (await client.read())["id"] == 2
    # One command split across packets, including inside a string and a multi-byte UTF-8 character.
    ident = 'caf\u00e9 "quoted" \\ {brace}'
    raw = json.dumps({"execute": "query-status", "id": ident}, ensure_ascii=False).encode()
    cut = raw.index(b"\xc3") + 1  # between the two bytes of the e-acute
    for piece in (raw[:5], raw[5:cut], raw[cut:]):
        await client.send_raw(piece)
        await asyncio.sleep(0.01)
    reply = await client.read()
    assert reply == {"return": {"status": "running", "singlestep": False, "running": True}, "id": ident}


@pytest.mark.parametrize(
    ("request_", "desc"),
    [
        ({"execute": "calc-dirty-rate"}, "Parameter 'calc-time' is missing"),
        (
            {"execute": "calc-dirty-rate", "arguments": {"calc-time": "x"}},
            "Invalid parameter type for 'calc-time', expected: integer",
        ),
        (
            {"execute": "calc-dirty-rate", "arguments": {"calc-time": True}},
            "Invalid parameter type for 'calc-time', expected: integer",
        ),
        (
            {"execute": "calc-dirty-rate", "arguments": {"calc-time": 1, "calc-time-unit": "millisecond"}},
            "Parameter 'calc-time-unit' is unexpected",
        ),
        ({"execute": "calc-dirty-rate", "arguments": {"calc-time": 0}}, "calc-time is out of range[1, 60]."),
        ({"execute": "calc-dirty-rate", "arguments": {"calc-time": 61}}, "calc-time is out of range[1, 60]."),
        (
            {"execute": "calc-dirty-rate", "arguments": {"calc-time": 1, "sample-pages": 5}},
            "sample-pages is out of range[128, 16384].",
        ),
        (
            {"execute": "calc-dirty-rate", "arguments": {"calc-time": 1, "mode": "bogus"}},
            "Parameter 'mode' does not accept value 'bogus'",
        ),
        (
            {"execute": "calc-dirty-rate", "arguments": {"calc-time": 1, "extra": 1}},
            "Parameter 'extra' is unexpected",
        ),
        ({"execute": "query-status", "arguments": {"x": 1}}, "Parameter 'x' is unexpected"),
        ({"execute": "query-status", "arguments": []}, "QMP input member 'arguments' must be an object"),
        ({"execute": 5}, "QMP input member 'execute' must be a string"),
        ({"foo": 5}, "QMP input member 'foo' is unexpected"),
        ({}, "QMP input lacks member 'execute'"),
        ([1, 2], "QMP input must be a JSON object"),
        (
            {"execute": "query-dirty-rate", "arguments": {"calc-time-unit": "second"}},
            "Parameter 'calc-time-unit' is unexpected",
        ),
    ],
)
async def test_bad_input_gets_qemu_7_2_wording(fleet: FakeQMPFleet, request_: Any, desc: str) -> None:
    _, client = await session(fleet)
    await client.negotiated()
    await client.send_raw(json.dumps(request_).encode())
    assert await client.read() == {"error": {"class": "GenericError", "desc": desc}}


async def test_parse_error_is_answered_and_the_stream_recovers(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet)
    await client.negotiated()
    await client.send_raw(b'{"execute": "query-kvm" "id": 2}\n5 {"execute":"query-kvm","id":3}')
    first = await client.read()
    assert first["error"]["class"] == "GenericError"
    assert first["error"]["desc"].startswith("JSON parse error, ")
    assert await client.read() == {
        "error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}
    }
    assert (await client.read())["id"] == 3


async def test_query_shapes_match_qemu(fleet: FakeQMPFleet) -> None:
    ep, client = await session(fleet, FakeVM(memory_bytes=256 * MiB))
    await client.negotiated()
    assert await client.cmd("query-status") == {
        "return": {"status": "running", "singlestep": False, "running": True}
    }
    assert await client.cmd("query-kvm") == {"return": {"enabled": False, "present": True}}
    assert await client.cmd("query-migrate") == {"return": {}}
    assert await client.cmd("query-memory-size-summary") == {
        "return": {"base-memory": 268435456, "plugged-memory": 0}
    }
    assert await client.cmd("query-version") == {
        "return": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u7"}
    }
    assert await client.cmd("query-dirty-rate") == {
        "return": {
            "status": "unstarted",
            "sample-pages": 0,
            "mode": "page-sampling",
            "start-time": 0,
            "calc-time": 0,
        }
    }
    assert ep.connections == 1


async def test_events_only_after_negotiation(fleet: FakeQMPFleet) -> None:
    ep, client = await session(fleet)
    await client.read()
    ep.emit_event("RESUME")
    with pytest.raises(TimeoutError):
        await client.raw_line(wait=0.2)
    await client.send_raw(b'{"execute": "qmp_capabilities"}')
    assert await client.read() == {"return": {}}
    ep.emit_event("STOP")
    event = await client.read()
    assert event["event"] == "STOP"
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert abs(event["timestamp"]["seconds"] - time.time()) < 5


# ---------------------------------------------------------------------------------------------------
# The simulated VM and calc-dirty-rate
# ---------------------------------------------------------------------------------------------------


async def poll_dirty_rate(client: Client, **args: Any) -> dict[str, Any]:
    for _ in range(500):
        reply = await client.cmd("query-dirty-rate", args or None)
        if reply["return"]["status"] == "measured":
            result: dict[str, Any] = reply["return"]
            return result
        await asyncio.sleep(0.005)
    raise AssertionError("never measured")


async def test_calc_dirty_rate_lifecycle_and_truncated_mib_per_second(fleet: FakeQMPFleet) -> None:
    # 512 MiB, 20 MiB/s over a 64 MiB working set; exact sampling (noise off) reads 20 MiB/s at 1 s.
    vm = FakeVM(
        memory_bytes=512 * MiB, dirty_bytes_per_second=20 * MiB, working_set_bytes=64 * MiB, noise=False
    )
    _, client = await session(fleet, vm)
    await client.negotiated()
    t0 = time.monotonic()
    assert await client.cmd("calc-dirty-rate", {"calc-time": 1}) == {"return": {}}
    measuring = (await client.cmd("query-dirty-rate"))["return"]
    assert measuring["status"] == "measuring"
    assert "dirty-rate" not in measuring
    assert measuring["calc-time"] == 1
    assert measuring["sample-pages"] == 512
    busy = await client.cmd("calc-dirty-rate", {"calc-time": 1})
    assert busy == {"error": {"class": "GenericError", "desc": "the dirty rate is already being measured."}}
    result = await poll_dirty_rate(client)
    elapsed = time.monotonic() - t0
    assert 0.01 <= elapsed < 1.0  # 1 s simulated at time_scale 0.01
    assert result["dirty-rate"] == 20
    assert list(result) == ["status", "sample-pages", "dirty-rate", "mode", "start-time", "calc-time"]
    # Saturation: 5 s would dirty 100 MiB but the working set is 64 MiB -> 64/5 = 12.8 -> 12.
    assert await client.cmd("calc-dirty-rate", {"calc-time": 5, "sample-pages": 1024}) == {"return": {}}
    result = await poll_dirty_rate(client)
    assert (result["dirty-rate"], result["calc-time"], result["sample-pages"]) == (12, 5, 1024)


async def test_sampling_noise_shrinks_with_more_sample_pages(fleet: FakeQMPFleet) -> None:
    vm = FakeVM(memory_bytes=512 * MiB, dirty_bytes_per_second=int(19.5 * MiB), working_set_bytes=256 * MiB)
    _, client = await session(fleet, vm)
    await client.negotiated()

    async def spread(sample_pages: int) -> list[int]:
        rates = []
        for _ in range(15):
            await client.cmd("calc-dirty-rate", {"calc-time": 2, "sample-pages": sample_pages})
            rates.append((await poll_dirty_rate(client))["dirty-rate"])
        return rates

    coarse, fine = await spread(128), await spread(16384)
    assert max(fine) - min(fine) <= 4
    assert all(17 <= r <= 21 for r in fine)
    assert max(coarse) - min(coarse) > max(fine) - min(fine)


async def test_calc_time_unit_only_from_8_2(fleet: FakeQMPFleet) -> None:
    vm = FakeVM(version=(10, 0, 2), noise=False, dirty_bytes_per_second=20 * MiB)
    ep, client = await session(fleet, vm)
    await client.negotiated()
    short = await client.cmd("calc-dirty-rate", {"calc-time": 40, "calc-time-unit": "millisecond"})
    assert short == {
        "error": {"class": "GenericError", "desc": "Calculation time is out of range [50ms, 60000ms]."}
    }
    # 125 ms dirties 2.5 MiB of 512: at the default 512 pages/GiB that is 1.25 of 256 samples (reads 16);
    # 16384 pages/GiB resolve it exactly, as on real QEMU.
    args = {"calc-time": 125, "calc-time-unit": "millisecond", "sample-pages": 16384}
    assert await client.cmd("calc-dirty-rate", args) == {"return": {}}
    in_ms = await poll_dirty_rate(client, **{"calc-time-unit": "millisecond"})
    assert (in_ms["calc-time"], in_ms["calc-time-unit"], in_ms["dirty-rate"]) == (125, "millisecond", 20)
    in_s = (await client.cmd("query-dirty-rate"))["return"]
    assert (in_s["calc-time"], in_s["calc-time-unit"]) == (0, "second")
    assert ep.commands.count("calc-dirty-rate") == 2


def calc_dirty_rate_args(schema: list[dict[str, Any]]) -> list[str]:
    """How a client discovers calc-time-unit: command entry -> arg-type object -> member names."""
    by_name = {entry["name"]: entry for entry in schema}
    arg_type = by_name[by_name["calc-dirty-rate"]["arg-type"]]
    assert arg_type["meta-type"] == "object"
    return [m["name"] for m in arg_type["members"]]


@pytest.mark.parametrize(
    ("version", "has_unit"), [((7, 2, 22), False), ((8, 1, 0), False), ((8, 2, 0), True), ((10, 0, 2), True)]
)
async def test_schema_tells_whether_calc_time_unit_exists(
    fleet: FakeQMPFleet, version: tuple[int, int, int], has_unit: bool
) -> None:
    _, client = await session(fleet, FakeVM(version=version))
    await client.negotiated()
    schema = (await client.cmd("query-qmp-schema"))["return"]
    assert ("calc-time-unit" in calc_dirty_rate_args(schema)) is has_unit
    assert calc_dirty_rate_args(schema)[0] == "calc-time"
    # Names are masked numbers except commands, events and builtins, as in real introspection.
    for entry in schema:
        assert {"name", "meta-type"} <= set(entry)
        if entry["meta-type"] in ("object", "enum"):
            assert entry["name"].isdigit(), entry
        if entry["meta-type"] == "command":
            assert {"arg-type", "ret-type"} <= set(entry)
    names = {e["name"] for e in schema if e["meta-type"] == "command"}
    assert {"calc-dirty-rate", "query-dirty-rate", "query-qmp-schema", "qmp_capabilities"} <= names


async def test_extended_output_is_shaped_like_the_cover_letter(fleet: FakeQMPFleet) -> None:
    sample = read_json(COVER_LETTER_SAMPLE)
    vm = FakeVM(
        memory_bytes=32 * 1024 * MiB,
        extended_output=True,
        working_set_bytes=12 * 1024 * MiB,
        dirty_bytes_per_second=100 * MiB,
        zero_bytes=20 * 1024 * MiB,
        seed=7,
    )
    _, client = await session(fleet, vm)
    await client.negotiated()
    await client.cmd("calc-dirty-rate", {"calc-time": 60})
    result = await poll_dirty_rate(client)
    assert set(result) == set(sample)
    assert {k: type(v) for k, v in result.items()} == {k: type(v) for k, v in sample.items()}
    assert result["periods"][:9] == sample["periods"][:9]
    assert result["periods"][-1] == 60000
    assert len(result["periods"]) == len(result["n-dirty-pages"]) == 22
    assert result["n-dirty-pages"] == sorted(result["n-dirty-pages"])
    assert result["n-sampled-pages"] == 16384  # 512 per GiB x 32 GiB
    assert result["n-total-pages"] == 8388608
    assert result["page-size"] == 4096
    assert 0.55 < result["n-zero-pages"] / result["n-sampled-pages"] < 0.70
    # dirty-rate is the last period's sampled fraction of memory per second, as in the sample (98).
    expected = result["n-dirty-pages"][-1] * 32768 * 1000 // (16384 * 60000)
    assert result["dirty-rate"] == expected
    assert 90 <= result["dirty-rate"] <= 110


async def test_kvm_modes_without_kvm_crash_the_fake_like_qemu_7_2(fleet: FakeQMPFleet) -> None:
    ep, client = await session(fleet)
    await client.negotiated()
    await client.send_raw(
        json.dumps(
            {"execute": "calc-dirty-rate", "arguments": {"calc-time": 1, "mode": "dirty-bitmap"}}
        ).encode()
    )
    assert await client.at_eof()
    assert ep.crashed
    assert ep.commands == ["qmp_capabilities", "calc-dirty-rate"]
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(ep.address)


async def test_kvm_modes_with_kvm_do_not_crash(fleet: FakeQMPFleet) -> None:
    ep, client = await session(fleet, FakeVM(kvm_enabled=True, noise=False))
    await client.negotiated()
    ring = await client.cmd("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-ring"})
    assert ring["error"]["desc"] == "mode dirty-ring is not enabled, use other method instead."
    assert await client.cmd("calc-dirty-rate", {"calc-time": 1, "mode": "dirty-bitmap"}) == {"return": {}}
    result = await poll_dirty_rate(client)
    assert (result["mode"], result["sample-pages"], result["dirty-rate"]) == ("dirty-bitmap", 0, 20)
    assert not ep.crashed


async def test_tcp_crash_refuses_further_connects(tmp_path: Path) -> None:
    async with FakeQMPFleet(transport="tcp") as tcp:
        ep, client = await session(tcp)
        assert isinstance(ep.address, tuple)
        assert ep.address[0] == "127.0.0.1"
        await client.negotiated()
        await client.send_raw(
            b'{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"mode":"dirty-ring"}}'
        )
        assert await client.at_eof()
        with pytest.raises(ConnectionRefusedError):
            await Client.connect(ep.address)
        dead = await tcp.spawn("dead", faults=Fault.REFUSE_CONNECT)
        with pytest.raises(ConnectionRefusedError):
            await Client.connect(dead.address)


async def test_one_client_at_a_time_like_qemus_chardev(fleet: FakeQMPFleet) -> None:
    ep, first = await session(fleet)
    await first.read()
    second = await Client.connect(ep.address)
    with pytest.raises(TimeoutError):
        await second.raw_line(wait=0.2)  # connected, but QEMU does not greet a second client
    assert (ep.connections, ep.concurrent, ep.max_concurrent) == (2, 2, 2)
    await first.close()
    assert "QMP" in await second.read()
    await second.close()
    await until(lambda: ep.concurrent == 0, 5, "the fake notices both hang-ups")
    assert (ep.connections, ep.concurrent, ep.max_concurrent) == (2, 0, 2)


async def test_crash_api_drops_clients_and_refuses_reconnects(fleet: FakeQMPFleet) -> None:
    ep, client = await session(fleet)
    await client.negotiated()
    await fleet.crash(ep.name)
    assert await client.at_eof()
    assert ep.crashed
    assert is_socket_file(ep.address)  # a killed QEMU leaves its socket file behind
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(ep.address)


# ---------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------


async def test_fault_refuse_connect(fleet: FakeQMPFleet) -> None:
    ep = await fleet.spawn("dead", faults=Fault.REFUSE_CONNECT)
    assert is_socket_file(ep.address)
    with pytest.raises(ConnectionRefusedError):
        await Client.connect(ep.address)
    assert ep.connections == 0


async def test_fault_no_greeting(fleet: FakeQMPFleet) -> None:
    ep, client = await session(fleet, faults=Fault.NO_GREETING)
    with pytest.raises(TimeoutError):
        await client.raw_line(wait=QUICK)
    assert ep.connections == 1


async def test_fault_no_replies_records_commands(fleet: FakeQMPFleet) -> None:
    ep, client = await session(fleet, faults=Fault.NO_REPLIES)
    assert "QMP" in await client.read()
    await client.send_raw(b'{"execute": "qmp_capabilities"} {oops}')
    with pytest.raises(TimeoutError):
        await client.raw_line(wait=QUICK)
    assert ep.commands == ["qmp_capabilities"]


async def test_fault_garbage_keeps_connection(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet, faults=Fault.GARBAGE, params=FaultParams(command="query-kvm"))
    await client.negotiated()
    await client.send_raw(b'{"execute": "query-kvm"}')
    line = await client.raw_line()
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert (await client.cmd("query-status"))["return"]["running"] is True


async def test_fault_truncated_then_closed(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet, faults=Fault.TRUNCATED, params=FaultParams(command="query-status"))
    await client.negotiated()
    await client.send_raw(b'{"execute": "query-status", "id": "x"}')
    line = await client.raw_line()
    assert line.endswith(b"\r\n")
    assert line.startswith(b'{"return": {"status"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert await client.at_eof()


async def test_fault_disconnect_mid_reply(fleet: FakeQMPFleet) -> None:
    _, client = await session(
        fleet, faults=Fault.DISCONNECT_MID_REPLY, params=FaultParams(command="query-memory-size-summary")
    )
    await client.negotiated()
    await client.send_raw(b'{"execute": "query-memory-size-summary"}')
    data, reset = b"", False
    try:
        while chunk := await asyncio.wait_for(client.reader.read(1024), 5):
            data += chunk
    except ConnectionResetError:
        reset = True
    assert data.startswith(b'{"return": {"base-memory"')
    assert b"\n" not in data
    assert reset or client.reader.at_eof()


async def test_fault_huge_line_is_streamed_with_bounded_server_memory(fleet: FakeQMPFleet) -> None:
    size = 100 * 1000 * 1000
    ep, client = await session(
        fleet, faults=Fault.HUGE_LINE, params=FaultParams(command="query-kvm", huge_line_bytes=size)
    )
    await client.negotiated()
    tracemalloc.start()
    try:
        await client.send_raw(b'{"execute": "query-kvm", "id": 42}')
        total, head, tail = 0, b"", b""
        while not tail.endswith(b"\r\n"):
            chunk = await asyncio.wait_for(client.reader.read(1 << 20), 10)
            assert chunk
            head = head or chunk[:40]
            tail = (tail + chunk)[-40:]
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert head.startswith(b'{"return": {"padding": "xxx')
    assert tail.endswith(b'xxx"}, "id": 42}\r\n')
    assert peak < 16 * MiB  # neither side held the 100 MB line
    assert (await client.cmd("query-status"))["return"]["status"] == "running"
    assert ep.commands[-1] == "query-status"


async def test_fault_command_error_hits_only_the_chosen_command(fleet: FakeQMPFleet) -> None:
    params = FaultParams(command="calc-dirty-rate", error_class="GenericError", error_desc="no way")
    _, client = await session(fleet, faults=Fault.COMMAND_ERROR, params=params)
    await client.negotiated()
    assert await client.cmd("calc-dirty-rate", {"calc-time": 1}, id=1) == {
        "id": 1,
        "error": {"class": "GenericError", "desc": "no way"},
    }
    assert "return" in await client.cmd("query-dirty-rate")


async def test_fault_measuring_forever(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet, faults=Fault.MEASURING_FOREVER)
    await client.negotiated()
    await client.cmd("calc-dirty-rate", {"calc-time": 1})
    await asyncio.sleep(0.1)  # ten times the simulated calc-time
    assert (await client.cmd("query-dirty-rate"))["return"]["status"] == "measuring"
    busy = await client.cmd("calc-dirty-rate", {"calc-time": 1})
    assert busy["error"]["desc"] == "the dirty rate is already being measured."


@pytest.mark.parametrize(("fault", "memory"), [(Fault.ZERO_MEMORY, 0), (Fault.HUGE_MEMORY, 2**70)])
async def test_fault_absurd_memory_sizes(fleet: FakeQMPFleet, fault: Fault, memory: int) -> None:
    _, client = await session(fleet, faults=fault)
    await client.negotiated()
    assert await client.cmd("query-memory-size-summary") == {
        "return": {"base-memory": memory, "plugged-memory": 0}
    }


async def test_fault_negative_dirty_rate(fleet: FakeQMPFleet) -> None:
    vm = FakeVM(extended_output=True, noise=False)
    _, client = await session(fleet, vm, faults=Fault.NEGATIVE_DIRTY_RATE)
    await client.negotiated()
    await client.cmd("calc-dirty-rate", {"calc-time": 1})
    result = await poll_dirty_rate(client)
    assert result["dirty-rate"] == -20
    assert all(n < 0 for n in result["n-dirty-pages"])


async def test_fault_slow_delays_each_reply(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet, faults=Fault.SLOW, params=FaultParams(delay_seconds=0.3))
    assert "QMP" in await client.read()  # the greeting is not delayed
    t0 = time.monotonic()
    await client.cmd("qmp_capabilities")
    await client.cmd("query-status")
    assert time.monotonic() - t0 >= 0.6


async def test_fault_events_between_replies(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet, faults=Fault.EVENTS)
    await client.read()
    await client.send_raw(b'{"execute": "qmp_capabilities"}{"execute": "query-kvm", "id": 9}')
    assert await client.read() == {"return": {}}  # no event before negotiation completes
    event = await client.read()
    assert event["event"] == "RTC_CHANGE"
    assert event["data"] == {"offset": 0, "qom-path": "/machine/unattached/device[4]"}
    assert isinstance(event["timestamp"]["microseconds"], int)
    assert (await client.read())["id"] == 9


async def test_fault_migrating_and_paused(fleet: FakeQMPFleet) -> None:
    _, client = await session(fleet, FakeVM(memory_bytes=256 * MiB), faults=Fault.MIGRATING | Fault.PAUSED)
    await client.negotiated()
    migration = (await client.cmd("query-migrate"))["return"]
    assert migration["status"] == "active"
    assert migration["ram"]["total"] == 256 * MiB
    assert {"expected-downtime", "setup-time", "total-time"} <= set(migration)
    assert await client.cmd("query-status") == {
        "return": {"status": "paused", "singlestep": False, "running": False}
    }


async def test_custom_migration_and_status_on_the_vm(fleet: FakeQMPFleet) -> None:
    vm = FakeVM(run_status="paused", migration={"status": "setup"})
    _, client = await session(fleet, vm)
    await client.negotiated()
    assert await client.cmd("query-migrate") == {"return": {"status": "setup"}}
    assert (await client.cmd("query-status"))["return"]["running"] is False


# ---------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------


def test_parser_byte_by_byte_and_scalars() -> None:
    parser = JSONStreamParser()
    data = b'{"a": "}\\"{", "b": [1, {"c": null}]} 12 "s" [3]'
    out: list[Any] = []
    for byte in data:
        out += parser.feed(bytes([byte]))
    out += parser.feed(b" ")  # a scalar ends only at a delimiter
    assert out == [{"a": '}"{', "b": [1, {"c": None}]}, 12, "s", [3]]


def test_parser_errors_and_overflow() -> None:
    parser = JSONStreamParser(max_pending_chars=100)
    out = parser.feed(b'} {"a": NaN} {"b": 1}')
    assert isinstance(out[0], ParseError)
    assert isinstance(out[1], ParseError)
    assert out[2] == {"b": 1}
    with pytest.raises(StreamOverflowError):
        parser.feed(b'{"x": "' + b"y" * 200)


# ---------------------------------------------------------------------------------------------------
# Clients, threads, scale, CLI
# ---------------------------------------------------------------------------------------------------


async def test_qemu_qmp_client_negotiates_and_executes(fleet: FakeQMPFleet) -> None:
    from qemu.qmp import QMPClient  # only here: the daemon's own QMP code lives in migpredictd/qemu/qmp.py

    ep = await fleet.spawn("qemu-qmp", FakeVM(version=(10, 0, 2), package="test"))
    client = QMPClient("fake")
    await asyncio.wait_for(client.connect(ep.address), 5)
    try:
        version = await asyncio.wait_for(client.execute("query-version"), 5)
        assert version == {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "test"}
        assert client.greeting is not None
    finally:
        await client.disconnect()
    assert ep.commands == ["qmp_capabilities", "query-version"]


def test_run_in_thread_serves_blocking_clients_over_tcp() -> None:
    fleet = FakeQMPFleet(transport="tcp", time_scale=0.01)
    endpoints = fleet.add_many(3)
    with fleet.run_in_thread():
        for ep in endpoints:
            assert isinstance(ep.address, tuple)
            with socket.create_connection(ep.address, timeout=5) as sock:
                stream = sock.makefile("rwb")
                assert "QMP" in json.loads(stream.readline())
                stream.write(b'{"execute": "qmp_capabilities"}{"execute": "query-status"}')
                stream.flush()
                assert json.loads(stream.readline()) == {"return": {}}
                assert json.loads(stream.readline())["return"]["running"] is True
        late = fleet.call(fleet.spawn("late"))
        assert fleet["late"] is late
        assert Path(str(late.address)).exists() is False  # tcp: a port, not a path
    assert [ep.commands for ep in endpoints] == [["qmp_capabilities", "query-status"]] * 3


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_thousand_endpoints_in_one_loop(tmp_path: Path, transport: Literal["unix", "tcp"]) -> None:
    count = 1000
    fleet = FakeQMPFleet(
        transport=transport, directory=tmp_path if transport == "unix" else None, time_scale=0.01
    )
    fleet.add_many(count)
    async with fleet:
        limit = asyncio.Semaphore(250)

        async def probe(ep: Endpoint) -> Any:
            async with limit:
                client = await Client.connect(ep.address)
                try:
                    await client.negotiated()
                    return (await client.cmd("query-status"))["return"]["status"]
                finally:
                    await client.close()

        t0 = time.perf_counter()
        statuses = await asyncio.gather(*(probe(ep) for ep in fleet.endpoints))
        elapsed = time.perf_counter() - t0
    print(
        f"\n{count} {transport} endpoints: connect+negotiate+query-status in {elapsed:.2f} s "
        f"({elapsed / count * 1e3:.2f} ms each, client and server in one loop)"
    )
    assert statuses == ["running"] * count
    assert all(ep.commands == ["qmp_capabilities", "query-status"] for ep in fleet.endpoints)
    assert all(ep.connections == 1 and ep.concurrent == 0 for ep in fleet.endpoints)
    assert elapsed < 30


def test_cli_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "migpredictd.lab.fakeqmp",
            "--count",
            "3",
            "--dir",
            str(tmp_path),
            "--qemu-version",
            "8.2.0",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline().strip() for _ in range(4)]
        assert lines[-1] == "ready"
        names = [line.split()[0] for line in lines[:3]]
        assert names == ["vm0000", "vm0001", "vm0002"]
        path = lines[1].split()[1]
        assert path == str(tmp_path / "vm0001.sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            greeting = json.loads(sock.makefile("rb").readline())
        assert greeting["QMP"]["version"]["qemu"] == {"major": 8, "minor": 2, "micro": 0}
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    assert not (tmp_path / "vm0001.sock").exists()


def test_cli_rejects_unknown_fault() -> None:
    with pytest.raises(SystemExit):
        main(["--fault", "explode"])
