"""Replies leave from the address the peer wrote to (IP_PKTINFO / IPV6_PKTINFO), over loopback:
127.0.0.2 is one of this host's addresses, but the route back to a 127.0.0.1 client picks
127.0.0.1 as the source, so a client socket connected to 127.0.0.2 only gets the answers that
really leave from 127.0.0.2 (the kernel filters the others out).  The engine's own face first,
then a Tunnel: a peer's handshake and data, and cookie replies to a flood under load.
"""

from __future__ import annotations

import asyncio
import ipaddress
import select
import socket
from collections.abc import Callable

import pytest

from tests.helpers import FakeClock, loopback_tunnel, until
from tests.packets import ping_packet
from unclaw_tui.engine import _ffi
from unclaw_tui.engine.noise import HandshakeCore, generate_private_key
from unclaw_tui.engine.tunnel import HandshakeDone, Tunnel, TunnelEvent

SECOND = "127.0.0.2"  # a local address the route back to 127.0.0.1 does not pick


def gateway(
    listen_host: str, clock: FakeClock, on_event: Callable[[TunnelEvent], None] | None = None
) -> Tunnel:
    return Tunnel(
        generate_private_key(),
        0,
        ipaddress.IPv4Interface("10.77.0.1/24"),
        listen_host=listen_host,
        clock=clock,
        engine_thread=False,
        on_event=on_event,
    )


def connected_client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.connect((SECOND, port))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket, into: list[bytes]) -> int:
    while True:
        try:
            into.append(sock.recv(2048))
        except BlockingIOError:
            return len(into)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_engine_reports_the_local_address_and_answers_from_it(family: int) -> None:
    """A datagram's local address comes up with its handshake event; send_raw with it leaves
    from there; without it, the kernel's choice (127.0.0.1) never reaches the connected socket."""
    engine = _ffi.Engine("10.77.0.1", 24)
    server = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::", 0))
    else:
        server.bind(("0.0.0.0", 0))
    server.setblocking(False)
    client = connected_client(server.getsockname()[1])
    try:
        engine.io_attach(server.fileno(), 6 if family == socket.AF_INET6 else 4)
        client.send(b"\x01\x00\x00\x00" + bytes(144))  # an initiation's size: raised as is
        events: list[_ffi.EngineEvent] = []
        for _ in range(200):
            engine.io_recv(0.0, 64)
            events += engine.events()
            if events:
                break
            select_wait(server)
        assert len(events) == 1
        ev = events[0]
        assert ev.src == ("127.0.0.1", client.getsockname()[1])
        assert ev.local is not None and ev.local[0] == SECOND and ev.local[1] > 0
        engine.send_raw(b"without", ev.src)
        engine.send_raw(b"with", ev.src, ev.local)
        engine.io_flush()
        got: list[bytes] = []
        select_wait(client)
        drain(client, got)
        assert got == [b"with"]
    finally:
        engine.close()
        server.close()
        client.close()


def select_wait(sock: socket.socket, timeout: float = 2.0) -> None:
    select.select([sock], [], [], timeout)


def test_engine_keeps_a_peers_local_side_when_told_only_its_address() -> None:
    engine = _ffi.Engine("10.77.0.1", 24)
    try:
        engine.peer_add(0)
        engine.peer_set_endpoint(0, ("192.0.2.7", 4000), ("198.51.100.1", 2))
        assert engine.peer_stats(0).local == ("198.51.100.1", 2)
        engine.peer_set_endpoint(0, ("192.0.2.7", 4000))  # same remote side: local kept
        assert engine.peer_stats(0).local == ("198.51.100.1", 2)
        engine.peer_set_endpoint(0, ("192.0.2.8", 4000))  # another one: the kernel picks
        assert engine.peer_stats(0).local is None
        with pytest.raises(_ffi.EngineError):  # a local side of the other family
            engine.peer_set_endpoint(0, ("192.0.2.7", 4000), ("2001:db8::1", 0))
    finally:
        engine.close()


@pytest.mark.parametrize("listen_host", ["0.0.0.0", "::"])
async def test_peer_handshakes_and_talks_through_the_second_address(listen_host: str) -> None:
    clock = FakeClock()
    gw_events: list[TunnelEvent] = []
    gw = gateway(listen_host, clock, gw_events.append)
    cl = loopback_tunnel("10.77.0.2/24", clock=clock)
    await gw.start()
    await cl.start()
    try:
        gw.add_peer(cl.public_key, allowed_ips=["10.77.0.2/32"])
        cl.add_peer(gw.public_key, allowed_ips=["10.77.0.1/32"], endpoint=(SECOND, gw.listen_port))
        cl.send_inner(ping_packet("10.77.0.2", "10.77.0.1"))
        await until(lambda: gw.engine_stats()["icmp_echo_replies"] == 1, "echo reply")
        await until(lambda: cl.peer_info(gw.public_key).rx_packets >= 1, "echo reply received")
        # Everything the client heard came from the address it wrote to (its endpoint for the
        # gateway would otherwise have roamed to 127.0.0.1).
        assert cl.peer_info(gw.public_key).endpoint == (SECOND, gw.listen_port)
        assert gw._engine.peer_stats(gw._peers[cl.public_key].peer_id).local[0] == SECOND
        assert any(isinstance(e, HandshakeDone) for e in gw_events)
    finally:
        gw.close()
        cl.close()


@pytest.mark.parametrize("listen_host", ["0.0.0.0", "::"])
async def test_a_flood_to_the_second_address_gets_its_cookie_replies(listen_host: str) -> None:
    clock = FakeClock()
    gw = gateway(listen_host, clock)
    await gw.start()
    flooder = connected_client(gw.listen_port)
    stranger = HandshakeCore(generate_private_key())
    stranger.add_peer(gw.public_key)
    replies: list[bytes] = []

    async def flood(n: int) -> None:
        for i in range(n):
            flooder.send(stranger.create_initiation(gw.public_key, i + 1, clock.now))
            if i % 50 == 49:  # pacing, not a wait: the gateway's socket buffer keeps up
                await asyncio.sleep(0.01)

    try:
        await flood(200)
        await until(lambda: gw.under_load, "under load")
        before = gw.cookies_sent
        drain(flooder, replies)
        replies.clear()
        await flood(100)
        await until(lambda: gw.cookies_sent >= before + 100, "cookie replies sent")
        await until(lambda: drain(flooder, replies) == gw.cookies_sent - before, "all received")
        assert all(r[0] == 3 for r in replies)  # cookie replies, from the address written to
    finally:
        gw.close()
        flooder.close()
