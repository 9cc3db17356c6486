"""Write the seed corpora of the fuzz targets (reproducible: fixed seed): fuzz/corpus/ for
wgstack_fuzz.c and fuzz/corpus_dns/ for dns_fuzz.c.

Each seed is a program in the harness's input format (see the comment at the top of
wgstack_fuzz.c): real WireGuard messages of every type built by the project's Noise code
(`unclaw_tui.engine.noise.HandshakeCore`) and cut to wrong lengths, inner IPv4/IPv6 packets
built by the tests' packet helpers (`tests/packets.py`) with bad lengths, options, checksums,
flags and fragments, and TCP conversations that reach every state of the stack.

The DNS seeds are single messages: ordinary queries as stub resolvers send them (with EDNS,
client subnet, cookies, padding) and the shapes the check refuses (pointers, two questions,
answers, a response, trailing bytes, a name over 255 bytes, a pointer chain).

Run from the repo root: `python fuzz/make_corpus.py` (it replaces both folders).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from dnslib import EDNS0, RR, A, DNSQuestion, DNSRecord, EDNSOption  # noqa: E402

from tests.packets import icmp_echo, inet_checksum, ipv4, ping_packet  # noqa: E402
from unclaw_tui.engine import noise  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "corpus"
DNS_CORPUS = Path(__file__).resolve().parent / "corpus_dns"
PEER0, PEER1, GATEWAY = "10.77.0.2", "10.77.0.3", "10.77.0.1"

# ---- The harness's operations ------------------------------------------------------------------


def u16(v: int) -> bytes:
    return struct.pack("<H", v & 0xFFFF)


def raw(data: bytes, src: int = 0) -> bytes:
    return bytes([0, src]) + u16(len(data)) + data


def inner(packet: bytes, flags: int = 0) -> bytes:
    """flags: 1 peer 1, 2 fix checksums, 4 replay the previous counter, 8 roam (src in bits 4+)."""
    return bytes([1, flags]) + u16(len(packet)) + packet


_OVER_IPV6 = False  # conversations() again with every segment over IPv6 (see main)


def tcpseg(
    tflags: int,
    *,
    peer: int = 0,
    flow: int = 0,
    seq: int = 0,
    ack: int = 0,
    win: int = 65535,
    opts: bytes = b"",
    payload: bytes = b"",
    v6: bool = False,
    bad_checksum: bool = False,
) -> bytes:
    flags = peer | (2 if v6 or _OVER_IPV6 else 0) | (4 if bad_checksum else 0)
    return (
        bytes([2, flags, flow, tflags])
        + struct.pack("<hhH", seq, ack, win)
        + bytes([len(opts)])
        + opts
        + u16(len(payload))
        + payload
    )


def tick(step: int) -> bytes:
    return bytes([3, step])


def tcpop(action: str, handle: int = 0, arg: int = 0) -> bytes:
    actions = [
        "accept",
        "reject",
        "read",
        "write",
        "shutdown",
        "abort",
        "release",
        "info",
        "write_small",
        "splice",  # the owner's splice_connect to the harness's host (arg: timeout s % 16)
        "splice_abort",
        "splice_counts",
    ]
    return bytes([4, handle, actions.index(action)]) + u16(arg)


def drain(toggle_auto: bool = False, close_host: bool = False, reset_host: bool = False) -> bytes:
    """close_host: the harness's host closes its accepted sockets (reset_host: with an RST)."""
    mode = (1 if toggle_auto else 0) | (2 if close_host else 0) | (4 if reset_host else 0)
    return bytes([5, mode])


def send(kind: int, data: bytes = b"") -> bytes:
    return bytes([6, kind]) + u16(len(data)) + data


def keys(peer: int, action: int) -> bytes:
    """action: 0 initiator keypair, 1 responder one, 2 remove + re-add, 3 drop staged, 4 roam,
    5 end the peer's flows (| 0x10: under pressure, with RSTs)."""
    return bytes([7, peer, action])


FLUSH, QUERY = bytes([8]), bytes([9])
FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

# ---- Packets ----------------------------------------------------------------------------------


def udp4(
    src: str, dst: str, sport: int, dport: int, payload: bytes, *, checksum: bool = True
) -> bytes:
    header = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    if not checksum:
        return ipv4(src, dst, 17, header + payload)
    import ipaddress

    pseudo = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!BBH", 0, 17, 8 + len(payload))
    )
    csum = inet_checksum(pseudo + header + payload) or 0xFFFF
    return ipv4(src, dst, 17, header[:6] + struct.pack("!H", csum) + payload)


def ipv6(src_last: int, dst: bytes, next_header: int, payload: bytes) -> bytes:
    src = bytes([0xFD, 0x77]) + bytes(13) + bytes([src_last])
    return struct.pack("!IHBB", 0x60000000, len(payload), next_header, 64) + src + dst + payload


def with_ipv4_checksum(packet: bytes) -> bytes:
    ihl = (packet[0] & 15) * 4
    header = packet[:10] + b"\0\0" + packet[12:ihl]
    return header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:] + packet[ihl:]


DNS_QUERY = bytes.fromhex("123401000001000000000000076578616d706c6503636f6d0000010001")
SYN_OPTIONS = (
    bytes.fromhex("020405b4") + bytes.fromhex("01030307") + bytes.fromhex("0402") + b"\x01\x01"
)


def handshake_messages() -> Iterator[tuple[str, bytes]]:
    """Real messages of every type from two HandshakeCores (fixed keys and clock)."""
    clock = lambda: 1_700_000_000.0  # noqa: E731
    gateway_key, client_key = bytes(range(1, 33)), bytes(range(33, 65))
    gateway = noise.HandshakeCore(gateway_key, wall_clock=clock)
    client = noise.HandshakeCore(client_key, wall_clock=clock)
    gateway.add_peer(client.public_key, bytes(32))
    client.add_peer(gateway.public_key, bytes(32))
    initiation = client.create_initiation(gateway.public_key, 0x11223344, 10.0)
    gateway.consume_initiation(initiation, 10.0)
    response, _ = gateway.create_response(client.public_key, 0x55667788, 10.0)
    cookie = gateway.create_cookie_reply(initiation, bytes([192, 0, 2, 1, 0xCA, 0x6C]), 10.0)
    keepalive = struct.pack("<IIQ", 4, 0x1001, 0) + bytes(16)
    transport = struct.pack("<IIQ", 4, 0x1001, 7) + bytes(range(64)) + bytes(16)
    for name, msg in [
        ("initiation", initiation),
        ("response", response),
        ("cookie", cookie),
        ("keepalive", keepalive),
        ("transport", transport),
    ]:
        yield name, msg
        yield name + "_short", msg[:-1]
        yield name + "_long", msg + b"\0"
        yield name + "_reserved", msg[:1] + b"\1" + msg[2:]
    yield "type0", b"\0\0\0\0" + bytes(44)
    yield "type5", b"\5\0\0\0" + bytes(44)
    yield "three_bytes", b"\4\0\0"
    yield "empty", b""
    yield "transport_unknown_index", struct.pack("<IIQ", 4, 0xDEADBEEF, 0) + bytes(32)
    yield "transport_counter_max", struct.pack("<IIQ", 4, 0x1001, 2**64 - 1) + bytes(16)


def inner_packets() -> Iterator[tuple[str, bytes]]:
    ping_gw = ping_packet(PEER0, GATEWAY)
    yield "ping_gateway", ping_gw
    yield "ping_elsewhere", ping_packet(PEER0, "93.184.216.34")
    yield "ping_reply_type", ping_packet(PEER0, GATEWAY, icmp_type=0)
    yield "ping_bad_icmp_checksum", ping_gw[:22] + b"\0\0" + ping_gw[24:]
    yield "ping_big", ipv4(PEER0, GATEWAY, 1, icmp_echo(1, 1, bytes(1372)))
    yield "ping_padded", ping_gw + bytes(12)  # WireGuard pads to 16
    yield "icmp_short", ipv4(PEER0, GATEWAY, 1, b"\x08\0")
    yield "udp_dns_gateway", udp4(PEER0, GATEWAY, 40000, 53, DNS_QUERY)
    yield "udp_dns_out", udp4(PEER0, "9.9.9.9", 40001, 53, DNS_QUERY)
    yield "udp_no_checksum", udp4(PEER0, "9.9.9.9", 40001, 443, b"quic?", checksum=False)
    good = udp4(PEER0, "9.9.9.9", 40001, 53, DNS_QUERY)
    yield "udp_bad_checksum", good[:26] + b"\x12\x34" + good[28:]
    yield "udp_len_long", good[:24] + struct.pack("!H", 500) + good[26:]
    yield "udp_len_short", good[:24] + struct.pack("!H", 4) + good[26:]
    yield "udp_port0", udp4(PEER0, "9.9.9.9", 0, 0, b"x")
    yield "udp_broadcast", udp4(PEER0, "255.255.255.255", 68, 67, b"dhcp")
    yield "udp_multicast", udp4(PEER0, "224.0.0.251", 5353, 5353, DNS_QUERY)
    yield "udp_spoofed", udp4(PEER1, "9.9.9.9", 40001, 53, DNS_QUERY)
    yield "udp_empty", udp4(PEER0, "9.9.9.9", 40001, 53, b"")
    yield "frag_first", ipv4(PEER0, "9.9.9.9", 17, good[20:28] + bytes(16), frag=0x2000)
    yield "frag_middle", ipv4(PEER0, "9.9.9.9", 17, bytes(16), frag=0x2002)
    yield "frag_last", ipv4(PEER0, "9.9.9.9", 6, bytes(24), frag=0x0003)
    options = bytearray(ipv4(PEER0, GATEWAY, 1, icmp_echo(5, 5, b"opts")))
    options[0] = 0x47  # IHL 7: 8 option bytes (record route + NOP/EOL)
    options[2:4] = struct.pack("!H", len(options) + 8)
    yield (
        "ipv4_options",
        with_ipv4_checksum(bytes(options[:20]) + b"\x07\x07\x04\0\0\0\0\0" + bytes(options[20:])),
    )
    yield "ipv4_ihl4", with_ipv4_checksum(b"\x44" + ping_gw[1:])
    yield "ipv4_ihl15", with_ipv4_checksum(b"\x4f" + ping_gw[1:])
    yield "ipv4_total_long", with_ipv4_checksum(ping_gw[:2] + struct.pack("!H", 2000) + ping_gw[4:])
    yield "ipv4_total_short", with_ipv4_checksum(ping_gw[:2] + struct.pack("!H", 19) + ping_gw[4:])
    yield "ipv4_bad_header_checksum", ping_gw[:10] + b"\0\0" + ping_gw[12:]
    yield "ipv4_ttl0", with_ipv4_checksum(ping_gw[:8] + b"\0" + ping_gw[9:])
    yield "ipv4_proto_gre", ipv4(PEER0, GATEWAY, 47, bytes(8))
    yield "version5", b"\x55" + ping_gw[1:]
    yield "truncated_header", ping_gw[:12]
    gw6 = bytes([0xFD, 0x77]) + bytes(13) + b"\x01"
    out6 = bytes([0x20, 0x01, 0x0D, 0xB8]) + bytes(11) + b"\x09"
    tcp_syn6 = struct.pack("!HHIIBBHHH", 40000, 443, 1000, 0, 0x50, SYN, 65535, 0, 0)
    yield "ipv6_tcp_syn", ipv6(2, out6, 6, tcp_syn6)
    yield (
        "ipv6_udp",
        ipv6(2, out6, 17, struct.pack("!HHHH", 40000, 53, 8 + len(DNS_QUERY), 0) + DNS_QUERY),
    )
    yield "ipv6_icmp_echo", ipv6(2, gw6, 58, b"\x80\0\0\0\0\1\0\1ping")
    yield "ipv6_hop_by_hop", ipv6(2, out6, 0, b"\x06\0" + bytes(6) + tcp_syn6)
    yield "ipv6_short", ipv6(2, out6, 17, b"")[:30]
    udp6 = struct.pack("!HHHH", 40000, 53, 8 + len(DNS_QUERY), 0) + DNS_QUERY
    dest_opts = b"\x11\0" + bytes(6)  # next: UDP
    yield "ipv6_dest_options", ipv6(2, out6, 60, dest_opts + udp6)
    yield "ipv6_routing_then_options", ipv6(2, out6, 43, b"\x3c\0" + bytes(6) + dest_opts + udp6)
    yield "ipv6_ext_chain_long", ipv6(2, out6, 60, (b"\x3c\0" + bytes(6)) * 9 + dest_opts + udp6)
    yield "ipv6_hop_by_hop_late", ipv6(2, out6, 60, b"\x00\0" + bytes(6) + dest_opts + udp6)
    yield "ipv6_ext_truncated", ipv6(2, out6, 60, b"\x11\x08" + bytes(6))
    yield "ipv6_fragment", ipv6(2, out6, 44, b"\x11\0\0\x01" + bytes(4) + udp6)
    yield "ipv6_atomic_fragment", ipv6(2, out6, 44, b"\x11\0\0\0" + bytes(4) + udp6)
    yield "ipv6_no_next_header", ipv6(2, out6, 59, b"")
    yield "ipv6_udp_multicast", ipv6(2, bytes([0xFF, 2]) + bytes(13) + b"\xfb", 17, udp6)
    yield "ipv6_echo_elsewhere", ipv6(2, out6, 58, b"\x80\0\0\0\0\1\0\1ping")
    yield (
        "ipv6_plen_long",
        ipv6(2, out6, 17, bytes(8))[:4] + b"\x05\xdc" + ipv6(2, out6, 17, bytes(8))[6:],
    )
    tcp_syn = (
        struct.pack("!HHIIBBHHH", 40000, 80, 1000, 0, 0x80, SYN, 65535, 0, 0)
        + SYN_OPTIONS
        + bytes(4)
    )
    yield "tcp_syn_options", ipv4(PEER0, "93.184.216.34", 6, tcp_syn)
    yield (
        "tcp_doff_bad",
        ipv4(
            PEER0,
            "93.184.216.34",
            6,
            struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0xF0, SYN, 1, 0, 0),
        ),
    )
    yield (
        "tcp_rst_no_conn",
        ipv4(
            PEER0,
            "93.184.216.34",
            6,
            struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x50, RST, 0, 0, 0),
        ),
    )
    yield (
        "tcp_ack_no_conn",
        ipv4(
            PEER0,
            "93.184.216.34",
            6,
            struct.pack("!HHIIBBHHH", 40000, 80, 1, 9, 0x50, ACK, 0, 0, 0),
        ),
    )
    yield "tcp_short", ipv4(PEER0, "93.184.216.34", 6, bytes(12))


def conversations() -> Iterator[tuple[str, bytes]]:
    """TCP through every state; sequence numbers are relative to what the stack last sent."""
    opts = SYN_OPTIONS
    handshake = tcpseg(SYN, opts=opts) + tcpop("accept") + tcpseg(ACK)
    yield (
        "tcp_lifecycle",
        (
            handshake
            + tcpseg(ACK | PSH, payload=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            + FLUSH
            + tcpop("read", arg=4096)
            + tcpop("write", arg=1000)
            + tcpseg(ACK)
            + tcpseg(ACK | FIN)
            + tcpop("read", arg=100)
            + tcpop("shutdown")
            + tcpseg(ACK)
            + QUERY
            + tcpop("release")
            + tick(200)
            + QUERY
        ),
    )
    yield "tcp_reject", tcpseg(SYN) + tcpop("reject") + tcpop("release")
    yield "tcp_syn_timeout", tcpseg(SYN) + tick(0x80 + 4) + tcpop("info") + tcpop("release")
    yield (
        "tcp_synack_retransmit",
        tcpseg(SYN, opts=opts) + tcpop("accept") + tick(250) + tick(250) + tick(0x81),
    )
    yield (
        "tcp_rto",
        handshake + tcpop("write", arg=8000) + tick(100) + tick(200) + tick(0x81) + tcpseg(ACK),
    )
    yield (
        "tcp_out_of_order",
        (
            handshake
            + tcpseg(ACK, seq=1000, payload=b"b" * 500)
            + tcpseg(ACK, seq=3000, payload=b"c" * 500)
            + tcpseg(ACK, payload=b"a" * 1000)
            + tcpop("read", arg=8000)
            + tcpseg(ACK | FIN, seq=5000)
        ),
    )
    sack = b"\x01\x01\x05\x0a" + struct.pack("!II", 0, 0)
    yield (
        "tcp_sack_dupacks",
        (
            handshake
            + tcpop("write", arg=4000)
            + tcpseg(ACK, ack=-14000)
            + tcpseg(ACK, ack=-14000, opts=sack)
            + tcpseg(ACK, ack=-14000)
            + tcpseg(ACK, ack=-14000)
            + tcpseg(ACK)
        ),
    )
    yield (
        "tcp_zero_window",
        handshake
        + tcpseg(ACK, win=0)
        + tcpop("write", arg=2000)
        + tick(0x81)
        + tick(0x83)
        + tcpseg(ACK, win=8000),
    )
    yield "tcp_rst_exact", handshake + tcpseg(RST) + tcpop("read", arg=10) + tcpop("release")
    yield "tcp_rst_in_window", handshake + tcpseg(RST, seq=10) + tcpseg(ACK | RST)
    yield "tcp_syn_in_established", handshake + tcpseg(SYN) + tcpseg(SYN | ACK, seq=-1)
    yield "tcp_bad_ack", handshake + tcpseg(ACK, ack=5000) + tcpseg(ACK, seq=-30000)
    yield (
        "tcp_fill_receive",
        handshake + b"".join(tcpseg(ACK, seq=i * 1400, payload=bytes(1400)) for i in range(14)),
    )
    yield (
        "tcp_abort",
        handshake + tcpop("write", arg=100) + tcpop("abort") + tcpseg(ACK) + tcpop("release"),
    )
    yield (
        "tcp_release_unread",
        handshake + tcpseg(ACK, payload=b"unread") + tcpop("release") + tcpseg(ACK, seq=6),
    )
    yield (
        "tcp_fin_wait",
        handshake
        + tcpop("shutdown")
        + tcpseg(ACK)
        + tick(0x80 + 7)
        + tcpseg(ACK | FIN)
        + tick(0x81),
    )
    yield (
        "tcp_simultaneous_close",
        handshake + tcpop("shutdown") + tcpseg(ACK | FIN, ack=-1) + tcpseg(ACK),
    )
    yield "tcp_ipv6_refused", tcpseg(SYN, v6=True) + tcpseg(ACK, v6=True)
    yield "tcp_bad_checksum", tcpseg(SYN, bad_checksum=True)
    yield "tcp_peer1_prefix", tcpseg(SYN, peer=1, opts=opts) + tcpop("accept") + tcpseg(ACK, peer=1)
    yield "tcp_to_peer", tcpseg(SYN, flow=0b1000) + tcpop("accept")
    yield (
        "tcp_half_open_limit",
        b"".join(tcpseg(SYN, flow=i, seq=i) for i in range(4))
        + b"".join(tcpseg(SYN, flow=0x10 | i, seq=i) for i in range(4))
        + tcpseg(SYN, flow=0x20),
    )
    yield (
        "tcp_peer_removed",
        handshake + tcpop("write", arg=100) + keys(0, 2) + tcpop("read", arg=10) + tcpop("release"),
    )
    yield (
        "tcp_peer_flows_aborted",
        handshake + tcpop("write", arg=100) + keys(0, 5) + tcpop("read", arg=10) + tcpop("release"),
    )
    yield "tcp_peer_flows_pressure", handshake + tcpseg(SYN, flow=1) + keys(0, 5 | 0x10) + QUERY
    yield "tcp_staged_no_keys", keys(0, 2) + tcpseg(SYN) + send(0, b"staged") + keys(0, 0) + drain()
    yield (
        "tcp_urgent_and_push",
        handshake + tcpseg(ACK | URG | PSH, payload=b"urgent") + tcpop("read", arg=100),
    )
    yield (
        "tcp_many_ops",
        handshake
        + b"".join(
            tcpop(a, arg=50)
            for a in (
                "info",
                "write_small",
                "read",
                "write",
                "shutdown",
                "abort",
                "accept",
                "reject",
                "release",
            )
        ),
    )


def sessions() -> Iterator[tuple[str, bytes]]:
    """The WireGuard side: keypair rotation, confirmation, replay, roaming, timers, sends."""
    ping = ping_packet(PEER0, GATEWAY)
    ping1 = ping_packet(PEER1, GATEWAY)
    yield "responder_confirm", inner(ping1, flags=1) + QUERY
    yield "replay", inner(ping) + inner(ping, flags=4)
    yield "roam", inner(ping) + inner(ping, flags=8 | 0x10) + inner(ping, flags=8 | 0x20)
    yield (
        "rotate_keys",
        inner(ping) + keys(0, 0) + inner(ping) + keys(0, 1) + inner(ping) + keys(0, 0) + keys(0, 0),
    )
    yield (
        "timers",
        inner(ping) + tick(0x81) + tick(0x80 + 12) + tick(0x80 + 17) + tick(0x80 + 55) + QUERY,
    )
    yield "keepalive_persistent", inner(ping1, flags=1) + tick(0x83) + tick(0x83)
    yield "send_udp", send(0, b"reply") + send(0 | 4, b"x" * 1400) + send(0 | 8, b"to staged peer")
    yield "send_icmp", send(1) + send(1 | 0x80 | 4) + send(1 | 0x30)
    yield (
        "send_inner",
        send(2, ping_packet(GATEWAY, PEER0)) + send(2, ping_packet(GATEWAY, "10.99.3.3")),
    )
    yield "send_raw", send(3, bytes(148)) + send(3 | 8, bytes(32))
    yield "staged_overflow", b"".join(send(8, bytes(100)) for _ in range(10)) + keys(2, 3)
    yield (
        "output_hold",
        drain(toggle_auto=True) + b"".join(send(4, bytes(1000)) for _ in range(20)) + drain(),
    )
    yield "endpoint_change", keys(0, 4 | 0x18) + inner(ping) + keys(1, 4)


def splices() -> Iterator[tuple[str, bytes]]:
    """Connections joined to the harness's host on loopback: by the fast relay (flow bit 6, a
    destination every engine approves) and by the owner's splice_connect."""
    opts = SYN_OPTIONS
    fast = 0x40
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    opened = tcpseg(SYN, flow=fast, opts=opts) + drain() + tcpseg(ACK, flow=fast)
    yield (
        "fast_relay_exchange",
        opened
        + tcpseg(ACK | PSH, flow=fast, payload=request)
        + drain()
        + drain()
        + tcpseg(ACK, flow=fast)
        + tcpop("splice_counts")
        + drain(close_host=True)
        + tcpseg(ACK, flow=fast)
        + tcpseg(ACK | FIN, flow=fast)
        + drain()
        + tick(200)
        + QUERY,
    )
    yield (
        "fast_relay_host_resets",
        opened
        + tcpseg(ACK | PSH, flow=fast, payload=request)
        + drain(close_host=True, reset_host=True),
    )
    yield "fast_relay_peer_resets", opened + tcpseg(RST, flow=fast) + drain()
    yield (
        "fast_relay_many",
        b"".join(tcpseg(SYN, flow=fast | i, seq=i) for i in range(4))
        + drain()
        + tcpop("splice_abort"),
    )
    yield "fast_relay_peer_gone", opened + keys(0, 5) + drain() + tcpseg(ACK, flow=fast)
    yield (
        "fast_relay_pressure",
        opened
        + tcpseg(ACK | PSH, flow=fast, payload=request)
        + drain()
        + keys(0, 5 | 0x10)
        + drain(),
    )
    yield (
        "owner_splice",
        tcpseg(SYN, opts=opts)
        + tcpop("splice", arg=5)
        + drain()
        + tcpseg(ACK)
        + tcpseg(ACK | PSH, payload=request)
        + drain()
        + tcpop("splice_counts")
        + tcpop("splice_abort")
        + drain(),
    )


def dns_messages() -> Iterator[tuple[str, bytes]]:
    def query(
        name: str = "example.com", qtype: str = "A", options: list[EDNSOption] | None = None
    ) -> DNSRecord:
        q = DNSRecord.question(name, qtype)
        if options is not None:
            q.add_ar(EDNS0(udp_len=1232, flags="do", opts=options))
        return q

    ecs = EDNSOption(8, bytes([0, 1, 24, 0, 192, 0, 2]))
    cookie = EDNSOption(10, bytes(range(8)))
    yield "a", query().pack()
    yield "aaaa_edns", query("www.example.org", "AAAA", []).pack()
    yield "https_ecs_cookie", query("api.example.net", "HTTPS", [ecs, cookie]).pack()
    yield "padded", query("x.example", "A", [EDNSOption(12, bytes(100))]).pack()
    yield "ptr", query("5.0.78.10.in-addr.arpa", "PTR").pack()
    yield "long_name", query(".".join(["a" * 63] * 3) + "." + "b" * 61, "A").pack()
    plain = query().pack()
    yield "pointer_name", plain[:12] + b"\xc0\x0c" + plain[-4:]
    yield "trailing", plain + b"\x00"
    yield "truncated", plain[:-3]
    two = query()
    two.add_question(DNSQuestion("example.net"))
    yield "two_questions", two.pack()
    answered = query()
    answered.add_answer(RR("example.com", rdata=A("192.0.2.1")))
    yield "with_answer", answered.pack()
    yield "response", query().reply().pack()
    opt_overrun = bytearray(query("example.com", "A", [cookie]).pack())
    opt_overrun[-10] = 0xFF  # the cookie option's length past the record's end
    yield "opt_overrun", bytes(opt_overrun)
    # The crafted shape the check exists for: names made of pointers to pointers to labels.
    chain = bytearray(b"\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a")
    for _ in range(120):
        chain += b"\xc0" + bytes([len(chain) - 2]) if len(chain) < 255 else b"\x00"
    yield "pointer_chain", bytes(chain[:512])


def main() -> None:
    # Ephemeral keys, cookie secrets and nonces come from os.urandom: seed them for stable bytes.
    os.urandom = random.Random(7).randbytes
    seeds: list[tuple[str, bytes]] = []
    for name, msg in handshake_messages():
        seeds.append(("wg_" + name, raw(msg)))
    for name, packet in inner_packets():
        seeds.append(("inner_" + name, inner(packet)))
        seeds.append(("inner_fixed_" + name, inner(packet, flags=2)))
    seeds.extend(conversations())
    global _OVER_IPV6
    _OVER_IPV6 = True  # everything the fuzzer reaches over IPv4, over IPv6 too
    seeds.extend(("v6_" + name, data) for name, data in conversations())
    _OVER_IPV6 = False
    seeds.extend(sessions())
    seeds.extend(splices())
    write(CORPUS, seeds)
    write(DNS_CORPUS, list(dns_messages()))


def write(folder: Path, seeds: list[tuple[str, bytes]]) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, data in seeds:
        digest = hashlib.sha1(data).hexdigest()[:8]
        (folder / f"{name}-{digest}").write_bytes(data)
    print(f"{len(seeds)} seeds in {folder.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
