"""What runs inside an intercepted TLS connection once both handshakes are done: the request
inspector's relay, by the protocol both sides agreed on (ALPN).

- "h2": the sans-IO `H2Relay` (h2relay.py) driven over the two decrypted stream pairs: each
  side's reads feed it, what it has for either side is written and drained before that side is
  read again (so a slow side stalls the other through the HTTP/2 windows, never a buffer here).
- HTTP/1.x (or no ALPN): the bytes are pumped untouched and watched by `Http1Observer`;
  after a 101 to WebSocket, each way's frames go through the sans-IO `WebSocketRelay`
  (websocket.py: checked and counted frame by frame, never assembled), and the connection's
  end is one `websocket_closed` event (its request record is protocol "ws", status 101).
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
from unclaw_tui.events import HttpRequest, WebSocketClosed
from unclaw_tui.pump import Side, reset_host_connection
from unclaw_tui.services.h2relay import H2Relay, Limits
from unclaw_tui.services.http1 import Exchange, Http1Observer
from unclaw_tui.services.requests import RequestLog, RequestRecord, keep_headers
from unclaw_tui.services.websocket import Relayed, WebSocketRelay, WebSocketSummary

if TYPE_CHECKING:
    from unclaw_tui.flow import Flow
    from unclaw_tui.services.base import GatewayServices

HTTP1_ALPN = (None, "http/1.1", "http/1.0")
READ_SIZE = 64 * 1024
WS_CLOSE_GRACE = 2.0  # seconds for the Closes after a malformed frame, before both are cut


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
    session: _Http1Session | None = None
    if alpn in HTTP1_ALPN:
        session = _Http1Session(flow, report, authority, capture, client, up_writer)
        peer_reader = _Tap(client, session.from_peer, session)
        host_reader = _Tap(up_reader, session.from_destination, session)
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
        if session is not None:
            session.close()


class _Tap:
    """A reader whose chunks go through `on_data` on their way: what it returns goes on (None:
    the relay is over, an EOF from here on); a chunk that gives nothing yet (a WebSocket header
    held whole) is followed by the next."""

    def __init__(
        self, inner: Any, on_data: Callable[[bytes], bytes | None], session: _Http1Session
    ) -> None:
        self.inner = inner
        self.on_data = on_data
        self.session = session

    async def read(self, n: int = READ_SIZE) -> bytes:
        while not self.session.over:
            try:
                data: bytes = await self.inner.read(n)
            except OSError:
                if self.session.over:  # closing after a failure: its error is the one told
                    return b""
                raise
            out = self.on_data(data)
            if out is None:
                return b""
            if out or not data:
                return out
        return b""


class _Http1Session:
    """One intercepted HTTP/1.x connection: its exchanges watched by `Http1Observer`, and
    after a 101 to WebSocket its frames relayed through `WebSocketRelay`."""

    def __init__(
        self,
        flow: Flow,
        report: _Reporter,
        authority: str,
        capture: int,
        client: Any,
        up_writer: Any,
    ) -> None:
        self.flow = flow
        self.report = report
        self.watch = Http1Observer(default_host=authority, capture_bodies=capture)
        self.client = client
        self.up_writer = up_writer
        self.ws: WebSocketRelay | None = None
        self.ws_record: RequestRecord | None = None
        self.ws_error: str | None = None
        self.over = False  # the WebSocket relay failed: nothing more is carried
        self._abort_timer: asyncio.TimerHandle | None = None

    def from_peer(self, data: bytes) -> bytes | None:
        now = time.monotonic()
        if self.ws is not None:
            return self._ws_out(self.ws.peer_data(data, now), self.client)
        self.watch.request_data(data, now)
        return data

    def from_destination(self, data: bytes) -> bytes | None:
        now = time.monotonic()
        if self.ws is not None:
            return self._ws_out(self.ws.destination_data(data, now), self.up_writer)
        watch = self.watch
        if not data:
            self.report.exchanges(watch.response_eof(now))
            return data
        done = watch.response_data(data, now)
        records = self.report.exchanges(done)
        if not watch.upgraded or not records or records[-1].status != 101:
            return data
        record = records[-1]
        if record.protocol != "ws":
            return data  # another protocol: carried blind
        self.ws_record = record
        sent_early, first = watch.leftovers()
        if sent_early:
            # The client did not wait for the 101 (RFC 6455 4.1): those bytes went on already
            # as HTTP, so the frames cannot be followed; the connection is carried blind.
            self.ws_error = "client sent data before the 101: frames not inspected"
            return data
        extensions = _header(record.response_headers, "sec-websocket-extensions") or ""
        self.ws = WebSocketRelay(now, permessage_deflate="permessage-deflate" in extensions)
        head = data[: len(data) - len(first)]
        rest = self._ws_out(self.ws.destination_data(first, now), self.up_writer) if first else b""
        return head + (rest or b"")

    def _ws_out(self, relayed: Relayed, sender: Any) -> bytes | None:
        if relayed.reply:
            with contextlib.suppress(OSError, RuntimeError):
                sender.write(relayed.reply)
        if relayed.failed and not self.over:
            # The Closes are on their way; both sides get an EOF from here, and whatever is
            # still open after a grace is cut.
            self.over = True
            self.flow.error = self.flow.error or (self.ws.error if self.ws else None)
            self._abort_timer = asyncio.get_running_loop().call_later(WS_CLOSE_GRACE, self._cut)
            return relayed.forward or None
        return None if self.over and not relayed.forward else relayed.forward

    def _cut(self) -> None:
        self.flow.abort()
        reset_host_connection(self.up_writer.writer)

    def close(self) -> None:
        """The connection ended: the requests still open, and the WebSocket's event."""
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        now = time.monotonic()
        self.report.exchanges(self.watch.close(now))
        record = self.ws_record
        if record is None:
            return
        ws = self.ws
        summary = ws.end(now) if ws is not None else WebSocketSummary(error=self.ws_error)
        if summary.error is None and self.flow.error:
            summary.error = self.flow.error
        record.websocket = summary
        self.report.websocket_closed(record, summary)


def _header(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    values = [v for n, v in headers if n == name]
    return ", ".join(values) if values else None


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

    def exchanges(self, done: list[Exchange]) -> list[RequestRecord]:
        records = []
        for x in done:
            upgrade = next((v for n, v in x.response_headers if n == "upgrade"), "")
            ws = x.status == 101 and upgrade.strip().lower() == "websocket"
            r = RequestRecord(
                protocol="ws" if ws else "http/1.1",
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
            records.append(r)
        return records

    def websocket_closed(self, r: RequestRecord, s: WebSocketSummary) -> None:
        flow = self.flow
        self.gateway.publish(
            WebSocketClosed(
                peer=flow.peer,
                host=r.authority,
                path=r.path,
                conn_id=flow.conn_id,
                peer_public_key=flow.peer_public_key,
                messages_up=s.messages_up,
                messages_down=s.messages_down,
                bytes_up=s.bytes_up,
                bytes_down=s.bytes_down,
                close_code=s.close_code,
                close_reason=s.close_reason,
                closed_by=s.closed_by,
                ms=s.duration_ms,
                error=s.error,
            )
        )


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
