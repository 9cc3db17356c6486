"""TLS test hosts and clients for the TLS interop tests, run as subprocesses in a namespace.

    python -m tests.interop.tls_host serve --port 443 --cert C --key K   # HTTPS, GET /any
    python -m tests.interop.tls_host garbage HOST PORT --kind random|truncated|http

The test itself makes the certificates with tests.helpers.make_pki: a test CA and two leaves
for `example.test` and `auto.test`, one signed by that CA (`trusted`), one by a CA nobody
trusts (`untrusted`).
Servers print `ready` once bound; clients print one JSON object. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import ssl
import sys
import time

from tests.helpers import HOSTNAME
from tests.interop.hosts import pattern_chunks

IO_TIMEOUT = 30.0


# --- HTTPS server ---------------------------------------------------------------------------


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO_TIMEOUT)
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/bytes/"):  # GET /bytes/N: N bytes of tests.interop.hosts' pattern
                n = int(path.removeprefix(b"/bytes/"))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                for chunk in pattern_chunks(n):
                    writer.write(chunk)
                    await writer.drain()
                continue
            body = b"hello from " + path + b"\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def _serve(port: int, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    server = await asyncio.start_server(_handle, "0.0.0.0", port, ssl=ctx)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


# --- garbage client ---------------------------------------------------------------------------


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=HOSTNAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def garbage(host: str, port: int, kind: str, timeout: float = 20.0) -> dict[str, object]:
    """Send non-TLS bytes (or half a ClientHello), half-close, and see how the other end ends:
    "eof" (a clean close), "reset", or "timeout"."""
    if kind == "random":
        payload = bytes(b if b != 0x16 else 0 for b in os.urandom(512))
    elif kind == "truncated":
        hello = _client_hello()
        payload = hello[: len(hello) // 2]
    else:
        payload = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"
    started = time.monotonic()
    received = 0
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while True:
                data = sock.recv(65536)
                if not data:
                    result = "eof"
                    break
                received += len(data)
    except ConnectionResetError:
        result = "reset"
    except TimeoutError:
        result = "timeout"
    except OSError as exc:
        result = f"error: {exc}"
    return {
        "result": result,
        "received": received,
        "sent": len(payload),
        "seconds": round(time.monotonic() - started, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="tls_host")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--cert", required=True)
    serve.add_argument("--key", required=True)
    bad = sub.add_parser("garbage")
    bad.add_argument("host")
    bad.add_argument("port", type=int)
    bad.add_argument("--kind", choices=["random", "truncated", "http"], default="random")
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(_serve(args.port, args.cert, args.key))
        return 0
    print(json.dumps(garbage(args.host, args.port, args.kind)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
