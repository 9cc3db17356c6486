"""One peer must never degrade another (issue 13), in the C engine: the UDP queue to Python
and the event ring are shared fairly, and a peer's flows can be ended all at once.

Sans-IO through the whole engine with a fake clock, as test_wgstack_flows; the splice tests use
a real loopback listener as test_splice.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import pytest

from tests.unit.test_splice import listener, service, spliced  # noqa: F401 (a fixture)
from tests.unit.test_tcp import Peer, Seg
from tests.unit.test_wgstack import (
    KEY_GW_TO_PEER,
    KEY_PEER_TO_GW,
    PEER_ENDPOINT,
    PEER_ID,
    PEER_IP,
    T0,
    open_transport,
    transport,
)
from tests.unit.test_wgstack_flows import Client, establish, trim, udp4
from unclaw_tui.engine import _ffi
from unclaw_tui.engine._ffi import Engine
from unclaw_tui.engine.conns import TCP_EVENTS_PER_TURN
from unclaw_tui.engine.outcomes import CloseReason, Refusal, SpliceEnd, splice_error

UDP_QUEUE_MAX = 8192
EVENT_RING_SIZE = 4096
DST = ("203.0.113.8", 9)


class OtherPeer(Client):
    """Another WireGuard peer of the same engine, with its own keys, index and endpoint."""

    def __init__(self, engine: Engine, number: int, *, session: bool = True) -> None:
        super().__init__(engine)
        self.peer_id = PEER_ID + number
        self.ip = f"10.77.0.{2 + number}"
        self.endpoint = (f"192.0.2.{10 + number}", 51820)
        self.local_index = 0x33330000 + number
        self.remote_index = 0x44440000 + number
        self.send_key = bytes([number]) * 32  # the engine's receive key
        self.recv_key = bytes([number + 100]) * 32
        engine.peer_add(self.peer_id)
        engine.peer_add_allowed_ip(self.peer_id, f"{self.ip}/32")
        engine.peer_set_endpoint(self.peer_id, self.endpoint)
        if session:
            engine.install_keypair(
                self.peer_id, self.local_index, self.remote_index, self.recv_key,
                self.send_key, False, self.now,
            )  # fmt: skip
            engine.input(transport(self.local_index, 0, b"", self.send_key), self.endpoint, T0)
            assert [e.type for e in engine.events()] == [_ffi.EV_KEYPAIR_CONFIRMED]

    def send(self, *packets: object, flush: bool = True) -> None:
        for packet in packets:
            data = packet if isinstance(packet, bytes) else packet.build()  # type: ignore[attr-defined]
            message = transport(self.local_index, self.counter, data, self.send_key)
            self.engine.input(message, self.endpoint, self.now)
            self.counter += 1
        if flush:
            self.engine.tcp_flush(self.now)

    def receive(self) -> list[bytes]:
        """What the engine sent this peer (datagrams to other peers are dropped)."""
        return [
            trim(open_transport(datagram, self.recv_key)[2])
            for datagram, dst in self.engine.outputs()
            if dst == self.endpoint
        ]


@dataclass
class PeerAt(Peer):
    """test_tcp's scripted client, from another tunnel address than the test peer's."""

    src_ip: int = 0

    def seg(self, **kw: Any) -> Seg:
        kw.setdefault("src_ip", self.src_ip)
        return super().seg(**kw)

    def syn(self) -> Seg:
        syn = super().syn()
        syn.src_ip = self.src_ip
        return syn


def drops(engine: Engine) -> dict[str, int]:
    return {name: n for name, n in engine.drop_counts().items() if n}


# ---- The UDP queue to Python ------------------------------------------------------------------


def test_a_udp_flood_from_one_peer_leaves_the_others_their_share(
    engine: Engine, client: Client
) -> None:
    second, third = OtherPeer(engine, 1), OtherPeer(engine, 2)
    client.send(*[udp4((PEER_IP, 1), DST, b"flood")] * 9000, flush=False)
    second.send(*[udp4((second.ip, 2), DST, b"flood too")] * 9000, flush=False)
    third.send(udp4((third.ip, 3), DST, b"mine"), flush=False)
    got = engine.udp_datagrams()
    per_peer = {p: sum(1 for d in got if d.peer_id == p) for p in (0, 1, 2)}
    # the first alone: half; the second with one other queuing: a third; the third: its own
    assert per_peer == {0: UDP_QUEUE_MAX // 2, 1: UDP_QUEUE_MAX // 3, 2: 1}
    assert [d.data for d in got if d.peer_id == 2] == [b"mine"]
    refused = 2 * 9000 - per_peer[0] - per_peer[1]
    assert drops(engine) == {"udp_peer_share": refused}
    assert engine.peer_stats(0).udp_share_drops == 9000 - per_peer[0]
    assert engine.peer_stats(2).udp_share_drops == 0
    # a drain starts every share again
    client.send(udp4((PEER_IP, 1), DST, b"again"), flush=False)
    assert [d.data for d in engine.udp_datagrams()] == [b"again"]


# ---- The event ring ---------------------------------------------------------------------------


def test_a_handshake_flood_leaves_room_for_authenticated_events(engine: Engine) -> None:
    initiation = bytes([1, 0, 0, 0]) + bytes(144)
    for i in range(5000):
        engine.input(initiation, ("198.51.100.7", 1024 + i), T0 + 1)
    # the peer's new session, confirmed by its first packet: an authenticated event
    keys = (KEY_GW_TO_PEER, KEY_PEER_TO_GW)
    engine.install_keypair(PEER_ID, 0x55555555, 0x66666666, *keys, False, T0 + 1)
    engine.input(transport(0x55555555, 0, b""), PEER_ENDPOINT, T0 + 1)
    events = engine.events()
    handshakes = [e for e in events if e.type == _ffi.EV_HANDSHAKE_PACKET]
    assert len(handshakes) == EVENT_RING_SIZE // 2
    assert [(e.type, e.arg) for e in events if e.peer_id == PEER_ID] == [
        (_ffi.EV_KEYPAIR_CONFIRMED, 0x55555555)
    ]
    assert drops(engine) == {"handshake_flood": 5000 - EVENT_RING_SIZE // 2}


def test_a_need_handshake_the_full_ring_refused_is_raised_once_there_is_room(
    engine: Engine,
) -> None:
    other = OtherPeer(engine, 1, session=False)
    now = T0 + 1
    # fill the ring with authenticated events: each new responder keypair frees the last one
    keys = (KEY_GW_TO_PEER, KEY_PEER_TO_GW)
    for i in range(EVENT_RING_SIZE + 3):
        engine.install_keypair(PEER_ID, 0x70000000 + i, 1, *keys, False, now)
    engine.udp_send(("203.0.113.8", 53), (other.ip, 5353), b"answer", now)  # staged: no keys
    assert drops(engine)["event_overflow"] == 2 + 1  # two KEYPAIR_FREED, the NEED_HANDSHAKE
    events = engine.events()
    assert [(e.peer_id, e.arg) for e in events if e.type == _ffi.EV_NEED_HANDSHAKE] == [
        (other.peer_id, _ffi.NEED_NO_KEY)
    ]
    assert engine.events() == []  # raised once, and the usual rate limit holds after it
    engine.udp_send(("203.0.113.8", 53), (other.ip, 5353), b"answer", now + 1)
    assert engine.events() == []


def test_a_peer_hopping_source_ports_takes_one_event(engine: Engine, client: Client) -> None:
    for port in range(1000, 1100):
        engine.input(transport(0x11111111, client.counter, b""), ("192.0.2.10", port), client.now)
        client.counter += 1
    events = engine.events()
    assert [(e.type, e.src) for e in events] == [(_ffi.EV_ENDPOINT_CHANGED, ("192.0.2.10", 1099))]
    assert engine.peer_stats(PEER_ID).endpoint == ("192.0.2.10", 1099)
    engine.input(transport(0x11111111, client.counter, b""), PEER_ENDPOINT, client.now)
    assert [(e.type, e.src) for e in engine.events()] == [(_ffi.EV_ENDPOINT_CHANGED, PEER_ENDPOINT)]


# ---- Ending a peer's flows at once ------------------------------------------------------------


def closed(engine: Engine) -> set[tuple[int, int]]:
    return {(conn, arg) for ev, conn, arg in engine.tcp_events() if ev == _ffi.TCP_EV_CLOSED}


def test_abort_flows_of_a_peer_gone_ends_them_silently_and_spares_the_others(
    engine: Engine, client: Client
) -> None:
    other = OtherPeer(engine, 1)
    _, conn = establish(client)
    _, conn2 = establish(client, Peer(sport=40001))
    _, other_conn = establish(other, PeerAt(src_ip=int(ipaddress.IPv4Address(other.ip))))
    engine.tcp_events()
    assert engine.peer_abort_flows(PEER_ID, CloseReason.PEER_GONE, client.now) == 2
    assert closed(engine) == {(conn, CloseReason.PEER_GONE), (conn2, CloseReason.PEER_GONE)}
    assert engine.outputs() == []  # nothing is sent to a peer that went away
    assert engine.tcp_info(conn).close_reason == CloseReason.PEER_GONE
    assert engine.tcp_info(other_conn).state == _ffi.TCP_ST_ESTABLISHED
    # under pressure only what a zero window holds open is reset (RFC 6429; test_tcp.py)
    assert engine.peer_abort_flows(other.peer_id, CloseReason.PRESSURE, other.now) == 0
    assert engine.tcp_info(other_conn).state == _ffi.TCP_ST_ESTABLISHED
    with pytest.raises(_ffi.EngineError):
        engine.peer_abort_flows(PEER_ID, CloseReason.ABORTED, client.now)


def test_abort_flows_tears_down_the_peers_splices(
    engine: Engine,
    client: Client,
    listener: socket.socket,  # noqa: F811
) -> None:
    _peer, _conn, server = spliced(client, listener)
    assert engine.peer_abort_flows(PEER_ID, CloseReason.PEER_GONE, client.now) == 1
    [result] = engine.splice_results(client.now)
    assert (result.outcome, result.tcp_close) == (_ffi.SPLICE_FAIL_PEER, CloseReason.PEER_GONE)
    end = SpliceEnd(result.outcome, result.error, result.tcp_close)
    assert splice_error(end, 5.0) == "peer: peer silent"
    with pytest.raises(ConnectionResetError):
        server.recv(10)
    assert engine.splice_active() == 0


def test_a_splice_whose_peer_stopped_acking_ends_within_a_bound(
    engine: Engine,
    client: Client,
    listener: socket.socket,  # noqa: F811
) -> None:
    # RFC 1122 4.2.3.5 (R2): retransmissions without any answer end the connection, and the
    # splice takes its socket down with it.
    _peer, _conn, server = spliced(client, listener)
    server.sendall(b"d" * 1000)
    service(client)
    assert client.receive()  # sent to the peer, which never answers again
    start = now = client.now
    results: list[_ffi.SpliceResult] = []
    while not results and now - start < 600:
        deadline = engine.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        engine.tick(now)
        engine.outputs()
        results = engine.splice_results(now)
    [result] = results
    assert (result.outcome, result.tcp_close) == (_ffi.SPLICE_FAIL_PEER, CloseReason.TIMEOUT)
    assert now - start <= 11 * 60  # DATA_RETRIES (10) backed-off resends, each <= RTO_MAX
    with pytest.raises(ConnectionResetError):
        server.recv(10)


def test_close_reason_table_names_the_new_reasons() -> None:
    # The engine's words for them are the gateway's refusals' (one table).
    assert CloseReason.PEER_GONE.peer_error == Refusal.PEER_SILENT.value == "peer silent"
    assert CloseReason.PRESSURE.peer_error == Refusal.PRESSURE.value == "resource pressure"


def test_tcp_events_are_taken_a_turn_at_a_time_and_the_rest_stay_pending(
    engine: Engine, client: Client
) -> None:
    # The dispatch takes at most TCP_EVENTS_PER_TURN a turn (a burst of one peer's SYNs must
    # not hold every peer's handshakes behind it); what it leaves is not lost.
    for sport in range(41000, 41005):
        client.send(Peer(sport=sport).syn())
    first = engine.tcp_events(limit=2)
    rest = engine.tcp_events(limit=10)
    assert len(first) == 2 and len(rest) == 3 and engine.tcp_events() == []
    assert {ev for ev, _conn, _arg in first + rest} == {_ffi.TCP_EV_SYN}
    assert len({conn for _ev, conn, _arg in first + rest}) == 5
    assert TCP_EVENTS_PER_TURN >= 16
