"""WebSocket test host and client for tests/interop/test_ws.py, run in a namespace.

    python -m tests.interop.ws_hosts serve --port 443 --cert C --key K [--alpn P ...]
    python -m tests.interop.ws_hosts client ADDR PORT --ca CA [--alpn P ...]

The server (the `websockets` library) echoes every message and, after "bye", closes with
4000 "done here". The client connects to wss://example.test/chat at ADDR (SNI example.test),
sends a text, a binary and "bye", and prints one JSON object: what came back, the close code
and reason, the ALPN protocol it got. Servers print `ready`; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.helpers import HOSTNAME

IO_TIMEOUT = 20.0
BINARY = bytes(range(256)) * 400  # 100 KiB: several TCP segments, one frame


async def serve_forever(port: int, cert: str, key: str, alpn: list[str]) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)
            if message == "bye":
                await ws.close(4000, "done here")

    async with serve(echo, "0.0.0.0", port, ssl=ctx, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()


async def client(addr: str, port: int, ca: str, alpn: list[str]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=ca)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    uri = f"wss://{HOSTNAME}:{port}/chat?room=7"
    async with asyncio.timeout(IO_TIMEOUT):
        async with connect(uri, host=addr, port=port, ssl=ctx, max_size=None) as ws:
            got: list[Any] = []
            for message in ("hello", BINARY, "bye"):
                await ws.send(message)
                echo = await ws.recv()
                got.append(echo if isinstance(echo, str) else ["bytes", echo == BINARY])
            try:
                await ws.recv()
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
            ssl_obj = ws.transport.get_extra_info("ssl_object")
            return {
                "got": got,
                "close": [rcvd.code, rcvd.reason] if rcvd is not None else None,
                "alpn": ssl_obj.selected_alpn_protocol(),
            }


def main() -> int:
    parser = argparse.ArgumentParser(prog="ws_hosts")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--alpn", action="append", default=[])
    c = sub.add_parser("client")
    c.add_argument("addr")
    c.add_argument("port", type=int)
    c.add_argument("--ca", required=True)
    c.add_argument("--alpn", action="append", default=[])
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve_forever(args.port, args.cert, args.key, args.alpn))
        return 0
    print(json.dumps(asyncio.run(client(args.addr, args.port, args.ca, args.alpn))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
