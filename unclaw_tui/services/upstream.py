"""The upstream DNS client: what the gateway itself asks the operator's resolvers.

Each question goes to the configured servers in turn (`--upstream-dns`, else the nameservers of
/etc/resolv.conf) over UDP from a fresh random port with a random id, and again over TCP when
the UDP answer is truncated. An answer only counts if its id and question match ours. A server
that fails (no answer, refused, SERVFAIL, an unusable answer) passes the question to the next
one; the whole question is bounded by `timeout` (2 s) in total, split between the servers still
to try, so a dead upstream means SERVFAIL in 2 s, never a hang.

Answers (positive, and negative ones with an SOA) are cached by their TTL, and concurrent
identical questions share one upstream exchange. When every server fails, an answer whose TTL
ran out less than a day ago is served stale, with a 30 s TTL (RFC 8767): names the peers
already use keep working while the upstream is away, and the event says so.

Each exchange holds one socket (UDP, then TCP if truncated) and at most `max_sockets` are in
flight at once (the gateway sets it from its descriptor budget, budget.py): past it a question
waits for a socket within its own time bound, so queries, whoever sends them, cannot take the
descriptors the peers' flows and the gateway's own work need.

The egress policy does not apply to these servers: the operator configured them (and the
default, /etc/resolv.conf, is often a loopback address the policy refuses to peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from dnslib import EDNS0, QTYPE, RCODE, DNSError, DNSQuestion, DNSRecord

from unclaw_tui.services import dnswire
from unclaw_tui.services.base import lru_put

Server = tuple[str, int]

UPSTREAM_TIMEOUT = 2.0  # seconds for one question, all servers together
EDNS_PAYLOAD = 1232  # what we offer upstream (the DNS flag day 2020 value)
MAX_CACHE_ENTRIES = 10_000
MAX_TTL = 3600  # cap, so a bad upstream cannot pin an answer for days
MAX_NEGATIVE_TTL = 300
STALE_MAX_AGE = 86_400.0  # serve-stale (RFC 8767): how long past its TTL an answer may be used
STALE_TTL = 30  # the TTL a stale answer is given (RFC 8767 4: 30 s)
MAX_SOCKETS = 1024  # exchanges in flight at once, until the gateway's budget says otherwise

_OPT = QTYPE.OPT
_ECS = 8  # the EDNS client-subnet option


def resolv_conf_servers(path: Path = Path("/etc/resolv.conf")) -> list[Server]:
    """The `nameserver` lines of resolv.conf, port 53; [] if none or unreadable."""
    servers: list[Server] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return servers
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                servers.append((str(ipaddress.ip_address(parts[1])), 53))
    return servers


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """The outcome of one question: the upstream's response, or None and SERVFAIL."""

    response: DNSRecord | None
    rcode: int
    ms: float | None  # None when it came from the cache
    cached: bool = False
    error: str | None = None


def _answer_ttl(response: DNSRecord) -> float:
    """How long a response may be cached: its smallest TTL; for a negative answer the SOA's
    minimum (RFC 2308); 0 when it must not be cached."""
    rcode = response.header.rcode
    if rcode == RCODE.NOERROR and response.rr:
        return float(min(MAX_TTL, *(rr.ttl for rr in response.rr)))
    if rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
        for rr in response.auth:
            if rr.rtype == QTYPE.SOA:
                return float(min(MAX_NEGATIVE_TTL, rr.ttl, rr.rdata.times[-1]))
    return 0.0


class DnsCache:
    """Responses by key, kept for their TTL; time is a parameter. A hit comes back with its
    TTLs lowered by the time it spent here, as a resolver's cache would answer."""

    def __init__(self, max_entries: int = MAX_CACHE_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[bytes, float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, response: DNSRecord, now: float) -> None:
        ttl = _answer_ttl(response)
        if ttl <= 0:
            return
        lru_put(self._entries, key, (response.pack(), now, now + ttl), self.max_entries)

    def get(self, key: Hashable, now: float, *, stale: bool = False) -> DNSRecord | None:
        """A fresh answer (TTLs lowered by its age here), or None. `stale`: for when the
        upstream cannot be reached (RFC 8767), an answer past its TTL by less than
        STALE_MAX_AGE too, with every TTL at most STALE_TTL."""
        hit = self._entries.get(key)
        if hit is None:
            return None
        packed, stored, expires = hit
        if now >= expires + STALE_MAX_AGE:
            del self._entries[key]
            return None
        if now >= expires and not stale:
            return None  # kept a while for stale use
        response = dnswire.parse(packed)
        age = int(now - stored)
        for rr in (*response.rr, *response.auth, *response.ar):
            if rr.rtype != _OPT:
                rr.ttl = min(rr.ttl, STALE_TTL) if stale else max(0, rr.ttl - age)
        return response


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, accept: Callable[[bytes], bool]) -> None:
        self.accept = accept
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.done.done() and self.accept(data):
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # Connected socket: an ICMP port unreachable arrives here (the server is down).
        if not self.done.done():
            self.done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("socket closed"))


class _Unusable(Exception):
    """The server answered, but not with something we can pass on."""


class UpstreamClient:
    """Questions to the upstream servers, cached and coalesced (see the module docstring)."""

    def __init__(
        self,
        servers: list[Server],
        *,
        timeout: float = UPSTREAM_TIMEOUT,
        cache: DnsCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_sockets: int = MAX_SOCKETS,
    ) -> None:
        self.servers = list(servers)
        self.timeout = timeout
        self.cache = cache if cache is not None else DnsCache()
        self.clock = clock
        self._inflight: dict[Hashable, asyncio.Future[UpstreamAnswer]] = {}
        self.exchanges = 0  # questions that went upstream (not cached, not shared)
        self.limit_sockets(max_sockets)

    def limit_sockets(self, max_sockets: int) -> None:
        """At most this many exchanges hold a socket at once (set before any is in flight)."""
        if max_sockets < 1:
            raise ValueError("max_sockets must be at least 1")
        self.max_sockets = max_sockets
        self._sockets = asyncio.Semaphore(max_sockets)
        self.sockets_in_use = 0
        self.sockets_peak = 0  # the most in use at once

    async def lookup(self, qname: str, qtype: int) -> UpstreamAnswer:
        """Our own question (recursion desired, EDNS, no DNSSEC)."""
        key = ("lookup", qname.rstrip(".").lower(), qtype)
        request = DNSRecord(q=DNSQuestion(qname, qtype), ar=[EDNS0(udp_len=EDNS_PAYLOAD)])
        return await self._ask(key, request.pack(), qname, qtype)

    async def forward(self, query: bytes, request: DNSRecord) -> UpstreamAnswer:
        """A client's query, sent on unchanged but for its id; the response keeps our id
        (the caller puts the client's back)."""
        q = request.q
        h = request.header
        opts = [rr for rr in request.ar if rr.rtype == _OPT]
        do = any(rr.ttl & 0x8000 for rr in opts)
        # An answer tailored to the client's subnet (RFC 7871) is only for that subnet.
        subnet = b"".join(o.data for rr in opts for o in rr.rdata if o.code == _ECS)
        key = ("forward", str(q.qname).lower(), q.qtype, q.qclass, h.rd, h.cd, do, subnet)
        return await self._ask(key, query, str(q.qname), q.qtype)

    async def resolve_a(self, hostname: str) -> list[str]:
        """The hostname's IPv4 addresses (every A record of the answer, CNAMEs followed by the
        upstream); [] when it has none or the upstream failed."""
        answer = await self.lookup(hostname, QTYPE.A)
        if answer.response is None or answer.response.header.rcode != RCODE.NOERROR:
            return []
        return [str(rr.rdata) for rr in answer.response.rr if rr.rtype == QTYPE.A]

    # -- internals -------------------------------------------------------------------------

    async def _ask(self, key: Hashable, query: bytes, qname: str, qtype: int) -> UpstreamAnswer:
        cached = self.cache.get(key, self.clock())
        if cached is not None:
            return UpstreamAnswer(cached, cached.header.rcode, None, cached=True)
        shared = self._inflight.get(key)
        if shared is not None:
            return await asyncio.shield(shared)
        future: asyncio.Future[UpstreamAnswer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            answer = await self._exchange(query, qname, qtype)
            if answer.response is not None:
                self.cache.put(key, answer.response, self.clock())
            elif (stale := self.cache.get(key, self.clock(), stale=True)) is not None:
                answer = UpstreamAnswer(
                    stale,
                    stale.header.rcode,
                    None,
                    cached=True,
                    error=f"served stale: {answer.error}",
                )
            future.set_result(answer)
            return answer
        except BaseException as exc:
            # Those sharing the question were not cancelled themselves: they get a SERVFAIL.
            future.set_result(
                UpstreamAnswer(None, RCODE.SERVFAIL, None, error=_describe(exc) or "cancelled")
            )
            raise
        finally:
            del self._inflight[key]

    async def _exchange(self, query: bytes, qname: str, qtype: int) -> UpstreamAnswer:
        self.exchanges += 1
        started = self.clock()
        deadline = started + self.timeout
        errors: list[str] = []
        last: DNSRecord | None = None
        for index, server in enumerate(self.servers):
            left = deadline - self.clock()
            if left <= 0:
                break
            budget = left / (len(self.servers) - index)
            try:
                response = await asyncio.wait_for(
                    self._one_server(server, query, qname, qtype), budget
                )
            except TimeoutError:
                errors.append(f"{_fmt(server)}: no answer in {budget:.1f} s")
                continue
            except (OSError, EOFError, _Unusable, DNSError) as exc:
                errors.append(f"{_fmt(server)}: {_describe(exc)}")
                continue
            rcode = response.header.rcode
            if rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
                return UpstreamAnswer(response, rcode, (self.clock() - started) * 1000)
            last = response
            errors.append(f"{_fmt(server)}: {RCODE.get(rcode)}")
        if not self.servers:
            errors.append("no upstream DNS servers configured")
        ms = (self.clock() - started) * 1000
        error = "; ".join(errors)
        if last is not None:
            # Every server answered badly: pass the last answer on (SERVFAIL stays SERVFAIL).
            return UpstreamAnswer(last, last.header.rcode, ms, error=error)
        return UpstreamAnswer(None, RCODE.SERVFAIL, ms, error=error)

    async def _one_server(self, server: Server, query: bytes, qname: str, qtype: int) -> DNSRecord:
        ident = secrets.randbits(16)
        packet = struct.pack("!H", ident) + query[2:]
        want = (qname.rstrip(".").lower(), qtype)

        def matches(data: bytes) -> bool:
            return len(data) >= 12 and struct.unpack_from("!H", data)[0] == ident

        # Waiting here counts against the question's time bound (the caller's wait_for).
        async with self._sockets:
            self.sockets_in_use += 1
            self.sockets_peak = max(self.sockets_peak, self.sockets_in_use)
            try:
                return await _udp_then_tcp(server, packet, matches, want)
            finally:
                self.sockets_in_use -= 1


async def _udp_then_tcp(
    server: Server, packet: bytes, matches: Callable[[bytes], bool], want: tuple[str, int]
) -> DNSRecord:
    """One exchange with one server: one socket at a time (UDP, then TCP if truncated)."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(matches), remote_addr=server
    )
    try:
        transport.sendto(packet)
        data = await protocol.done
    finally:
        transport.close()
    response = _check(data, want)
    if response.header.tc:
        response = _check(await _tcp_exchange(server, packet, matches), want)
    return response


async def _tcp_exchange(server: Server, packet: bytes, matches: Callable[[bytes], bool]) -> bytes:
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(struct.pack("!H", len(packet)) + packet)
        await writer.drain()
        while True:  # a server may send something else first; skip what is not ours
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            data = await reader.readexactly(length)
            if matches(data):
                return data
    except asyncio.IncompleteReadError:
        raise EOFError("connection closed before the answer") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _check(data: bytes, want: tuple[str, int]) -> DNSRecord:
    try:
        response = dnswire.parse(data)
    except (DNSError, ValueError, IndexError, struct.error) as exc:
        raise _Unusable(f"unparsable answer ({exc})") from None
    if not response.header.qr:
        raise _Unusable("not a response")
    got = [(str(q.qname).rstrip(".").lower(), q.qtype) for q in response.questions]
    if got != [want]:
        raise _Unusable("answer to another question")
    return response


def _fmt(server: Server) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "port unreachable"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
