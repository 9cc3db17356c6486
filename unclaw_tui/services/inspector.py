"""What runs inside an intercepted TLS connection once both handshakes are done: the request
inspector's relay, by the protocol both sides agreed on (ALPN).

- "h2": the sans-IO `H2Relay` (h2relay.py) driven over the two decrypted stream pairs: each
  side's reads feed it, what it has for either side is written and drained before that side is
  read again (so a slow side stalls the other through the HTTP/2 windows, never a buffer here).
- HTTP/1.x (or no ALPN): the bytes are pumped untouched and watched by `Http1Observer`.
- Anything else: pumped untouched, no requests seen.

Each finished request becomes a `RequestRecord` (requests.py) kept in the gateway's ring and
one `http_request` event (masked: events carry no header values at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from unclaw_tui.engine import describe_os_error
from unclaw_tui.events import HttpRequest
from unclaw_tui.pump import Side, reset_host_connection
from unclaw_tui.services.h2relay import H2Relay, Limits
from unclaw_tui.services.http1 import Exchange, Http1Observer
from unclaw_tui.services.requests import RequestLog, RequestRecord, keep_headers

if TYPE_CHECKING:
    from unclaw_tui.flow import Flow
    from unclaw_tui.services.base import GatewayServices

HTTP1_ALPN = (None, "http/1.1", "http/1.0")
READ_SIZE = 64 * 1024


def request_log(gateway: GatewayServices) -> RequestLog | None:
    """The gateway's ring (a test's stand-in gateway may have none)."""
    return cast("RequestLog | None", getattr(gateway, "request_log", None))


async def relay(
    gateway: GatewayServices,
    flow: Flow,
    alpn: str | None,
    authority: str,
    client: Any,
    up_reader: asyncio.StreamReader,
    up_writer: Any,
    *,
    limits: Limits | None = None,
) -> None:
    """Carry the decrypted connection until it ends. `client` is the peer's TLS face
    (tls.ClientTls), `up_writer` the destination's (tls._UpstreamWriter); `authority` the
    hostname (or address) the connection is for."""
    capture = gateway.settings.capture_bodies
    report = _Reporter(gateway, flow, capture)
    if alpn == "h2":
        limits = limits or Limits(capture_bodies=capture)
        await _relay_h2(flow, H2Relay(limits, default_authority=authority), client, up_reader,
                        up_writer, report.record)  # fmt: skip
        return
    peer_reader: Any = client
    host_reader: Any = up_reader
    observer: Http1Observer | None = None
    if alpn in HTTP1_ALPN:
        observer = watch = Http1Observer(default_host=authority, capture_bodies=capture)

        def from_upstream(data: bytes) -> None:
            now = time.monotonic()
            report.exchanges(watch.response_data(data, now) if data else watch.response_eof(now))

        peer_reader = _Tap(client, lambda data: watch.request_data(data, time.monotonic()))
        host_reader = _Tap(up_reader, from_upstream)
    try:
        await flow.pump(
            Side("peer", peer_reader, cast(asyncio.StreamWriter, client), flow.abort),
            Side(
                "destination",
                host_reader,
                cast(asyncio.StreamWriter, up_writer),
                lambda: reset_host_connection(up_writer.writer),
            ),
            read_size=READ_SIZE,
        )
    finally:
        if observer is not None:
            report.exchanges(observer.close(time.monotonic()))


class _Tap:
    """A reader that shows every chunk (and the EOF, as b"") to a callback on its way."""

    def __init__(self, inner: Any, on_data: Callable[[bytes], object]) -> None:
        self.inner = inner
        self.on_data = on_data

    async def read(self, n: int = READ_SIZE) -> bytes:
        data: bytes = await self.inner.read(n)
        self.on_data(data)
        return data


class _Reporter:
    """Records into the ring and events onto the bus, for one connection."""

    def __init__(self, gateway: GatewayServices, flow: Flow, capture: int) -> None:
        self.gateway = gateway
        self.flow = flow
        self.log = request_log(gateway)
        self.capture = capture

    def record(self, r: RequestRecord) -> None:
        flow = self.flow
        r.peer, r.peer_public_key, r.conn_id = flow.peer, flow.peer_public_key, flow.conn_id
        r.started_at = time.time() - r.done_ms / 1000
        if self.log is not None:
            self.log.add(r)
        self.gateway.publish(
            HttpRequest(
                peer=flow.peer,
                method=r.method,
                host=r.authority,
                path=r.path,
                status=r.status,
                bytes=r.response_bytes,
                ms=r.done_ms,
                conn_id=flow.conn_id,
                peer_public_key=flow.peer_public_key,
                protocol=r.protocol,
                stream_id=r.stream_id,
                request_bytes=r.request_bytes,
                grpc_status=r.grpc_status,
                grpc_message=r.grpc_message,
                error=r.error,
            )
        )

    def exchanges(self, done: list[Exchange]) -> None:
        for x in done:
            r = RequestRecord(
                protocol="http/1.1",
                method=x.method,
                scheme="https",
                authority=x.host or "",
                path=x.path,
                status=x.status,
                request_bytes=x.request_bytes,
                response_bytes=x.bytes,
                sent_ms=x.sent_ms,
                first_byte_ms=x.first_byte_ms,
                done_ms=x.ms,
                error=None if x.status is not None else "no response",
                request_body=x.request_body,
                response_body=x.response_body,
            )
            r.request_headers, cut1 = keep_headers(x.request_headers, r.secrets, "request")
            r.response_headers, cut2 = keep_headers(x.response_headers, r.secrets, "response")
            r.headers_cut = cut1 or cut2
            self.record(r)


async def _relay_h2(
    flow: Flow,
    h2: H2Relay,
    client: Any,
    up_reader: asyncio.StreamReader,
    up_writer: Any,
    on_record: Callable[[RequestRecord], None],
) -> None:
    """Drive the relay over both sides until it ends, then close both (GOAWAYs sent first)."""

    async def send() -> None:
        if data := h2.to_peer():
            client.write(data)
        if data := h2.to_destination():
            up_writer.write(data)
        await client.drain()
        await up_writer.drain()

    async def side(read: Callable[[int], Any], up: bool) -> None:
        while not h2.closed:
            data = await read(READ_SIZE)
            now = time.monotonic()
            if up:
                flow.bytes_up += len(data)
                done = h2.peer_data(data, now) if data else h2.peer_eof(now)
            else:
                flow.bytes_down += len(data)
                done = h2.destination_data(data, now) if data else h2.destination_eof(now)
            for r in done:
                on_record(r)
            await send()

    failed: str | None = None
    try:
        await send()
        tasks = [
            asyncio.ensure_future(side(client.read, True)),
            asyncio.ensure_future(side(up_reader.read, False)),
        ]
        try:
            finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task, name in zip(tasks, ("peer", "destination"), strict=True):
            exc = task.exception() if task in finished and not task.cancelled() else None
            if exc is not None:
                failed = f"{name}: {describe_os_error(exc)}"
                break
    except (OSError, RuntimeError) as exc:
        failed = describe_os_error(exc)
    if failed is not None:
        for r in h2.abort(time.monotonic(), failed):
            on_record(r)
        flow.error = flow.error or failed
        flow.abort()
        reset_host_connection(up_writer.writer)
        return
    flow.error = flow.error or h2.error
    with contextlib.suppress(OSError, RuntimeError):
        await asyncio.wait_for(send(), 5.0)
    client.close()
    up_writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(asyncio.gather(client.wait_closed(), up_writer.wait_closed()), 5.0)
