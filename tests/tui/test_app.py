"""Pilot tests of the console against a FakeGateway: flows, messages and table contents."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from textual.command import CommandList, CommandPalette
from textual.message import Message
from textual.widgets import Input, Label

from tests.helpers import FakeClock, decode_qr
from tests.tui.conftest import make_app, until
from tests.tui.fake_gateway import FakeGateway, demo_gateway, fake_key
from tests.tui.qr_image import drawn_cells, qr_image
from tests.tui.screen_text import screen_text
from unclaw_tui import events as ev
from unclaw_tui.app import UnclawApp
from unclaw_tui.screens.add_peer import AddPeerScreen
from unclaw_tui.screens.confirm_remove import ConfirmRemoveScreen
from unclaw_tui.screens.dashboard import DashboardScreen
from unclaw_tui.screens.help import HelpScreen
from unclaw_tui.screens.peer_qr import PeerQrScreen
from unclaw_tui.widgets.messages import PeerCreated, PeerDeleted, SnapshotTaken
from unclaw_tui.widgets.qr_code import QrCode

BIG = (120, 40)


def names(app: UnclawApp) -> list[str]:
    store = app.model.peers.store
    return [store.get(key).name for key in app.dashboard.peers.shown_keys()]  # type: ignore[union-attr]


async def test_start_shows_peers_status_and_logs_then_stops_gateway(
    gateway: FakeGateway,
) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        assert gateway.started
        assert names(app) == ["phone", "laptop", "vm-build", "tablet"]
        peers = app.dashboard.peers
        assert peers.cell_text(fake_key("phone"), "handshake") == "12 s ago"
        assert peers.cell_text(fake_key("tablet"), "handshake") == "never"
        assert peers.cell_text(fake_key("laptop"), "tx") == "11.5 GiB"
        text = screen_text(app)
        assert "listen :51820" in text
        assert "peers 2/4 online" in text
        assert "up 01:02:03" in text
        dashboard = app.dashboard
        assert dashboard.connections.row_count == 6
        assert dashboard.connections.cell_text("t2", "state") == "closed"
        assert dashboard.connections.cell_text("t6", "state") == "error: denied by policy"
        assert dashboard.dns.row_count == 4
        assert dashboard.dns.cell_text("q3", "rcode") == "NXDOMAIN"
        assert dashboard.dns.cell_text("q4", "ms") == "cache"
        assert dashboard.tls.cell_text("api.example.com", "request") == "GET /v1/items 200"
        assert dashboard.tls.cell_text("tracker.example", "mode") == "rejected"
        assert not gateway.stopped
    assert gateway.stopped
    assert gateway.calls[0] == ("start",) and gateway.calls[-1] == ("stop",)


async def test_stale_peer_is_dimmed_and_age_follows_the_clock(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        peers = app.dashboard.peers
        assert "dim" in str(peers.get_cell(fake_key("vm-build"), "name").style)
        assert "dim" not in str(peers.get_cell(fake_key("phone"), "name").style)
        gateway.clock.advance(200)  # phone's handshake is now 212 s old: stale
        app.take_snapshot()
        await pilot.pause()
        assert peers.cell_text(fake_key("phone"), "handshake") == "3 min ago"
        assert "dim" in str(peers.get_cell(fake_key("phone"), "name").style)


async def test_events_from_the_subscription_reach_the_panes(gateway: FakeGateway) -> None:
    app = make_app(gateway, demo=False)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        gateway.publish(
            ev.DnsQuery(
                ts=gateway.clock(),
                peer="phone",
                peer_ip="10.77.0.2",
                qname="example.org.",
                qtype="A",
                answers=["10.78.0.7"],
                upstream_ms=12.0,
            )
        )
        phone = gateway.peers["phone"]
        gateway.publish(
            ev.TcpOpened(
                ts=gateway.clock(),
                conn_id=77,
                peer="phone",
                peer_public_key=phone.public_key,
                peer_ip=phone.ip,
                dst_ip="10.78.0.7",
                dst_port=443,
                hostname="example.org",
                route="tls",
            )
        )
        dashboard = app.dashboard
        await until(lambda: "t77" in dashboard.connections.shown_keys(), "the flow's row")
        assert dashboard.dns.cell_text("q1", "name") == "example.org"
        assert dashboard.dns.cell_text("q1", "answer") == "10.78.0.7"
        assert dashboard.connections.cell_text("t77", "host") == "example.org"
        assert dashboard.connections.cell_text("t77", "state") == "open"
        gateway.publish(
            ev.TcpClosed(
                ts=gateway.clock(),
                conn_id=77,
                peer="phone",
                peer_public_key=phone.public_key,
                peer_ip=phone.ip,
                dst_ip="10.78.0.7",
                dst_port=443,
                hostname="example.org",
                route="tls",
                bytes_up=2048,
                bytes_down=4096,
                duration=3.0,
                error="reset",
            )
        )
        await until(
            lambda: dashboard.connections.cell_text("t77", "state") == "error: reset",
            "the flow's close",
        )
        assert dashboard.connections.cell_text("t77", "down") == "4.0 KiB"


async def test_a_console_that_falls_behind_shows_how_many_events_it_dropped(
    clock: FakeClock,
) -> None:
    gateway = demo_gateway(clock)
    gateway.backlog = 100  # the console's one buffer between the gateway and its panes
    app = make_app(gateway, demo=False)
    async with app.run_test(size=(80, 24)):  # the narrowest: the count must still show
        await until(lambda: "listen :51820" in screen_text(app), "the first status")
        assert "events dropped" not in screen_text(app)
        # 150 queries at once, before the console's reader runs again: 50 must go.
        for i in range(150):
            gateway.publish(
                ev.DnsQuery(
                    ts=clock(), peer="phone", peer_ip="10.77.0.2", qname=f"n{i}.", qtype="A"
                )
            )
        assert app.events_dropped == 50
        dns = app.model.dns.store
        await until(lambda: len(dns) == 100, "the hundred kept")
        kept = [row.qname for _, row in dns.items()]
        assert kept == [f"n{i}" for i in range(50, 150)]  # the oldest went
        app.take_snapshot()  # the status bar follows snapshots, twice a second
        await until(lambda: "events dropped 50" in screen_text(app), "the count on screen")


async def test_add_peer_calls_gateway_and_opens_its_qr_screen(gateway: FakeGateway) -> None:
    messages: list[Message] = []
    app = make_app(gateway)
    async with app.run_test(size=BIG, message_hook=messages.append) as pilot:
        await pilot.press("a")
        assert isinstance(app.screen, AddPeerScreen)
        await pilot.press(*"desk", "enter")
        await pilot.pause()
        assert ("add_peer", "desk") in gateway.calls
        assert isinstance(app.screen, PeerQrScreen)
        assert app.screen.peer_name == "desk"
        assert app.screen.config_text == gateway.client_config("desk")
        # The typed message sequence: the modal's submit, then PeerCreated, then a snapshot.
        kinds = [type(m) for m in messages]
        submitted = next(i for i, m in enumerate(messages) if isinstance(m, Input.Submitted))
        created = kinds.index(PeerCreated)
        assert submitted < created
        assert messages[created].peer.name == "desk"  # type: ignore[attr-defined]
        assert SnapshotTaken in kinds[created:]
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        assert names(app)[-1] == "desk"


async def test_add_peer_error_stays_in_the_dialog(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("a", *"no way", "enter")
        await pilot.pause()
        assert isinstance(app.screen, AddPeerScreen)
        error = app.screen.query_one("#error", Label)
        assert "invalid peer name" in str(error.render())
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, DashboardScreen)
        assert "no way" not in gateway.peers


async def test_remove_peer_asks_first(gateway: FakeGateway) -> None:
    messages: list[Message] = []
    app = make_app(gateway)
    async with app.run_test(size=BIG, message_hook=messages.append) as pilot:
        await pilot.press("down", "d")  # laptop
        assert isinstance(app.screen, ConfirmRemoveScreen)
        assert app.screen.peer_name == "laptop"
        await pilot.press("n")
        await pilot.pause()
        assert ("remove_peer", "laptop") not in gateway.calls
        await pilot.press("d", "y")
        await pilot.pause()
        await pilot.pause()
        assert ("remove_peer", "laptop") in gateway.calls
        assert [m.name for m in messages if isinstance(m, PeerDeleted)] == ["laptop"]
        assert names(app) == ["phone", "vm-build", "tablet"]


async def test_enter_shows_selected_peer_config(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("down", "down", "enter")
        assert isinstance(app.screen, PeerQrScreen)
        assert app.screen.peer_name == "vm-build"


async def test_filter_the_focused_pane(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("tab")  # Connections
        connections = app.dashboard.connections
        assert app.focused is connections
        await pilot.press("slash", *"laptop", "enter")
        await pilot.pause()
        assert connections.row_count == 4
        assert {connections.cell_text(k, "peer") for k in connections.shown_keys()} == {"laptop"}
        assert connections.border_subtitle == "filter: laptop"
        assert app.focused is connections
        assert app.dashboard.peers.row_count == 4  # other panes keep their rows
        await pilot.press("slash", "escape")
        await pilot.pause()
        assert connections.row_count == 6
        assert connections.border_subtitle == ""


async def test_connections_scope_follows_selected_peer(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("down", "c")  # laptop
        await pilot.pause()
        connections = app.dashboard.connections
        assert connections.border_title == "Connections · laptop"
        assert connections.row_count == 4
        await pilot.press("up")
        await until(  # the rescope is debounced
            lambda: connections.border_title == "Connections · phone", "the rescope"
        )
        assert connections.row_count == 2
        await pilot.press("c")
        await pilot.pause()
        assert connections.row_count == 6


async def test_pause_holds_log_panes_and_resume_catches_up(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        dns = app.dashboard.dns
        assert dns.row_count == 4
        await pilot.press("p")
        await pilot.pause()
        assert "PAUSED" in screen_text(app)
        gateway.publish(
            ev.DnsQuery(
                ts=gateway.clock(), peer="phone", peer_ip="10.77.0.2", qname="a.b.", qtype="A"
            )
        )
        await until(lambda: len(app.model.dns.store) == 5, "the query to reach the model")
        app.take_snapshot()  # timer ticks must not unpause the panes either
        await pilot.pause()
        assert dns.row_count == 4
        await pilot.press("p")
        await pilot.pause()
        assert dns.row_count == 5
        assert "PAUSED" not in screen_text(app)


async def test_selection_survives_updates(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("down", "down")  # vm-build
        peers = app.dashboard.peers
        assert peers.selected_key == fake_key("vm-build")
        gateway.add_peer("desk")
        gateway.set_peer("vm-build", rx_bytes=10**9)
        gateway.remove_peer("phone")  # a row above the cursor goes away
        app.take_snapshot()
        await until(
            lambda: names(app) == ["laptop", "vm-build", "tablet", "desk"], "the new peer list"
        )
        assert peers.selected_key == fake_key("vm-build")
        assert peers.cell_text(fake_key("vm-build"), "rx") == "953.7 MiB"


async def test_help_screen_lists_keys(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = screen_text(app)
        for key in ("add a peer", "remove the selected peer", "pause or resume", "quit"):
            assert key in text
        # Dashboard keys do nothing under a dialog.
        await pilot.press("a")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, DashboardScreen)


async def test_quit_key_exits_with_zero(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0
    assert gateway.stopped


async def test_qr_screen_code_decodes_to_the_exact_config(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, PeerQrScreen)
        await pilot.pause()
        assert not screen.has_class("-too-small")
        widget = screen.query_one(QrCode)
        assert widget.region.width == widget.cells_needed[0]  # drawn whole
        expected = gateway.client_config("phone").encode()
        for theme in ("textual-dark", "textual-light"):
            app.theme = theme
            await pilot.pause()
            # Pinned colours: pure black on pure white in every cell, whatever the theme.
            colours = {(fg, bg) for row in drawn_cells(widget) for _, fg, bg in row}
            assert colours == {((0, 0, 0), (255, 255, 255))}
            assert decode_qr(qr_image(widget)) == [expected]


async def test_qr_screen_too_small_says_size_and_saves_png(
    gateway: FakeGateway, tmp_path: Path
) -> None:
    app = make_app(gateway, state_dir=tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("enter")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, PeerQrScreen)
        assert screen.has_class("-too-small")
        need_w, need_h = screen.needed_size
        text = screen_text(app)
        assert f"at least {need_w}x{need_h}" in text
        assert "PrivateKey = " in text  # the config text is still there
        await pilot.press("s")
        await pilot.pause()
        path = tmp_path / "phone-wireguard-qr.png"
        assert screen.saved_to == path
        assert path.stat().st_mode & 0o777 == 0o600
        assert decode_qr(Image.open(path)) == [gateway.client_config("phone").encode()]


async def test_gateway_start_failure_exits_nonzero() -> None:
    class Broken(FakeGateway):
        async def start(self) -> None:
            raise OSError("address in use")

    started: list[bool] = []
    app = UnclawApp(Broken(), on_started=lambda: started.append(True))  # type: ignore[arg-type]
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
    assert app.return_code == 1
    assert started == []  # so the CLI saves none of its flags


async def test_on_started_is_called_once_the_gateway_started(gateway: FakeGateway) -> None:
    started: list[bool] = []
    app = make_app(gateway, on_started=lambda: started.append(app.gateway_started))
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        assert started == [True]


async def test_command_palette_offers_the_console_actions(gateway: FakeGateway) -> None:
    app = make_app(gateway)
    async with app.run_test(size=BIG) as pilot:
        await pilot.pause()
        titles = {command.title for command in app.get_system_commands(app.screen)}
        for title in ("Add peer", "Show peer config", "Remove peer", "Filter", "Help"):
            assert title in titles
        await pilot.press("ctrl+p", *"add peer")
        palette = app.screen
        assert isinstance(palette, CommandPalette)
        await until(  # the palette searches in a worker
            lambda: palette.query_one(CommandList).highlighted is not None, "a command to match"
        )
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, AddPeerScreen)


async def test_a_column_grows_when_a_value_widens(gateway: FakeGateway) -> None:
    app = make_app(gateway, demo=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        table = app.dashboard.peers
        name = next(iter(gateway.peers))
        gateway.set_peer(name, endpoint=None)
        app.take_snapshot()
        await pilot.pause()
        gateway.set_peer(name, endpoint="[2001:db8:1234:5678::99]:51820")
        app.take_snapshot()
        await pilot.pause()
        assert "[2001:db8:1234:5678::99]:51820" in screen_text(app)
        key = next(k for k in table.shown_keys() if table.cell_text(k, "name") == name)
        assert table.cell_text(key, "endpoint") == "[2001:db8:1234:5678::99]:51820"
