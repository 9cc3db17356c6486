"""TCP, UDP, ICMP errors and malformed IPv6 through the whole engine, sans-IO with a fake clock.

The peer side encrypts hand-built inner packets with the key the engine receives with (helpers of
test_wgstack) and decrypts what the engine sends; TCP segments are built and parsed (checksums
verified) by the helpers of test_tcp.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import wait_for
from tests.packets import inet_checksum, ipv4
from tests.unit.test_tcp import ACK, FIN, MSS, PSH, RST, SYN, Peer, Seg, parse
from tests.unit.test_wgstack import (
    GATEWAY_IP,
    KEY_GW_TO_PEER,
    KEY_PEER_TO_GW,
    LOCAL_INDEX,
    PEER_ENDPOINT,
    PEER_ID,
    PEER_IP,
    REMOTE_INDEX,
    T0,
    open_transport,
    transport,
)
from unclaw_tui.engine import _ffi
from unclaw_tui.engine._ffi import Engine, EngineError, TcpInfo, UdpMeta
from unclaw_tui.engine.flows import UdpDatagram

DST = ("93.184.216.34", 80)  # test_tcp's DST_IP and default port
PEER_IP6 = "fd00::2"
GW_WSCALE = 3  # 256 KiB receive buffer >> 3 fits 16 bits


# ---- The peer side ------------------------------------------------------------------------


def trim(plaintext: bytes) -> bytes:
    """An inner packet without WireGuard's zero padding."""
    if plaintext[0] >> 4 == 6:
        return plaintext[: 40 + struct.unpack_from("!H", plaintext, 4)[0]]
    return plaintext[: struct.unpack_from("!H", plaintext, 2)[0]]


class Client:
    """The WireGuard peer: inner packets in through the engine, what it sends back decrypted."""

    def __init__(self, engine: Engine, now: float = T0 + 1) -> None:
        self.engine = engine
        self.now = now
        self.counter = 1  # 0 confirmed the session

    def send(self, *packets: bytes | Seg, flush: bool = True) -> None:
        for packet in packets:
            data = packet.build() if isinstance(packet, Seg) else packet
            self.engine.input(transport(LOCAL_INDEX, self.counter, data), PEER_ENDPOINT, self.now)
            self.counter += 1
        if flush:
            self.engine.tcp_flush(self.now)  # what io_recv does at the end of a batch

    def receive(self) -> list[bytes]:
        packets = []
        for datagram, dst in self.engine.outputs():
            assert dst == PEER_ENDPOINT
            receiver, _, plaintext = open_transport(datagram)
            assert receiver == REMOTE_INDEX
            packets.append(trim(plaintext))
        return packets

    def segments(self) -> list[Seg]:
        return [parse(packet) for packet in self.receive()]


def new_engine(**tcp: int) -> Engine:
    engine = Engine(GATEWAY_IP, 24, **tcp)
    add_test_peer(engine, T0)
    return engine


def add_test_peer(engine: Engine, now: float) -> None:
    """The test peer with its addresses, endpoint and a confirmed session."""
    engine.peer_add(PEER_ID)
    engine.peer_add_allowed_ip(PEER_ID, f"{PEER_IP}/32")
    engine.peer_add_allowed_ip(PEER_ID, f"{PEER_IP6}/128")
    engine.peer_set_endpoint(PEER_ID, PEER_ENDPOINT)
    engine.install_keypair(
        PEER_ID, LOCAL_INDEX, REMOTE_INDEX, KEY_GW_TO_PEER, KEY_PEER_TO_GW, False, now
    )
    engine.input(transport(LOCAL_INDEX, 0, b""), PEER_ENDPOINT, now)
    assert [e.type for e in engine.events()] == [_ffi.EV_KEYPAIR_CONFIRMED]


def drops(engine: Engine) -> dict[str, int]:
    return {name: n for name, n in engine.drop_counts().items() if n}


def window_batch(peer: Peer, data: bytes, sent: int, acked: int, window: int) -> list[Seg]:
    """The peer's next segments of `data` from offset `sent`: what the gateway's window allows
    with `acked` acknowledged, at most 64 segments a batch."""
    batch: list[Seg] = []
    while sent < len(data) and sent - acked + MSS <= min(window, 64 * MSS):
        batch.append(peer.data(data[sent : sent + MSS]))
        sent += len(batch[-1].payload)
    return batch


def syn_event(client: Client, peer: Peer) -> int:
    client.send(peer.syn())
    [(ev_type, conn, arg)] = client.engine.tcp_events()
    assert (ev_type, arg) == (_ffi.TCP_EV_SYN, 0)
    return conn


def establish(client: Client, peer: Peer | None = None) -> tuple[Peer, int]:
    """SYN -> accept -> SYN-ACK out -> ACK in: an established connection."""
    peer = peer or Peer()
    conn = syn_event(client, peer)
    client.engine.tcp_accept(conn, client.now)
    [synack] = client.segments()
    peer.rcv_nxt = (synack.seq + 1) & 0xFFFFFFFF
    client.send(peer.seg())
    assert client.engine.tcp_info(conn).state == _ffi.TCP_ST_ESTABLISHED
    return peer, conn


# ---- TCP ----------------------------------------------------------------------------------


def test_syn_is_announced_with_its_endpoints(engine: Engine, client: Client) -> None:
    conn = syn_event(client, Peer(sport=40123, dport=8080))
    assert engine.tcp_info(conn) == TcpInfo(
        conn_id=conn,
        peer_id=PEER_ID,
        src=(PEER_IP, 40123),
        dst=(DST[0], 8080),
        state=_ffi.TCP_ST_SYN_PENDING,
        bytes_in=0,
        bytes_out=0,
        close_reason=0,
    )
    assert client.receive() == []  # nothing answers before the owner decides
    assert engine.tcp_peer_counts(PEER_ID) == (1, 1)
    assert drops(engine) == {}


def test_accept_handshake_and_data_both_ways(engine: Engine, client: Client) -> None:
    peer = Peer()
    conn = syn_event(client, peer)
    engine.tcp_accept(conn, client.now)
    [synack] = client.segments()
    assert synack.flags == SYN | ACK and synack.ack == peer.iss + 1
    assert (synack.src_ip, synack.sport, synack.dport) == (0x5DB8D822, 80, 40000)
    assert synack.mss == MSS and synack.wscale == GW_WSCALE
    peer.rcv_nxt = synack.seq + 1
    client.send(peer.seg())
    assert engine.tcp_events() == []

    client.send(peer.data(b"GET / HTTP/1.1\r\n\r\n"))
    assert engine.tcp_events() == [(_ffi.TCP_EV_READABLE, conn, 0)]
    [ack] = client.segments()  # the batch's ACK, from tcp_flush
    assert ack.ack == peer.snd_nxt and ack.payload == b""
    assert engine.tcp_read(conn, 4096, client.now) == b"GET / HTTP/1.1\r\n\r\n"
    assert engine.tcp_read(conn, 4096, client.now) is None

    assert engine.tcp_write(conn, memoryview(b"HTTP/1.1 200 OK\r\n\r\nhello"), client.now) == 24
    [reply] = client.segments()
    assert reply.payload == b"HTTP/1.1 200 OK\r\n\r\nhello" and reply.seq == peer.rcv_nxt
    peer.rcv_nxt += len(reply.payload)
    client.send(peer.seg())
    info = engine.tcp_info(conn)
    assert (info.bytes_in, info.bytes_out) == (18, 24)
    assert drops(engine) == {}


def test_half_close_both_ways(engine: Engine, client: Client) -> None:
    peer, conn = establish(client)
    client.send(peer.data(b"last words", flags=ACK | PSH | FIN))
    assert engine.tcp_events() == [
        (_ffi.TCP_EV_READABLE, conn, 0),
        (_ffi.TCP_EV_PEER_FIN, conn, 0),
    ]
    [ack] = client.segments()
    assert ack.ack == peer.snd_nxt  # data and FIN acknowledged
    assert engine.tcp_read(conn, 100, client.now) == b"last words"
    assert engine.tcp_read(conn, 100, client.now) == b""  # EOF
    assert engine.tcp_info(conn).state == _ffi.TCP_ST_CLOSE_WAIT

    engine.tcp_write(conn, b"still talking", client.now)  # our direction is still open
    engine.tcp_shutdown_write(conn, client.now)
    segs = client.segments()
    assert b"".join(s.payload for s in segs) == b"still talking"
    assert segs[-1].flags & FIN
    peer.rcv_nxt += len(b"still talking") + 1
    client.send(peer.seg())
    assert engine.tcp_events() == [(_ffi.TCP_EV_CLOSED, conn, _ffi.TCP_CLOSE_NORMAL)]
    assert _ffi.TCP_CLOSE_NAMES[_ffi.TCP_CLOSE_NORMAL] == "normal"
    engine.tcp_release(conn, client.now)
    with pytest.raises(EngineError):
        engine.tcp_info(conn)
    assert engine.tcp_stats()["conns"] == 0


def test_tcp_drops_are_counted_with_a_prefix(engine: Engine, client: Client) -> None:
    client.send(Seg(seq=5, ack=9, flags=ACK).build(corrupt=True))
    client.send(Seg(seq=5, ack=9, flags=ACK))  # no such connection: answered with an RST
    [rst] = client.segments()
    assert rst.flags == RST and rst.seq == 9
    assert drops(engine) == {"tcp_bad_checksum": 1, "tcp_no_connection": 1}
    assert set(_ffi.DROP_REASONS) < set(engine.drop_counts())


def test_reject_answers_the_syn_with_rst(engine: Engine, client: Client) -> None:
    peer = Peer(dport=25)
    conn = syn_event(client, peer)
    engine.tcp_reject(conn, client.now)
    [rst] = client.segments()
    assert rst.flags == RST | ACK and rst.ack == peer.iss + 1 and rst.sport == 25
    assert engine.tcp_events() == [(_ffi.TCP_EV_CLOSED, conn, _ffi.TCP_CLOSE_REJECTED)]
    assert engine.tcp_info(conn).close_reason == _ffi.TCP_CLOSE_REJECTED
    engine.tcp_release(conn, client.now)


def test_reset_by_the_peer_raises_connection_reset(engine: Engine, client: Client) -> None:
    peer, conn = establish(client)
    client.send(peer.seg(flags=RST))
    assert engine.tcp_events() == [(_ffi.TCP_EV_CLOSED, conn, _ffi.TCP_CLOSE_RESET)]
    with pytest.raises(ConnectionResetError):
        engine.tcp_read(conn, 100, client.now)
    with pytest.raises(ConnectionResetError):
        engine.tcp_write(conn, b"x", client.now)
    engine.tcp_release(conn, client.now)


def test_events_of_a_released_handle_are_discarded(engine: Engine, client: Client) -> None:
    peer, conn = establish(client)
    other_peer, other = establish(client, Peer(sport=40001))
    client.send(peer.data(b"never read"), other_peer.data(b"read me"))
    engine.tcp_release(conn, client.now)  # before its READABLE was seen: unread data, RST
    assert engine.tcp_events() == [(_ffi.TCP_EV_READABLE, other, 0)]
    to_released = [s for s in client.segments() if s.dport == 40000]
    assert to_released[-1].flags & RST  # after the batch's ACK


def test_megabytes_both_ways_arrive_intact(engine: Engine, client: Client) -> None:
    rng = random.Random(7)
    up = rng.randbytes(3 << 20)  # peer -> gateway
    down = rng.randbytes(3 << 20)  # gateway -> peer
    peer, conn = establish(client)
    up_sent = up_acked = written = 0
    got_up, got_down = bytearray(), bytearray()
    gw_window = 65535
    for _ in range(2000):
        if len(got_up) == len(up) and len(got_down) == len(down):
            break
        batch = window_batch(peer, up, up_sent, up_acked, gw_window)
        up_sent += sum(len(seg.payload) for seg in batch)
        client.send(*batch)
        # the gateway's owner reads everything and writes what the send buffer takes
        assert {t for t, _, _ in engine.tcp_events()} <= {
            _ffi.TCP_EV_READABLE,
            _ffi.TCP_EV_WRITABLE,
        }
        while chunk := engine.tcp_read(conn, 1 << 20, client.now):
            got_up += chunk
        if written < len(down):
            written += engine.tcp_write(conn, memoryview(down)[written:], client.now)
        # the peer takes in order what arrived and acknowledges it once
        for seg in client.segments():
            up_acked = max(up_acked, (seg.ack - peer.iss - 1) & 0xFFFFFFFF)
            gw_window = seg.wnd << GW_WSCALE
            if seg.payload:
                assert seg.seq == peer.rcv_nxt  # no loss on this path: nothing out of order
                got_down += seg.payload
                peer.rcv_nxt = (peer.rcv_nxt + len(seg.payload)) & 0xFFFFFFFF
        client.send(peer.seg())
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    info = engine.tcp_info(conn)
    assert (info.bytes_in, info.bytes_out) == (len(up), len(down))
    assert engine.tcp_stats()["retransmits"] == 0
    assert drops(engine) == {}


def test_no_event_is_lost_with_thousands_of_connections() -> None:
    count = 5000  # more than a batch of the wrapper and than the engine's other event ring
    engine = new_engine(
        tcp_rcvbuf=4096,
        tcp_sndbuf=4096,
        tcp_max_conns_per_peer=count,
        tcp_max_half_open_per_peer=count,
    )
    client = Client(engine)
    peers = [Peer(sport=10000 + i) for i in range(count)]
    client.send(*(p.syn() for p in peers))
    events = engine.tcp_events()
    assert len(events) == count and {t for t, _, _ in events} == {_ffi.TCP_EV_SYN}
    conns = {engine.tcp_info(c).src[1]: c for _, c, _ in events}
    assert len(conns) == count

    for i, peer in enumerate(peers):
        engine.tcp_accept(conns[peer.sport], client.now)
        if i % 500 == 499 or i == count - 1:  # drain before the output ring fills
            for synack in client.segments():
                peers[synack.dport - 10000].rcv_nxt = synack.seq + 1
    # each connection's handshake-completing ACK carries data: one READABLE each, one batch
    for i in range(0, count, 500):
        client.send(*(p.data(b"req %d" % p.sport) for p in peers[i : i + 500]), flush=False)
    events = engine.tcp_events()
    assert sorted(events) == sorted((_ffi.TCP_EV_READABLE, c, 0) for c in conns.values())
    for sport, conn in conns.items():
        assert engine.tcp_read(conn, 100, client.now) == b"req %d" % sport
    assert engine.tcp_stats()["established"] == count
    assert drops(engine) == {}
    engine.close()


def test_peer_removal_closes_its_connections(engine: Engine, client: Client) -> None:
    peer, conn = establish(client)
    client.send(peer.data(b"unread"))
    engine.tcp_events()
    client.receive()
    engine.peer_remove(PEER_ID)
    assert engine.tcp_events() == [(_ffi.TCP_EV_CLOSED, conn, _ffi.TCP_CLOSE_PEER_REMOVED)]
    assert client.receive() == []  # nothing is sent to a removed peer
    assert engine.tcp_info(conn).close_reason == _ffi.TCP_CLOSE_PEER_REMOVED
    with pytest.raises(ConnectionResetError):
        engine.tcp_read(conn, 100, client.now)
    engine.tcp_release(conn, client.now)  # the handle still needs releasing
    assert engine.tcp_stats()["conns"] == 0
    assert engine.tcp_peer_counts(PEER_ID) == (0, 0)


def test_tick_drives_tcp_retransmission(engine: Engine, client: Client) -> None:
    _, conn = establish(client)
    idle_deadline = engine.next_deadline()  # the peer's WireGuard timers only: TCP is idle
    assert idle_deadline is not None and idle_deadline >= client.now + 10
    engine.tcp_write(conn, b"are you there?", client.now)
    [first] = client.segments()
    deadline = engine.next_deadline()
    assert deadline is not None and client.now < deadline < client.now + 2
    engine.tick(deadline - 0.01)
    assert client.segments() == []
    engine.tick(deadline)
    [again] = client.segments()
    assert (again.seq, again.payload) == (first.seq, b"are you there?")
    assert engine.tcp_stats()["retransmits"] == 1
    assert engine.next_deadline() > deadline  # backed off


def test_delayed_ack_without_flush_comes_from_tick(engine: Engine, client: Client) -> None:
    peer, _ = establish(client)
    client.send(peer.data(b"small"), flush=False)
    assert client.segments() == []
    deadline = engine.next_deadline()
    assert deadline is not None and deadline <= client.now + 0.005 + 1e-9
    engine.tick(deadline)
    [ack] = client.segments()
    assert ack.ack == peer.snd_nxt


def test_tcp_output_is_staged_while_keys_are_expired(engine: Engine, client: Client) -> None:
    peer, conn = establish(client)
    late = T0 + 181  # past REJECT_AFTER_TIME: no key to send with
    engine.tcp_write(conn, b"after rekey", late)
    assert client.receive() == []
    assert engine.peer_stats(PEER_ID).staged == 1
    needs = [e.arg for e in engine.events() if e.type == _ffi.EV_NEED_HANDSHAKE]
    assert needs == [_ffi.NEED_NO_KEY]
    new_send, new_recv = bytes(range(64, 96)), bytes(range(96, 128))
    engine.install_keypair(PEER_ID, 0x3333, 0x4444, new_send, new_recv, True, late + 0.1)
    [(datagram, _)] = engine.outputs()
    receiver, counter, plaintext = open_transport(datagram, key=new_send)
    assert (receiver, counter) == (0x4444, 0)
    seg = parse(trim(plaintext))
    assert seg.payload == b"after rekey" and seg.dport == peer.sport


# ---- UDP ----------------------------------------------------------------------------------


def udp4(
    src: tuple[str, int], dst: tuple[str, int], payload: bytes, checksum: bool = True
) -> bytes:
    header = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0)
    if checksum:
        pseudo = (
            ipaddress.IPv4Address(src[0]).packed
            + ipaddress.IPv4Address(dst[0]).packed
            + struct.pack("!BBH", 0, 17, 8 + len(payload))
        )
        csum = inet_checksum(pseudo + header + payload) or 0xFFFF
        header = header[:6] + struct.pack("!H", csum)
    return ipv4(src[0], dst[0], 17, header + payload)


def test_udp_datagrams_are_queued_with_exact_endpoints(engine: Engine, client: Client) -> None:
    client.send(
        udp4((PEER_IP, 5353), ("203.0.113.8", 53), b"query one"),
        udp4((PEER_IP, 5354), ("198.51.100.1", 443), b"", checksum=False),
        udp4((PEER_IP, 40000), (GATEWAY_IP, 53), bytes(range(256)) * 5),
    )
    assert engine.udp_datagrams() == [
        UdpMeta(PEER_ID, (PEER_IP, 5353), ("203.0.113.8", 53), b"query one"),
        UdpMeta(PEER_ID, (PEER_IP, 5354), ("198.51.100.1", 443), b""),
        UdpMeta(PEER_ID, (PEER_IP, 40000), (GATEWAY_IP, 53), bytes(range(256)) * 5),
    ]
    assert engine.udp_datagrams() == []  # drained
    assert engine.stats()["udp_rx"] == 3
    assert drops(engine) == {}


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: p[:-1] + bytes([p[-1] ^ 1]),  # the payload no longer matches the checksum
        lambda p: p[:24] + struct.pack("!H", 200) + p[26:],  # UDP length > IP payload
        lambda p: p[:24] + struct.pack("!H", 7) + p[26:],  # UDP length < its header
        lambda p: p[:22] + b"\0\0" + p[24:],  # destination port 0
    ],
    ids=["checksum", "long", "short", "port-0"],
)
def test_bad_udp_is_dropped(
    engine: Engine, client: Client, mangle: Callable[[bytes], bytes]
) -> None:
    client.send(mangle(udp4((PEER_IP, 5353), ("203.0.113.8", 53), b"query")))
    assert engine.udp_datagrams() == []
    assert drops(engine) == {"bad_ip": 1}


def test_udp_to_multicast_or_broadcast_is_not_queued(engine: Engine, client: Client) -> None:
    for dst in ("224.0.0.251", "255.255.255.255", "10.77.0.255"):
        client.send(udp4((PEER_IP, 5353), (dst, 5353), b"mdns"))
    assert engine.udp_datagrams() == []
    assert drops(engine) == {"unhandled": 3}


def test_udp_queue_is_bounded_by_its_arena(engine: Engine, client: Client) -> None:
    # A peer alone may fill half the arena: the other half is kept for the next peer to come.
    payload = bytes(1392)  # mtu 1420 - 28
    share_fits = 4194304 // 2 // len(payload)
    client.send(*[udp4((PEER_IP, 1), ("203.0.113.8", 9), payload)] * (share_fits + 5), flush=False)
    assert drops(engine) == {"udp_peer_share": 5}
    assert engine.peer_stats(0).udp_share_drops == 5
    assert len(engine.udp_datagrams()) == share_fits
    client.send(udp4((PEER_IP, 1), ("203.0.113.8", 9), b"room again"))
    assert [d.data for d in engine.udp_datagrams()] == [b"room again"]


def test_udp_send_reaches_the_peer_with_valid_checksums(engine: Engine, client: Client) -> None:
    engine.udp_send(("203.0.113.8", 53), (PEER_IP, 5353), b"answer", client.now)
    [packet] = client.receive()
    assert inet_checksum(packet[:20]) == 0
    assert packet[9] == 17
    assert packet[12:16] == ipaddress.IPv4Address("203.0.113.8").packed
    assert packet[16:20] == ipaddress.IPv4Address(PEER_IP).packed
    udp = packet[20:]
    assert struct.unpack("!HHH", udp[:6]) == (53, 5353, 14)
    assert udp[6:8] != b"\0\0"
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    assert inet_checksum(pseudo + udp) == 0
    assert udp[8:] == b"answer"
    assert engine.stats()["udp_tx"] == 1


def test_a_reply_too_large_for_the_tunnel_is_dropped_and_counted_not_raised(
    engine: Engine, client: Client
) -> None:
    # A host may answer a peer's datagram with anything up to 64 KiB; a handler's reply()
    # must not raise from the datagram callback for it (a traceback per datagram).
    class Conns:
        def call(self, fn: Any) -> Any:
            return fn(engine, client.now)

    meta = _ffi.UdpMeta(PEER_ID, (PEER_IP, 5353), ("203.0.113.8", 53), b"query")
    dgram = UdpDatagram(Conns(), meta, b"k" * 32)  # type: ignore[arg-type]
    dgram.reply(bytes(2000))
    assert drops(engine) == {"udp_too_large": 1} and client.receive() == []
    dgram.reply(b"answer")
    assert len(client.receive()) == 1


def test_udp_send_limits(engine: Engine, client: Client) -> None:
    engine.udp_send(("203.0.113.8", 53), (PEER_IP, 1), bytes(1392), client.now)  # exactly the MTU
    assert len(client.receive()[0]) == 1420
    with pytest.raises(EngineError) as err:
        engine.udp_send(("203.0.113.8", 53), (PEER_IP, 1), bytes(1393), client.now)
    assert err.value.code == _ffi.EMSGSIZE
    assert drops(engine) == {"udp_too_large": 1}  # counted where it is dropped
    engine.udp_send(("203.0.113.8", 53), ("10.77.0.99", 1), b"nobody", client.now)
    assert drops(engine) == {"udp_too_large": 1, "no_route": 1}
    with pytest.raises(EngineError):
        engine.udp_send(("2001:db8::1", 53), (PEER_IP, 1), b"v6", client.now)


@pytest.mark.parametrize(("proto", "code"), [(17, 3), (17, 13), (6, 1)])
def test_icmp_unreachable_quotes_the_flow(
    engine: Engine, client: Client, proto: int, code: int
) -> None:
    engine.icmp_unreachable((PEER_IP, 40000), ("169.254.169.254", 80), proto, code, client.now)
    [packet] = client.receive()
    assert inet_checksum(packet[:20]) == 0 and packet[9] == 1
    assert packet[12:16] == ipaddress.IPv4Address("169.254.169.254").packed
    assert packet[16:20] == ipaddress.IPv4Address(PEER_IP).packed
    icmp = packet[20:]
    assert (icmp[0], icmp[1]) == (3, code) and inet_checksum(icmp) == 0
    quoted = icmp[8:]
    assert len(quoted) == 28 and inet_checksum(quoted[:20]) == 0
    assert quoted[9] == proto
    assert quoted[12:16] == ipaddress.IPv4Address(PEER_IP).packed
    assert quoted[16:20] == ipaddress.IPv4Address("169.254.169.254").packed
    assert struct.unpack("!HH", quoted[20:24]) == (40000, 80)
    assert engine.stats()["icmp_unreachables"] == 1


def test_icmp_to_another_destination_is_unhandled(engine: Engine, client: Client) -> None:
    client.send(ipv4(PEER_IP, "203.0.113.8", 1, bytes([8, 0, 0xF7, 0xFF, 0, 0, 0, 0])))
    assert drops(engine) == {"unhandled": 1}


# ---- IPv6 packet builders (the IPv6 tests are in test_wgstack_ipv6) --------------------------


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


def pseudo6(src: bytes, dst: bytes, next_header: int, length: int) -> bytes:
    return src + dst + struct.pack("!IxxxB", length, next_header)


def l4_over_ipv6(src: str, dst: str, next_header: int, l4: bytes, csum_at: int) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    csum = inet_checksum(pseudo6(s, d, next_header, len(l4)) + l4)
    return ipv6(src, dst, next_header, l4[:csum_at] + struct.pack("!H", csum) + l4[csum_at + 2 :])


def tcp6_syn(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, SYN, 65535, 0, 0)
    return l4_over_ipv6(src, dst, 6, tcp, 16)


def udp6(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return l4_over_ipv6(src, dst, 17, udp, 6)


def check_ipv6_checksum(packet: bytes) -> None:
    l4 = packet[40:]
    assert inet_checksum(pseudo6(packet[8:24], packet[24:40], packet[6], len(l4)) + l4) == 0


def test_ipv6_from_outside_allowed_ips_is_spoofed(engine: Engine, client: Client) -> None:
    client.send(tcp6_syn("fd00::3", "2001:db8::1", 50000, 443, 1))
    client.send(udp6("fd00::3", "2001:db8::1", 1, 2, b"x"))
    assert client.receive() == []
    assert drops(engine) == {"spoofed_src": 2}


def test_bad_ipv6_checksums_get_no_answer(engine: Engine, client: Client) -> None:
    syn = bytearray(tcp6_syn(PEER_IP6, "2001:db8::1", 50000, 443, 1))
    syn[-1] ^= 1
    udp = bytearray(udp6(PEER_IP6, "2001:db8::1", 1, 2, b"x"))
    udp[-1] ^= 1
    client.send(bytes(syn), bytes(udp))
    assert client.receive() == []
    assert drops(engine) == {"bad_ip": 1, "tcp_bad_checksum": 1}  # TCP checks its own


# ---- Robustness ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    proto=st.sampled_from([6, 17]),
    flags=st.integers(0, 255),
    header=st.binary(min_size=20, max_size=60),
    payload=st.binary(max_size=120),
    valid_checksum=st.booleans(),
)
def test_random_tcp_and_udp_never_crash(
    proto: int, flags: int, header: bytes, payload: bytes, valid_checksum: bool
) -> None:
    engine = new_engine(tcp_max_conns=64)
    try:
        client = Client(engine)
        if proto == 6:
            seg = Seg(
                seq=int.from_bytes(header[4:8], "big"),
                ack=int.from_bytes(header[8:12], "big"),
                flags=flags,
                wnd=int.from_bytes(header[12:14], "big"),
                payload=payload,
                raw_options=header[20:],
                sport=int.from_bytes(header[:2], "big"),
                dport=int.from_bytes(header[2:4], "big"),
            )
            inner = seg.build(corrupt=not valid_checksum)
        else:
            inner = udp4((PEER_IP, 1), ("203.0.113.8", 53), header + payload, valid_checksum)
        client.send(inner, inner)
        for ev_type, conn, _ in engine.tcp_events():
            assert ev_type == _ffi.TCP_EV_SYN
            engine.tcp_accept(conn, client.now)
            engine.tick(client.now + 100)  # everything times out
            engine.tcp_release(conn, client.now + 100)
        for packet in client.receive():  # anything sent is authentic and well-formed
            parse(packet)
        engine.udp_datagrams()
    finally:
        engine.close()


# ---- Real sockets ----------------------------------------------------------------------------


def test_io_recv_acks_each_batch_over_loopback_udp() -> None:
    engine = new_engine()
    gateway = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gateway.bind(("127.0.0.1", 0))
    gateway.setblocking(False)
    wg_peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wg_peer.bind(("127.0.0.1", 0))
    wg_peer.settimeout(2)
    counter = iter(range(1, 100))

    def send(*segments: Seg) -> None:
        for seg in segments:
            datagram = transport(LOCAL_INDEX, next(counter), seg.build())
            wg_peer.sendto(datagram, gateway.getsockname())
        received = 0

        def all_in() -> bool:  # loopback delivery is fast but not synchronous
            nonlocal received
            received += engine.io_recv(T0 + 1)
            return received == len(segments)

        wait_for(all_in, "the datagrams to arrive", timeout=2, interval=0.005)

    def receive() -> Seg:
        return parse(trim(open_transport(wg_peer.recvfrom(2048)[0])[2]))

    try:
        engine.io_attach(gateway.fileno(), 4)
        peer = Peer()
        send(peer.syn())
        [(_, conn, _)] = engine.tcp_events()
        engine.tcp_accept(conn, T0 + 1)
        assert engine.io_flush() == 1
        peer.rcv_nxt = receive().seq + 1
        send(peer.seg(), peer.data(b"ping"))
        assert receive().ack == peer.snd_nxt  # the batch's ACK, flushed by io_recv itself
        assert engine.tcp_read(conn, 100, T0 + 1) == b"ping"
    finally:
        engine.close()
        gateway.close()
        wg_peer.close()
