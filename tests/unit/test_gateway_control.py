"""The gateway serves its control socket while it runs: `unclaw-tui status` reaches it, a
second gateway on the same state dir is refused before it touches anything, and the socket
goes when the gateway stops."""

from __future__ import annotations

import asyncio
import contextlib
import io
from pathlib import Path

import pytest

from tests.tui.test_real_gateway import free_udp_port
from unclaw_tui import cli
from unclaw_tui.config import Settings
from unclaw_tui.control.server import ControlSocketError
from unclaw_tui.gateway import Gateway


def status_cli(state_dir: Path) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["status", "--state-dir", str(state_dir)])
    return rc, out.getvalue()


async def test_status_reaches_the_running_gateway_and_a_second_one_is_refused(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    settings = Settings(state_dir=state_dir, listen_port=free_udp_port(), endpoint="127.0.0.1")
    gateway = Gateway(settings)
    await gateway.start()
    try:
        rc, out = await asyncio.to_thread(status_cli, state_dir)
        assert rc == 0, out
        assert out.startswith(f"gateway      running on {state_dir}")
        assert "peers        0 (0 online)" in out
        second = Gateway(Settings(state_dir=state_dir, listen_port=free_udp_port()))
        with pytest.raises(ControlSocketError, match="another gateway is running"):
            await second.start()
        assert second._tunnel is None  # refused before it bound a port or read any state
    finally:
        await gateway.stop()
    assert not (state_dir / "control.sock").exists()
    rc, _out = await asyncio.to_thread(status_cli, state_dir)
    assert rc == 3
