"""The relay: a peer's TCP connections and UDP flows, carried on from this host's own sockets.

TCP (`relay_tcp`): the egress policy first (refused → RST to the peer), then a host connection
with a timeout (refused, unreachable or timed out → RST, so the client sees "connection refused"
at once instead of hanging), and only then the peer's SYN is answered (`conn.accept()`). Both
directions are spliced with large reads and a `drain()` after each write: a slow side stalls the
other side's reads, so memory per connection stays bounded by the buffers, not by the transfer.
EOF one way is passed on as a half-close while the other way keeps running; an error either way
aborts both. Payload is never kept, only byte counts.

UDP (`UdpRelay`): a connected host socket per (peer, peer source port, destination) flow,
created on the flow's first datagram; replies go back from the original destination. Flows end
after an idle timeout; each peer has a bounded number of flows (past it the least recently
active one is closed). The flow bookkeeping is the sans-IO `UdpFlowTable`.

Each TCP connection yields exactly one `TcpOpened` and one `TcpClosed` (refused ones too, with
the reason in `error`), so per-peer open counts can be kept from the events alone; likewise
`UdpFlowOpened` / `UdpFlowClosed` per flow (refusals are reported once per flow per idle period,
not per datagram).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import itertools
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from unclaw_tui.config import (
    DEFAULT_MAX_FLOWS_PER_PEER,
    DEFAULT_TCP_BUFFER,
    DEFAULT_UDP_IDLE_TIMEOUT,
)
from unclaw_tui.events import Event, TcpClosed, TcpOpened, UdpFlowClosed, UdpFlowOpened
from unclaw_tui.services.egress import EgressPolicy

if TYPE_CHECKING:
    from unclaw_tui.engine._ffi import FastOpen, SpliceResult

DEFAULT_CONNECT_TIMEOUT = 10.0
MIN_READ_SIZE = 64 * 1024
# Datagrams held while a flow's host socket is being created, and bytes queued in a host socket
# the kernel would not take yet; past either, datagrams are dropped (UDP may lose them anyway).
UDP_PENDING_DATAGRAMS = 32
UDP_WRITE_BUFFER_LIMIT = 256 * 1024
# Refused UDP destinations remembered so a chatty client yields one event, not one per datagram.
UDP_REFUSALS_REMEMBERED = 1024
CLOSE_WAIT = 5.0  # seconds to let a closing side flush before giving up on it

PeerName = Callable[[bytes], str]


# --- the flow API contract (engine/flows.py), as much of it as the relay uses -----------------


class TcpConnLike(Protocol):
    conn_id: int
    peer_public_key: bytes
    peer_ip: str
    src_port: int
    dst_ip: str
    dst_port: int

    def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...
    def reject(self) -> None: ...
    def abort(self) -> None: ...


class UdpDatagramLike(Protocol):
    data: bytes
    peer_public_key: bytes
    peer_ip: str
    src_port: int
    dst_ip: str
    dst_port: int

    def reply(self, data: bytes) -> None: ...
    def unreachable(self, *, admin: bool = False) -> None: ...


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


# --- TCP ---------------------------------------------------------------------------------------


class ConnectFailed(Exception):
    """The destination could not be reached; str() is the short reason for the event."""


async def connect_host(
    ip: str,
    port: int,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    buffer_size: int = DEFAULT_TCP_BUFFER,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from this host, with TCP_NODELAY and buffers bounded by buffer_size."""
    return await host_streams(await connect_socket(ip, port, timeout=timeout), buffer_size)


async def host_streams(
    sock: socket.socket, buffer_size: int = DEFAULT_TCP_BUFFER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over a connected host socket, with buffers bounded by buffer_size."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=buffer_size)
    writer.transport.set_write_buffer_limits(high=buffer_size)
    return reader, writer


async def connect_socket(
    ip: str, port: int, *, timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> socket.socket:
    """A connected non-blocking TCP socket from this host (TCP_NODELAY), for the engine's
    splices to take over; errors as `connect_host`."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)), timeout)
    except (TimeoutError, OSError) as exc:
        sock.close()
        raise _connect_failed(exc, timeout) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_failed(exc: BaseException, timeout: float) -> ConnectFailed:
    if isinstance(exc, TimeoutError):
        return ConnectFailed(f"connect timeout after {timeout:g} s")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectFailed("connection refused")
    assert isinstance(exc, OSError)
    return ConnectFailed((exc.strerror or str(exc)).lower())


_LINGER_ZERO = struct.pack("ii", 1, 0)


def reset_host_connection(writer: asyncio.StreamWriter) -> None:
    """Abort with an RST, not a FIN: a plain close would tell the destination that the data so
    far was complete, when the peer's side actually failed."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    writer.transport.abort()


@dataclass(slots=True)
class SpliceStats:
    """Live counters of a splice; `error` is set when it ended abnormally."""

    bytes_up: int = 0  # peer -> destination
    bytes_down: int = 0  # destination -> peer
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a splice: its streams and how to abort it (RST)."""

    name: str  # "peer" / "destination", for error messages
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    abort: Callable[[], None]


class _SideFailed(Exception):
    def __init__(self, side: str, exc: BaseException) -> None:
        super().__init__(f"{side}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def _pump(src: Side, dst: Side, read_size: int, count: Callable[[int], None]) -> None:
    while True:
        try:
            data = await src.reader.read(read_size)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise _SideFailed(src.name, exc) from exc
        try:
            if not data:
                # Half-close: pass the EOF on, the other direction keeps running.
                if dst.writer.can_write_eof():
                    dst.writer.write_eof()
                return
            dst.writer.write(data)
            count(len(data))
            await dst.writer.drain()  # back-pressure: stop reading while dst is full
        except (OSError, RuntimeError) as exc:
            raise _SideFailed(dst.name, exc) from exc


async def _close_gracefully(side: Side) -> None:
    side.writer.close()
    try:
        await asyncio.wait_for(side.writer.wait_closed(), CLOSE_WAIT)
    except (OSError, TimeoutError):
        side.abort()


async def splice(
    peer: Side,
    destination: Side,
    *,
    read_size: int = MIN_READ_SIZE,
    stats: SpliceStats | None = None,
) -> SpliceStats:
    """Copy both ways until both have seen EOF (then close both) or either fails (then abort
    both). Cancelling aborts both. Counters in `stats` are live while it runs."""
    stats = stats if stats is not None else SpliceStats()

    def count_up(n: int) -> None:
        stats.bytes_up += n

    def count_down(n: int) -> None:
        stats.bytes_down += n

    up = asyncio.ensure_future(_pump(peer, destination, read_size, count_up))
    down = asyncio.ensure_future(_pump(destination, peer, read_size, count_down))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        stats.error = "cancelled"
        _abort_all(peer, destination, up, down)
        raise
    for task in (up, down):
        if task.done() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            stats.error = str(exc) if isinstance(exc, _SideFailed) else _describe(exc)
            _abort_all(peer, destination, up, down)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(up, down, return_exceptions=True)
            return stats
    await asyncio.gather(_close_gracefully(peer), _close_gracefully(destination))
    return stats


def _abort_all(peer: Side, destination: Side, *tasks: asyncio.Future[None]) -> None:
    for task in tasks:
        task.cancel()
        # Nobody awaits them on this path: fetch the outcome so asyncio does not log it.
        task.add_done_callback(_consume_outcome)
    for side in (peer, destination):
        with contextlib.suppress(Exception):
            side.abort()


def _consume_outcome(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


class OpenFlows:
    """Open TCP connections and UDP flows per peer (and per destination address), kept from
    the relay's event pairs (every opened event is followed by exactly one closed event with
    the same conn_id)."""

    def __init__(self) -> None:
        # (protocol, conn_id) -> (peer public key (base64), dst ip): TCP and UDP ids are
        # separate spaces.
        self._open: dict[tuple[str, int], tuple[str, str]] = {}
        self._per_peer: dict[str, int] = {}
        self._per_dst: dict[str, int] = {}
        # Live counters of open TCP connections that Python relays (TLS...), by conn_id.
        self._live: dict[int, SpliceStats] = {}

    def track(self, conn_id: int, stats: SpliceStats) -> None:
        """Publish an open TCP connection's live counters (until its TcpClosed)."""
        self._live[conn_id] = stats

    def live_bytes(self) -> dict[int, tuple[int, int]]:
        """{conn_id: (up, down)} of the tracked open TCP connections that moved bytes."""
        return {
            conn_id: (s.bytes_up, s.bytes_down)
            for conn_id, s in self._live.items()
            if s.bytes_up or s.bytes_down
        }

    def observe(self, event: Event) -> None:
        if isinstance(event, TcpOpened | UdpFlowOpened):
            flow = ("tcp" if isinstance(event, TcpOpened) else "udp", event.conn_id)
            if flow not in self._open:
                self._open[flow] = (event.peer_public_key, event.dst_ip)
                key = event.peer_public_key
                self._per_peer[key] = self._per_peer.get(key, 0) + 1
                self._per_dst[event.dst_ip] = self._per_dst.get(event.dst_ip, 0) + 1
        elif isinstance(event, TcpClosed | UdpFlowClosed):
            if isinstance(event, TcpClosed):
                self._live.pop(event.conn_id, None)
            flow = ("tcp" if isinstance(event, TcpClosed) else "udp", event.conn_id)
            entry = self._open.pop(flow, None)
            if entry is not None:
                key, dst_ip = entry
                _decrement(self._per_peer, key)
                _decrement(self._per_dst, dst_ip)

    def count(self, peer_public_key: str) -> int:
        """Open flows of a peer (public key in base64, as in the events)."""
        return self._per_peer.get(peer_public_key, 0)

    def count_to(self, dst_ip: str) -> int:
        """Open flows to a destination address (as the flow events name it, e.g. a VIP)."""
        return self._per_dst.get(dst_ip, 0)

    @property
    def total(self) -> int:
        return len(self._open)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


async def relay_tcp(
    conn: TcpConnLike,
    policy: EgressPolicy,
    *,
    peer_name: PeerName,
    on_open: Callable[[TcpOpened], None],
    on_close: Callable[[TcpClosed], None],
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    buffer_size: int = DEFAULT_TCP_BUFFER,
    route: str = "relay",
    hostname: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TcpClosed:
    """Relay one peer connection to its destination; returns the close event it emitted."""
    started = clock()
    ident = flow_ident(conn, peer_name, route, hostname)
    on_open(TcpOpened(**ident))
    stats = SpliceStats()
    accepted = False
    try:
        reason = policy.check(conn.dst_ip)
        if reason is not None:
            conn.reject()
            stats.error = f"refused by egress policy: {reason}"
            return _closed(ident, stats, clock() - started, on_close)
        try:
            host_reader, host_writer = await connect_host(
                conn.dst_ip, conn.dst_port, timeout=connect_timeout, buffer_size=buffer_size
            )
        except ConnectFailed as exc:
            conn.reject()
            stats.error = str(exc)
            return _closed(ident, stats, clock() - started, on_close)
        try:
            peer_reader, peer_writer = conn.accept()
        except Exception as exc:
            # The engine gave up on the SYN (or the peer reset) while we were connecting.
            reset_host_connection(host_writer)
            stats.error = f"peer gone before accept: {_describe(exc)}"
            return _closed(ident, stats, clock() - started, on_close)
        accepted = True
        # Our side of the peer's buffering, if the engine's transport lets us bound it.
        with contextlib.suppress(NotImplementedError, AttributeError):
            peer_writer.transport.set_write_buffer_limits(high=buffer_size)
        await splice(
            Side("peer", peer_reader, peer_writer, conn.abort),
            Side(
                "destination", host_reader, host_writer, lambda: reset_host_connection(host_writer)
            ),
            read_size=max(MIN_READ_SIZE, buffer_size),
            stats=stats,
        )
        return _closed(ident, stats, clock() - started, on_close)
    except asyncio.CancelledError:
        if not accepted:
            with contextlib.suppress(Exception):
                conn.reject()
        stats.error = "cancelled"
        _closed(ident, stats, clock() - started, on_close)
        raise
    except Exception as exc:
        # A bug or an engine failure: still tell the peer (RST) and the observers.
        with contextlib.suppress(Exception):
            if accepted:
                conn.abort()
            else:
                conn.reject()
        stats.error = f"internal error: {_describe(exc)}"
        _closed(ident, stats, clock() - started, on_close)
        raise


class SpliceableConn(TcpConnLike, Protocol):
    def splice(
        self, dst: tuple[str, int], timeout: float, on_done: Callable[[SpliceResult], None]
    ) -> None: ...


def relay_tcp_spliced(
    conn: SpliceableConn,
    policy: EgressPolicy,
    *,
    peer_name: PeerName,
    on_open: Callable[[TcpOpened], None],
    on_close: Callable[[TcpClosed], None],
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    route: str = "relay",
    hostname: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """`relay_tcp` with the bytes moved in C (engine splices): the same policy, events and
    answers to the peer, but no task and no Python per read.  Returns at once, True when the
    connection went to C (the policy allowed it); the close event is emitted when it ends."""
    started = clock()
    ident = flow_ident(conn, peer_name, route, hostname)
    on_open(TcpOpened(**ident))
    reason = policy.check(conn.dst_ip)
    if reason is not None:
        conn.reject()
        stats = SpliceStats(error=f"refused by egress policy: {reason}")
        _closed(ident, stats, clock() - started, on_close)
        return False

    def done(result: SpliceResult) -> None:
        _closed(ident, spliced_stats(result, connect_timeout), clock() - started, on_close)

    try:
        conn.splice((conn.dst_ip, conn.dst_port), connect_timeout, done)
    except OSError as exc:
        conn.reject()
        _closed(ident, SpliceStats(error=_describe(exc)), clock() - started, on_close)
        return False
    return True


def fast_relayed(
    opened: FastOpen,
    peer_public_key: bytes,
    *,
    peer_name: PeerName,
    on_open: Callable[[TcpOpened], None],
    on_close: Callable[[TcpClosed], None],
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    route: str = "relay",
) -> Callable[[SpliceResult], None]:
    """The events of a connection the engine relayed on its own (its destination was approved
    by an earlier `relay_tcp_spliced`): the same `TcpOpened` and `TcpClosed` as that one's,
    reported afterwards.  Returns what to call with its result."""
    ident = _ident(
        opened.conn_id, peer_public_key, opened.src[0], opened.dst, peer_name, route, None
    )
    on_open(TcpOpened(**ident))

    def done(result: SpliceResult) -> None:
        stats = spliced_stats(result, connect_timeout)
        _closed(ident, stats, max(0.0, result.ended_at - opened.opened_at), on_close)

    return done


def flow_ident(
    conn: TcpConnLike, peer_name: PeerName, route: str, hostname: str | None
) -> dict[str, Any]:
    """The fields a connection's TcpOpened and TcpClosed share."""
    return _ident(
        conn.conn_id,
        conn.peer_public_key,
        conn.peer_ip,
        (conn.dst_ip, conn.dst_port),
        peer_name,
        route,
        hostname,
    )


def _ident(
    conn_id: int,
    peer_public_key: bytes,
    peer_ip: str,
    dst: tuple[str, int],
    peer_name: PeerName,
    route: str,
    hostname: str | None,
) -> dict[str, Any]:
    return {
        "conn_id": conn_id,
        "peer": peer_name(peer_public_key),
        "peer_public_key": _b64(peer_public_key),
        "peer_ip": peer_ip,
        "dst_ip": dst[0],
        "dst_port": dst[1],
        "hostname": hostname,
        "route": route,
    }


# Why the peer's side of a splice ended, by _ffi.TCP_CLOSE_NAMES name, as the event words it.
_PEER_CLOSE_ERRORS = {
    "reset": "connection reset",
    "timeout": "timed out",
    "peer_removed": "peer removed",
    "evicted": "evicted",
    "aborted": "aborted",
    "syn_timeout": "handshake timed out",
}


def spliced_stats(result: SpliceResult, connect_timeout: float) -> SpliceStats:
    """A splice's final counters and `TcpClosed.error`."""
    return SpliceStats(result.bytes_up, result.bytes_down, splice_error(result, connect_timeout))


def splice_error(result: SpliceResult, connect_timeout: float) -> str | None:
    """The `TcpClosed.error` for how a splice ended, worded as `relay_tcp` words it."""
    # The compiled engine: imported here, as everywhere in the services, once it runs.
    from unclaw_tui.engine import _ffi

    if result.outcome == _ffi.SPLICE_OK:
        return None
    if result.outcome == _ffi.SPLICE_FAIL_CONNECT:
        if result.error == errno.ETIMEDOUT:
            return f"connect timeout after {connect_timeout:g} s"
        return _describe(OSError(result.error, os.strerror(result.error)))
    if result.outcome == _ffi.SPLICE_FAIL_HOST:
        return f"destination: {_describe(OSError(result.error, os.strerror(result.error)))}"
    closed_as = _ffi.TCP_CLOSE_NAMES.get(result.tcp_close, "")
    peer_error = _PEER_CLOSE_ERRORS.get(closed_as, "connection closed early")
    if result.outcome == _ffi.SPLICE_FAIL_PEER:
        return f"peer: {peer_error}"
    if result.outcome == _ffi.SPLICE_FAIL_PEER_GONE:
        return f"peer gone before accept: {peer_error}"
    return "aborted"


def _closed(
    ident: dict[str, Any],
    stats: SpliceStats,
    duration: float,
    on_close: Callable[[TcpClosed], None],
) -> TcpClosed:
    event = TcpClosed(
        **ident,
        bytes_up=stats.bytes_up,
        bytes_down=stats.bytes_down,
        duration=duration,
        error=stats.error,
    )
    on_close(event)
    return event


# --- UDP: the flow table (sans-IO) -----------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    last_active: float


class UdpFlowTable(Generic[K, V]):
    """Flows by key, grouped per peer in order of last activity (least recent first).

    Time is a parameter: `add`/`touch` take `now`, `expire(now)` removes idle flows and
    `next_deadline()` says when the next one goes idle.
    """

    def __init__(self, *, max_per_peer: int, idle_timeout: float) -> None:
        if max_per_peer < 1:
            raise ValueError("max_per_peer must be at least 1")
        self.max_per_peer = max_per_peer
        self.idle_timeout = idle_timeout
        self._by_peer: dict[bytes, OrderedDict[K, _Entry[V]]] = {}
        self._peer_of: dict[K, bytes] = {}

    def __len__(self) -> int:
        return len(self._peer_of)

    def __contains__(self, key: K) -> bool:
        return key in self._peer_of

    def get(self, key: K) -> V | None:
        peer = self._peer_of.get(key)
        return None if peer is None else self._by_peer[peer][key].value

    def count(self, peer: bytes) -> int:
        flows = self._by_peer.get(peer)
        return len(flows) if flows else 0

    def values(self) -> list[V]:
        return [e.value for flows in self._by_peer.values() for e in flows.values()]

    def touch(self, key: K, now: float) -> None:
        flows = self._by_peer[self._peer_of[key]]
        flows[key].last_active = now
        flows.move_to_end(key)

    def add(self, peer: bytes, key: K, value: V, now: float) -> list[tuple[K, V]]:
        """Insert a new flow; returns the flows evicted to keep the peer within its bound."""
        if key in self._peer_of:
            raise KeyError(f"flow already present: {key!r}")
        flows = self._by_peer.setdefault(peer, OrderedDict())
        evicted: list[tuple[K, V]] = []
        while len(flows) >= self.max_per_peer:
            old_key, old = flows.popitem(last=False)
            del self._peer_of[old_key]
            evicted.append((old_key, old.value))
        flows[key] = _Entry(value, now)
        self._peer_of[key] = peer
        return evicted

    def pop(self, key: K) -> V | None:
        peer = self._peer_of.pop(key, None)
        if peer is None:
            return None
        flows = self._by_peer[peer]
        entry = flows.pop(key)
        if not flows:
            del self._by_peer[peer]
        return entry.value

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Remove and return every flow idle for idle_timeout or longer."""
        expired: list[tuple[K, V]] = []
        for peer in list(self._by_peer):
            flows = self._by_peer[peer]
            while flows:
                key, entry = next(iter(flows.items()))
                if now - entry.last_active < self.idle_timeout:
                    break
                flows.popitem(last=False)
                del self._peer_of[key]
                expired.append((key, entry.value))
            if not flows:
                del self._by_peer[peer]
        return expired

    def next_deadline(self) -> float | None:
        """When the least recently active flow goes idle, or None with no flows."""
        firsts = [next(iter(flows.values())).last_active for flows in self._by_peer.values()]
        return min(firsts) + self.idle_timeout if firsts else None


# --- UDP: the relay ----------------------------------------------------------------------------

FlowKey = tuple[bytes, int, str, int]  # peer public key, peer source port, dst ip, dst port


@dataclass(slots=True, eq=False)
class _UdpFlow:
    key: FlowKey
    conn_id: int
    ident: dict[str, Any]
    started: float
    # The latest datagram of the flow, only to answer through (`reply`, `unreachable`).
    reply_to: UdpDatagramLike | None
    target_ip: str = ""  # where the host socket goes; the key's dst ip unless overridden
    pending: list[bytes] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None
    opening: asyncio.Task[None] | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    closed: bool = False


class _HostSocket(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, flow: _UdpFlow) -> None:
        self.relay = relay
        self.flow = flow

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._on_reply(self.flow, data)

    def error_received(self, exc: Exception) -> None:
        # The socket is connected, so the kernel reports the destination's ICMP errors here:
        # pass "port unreachable" on so the client fails fast, as it would without us.
        if isinstance(exc, ConnectionRefusedError) and self.flow.reply_to is not None:
            self.flow.reply_to.unreachable()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.flow.closed:
            self.relay._finish(self.flow, _describe(exc) if exc else "host socket closed")


class UdpRelay:
    """UDP flows from peers, relayed through connected host sockets. `handle` is synchronous
    (fit for `tunnel.on_udp`); `close()` ends every flow."""

    def __init__(
        self,
        policy: EgressPolicy,
        *,
        peer_name: PeerName,
        on_open: Callable[[UdpFlowOpened], None],
        on_close: Callable[[UdpFlowClosed], None],
        idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT,
        max_flows_per_peer: int = DEFAULT_MAX_FLOWS_PER_PEER,
        flow_ids: Iterator[int] | None = None,
        route: str = "relay",
    ) -> None:
        self.policy = policy
        self._peer_name = peer_name
        self._on_open = on_open
        self._on_close = on_close
        self._route = route
        # UDP flows have no engine id; numbered far from the engine's TCP ids by default.
        self._ids = flow_ids if flow_ids is not None else itertools.count(1 << 32)
        self.flows: UdpFlowTable[FlowKey, _UdpFlow] = UdpFlowTable(
            max_per_peer=max_flows_per_peer, idle_timeout=idle_timeout
        )
        self._refused: OrderedDict[FlowKey, float] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- public -------------------------------------------------------------------------------

    def open_flows(self, peer_public_key: bytes) -> int:
        return self.flows.count(peer_public_key)

    def handle(
        self,
        dgram: UdpDatagramLike,
        *,
        target_ip: str | None = None,
        hostname: str | None = None,
    ) -> None:
        """Relay one datagram from a peer (creating its flow on first use).

        `target_ip` sends a new flow to another address than the datagram's destination (a
        VIP's real address; replies still come from the destination the peer used, and the
        events name that destination with `hostname`). An existing flow keeps its target."""
        if self._closed:
            dgram.unreachable()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        key: FlowKey = (dgram.peer_public_key, dgram.src_port, dgram.dst_ip, dgram.dst_port)
        flow = self.flows.get(key)
        if flow is not None:
            self.flows.touch(key, now)
            flow.reply_to = dgram
            self._send(flow, dgram.data)
            return
        target = target_ip if target_ip is not None else dgram.dst_ip
        reason = self.policy.check(target)
        if reason is not None:
            dgram.unreachable(admin=True)
            self._report_refusal(key, dgram, reason, now, hostname)
            return
        flow = _UdpFlow(
            key=key,
            conn_id=next(self._ids),
            ident=self._ident(dgram, hostname),
            started=time.monotonic(),
            reply_to=dgram,
            target_ip=target,
        )
        for _key, old in self.flows.add(dgram.peer_public_key, key, flow, now):
            self._finish(old, "closed: flow limit per peer reached", remove=False)
        self._on_open(UdpFlowOpened(conn_id=flow.conn_id, **flow.ident))
        flow.pending.append(dgram.data)
        flow.opening = loop.create_task(self._open(flow))
        self._arm(loop)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for flow in self.flows.values():
            self._finish(flow, None)
        self._refused.clear()

    # -- flows --------------------------------------------------------------------------------

    def _ident(self, dgram: UdpDatagramLike, hostname: str | None = None) -> dict[str, Any]:
        return {
            "peer": self._peer_name(dgram.peer_public_key),
            "peer_public_key": _b64(dgram.peer_public_key),
            "peer_ip": dgram.peer_ip,
            "dst_ip": dgram.dst_ip,
            "dst_port": dgram.dst_port,
            "hostname": hostname,
            "route": self._route,
        }

    async def _open(self, flow: _UdpFlow) -> None:
        _peer, _sport, dst_ip, dst_port = flow.key
        loop = asyncio.get_running_loop()
        try:
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _HostSocket(self, flow), remote_addr=(flow.target_ip or dst_ip, dst_port)
            )
        except OSError as exc:
            if flow.reply_to is not None:
                flow.reply_to.unreachable()
            self._finish(flow, _describe(exc))
            return
        flow.opening = None
        if flow.closed:  # evicted or relay closed while the socket was being made
            transport.abort()
            return
        flow.transport = transport
        pending, flow.pending = flow.pending, []
        for data in pending:
            self._send(flow, data)

    def _send(self, flow: _UdpFlow, data: bytes) -> None:
        if flow.transport is None:
            if len(flow.pending) < UDP_PENDING_DATAGRAMS:
                flow.pending.append(data)
            return
        # The transport queues what the kernel refuses; keep that queue bounded.
        if flow.transport.get_write_buffer_size() > UDP_WRITE_BUFFER_LIMIT:
            return
        flow.transport.sendto(data)
        flow.bytes_up += len(data)

    def _on_reply(self, flow: _UdpFlow, data: bytes) -> None:
        if flow.closed or flow.reply_to is None:
            return
        self.flows.touch(flow.key, asyncio.get_running_loop().time())
        flow.bytes_down += len(data)
        flow.reply_to.reply(data)

    def _finish(self, flow: _UdpFlow, error: str | None, *, remove: bool = True) -> None:
        if flow.closed:
            return
        flow.closed = True
        if remove:
            self.flows.pop(flow.key)
        if flow.opening is not None:
            flow.opening.cancel()
            flow.opening = None
        if flow.transport is not None:
            flow.transport.abort()
            flow.transport = None
        flow.pending.clear()
        flow.reply_to = None
        self._on_close(
            UdpFlowClosed(
                conn_id=flow.conn_id,
                **flow.ident,
                bytes_up=flow.bytes_up,
                bytes_down=flow.bytes_down,
                duration=time.monotonic() - flow.started,
                error=error,
            )
        )

    def _report_refusal(
        self,
        key: FlowKey,
        dgram: UdpDatagramLike,
        reason: str,
        now: float,
        hostname: str | None = None,
    ) -> None:
        seen = self._refused.get(key)
        if seen is not None and now - seen < self.flows.idle_timeout:
            return
        self._refused[key] = now
        self._refused.move_to_end(key)
        while len(self._refused) > UDP_REFUSALS_REMEMBERED:
            self._refused.popitem(last=False)
        conn_id = next(self._ids)
        ident = self._ident(dgram, hostname)
        self._on_open(UdpFlowOpened(conn_id=conn_id, **ident))
        self._on_close(
            UdpFlowClosed(
                conn_id=conn_id,
                **ident,
                error=f"refused by egress policy: {reason}",
            )
        )

    # -- idle timer: one timer for the next flow to go idle ----------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = self.flows.next_deadline()
        if deadline is None or self._closed:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        if self._timer is not None and self._timer.when() <= deadline:
            return  # fires early at worst, then re-arms for the later deadline
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(deadline, self._sweep, loop, deadline)

    def _sweep(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self._timer = None
        # call_at may run a hair before `deadline` (clock resolution): never judge earlier.
        for _key, flow in self.flows.expire(max(loop.time(), deadline)):
            self._finish(flow, None, remove=False)
        self._arm(loop)
