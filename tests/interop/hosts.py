"""Test hosts and test clients for the flow interop tests, run as subprocesses in a namespace.

    python -m tests.interop.hosts http --port 8080          # /bytes/N, /upload, /hello
    python -m tests.interop.hosts udp-echo --port 9000
    python -m tests.interop.hosts sink --port 9001          # accepts, then never reads
    python -m tests.interop.hosts bulk --port 9002          # "GET n seed" / "PUT n" lines
    python -m tests.interop.hosts connect HOST PORT         # JSON: connected/refused/...
    python -m tests.interop.hosts udp-probe HOST PORT --sizes 1,512,1400
    python -m tests.interop.hosts many HOST PORT --count 200
    python -m tests.interop.hosts stuff HOST PORT --max-bytes N --max-seconds S

Servers print one line `ready` on stdout once bound, so a test can wait for it.  Clients print
one JSON object on stdout.  Every loop is bounded in count or time; servers run until killed.

Payloads are a deterministic pattern (`pattern_chunks`), so both sides can compute the
sha256 of a transfer without sending it anywhere else: each MiB starts with its own index,
so a chunk delivered in the wrong place changes the digest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import random
import socket
import sys
import time
from collections.abc import Iterator
from functools import cache
from typing import Any

CHUNK = 1 << 20
MAX_HEADER_BYTES = 16 * 1024
# Bounds that keep a misbehaving peer from holding a test host forever.
MAX_BODY_BYTES = 1 << 34
IO_TIMEOUT = 60.0


@cache
def _block(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNK)


def pattern_chunks(n: int, seed: int = 0) -> Iterator[bytes]:
    """n bytes of the test pattern, in chunks of at most 1 MiB."""
    block = _block(seed)
    index = 0
    while n > 0:
        size = min(n, CHUNK)
        chunk = index.to_bytes(8, "big") + block[8:]
        yield chunk[:size]
        n -= size
        index += 1


def pattern_sha256(n: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(n, seed):
        digest.update(chunk)
    return digest.hexdigest()


def write_pattern_file(path: str, n: int, seed: int = 0) -> str:
    """Write n pattern bytes to path; returns their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for chunk in pattern_chunks(n, seed):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


# --- HTTP/1.1 server --------------------------------------------------------------------------


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], digest: Any) -> int:
    """Feed the request body to digest; returns its length."""
    total = 0
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), IO_TIMEOUT)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await asyncio.wait_for(reader.readuntil(b"\r\n"), IO_TIMEOUT)
                return total
            left = size
            while left:
                data = await asyncio.wait_for(reader.read(min(left, CHUNK)), IO_TIMEOUT)
                if not data:
                    raise ConnectionError("body cut short")
                digest.update(data)
                left -= len(data)
            total += size
            if total > MAX_BODY_BYTES:
                raise ConnectionError("body too large")
            await asyncio.wait_for(reader.readexactly(2), IO_TIMEOUT)
    left = int(headers.get("content-length", "0"))
    if left > MAX_BODY_BYTES:
        raise ConnectionError("body too large")
    while left:
        data = await asyncio.wait_for(reader.read(min(left, CHUNK)), IO_TIMEOUT)
        if not data:
            raise ConnectionError("body cut short")
        digest.update(data)
        left -= len(data)
        total += len(data)
    return total


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _http_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        for _ in range(10_000):  # keep-alive requests on one connection, bounded
            request = await _read_head(reader)
            if request is None:
                return
            method, target, headers = request
            path, _, query = target.partition("?")
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            if path.startswith("/bytes/") and method in ("GET", "HEAD"):
                n = int(path.removeprefix("/bytes/"))
                seed = int(query.removeprefix("seed=")) if query.startswith("seed=") else 0
                writer.write(
                    f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    f"Content-Length: {n}\r\n\r\n".encode()
                )
                if method == "GET":
                    for chunk in pattern_chunks(n, seed):
                        writer.write(chunk)
                        await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            elif path == "/upload" and method in ("POST", "PUT"):
                digest = hashlib.sha256()
                total = await _read_body(reader, headers, digest)
                body = json.dumps({"sha256": digest.hexdigest(), "bytes": total}).encode()
                writer.write(_response("200 OK", body + b"\n", "application/json"))
            elif path == "/hello":
                writer.write(_response("200 OK", b"hello\n"))
            else:
                writer.write(_response("404 Not Found", b"not found\n"))
            await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve_http(host: str, port: int) -> None:
    server = await asyncio.start_server(_http_conn, host, port, backlog=1024)
    _ready()
    async with server:
        await server.serve_forever()


# --- UDP echo ---------------------------------------------------------------------------------


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def serve_udp_echo(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(host, port))
    _ready()
    try:
        await asyncio.Event().wait()
    finally:
        transport.close()


# --- a destination that stops reading ---------------------------------------------------------


async def serve_sink(host: str, port: int, read_first: int) -> None:
    held: list[asyncio.StreamWriter] = []

    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Read a little so the connection is known to carry data, then never again: the
        # kernel's receive buffer fills and the window to the gateway closes.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.readexactly(read_first), IO_TIMEOUT)
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        held.append(writer)

    server = await asyncio.start_server(conn, host, port)
    _ready()
    async with server:
        await server.serve_forever()


# --- bulk: a line-protocol byte source and sink -----------------------------------------------


async def _bulk_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = (await asyncio.wait_for(reader.readline(), IO_TIMEOUT)).decode().split()
        if len(line) == 3 and line[0] == "GET":
            for chunk in pattern_chunks(int(line[1]), int(line[2])):
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), IO_TIMEOUT)
            writer.write_eof()
        elif len(line) == 2 and line[0] == "PUT":
            digest = hashlib.sha256()
            await _read_body(reader, {"content-length": line[1]}, digest)
            writer.write(f"{digest.hexdigest()}\n".encode())
            await writer.drain()
    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def serve_bulk(host: str, port: int) -> None:
    server = await asyncio.start_server(_bulk_conn, host, port)
    _ready()
    async with server:
        await server.serve_forever()


# --- clients (run in the client namespace) ----------------------------------------------------


def connect_probe(host: str, port: int, timeout: float) -> dict[str, Any]:
    """Try one TCP connect; classify the outcome the way a user would see it."""
    t0 = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = sock.recv(4096)
        result = "connected"
        extra = {"reply": reply.decode("latin-1")[:200]}
    except ConnectionRefusedError:
        result, extra = "refused", {}
    except ConnectionResetError:
        result, extra = "reset", {}
    except TimeoutError:
        result, extra = "timeout", {}
    except OSError as exc:
        result = "unreachable" if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH) else "error"
        extra = {"errno": exc.errno, "error": str(exc)}
    finally:
        sock.close()
    return {"result": result, "seconds": time.monotonic() - t0, **extra}


def udp_probe(
    host: str, port: int, sizes: list[int], count: int, timeout: float, max_seconds: float = 20.0
) -> dict[str, Any]:
    """Send `count` datagrams of each size and wait for each echo (a few tries each), all
    within max_seconds."""
    end = time.monotonic() + max_seconds
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.settimeout(timeout)
    results: dict[str, Any] = {}
    try:
        for size in sizes:
            ok = 0
            rtts: list[float] = []
            for i in range(count):
                payload = (f"{size}:{i}:".encode() + bytes(range(256)) * (size // 256 + 1))[:size]
                for _attempt in range(3):
                    if time.monotonic() > end:
                        break
                    t0 = time.monotonic()
                    sock.send(payload)
                    try:
                        while True:
                            data = sock.recv(65535)
                            if data == payload:
                                break
                    except TimeoutError:
                        continue
                    ok += 1
                    rtts.append(time.monotonic() - t0)
                    break
            results[str(size)] = {"ok": ok, "sent": count, "max_rtt": max(rtts, default=None)}
    finally:
        sock.close()
    return results


async def many_connections(
    host: str, port: int, count: int, nbytes: int, timeout: float, one_at_a_time: bool = False
) -> dict[str, Any]:
    """Open `count` connections, hold them all open at once, then fetch on every one (or, one
    at a time: each opened, fetched on and closed before the next)."""
    all_open = asyncio.Event()
    opened = 0
    errors: list[str] = []

    async def one(index: int) -> bool:
        nonlocal opened
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            errors.append(f"connect {index}: {exc}")
            opened += 1  # counted so the others are not held back forever
            if opened == count:
                all_open.set()
            return False
        try:
            opened += 1
            if opened == count:
                all_open.set()
            await all_open.wait()
            writer.write(
                f"GET /bytes/{nbytes}?seed={index:06d} HTTP/1.1\r\nHost: x\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            data = await reader.read()
            head, _, body = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(f"status {index}: {head[:40]!r}")
                return False
            if hashlib.sha256(body).hexdigest() != pattern_sha256(nbytes, index):
                errors.append(f"body {index}: {len(body)} bytes, digest mismatch")
                return False
            return True
        except OSError as exc:
            errors.append(f"io {index}: {exc}")
            return False
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def in_turn() -> list[bool]:
        all_open.set()
        return [await one(i) for i in range(count)]

    t0 = time.monotonic()
    try:
        every = in_turn() if one_at_a_time else asyncio.gather(*(one(i) for i in range(count)))
        done = await asyncio.wait_for(every, timeout)
    except TimeoutError:
        return {"ok": 0, "count": count, "errors": ["timeout", *errors[:20]], "opened": opened}
    return {
        "ok": sum(done),
        "count": count,
        "errors": errors[:20],
        "seconds": time.monotonic() - t0,
    }


def stuff(host: str, port: int, max_bytes: int, max_seconds: float) -> dict[str, Any]:
    """Send pattern bytes until max_bytes, max_seconds, or an error; report how far it got."""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        return {"sent": 0, "seconds": 0.0, "last_progress": 0.0, "error": f"connect: {exc}"}
    sock.settimeout(0.5)
    chunk = next(pattern_chunks(64 * 1024))
    sent = 0
    last_progress = t0 = time.monotonic()
    error = None
    try:
        while sent < max_bytes and time.monotonic() - t0 < max_seconds:
            try:
                n = sock.send(chunk[: max_bytes - sent])
            except TimeoutError:
                continue  # window closed: keep trying until the time bound
            except OSError as exc:
                error = str(exc)
                break
            sent += n
            last_progress = time.monotonic()
    finally:
        sock.close()
    return {
        "sent": sent,
        "seconds": time.monotonic() - t0,
        "last_progress": last_progress - t0,
        "error": error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.interop.hosts")
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind in ("http", "udp-echo", "sink", "bulk"):
        p = kinds.add_parser(kind)
        p.add_argument("--host", default="0.0.0.0")
        p.add_argument("--port", type=int, required=True)
        if kind == "sink":
            p.add_argument("--read-first", type=int, default=1024)
    for kind in ("connect", "udp-probe", "many", "stuff"):
        p = kinds.add_parser(kind)
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=5.0)
        if kind == "udp-probe":
            p.add_argument("--sizes", default="1,64,512,1400")
            p.add_argument("--count", type=int, default=5)
            p.add_argument("--max-seconds", type=float, default=20.0)
        if kind == "many":
            p.add_argument("--count", type=int, default=200)
            p.add_argument("--bytes", type=int, default=16384)
            p.add_argument("--one-at-a-time", action="store_true")
        if kind == "stuff":
            p.add_argument("--max-bytes", type=int, default=64 << 20)
            p.add_argument("--max-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)

    if args.kind == "http":
        asyncio.run(serve_http(args.host, args.port))
    elif args.kind == "udp-echo":
        asyncio.run(serve_udp_echo(args.host, args.port))
    elif args.kind == "sink":
        asyncio.run(serve_sink(args.host, args.port, args.read_first))
    elif args.kind == "bulk":
        asyncio.run(serve_bulk(args.host, args.port))
    else:
        if args.kind == "connect":
            out = connect_probe(args.host, args.port, args.timeout)
        elif args.kind == "udp-probe":
            sizes = [int(s) for s in args.sizes.split(",")]
            out = udp_probe(args.host, args.port, sizes, args.count, args.timeout, args.max_seconds)
        elif args.kind == "many":
            out = asyncio.run(
                many_connections(
                    args.host, args.port, args.count, args.bytes, args.timeout, args.one_at_a_time
                )
            )
        else:
            out = stuff(args.host, args.port, args.max_bytes, args.max_seconds)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
