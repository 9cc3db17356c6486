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
    host: str, port: int, bind: str, count: int, hold: float, concurrency: int
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
                    asyncio.open_connection(host, port, local_addr=(bind, 0)), IO_TIMEOUT
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


async def dns_server(port: int) -> None:
    from dnslib import QTYPE, RR, A, DNSRecord

    class Answer(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            try:
                request = DNSRecord.parse(data)
            except Exception:
                return
            reply = request.reply()
            if request.q.qtype == QTYPE.A:
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=300, rdata=A("198.18.0.2")))
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
    p = kinds.add_parser("rr-client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bind", required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-conns", type=int, default=200_000)
    p = kinds.add_parser("hold-client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--bind", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--hold", type=float, default=120)
    p.add_argument("--concurrency", type=int, default=200)
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
    args = parser.parse_args(argv)

    out: Any = None
    if args.kind == "rr-server":
        _run(rr_server(args.port))
    elif args.kind == "hold-server":
        hold_server(args.port, args.max_seconds)
    elif args.kind == "dns-server":
        _run(dns_server(args.port))
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
            hold_client(args.host, args.port, args.bind, args.count, args.hold, args.concurrency)
        )
    elif args.kind == "dns-client":
        out = dns_client(args.server, args.port, args.bind, args.count, args.mode)
    elif args.kind == "tls-client":
        out = _run(
            tls_client(
                args.host, args.port, args.bind, args.sni, args.cafile, args.seconds,
                args.concurrency,
            )
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
