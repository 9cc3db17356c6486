"""WebSocket inside intercepted TLS, through the TLS service on loopback (the harness of
test_tls.py): a `websockets` client and server, frames relayed, the request reported as "ws",
one `websocket_closed` event; a malformed frame closes both sides with 1002."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from tests.helpers import Pki, until
from tests.unit.test_tls import Harness, make_harness, our_ca_context, pki  # noqa: F401
from unclaw_tui.events import HttpRequest, TcpClosed, WebSocketClosed


async def start_ws_origin(certs: Pki, compression: str | None = "deflate") -> tuple[Any, int]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*certs.trusted)

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)
            if message == "bye":
                await ws.close(4000, "done here")

    server = await serve(echo, "127.0.0.1", 0, ssl=ctx, compression=compression)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_messages_both_ways_and_the_close_on_the_event(
    make_harness: Any,  # noqa: F811
    pki: Pki,  # noqa: F811
    compression: str | None,
) -> None:
    h: Harness = await make_harness()
    server, port = await start_ws_origin(pki, compression)
    h.dst = ("127.0.0.1", port)
    ctx = our_ca_context(h, ["h2", "http/1.1"])  # offers h2; the origin has no ALPN
    async with connect(
        "wss://example.test/chat?room=1", host="127.0.0.1", port=h.port, ssl=ctx,
        compression=compression, max_size=None,
    ) as ws:  # fmt: skip
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00" * 300_000)
        assert await ws.recv() == b"\x00" * 300_000
        await ws.send("bye")
        assert await ws.recv() == "bye"
        with contextlib.suppress(Exception):
            await ws.recv()  # the server's close
    await h.settle()
    server.close()

    (request,) = h.gateway.of(HttpRequest)
    assert (request.protocol, request.status, request.path) == ("ws", 101, "/chat?room=1")
    (closed,) = h.gateway.of(WebSocketClosed)
    assert (closed.messages_up, closed.messages_down) == (3, 3)
    assert (closed.close_code, closed.close_reason, closed.closed_by) == (
        4000, "done here", "destination")  # fmt: skip
    assert closed.error is None and closed.conn_id == request.conn_id
    assert closed.host == "example.test" and closed.path == "/chat?room=1"
    if compression is None:
        assert closed.bytes_up == closed.bytes_down == 5 + 300_000 + 3
    else:  # what went on the wire: compressed
        assert closed.bytes_up < 10_000 and closed.bytes_down < 10_000
    (tcp,) = h.gateway.of(TcpClosed)
    assert tcp.error is None
    h.check_flow_pairs()


async def test_a_malformed_frame_closes_both_sides_with_1002(
    make_harness: Any,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    h: Harness = await make_harness()
    server, port = await start_ws_origin(pki, None)
    h.dst = ("127.0.0.1", port)
    reader, writer = await h.open(our_ca_context(h))
    writer.write(
        b"GET /x HTTP/1.1\r\nHost: example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ")
    writer.write(b"\x81\x02hi")  # unmasked, from a client
    close = await asyncio.wait_for(reader.readexactly(2 + 2 + len("unmasked frame")), 10)
    assert close == b"\x88\x10\x03\xeaunmasked frame"
    assert await asyncio.wait_for(reader.read(), 10) == b""  # then the end
    writer.close()
    await h.settle()
    server.close()
    await until(lambda: h.gateway.of(WebSocketClosed), "websocket_closed")
    (closed,) = h.gateway.of(WebSocketClosed)
    assert (closed.close_code, closed.closed_by) == (1002, "gateway")
    assert closed.error == "peer: unmasked frame"
    (tcp,) = h.gateway.of(TcpClosed)
    assert tcp.error == "peer: unmasked frame"
