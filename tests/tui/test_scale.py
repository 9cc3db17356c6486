"""The console stays responsive with 1,000 peers and 10,000 connection rows.

No wall-clock assertions: a keypress must be handled within a bounded number of pilot pauses
(each pause waits until the app has processed what was queued), while the flood is pending.
"""

from __future__ import annotations

from tests.tui.conftest import until
from tests.tui.fake_gateway import FakeGateway
from unclaw_tui import events as ev
from unclaw_tui.app import UnclawApp
from unclaw_tui.screens.help import HelpScreen

PEERS = 1_000
CONNECTIONS = 10_000


def big_gateway() -> FakeGateway:
    gw = FakeGateway()
    now = gw.clock()
    for i in range(PEERS):
        gw.add_peer(f"peer-{i:04d}")
    for i, name in enumerate(list(gw.peers)):
        gw.set_peer(
            name,
            endpoint=f"198.51.100.{i % 250 + 1}:{40000 + i}",
            last_handshake=now - (i % 300),
            rx_bytes=i * 1000,
            tx_bytes=i * 3000,
        )
    return gw


def flood(gw: FakeGateway) -> None:
    now = gw.clock()
    peers = list(gw.peers.values())
    for i in range(CONNECTIONS):
        peer = peers[i % PEERS]
        gw.publish(
            ev.TcpOpened(
                ts=now - 60 + i * 0.005, conn_id=i, peer=peer.name,
                peer_public_key=peer.public_key, peer_ip=peer.ip, dst_ip="10.78.0.1",
                dst_port=443, hostname=f"host{i % 97}.example", route="tls",
            )
        )  # fmt: skip


async def test_keypress_handled_within_bounded_pauses_under_load() -> None:
    gw = big_gateway()
    app = UnclawApp(gw, clock=gw.clock)  # type: ignore[arg-type]
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert app.dashboard.peers.row_count == PEERS
        await pilot.press("down", "down", "down")  # a selection to keep
        selected = app.dashboard.peers.selected_key
        flood(gw)
        await pilot.press("question_mark")
        for _pause in range(30):
            if isinstance(app.screen, HelpScreen):
                break
            await pilot.pause()
        assert isinstance(app.screen, HelpScreen), "the help key was not handled"
        await pilot.press("escape")
        # Everything arrives, in place, with the selection where it was.
        for _ in range(30):
            if app.dashboard.connections.row_count == CONNECTIONS:
                break
            await pilot.pause()
        assert app.dashboard.connections.row_count == CONNECTIONS
        assert app.dashboard.peers.selected_key == selected
        # Live ticks over the full tables still leave keys responsive.
        for _ in range(3):
            gw.clock.advance(1)
            app.take_snapshot()
        await pilot.press("question_mark")
        for _ in range(10):
            if isinstance(app.screen, HelpScreen):
                break
            await pilot.pause()
        assert isinstance(app.screen, HelpScreen)


async def test_closing_and_pruning_thousands_of_rows_keeps_selection() -> None:
    gw = big_gateway()
    app = UnclawApp(gw, clock=gw.clock, max_connections=CONNECTIONS)  # type: ignore[arg-type]
    async with app.run_test(size=(120, 40)) as pilot:
        flood(gw)
        for _ in range(30):
            await pilot.pause()
            if app.dashboard.connections.row_count == CONNECTIONS:
                break
        connections = app.dashboard.connections
        connections.focus()
        connections.move_cursor(row=9_000)
        await pilot.pause()
        assert connections.selected_key == "t9000"
        now = gw.clock()
        peers = list(gw.peers.values())
        for i in range(5_000):  # close the first half
            peer = peers[i % PEERS]
            gw.publish(
                ev.TcpClosed(
                    ts=now, conn_id=i, peer=peer.name, peer_public_key=peer.public_key,
                    peer_ip=peer.ip, dst_ip="10.78.0.1", dst_port=443, route="tls",
                    duration=1.0,
                )
            )  # fmt: skip
        await until(lambda: connections.cell_text("t4999", "state") == "closed", "the closes")
        assert connections.cell_text("t0", "state") == "closed"
        gw.clock.advance(61)  # past the closed TTL: 5,000 rows go in one pass
        app.take_snapshot()
        await pilot.pause()
        await pilot.pause()
        assert connections.row_count == 5_000
        assert connections.shown_keys()[0] == "t5000"
        assert connections.selected_key == "t9000"
        assert connections.get_row_index("t9000") == 4_000
