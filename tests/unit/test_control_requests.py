"""`requests.list` on a real control server, and `unclaw-tui requests` in-process against it:
pages that fit a control line, the set fixed by the first page, records back from the wire,
the table, JSON lines and HAR (stdout and a 0600 file), peers by name, usage errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import stat
from pathlib import Path

import pytest

from tests.tui.fake_gateway import FakeGateway, demo_gateway, demo_requests
from tests.unit.test_control_cli import run_cli, state_dir  # noqa: F401
from unclaw_tui.control.client import ControlClient
from unclaw_tui.control.protocol import MAX_MESSAGE
from unclaw_tui.control.requests import fetch_all, from_wire, list_page, register, to_wire
from unclaw_tui.control.server import ControlServer
from unclaw_tui.services.requests import MASK, RequestLog, RequestRecord
from unclaw_tui.state import StateDir


def big_record(i: int) -> RequestRecord:
    return RequestRecord(
        protocol="h2", method="GET", scheme="https", authority="a.test", path=f"/{i}",
        peer_public_key="k1" if i % 2 else "k2", request_headers=(("x-big", "v" * 7000),),
        request_body=b"\x00" * 9000,
    )  # fmt: skip


def test_pages_fit_a_control_line_and_the_set_is_fixed_by_the_first() -> None:
    log = RequestLog()
    for i in range(40):
        log.add(big_record(i))
    page = list_page(log, limit=30)
    assert page["until"] == 40 and page["more"]
    seen = [r["id"] for r in page["requests"]]
    assert len(json.dumps(page)) < MAX_MESSAGE
    while page["more"]:
        log.add(big_record(99))  # arrivals meanwhile are not in this set
        page = list_page(log, after=page["next"], until=page["until"])
        assert len(json.dumps(page)) < MAX_MESSAGE
        seen += [r["id"] for r in page["requests"]]
    assert seen == list(range(11, 41))
    # Bodies go cut to 4 KiB; a peer's only.
    assert all(len(r["request_body"]) == 4096 for r in list_page(log, limit=1)["requests"])
    assert {r["peer_public_key"] for r in list_page(log, peer="k1")["requests"]} == {"k1"}


def test_records_come_back_from_the_wire_masked() -> None:
    gw = demo_gateway()
    for r in demo_requests(gw):
        back = from_wire(json.loads(json.dumps(to_wire(r))))
        assert back.to_dict() == r.to_dict()
        assert back.secrets == {}
    first = gw.requests()[0]
    assert dict(first.request_headers)["authorization"] == f"Bearer {MASK}"


async def start_stub(path: Path, gw: FakeGateway) -> ControlServer:
    server = ControlServer(path, "0.1.0")
    register(server, gw.request_log)
    await server.start()
    return server


async def test_the_cli_lists_and_exports(
    state_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, _, err = await run_cli(capsys, "peer", "add", "laptop", "--state-dir", str(state_dir))
    assert rc == 0, err
    gw = demo_gateway()  # its laptop gets the key the state dir gave it: --peer finds it by name
    key = StateDir(state_dir).peer("laptop").public_key
    gw.peers["laptop"] = dataclasses.replace(gw.peers["laptop"], public_key=key)
    records = demo_requests(gw)
    server = await start_stub(state_dir, gw)
    try:
        rc, out, err = await run_cli(capsys, "requests", "--state-dir", str(state_dir))
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["TIME", "PEER", "PROTO", "METHOD", "URL", "STATUS", "SIZE",
                                    "MS"]  # fmt: skip
        assert len(lines) == 1 + len(records)
        assert "grpc" in lines[3] and "grpc 5" in lines[3] and "ws" in lines[4]

        rc, out, _ = await run_cli(capsys, "requests", "--state-dir", str(state_dir),
                                   "--har", "-", "--limit", "2")  # fmt: skip
        doc = json.loads(out)
        assert [e["_id"] for e in doc["log"]["entries"]] == [4, 5]
        assert "eyJhbGciOi" not in out

        target = state_dir.parent / "out.har"
        rc, out, _ = await run_cli(capsys, "requests", "--state-dir", str(state_dir),
                                   "--peer", "laptop", "--har", str(target))  # fmt: skip
        assert rc == 0 and out == ""
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        entries = json.loads(target.read_text())["log"]["entries"]
        assert {e["_peer"] for e in entries} == {"laptop"} and len(entries) == 2

        rc, out, _ = await run_cli(capsys, "requests", "--state-dir", str(state_dir), "--json")
        assert [json.loads(line)["id"] for line in out.splitlines()] == [1, 2, 3, 4, 5]

        def fetch() -> tuple[list[RequestRecord], int]:
            with ControlClient.connect(state_dir) as client:
                return fetch_all(client.call)

        got, dropped = await asyncio.to_thread(fetch)  # the server answers on this loop
        assert [r.path for r in got] == [r.path for r in records] and dropped == 0
    finally:
        await server.stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peer", "nobody"], "unknown peer 'nobody'"),
        (["--har", "/no/such/dir/x.har"], "--har: no directory '/no/such/dir'"),
        (["--har", "-", "--json"], "--har and --json: choose one"),
        (["--limit", "0"], "limit"),
    ],
)
async def test_usage_errors_exit_2_and_write_nothing(
    state_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    before = sorted(p.name for p in state_dir.parent.iterdir())
    rc, out, err = await run_cli(capsys, "requests", "--state-dir", str(state_dir), *argv)
    assert rc == 2 and out == "" and message in err and err.count("\n") == 1
    assert sorted(p.name for p in state_dir.parent.iterdir()) == before


async def test_no_gateway_running_exits_3(
    state_dir: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, out, err = await run_cli(capsys, "requests", "--state-dir", str(state_dir))
    assert rc == 3 and out == "" and "no gateway is running" in err
