"""Load tools for the benchmarks, run as subprocesses inside the bench's namespaces.

    python -m bench.clients rr-server --port 7000          # 1 KiB request -> 1 KiB response
    python -m bench.clients rr-client HOST PORT --bind IP --seconds 5 --concurrency 8
    python -m bench.clients hold-server --port 7001        # accepts and holds connections
    python -m bench.clients hold-client HOST PORT --bind IP --count 3400 --hold 60
    python -m bench.clients dns-server --port 53           # A for any name, TTL 300
    python -m bench.clients dns-client SERVER --bind IP --count 300 --mode cached|cold
    python -m bench.clients tls-server --port 443 --ca-dir DIR
    python -m bench.clients tls-client HOST PORT --bind IP --sni NAME --cafile F --seconds 5
    python -m bench.clients handshakes GATEWAY PORT --peers peers.json --count 300
    python -m bench.clients churn-client HOST PORT --bind IP --count 3000  # open, 1 KiB, close
    python -m bench.clients dns-flood SERVER --bind IP --pattern crafted --rate 5 --seconds 30
    python -m bench.clients dns-probe SERVER --bind IP --seconds 15 --interval 0.05
    python -m bench.clients connect-probe HOST PORT --bind IP --seconds 15 --interval 0.05
    python -m bench.clients handshake-probe GATEWAY PORT --key K --gateway-key G --seconds 15

Servers print `ready` once bound and run until killed (a bench kills them by PID).  Clients
print one JSON object (the last line of stdout).  Every client loop is bounded in count and
time.  uvloop is used when installed, as the gateway does, so the tools cost as little CPU as
they can on a 2-core machine where they compete with the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import secrets
import socket
import ssl
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

REQUEST_SIZE = 1024
RESPONSE_SIZE = 1024
IO_TIMEOUT = 10.0
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
    + f"Content-Length: {RESPONSE_SIZE}\r\nConnection: close\r\n\r\n".encode()
    + bytes(RESPONSE_SIZE)
)


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _percentiles_ms(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_ms": None, "p99_ms": None}
    ordered = sorted(latencies)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": at(0.50), "p99_ms": at(0.99)}


# --- request/response: new TCP connections per second ----------------------------------------


async def rr_server(port: int) -> None:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readexactly(REQUEST_SIZE), IO_TIMEOUT)
            writer.write(bytes(RESPONSE_SIZE))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(conn, "0.0.0.0", port, backlog=4096)
    _ready()
    async with server:
        await server.serve_forever()


async def rr_client(
    host: str, port: int, bind: str, seconds: float, concurrency: int, max_conns: int
) -> dict[str, Any]:
    """`concurrency` workers, each: connect, send 1 KiB, read 1 KiB, close; again until time or
    the count runs out.  Latency is connect start to the last response byte."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = 0
    end = time.monotonic() + seconds
    request = bytes(REQUEST_SIZE)

    async def worker() -> None:
        nonlocal started
        while time.monotonic() < end and started < max_conns:
            started += 1
            t0 = time.monotonic()
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(bind, 0)), IO_TIMEOUT
                )
                writer.write(request)
                await asyncio.wait_for(reader.readexactly(RESPONSE_SIZE), IO_TIMEOUT)
                latencies.append(time.monotonic() - t0)
                # The server closes first: wait for its FIN, so that the TIME-WAIT stays on its
                # side.  Closing first here would leave one per connection in this namespace,
                # where the bound source ports run out and every later round slows down.
                await asyncio.wait_for(reader.read(1), IO_TIMEOUT)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            finally:
                if writer is not None:
                    writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    return {
        "conns": len(latencies),
        "seconds": elapsed,
        "rate": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "errors": errors,
        **_percentiles_ms(latencies),
    }


# --- idle connections held open ---------------------------------------------------------------


def hold_server(port: int, max_seconds: float) -> None:
    """Accept everything and keep it open, reading nothing (bounded by max_seconds)."""
    _raise_nofile()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)
    listener.settimeout(1.0)
    _ready()
    held: list[socket.socket] = []
    end = time.monotonic() + max_seconds
    while time.monotonic() < end:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            time.sleep(0.05)  # out of descriptors: let the bench notice the shortfall
            continue
        held.append(conn)


async def hold_client(
    host: str,
    port: int,
    bind: str,
    count: int,
    hold: float,
    concurrency: int,
    timeout: float = IO_TIMEOUT,
) -> dict[str, Any]:
    """Open `count` connections (at most `concurrency` connecting at once), print a `ready` JSON
    line when done, then hold them until stdin closes or `hold` seconds pass."""
    _raise_nofile()
    writers: list[asyncio.StreamWriter] = []
    errors: dict[str, int] = {}
    limit = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with limit:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(bind, 0)), timeout
                )
                writers.append(writer)
            except (OSError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    opened = {"opened": len(writers), "errors": errors, "seconds": time.monotonic() - t0}
    sys.stdout.write("ready " + json.dumps(opened) + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), hold)
    for writer in writers:
        writer.close()
    return opened


# --- DNS ----------------------------------------------------------------------------------------


def _under(name: str, suffix: str) -> bool:
    return bool(suffix) and (name == suffix or name.endswith("." + suffix))


async def dns_server(port: int, silent_suffix: str = "", uncached_suffix: str = "") -> None:
    """An A record (198.18.0.2) for any name -- so every domain is a wildcard domain -- with a
    TTL of 300, or of 0 for names under `uncached_suffix` (no resolver may cache them, so each
    query of one goes upstream again); no answer at all for names under `silent_suffix` (a
    server that never answers)."""
    from dnslib import QTYPE, RR, A, DNSRecord

    silent = silent_suffix.strip(".").lower()
    uncached = uncached_suffix.strip(".").lower()

    class Answer(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            try:
                request = DNSRecord.parse(data)
            except Exception:
                return
            name = str(request.q.qname).rstrip(".").lower()
            if _under(name, silent):
                return
            reply = request.reply()
            if request.q.qtype == QTYPE.A:
                ttl = 0 if _under(name, uncached) else 300
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=ttl, rdata=A("198.18.0.2")))
            self.transport.sendto(reply.pack(), addr)  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(Answer, local_addr=("0.0.0.0", port))
    _ready()
    try:
        await asyncio.Event().wait()
    finally:
        transport.close()


def dns_client(server: str, port: int, bind: str, count: int, mode: str) -> dict[str, Any]:
    """Sequential A queries: `cached` repeats one name (after a first query that warms every
    cache), `cold` asks a new name each time.  Bounded: 1 s per query, 3 tries."""
    from dnslib import DNSRecord

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, 0))
    sock.connect((server, port))
    sock.settimeout(1.0)
    run = secrets.token_hex(4)
    latencies: list[float] = []
    lost = 0
    answers: set[str] = set()

    def ask(name: str) -> float | None:
        nonlocal lost
        query = DNSRecord.question(name, "A")
        for _ in range(3):
            t0 = time.perf_counter()
            sock.send(query.pack())
            try:
                while True:
                    data = sock.recv(4096)
                    reply = DNSRecord.parse(data)
                    if reply.header.id == query.header.id:
                        break
            except TimeoutError:
                lost += 1
                continue
            elapsed = time.perf_counter() - t0
            answers.update(str(rr.rdata) for rr in reply.rr)
            return elapsed
        return None

    if mode == "cached":
        ask(f"cached-{run}.bench.test")
    for i in range(count):
        name = f"cached-{run}.bench.test" if mode == "cached" else f"c{i}-{run}.bench.test"
        elapsed = ask(name)
        if elapsed is not None:
            latencies.append(elapsed)
    sock.close()
    return {
        "queries": len(latencies),
        "lost": lost,
        "answers": sorted(answers)[:5],
        **_percentiles_ms(latencies),
    }


# --- TLS ----------------------------------------------------------------------------------------


async def tls_server(port: int, ca_dir: str) -> None:
    """HTTPS on `port` with a leaf for whatever SNI the client sends, from the bench's own CA
    (the gateway is told to trust it with SSL_CERT_FILE); every request gets 1 KiB."""
    from unclaw_tui.services.ca import CertificateAuthority

    ca = CertificateAuthority.load(Path(ca_dir))
    default = ca.server_context("bench.test")

    def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name:
            sslobj.context = ca.server_context(name)

    default.sni_callback = pick  # type: ignore[assignment]
    default.set_alpn_protocols(["http/1.1"])

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
            writer.write(HTTP_RESPONSE)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(conn, "0.0.0.0", port, ssl=default, backlog=1024)
    _ready()
    async with server:
        await server.serve_forever()


async def tls_client(
    host: str, port: int, bind: str, sni: str, cafile: str, seconds: float, concurrency: int
) -> dict[str, Any]:
    """New connection per request: TCP connect + TLS handshake (timed: connect start to
    handshake done), GET, 1 KiB response, close."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    handshakes: list[float] = []
    done = 0
    errors: dict[str, int] = {}
    end = time.monotonic() + seconds
    request = f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode()

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < end:
            t0 = time.monotonic()
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        host, port, ssl=ctx, server_hostname=sni, local_addr=(bind, 0)
                    ),
                    IO_TIMEOUT,
                )
                handshakes.append(time.monotonic() - t0)
                writer.write(request)
                body = await asyncio.wait_for(reader.read(), IO_TIMEOUT)
                if not body.startswith(b"HTTP/1.1 200") or len(body) < RESPONSE_SIZE:
                    raise ConnectionError("short response")
                done += 1
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            finally:
                if writer is not None:
                    writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    hs = _percentiles_ms(handshakes)
    return {
        "requests": done,
        "seconds": elapsed,
        "rate": done / elapsed if elapsed > 0 else 0.0,
        "handshake_p50_ms": hs["p50_ms"],
        "handshake_p99_ms": hs["p99_ms"],
        "errors": errors,
    }


# --- WireGuard handshakes from many peers -----------------------------------------------------


def handshakes(
    gateway: str, port: int, peers_file: str, count: int, rate: float, max_seconds: float
) -> dict[str, Any]:
    """One initiation from each of `count` peers (keys from a JSON list of
    {private_key, preshared_key}), paced at `rate` per second; counts the responses (type 2)
    and cookie replies (type 3) that come back within max_seconds."""
    from unclaw_tui.engine.noise import HandshakeCore, unb64

    data = json.loads(Path(peers_file).read_text())
    gateway_key = unb64(data["gateway_public_key"])
    peers = data["peers"][:count]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((gateway, port))
    sock.setblocking(False)
    counts = {1: 0, 2: 0, 3: 0, 4: 0}

    def receive() -> None:
        while True:
            try:
                msg = sock.recv(2048)
            except BlockingIOError:
                return
            if msg:
                counts[msg[0]] = counts.get(msg[0], 0) + 1

    t0 = time.monotonic()
    for i, peer in enumerate(peers):
        core = HandshakeCore(unb64(peer["private_key"]))
        core.add_peer(gateway_key, unb64(peer["preshared_key"]))
        sock.send(core.create_initiation(gateway_key, 0x1000 + i, time.monotonic()))
        receive()
        pause = t0 + (i + 1) / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    sent_in = time.monotonic() - t0
    end = t0 + max_seconds
    while counts[2] + counts[3] < len(peers) and time.monotonic() < end:
        time.sleep(0.02)
        receive()
    sock.close()
    return {
        "sent": len(peers),
        "responses": counts[2],
        "cookie_replies": counts[3],
        "send_seconds": sent_in,
        "seconds": time.monotonic() - t0,
    }


# --- isolation: one peer's abuse (or its ordinary twin) and the other peer's probes -------------

PROBE_TIMEOUT = 3.0  # a probe that gets no usable answer in this long counts as this long
TCP_FLOOD_CONCURRENCY = 8  # DNS-over-TCP queries of dns-flood in flight at once
WILDCARD_DOMAIN = "wild.bench.test"
UNCACHED_DOMAIN = "uncached.bench.test"  # dns-server answers it with TTL 0 (in bench.isolation)
UNCACHED_NAMES = 1000


def crafted_query(size: int, labels: int = 2, ident: int = 0x1234) -> bytes:
    """A DNS query of at most `size` bytes built to make an unbounded parser work hard.

    Question k's name is `labels` one-letter labels followed by a compression pointer to
    question k-1's name, and the header announces every question: decoding question k walks k
    pointers and copies ~k*labels labels, so a parser that follows pointers to any depth and
    parses every announced question does O(n^2) work (issue 13 item 1: with dnslib about
    0.1 s for 1.4 KB, about 5 s for 9 KB)."""
    import struct

    body = bytearray()
    starts: list[int] = []
    while True:
        name = b"\x01a" * labels
        name += struct.pack("!H", 0xC000 | starts[-1]) if starts else b"\x00"
        question = name + struct.pack("!HH", 1, 1)  # A, IN
        if 12 + len(body) + len(question) > size:
            break
        starts.append(12 + len(body))
        body += question
    header = struct.pack("!HHHHHH", ident, 0x0100, len(starts), 0, 0, 0)
    return header + bytes(body)


def padded_query(name: str, size: int, ident: int = 0x1234) -> bytes:
    """An ordinary A query for `name`, padded to `size` bytes with the EDNS(0) Padding option
    (RFC 7830): the same bytes on the wire as a crafted query, none of its cost."""
    from dnslib import EDNS0, DNSRecord, EDNSOption

    query = DNSRecord.question(name, "A")
    query.header.id = ident
    bare = len(query.pack()) + 11 + 4  # the OPT record and the option's own header
    query.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(12, bytes(max(0, size - bare)))]))
    return query.pack()


FLOOD_PATTERNS = {
    # pattern: (transport, what each query is)
    "crafted": ("udp", "a crafted query (compression-pointer chains), --size bytes"),
    "padded": ("udp", "an A query for one of 4 names, padded to --size bytes"),
    "crafted-tcp": ("tcp", "a crafted query over DNS-over-TCP, --size bytes, a connection each"),
    "padded-tcp": ("tcp", "an A query for one of 4 names over TCP, padded, a connection each"),
    "silent": ("udp", "an A query for a new name under --silent-suffix (never answered)"),
    "answered": (
        "udp",
        f"an A query for one of {UNCACHED_NAMES} names under {UNCACHED_DOMAIN}, in turn (the "
        "upstream answers them with TTL 0: each query goes upstream, no new name is made)",
    ),
    "wildcard": ("udp", f"an A query for a new name under {WILDCARD_DOMAIN}"),
    "same": ("udp", f"an A query for one of 4 names under {WILDCARD_DOMAIN}"),
}


def _reply_kind(data: bytes) -> str:
    """A reply's outcome from its header alone (the flood must not spend its CPU on parsing)."""
    if len(data) < 12:
        return "short"
    rcode = data[3] & 0x0F
    answers = int.from_bytes(data[6:8], "big")
    if rcode == 0:
        return "answered" if answers else "empty"
    return {2: "servfail", 1: "formerr", 3: "nxdomain", 4: "notimp", 5: "refused"}.get(
        rcode, f"rcode{rcode}"
    )


async def dns_flood(
    server: str,
    port: int,
    bind: str,
    pattern: str,
    rate: float,
    seconds: float,
    warmup: float,
    size: int,
    silent_suffix: str,
) -> dict[str, Any]:
    """Queries of one pattern at `rate` per second until stdin closes or `seconds` pass; prints
    a `ready` line after `warmup` seconds (the steady state, e.g. upstream queries in flight),
    then the counts as JSON.  At most rate x seconds queries, each bounded in time."""
    transport_kind = FLOOD_PATTERNS[pattern][0]
    run = secrets.token_hex(3)
    loop = asyncio.get_running_loop()
    replies: dict[str, int] = {}
    tcp_errors: dict[str, int] = {}
    tcp_limit = asyncio.Semaphore(TCP_FLOOD_CONCURRENCY)
    tcp_tasks: set[asyncio.Task[None]] = set()
    skipped = 0

    def query(i: int) -> bytes:
        ident = i & 0xFFFF
        if pattern in ("crafted", "crafted-tcp"):
            return crafted_query(size, ident=ident)
        if pattern in ("padded", "padded-tcp"):
            return padded_query(f"n{i % 4}-{run}.{WILDCARD_DOMAIN}", size, ident)
        from dnslib import DNSRecord

        name = {
            "silent": f"s{i}-{run}.{silent_suffix.strip('.')}",
            "answered": f"a{i % UNCACHED_NAMES}-{run}.{UNCACHED_DOMAIN}",
            "wildcard": f"w{i}-{run}.{WILDCARD_DOMAIN}",
            "same": f"n{i % 4}-{run}.{WILDCARD_DOMAIN}",
        }[pattern]
        q = DNSRecord.question(name, "A")
        q.header.id = ident
        return q.pack()

    class Replies(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            kind = _reply_kind(data)
            replies[kind] = replies.get(kind, 0) + 1

    async def over_tcp(data: bytes) -> None:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(server, port, local_addr=(bind, 0)), IO_TIMEOUT
            )
            writer.write(len(data).to_bytes(2, "big") + data)
            length = int.from_bytes(
                await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT), "big"
            )
            reply = await asyncio.wait_for(reader.readexactly(length), IO_TIMEOUT)
            kind = _reply_kind(reply)
            replies[kind] = replies.get(kind, 0) + 1
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            tcp_errors[type(exc).__name__] = tcp_errors.get(type(exc).__name__, 0) + 1
        finally:
            tcp_limit.release()
            if writer is not None:
                writer.close()

    udp, _ = await loop.create_datagram_endpoint(
        Replies, local_addr=(bind, 0), remote_addr=(server, port)
    )
    stop = loop.run_in_executor(None, sys.stdin.read)
    t0 = time.monotonic()
    end = t0 + seconds
    ready_at: float | None = t0 + warmup
    sent = 0
    limit = int(rate * seconds)
    while sent < limit and not stop.done() and time.monotonic() < end:
        now = time.monotonic()
        due = min(limit, int((now - t0) * rate) + 1)
        while sent < due:
            data = query(sent)
            sent += 1
            if transport_kind == "udp":
                udp.sendto(data)
            elif tcp_limit.locked():
                skipped += 1  # the gateway is not taking them: do not pile up connections
            else:
                await tcp_limit.acquire()
                task = asyncio.create_task(over_tcp(data))
                tcp_tasks.add(task)
                task.add_done_callback(tcp_tasks.discard)
        if ready_at is not None and now >= ready_at:
            _ready_line({"sent": sent})
            ready_at = None
        # Short naps at low rates, so that a closed stdin is noticed soon.
        next_due = min(t0 + (sent + 1) / rate, end, time.monotonic() + 0.2)
        await asyncio.sleep(max(0.0, next_due - time.monotonic()))
    if ready_at is not None:
        _ready_line({"sent": sent})
    # The rate's worth of queries is sent; hold on (answers still arriving) until told to stop.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(stop), max(0.0, end - time.monotonic()))
    elapsed = time.monotonic() - t0
    for task in list(tcp_tasks):
        task.cancel()
    udp.close()
    return {
        "pattern": pattern,
        "sent": sent,
        "skipped": skipped,
        "seconds": elapsed,
        "rate": sent / elapsed if elapsed > 0 else 0.0,
        "replies": replies,
        "tcp_errors": tcp_errors,
    }


def _ready_line(info: dict[str, Any]) -> None:
    sys.stdout.write("ready " + json.dumps(info) + "\n")
    sys.stdout.flush()


async def churn_client(
    host: str, port: int, bind: str, count: int, hold: float, concurrency: int, timeout: float
) -> dict[str, Any]:
    """The ordinary twin of hold-client: the same `count` connections opened at the same
    concurrency, each a 1 KiB request and response (to rr-server) and closed; then a `ready`
    line and, like hold-client, wait for stdin to close (or `hold` seconds)."""
    done = 0
    errors: dict[str, int] = {}
    limit = asyncio.Semaphore(concurrency)
    request = bytes(REQUEST_SIZE)

    async def one() -> None:
        nonlocal done
        async with limit:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(bind, 0)), timeout
                )
                writer.write(request)
                await asyncio.wait_for(reader.readexactly(RESPONSE_SIZE), timeout)
                await asyncio.wait_for(reader.read(1), timeout)  # the server's FIN: see rr-client
                done += 1
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            finally:
                if writer is not None:
                    writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    result = {"opened": done, "errors": errors, "seconds": time.monotonic() - t0}
    _ready_line(result)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), hold)
    return result


def _probe_summary(
    latencies: list[float], failures: dict[str, int], timeout: float, prefix: str = ""
) -> dict[str, Any]:
    """Percentiles over every probe, a failed one counted as `timeout` (it did not work, and a
    percentile over the successes alone would hide that), and over the successes alone."""
    every = latencies + [timeout] * sum(failures.values())
    all_pct = _percentiles_ms(every)
    ok_pct = _percentiles_ms(latencies)
    return {
        f"{prefix}probes": len(every),
        f"{prefix}ok": len(latencies),
        f"{prefix}failures": failures,
        f"{prefix}p50_ms": all_pct["p50_ms"],
        f"{prefix}p99_ms": all_pct["p99_ms"],
        f"{prefix}ok_p50_ms": ok_pct["p50_ms"],
        f"{prefix}ok_p99_ms": ok_pct["p99_ms"],
        f"{prefix}max_ms": max(every) * 1000 if every else None,
        # Every probe's time (a failure as `timeout`), so rounds of one figure can be pooled.
        f"{prefix}samples_ms": [round(x * 1000, 3) for x in every],
    }


def _pace(t0: float, i: int, interval: float) -> None:
    """Sleep until the i-th slot (a late probe does not queue up more behind it)."""
    pause = t0 + i * interval - time.monotonic()
    if pause > 0:
        time.sleep(pause)


def dns_probe(
    server: str, port: int, bind: str, seconds: float, interval: float, timeout: float
) -> dict[str, Any]:
    """A new name every `interval` (so each goes to the upstream), one try each: a probe works
    when an A record comes back within `timeout`."""
    from dnslib import DNSRecord

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, 0))
    sock.connect((server, port))
    run = secrets.token_hex(3)
    latencies: list[float] = []
    failures: dict[str, int] = {}
    t0 = time.monotonic()
    i = 0
    while time.monotonic() < t0 + seconds and i < int(seconds / interval) + 1:
        query = DNSRecord.question(f"v{i}-{run}.victim.bench.test", "A")
        start = time.perf_counter()
        sock.send(query.pack())
        why = "lost"
        while (left := timeout - (time.perf_counter() - start)) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(4096)
            except TimeoutError:
                break
            except OSError as exc:  # e.g. ICMP unreachable
                why = type(exc).__name__
                break
            if len(data) >= 2 and data[:2] == query.pack()[:2]:
                why = _reply_kind(data)
                break
        if why == "answered":
            latencies.append(time.perf_counter() - start)
        else:
            failures[why] = failures.get(why, 0) + 1
        i += 1
        _pace(t0, i, interval)
    sock.close()
    return _probe_summary(latencies, failures, timeout)


def connect_probe(
    host: str, port: int, bind: str, seconds: float, interval: float, timeout: float
) -> dict[str, Any]:
    """A new TCP connection every `interval` to rr-server: connect (timed: the connect time),
    1 KiB request, 1 KiB response (timed from the connect's start: the exchange time), wait for
    the server's FIN, close.  Failed probes count as `timeout`."""
    connects: list[float] = []
    exchanges: list[float] = []
    failures: dict[str, int] = {}
    request = bytes(REQUEST_SIZE)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() < t0 + seconds and i < int(seconds / interval) + 1:
        start = time.perf_counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.bind((bind, 0))
            sock.connect((host, port))
            connected = time.perf_counter() - start
            sock.sendall(request)
            got = 0
            while got < RESPONSE_SIZE:
                chunk = sock.recv(RESPONSE_SIZE - got)
                if not chunk:
                    raise ConnectionError("short response")
                got += len(chunk)
            connects.append(connected)
            exchanges.append(time.perf_counter() - start)
            sock.recv(1)  # the server's FIN (see rr-client)
        except OSError as exc:
            failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
        finally:
            sock.close()
        i += 1
        _pace(t0, i, interval)
    out = _probe_summary(connects, failures, timeout)
    exchange = _percentiles_ms(exchanges)
    return {**out, "exchange_p50_ms": exchange["p50_ms"], "exchange_p99_ms": exchange["p99_ms"]}


def handshake_probe(
    gateway: str,
    port: int,
    private_key: str,
    preshared_key: str,
    gateway_key: str,
    seconds: float,
    interval: float,
    timeout: float,
) -> dict[str, Any]:
    """A fresh WireGuard handshake every `interval` from one peer's key (HandshakeCore, the
    gateway's own implementation, as initiator): the time from the initiation to the gateway's
    response.  A cookie reply (the gateway under load) is taken and the initiation sent again
    with its mac2, as wireguard-go does; that time counts too."""
    from unclaw_tui.engine.noise import HandshakeCore, unb64

    gw_key = unb64(gateway_key)
    core = HandshakeCore(unb64(private_key))
    core.add_peer(gw_key, unb64(preshared_key) if preshared_key else None)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((gateway, port))
    latencies: list[float] = []
    failures: dict[str, int] = {}
    cookies = 0
    t0 = time.monotonic()
    i = 0
    while time.monotonic() < t0 + seconds and i < int(seconds / interval) + 1:
        index = secrets.randbits(32)
        msg = core.create_initiation(gw_key, index, time.monotonic())
        start = time.perf_counter()
        sock.send(msg)
        why = "lost"
        while (left := timeout - (time.perf_counter() - start)) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                break
            except OSError as exc:
                why = type(exc).__name__
                break
            if len(data) >= 12 and data[0] == 2 and data[8:12] == msg[4:8]:
                why = "ok"
                break
            if len(data) >= 8 and data[0] == 3 and data[4:8] == msg[4:8]:
                cookies += 1
                try:
                    core.consume_cookie_reply(data, time.monotonic())
                except Exception:  # a cookie we cannot use: keep waiting for a response
                    continue
                index = secrets.randbits(32)
                msg = core.create_initiation(gw_key, index, time.monotonic())
                sock.send(msg)
        if why == "ok":
            latencies.append(time.perf_counter() - start)
        else:
            failures[why] = failures.get(why, 0) + 1
        i += 1
        _pace(t0, i, interval)
    sock.close()
    return {**_probe_summary(latencies, failures, timeout), "cookie_replies": cookies}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind in ("rr-server", "hold-server", "dns-server", "tls-server"):
        p = kinds.add_parser(kind)
        p.add_argument("--port", type=int, required=True)
        if kind == "hold-server":
            p.add_argument("--max-seconds", type=float, default=900)
        if kind == "tls-server":
            p.add_argument("--ca-dir", required=True)
        if kind == "dns-server":
            p.add_argument("--silent-suffix", default="", help="never answer names under it")
            p.add_argument("--uncached-suffix", default="", help="answer with TTL 0 under it")
    p = kinds.add_parser("rr-client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bind", required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-conns", type=int, default=200_000)
    for kind in ("hold-client", "churn-client"):  # the same knobs: churn is hold's ordinary twin
        p = kinds.add_parser(kind)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--bind", required=True)
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--hold", type=float, default=120)
        p.add_argument("--concurrency", type=int, default=200)
        p.add_argument("--timeout", type=float, default=IO_TIMEOUT, help="per connection")
    p = kinds.add_parser("dns-client")
    p.add_argument("server")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--bind", required=True)
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--mode", choices=("cached", "cold"), required=True)
    p = kinds.add_parser("tls-client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bind", required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=4)
    p = kinds.add_parser("handshakes")
    p.add_argument("gateway")
    p.add_argument("port", type=int)
    p.add_argument("--peers", required=True)
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--max-seconds", type=float, default=30)
    p = kinds.add_parser("dns-flood")
    p.add_argument("server")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--bind", required=True)
    p.add_argument("--pattern", choices=sorted(FLOOD_PATTERNS), required=True)
    p.add_argument("--rate", type=float, required=True, help="queries per second")
    p.add_argument("--seconds", type=float, default=60, help="the most it runs")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before `ready`")
    p.add_argument("--size", type=int, default=1392, help="crafted/padded query bytes")
    p.add_argument("--silent-suffix", default="noanswer.bench.test")
    for kind in ("dns-probe", "connect-probe", "handshake-probe"):
        p = kinds.add_parser(kind)
        p.add_argument("target")
        p.add_argument("port", type=int)
        if kind == "handshake-probe":
            p.add_argument("--key", required=True, help="the probing peer's private key")
            p.add_argument("--psk", default="", help="its preshared key")
            p.add_argument("--gateway-key", required=True, help="the gateway's public key")
        else:
            p.add_argument("--bind", required=True)
        p.add_argument("--seconds", type=float, default=15)
        p.add_argument("--interval", type=float, default=0.05)
        p.add_argument("--timeout", type=float, default=PROBE_TIMEOUT)
    args = parser.parse_args(argv)

    out: Any = None
    if args.kind == "rr-server":
        _run(rr_server(args.port))
    elif args.kind == "hold-server":
        hold_server(args.port, args.max_seconds)
    elif args.kind == "dns-server":
        _run(dns_server(args.port, args.silent_suffix, args.uncached_suffix))
    elif args.kind == "tls-server":
        _run(tls_server(args.port, args.ca_dir))
    elif args.kind == "rr-client":
        out = _run(
            rr_client(
                args.host, args.port, args.bind, args.seconds, args.concurrency, args.max_conns
            )
        )
    elif args.kind == "hold-client":
        out = _run(
            hold_client(
                args.host, args.port, args.bind, args.count, args.hold, args.concurrency,
                args.timeout,
            )
        )  # fmt: skip
    elif args.kind == "dns-client":
        out = dns_client(args.server, args.port, args.bind, args.count, args.mode)
    elif args.kind == "tls-client":
        out = _run(
            tls_client(
                args.host, args.port, args.bind, args.sni, args.cafile, args.seconds,
                args.concurrency,
            )
        )  # fmt: skip
    elif args.kind == "churn-client":
        out = _run(
            churn_client(
                args.host, args.port, args.bind, args.count, args.hold, args.concurrency,
                args.timeout,
            )
        )  # fmt: skip
    elif args.kind == "dns-flood":
        out = _run(
            dns_flood(
                args.server, args.port, args.bind, args.pattern, args.rate, args.seconds,
                args.warmup, args.size, args.silent_suffix,
            )
        )  # fmt: skip
    elif args.kind == "dns-probe":
        out = dns_probe(
            args.target, args.port, args.bind, args.seconds, args.interval, args.timeout
        )
    elif args.kind == "connect-probe":
        out = connect_probe(
            args.target, args.port, args.bind, args.seconds, args.interval, args.timeout
        )
    elif args.kind == "handshake-probe":
        out = handshake_probe(
            args.target, args.port, args.key, args.psk, args.gateway_key, args.seconds,
            args.interval, args.timeout,
        )  # fmt: skip
    else:
        out = handshakes(
            args.gateway, args.port, args.peers, args.count, args.rate, args.max_seconds
        )
    if out is not None:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
