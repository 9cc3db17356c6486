"""A peer that roams through a handshake (new source address or port, then an initiation)
is reported as an endpoint change, not only as a handshake: C learns the new endpoint from
the handshake before any transport packet, so it raises nothing itself."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

from tests.packets import ping_packet
from unclaw_tui.engine.noise import generate_private_key
from unclaw_tui.engine.tunnel import EndpointChanged, HandshakeDone, Tunnel, TunnelEvent


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(pred: Callable[[], bool], what: str, steps: int = 300) -> None:
    for _ in range(steps):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def client(key: bytes, clock: FakeClock) -> Tunnel:
    address = ipaddress.IPv4Interface("10.77.0.2/24")
    return Tunnel(key, 0, address, listen_host="127.0.0.1", clock=clock, engine_thread=False)


async def test_roam_through_a_handshake_is_an_endpoint_event() -> None:
    clock = FakeClock()
    events: list[TunnelEvent] = []
    gw = Tunnel(generate_private_key(), 0, ipaddress.IPv4Interface("10.77.0.1/24"),
                listen_host="127.0.0.1", on_event=events.append,
                clock=clock, engine_thread=False)  # fmt: skip
    key = generate_private_key()
    first, second = client(key, clock), client(key, clock)  # one peer, two source ports
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
        # The TAI64N timestamp is coarsened (about 17 ms): a later one needs real time too.
        await asyncio.sleep(0.05)
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
