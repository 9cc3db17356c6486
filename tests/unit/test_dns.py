"""The DNS service: answer transcripts (query bytes in, answer bytes out) against a fake
upstream, the upstream client against a real dnslib server on loopback, the UDP/TCP glue with
fake flows, and VIP connections to loopback servers."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from dnslib import CNAME, EDNS0, MX, QTYPE, RCODE, RR, SOA, TXT, A, DNSError, DNSRecord, EDNSOption
from dnslib.server import DNSServer
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import FakeClock, until
from tests.interop.dns_host import QuietLogger, ZoneResolver
from unclaw_tui.config import Settings
from unclaw_tui.decision import DecisionPoint
from unclaw_tui.engine import DnsVerdict, check_dns_query
from unclaw_tui.engine.outcomes import Refusal
from unclaw_tui.events import DnsQuery, Event, TcpClosed, TcpOpened, UdpFlowOpened
from unclaw_tui.flow import Flow, FlowRegistry
from unclaw_tui.router import Route, Router
from unclaw_tui.services import dns, dnswire
from unclaw_tui.services.dns import DnsAnswerer, DnsService, create
from unclaw_tui.services.egress import EgressPolicy
from unclaw_tui.services.upstream import DnsCache, UpstreamAnswer, UpstreamClient
from unclaw_tui.services.vip import VipService
from unclaw_tui.services.vips import VipAllocator
from unclaw_tui.state import StateDir

PEER_KEY = bytes(range(32))
OTHER_KEY = bytes(range(32, 64))  # a second peer


def query(name: str, qtype: str = "A", *, ident: int = 4242, edns: int | None = None,
          do: bool = False) -> bytes:  # fmt: skip
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns, flags="do" if do else ""))
    return q.pack()


def upstream_reply(name: str, qtype: str, *rrs: RR, rcode: int = RCODE.NOERROR,
                   auth: tuple[RR, ...] = ()) -> DNSRecord:  # fmt: skip
    r = DNSRecord.question(name, qtype).reply()
    r.header.rcode = rcode
    for rr in rrs:
        r.add_answer(rr)
    for rr in auth:
        r.add_auth(rr)
    return r


SOA_RR = RR("example.test.", QTYPE.SOA, ttl=60,
            rdata=SOA("ns.example.test.", "a.example.test.", (1, 2, 3, 4, 30)))  # fmt: skip


class FakeUpstream:
    """Canned upstream answers; records what was asked."""

    max_sockets = 1024

    def __init__(self) -> None:
        self.lookups: dict[tuple[str, int], UpstreamAnswer] = {}
        self.forwards: dict[tuple[str, int], UpstreamAnswer] = {}
        self.asked: list[tuple[str, str, int]] = []

    def add(self, name: str, qtype: str, response: DNSRecord | None, *, forward: bool = False,
            cached: bool = False) -> None:  # fmt: skip
        rcode = RCODE.SERVFAIL if response is None else response.header.rcode
        answer = UpstreamAnswer(response, rcode, None if cached else 3.0, cached=cached)
        table = self.forwards if forward else self.lookups
        table[(name, getattr(QTYPE, qtype))] = answer

    async def lookup(self, qname: str, qtype: int) -> UpstreamAnswer:
        self.asked.append(("lookup", qname, qtype))
        return self.lookups.get((qname, qtype), UpstreamAnswer(None, RCODE.SERVFAIL, 2000.0))

    async def forward(self, data: bytes, request: DNSRecord) -> UpstreamAnswer:
        name = str(request.q.qname).rstrip(".").lower()
        self.asked.append(("forward", name, request.q.qtype))
        found = self.forwards.get((name, request.q.qtype))
        if found is None:
            return UpstreamAnswer(None, RCODE.SERVFAIL, 2000.0)
        # As the real client: the response carries the id we used upstream, not the client's.
        response = DNSRecord.parse(found.response.pack()) if found.response else None
        if response is not None:
            response.header.id = 999
        return UpstreamAnswer(response, found.rcode, found.ms, cached=found.cached)


@pytest.fixture
def upstream() -> FakeUpstream:
    up = FakeUpstream()
    real = RR("example.test.", QTYPE.A, ttl=300, rdata=A("198.18.0.2"))
    up.add("example.test", "A", upstream_reply("example.test", "A", real))
    up.add("nope.example.test", "A", upstream_reply(
        "nope.example.test", "A", rcode=RCODE.NXDOMAIN, auth=(SOA_RR,)))  # fmt: skip
    up.add("example.test", "MX", upstream_reply(
        "example.test", "MX", RR("example.test.", QTYPE.MX, ttl=60,
                                 rdata=MX("mail.example.test.", 10))), forward=True)  # fmt: skip
    big = [RR("big.example.test.", QTYPE.TXT, ttl=60, rdata=TXT("x" * 200)) for _ in range(4)]
    up.add("big.example.test", "TXT", upstream_reply("big.example.test", "TXT", *big),
           forward=True)  # fmt: skip
    return up


@pytest.fixture
def answerer(upstream: FakeUpstream) -> DnsAnswerer:
    # The first free address each time (swapped with the last): 10.78.0.1 first.
    return DnsAnswerer(upstream, VipAllocator(randbelow=lambda n: 0), clock=lambda: 1000.0)


async def ask(
    answerer: DnsAnswerer, data: bytes, udp: bool = True, peer: bytes = PEER_KEY
) -> DNSRecord:
    outcome = await answerer.answer(data, udp=udp, peer=peer)
    assert outcome.reply is not None, outcome
    return DNSRecord.parse(outcome.reply)


# --- transcripts -------------------------------------------------------------------------------


async def test_a_gets_a_stable_vip_with_ttl_30(answerer: DnsAnswerer) -> None:
    outcome = await answerer.answer(query("Example.TEST"), udp=True, peer=PEER_KEY)
    assert outcome.reply is not None
    r = DNSRecord.parse(outcome.reply)
    assert r.header.id == 4242 and r.header.qr and r.header.ra and not r.header.aa
    assert r.header.rcode == RCODE.NOERROR
    assert [(str(rr.rname), rr.rtype, rr.ttl, str(rr.rdata)) for rr in r.rr] == [
        ("Example.TEST.", QTYPE.A, 30, "10.78.0.1")  # the client's spelling kept
    ]
    assert (outcome.qname, outcome.qtype, outcome.answers) == ("example.test", "A", ["10.78.0.1"])
    assert outcome.upstream_ms == 3.0 and not outcome.cached
    again = await ask(answerer, query("example.test", ident=7))
    assert again.header.id == 7 and str(again.rr[0].rdata) == "10.78.0.1"


async def test_nxdomain_passes_through_with_soa(answerer: DnsAnswerer,
                                                upstream: FakeUpstream) -> None:  # fmt: skip
    r = await ask(answerer, query("nope.example.test"))
    assert r.header.rcode == RCODE.NXDOMAIN and not r.rr
    assert [rr.rtype for rr in r.auth] == [QTYPE.SOA]
    assert ("lookup", "nope.example.test", QTYPE.A) in upstream.asked
    assert len(answerer.vips) == 0  # no VIP wasted on a name that does not exist


async def test_servfail_when_upstream_fails(answerer: DnsAnswerer) -> None:
    outcome = await answerer.answer(query("down.example.test"), udp=True, peer=PEER_KEY)
    assert outcome.rcode == "SERVFAIL"
    assert DNSRecord.parse(outcome.reply or b"").header.rcode == RCODE.SERVFAIL
    upstream_servfail = upstream_reply("sf.test", "A", rcode=RCODE.SERVFAIL)
    answerer.upstream.add("sf.test", "A", upstream_servfail)  # type: ignore[attr-defined]
    r = await ask(answerer, query("sf.test"))
    assert r.header.rcode == RCODE.SERVFAIL and not r.rr
    sf = await answerer.answer(query("sf.test"), udp=True, peer=PEER_KEY)
    assert sf.error == "upstream answered SERVFAIL"  # the event says why, not just SERVFAIL


async def test_failures_carry_the_upstreams_reason_and_successes_none(
    answerer: DnsAnswerer,
) -> None:
    fake = answerer.upstream
    fake.lookups[("gone.test", QTYPE.A)] = UpstreamAnswer(  # type: ignore[attr-defined]
        None, RCODE.SERVFAIL, 4.0, error="198.18.0.2:53: port unreachable"
    )
    gone = await answerer.answer(query("gone.test"), udp=True, peer=PEER_KEY)
    assert (gone.rcode, gone.error) == ("SERVFAIL", "198.18.0.2:53: port unreachable")
    ok = await answerer.answer(query("example.test"), udp=True, peer=PEER_KEY)
    assert (ok.rcode, ok.error) == ("NOERROR", None)


@pytest.mark.parametrize("qtype", ["AAAA", "HTTPS", "SVCB"])
async def test_aaaa_https_svcb_are_empty_noerror_without_upstream(
    answerer: DnsAnswerer, upstream: FakeUpstream, qtype: str
) -> None:
    r = await ask(answerer, query("example.test", qtype))
    assert r.header.rcode == RCODE.NOERROR and not r.rr and not r.auth
    assert str(r.q.qname) == "example.test." and QTYPE.get(r.q.qtype) == qtype
    assert upstream.asked == []


async def test_edns_opt_is_echoed(answerer: DnsAnswerer) -> None:
    for qtype in ("A", "AAAA"):
        r = await ask(answerer, query("example.test", qtype, edns=4096, do=True))
        opts = [rr for rr in r.ar if rr.rtype == QTYPE.OPT]
        assert len(opts) == 1
        assert opts[0].rclass == 1232 and opts[0].ttl & 0x8000  # our size, the DO bit echoed
    r = await ask(answerer, query("example.test", "AAAA"))
    assert not [rr for rr in r.ar if rr.rtype == QTYPE.OPT]  # none asked, none given


async def test_ptr_of_a_vip_names_its_host(answerer: DnsAnswerer, upstream: FakeUpstream) -> None:
    await ask(answerer, query("example.test"))
    r = await ask(answerer, query("1.0.78.10.in-addr.arpa", "PTR"))
    assert [(rr.rtype, str(rr.rdata), rr.ttl) for rr in r.rr] == [(QTYPE.PTR, "example.test.", 30)]
    unknown = await ask(answerer, query("9.9.78.10.in-addr.arpa", "PTR"))
    assert unknown.header.rcode == RCODE.NXDOMAIN
    other = await ask(answerer, query("1.1.168.192.in-addr.arpa", "PTR"))
    assert other.header.rcode == RCODE.SERVFAIL  # not ours: forwarded (fake has no answer)
    assert ("forward", "1.1.168.192.in-addr.arpa", QTYPE.PTR) in upstream.asked


async def test_other_types_forwarded_with_the_clients_id(answerer: DnsAnswerer) -> None:
    outcome = await answerer.answer(
        query("example.test", "MX", ident=31337), udp=True, peer=PEER_KEY
    )
    r = DNSRecord.parse(outcome.reply or b"")
    assert r.header.id == 31337
    assert [(rr.rtype, str(rr.rdata)) for rr in r.rr] == [(QTYPE.MX, "10 mail.example.test.")]
    assert outcome.answers == ["10 mail.example.test."]


async def test_large_forwarded_answer_truncated_on_udp_only(answerer: DnsAnswerer) -> None:
    udp = await ask(answerer, query("big.example.test", "TXT"))
    assert udp.header.tc and not udp.rr and str(udp.q.qname) == "big.example.test."
    tcp = await ask(answerer, query("big.example.test", "TXT"), udp=False)
    assert not tcp.header.tc and len(tcp.rr) == 4
    edns = await ask(answerer, query("big.example.test", "TXT", edns=1232))
    assert not edns.header.tc and len(edns.rr) == 4  # ~900 bytes fit the client's EDNS size


async def test_malformed_and_unsupported(answerer: DnsAnswerer) -> None:
    assert (await answerer.answer(b"\x00\x01", udp=True, peer=PEER_KEY)).malformed
    response = DNSRecord.question("example.test").reply().pack()
    assert (
        await answerer.answer(response, udp=True, peer=PEER_KEY)
    ).malformed == "a response, not a query"
    no_question = DNSRecord()
    no_question.header.id = 5
    r = await ask(answerer, no_question.pack())
    assert r.header.rcode == RCODE.FORMERR and r.header.id == 5
    notify = DNSRecord.question("example.test")
    notify.header.opcode = 4
    assert (await ask(answerer, notify.pack())).header.rcode == RCODE.NOTIMP


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=600), st.binary(min_size=12, max_size=80).map(
    lambda b: b[:2] + b"\x01\x00\x00\x01" + b[6:])))  # fmt: skip
async def test_any_bytes_give_an_answer_or_a_counted_drop(data: bytes) -> None:
    answerer = DnsAnswerer(FakeUpstream(), VipAllocator(), clock=lambda: 0.0)
    outcome = await answerer.answer(data, udp=True, peer=PEER_KEY)
    if outcome.reply is None:
        assert outcome.malformed and outcome.rcode == "MALFORMED"
    else:
        r = DNSRecord.parse(outcome.reply)
        assert r.header.qr and r.header.id == struct.unpack("!H", data[:2])[0]
        assert len(outcome.reply) <= 1232


# --- the upstream client against a real dnslib server ------------------------------------------


@pytest.fixture
def zone_server() -> Iterator[tuple[ZoneResolver, int]]:
    zone = ZoneResolver("198.18.0.2")
    udp = DNSServer(zone, port=0, address="127.0.0.1", logger=QuietLogger())
    port = udp.server.server_address[1]
    tcp = DNSServer(zone, port=port, address="127.0.0.1", tcp=True, logger=QuietLogger())
    udp.start_thread()
    tcp.start_thread()
    yield zone, port
    udp.stop()
    tcp.stop()
    udp.server.server_close()
    tcp.server.server_close()


async def test_upstream_udp_cache_by_ttl(zone_server: tuple[ZoneResolver, int]) -> None:
    zone, port = zone_server
    clock = FakeClock(100.0)
    client = UpstreamClient([("127.0.0.1", port)], clock=clock)
    first = await client.lookup("example.test", QTYPE.A)
    assert first.rcode == RCODE.NOERROR and not first.cached
    assert [str(rr.rdata) for rr in first.response.rr] == ["198.18.0.2"]  # type: ignore[union-attr]
    clock.now += 25
    second = await client.lookup("Example.Test", QTYPE.A)
    assert second.cached and second.ms is None
    assert second.response.rr[0].ttl == 60 - 25  # type: ignore[union-attr]
    assert zone.queries == [("example.test.", "A", "udp")]
    clock.now += 40  # past the 60 s TTL
    third = await client.lookup("example.test", QTYPE.A)
    assert not third.cached and len(zone.queries) == 2
    assert await client.resolve_a("www.example.test") == ["198.18.0.2"]  # through the CNAME
    nx = await client.lookup("nope.example.test", QTYPE.A)
    assert nx.rcode == RCODE.NXDOMAIN
    assert (await client.lookup("nope.example.test", QTYPE.A)).cached  # SOA minimum: 30 s


async def test_upstream_away_serves_stale_answers_for_a_day(
    zone_server: tuple[ZoneResolver, int],
) -> None:
    _zone, port = zone_server
    clock = FakeClock(100.0)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()
    closed.close()  # nothing listens there: port unreachable at once
    live = UpstreamClient([("127.0.0.1", port)], clock=clock)
    fresh = await live.lookup("example.test", QTYPE.A)
    assert fresh.rcode == RCODE.NOERROR and fresh.error is None
    # The same cache, the upstream gone, the 60 s TTL long past.
    away = UpstreamClient([dead], clock=clock, cache=live.cache)
    clock.now += 3600
    stale = await away.lookup("example.test", QTYPE.A)
    assert stale.rcode == RCODE.NOERROR and stale.cached
    assert [(str(rr.rdata), rr.ttl) for rr in stale.response.rr] == [("198.18.0.2", 30)]  # type: ignore[union-attr]
    assert (stale.error or "").startswith("served stale: ")
    assert await away.resolve_a("example.test") == ["198.18.0.2"]  # VIP connections go on
    never = await away.lookup("other.example.test", QTYPE.A)
    assert never.response is None and never.rcode == RCODE.SERVFAIL
    clock.now += 86_400  # a day past its TTL: no longer served
    gone = await away.lookup("example.test", QTYPE.A)
    assert gone.response is None and gone.rcode == RCODE.SERVFAIL


async def test_upstream_truncated_udp_falls_back_to_tcp(
    zone_server: tuple[ZoneResolver, int],
) -> None:
    zone, port = zone_server
    client = UpstreamClient([("127.0.0.1", port)])
    request = DNSRecord.question("big.example.test", "TXT")
    answer = await client.forward(request.pack(), request)
    assert answer.rcode == RCODE.NOERROR and not answer.response.header.tc  # type: ignore[union-attr]
    assert len([rr for rr in answer.response.rr if rr.rtype == QTYPE.TXT]) == 12  # type: ignore[union-attr]
    assert [p for _n, _t, p in zone.queries] == ["udp", "tcp"]


async def test_upstream_silent_server_gives_servfail_within_the_bound(
    zone_server: tuple[ZoneResolver, int],
) -> None:
    _zone, port = zone_server
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        alone = UpstreamClient([silent.getsockname()], timeout=0.6)
        t0 = time.monotonic()
        answer = await alone.lookup("example.test", QTYPE.A)
        elapsed = time.monotonic() - t0
        assert answer.response is None and answer.rcode == RCODE.SERVFAIL
        assert 0.5 < elapsed < 1.0 and "no answer" in (answer.error or "")
        # With a second server, the first's silence costs part of the budget, then it answers.
        both = UpstreamClient([silent.getsockname(), ("127.0.0.1", port)], timeout=0.6)
        answer = await both.lookup("example.test", QTYPE.A)
        assert answer.rcode == RCODE.NOERROR
        assert await UpstreamClient([("127.0.0.1", 1)]).resolve_a("example.test") == []
    finally:
        silent.close()


async def test_upstream_shares_concurrent_identical_questions(
    zone_server: tuple[ZoneResolver, int],
) -> None:
    zone, port = zone_server
    client = UpstreamClient([("127.0.0.1", port)])
    answers = await asyncio.gather(*(client.lookup("example.test", QTYPE.A) for _ in range(5)))
    assert all(a.rcode == RCODE.NOERROR for a in answers)
    assert client.exchanges == 1 and len(zone.queries) == 1


def test_cache_does_not_keep_failures_or_ttl_zero() -> None:
    cache = DnsCache()
    cache.put("k", upstream_reply("a.test", "A", rcode=RCODE.SERVFAIL), 0.0)
    cache.put("z", upstream_reply("a.test", "A", RR("a.test.", QTYPE.A, ttl=0,
                                                    rdata=A("1.2.3.4"))), 0.0)  # fmt: skip
    assert len(cache) == 0


# --- the service glue with fake flows ----------------------------------------------------------


class FakeGateway:
    def __init__(self, state_dir: Path, upstream_port: int) -> None:
        self.settings = Settings(state_dir=state_dir, upstream_dns=[("127.0.0.1", upstream_port)])
        self.state = StateDir(state_dir)
        self.resolver: Any = None
        self.events: list[Event] = []
        self.flows = FlowRegistry(self.publish, self.peer_name)
        self.set_policy(EgressPolicy(allow=["127.0.0.0/8"], host_addresses=[]))

    def set_policy(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self.decisions = DecisionPoint(Router(), policy)

    def flow(self, conn: Any, route: str) -> Flow:
        return self.flows.tcp(conn, route=route)

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def peer_name(self, public_key: bytes) -> str:
        return "phone"


class FakeDatagram:
    def __init__(self, data: bytes, dst: tuple[str, int] = ("10.77.0.1", 53),
                 src_port: int = 5353, peer: bytes = PEER_KEY) -> None:  # fmt: skip
        self.data = data
        self.peer_public_key = peer
        self.peer_ip = "10.77.0.2"
        self.src_port = src_port
        self.dst_ip, self.dst_port = dst
        self.replies: list[bytes] = []
        self.unreachables = 0

    def reply(self, data: bytes) -> None:
        self.replies.append(data)

    def unreachable(self, *, admin: bool = False) -> None:
        self.unreachables += 1


class FakeTcpConn:
    """The contract's TcpConn over the server end of a loopback connection."""

    can_splice = False  # Python\'s pump carries it

    def __init__(self, streams: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 dst: tuple[str, int] = ("10.77.0.1", 53), conn_id: int = 11,
                 peer: bytes = PEER_KEY) -> None:  # fmt: skip
        self.conn_id = conn_id
        self.peer_public_key = peer
        self.peer_ip = "10.77.0.2"
        self.src_port = 40000
        self.dst_ip, self.dst_port = dst
        self.streams = streams
        self.state = "new"

    def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.state = "accepted"
        return self.streams

    def reject(self) -> None:
        self.state = "rejected"
        self.streams[1].transport.abort()

    def abort(self) -> None:
        self.state = "aborted"
        self.streams[1].transport.abort()


@pytest.fixture
async def loopback() -> AsyncIterator[Any]:
    """Make (client streams, server streams) pairs over loopback TCP."""
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    server = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    writers: list[asyncio.StreamWriter] = []

    async def pair() -> tuple[Any, Any]:
        client = await asyncio.open_connection("127.0.0.1", port)
        theirs = await accepted.get()
        writers.extend([client[1], theirs[1]])
        return client, theirs

    yield pair
    for w in writers:
        w.close()
    server.close()


@pytest.fixture
def gateway(tmp_path: Path, zone_server: tuple[ZoneResolver, int]) -> FakeGateway:
    return FakeGateway(tmp_path / "state", zone_server[1])


async def settle(tasks: set[asyncio.Task[None]]) -> None:
    await until(lambda: not tasks, "every DNS task done")


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


async def udp_echo() -> tuple[asyncio.DatagramTransport, int]:
    """A UDP echo server on 127.0.0.2 (a VIP's "real address" in these tests) and its port."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=("127.0.0.2", 0))
    return transport, transport.get_extra_info("sockname")[1]


async def test_service_udp_answers_publishes_and_persists(gateway: FakeGateway) -> None:
    services = create(gateway)
    service = services[Route.DNS]
    assert isinstance(service, DnsService) and gateway.resolver is service
    assert isinstance(services[Route.VIP], VipService)
    dgram = FakeDatagram(query("example.test"))
    service.handle_udp(dgram)
    garbage = FakeDatagram(b"\xff" * 7)
    service.handle_udp(garbage)
    await settle(service._tasks)
    (vip,) = [str(rr.rdata) for rr in DNSRecord.parse(dgram.replies[0]).rr]
    assert ipaddress.IPv4Address(vip) in ipaddress.IPv4Network("10.78.0.0/16")
    assert garbage.replies == [] and service.counts["malformed"] == 1
    events = [e for e in gateway.events if isinstance(e, DnsQuery)]
    ok = next(e for e in events if e.rcode == "NOERROR")
    assert (ok.peer, ok.peer_ip, ok.qname, ok.qtype, ok.answers) == (
        "phone", "10.77.0.2", "example.test", "A", [vip])  # fmt: skip
    assert ok.upstream_ms is not None and not ok.cached
    malformed = next(e for e in events if e.rcode == "MALFORMED")
    assert malformed.error == "shorter than a DNS header" and malformed.answers == []
    assert service.hostname_for_vip(vip, PEER_KEY) == "example.test"
    assert service.hostname_for_vip(vip, OTHER_KEY) is None  # not given to that peer
    assert await service.resolve("example.test") == ["198.18.0.2"]
    await service.close()
    reloaded = VipAllocator()
    from unclaw_tui.services import vips as vip_store

    vip_store.load(gateway.state, reloaded)
    assert reloaded.vip_for("example.test") == vip
    assert reloaded.hostname_for(vip, PEER_KEY) == "example.test"  # the grant kept too
    assert reloaded.hostname_for(vip, OTHER_KEY) is None


async def test_service_tcp_several_queries_then_garbage_closes(
    gateway: FakeGateway, loopback: Any
) -> None:
    service = DnsService(gateway)
    (c_reader, c_writer), theirs = await loopback()
    conn = FakeTcpConn(theirs)
    job = asyncio.create_task(service.handle_tcp(gateway.flow(conn, "dns")))
    for name in ("example.test", "nope.example.test"):
        data = query(name)
        c_writer.write(struct.pack("!H", len(data)) + data)
    await c_writer.drain()
    codes = []
    for _ in range(2):
        (n,) = struct.unpack("!H", await c_reader.readexactly(2))
        codes.append(DNSRecord.parse(await c_reader.readexactly(n)).header.rcode)
    assert codes == [RCODE.NOERROR, RCODE.NXDOMAIN]
    c_writer.write(b"\x00\x03abc")
    await asyncio.wait_for(job, 5)
    assert conn.state == "aborted"
    opened = [e for e in gateway.events if isinstance(e, TcpOpened)]
    closed = [e for e in gateway.events if isinstance(e, TcpClosed)]
    assert len(opened) == len(closed) == 1 and closed[0].route == "dns"
    assert closed[0].error and "malformed" in closed[0].error
    assert gateway.flows.total == 0


async def test_service_tcp_slow_loris_is_cut(gateway: FakeGateway, loopback: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(dns, "TCP_QUERY_TIMEOUT", 0.3)
    service = DnsService(gateway)
    (_c_reader, c_writer), theirs = await loopback()
    conn = FakeTcpConn(theirs)
    job = asyncio.create_task(service.handle_tcp(gateway.flow(conn, "dns")))
    c_writer.write(b"\x00\x40abc")  # promises 64 bytes, sends 3
    t0 = time.monotonic()
    await asyncio.wait_for(job, 3)
    assert time.monotonic() - t0 < 1.0 and conn.state == "aborted"
    assert service.counts["malformed"] == 1


# --- VIP connections ---------------------------------------------------------------------------


class FakeResolver:
    def __init__(self, table: dict[str, tuple[str, list[str]]]) -> None:
        self.table = table  # vip -> (hostname, addresses)

    def hostname_for_vip(self, ip: str, peer: bytes) -> str | None:
        entry = self.table.get(ip)
        return entry[0] if entry and peer == PEER_KEY else None

    async def resolve(self, hostname: str) -> list[str]:
        return next((addrs for h, addrs in self.table.values() if h == hostname), [])


async def test_vip_tcp_reaches_the_real_address_next_on_failure(
    gateway: FakeGateway, loopback: Any
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    # First address refused by the policy, second closed, third serves.
    gateway.set_policy(
        EgressPolicy(allow=["127.0.0.0/8"], deny=["127.0.0.9/32"], host_addresses=[])
    )
    resolver = FakeResolver({"10.78.0.5": ("svc.test", ["127.0.0.9", "127.0.0.3", "127.0.0.2"])})
    service = VipService(gateway, resolver)  # type: ignore[arg-type]
    (c_reader, c_writer), theirs = await loopback()
    flow = gateway.flow(FakeTcpConn(theirs, dst=("10.78.0.5", port)), "vip")
    await asyncio.wait_for(service.handle_tcp(flow), 5)  # connected: carried from now on
    c_writer.write(b"ping")
    assert await asyncio.wait_for(c_reader.read(100), 5) == b"ping"
    c_writer.write_eof()  # both ways ended: the splice closes
    await asyncio.wait_for(flow.ended(), 5)
    closed = [e for e in gateway.events if isinstance(e, TcpClosed)]
    assert len(closed) == 1 and closed[0].route == "vip" and closed[0].hostname == "svc.test"
    assert closed[0].dst_ip == "10.78.0.5" and closed[0].error is None
    assert closed[0].bytes_up == 4 and closed[0].bytes_down == 4
    server.close()

    (_r, _w), theirs = await loopback()
    unknown = FakeTcpConn(theirs, dst=("10.78.9.9", 80), conn_id=12)
    await service.handle_tcp(gateway.flow(unknown, "vip"))
    assert unknown.state == "rejected"
    assert [e.error for e in gateway.events if isinstance(e, TcpClosed)][-1] == (
        Refusal.VIP_NOT_GIVEN.says()
    )
    await service.close()


async def test_vip_udp_relayed_quic_dropped_unknown_unreachable(gateway: FakeGateway) -> None:
    transport, port = await udp_echo()
    # The first address is refused by the decision point: the flow goes to the second.
    gateway.set_policy(
        EgressPolicy(allow=["127.0.0.0/8"], deny=["127.0.0.9/32"], host_addresses=[])
    )
    resolver = FakeResolver({"10.78.0.5": ("svc.test", ["127.0.0.9", "127.0.0.2"])})
    service = VipService(gateway, resolver)  # type: ignore[arg-type]
    dgram = FakeDatagram(b"hello", dst=("10.78.0.5", port))
    service.handle_udp(dgram)
    await until(lambda: bool(dgram.replies), "the echo through the VIP")
    assert dgram.replies == [b"hello"]
    opened = [e for e in gateway.events if isinstance(e, UdpFlowOpened)]
    assert [(e.dst_ip, e.hostname, e.route) for e in opened] == [("10.78.0.5", "svc.test", "vip")]
    quic = FakeDatagram(b"\xc0quic", dst=("10.78.0.5", 443))
    service.handle_udp(quic)
    await asyncio.sleep(0.05)  # not a wait: a while for a wrong reply to show, then none
    assert quic.replies == [] and quic.unreachables == 0 and service.counts["quic_dropped"] == 1
    stray = FakeDatagram(b"x", dst=("10.78.7.7", 5000))
    service.handle_udp(stray)
    assert stray.unreachables == 1
    await service.close()
    transport.close()


# --- hostile input: the shape check before any parser, bounded parsing, per-peer shares --------


def pointer_chain_query(size: int) -> bytes:
    """The crafted query: one question whose name is a chain of pointers, each back to the
    previous one, padded with more such names: quadratic work for an unbounded parser."""
    msg = bytearray(struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0)) + b"\x01a\x00\x00\x01\x00\x01"
    while len(msg) + 2 <= size:
        msg += b"\xc0" + bytes([len(msg) - 2 if len(msg) < 258 else 12])
    return bytes(msg)


@pytest.mark.parametrize("size", [300, 1400, 9000])
async def test_crafted_queries_are_refused_before_any_parser(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails before the shape check: such a query went straight to dnslib's parser.
    def no_parser(data: bytes) -> DNSRecord:
        raise AssertionError("a parser saw a query of the wrong shape")

    monkeypatch.setattr(dns.dnswire, "parse", no_parser)
    answerer = DnsAnswerer(FakeUpstream(), VipAllocator(), clock=lambda: 0.0)
    data = pointer_chain_query(size)
    outcome = await answerer.answer(data, udp=True, peer=PEER_KEY)
    assert outcome.rcode == "MALFORMED" and outcome.reply is None
    assert outcome.malformed in ("bytes after the last record", "longer than 512 bytes")


# fmt: off
SHAPES = [  # (what, message, verdict)
    ("plain", query("example.test"), DnsVerdict.OK),
    ("edns", query("example.test", "AAAA", edns=1232, do=True), DnsVerdict.OK),
    ("short", b"\x00" * 11, DnsVerdict.SHORT),
    ("long", query("example.test") + b"\x00" * 600, DnsVerdict.LONG),
    ("response", DNSRecord.question("example.test").reply().pack(), DnsVerdict.RESPONSE),
    ("pointer", query("example.test")[:12] + b"\xc0\x0c\x00\x01\x00\x01", DnsVerdict.NAME),
    ("label type", query("example.test")[:12] + b"\x41a\x00\x00\x01\x00\x01", DnsVerdict.NAME),
    ("long name", query("x")[:12] + (b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01",
     DnsVerdict.NAME),
    ("cut", query("example.test")[:-1], DnsVerdict.TRUNCATED),
    ("trailing", query("example.test") + b"\x00", DnsVerdict.TRAILING),
    (
        "not opt",
        query("example.test")[:11]
        + b"\x01"
        + query("example.test")[12:]
        + b"\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00",
        DnsVerdict.ADDITIONAL,
    ),
]
# fmt: on


@pytest.mark.parametrize(("what", "data", "verdict"), SHAPES, ids=[s[0] for s in SHAPES])
def test_shape_check_transcript(what: str, data: bytes, verdict: DnsVerdict) -> None:
    shape = check_dns_query(data)
    assert shape.verdict == verdict, shape.refusal
    assert shape.steps <= len(data)
    if verdict == DnsVerdict.OK:
        assert dnswire.parse(data).q.qname == DNSRecord.parse(data).q.qname
        assert shape.qtype == DNSRecord.parse(data).q.qtype


def test_shape_check_reads_edns_and_client_subnet() -> None:
    q = DNSRecord.question("example.test")
    q.add_ar(EDNS0(udp_len=1400, flags="do", opts=[EDNSOption(8, b"\x00\x01\x18\x00\xc0\x00\x02")]))
    shape = check_dns_query(q.pack())
    assert shape.verdict == DnsVerdict.OK and shape.has_opt and shape.udp_size == 1400
    assert shape.ecs == b"\x00\x01\x18\x00\xc0\x00\x02"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_shape_check_work_is_at_most_one_step_per_byte(data: bytes) -> None:
    shape = check_dns_query(data)
    assert shape.steps <= len(data)


def response_with_names(names: list[bytes]) -> bytes:
    """A response whose answers are A records owned by the given wire-format names."""
    head = struct.pack("!6H", 1, 0x8180, 0, len(names), 0, 0)
    return head + b"".join(
        n + struct.pack("!HHIH", 1, 1, 60, 4) + b"\xc0\x00\x02\x01" for n in names
    )


def chained_names(count: int) -> list[bytes]:
    """A name, then names that each point at the one before: the last follows count - 1 hops."""
    names, offsets = [b"\x01a\x00"], [12]
    for _ in range(count - 1):
        offsets.append(offsets[-1] + len(names[-1]) + 14)
        names.append(struct.pack("!H", 0xC000 | offsets[-2]))
    return names


def test_bounded_parse_refuses_long_pointer_chains_and_names() -> None:
    with pytest.raises(DNSError, match="over 16 pointers"):
        dnswire.parse(response_with_names(chained_names(18)))
    assert len(dnswire.parse(response_with_names(chained_names(17))).rr) == 17
    long_name = b"".join(b"\x3f" + b"x" * 63 for _ in range(4)) + b"\x00"
    with pytest.raises(DNSError, match="longer than 255"):
        dnswire.parse(response_with_names([long_name]))
    with pytest.raises(DNSError, match="does not point back"):
        dnswire.parse(response_with_names([b"\xc0\x0c"]))  # to itself


def test_bounded_parse_bounds_the_work_of_a_whole_message() -> None:
    # 100 one-letter labels, then 4,000 answers each naming them through 16 hops: within the
    # per-name bounds, over the per-message one (an unbounded parser walks every name fully).
    labels = b"\x01a" * 100 + b"\x00"
    names = [labels] + [b"\xc0\x0c"] * 4000
    with pytest.raises(DNSError, match="too much work"):
        dnswire.parse(response_with_names(names))


def test_bounded_parse_agrees_with_dnslib_on_real_answers() -> None:
    edges = [RR("edge.example.test.", QTYPE.A, rdata=A(f"192.0.2.{i}")) for i in range(40)]
    cname = RR("www.example.test.", QTYPE.CNAME, rdata=CNAME("edge.example.test."))
    r = upstream_reply("www.example.test", "A", cname, *edges, auth=(SOA_RR,))
    r.add_auth(RR("example.test.", QTYPE.MX, rdata=MX("mail.example.test.")))
    data = r.pack()
    assert str(dnswire.parse(data)) == str(DNSRecord.parse(data))


async def test_hostile_upstream_answer_is_servfail() -> None:
    class Hostile(asyncio.DatagramProtocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: Any) -> None:
            # Our id and question, then a 100-label name and 4,000 records that point at it.
            question = data[12 : data.index(b"\x00", 12) + 5]
            target = 12 + len(question)
            names = [b"\x01a" * 100 + b"\x00"] + [struct.pack("!H", 0xC000 | target)] * 4000
            crafted = response_with_names(names)
            msg = data[:2] + b"\x81\x80\x00\x01" + crafted[6:12] + question + crafted[12:]
            self.transport.sendto(msg, addr)

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Hostile, local_addr=("127.0.0.1", 0))
    try:
        client = UpstreamClient([transport.get_extra_info("sockname")], timeout=1.0)
        answer = await client.lookup("example.test", QTYPE.A)
        assert answer.response is None and answer.rcode == RCODE.SERVFAIL
        assert "unparsable" in (answer.error or "")
    finally:
        transport.close()


async def test_upstream_cache_keeps_client_subnet_answers_apart(
    zone_server: tuple[ZoneResolver, int],
) -> None:
    # Fails when the cache key ignores EDNS client-subnet: the second subnet got the first's.
    zone, port = zone_server
    client = UpstreamClient([("127.0.0.1", port)])
    for subnet in (b"\x00\x01\x18\x00\xc0\x00\x02", b"\x00\x01\x18\x00\xc6\x33\x64"):
        for _ in range(2):
            request = DNSRecord.question("example.test", "MX")
            request.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(8, subnet)]))
            await client.forward(request.pack(), request)
    assert client.exchanges == 2 and len(zone.queries) == 2


class NeverAnswers(FakeUpstream):
    """An upstream where names under stuck.test never get an answer."""

    async def lookup(self, qname: str, qtype: int) -> UpstreamAnswer:
        if qname.endswith("stuck.test"):
            await asyncio.Event().wait()
        return await super().lookup(qname, qtype)


async def test_one_peers_unanswered_queries_do_not_take_another_peers_share(
    gateway: FakeGateway,
) -> None:
    # Fails with one global bound: the first peer's 1,024 stuck queries took every place.
    upstream = NeverAnswers()
    upstream.add("example.test", "A", upstream_reply("example.test", "A",
                 RR("example.test.", QTYPE.A, rdata=A("198.18.0.2"))))  # fmt: skip
    service = DnsService(gateway, upstream=upstream)  # type: ignore[arg-type]
    for i in range(dns.MAX_INFLIGHT):
        service.handle_udp(FakeDatagram(query(f"n{i}.stuck.test"), src_port=1000 + i % 60000))
    assert service.counts["overload"] == dns.MAX_INFLIGHT - service.peer_share
    assert service.peer_share == dns.PEER_INFLIGHT  # 1,024 sockets: a quarter is over 128
    other = FakeDatagram(query("example.test"))
    other.peer_public_key = bytes(32)
    other.peer_ip = "10.77.0.3"
    service.handle_udp(other)
    await until(lambda: other.replies, "the second peer's answer")
    assert DNSRecord.parse(other.replies[0]).header.rcode == RCODE.NOERROR
    await service.close()


async def test_tcp_query_longer_than_the_bound_is_refused_unread(
    gateway: FakeGateway, loopback: Any
) -> None:
    # Fails when the length is trusted: the service waits for 65,535 bytes, then "cut short".
    service = DnsService(gateway)
    (_c_reader, c_writer), theirs = await loopback()
    conn = FakeTcpConn(theirs)
    job = asyncio.create_task(service.handle_tcp(gateway.flow(conn, "dns")))
    c_writer.write(b"\xff\xff" + b"x" * 100)
    await asyncio.wait_for(job, 2)
    closed = [e for e in gateway.events if isinstance(e, TcpClosed)]
    assert closed[0].error == "query of 65535 bytes (at most 512)"


# --- one peer's lookups are its own: PTR, TCP, UDP; the pool's shares -------------------------


def ptr_query(vip: str) -> bytes:
    return query(".".join(reversed(vip.split("."))) + ".in-addr.arpa", "PTR")


async def test_ptr_answers_only_the_peers_given_the_vip(answerer: DnsAnswerer) -> None:
    # Fails before: any peer's PTR for a VIP named the host another peer had looked up.
    vip = str((await ask(answerer, query("example.test"), peer=PEER_KEY)).rr[0].rdata)
    theirs = await ask(answerer, ptr_query(vip), peer=OTHER_KEY)
    assert theirs.header.rcode == RCODE.NXDOMAIN and not theirs.rr
    mine = await ask(answerer, ptr_query(vip), peer=PEER_KEY)
    assert [str(rr.rdata) for rr in mine.rr] == ["example.test."]
    # Once the other peer asks the name itself it is given the same VIP, and its PTR answers.
    assert str((await ask(answerer, query("example.test"), peer=OTHER_KEY)).rr[0].rdata) == vip
    again = await ask(answerer, ptr_query(vip), peer=OTHER_KEY)
    assert [str(rr.rdata) for rr in again.rr] == ["example.test."]


async def test_a_past_the_peers_vip_share_is_servfail(upstream: FakeUpstream) -> None:
    # Fails before: one peer's names could take the whole pool (no share).
    real = RR("www.example.test.", QTYPE.A, ttl=300, rdata=A("198.18.0.2"))
    upstream.add("www.example.test", "A", upstream_reply("www.example.test", "A", real))
    answerer = DnsAnswerer(upstream, VipAllocator(peer_share=1), clock=lambda: 1000.0)
    assert (await answerer.answer(query("example.test"), udp=True, peer=PEER_KEY)).answers
    over = await answerer.answer(query("www.example.test"), udp=True, peer=PEER_KEY)
    assert over.rcode == "SERVFAIL" and not over.answers
    assert over.error is not None and over.error.startswith(Refusal.SHARE.value)
    other = await answerer.answer(query("www.example.test"), udp=True, peer=OTHER_KEY)
    assert other.rcode == "NOERROR" and other.answers  # another peer is not held back


async def test_vip_tcp_and_udp_answer_only_the_peer_given_it(
    gateway: FakeGateway, loopback: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails before: any peer could connect to (and send to) a VIP another peer had resolved.
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    transport, uport = await udp_echo()
    dns_service = DnsService(gateway)
    gateway.resolver = dns_service

    async def loopback_resolve(hostname: str) -> list[str]:
        return ["127.0.0.2"]

    monkeypatch.setattr(dns_service, "resolve", loopback_resolve)
    service = VipService(gateway, dns_service)
    outcome = await dns_service.answerer.answer(query("example.test"), udp=True, peer=PEER_KEY)
    (vip,) = outcome.answers

    (_r, _w), theirs = await loopback()
    stranger = FakeTcpConn(theirs, dst=(vip, port), conn_id=21, peer=OTHER_KEY)
    await asyncio.wait_for(service.handle_tcp(gateway.flow(stranger, "vip")), 5)
    assert stranger.state == "rejected"
    refused = [e for e in gateway.events if isinstance(e, TcpClosed)]
    assert [(e.conn_id, e.hostname, e.error) for e in refused] == [
        (21, None, Refusal.VIP_NOT_GIVEN.says())
    ]
    (c_reader, c_writer), theirs = await loopback()
    flow = gateway.flow(FakeTcpConn(theirs, dst=(vip, port), conn_id=22), "vip")
    await asyncio.wait_for(service.handle_tcp(flow), 5)
    c_writer.write(b"ping")
    assert await asyncio.wait_for(c_reader.read(100), 5) == b"ping"
    c_writer.write_eof()
    await asyncio.wait_for(flow.ended(), 5)

    other = FakeDatagram(b"hello", dst=(vip, uport), peer=OTHER_KEY)
    service.handle_udp(other)
    assert other.unreachables == 1 and service.counts["vip_not_given"] == 2
    mine = FakeDatagram(b"hello", dst=(vip, uport))
    service.handle_udp(mine)
    await until(lambda: bool(mine.replies), "the echo through the VIP")
    assert other.replies == []
    await service.close()
    await dns_service.close()
    transport.close()
    server.close()


async def test_vip_udp_resolving_places_are_shared_per_peer(gateway: FakeGateway) -> None:
    # Fails before: 256 places for everyone; one peer's datagrams to names whose servers never
    # answer took all of them, and the other peer's first datagram was dropped.
    from unclaw_tui.services import vip as vip_module

    transport, port = await udp_echo()
    never = asyncio.Event()

    class SlowResolver:
        names = {"10.78.0.5": "silent.test", "10.78.0.6": "svc.test"}

        def hostname_for_vip(self, ip: str, peer: bytes) -> str | None:
            return self.names.get(ip)

        async def resolve(self, hostname: str) -> list[str]:
            if hostname == "silent.test":
                await never.wait()  # its servers never answer
            return ["127.0.0.2"]

    service = VipService(gateway, SlowResolver())  # type: ignore[arg-type]
    count = vip_module.MAX_UDP_RESOLVING + 44
    for i in range(count):
        service.handle_udp(FakeDatagram(b"?", dst=("10.78.0.5", 9), src_port=10_000 + i))
    assert len(service._resolving) == vip_module.PEER_UDP_RESOLVING
    assert service.counts["udp_dropped"] == count - vip_module.PEER_UDP_RESOLVING
    theirs = FakeDatagram(b"hello", dst=("10.78.0.6", port), peer=OTHER_KEY)
    service.handle_udp(theirs)
    await until(lambda: bool(theirs.replies), "the other peer's datagram relayed")
    await service.close()
    transport.close()


async def test_the_vip_map_is_encoded_and_written_off_the_loop(
    gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fails before: the whole map became a JSON document on the event loop (to_json: 130-190 ms
    # for 65,024 entries), once a second while names came in.
    import threading

    from unclaw_tui.services import vips as vip_store

    vips = VipAllocator()
    for i in range(5000):
        vips.allocate(f"{i}.wild.test", 1000.0, lambda ip: False, peer=bytes([i % 7]) * 32)
    on_loop: list[str] = []
    loop_thread = threading.current_thread()

    def watch(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is loop_thread:
                on_loop.append(name)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(VipAllocator, "to_json", watch("to_json", VipAllocator.to_json))
    monkeypatch.setattr(vip_store, "document", watch("document", vip_store.document))
    monkeypatch.setattr(vip_store, "encode", watch("encode", vip_store.encode))
    service = DnsService(gateway, vips=vips)
    vips.allocate("one-more.test", 1001.0, lambda ip: False, peer=PEER_KEY)
    service._save_soon()
    path = gateway.state.path / vip_store.VIPS_FILE
    await until(path.exists, "the map written", 15)
    await service.close()
    assert on_loop == []
    reloaded = VipAllocator()
    vip_store.load(gateway.state, reloaded)
    assert len(reloaded) == 5001
    assert stat.S_IMODE(os.stat(gateway.state.path / vip_store.VIPS_FILE).st_mode) == 0o600


async def test_a_new_name_is_written_soon_while_answer_times_wait(
    gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answer times alone are written at most once a minute; a new mapping within a second even
    # while the writer waits for those (fails before: it waited the minute out).
    from unclaw_tui.services import vips as vip_store

    monkeypatch.setattr(dns, "VIP_SAVE_INTERVAL", 0.0)
    service = DnsService(gateway)
    path = gateway.state.path / vip_store.VIPS_FILE
    await service._answer(query("example.test"), PEER_KEY, "10.77.0.2", udp=True)
    task = service._save_task
    await until(lambda: task is not None and task.done(), "the first write done")
    assert "example.test" in path.read_text()
    # Asked again: a renewal only, so the writer waits for the minute...
    await service._answer(query("example.test"), PEER_KEY, "10.77.0.2", udp=True)
    # ...and a new name is written at once all the same, the renewal with it.
    await service._answer(query("www.example.test"), PEER_KEY, "10.77.0.2", udp=True)
    await until(lambda: "www.example.test" in path.read_text(), "the new name written", 3)
    await service.close()


async def test_a_peers_share_is_a_quarter_of_the_upstream_sockets(gateway: FakeGateway) -> None:
    # Fails with a share above the sockets: a peer's stuck queries held every upstream socket
    # (under a 1,024-descriptor limit the budget gives DNS 112), and others' queries waited.
    upstream = NeverAnswers()
    upstream.max_sockets = 16
    service = DnsService(gateway, upstream=upstream)  # type: ignore[arg-type]
    for i in range(50):
        service.handle_udp(FakeDatagram(query(f"n{i}.stuck.test"), src_port=1000 + i))
    assert service.peer_share == 4 and service.counts["overload"] == 46
    await service.close()


def test_a_big_vip_map_is_written_less_often() -> None:
    # A wildcard domain grows the map; each write's encoding holds the interpreter lock (about
    # 0.4 s for a full pool), so the pause after it grows with it: writing takes at most a
    # 1/SAVE_DUTY share of the time.  Fails when the pause is a flat second.
    assert dns.save_pause(0.001) == dns.VIP_SAVE_INTERVAL
    assert dns.save_pause(0.4) == pytest.approx(0.4 * dns.SAVE_DUTY)
    assert 0.4 / (0.4 + dns.save_pause(0.4)) <= 1 / dns.SAVE_DUTY
