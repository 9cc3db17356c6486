"""Inner IP packets built by hand for tests (checksums included)."""

from __future__ import annotations

import ipaddress
import struct


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64, frag: int = 0) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0x1234,
        frag,
        ttl,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return header + payload


def icmp_echo(ident: int, seq: int, data: bytes, icmp_type: int = 8) -> bytes:
    """An ICMP echo request (type 8) or reply (type 0) body."""
    body = struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + data
    return body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]


def ping_packet(src: str, dst: str, *, ident: int = 0x1234, seq: int = 1,
                data: bytes = b"ping-payload", icmp_type: int = 8) -> bytes:  # fmt: skip
    """A whole IPv4 ICMP echo packet."""
    return ipv4(src, dst, 1, icmp_echo(ident, seq, data, icmp_type))
