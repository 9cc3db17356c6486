"""The console over the real engine with real wireguard-go peers.

The app and the gateway run in this test's event loop; the loop's thread is moved into the
gateway namespace (setns) so the gateway's socket lives there, and the wireguard-go clients
run in their own namespaces.  Client traffic is started with asyncio subprocesses so the
gateway keeps running while a client pings it.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers import until
from tests.interop.harness import (
    HOST_ADDR,
    FlowsSetup,
    GatewaySetup,
    Namespace,
    thread_in_namespace,
)
from unclaw_tui import config
from unclaw_tui.app import UnclawApp
from unclaw_tui.gateway import Gateway
from unclaw_tui.gateway_thread import ThreadedGateway
from unclaw_tui.screens.peer_qr import PeerQrScreen
from unclaw_tui.widgets.peers_table import PeersTable

pytestmark = pytest.mark.interop


async def ping(ns: Namespace, dst: str, count: int = 3) -> int:
    proc = await asyncio.create_subprocess_exec(
        *ns.cmd("ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", dst),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


def peer_key(table: PeersTable, name: str) -> str:
    key = find_peer(table, name)
    if key is None:
        raise AssertionError(f"{name} not in the peers pane: {table.shown_keys()}")
    return key


def find_peer(table: PeersTable, name: str) -> str | None:
    return next((k for k in table.shown_keys() if table.cell_text(k, "name") == name), None)


def handshake_shown(table: PeersTable, name: str) -> bool:
    key = find_peer(table, name)
    return key is not None and table.cell_text(key, "handshake").endswith("ago")


async def test_console_shows_live_peers_adds_and_removes(wg_setup: GatewaySetup) -> None:
    """As `unclaw-tui` runs it: the gateway on its own thread (ThreadedGateway)."""
    s = wg_setup
    phone_config = s.add_peer("phone")
    other_ns = s.topo.namespace("d")
    s.topo.link(other_ns, "192.168.78.2/24", s.gateway_ns, "192.168.78.1/24")
    other_ns.run("ip", "route", "add", "default", "via", "192.168.78.1")

    with thread_in_namespace(s.gateway_ns.name):
        settings = config.Settings(
            state_dir=s.state_dir, listen_port=s.port, endpoint=f"{s.gateway_addr}:{s.port}"
        )
        gateway = ThreadedGateway(settings)
        app = UnclawApp(gateway, state_dir=s.state_dir, refresh_interval=0.25)
        async with app.run_test(size=(120, 40)) as pilot:
            await until(lambda: app.gateway_started, "the gateway started")
            table = app.dashboard.peers
            await until(lambda: find_peer(table, "phone") is not None, "the phone's row")
            phone = peer_key(table, "phone")
            assert table.cell_text(phone, "handshake") == "never"

            # A real client handshakes: the pane shows it, and the age keeps moving.
            s.topo.wg_client(s.client_ns, phone_config, "10.77.0.2/32")
            assert await ping(s.client_ns, "10.77.0.1") == 0
            await until(lambda: handshake_shown(table, "phone"), "the phone's handshake shown")
            first = table.cell_text(phone, "handshake")
            assert table.cell_text(phone, "endpoint").startswith("192.168.77.2:")
            await until(lambda: table.cell_text(phone, "handshake") != first, "the age moving")

            # `a` + a name + enter: a new peer, live at once, its QR screen open.
            await pilot.press("a", *"laptop", "enter")
            await until(lambda: isinstance(app.screen, PeerQrScreen), "the laptop's QR screen")
            assert isinstance(app.screen, PeerQrScreen)
            laptop_config = app.screen.config_text
            assert laptop_config == gateway.client_config("laptop")
            await pilot.press("escape")
            s.topo.wg_client(other_ns, laptop_config, "10.77.0.3/32")
            assert await ping(other_ns, "10.77.0.1") == 0
            await until(lambda: handshake_shown(table, "laptop"), "the laptop's handshake shown")

            # `d` on the phone's row + confirm: removed from the engine at once.
            table.focus()
            table.move_cursor(row=table.shown_keys().index(phone))
            await pilot.pause()
            await pilot.press("d", "y")
            await until(lambda: phone not in table.shown_keys(), "the phone's row gone")
            assert [p.name for p in gateway.snapshot().peers] == ["laptop"]
            assert await ping(s.client_ns, "10.77.0.1", count=2) != 0
            assert await ping(other_ns, "10.77.0.1", count=2) == 0
        assert not app.gateway_started


async def test_console_shows_a_flow_and_a_dns_query(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    config_text = s.add_peer("phone")
    s.start_host("http", 8080)
    s.start_dns_host()
    with thread_in_namespace(s.gateway_ns.name):
        settings = config.Settings(
            state_dir=s.state_dir,
            listen_port=s.port,
            endpoint=f"{s.gateway_addr}:{s.port}",
            upstream_dns=[(HOST_ADDR, 53)],
        )
        gateway = Gateway(settings)
        app = UnclawApp(gateway, state_dir=s.state_dir, refresh_interval=0.25)
        async with app.run_test(size=(120, 40)):
            await until(lambda: app.gateway_started, "the gateway started")
            s.client(config_text)
            curl = await asyncio.create_subprocess_exec(
                *s.client_ns.cmd("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                 "http://198.18.0.2:8080/hello"),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(curl.communicate(), 30)
            assert out == b"200"
            conns = app.dashboard.connections

            def relayed_row_shown() -> bool:
                return any(
                    conns.cell_text(key, "peer") == "phone"
                    and conns.cell_text(key, "dst") == "198.18.0.2:8080"
                    and conns.cell_text(key, "route") == "relay"
                    for key in conns.shown_keys()
                )

            await until(relayed_row_shown, "the relayed connection's row")
            assert app.dashboard.peers.cell_text(
                peer_key(app.dashboard.peers, "phone"), "handshake"
            ).endswith("ago")

            # A download in progress: its open row counts the bytes as they go, not at the end.
            slow = await asyncio.create_subprocess_exec(
                *s.client_ns.cmd("curl", "-s", "-o", "/dev/null", "--limit-rate", "1M",
                                 "http://198.18.0.2:8080/bytes/4000000"),
            )  # fmt: skip
            try:

                def bytes_counted() -> bool:
                    live = [
                        conns.cell_text(key, "down")
                        for key in conns.shown_keys()
                        if conns.cell_text(key, "state") == "open"
                        and conns.cell_text(key, "dst") == "198.18.0.2:8080"
                    ]
                    return bool(live) and live[0] not in ("0 B", "0")

                await until(bytes_counted, "the open row's bytes going up", timeout=4)
                assert slow.returncode is None, "the download must still be running"
            finally:
                if slow.returncode is None:
                    slow.kill()
                await slow.wait()

            # A DNS query through the tunnel lands in the DNS log with its VIP answer.
            dig = await asyncio.create_subprocess_exec(
                *s.client_ns.cmd("dig", "+short", "+time=2", "+tries=1", "@10.77.0.1",
                                 "example.test", "A"),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            answer, _ = await asyncio.wait_for(dig.communicate(), 20)
            vip = answer.decode().strip()
            assert vip.startswith("10.78."), answer
            log = app.dashboard.dns

            def query_shown() -> bool:
                return any(
                    log.cell_text(key, "peer") == "phone"
                    and log.cell_text(key, "name").rstrip(".") == "example.test"
                    and log.cell_text(key, "type") == "A"
                    and vip in log.cell_text(key, "answer")
                    for key in log.shown_keys()
                )

            await until(query_shown, "the DNS query's row")
