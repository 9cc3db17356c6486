"""The TLS service: every TCP connection to port 443/8443, intercepted or passed through.

Per connection (`TlsService.handle_tcp`):
1. Accept and read the ClientHello, bounded in size (`MAX_HELLO`) and time (`HELLO_TIMEOUT`),
   parsed as it arrives by the sans-IO `clienthello.HelloParser` (linear time). Anything else
   (garbage, a truncated hello, a silent client) is closed cleanly with an event; the service
   keeps serving the others.
2. Meanwhile, the destination (`_EarlyUpstream`): a VIP's real addresses from the resolver,
   else the original IP, judged by the decision point; a TCP connection to the
   first that answers is opened while the hello is still arriving, since where to connect does
   not depend on it. A connection that turns out not to be TLS closes it again unused; one the
   destination closed meanwhile (a slow hello) is opened anew. The hostname: the SNI, else the
   VIP's hostname (`gateway.resolver`: only if our DNS gave the VIP to this peer; a VIP it was
   not given is refused before the hello), else none. The decision point is asked again with the
   SNI (and the VIP's hostname beside it, so another SNI cannot dodge a verdict).
3. Passthrough (the hostname matches `settings.passthrough`, or a client of the same peer
   rejected our certificate for it before and `settings.auto_passthrough` is on: autopass.py):
   replay the bytes read so far to the destination, then carry the encrypted bytes untouched
   (`flow.carry`: in C where the engine can take the connection, else in Python).
4. Intercept (the default): TLS to the destination first, offering the client's ALPN list,
   with SNI and full verification against the system store (`SSL_CERT_FILE` honoured). A
   failed verification closes the client's connection and says why. Then terminate the
   client's TLS with a leaf for the hostname minted by the local CA (`ca.py`), offering only
   the protocol upstream chose, so both sides speak the same one. The client side runs on
   `ssl.SSLObject` over memory BIOs (`ClientTls`): the ClientHello already read is simply
   written into the incoming BIO first. Decrypted bytes are spliced both ways with
   back-pressure by `inspector.relay`: HTTP/2 through the sans-IO `H2Relay` (h2relay.py),
   HTTP/1.x watched by the sans-IO `Http1Observer`; one `http_request` event and one request
   record (requests.py) per request or stream.

Events per connection: the flow's one `TcpOpened`/`TcpClosed` pair (route "tls", the
hostname), opened once the ClientHello is in (or has failed), and one `TlsHost` with the outcome:
mode "intercepted" or "passthrough" (ok or the error), or "rejected" when we refused the
connection ourselves (not TLS, egress policy, nowhere to connect). A client that refused our
certificate (TLS alert unknown_ca / bad_certificate / certificate_unknown, or a close right
after our certificate) gives mode "intercepted", ok false, error "client rejected our
certificate (...)". `TlsHost.alpn` is the protocol negotiated when intercepting, and the
client's offer (comma-separated) when passing through. `TcpClosed` byte counts are the
decrypted bytes when intercepting, the encrypted ones when passing through.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from unclaw_tui.config import DEFAULT_HELLO_TIMEOUT
from unclaw_tui.decision import Moment, Question
from unclaw_tui.engine import describe_os_error, unb64
from unclaw_tui.engine.outcomes import Refusal
from unclaw_tui.events import TlsHost
from unclaw_tui.flow import Flow, PeerGone, carry
from unclaw_tui.pump import (
    CLOSE_WAIT,
    DEFAULT_CONNECT_TIMEOUT,
    MIN_READ_SIZE,
    ConnectFailed,
    connect_socket,
    reset_host_connection,
)
from unclaw_tui.router import Route, is_vip
from unclaw_tui.services import autopass, clienthello, inspector
from unclaw_tui.services.autopass import AutoPassthrough
from unclaw_tui.services.ca import CertificateAuthority
from unclaw_tui.state import StateError

if TYPE_CHECKING:
    from unclaw_tui.engine import UdpDatagram
    from unclaw_tui.services.base import GatewayServices, Service

log = logging.getLogger(__name__)

MAX_HELLO = clienthello.DEFAULT_MAX_SIZE
# The whole ClientHello (--hello-timeout): a slow client cannot hold us longer.
HELLO_TIMEOUT = DEFAULT_HELLO_TIMEOUT
HANDSHAKE_TIMEOUT = 10.0  # the client's side of the handshake, after its hello
CONNECT_TIMEOUT = DEFAULT_CONNECT_TIMEOUT  # upstream TCP connect plus TLS handshake, per address
UPSTREAM_CONTEXTS = 32
AUTO_PASSTHROUGH_SAVE_INTERVAL = 1.0  # seconds between writes of the list
READ_SIZE = MIN_READ_SIZE

# OpenSSL's names for the alerts a client sends when it does not trust our certificate.
_REJECTION_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "unknown ca",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "certificate unknown",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
}

_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
    r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
)


def valid_hostname(name: str) -> bool:
    return bool(_HOSTNAME_RE.fullmatch(name))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return str(exc.verify_message or exc.reason or "certificate verify failed")
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    if isinstance(exc, TimeoutError):
        return "timed out"
    return describe_os_error(exc)


class _Refused(Exception):
    """We will not serve this connection; str() is the reason for the event."""


# --- TLS toward the client, over its TCP streams ----------------------------------------------


class ClientTls:
    """Server-side TLS on `ssl.SSLObject` over memory BIOs, over a peer's (reader, writer).

    After `handshake()` it offers what `splice` uses of a stream pair: `read`, `write`,
    `drain`, `can_write_eof`/`write_eof` (close_notify and a TCP half-close; reading goes on),
    `close`, `wait_closed`. Everything read is decrypted into the caller's hands at once, so
    nothing beyond one read's worth is held here."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        context: ssl.SSLContext,
        initial: bytes = b"",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_side=True)
        if initial:
            self._in.write(initial)
        self.sent_certificate = False  # our first flight (with the certificate) went out
        self._shut = False

    def _flush(self) -> bool:
        if data := self._out.read():
            self.writer.write(data)
        return bool(data)

    async def _fill(self) -> None:
        if data := await self.reader.read(READ_SIZE):
            self._in.write(data)
        else:
            self._in.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sent_certificate |= self._flush()
                await self.writer.drain()
                await self._fill()
            except ssl.SSLError:
                self._flush()  # our alert, if OpenSSL made one
                raise
        self._flush()
        await self.writer.drain()

    # -- the stream face -------------------------------------------------------------------

    async def read(self, n: int = READ_SIZE) -> bytes:
        while True:
            try:
                data = self.ssl.read(n)
                self._flush()
                return data
            except ssl.SSLWantReadError:
                self._flush()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or a TCP EOF without one: either way the end

    def write(self, data: bytes) -> None:
        if not self._shut:
            self.ssl.write(data)
            self._flush()

    async def drain(self) -> None:
        await self.writer.drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._shutdown()
        if self.writer.can_write_eof():
            self.writer.write_eof()

    def _shutdown(self) -> None:
        if self._shut:
            return
        self._shut = True
        # unwrap() sends close_notify, then wants the client's; we keep reading via read().
        with contextlib.suppress(ssl.SSLError, ValueError):
            self.ssl.unwrap()
        self._flush()

    def close(self) -> None:
        self._shutdown()
        self.writer.close()

    async def wait_closed(self) -> None:
        await self.writer.wait_closed()


class _UpstreamWriter:
    """An upstream TLS StreamWriter for `splice`: asyncio's TLS transport cannot half-close,
    and TLS has no half-close worth keeping, so the client's EOF closes upstream outright."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        self.writer.close()

    write_eof = close

    async def wait_closed(self) -> None:
        with contextlib.suppress(ssl.SSLError):
            await self.writer.wait_closed()


def _tls_event(
    gateway: GatewayServices,
    flow: Flow,
    sni: str | None,
    mode: str,
    *,
    alpn: str | None = None,
    error: str | None = None,
) -> None:
    """Publish the connection's `TlsHost`; an error is also the flow's closing error."""
    gateway.publish(
        TlsHost(
            peer=flow.peer,
            sni=sni or "",
            alpn=alpn,
            mode=mode,
            ok=error is None,
            error=error,
            conn_id=flow.conn_id,
            peer_public_key=flow.peer_public_key,
            dst_ip=flow.dst_ip,
            dst_port=flow.dst_port,
        )
    )
    if error is not None:
        flow.error = flow.error or error


class _EarlyUpstream:
    """The TCP connection to the destination, opened while the ClientHello arrives: `take()`
    it once the hello says how to serve the connection, `discard()` it in any case (closes
    it, or stops the connect, unless it was taken)."""

    def __init__(self, connect: Callable[[], Awaitable[socket.socket]]) -> None:
        self._connect = connect
        self._task = asyncio.ensure_future(connect())
        self._taken = False

    async def take(self) -> socket.socket:
        """The connected socket; raises `_Refused` or `ConnectFailed`.  A connection the
        destination closed while the hello was slow to come is opened again: a TLS server
        never speaks first, so anything readable on it now is its end."""
        sock = await self._task
        if not _quiet(sock):
            sock.close()
            self._task = asyncio.ensure_future(self._connect())
            sock = await self._task
        self._taken = True
        return sock

    def discard(self) -> None:
        task = self._task
        if not task.done():
            task.cancel()  # connect_socket closes its socket on the way out
        elif not task.cancelled() and task.exception() is None and not self._taken:
            task.result().close()


def _quiet(sock: socket.socket) -> bool:
    """Nothing to read and no error pending: the connection is still open and silent."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # data or EOF


# --- the service ------------------------------------------------------------------------------


class TlsService:
    """See the module docstring. `upstream_context(alpn)` makes the client-side context for
    upstream connections (default: the system store, as `ssl.create_default_context()`)."""

    def __init__(
        self,
        gateway: GatewayServices,
        ca: CertificateAuthority,
        *,
        upstream_context: Callable[[tuple[str, ...]], ssl.SSLContext] | None = None,
        hello_timeout: float = HELLO_TIMEOUT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.gateway = gateway
        self.ca = ca
        # One client context per distinct ALPN offer, the least recently used dropped first.
        self.upstream_context = functools.lru_cache(UPSTREAM_CONTEXTS)(
            upstream_context or default_upstream_context
        )
        self.hello_timeout = hello_timeout
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        # Hosts each peer's clients rejected our certificate for (autopass.py).
        self.auto_passthrough = AutoPassthrough()
        self._saved_changes = 0
        self._save_task: asyncio.Task[None] | None = None
        if gateway.settings.auto_passthrough:
            self._load_auto_passthrough()

    # -- Service -------------------------------------------------------------------------------

    def handle_udp(self, dgram: UdpDatagram) -> None:
        dgram.unreachable()  # the router sends only TCP here

    async def close(self) -> None:
        self.upstream_context.cache_clear()
        if self._save_task is not None:
            self._save_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._save_task
        if self.auto_passthrough.changes != self._saved_changes:
            with contextlib.suppress(Exception):
                self._write_auto_passthrough(self.auto_passthrough.to_json())

    async def handle_tcp(self, flow: Flow) -> None:
        # What escapes ends the flow in FlowRegistry.serve (RST, the error in its closing event).
        await self._serve(flow)
        flow.close()

    # -- policy --------------------------------------------------------------------------------

    def is_passthrough(self, hostname: str | None, peer_key: bytes) -> bool:
        if hostname is None:
            return False
        if self.auto_passthrough.has(peer_key, hostname):
            return True
        return any(fnmatch.fnmatchcase(hostname, p) for p in self.gateway.settings.passthrough)

    def _remember_rejection(self, peer_key: bytes, hostname: str) -> None:
        self.auto_passthrough.add(peer_key, hostname)
        if self._save_task is None or self._save_task.done():
            self._save_task = asyncio.ensure_future(self._save_auto_passthrough())

    async def _save_auto_passthrough(self) -> None:
        """Writes the list while it changes, at most once per AUTO_PASSTHROUGH_SAVE_INTERVAL;
        the document is taken on the loop (small: bounded per peer), written off it (the
        state dir's lock and fsync may block)."""
        while self.auto_passthrough.changes != self._saved_changes:
            changes = self.auto_passthrough.changes
            doc = self.auto_passthrough.to_json()
            try:
                await asyncio.to_thread(self._write_auto_passthrough, doc)
            except Exception as exc:
                log.warning("auto-passthrough hosts not saved: %s", exc)
                return
            self._saved_changes = changes
            await asyncio.sleep(AUTO_PASSTHROUGH_SAVE_INTERVAL)

    def _write_auto_passthrough(self, doc: dict[str, Any]) -> None:
        state = self.gateway.state
        with state.locked():
            state.write_json(autopass.FILE, doc)

    def _load_auto_passthrough(self) -> None:
        state = self.gateway.state
        try:
            doc = state.read_json(autopass.FILE)
            peers = [unb64(p.public_key) for p in state.peers()]
        except StateError as exc:
            log.warning("auto-passthrough hosts not loaded: %s", exc)
            return
        for problem in self.auto_passthrough.load(doc, peers):
            log.warning("%s: skipped %s", autopass.FILE, problem)
        self._saved_changes = self.auto_passthrough.changes
        if isinstance(doc, dict) and "peers" not in doc:  # version 1: write the new form
            self._saved_changes -= 1

    # -- one connection ------------------------------------------------------------------------

    async def _serve(self, flow: Flow) -> None:
        resolver = self.gateway.resolver
        vip_host = None
        if resolver is not None:
            vip_host = resolver.hostname_for_vip(flow.dst_ip, flow.peer_key)
        if vip_host is None and is_vip(flow.dst_ip):
            # A VIP our DNS did not give this peer: nothing behind it for it (not even the
            # hostname another peer looked up, which a hello without SNI would be served).
            flow.refuse(Refusal.VIP_NOT_GIVEN.says())
            return
        try:
            reader, writer = flow.accept()
        except PeerGone:
            return
        # Where to connect is known from the SYN (or the VIP), not from the hello: connect
        # while the ClientHello arrives, so neither mode waits a round trip to the host after it.
        upstream = _EarlyUpstream(functools.partial(self._open_upstream, flow, vip_host))
        try:
            hello, seen = await self._read_hello(reader)
            if isinstance(hello, str):
                flow.open(vip_host)
                _tls_event(self.gateway, flow, None, "rejected", error=hello)
                await _close_client(writer, flow)
                return
            gateway = self.gateway
            sni = hello.sni
            hostname = sni or vip_host
            flow.open(hostname)
            hello_question = Question.about(flow, Moment.HELLO, hostname=sni, vip_hostname=vip_host)
            verdict = gateway.decisions.decide(hello_question)
            if verdict.refusal is not None:
                _tls_event(gateway, flow, sni, "rejected", error=verdict.refusal)
                flow.abort()
                return
            passthrough = self.is_passthrough(hostname, flow.peer_key)
            offered = ",".join(hello.alpn) or None
            try:
                sock = await upstream.take()
            except _Refused as exc:
                _tls_event(gateway, flow, sni, "rejected", error=str(exc))
                flow.abort()
                return
            except ConnectFailed as exc:
                if passthrough:
                    _tls_event(gateway, flow, sni, "passthrough", alpn=offered, error=str(exc))
                    flow.abort()
                else:
                    _tls_event(gateway, flow, sni, "intercepted", error=f"upstream: {exc}")
                    await _close_client(writer, flow)
                return
            if passthrough:
                _tls_event(gateway, flow, sni, "passthrough", alpn=offered)
                # The ClientHello (and anything read with it) goes ahead untouched, then the rest.
                carry(flow, sock, streams=(reader, writer), first=seen)
                await flow.ended()
            else:
                await self._intercept(flow, hello, hostname, sock, reader, writer, seen)
        finally:
            upstream.discard()

    async def _read_hello(
        self, reader: asyncio.StreamReader
    ) -> tuple[clienthello.ClientHello | str, bytes]:
        """The ClientHello and the bytes read with it, or why the connection is rejected."""
        deadline = asyncio.get_running_loop().time() + self.hello_timeout
        parser = clienthello.HelloParser(MAX_HELLO)
        buf = parser.data
        result = parser.feed(b"")
        while isinstance(result, clienthello.NeedMore):
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(max(1, MAX_HELLO - len(buf)))
            except TimeoutError:
                what = "incomplete" if buf else "none"
                result = clienthello.NotTls(f"{what} within {self.hello_timeout:g} s")
            except OSError as exc:
                result = clienthello.NotTls(_describe(exc))
            else:  # each record is walked once, however the bytes arrive
                end = "truncated" if buf else "closed before sending anything"
                result = parser.feed(data) if data else clienthello.NotTls(end)
        if isinstance(result, clienthello.NotTls):
            return f"not a TLS ClientHello: {result.reason}", bytes(buf)
        if result.sni is not None and not (valid_hostname(result.sni) or _is_ip(result.sni)):
            return "invalid SNI", bytes(buf)
        return result, bytes(buf)

    async def _open_upstream(self, flow: Flow, vip_host: str | None) -> socket.socket:
        """A TCP connection to the first destination (the VIP's real addresses, else the
        original one) that the decision point allows and that answers; `_Refused` if it allows
        none, `ConnectFailed` (the last reason) if none answers."""
        if vip_host is not None and self.gateway.resolver is not None:
            candidates = tuple(await self.gateway.resolver.resolve(vip_host))
            if not candidates:
                raise _Refused(f"{vip_host} does not resolve")
        else:
            candidates = (flow.dst_ip,)
        question = Question.about(flow, Moment.FLOW, hostname=vip_host, addresses=candidates)
        verdict = self.gateway.decisions.decide(question)
        if verdict.refusal is not None:
            raise _Refused(verdict.refusal)
        failure = "no address"
        for ip in verdict.addresses:
            try:
                return await connect_socket(ip, flow.dst_port, timeout=self.connect_timeout)
            except ConnectFailed as exc:
                failure = str(exc)
        raise ConnectFailed(failure)

    async def _intercept(
        self,
        flow: Flow,
        hello: clienthello.ClientHello,
        hostname: str | None,
        sock: socket.socket,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        seen: bytes,
    ) -> None:
        sni = hello.sni
        offer = tuple(p for p in hello.alpn if 0 < len(p.encode("latin-1")) < 256)
        server_name = hostname or flow.dst_ip
        try:  # TLS over the connected socket, with SNI and full verification
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(
                    sock=sock,
                    ssl=self.upstream_context(offer),
                    server_hostname=server_name,
                    ssl_handshake_timeout=self.connect_timeout,
                    limit=self.gateway.settings.tcp_buffer,
                ),
                self.connect_timeout,
            )
        except BaseException as exc:
            sock.close()  # the transport closes it too, once it exists: a second close is a no-op
            if not isinstance(exc, OSError):  # ssl.SSLError and TimeoutError are OSErrors
                raise
            verify = isinstance(exc, ssl.SSLCertVerificationError)
            what = "upstream certificate rejected" if verify else "upstream"
            _tls_event(self.gateway, flow, sni, "intercepted", error=f"{what}: {_describe(exc)}")
            await _close_client(writer, flow)
            return
        upstream_ssl = up_writer.get_extra_info("ssl_object")
        alpn = upstream_ssl.selected_alpn_protocol() if upstream_ssl is not None else None
        client = ClientTls(reader, writer, self.ca.server_context(server_name, alpn), seen)
        try:
            await asyncio.wait_for(client.handshake(), self.handshake_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            rejection = _client_rejection(exc, client.sent_certificate)
            if rejection is not None:
                error = f"client rejected our certificate ({rejection})"
                if hostname is not None and self.gateway.settings.auto_passthrough:
                    self._remember_rejection(flow.peer_key, hostname)
            else:
                error = f"client handshake failed: {_describe(exc)}"
            _tls_event(self.gateway, flow, sni, "intercepted", alpn=alpn, error=error)
            reset_host_connection(up_writer)
            await _close_client(writer, flow)
            return
        _tls_event(self.gateway, flow, sni, "intercepted", alpn=alpn)
        # HTTP/2, HTTP/1.x or other: relayed and its requests reported by the inspector.
        await inspector.relay(
            self.gateway, flow, alpn, server_name, client, up_reader, _UpstreamWriter(up_writer)
        )


def _client_rejection(exc: BaseException, sent_certificate: bool) -> str | None:
    """Why the client refused our certificate, or None if it failed for another reason."""
    if isinstance(exc, ssl.SSLError) and exc.reason in _REJECTION_ALERTS:
        return _REJECTION_ALERTS[exc.reason]
    closed = isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError)
    if sent_certificate and (closed or (isinstance(exc, ssl.SSLError) and "EOF" in str(exc))):
        return "closed the connection after our certificate"
    return None


async def _close_client(writer: asyncio.StreamWriter, flow: Flow) -> None:
    """A clean close (FIN); an abort (RST) if it does not finish in time."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_WAIT)
    except (OSError, TimeoutError):
        flow.abort()


def default_upstream_context(alpn: tuple[str, ...]) -> ssl.SSLContext:
    """The system store with full verification; honours SSL_CERT_FILE / SSL_CERT_DIR."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def create(gateway: GatewayServices) -> dict[Route, Service]:
    ca = CertificateAuthority.load_or_create(gateway.state.path)
    service = TlsService(gateway, ca, hello_timeout=gateway.settings.hello_timeout)
    return {Route.TLS: cast("Service", service)}
