"""An authoritative DNS server for the test zone `example.test`, built with dnslib.

    python -m tests.interop.dns_host --port 53 --a 198.18.0.2

Prints `ready` once it serves UDP and TCP. The zone (`ZoneResolver`, also used in-process by the
unit tests):

  example.test         A 198.18.0.2 (--a), MX, TXT, SOA, NS
  www.example.test     CNAME example.test
  big.example.test     TXT records too large for a 512-byte UDP answer (truncated over UDP)
  servfail.example.test SERVFAIL
  anything else in the zone NXDOMAIN with the SOA; names outside the zone REFUSED
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from typing import Any

from dnslib import CNAME, MX, NS, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

ZONE = "example.test."
TTL = 60
SOA_MINIMUM = 30
BIG_TXT_COUNT = 12  # 12 x ~100 bytes: well past 512


class ZoneResolver(BaseResolver):
    """Answers for the zone; counts queries per (name, type) and protocol."""

    def __init__(self, address: str = "198.18.0.2") -> None:
        self.address = address
        self.queries: list[tuple[str, str, str]] = []  # (name, type, "udp"/"tcp")
        self._lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        q = request.q
        name = str(q.qname).lower()
        qtype = QTYPE.get(q.qtype)
        protocol = getattr(handler, "protocol", "udp")
        with self._lock:
            self.queries.append((name, str(qtype), protocol))
        reply = request.reply()
        if not name.endswith(ZONE) and name != ZONE:
            reply.header.rcode = RCODE.REFUSED
            reply.header.aa = 0
            return reply
        soa = RR(
            ZONE,
            QTYPE.SOA,
            ttl=TTL,
            rdata=SOA("ns." + ZONE, "admin." + ZONE, (1, 3600, 600, 86400, SOA_MINIMUM)),
        )
        records = self._records(name)
        if name == "servfail." + ZONE:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(soa)
            return reply
        for rr in records:
            if rr.rtype == q.qtype or rr.rtype == QTYPE.CNAME:
                reply.add_answer(rr)
                if rr.rtype == QTYPE.CNAME and q.qtype != QTYPE.CNAME:
                    target = str(rr.rdata).lower()
                    for more in self._records(target) or []:
                        if more.rtype == q.qtype:
                            reply.add_answer(more)
        if q.qtype == QTYPE.SOA and name == ZONE:
            reply.add_answer(soa)
        if not reply.rr:
            reply.add_auth(soa)
        if protocol == "udp" and len(reply.pack()) > 512:
            cut = request.reply()  # dnslib's truncate() drops the question
            cut.header.tc = 1
            return cut
        return reply

    def _records(self, name: str) -> list[RR] | None:
        if name == ZONE:
            return [
                RR(ZONE, QTYPE.A, ttl=TTL, rdata=A(self.address)),
                RR(ZONE, QTYPE.MX, ttl=TTL, rdata=MX("mail." + ZONE, 10)),
                RR(ZONE, QTYPE.TXT, ttl=TTL, rdata=TXT("v=test zone")),
                RR(ZONE, QTYPE.NS, ttl=TTL, rdata=NS("ns." + ZONE)),
            ]
        if name == "www." + ZONE:
            return [RR(name, QTYPE.CNAME, ttl=TTL, rdata=CNAME(ZONE))]
        if name in ("mail." + ZONE, "ns." + ZONE):
            return [RR(name, QTYPE.A, ttl=TTL, rdata=A(self.address))]
        if name == "big." + ZONE:
            return [
                RR(name, QTYPE.TXT, ttl=TTL, rdata=TXT(f"{i:02d}-" + "x" * 96))
                for i in range(BIG_TXT_COUNT)
            ] + [RR(name, QTYPE.A, ttl=TTL, rdata=A(self.address))]
        if name == "servfail." + ZONE:
            return []
        return None


class QuietLogger(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)


def serve(zone: ZoneResolver, address: str, port: int) -> tuple[DNSServer, DNSServer]:
    """UDP and TCP servers for the zone, started in background threads."""
    logger = QuietLogger()
    udp = DNSServer(zone, port=port, address=address, logger=logger)
    tcp = DNSServer(zone, port=port, address=address, tcp=True, logger=logger)
    udp.start_thread()
    tcp.start_thread()
    return udp, tcp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.interop.dns_host")
    parser.add_argument("--address", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=53)
    parser.add_argument("--a", default="198.18.0.2", help="address of example.test")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    servers = serve(ZoneResolver(args.a), args.address, args.port)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    try:
        time.sleep(args.max_seconds)  # bounded: a forgotten server does not live forever
    finally:
        for server in servers:
            server.stop()
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
