"""IPv6 inside the tunnel through the whole engine, sans-IO: TCP (handshake, data both ways,
refusal), UDP both ways, ICMPv6 echo of the gateway's address and destination unreachable, the
bounded extension-header walk, and what is dropped and counted (bad lengths, chains too long,
truncated, fragments, multicast).  Packets are built by hand; every checksum of what the engine
sends is verified.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator

import pytest

from tests.unit.test_tcp import ACK, PSH, RST, SYN
from tests.unit.test_wgstack import T0
from tests.unit.test_wgstack_flows import (
    PEER_IP6,
    Client,
    add_test_peer,
    check_ipv6_checksum,
    drops,
    ipv6,
    l4_over_ipv6,
    udp6,
)
from unclaw_tui.engine import _ffi
from unclaw_tui.engine._ffi import Engine

GATEWAY6 = "fd77::1"
DST6 = "2001:db8::10"
MTU = 1420


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = Engine("10.77.0.1", 24, tunnel_ip6=GATEWAY6)
    add_test_peer(engine, T0)
    yield engine
    engine.close()


@pytest.fixture
def client(engine: Engine) -> Client:
    return Client(engine)


def tcp6(
    sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
    options: bytes = b"", src: str = PEER_IP6, dst: str = DST6,
) -> bytes:  # fmt: skip
    hlen = 20 + len(options)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (hlen // 4) << 4, flags, 65535, 0, 0)
    return l4_over_ipv6(src, dst, 6, tcp + options + payload, 16)


def tcp_fields(packet: bytes) -> tuple[int, int, int, int, int, bytes, bytes]:
    """(sport, dport, seq, ack, flags, options, payload) of an IPv6 TCP packet, checked."""
    assert packet[0] >> 4 == 6 and packet[6] == 6
    check_ipv6_checksum(packet)
    sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", packet[40:54])
    hlen = (off >> 4) * 4
    return sport, dport, seq, ack, flags, packet[60 : 40 + hlen], packet[40 + hlen :]


def ext(next_header: int, body: bytes = bytes(6)) -> bytes:
    """An extension header (hop-by-hop, routing, destination options) of 8 * n bytes."""
    assert (2 + len(body)) % 8 == 0
    return bytes([next_header, (2 + len(body)) // 8 - 1]) + body


def with_ext(packet: bytes, *headers: tuple[int, bytes]) -> bytes:
    """packet (IPv6) with extension headers (type, bytes) put in front of its upper layer."""
    upper, l4 = packet[6], packet[40:]
    chain = b""
    kinds = [kind for kind, _ in headers]
    for i, (_, raw) in enumerate(headers):
        following = kinds[i + 1] if i + 1 < len(kinds) else upper
        chain += bytes([following]) + raw[1:]
    body = chain + l4
    return (
        struct.pack("!IHBB", 6 << 28, len(body), kinds[0] if kinds else upper, 64)
        + packet[8:40]
        + body
    )


# ---- TCP ------------------------------------------------------------------------------------


def test_tcp_over_ipv6_handshake_and_data_both_ways(engine: Engine, client: Client) -> None:
    mss_option = struct.pack("!BBH", 2, 4, 1440)
    client.send(tcp6(50000, 443, 1000, 0, SYN, options=mss_option))
    [(ev_type, conn, _)] = engine.tcp_events()
    assert ev_type == _ffi.TCP_EV_SYN
    info = engine.tcp_info(conn)
    assert (info.src, info.dst) == ((PEER_IP6, 50000), (DST6, 443))
    engine.tcp_accept(conn, client.now)
    [synack] = client.receive()
    assert synack[8:24] == ipaddress.IPv6Address(DST6).packed
    sport, dport, iss, ack, flags, options, _ = tcp_fields(synack)
    assert (sport, dport, ack, flags) == (443, 50000, 1001, SYN | ACK)
    assert options[:4] == struct.pack("!BBH", 2, 4, MTU - 60)  # IPv6's header is 20 longer
    client.send(tcp6(50000, 443, 1001, iss + 1, ACK))
    assert engine.tcp_info(conn).state == _ffi.TCP_ST_ESTABLISHED
    client.send(tcp6(50000, 443, 1001, iss + 1, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n"))
    engine.tcp_events()
    assert engine.tcp_read(conn, 4096, client.now) == b"GET / HTTP/1.1\r\n\r\n"
    assert engine.tcp_write(conn, b"x" * 3000, client.now) == 3000
    engine.tcp_flush(client.now)
    data = [tcp_fields(p) for p in client.receive()]
    payloads = [f[6] for f in data if f[6]]
    assert b"".join(payloads) == b"x" * 3000
    assert max(len(p) for p in payloads) <= MTU - 60  # segments fit the IPv6 MSS


def test_tcp_over_ipv6_refused_with_an_rst(engine: Engine, client: Client) -> None:
    client.send(tcp6(50001, 25, 0xFFFFFFFF, 0, SYN))
    [(_, conn, _)] = engine.tcp_events()
    engine.tcp_reject(conn, client.now)
    engine.tcp_flush(client.now)
    [rst] = client.receive()
    sport, dport, seq, ack, flags, _, _ = tcp_fields(rst)
    assert (sport, dport, seq, ack, flags) == (25, 50001, 0, 0, RST | ACK)  # ack wraps


def test_ipv6_segment_without_a_connection_gets_an_rst(engine: Engine, client: Client) -> None:
    client.send(tcp6(50002, 443, 7, 1234, ACK))
    [rst] = client.receive()
    assert tcp_fields(rst)[2:5] == (1234, 0, RST)


# ---- UDP and ICMPv6 ------------------------------------------------------------------------


def test_udp_over_ipv6_both_ways(engine: Engine, client: Client) -> None:
    client.send(udp6(PEER_IP6, DST6, 5353, 53, b"AAAA?"))
    [meta] = engine.udp_datagrams()
    assert (meta.src, meta.dst, bytes(meta.data)) == ((PEER_IP6, 5353), (DST6, 53), b"AAAA?")
    engine.udp_send((DST6, 53), (PEER_IP6, 5353), b"answer", client.now)
    [packet] = client.receive()
    assert packet[6] == 17 and packet[8:24] == ipaddress.IPv6Address(DST6).packed
    check_ipv6_checksum(packet)
    assert struct.unpack("!HH", packet[40:44]) == (53, 5353) and packet[48:] == b"answer"
    with pytest.raises(_ffi.EngineError):  # one datagram: one family
        engine.udp_send(("10.77.0.1", 53), (PEER_IP6, 5353), b"x", client.now)
    with pytest.raises(_ffi.EngineError) as too_large:
        engine.udp_send((DST6, 53), (PEER_IP6, 5353), bytes(MTU - 47), client.now)
    assert too_large.value.code == _ffi.EMSGSIZE


def test_udp_over_ipv6_without_checksum_or_to_multicast_is_dropped(
    engine: Engine, client: Client
) -> None:
    zero_sum = bytearray(udp6(PEER_IP6, DST6, 1, 2, b"x"))
    zero_sum[46:48] = b"\0\0"  # legal in IPv4, not in IPv6 (RFC 8200 8.1)
    client.send(bytes(zero_sum), udp6(PEER_IP6, "ff02::fb", 5353, 5353, b"mdns"))
    assert engine.udp_datagrams() == []
    assert drops(engine) == {"bad_ip": 1, "unhandled": 1}


@pytest.mark.parametrize(("code", "code6"), [(3, 4), (13, 1), (1, 3)])
def test_destination_unreachable_over_ipv6(
    engine: Engine, client: Client, code: int, code6: int
) -> None:
    engine.icmp_unreachable((PEER_IP6, 40000), (DST6, 53), 17, code, client.now)
    [packet] = client.receive()
    assert packet[6] == 58
    check_ipv6_checksum(packet)
    assert (packet[40], packet[41]) == (1, code6)
    quoted = packet[48:]
    assert quoted[8:24] == ipaddress.IPv6Address(PEER_IP6).packed
    assert quoted[24:40] == ipaddress.IPv6Address(DST6).packed
    assert struct.unpack("!HH", quoted[40:44]) == (40000, 53)


def test_icmpv6_echo_of_the_gateway_address(engine: Engine, client: Client) -> None:
    echo = struct.pack("!BBHHH", 128, 0, 0, 0x42, 7) + b"ping data"
    client.send(l4_over_ipv6(PEER_IP6, GATEWAY6, 58, echo, 2))
    [reply] = client.receive()
    assert reply[6] == 58 and reply[8:24] == ipaddress.IPv6Address(GATEWAY6).packed
    check_ipv6_checksum(reply)
    assert reply[40] == 129 and reply[44:] == echo[4:]
    client.send(l4_over_ipv6(PEER_IP6, DST6, 58, echo, 2))  # another address: not ours
    bad = bytearray(l4_over_ipv6(PEER_IP6, GATEWAY6, 58, echo, 2))
    bad[-1] ^= 1
    client.send(bytes(bad))
    assert client.receive() == []
    assert drops(engine) == {"unhandled": 1, "bad_ip": 1}
    assert engine.stats()["icmp_echo_replies"] == 1


# ---- Extension headers and malformed packets ---------------------------------------------


def test_extension_headers_are_walked_to_the_upper_layer(engine: Engine, client: Client) -> None:
    datagram = udp6(PEER_IP6, DST6, 1000, 2000, b"behind options")
    client.send(with_ext(datagram, (0, ext(0)), (43, ext(0)), (60, ext(0, bytes(14)))))
    [meta] = engine.udp_datagrams()
    assert bytes(meta.data) == b"behind options"
    atomic = bytes([0, 0, 0, 0]) + bytes(4)  # fragment header, offset 0, no more: atomic
    client.send(with_ext(datagram, (44, atomic)))
    assert len(engine.udp_datagrams()) == 1
    assert drops(engine) == {}


def test_malformed_ipv6_is_counted_and_dropped(engine: Engine, client: Client) -> None:
    datagram = udp6(PEER_IP6, DST6, 1000, 2000, b"x")
    long_chain = with_ext(datagram, *[(60, ext(0))] * 9)  # one more than the walk follows
    hop_by_hop_late = with_ext(datagram, (60, ext(0)), (0, ext(0)))
    truncated_ext = with_ext(datagram, (60, ext(0, bytes(62))))  # says 64 bytes, has fewer
    truncated_ext = truncated_ext[:4] + struct.pack("!H", 40) + truncated_ext[6:88]
    fragment = with_ext(datagram, (44, bytes([0, 0, 0, 1]) + bytes(4)))  # more to come
    too_long = bytearray(datagram)
    too_long[4:6] = struct.pack("!H", len(datagram) - 40 + 1)  # payload length past the end
    client.send(long_chain, hop_by_hop_late, truncated_ext)
    client.send(fragment, bytes(too_long), datagram[:39], ipv6(PEER_IP6, DST6, 59, b""))
    assert engine.udp_datagrams() == [] and client.receive() == []
    assert drops(engine) == {"ipv6_ext": 3, "fragment": 1, "bad_ip": 2, "unhandled": 1}


def test_ipv6_from_outside_allowed_ips_is_spoofed(engine: Engine, client: Client) -> None:
    client.send(tcp6(1, 2, 3, 0, SYN, src="fd00::3"), udp6("fd00::3", DST6, 1, 2, b"x"))
    assert engine.tcp_events() == [] and engine.udp_datagrams() == []
    assert drops(engine) == {"spoofed_src": 2}
