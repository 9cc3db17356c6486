"""`unclaw-tui status`: a real control server started here, the CLI in-process and as a
process, and the clear error when no gateway runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_cli import REPO_ROOT, _child_env, dir_snapshot
from unclaw_tui import cli
from unclaw_tui.control.server import ControlServer
from unclaw_tui.control.status import status
from unclaw_tui.gateway import GatewaySnapshot, PeerSnapshot
from unclaw_tui.state import StateDir

NO_GATEWAY = (
    "unclaw-tui: error: no gateway is running on {} "
    "(start it with `unclaw-tui` or `unclaw-tui --no-ui`)\n"
)


def peer(name: str, last_handshake: float | None) -> PeerSnapshot:
    return PeerSnapshot(
        name=name, public_key=f"{name}-key", ip="10.77.0.2", created=0.0, endpoint=None,
        last_handshake=last_handshake, rx_bytes=0, tx_bytes=0, rx_packets=0, tx_packets=0,
    )  # fmt: skip


def snapshot(now: float) -> GatewaySnapshot:
    """Up 1 h 2 min 5 s, the phone's handshake 5 s ago, as of `now`: built when asked (the
    module may be imported minutes before a test runs, and "online" is judged by the clock)."""
    return GatewaySnapshot(
        listen_port=51820,
        public_key="gateway-public-key",
        endpoint="192.0.2.10:51820",
        address="10.77.0.1/24",
        started_at=now - 3725,
        peers=(peer("phone", now - 5), peer("laptop", None)),
        open_flows=7,
    )


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(cli.main, list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    StateDir(path)
    return path


async def start_gateway_stub(state_dir: Path) -> ControlServer:
    """What the gateway will do: serve the control socket with `status` registered."""
    server = ControlServer(state_dir, "0.1.0")

    def answer(params: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        return status(snapshot(now), "0.1.0", now)

    server.register("status", answer)
    await server.start()
    return server


async def test_status_asks_the_running_gateway(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_gateway_stub(state_dir)
    try:
        rc, out, err = await run_cli(capsys, "status", "--state-dir", str(state_dir))
        assert (rc, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].startswith(f"gateway      running on {state_dir} (pid ")
        assert lines[1:] == [
            "version      0.1.0",
            "uptime       1h 2m",
            "listen port  51820 (endpoint 192.0.2.10:51820)",
            "public key   gateway-public-key",
            "peers        2 (1 online)",
            "open flows   7",
        ]
        rc, out, err = await run_cli(capsys, "--state-dir", str(state_dir), "status", "--json")
        assert (rc, err) == (0, "")
        result: dict[str, Any] = json.loads(out)
        assert result["peers"] == 2 and result["peers_online"] == 1 and result["open_flows"] == 7
        assert result["version"] == "0.1.0" and result["protocol"] == 1
        assert 3725 <= result["uptime"] < 3725 + 1
    finally:
        await server.stop()


async def test_status_without_a_gateway_says_so_and_exits_3(
    tmp_path: Path, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = dir_snapshot(state_dir)
    rc, out, err = await run_cli(capsys, "status", "--state-dir", str(state_dir))
    assert (rc, out, err) == (3, "", NO_GATEWAY.format(state_dir))
    assert dir_snapshot(state_dir) == before
    missing = tmp_path / "never made"
    rc, out, err = await run_cli(capsys, "status", "--state-dir", str(missing))
    assert (rc, out, err) == (3, "", NO_GATEWAY.format(missing))
    assert not missing.exists()  # asking creates nothing


async def test_status_after_the_gateway_stopped_exits_3(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_gateway_stub(state_dir)
    await server.stop()
    rc, _out, err = await run_cli(capsys, "status", "--state-dir", str(state_dir))
    assert (rc, err) == (3, NO_GATEWAY.format(state_dir))


async def test_a_gateway_without_status_is_a_failure_not_a_usage_error(
    state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ControlServer(state_dir, "0.1.0")  # no status registered
    await server.start()
    try:
        rc, out, err = await run_cli(capsys, "status", "--state-dir", str(state_dir))
    finally:
        await server.stop()
    assert (rc, out) == (1, "")
    assert err.startswith("unclaw-tui: error: the gateway answered: line 1: unknown method ")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen-port", "5000", "status"],
        ["status", "--listen-port", "5000"],
        ["status", "--endpoint", "x:1"],
        ["status", "extra"],
    ],
)
def test_status_takes_only_its_own_flags(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = cli.main([*argv, "--state-dir", str(tmp_path / "s")])
    _out, err = capsys.readouterr()
    assert rc == 2
    assert err.startswith("unclaw-tui: error: ") and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_status_as_a_process_exits_3_without_a_gateway(state_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "unclaw_tui", "status", "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=_child_env(),
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (3, "", NO_GATEWAY.format(state_dir))


def test_status_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "status" in capsys.readouterr().out
    assert cli.main(["status", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--state-dir" in help_text and "--json" in help_text
    assert "--listen-port" not in help_text
