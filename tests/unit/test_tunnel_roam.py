"""A peer that roams through a handshake (new source address or port, then an initiation)
is reported as an endpoint change, not only as a handshake: C learns the new endpoint from
the handshake before any transport packet, so it raises nothing itself."""

from __future__ import annotations

from tests.helpers import FakeClock, loopback_tunnel, until
from tests.packets import ping_packet
from unclaw_tui.engine.noise import generate_private_key
from unclaw_tui.engine.tunnel import EndpointChanged, HandshakeDone, Tunnel, TunnelEvent


def client(key: bytes, clock: FakeClock, wall: FakeClock) -> Tunnel:
    return loopback_tunnel("10.77.0.2/24", key, clock=clock, wall_clock=wall)


async def test_roam_through_a_handshake_is_an_endpoint_event() -> None:
    clock = FakeClock()
    events: list[TunnelEvent] = []
    wall = FakeClock(1_767_268_800.0)  # the TAI64N timestamps in the initiations
    gw = loopback_tunnel("10.77.0.1/24", on_event=events.append, clock=clock)
    key = generate_private_key()
    first, second = client(key, clock, wall), client(key, clock, wall)  # two source ports
    await gw.start()
    try:
        for cl in (first, second):
            await cl.start()
            cl.add_peer(gw.public_key, allowed_ips=["10.77.0.1/32"],
                        endpoint=("127.0.0.1", gw.listen_port))  # fmt: skip
        gw.add_peer(first.public_key, allowed_ips=["10.77.0.2/32"])
        first.send_inner(ping_packet("10.77.0.2", "10.77.0.1"))
        await until(lambda: gw.engine_stats()["icmp_echo_replies"] == 1, "first echo reply")
        assert [type(e) for e in events] == [HandshakeDone]  # a first endpoint is no roam

        clock.now += 1.0  # initiations of one peer closer than 20 ms apart are a flood
        # The TAI64N timestamp is coarsened (about 17 ms): a replay unless it is later.
        wall.advance(1.0)
        second.send_inner(ping_packet("10.77.0.2", "10.77.0.1"))
        await until(lambda: gw.engine_stats()["icmp_echo_replies"] == 2, "echo after the roam")
        roams = [e for e in events if isinstance(e, EndpointChanged)]
        assert len(roams) == 1, events
        assert roams[0].public_key == first.public_key
        assert roams[0].endpoint == ("127.0.0.1", second.listen_port)
        assert gw.peer_info(first.public_key).endpoint == ("127.0.0.1", second.listen_port)
    finally:
        gw.close()
        first.close()
        second.close()
