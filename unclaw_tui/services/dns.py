"""The DNS service: every query a peer sends to port 53, at any address, over UDP or TCP.

What each question gets (`DnsAnswerer`, IO-free but for the injected upstream):

  A            asked upstream first, so a name that does not exist is NXDOMAIN (and a failing
               upstream SERVFAIL); a name that resolves gets its VIP from 10.78.0.0/16
               (services/vips.py), TTL 30 s, given to the asking peer only (past its share
               of the pool: SERVFAIL). Its connections to the VIP reach the real address
               (services/vip.py); TLS to it is seen with the hostname even without SNI.
  AAAA         NOERROR, no answer: clients use IPv4, hence the VIP (until full IPv6).
  HTTPS, SVCB  NOERROR, no answer: their address hints and ECH configs would bypass the VIPs.
  PTR of a VIP its hostname, to a peer our DNS gave that VIP (to any other peer, and for an
               unknown VIP: NXDOMAIN).
  anything else forwarded upstream unchanged but for the id; the answer relayed with the
               client's id.

Answers we make ourselves echo the client's EDNS OPT record (version, DO bit; our payload size;
no options: a DNS cookie we did not compute would be wrong). UDP answers larger than the
client can take (512 bytes, or its EDNS size up to 1232, which fits the tunnel MTU) are
truncated (TC) so the client retries over TCP.

Malformed input (not DNS, a response, cut short) is dropped on UDP and closes a TCP
connection; either way it is counted and reported (a `dns_query` event with rcode "MALFORMED",
at most one per peer per second). Well-formed but unsupported queries get FORMERR (not exactly
one question) or NOTIMP (an opcode other than QUERY).

DNS over TCP: 2-byte length framing, several queries per connection answered in order; a
connection must start each query within 10 s and finish sending it within 5 s (slow-loris),
and carries at most 1000 queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from dnslib import (
    PTR,
    QTYPE,
    RCODE,
    RR,
    A,
    DNSHeader,
    DNSRecord,
)

from unclaw_tui.config import VIP_NETWORK
from unclaw_tui.decision import Moment, Question
from unclaw_tui.engine import MAX_DNS_QUERY_LEN, DnsQueryShape, DnsVerdict, check_dns_query
from unclaw_tui.events import DnsQuery
from unclaw_tui.flow import Flow, PeerGone
from unclaw_tui.router import Route
from unclaw_tui.services import dnswire
from unclaw_tui.services import vips as vip_store
from unclaw_tui.services.upstream import (
    EDNS_PAYLOAD,
    UpstreamAnswer,
    UpstreamClient,
    resolv_conf_servers,
)
from unclaw_tui.services.vips import VIP_TTL, NoVip, VipAllocator, normalize_hostname

if TYPE_CHECKING:
    from unclaw_tui.engine import UdpDatagram
    from unclaw_tui.services.base import GatewayServices, Service

log = logging.getLogger(__name__)

VIP_SAVE_INTERVAL = 1.0  # seconds between writes of the VIP map, at least
# ... and between writes for answer times alone (a name asked again): its map is unchanged, and
# the file may lag by this much (vips.TIMES_LAG covers it on load).
VIP_TIMES_SAVE_INTERVAL = 60.0
# A write takes the interpreter lock for its encoding (65,024 names: about 0.4 s), so a big map
# is written less often: at most 1/SAVE_DUTY of the time goes to writing it.
SAVE_DUTY = 20

UDP_MIN_PAYLOAD = 512
QTYPE_SVCB = 64
QTYPE_HTTPS = 65
_NO_ANSWER_TYPES = frozenset({QTYPE.AAAA, QTYPE_SVCB, QTYPE_HTTPS})

TCP_QUERY_TIMEOUT = 5.0  # seconds to send the rest of a query once it started
TCP_WRITE_TIMEOUT = 10.0
TCP_MAX_QUERIES = 1000
MAX_INFLIGHT = 1024  # queries being answered at once; past it UDP queries are dropped
# One peer's share of them, and of the upstream client's sockets (a quarter, as a peer's share
# of the descriptors): a peer asking for names whose servers never answer waits for its own
# queries only.  Past it a UDP query is dropped, a TCP one answered SERVFAIL.
PEER_INFLIGHT = 128
PEER_INFLIGHT_MIN = 4
PEER_SOCKETS_DIVISOR = 4
MALFORMED_EVENT_INTERVAL = 1.0  # seconds between malformed-input events per peer


def qtype_name(qtype: int) -> str:
    name = QTYPE.get(qtype)
    return name if isinstance(name, str) else f"TYPE{qtype}"


class Upstream(Protocol):
    max_sockets: int  # exchanges in flight at once

    async def lookup(self, qname: str, qtype: int) -> UpstreamAnswer: ...
    async def forward(self, query: bytes, request: DNSRecord) -> UpstreamAnswer: ...


@dataclass(slots=True)
class Outcome:
    """What to send back (None: nothing) and what the event says about it."""

    reply: bytes | None
    qname: str = ""
    qtype: str = ""
    answers: list[str] = field(default_factory=list)
    rcode: str = "NOERROR"
    upstream_ms: float | None = None
    cached: bool = False
    malformed: str | None = None  # why the input was dropped
    error: str | None = None  # why the answer is a failure (SERVFAIL), for the event


# Queries of the wrong shape that still get an answer (the rest are dropped as malformed).
_SHAPE_RCODES = {DnsVerdict.OPCODE: RCODE.NOTIMP, DnsVerdict.COUNTS: RCODE.FORMERR}


def parse_query(data: bytes) -> DNSRecord | DnsQueryShape | str:
    """The query; or, for one of the wrong shape, what the engine's shape check found (no
    parser meets a message that is not one plain question: see engine/_dns.h); or why a query
    of the right shape is still unusable."""
    shape = check_dns_query(data)
    if shape.verdict != DnsVerdict.OK:
        return shape
    try:
        return dnswire.parse(data)
    except Exception as exc:  # dnslib raises a zoo of types on arbitrary bytes
        return f"unparsable ({type(exc).__name__})"


def shape_reply(shape: DnsQueryShape, rcode: int) -> bytes:
    """Our reply to a query no parser read: its id, opcode and RD, no question."""
    header = DNSHeader(id=shape.id, qr=1, opcode=shape.opcode, rd=(shape.flags >> 8) & 1, ra=1)
    header.rcode = rcode
    return DNSRecord(header).pack()


def _client_opt(request: DNSRecord) -> RR | None:
    return next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)


def udp_limit(request: DNSRecord) -> int:
    """The largest UDP answer the client takes (and the tunnel carries unfragmented)."""
    opt = _client_opt(request)
    if opt is None:
        return UDP_MIN_PAYLOAD
    return max(UDP_MIN_PAYLOAD, min(EDNS_PAYLOAD, opt.rclass))


def local_reply(request: DNSRecord, rcode: int = RCODE.NOERROR) -> DNSRecord:
    """An empty answer of ours: id, question and RD copied, recursion available, not
    authoritative, the client's OPT echoed."""
    h = request.header
    reply = DNSRecord(
        DNSHeader(id=h.id, qr=1, opcode=h.opcode, aa=0, rd=h.rd, ra=1, rcode=rcode),
        questions=list(request.questions),
    )
    opt = _client_opt(request)
    if opt is not None:
        # Version 0, the DO bit as asked, our payload size; no options.
        reply.add_ar(
            RR(rname=".", rtype=QTYPE.OPT, rclass=EDNS_PAYLOAD, ttl=opt.ttl & 0x8000, rdata=[])
        )
    return reply


def fit(reply: DNSRecord, limit: int | None) -> bytes:
    """Pack, truncating (TC set, no records but the OPT) past a UDP limit."""
    data = reply.pack()
    if limit is None or len(data) <= limit:
        return data
    h = reply.header
    cut = DNSRecord(
        DNSHeader(id=h.id, qr=1, opcode=h.opcode, aa=h.aa, tc=1, rd=h.rd, ra=h.ra, rcode=h.rcode),
        questions=list(reply.questions),
        ar=[rr for rr in reply.ar if rr.rtype == QTYPE.OPT],
    )
    return cut.pack()


def vip_of_ptr(qname: str, network: ipaddress.IPv4Network) -> str | None:
    """The address a PTR question for d.c.b.a.in-addr.arpa names, if it is in `network`."""
    labels = normalize_hostname(qname).split(".")
    if len(labels) != 6 or labels[4:] != ["in-addr", "arpa"]:
        return None
    try:
        ip = ipaddress.IPv4Address(".".join(reversed(labels[:4])))
    except ValueError:
        return None
    return str(ip) if ip in network else None


class DnsAnswerer:
    """One query in, one answer (or a drop) out; see the module docstring."""

    def __init__(
        self,
        upstream: Upstream,
        vips: VipAllocator,
        *,
        in_use: Callable[[str], bool] = lambda ip: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.upstream = upstream
        self.vips = vips
        self.in_use = in_use
        self.clock = clock

    async def answer(
        self,
        data: bytes,
        *,
        udp: bool,
        peer: bytes,
        refusal: Callable[[str], str | None] = lambda name: None,
    ) -> Outcome:
        """`peer`: who asks (its public key: VIPs are given to it, PTRs answered for the VIPs
        it was given). `refusal(name)`: the decision point's word on the name asked for (None:
        allowed); a refused name is answered REFUSED, without asking the upstream."""
        request = parse_query(data)
        if isinstance(request, str):
            return Outcome(None, malformed=request, rcode="MALFORMED")
        if isinstance(request, DnsQueryShape):
            rcode = _SHAPE_RCODES.get(request.verdict)
            if rcode is None:
                return Outcome(None, malformed=request.refusal, rcode="MALFORMED")
            return Outcome(
                shape_reply(request, rcode), rcode=RCODE.get(rcode), error=request.refusal
            )
        limit = udp_limit(request) if udp else None
        q = request.q
        refused = refusal(normalize_hostname(str(q.qname)))
        if refused is not None:
            return self._outcome(request, limit, RCODE.REFUSED, error=refused)
        qtype = q.qtype
        if qtype == QTYPE.A and q.qclass == 1:
            return await self._answer_a(request, limit, peer)
        if qtype in _NO_ANSWER_TYPES and q.qclass == 1:
            return self._outcome(request, limit, RCODE.NOERROR)
        if qtype == QTYPE.PTR:
            vip = vip_of_ptr(str(q.qname), self.vips.network)
            if vip is not None:
                return self._answer_vip_ptr(request, limit, vip, peer)
        return await self._forward(data, request, limit)

    # -- the cases -------------------------------------------------------------------------

    def _outcome(
        self,
        request: DNSRecord,
        limit: int | None,
        rcode: int,
        reply: DNSRecord | None = None,
        answers: list[str] | None = None,
        upstream: UpstreamAnswer | None = None,
        error: str | None = None,
    ) -> Outcome:
        """`reply` (by default an empty answer of ours) fit to `limit`, and what the event
        says about it."""
        q = request.questions[0] if request.questions else None
        return Outcome(
            fit(local_reply(request, rcode) if reply is None else reply, limit),
            qname=normalize_hostname(str(q.qname)) if q else "",
            qtype=qtype_name(q.qtype) if q else "",
            answers=answers or [],
            rcode=RCODE.get(rcode),
            upstream_ms=None if upstream is None else upstream.ms,
            cached=upstream is not None and upstream.cached,
            error=error or (upstream.error if upstream is not None else None),
        )

    async def _answer_a(self, request: DNSRecord, limit: int | None, peer: bytes) -> Outcome:
        q = request.q
        hostname = normalize_hostname(str(q.qname))
        found = await self.upstream.lookup(hostname, QTYPE.A)
        response = found.response
        rcode = found.rcode
        if response is None or rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
            return self._failed(request, limit, found)
        reply = local_reply(request, rcode)
        has_address = any(rr.rtype == QTYPE.A for rr in response.rr)
        answers: list[str] = []
        if rcode == RCODE.NOERROR and has_address and hostname:
            vip = self.vips.allocate(hostname, self.clock(), self.in_use, peer=peer)
            if isinstance(vip, NoVip):
                log.debug("no VIP for %s: %s", hostname, vip.why)
                return self._failed(request, limit, found, vip.why)
            reply.add_answer(RR(q.qname, QTYPE.A, ttl=VIP_TTL, rdata=A(vip)))
            answers.append(vip)
        else:
            # NXDOMAIN or no address: the upstream's SOA lets the client cache the negative.
            for rr in response.auth:
                if rr.rtype == QTYPE.SOA:
                    reply.add_auth(rr)
        return self._outcome(request, limit, rcode, reply, answers, found)

    def _failed(
        self, request: DNSRecord, limit: int | None, found: UpstreamAnswer, error: str | None = None
    ) -> Outcome:
        if error is None and found.error is None:
            error = f"upstream answered {RCODE.get(found.rcode)}"
        return self._outcome(request, limit, RCODE.SERVFAIL, upstream=found, error=error)

    def _answer_vip_ptr(
        self, request: DNSRecord, limit: int | None, vip: str, peer: bytes
    ) -> Outcome:
        hostname = self.vips.hostname_for(vip, peer)
        if hostname is None:
            return self._outcome(request, limit, RCODE.NXDOMAIN)
        reply = local_reply(request)
        reply.add_answer(RR(request.q.qname, QTYPE.PTR, ttl=VIP_TTL, rdata=PTR(hostname + ".")))
        return self._outcome(request, limit, RCODE.NOERROR, reply, [hostname])

    async def _forward(self, data: bytes, request: DNSRecord, limit: int | None) -> Outcome:
        found = await self.upstream.forward(data, request)
        response = found.response
        if response is None:
            return self._failed(request, limit, found)
        response.header.id = request.header.id
        response.questions = list(request.questions)  # the client's spelling (0x20 case)
        answers = [str(rr.rdata) for rr in response.rr]
        return self._outcome(request, limit, found.rcode, response, answers, found)


# --- the service: UDP and TCP glue, events, the VIP map's persistence -------------------------


def save_pause(write_seconds: float) -> float:
    """How long to wait after a write of the VIP map that took `write_seconds` (see SAVE_DUTY):
    a peer that grows the map (a wildcard domain) cannot make its writes take every other
    peer's share of the interpreter."""
    return max(VIP_SAVE_INTERVAL, SAVE_DUTY * write_seconds)


class DnsService:
    """Route.DNS's service, and the gateway's `resolver` (VIP <-> hostname, real addresses)."""

    def __init__(
        self,
        gateway: GatewayServices,
        *,
        upstream: UpstreamClient | None = None,
        vips: VipAllocator | None = None,
    ) -> None:
        self.gateway = gateway
        servers = list(gateway.settings.upstream_dns) or resolv_conf_servers()
        if not servers:
            log.warning("no upstream DNS servers (none given, none in /etc/resolv.conf)")
        self.upstream = upstream if upstream is not None else UpstreamClient(servers)
        if vips is None:
            vips = VipAllocator(VIP_NETWORK)
            vip_store.load(gateway.state, vips)
        self.vips = vips
        self.answerer = DnsAnswerer(  # a VIP is in use while flows to it are open
            self.upstream, self.vips, in_use=lambda ip: gateway.flows.count_to(ip) > 0
        )
        self.counts: Counter[str] = Counter()  # "queries", "malformed", "overload", ...
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: Counter[bytes] = Counter()  # queries being answered, by peer
        self._malformed_reported: dict[str, float] = {}
        self._saved_changes = self.vips.changes
        self._saved_touches = self.vips.touches
        self._saved_at = 0.0  # loop time of the last write
        self._save_task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._changed = asyncio.Event()  # a mapping or grant changed (not only answer times)
        self._closed = False

    @property
    def peer_share(self) -> int:
        """Queries one peer may have in flight (see PEER_INFLIGHT)."""
        by_sockets = self.upstream.max_sockets // PEER_SOCKETS_DIVISOR
        return min(PEER_INFLIGHT, max(PEER_INFLIGHT_MIN, by_sockets))

    # -- Resolver ----------------------------------------------------------------------------

    def hostname_for_vip(self, ip: str, peer: bytes) -> str | None:
        # A flow's use is no answer: it neither renews the grant nor the window (an open flow
        # keeps the VIP from being recycled, see vips.py).
        return self.vips.hostname_for(ip, peer)

    async def resolve(self, hostname: str) -> list[str]:
        return await self.upstream.resolve_a(normalize_hostname(hostname))

    # -- UDP ---------------------------------------------------------------------------------

    def handle_udp(self, dgram: UdpDatagram) -> None:
        if self._closed:
            return
        peer = dgram.peer_public_key
        if len(self._tasks) >= MAX_INFLIGHT or self._inflight[peer] >= self.peer_share:
            self.counts["overload"] += 1
            return
        self._inflight[peer] += 1
        task = asyncio.ensure_future(self._udp_query(dgram))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _udp_query(self, dgram: UdpDatagram) -> None:
        try:
            outcome = await self._answer(dgram.data, dgram.peer_public_key, dgram.peer_ip, udp=True)
        finally:
            self._done(dgram.peer_public_key)
        if outcome.reply is not None and not self._closed:
            dgram.reply(outcome.reply)

    def _done(self, peer: bytes) -> None:
        self._inflight[peer] -= 1
        if not self._inflight[peer]:
            del self._inflight[peer]

    # -- TCP ---------------------------------------------------------------------------------

    async def handle_tcp(self, flow: Flow) -> None:
        flow.open()
        try:
            reader, writer = flow.accept()
        except PeerGone:
            return
        error: str | None = None
        idle_timeout = self.gateway.settings.dns_tcp_idle_timeout
        try:
            for _ in range(TCP_MAX_QUERIES):
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), idle_timeout)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        error = "connection closed inside a length prefix"
                        self._report_malformed(flow.peer_key, flow.peer_ip, error)
                    break  # else a clean end between queries
                except TimeoutError:
                    error = f"idle for {idle_timeout:g} s"
                    break
                (length,) = struct.unpack("!H", head)
                if length > MAX_DNS_QUERY_LEN:  # refused before a byte of it is read
                    error = f"query of {length} bytes (at most {MAX_DNS_QUERY_LEN})"
                    self._report_malformed(flow.peer_key, flow.peer_ip, error)
                    break
                try:
                    query = await asyncio.wait_for(reader.readexactly(length), TCP_QUERY_TIMEOUT)
                except (asyncio.IncompleteReadError, TimeoutError):
                    error = "query cut short"
                    self._report_malformed(flow.peer_key, flow.peer_ip, error)
                    break
                flow.bytes_up += 2 + length
                if self._inflight[flow.peer_key] >= self.peer_share:
                    self.counts["overload"] += 1
                    outcome = Outcome(shape_reply(check_dns_query(query), RCODE.SERVFAIL))
                else:
                    self._inflight[flow.peer_key] += 1
                    try:
                        outcome = await self._answer(query, flow.peer_key, flow.peer_ip, udp=False)
                    finally:
                        self._done(flow.peer_key)
                if outcome.reply is None:
                    error = f"malformed query: {outcome.malformed}"
                    break
                writer.write(struct.pack("!H", len(outcome.reply)) + outcome.reply)
                flow.bytes_down += 2 + len(outcome.reply)
                await asyncio.wait_for(writer.drain(), TCP_WRITE_TIMEOUT)
        except (OSError, RuntimeError, TimeoutError) as exc:
            error = error or (str(exc) or type(exc).__name__)
        # Anything else (a cancel too) ends the flow in FlowRegistry.serve.
        if error is None:
            writer.close()
        else:
            flow.abort()
        flow.close(error)

    # -- common ------------------------------------------------------------------------------

    async def _answer(self, data: bytes, peer_key: bytes, peer_ip: str, *, udp: bool) -> Outcome:
        """The answer and its event.  The caller holds one of the peer's `peer_share` places
        (UDP takes it in handle_udp, before the task exists; TCP around this call)."""
        self.counts["queries"] += 1
        try:
            outcome = await self.answerer.answer(
                data, udp=udp, peer=peer_key, refusal=functools.partial(self._refusal, peer_key)
            )
        except Exception:  # a bug must cost one answer, not the service
            log.exception("DNS query failed")
            self.counts["errors"] += 1
            outcome = Outcome(None, malformed="internal error", rcode="MALFORMED")
        self._save_soon()
        if outcome.malformed is not None:
            self._report_malformed(peer_key, peer_ip, outcome.malformed)
            return outcome
        self.counts[outcome.rcode] += 1
        self._publish(peer_key, peer_ip, outcome)
        return outcome

    def _publish(self, peer_key: bytes, peer_ip: str, outcome: Outcome) -> None:
        ms = outcome.upstream_ms
        self.gateway.publish(
            DnsQuery(
                peer=self.gateway.peer_name(peer_key),
                peer_ip=peer_ip,
                qname=outcome.qname,
                qtype=outcome.qtype,
                answers=outcome.answers,
                rcode=outcome.rcode,
                upstream_ms=None if ms is None else round(ms, 1),
                cached=outcome.cached,
                error=outcome.error,
            )
        )

    def _refusal(self, peer_key: bytes, name: str) -> str | None:
        question = Question(Moment.QUERY, peer_key, "udp", hostname=name)
        return self.gateway.decisions.decide(question).refusal

    def _report_malformed(self, peer_key: bytes, peer_ip: str, why: str) -> None:
        self.counts["malformed"] += 1
        now = time.monotonic()
        last = self._malformed_reported.get(peer_ip)
        if last is not None and now - last < MALFORMED_EVENT_INTERVAL:
            return
        if len(self._malformed_reported) > 4096:
            self._malformed_reported.clear()
        self._malformed_reported[peer_ip] = now
        log.debug("malformed DNS input from %s: %s", peer_ip, why)
        self._publish(peer_key, peer_ip, Outcome(None, rcode="MALFORMED", error=why))

    # -- persistence of the VIP map ----------------------------------------------------------

    def _unsaved(self) -> bool:
        return (self.vips.changes, self.vips.touches) != (self._saved_changes, self._saved_touches)

    def _save_soon(self) -> None:
        if not self._unsaved() or self._closed:
            return
        if self.vips.changes != self._saved_changes:
            self._changed.set()  # a writer waiting on answer times only writes it now
        if self._save_task is None or self._save_task.done():
            self._save_task = asyncio.ensure_future(self._save_changes())

    async def _save_changes(self) -> None:
        loop = asyncio.get_running_loop()
        while self._unsaved() and not self._closed:
            if self.vips.changes == self._saved_changes:  # answer times only
                wait = self._saved_at + VIP_TIMES_SAVE_INTERVAL - loop.time()
                if wait > 0:
                    self._changed.clear()
                    await self._pause(wait, self._changed)
                    continue
            changes, touches = self.vips.changes, self.vips.touches
            # A copy on the loop (dict copies in C); encoding and writing in a thread.
            snap = self.vips.snapshot()
            started = loop.time()
            if not await asyncio.to_thread(vip_store.save, self.gateway.state, snap):
                return
            self._saved_changes, self._saved_touches = changes, touches
            self._saved_at = loop.time()
            # A burst of new names is written once a second, not once per name: each write
            # encodes the whole map and fsyncs (profiled: most of a cold lookup's time).
            await self._pause(save_pause(self._saved_at - started), self._closing)

    async def _pause(self, seconds: float, event: asyncio.Event) -> None:
        """Sleep, cut short by `event` (close sets both: it writes what is left itself)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    async def close(self) -> None:
        self._closed = True
        self._closing.set()
        self._changed.set()
        for task in list(self._tasks):
            task.cancel()
        if self._save_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._save_task
        if self._unsaved():
            # The answer times too: the no-recycle windows and grants hold after a restart.
            await asyncio.to_thread(vip_store.save, self.gateway.state, self.vips.snapshot())


def create(gateway: GatewayServices) -> dict[Route, Service]:
    from unclaw_tui.services.vip import VipService

    dns = DnsService(gateway)
    gateway.resolver = dns
    return {Route.DNS: dns, Route.VIP: VipService(gateway, dns)}
