"""The console over the real Gateway (no WireGuard client): add a peer from the UI, scan its
QR code, remove it. The wireguard-go end-to-end tests live with the interop suite."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.helpers import decode_qr
from tests.tui.conftest import until
from tests.tui.qr_image import qr_image
from unclaw_tui import config
from unclaw_tui.app import UnclawApp
from unclaw_tui.gateway import Gateway
from unclaw_tui.screens.peer_qr import PeerQrScreen
from unclaw_tui.widgets.qr_code import QrCode


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_add_scan_remove_with_the_real_gateway(tmp_path: Path) -> None:
    settings = config.Settings(
        state_dir=tmp_path / "state", listen_port=free_udp_port(), endpoint="127.0.0.1"
    )
    gateway = Gateway(settings)
    app = UnclawApp(gateway, state_dir=settings.state_dir)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert app.gateway_started
        await pilot.press("a", *"phone", "enter")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, PeerQrScreen)
        expected = gateway.client_config("phone")
        assert screen.config_text == expected
        [result] = decode_qr(qr_image(screen.query_one(QrCode)))
        assert result == expected.encode()
        await pilot.press("escape")
        assert [p.name for p in gateway.snapshot().peers] == ["phone"]
        await until(lambda: app.dashboard.peers.row_count == 1, "the new peer's row")
        await pilot.press("d", "y")
        assert gateway.snapshot().peers == ()
        await until(lambda: app.dashboard.peers.row_count == 0, "the peer's row to go")
    assert not app.gateway_started
