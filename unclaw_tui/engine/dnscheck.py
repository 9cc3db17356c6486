"""The engine's DNS query shape check (`_dns.c`), for Python's DNS service.

The same C function will guard the engine's own DNS answers; Python calls it through here so
both paths refuse exactly the same queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from unclaw_tui.engine._wgstack_cffi import ffi, lib


class DnsVerdict(IntEnum):
    OK = lib.DNS_OK
    SHORT = lib.DNS_E_SHORT
    LONG = lib.DNS_E_LONG
    RESPONSE = lib.DNS_E_RESPONSE
    OPCODE = lib.DNS_E_OPCODE
    COUNTS = lib.DNS_E_COUNTS
    NAME = lib.DNS_E_NAME
    TRUNCATED = lib.DNS_E_TRUNCATED
    ADDITIONAL = lib.DNS_E_ADDITIONAL
    TRAILING = lib.DNS_E_TRAILING


# Why a query was refused: the words of events and logs.
REFUSALS = {
    DnsVerdict.SHORT: "shorter than a DNS header",
    DnsVerdict.LONG: f"longer than {lib.DNS_MAX_QUERY_LEN} bytes",
    DnsVerdict.RESPONSE: "a response, not a query",
    DnsVerdict.OPCODE: "not a standard query",
    DnsVerdict.COUNTS: "not one question without other records",
    DnsVerdict.NAME: "a bad name (pointer, label type or length)",
    DnsVerdict.TRUNCATED: "cut short",
    DnsVerdict.ADDITIONAL: "an additional record that is not a well-formed OPT",
    DnsVerdict.TRAILING: "bytes after the last record",
}
MAX_DNS_QUERY_LEN: int = lib.DNS_MAX_QUERY_LEN


@dataclass(frozen=True, slots=True)
class DnsQueryShape:
    """What the check read; `id` and `flags` are known unless it was shorter than a header."""

    verdict: DnsVerdict
    id: int
    flags: int
    qtype: int
    qclass: int
    has_opt: bool
    udp_size: int
    ecs: bytes  # the EDNS client-subnet option's data, b"" if none
    steps: int  # labels, records and options looked at (at most the length)

    @property
    def refusal(self) -> str | None:
        """Why the query does not have the accepted shape; None if it has."""
        return REFUSALS.get(self.verdict)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF


def check_dns_query(data: bytes | bytearray) -> DnsQueryShape:
    out = ffi.new("dns_query_check *")
    verdict = lib.dns_check_query(ffi.from_buffer(data), len(data), out)
    ecs = data[out.ecs_offset : out.ecs_offset + out.ecs_len] if out.ecs_offset else b""
    return DnsQueryShape(
        verdict=DnsVerdict(verdict),
        id=out.id,
        flags=out.flags,
        qtype=out.qtype,
        qclass=out.qclass,
        has_opt=bool(out.has_opt),
        udp_size=out.opt_udp_size,
        ecs=ecs,
        steps=out.steps,
    )
