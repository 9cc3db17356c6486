"""Two Tunnels over loopback UDP in one loop: the gateway's own initiator role, handshake
retransmission with jitter and give-up, and cookie replies under load.

Both tunnels read a shared fake clock for protocol time; the sockets are real.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable

from tests.packets import ping_packet
from unclaw_tui.engine import constants
from unclaw_tui.engine.noise import HandshakeCore, generate_private_key, public_key_of
from unclaw_tui.engine.tunnel import (
    HandshakeDone,
    HandshakeFailed,
    LoadChanged,
    Tunnel,
    TunnelEvent,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(pred: Callable[[], bool], what: str, steps: int = 200) -> None:
    for _ in range(steps):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def make_pair(clock: FakeClock) -> tuple[Tunnel, Tunnel, list[TunnelEvent], list[TunnelEvent]]:
    gw_events: list[TunnelEvent] = []
    cl_events: list[TunnelEvent] = []
    gw = Tunnel(generate_private_key(), 0, ipaddress.IPv4Interface("10.77.0.1/24"),
                listen_host="127.0.0.1", on_event=gw_events.append,
                clock=clock, engine_thread=False)  # fmt: skip
    cl = Tunnel(generate_private_key(), 0, ipaddress.IPv4Interface("10.77.0.2/24"),
                listen_host="127.0.0.1", on_event=cl_events.append,
                clock=clock, engine_thread=False)  # fmt: skip
    return gw, cl, gw_events, cl_events


async def test_client_initiates_on_data_and_gateway_answers_ping() -> None:
    clock = FakeClock()
    gw, cl, gw_events, cl_events = make_pair(clock)
    await gw.start()
    await cl.start()
    try:
        gw.add_peer(cl.public_key, allowed_ips=["10.77.0.2/32"])
        cl.add_peer(gw.public_key, allowed_ips=["10.77.0.1/32"],
                    endpoint=("127.0.0.1", gw.listen_port))  # fmt: skip
        cl.send_inner(ping_packet("10.77.0.2", "10.77.0.1"))
        await until(lambda: gw.engine_stats()["icmp_echo_replies"] == 1, "echo reply")
        await until(lambda: cl.peer_info(gw.public_key).rx_packets >= 1, "reply received")
        assert len([e for e in cl_events if isinstance(e, HandshakeDone)]) == 1
        assert cl_events[0].initiator is True
        gw_handshakes = [e for e in gw_events if isinstance(e, HandshakeDone)]
        assert len(gw_handshakes) == 1 and gw_handshakes[0].initiator is False
        assert gw_handshakes[0].endpoint == ("127.0.0.1", cl.listen_port)
        assert gw.peer_info(cl.public_key).last_handshake is not None
    finally:
        gw.close()
        cl.close()


async def test_initiation_retransmits_with_jitter_then_gives_up() -> None:
    clock = FakeClock()
    events: list[TunnelEvent] = []
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    cl = Tunnel(generate_private_key(), 0, ipaddress.IPv4Interface("10.77.0.2/24"),
                listen_host="127.0.0.1", on_event=events.append,
                clock=clock, engine_thread=False)  # fmt: skip
    await cl.start()
    silent_peer = public_key_of(generate_private_key())
    try:
        cl.add_peer(silent_peer, allowed_ips=["10.77.0.1/32"],
                    endpoint=("127.0.0.1", sink.getsockname()[1]))  # fmt: skip
        cl.send_inner(ping_packet("10.77.0.2", "10.77.0.1"))
        received: list[bytes] = []

        def drain() -> int:
            while True:
                try:
                    received.append(sink.recv(2048))
                except BlockingIOError:
                    return len(received)

        await until(lambda: drain() == 1, "first initiation")
        peer = cl._peers[silent_peer]
        gaps = []
        while peer.next_retransmit is not None:
            gap = peer.next_retransmit - clock.now
            gaps.append(gap)
            clock.now = peer.next_retransmit
            cl.driver.fire_timer()
            assert len(gaps) < 40, "retransmission never gives up"
        drain()
        assert all(len(m) == constants.MESSAGE_INITIATION_SIZE for m in received)
        assert all(m[0] == constants.MESSAGE_INITIATION_TYPE for m in received)
        # Every resend waits REKEY_TIMEOUT plus up to 333 ms of jitter, and the jitter varies.
        assert all(constants.REKEY_TIMEOUT <= g <= constants.REKEY_TIMEOUT + 0.334 for g in gaps)
        assert len({round(g, 4) for g in gaps}) > 1
        # Given up once REKEY_ATTEMPT_TIME (90 s) has passed: ~17 initiations in all.
        assert 15 <= len(received) <= 19
        assert len([e for e in events if isinstance(e, HandshakeFailed)]) == 1
        assert cl._engine.peer_stats(peer.peer_id).staged == 0
    finally:
        cl.close()
        sink.close()


async def test_under_load_a_cookie_reply_then_mac2_lets_a_real_peer_in() -> None:
    clock = FakeClock()
    gw, cl, gw_events, cl_events = make_pair(clock)
    await gw.start()
    await cl.start()
    flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flooder.bind(("127.0.0.1", 0))
    flooder.setblocking(False)
    stranger = HandshakeCore(generate_private_key())
    stranger.add_peer(gw.public_key)

    async def flood(n: int = 200) -> None:
        for i in range(n):
            flooder.sendto(stranger.create_initiation(gw.public_key, i + 1, clock.now),
                           ("127.0.0.1", gw.listen_port))  # fmt: skip
            if i % 50 == 49:
                await asyncio.sleep(0.01)

    try:
        gw.add_peer(cl.public_key, allowed_ips=["10.77.0.2/32"])
        cl.add_peer(gw.public_key, allowed_ips=["10.77.0.1/32"],
                    endpoint=("127.0.0.1", gw.listen_port))  # fmt: skip
        await flood()
        await until(lambda: gw.under_load, "under load")
        assert any(isinstance(e, LoadChanged) and e.active for e in gw_events)
        # Unauthenticated-by-cookie initiations got cookie replies, not DH work.
        await until(lambda: gw.cookies_sent >= 60, "cookie replies to the flood")
        await asyncio.sleep(0.05)
        before = gw.cookies_sent
        cl.send_inner(ping_packet("10.77.0.2", "10.77.0.1"))
        await until(lambda: gw.cookies_sent == before + 1, "cookie reply to the real peer")
        await asyncio.sleep(0.05)
        assert not any(isinstance(e, HandshakeDone) for e in cl_events)
        # Still flooded when the client retransmits, now with a valid MAC2.
        peer = cl._peers[gw.public_key]
        assert peer.next_retransmit is not None
        clock.now = peer.next_retransmit
        await flood()
        cl.driver.fire_timer()
        await until(lambda: any(isinstance(e, HandshakeDone) for e in cl_events), "handshake")
        await until(lambda: gw.engine_stats()["icmp_echo_replies"] == 1, "echo reply")
        assert gw.under_load
    finally:
        gw.close()
        cl.close()
        flooder.close()
