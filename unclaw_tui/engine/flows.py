"""TCP connections and UDP datagrams from peers, as Python objects over the C stack.

A `TcpConn` is announced when the peer's SYN arrives and nothing has been answered yet: the
router accepts it (SYN-ACK) or rejects it (RST).  Accepted, it is an ordinary pair of asyncio
streams (`StreamReaderProtocol` over `TcpTransport`), so services treat it like a socket.
Back-pressure both ways comes from the streams' own flow control: a reader that stops reading
pauses the transport, which stops taking bytes from C, whose receive window to the peer then
closes; a full C send buffer makes the transport buffer, which pauses `drain()`.  Data moves
in large chunks: one C call per readable event or per write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unclaw_tui.engine import _ffi
from unclaw_tui.engine.outcomes import close_reason, splice_close_label

if TYPE_CHECKING:
    from unclaw_tui.engine.conns import ConnTable

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
SpliceDone = Callable[[_ffi.SpliceResult], None]

READ_CHUNK = 256 * 1024
STREAM_LIMIT = 256 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class TcpConn:
    """A TCP connection a WireGuard peer opened (see the module docstring)."""

    def __init__(
        self, conns: ConnTable, conn_id: int, info: _ffi.TcpInfo, peer_public_key: bytes
    ) -> None:
        self._conns = conns
        self.conn_id = conn_id
        self.peer_public_key = peer_public_key
        self.peer_ip, self.src_port = info.src
        self.dst_ip, self.dst_port = info.dst
        self.close_reason: str | None = None
        self._transport: TcpTransport | None = None
        self._released = False
        self._spliced = False
        self._closed = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"<TcpConn {self.conn_id} {self.peer_ip}:{self.src_port} -> "
            f"{self.dst_ip}:{self.dst_port}>"
        )

    # -- the router's decision -------------------------------------------------------------

    def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Answer the SYN; the streams are usable at once (writes queue until established)."""
        if self._transport is not None or self._released:
            raise RuntimeError("connection already answered")
        loop = asyncio.get_running_loop()
        self._conns.call(lambda e, now: e.tcp_accept(self.conn_id, now))
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport = TcpTransport(self, protocol)
        self._transport = transport
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        transport._pull()  # data that came with or right after the handshake
        return reader, writer

    def reject(self) -> None:
        """RST: the client sees "connection refused" at once."""
        if self._released:
            return
        self._conns.call(lambda e, now: e.tcp_reject(self.conn_id, now))
        self._finish("rejected")

    def abort(self) -> None:
        if self._spliced:
            self._conns.splice_abort(self.conn_id)
        elif self._transport is not None:
            self._transport.abort()
        else:
            self.reject()

    @property
    def can_splice(self) -> bool:
        """The engine can take this connection (splices exist, and it is not C's already)."""
        return self._conns.can_splice and not self._released

    def splice(self, dst: Endpoint, timeout: float, on_done: SpliceDone) -> None:
        """Relay in C instead of answering here: connect to dst (giving up after timeout s),
        then SYN-ACK, or RST if it failed; bytes then flow both ways without Python.
        `on_done` gets the `SpliceResult` once, when it ends.  OSError if no socket could even
        be started (the connection is still ours to reject)."""
        self._splice_unanswered(dst, timeout, on_done)

    def splice_socket(self, sock: socket.socket, on_done: SpliceDone) -> None:
        """As `splice`, for a host socket the caller already connected: C takes it over
        (the socket object is detached) and the SYN is answered at once."""
        self._splice_unanswered(sock, 0.0, on_done)

    def _splice_unanswered(
        self, target: Endpoint | socket.socket, timeout: float, on_done: SpliceDone
    ) -> None:
        if self._transport is not None or self._released:
            raise RuntimeError("connection already answered")
        self._conns.splice(self, target, timeout, on_done)
        self._spliced = self._released = True  # the handle belongs to C's splice table now

    def detach_reading(self, reader: asyncio.StreamReader) -> bytes | None:
        """Stop reading from the peer into `reader` (from `accept`) and take back what it
        buffered but did not give out yet, to hand the connection to `splice_accepted`.  None,
        with nothing changed, when it cannot go to C: no splices, the peer's EOF already read,
        or bytes for the peer still queued.  Undo with `writer.transport.resume_reading()`."""
        t = self._transport
        if t is None or not self.can_splice or reader.at_eof():
            return None
        if t._eof_from_peer or t._buffer or t.is_closing():
            return None
        t.pause_reading()
        # A StreamReader keeps what it was fed in `_buffer`; there is no public way to take it.
        buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
        left = bytes(buffered)
        buffered.clear()
        return left

    def splice_accepted(self, sock: socket.socket, on_done: SpliceDone) -> None:
        """Relay in C from now on between this accepted connection (after `detach_reading`)
        and `sock`, connected to the destination: everything read from the peer so far must
        have been sent to sock already; the rest follows in C, both ways, as for `splice`.  The
        streams are done with (C owns the handle and, on success, the socket).  OSError or
        EngineError leave both with the caller."""
        t = self._transport
        if t is None or self._released:
            raise RuntimeError("connection not accepted here, or already released")
        self._conns.splice(self, sock, 0.0, on_done, accepted=True)
        self._spliced = self._released = True  # close/abort no longer touch the handle

    def _spliced_done(self, result: _ffi.SpliceResult) -> None:
        self.close_reason = self.close_reason or splice_close_label(result)
        self._spliced = False
        self._closed.set()

    # -- state -----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- from the engine -------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._transport is not None:
            self._transport._pull()

    def _on_writable(self) -> None:
        if self._transport is not None:
            self._transport._push()

    def _on_closed(self, reason: int) -> None:
        known = close_reason(reason)
        name = known.label if known is not None else str(reason)
        transport = self._transport
        if transport is not None:
            transport._pull()  # whatever is still buffered, then EOF
            if name == "normal" and not transport._eof_from_peer:
                # The reader is paused with data still in C: keep the handle until it is read.
                transport._finish_after_eof = True
                self.close_reason = name
                return
            exc = None if name == "normal" else ConnectionResetError(f"connection {name}")
            transport._lost(exc)
        self._finish(name)

    def _finish(self, reason: str) -> None:
        """Release the C handle (exactly once) and mark the connection closed."""
        if self._released:
            return
        self._released = True
        self.close_reason = self.close_reason or reason
        self._conns.call(lambda e, now: e.tcp_release(self.conn_id, now))
        self._conns.forget(self)
        self._closed.set()


class TcpTransport(asyncio.Transport):
    """asyncio Transport over one connection of the C stack."""

    def __init__(self, conn: TcpConn, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._conn = conn
        self._protocol = protocol
        self._reading_paused = False
        self._eof_from_peer = False
        self._buffer = bytearray()
        self._eof_pending = False
        self._eof_sent = False
        self._closing = False
        self._lost_called = False
        self._writing_paused = False
        self._finish_after_eof = False

    # -- reading ---------------------------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost_called

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            asyncio.get_running_loop().call_soon(self._pull)

    def _pull(self) -> None:
        """Move what C has buffered into the protocol, until empty or paused."""
        conn = self._conn
        while not self._reading_paused and not self._eof_from_peer and not conn._released:
            try:
                data = conn._conns.call(lambda e, now: e.tcp_read(conn.conn_id, READ_CHUNK, now))
            except ConnectionResetError as exc:
                self._lost(exc)
                return
            if data is None:
                return
            if data == b"":
                self._eof_from_peer = True
                keep_open = self._protocol.eof_received()
                if self._finish_after_eof:
                    self._lost(None)
                    conn._finish("normal")
                elif not keep_open:
                    self.close()
                return
            self._protocol.data_received(data)

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._eof_pending or self._eof_sent or self._closing or self._lost_called:
            return  # after EOF or close, like a closed socket transport: silently dropped
        if self._buffer:
            self._buffer += data
        else:
            written = self._write_now(data)
            if written < len(data):
                self._buffer += memoryview(data)[written:]
        if not self._writing_paused and len(self._buffer) > WRITE_HIGH_WATER:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _write_now(self, data: bytes | bytearray | memoryview) -> int:
        conn = self._conn
        try:
            return int(conn._conns.call(lambda e, now: e.tcp_write(conn.conn_id, data, now)))
        except ConnectionResetError as exc:
            self._lost(exc)
            return len(data)

    def _push(self) -> None:
        if self._buffer:
            written = self._write_now(self._buffer)
            del self._buffer[:written]
        if not self._buffer:
            if self._eof_pending:
                self._send_eof()
            if self._closing:
                self._release()
        if self._writing_paused and len(self._buffer) <= WRITE_LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._buffer)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (WRITE_LOW_WATER, WRITE_HIGH_WATER)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # fixed: the C send buffer already absorbs bursts

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_sent or self._eof_pending:
            return
        if self._buffer:
            self._eof_pending = True
        else:
            self._send_eof()

    def _send_eof(self) -> None:
        self._eof_pending = False
        if self._eof_sent or self._conn._released:
            return
        self._eof_sent = True
        conn = self._conn
        with contextlib.suppress(_ffi.EngineError, ConnectionResetError):
            conn._conns.call(lambda e, now: e.tcp_shutdown_write(conn.conn_id, now))

    # -- closing ---------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._lost_called

    def close(self) -> None:
        """Send what is buffered, then FIN (or RST if the peer's data was left unread)."""
        if self._closing:
            return
        self._closing = True
        self._reading_paused = True
        if not self._buffer:
            self._release()

    def abort(self) -> None:
        conn = self._conn
        if not conn._released:
            with contextlib.suppress(_ffi.EngineError, ConnectionResetError):
                conn._conns.call(lambda e, now: e.tcp_abort(conn.conn_id, now))
        self._buffer.clear()
        conn.close_reason = conn.close_reason or "aborted"
        self._lost(None)
        conn._finish("aborted")

    def _release(self) -> None:
        self._lost(None)
        self._conn._finish("closed")

    def _lost(self, exc: Exception | None) -> None:
        if self._lost_called:
            return
        self._lost_called = True
        self._buffer.clear()
        asyncio.get_running_loop().call_soon(self._protocol.connection_lost, exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        conn = self._conn
        return {
            "original_dst": (conn.dst_ip, conn.dst_port),
            "sockname": (conn.dst_ip, conn.dst_port),
            "peername": (conn.peer_ip, conn.src_port),
            "peer_public_key": conn.peer_public_key,
            "tcp_conn": conn,
        }.get(name, default)


class UdpDatagram:
    """One UDP datagram a peer sent; `reply()` answers it from where it was sent to."""

    __slots__ = ("_conns", "data", "dst_ip", "dst_port", "peer_ip", "peer_public_key", "src_port")

    def __init__(self, conns: ConnTable, meta: _ffi.UdpMeta, peer_public_key: bytes) -> None:
        self._conns = conns
        self.data = meta.data
        self.peer_public_key = peer_public_key
        self.peer_ip, self.src_port = meta.src
        self.dst_ip, self.dst_port = meta.dst

    def __repr__(self) -> str:
        return (
            f"<UdpDatagram {self.peer_ip}:{self.src_port} -> {self.dst_ip}:{self.dst_port} "
            f"{len(self.data)} bytes>"
        )

    def reply(self, data: bytes) -> None:
        self.reply_from((self.dst_ip, self.dst_port), data)

    def reply_from(self, src: Endpoint, data: bytes) -> None:
        """Send `data` to the peer as if from src; one too large for the tunnel is dropped
        (the engine counts it as udp_too_large)."""
        dst = (self.peer_ip, self.src_port)
        try:
            self._conns.call(lambda e, now: e.udp_send(src, dst, data, now))
        except _ffi.EngineError as exc:
            if exc.code != _ffi.EMSGSIZE:
                raise

    def unreachable(self, *, admin: bool = False) -> None:
        code = _ffi.ICMP_ADMIN_PROHIBITED if admin else _ffi.ICMP_PORT_UNREACHABLE
        peer = (self.peer_ip, self.src_port)
        dst = (self.dst_ip, self.dst_port)
        udp = socket.IPPROTO_UDP
        self._conns.call(lambda e, now: e.icmp_unreachable(peer, dst, udp, code, now))


TcpHandler = Callable[[TcpConn], None]
# A connection the engine relayed on its own (a fast-relay destination) and the peer's public
# key -> what to call when it ends.
FastRelayHandler = Callable[[_ffi.FastOpen, bytes], SpliceDone]
UdpHandler = Callable[[UdpDatagram], None]
