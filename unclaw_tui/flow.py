"""One TCP connection or UDP flow from decision to close, and `carry`, which moves its bytes.

A `Flow` is made when the gateway first hears of a connection (its SYN) or a UDP flow (its first
datagram) and the decision point has routed it. It holds the flow's identity (peer name, key and
tunnel IP, source port, destination, hostname, route, protocol), its counters and its outcome,
and it publishes its own `TcpOpened`/`TcpClosed` (`UdpFlowOpened`/`UdpFlowClosed`) exactly once
each, refused flows included: services never build those events. Its lifecycle:

    made (decided) --open()--> opened --close(error)--> closed
                   \\-------refuse(reason): RST, opened and closed at once--/

`carry(flow, destination)` relays a TCP connection to its destination until it ends: in C (an
engine splice: no Python per byte) when the engine can take the connection, else with Python's
pump (`pump.py`). Services that must see the bytes (TLS, DNS) take streams instead (`accept`).

`FlowRegistry` is every open flow of the gateway: counts per peer and destination, the host
descriptors each peer's flows hold (`hold_descriptor`, against the gateway's `DescriptorBudget`),
live byte counters of the flows Python pumps, and the pumps to cancel when the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unclaw_tui.budget import DescriptorBudget, DescriptorLedger, current_descriptor_limit
from unclaw_tui.config import (
    DEFAULT_MAX_CONNS_PER_PEER,
    DEFAULT_MAX_FLOWS_PER_PEER,
    DEFAULT_TCP_BUFFER,
)
from unclaw_tui.engine import b64, describe_os_error, splice_error
from unclaw_tui.events import Event, TcpClosed, TcpOpened, UdpFlowClosed, UdpFlowOpened
from unclaw_tui.pump import (
    DEFAULT_CONNECT_TIMEOUT,
    MIN_READ_SIZE,
    ConnectFailed,
    Side,
    connect_host,
    host_streams,
    reset_host_connection,
    splice,
)

if TYPE_CHECKING:  # tests pass stand-ins for TcpConn with the methods flows use
    from unclaw_tui.engine import FastOpen, SpliceResult, TcpConn

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
PeerName = Callable[[bytes], str]
# UDP flows have no engine id: numbered far from the engine's TCP ids.
UDP_FLOW_IDS_START = 1 << 32


@dataclass(slots=True, eq=False, repr=False)
class Flow:
    """See the module docstring. Counters (`bytes_up`, `bytes_down`) and `error` are live."""

    _registry: FlowRegistry
    proto: str
    conn_id: int
    peer_key: bytes
    peer_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    route: str
    hostname: str | None = None
    conn: TcpConn | None = None
    peer: str = field(init=False)
    peer_public_key: str = field(init=False)
    started: float = field(init=False)
    bytes_up: int = field(default=0, init=False)  # peer -> destination
    bytes_down: int = field(default=0, init=False)  # destination -> peer
    error: str | None = field(default=None, init=False)
    _engine_started: float | None = field(default=None, init=False)  # fast-relayed: C's clock
    _opened: bool = field(default=False, init=False)
    _closed: bool = field(default=False, init=False)
    _descriptor: bool = field(default=False, init=False)  # counted in the registry's ledger
    _ended: asyncio.Future[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.peer = self._registry.peer_name(self.peer_key)
        self.peer_public_key = b64(self.peer_key)
        self.started = self._registry.clock()

    def __repr__(self) -> str:
        return (
            f"<Flow {self.proto} {self.conn_id} {self.peer_ip}:{self.src_port} -> "
            f"{self.dst_ip}:{self.dst_port} {self.route}>"
        )

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def open(self, hostname: str | None = None) -> None:
        """Publish the opened event (once); `hostname` if it is known only now (TLS's SNI)."""
        if self._opened:
            return
        if hostname is not None:
            self.hostname = hostname
        self._opened = True
        self._registry._opened(self)
        self._registry.publish(self._event(TcpOpened if self.proto == "tcp" else UdpFlowOpened))

    def close(self, error: str | None = None, *, duration: float | None = None) -> None:
        """Publish the closed event (once, after the opened one); `error` unless set already."""
        if self._closed:
            return
        self.open()
        self._closed = True
        if error is not None and self.error is None:
            self.error = error
        if duration is None:
            duration = self._registry.clock() - self.started
        cls = TcpClosed if self.proto == "tcp" else UdpFlowClosed
        self._registry._closed(self)
        if self._descriptor:
            self._descriptor = False
            self._registry.descriptors.give(self.peer_key)
        self._registry.publish(
            self._event(
                cls,
                bytes_up=self.bytes_up,
                bytes_down=self.bytes_down,
                duration=duration,
                error=self.error,
            )
        )
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def _event(self, cls: type[Any], **more: Any) -> Event:
        return cls(
            conn_id=self.conn_id,
            peer=self.peer,
            peer_public_key=self.peer_public_key,
            peer_ip=self.peer_ip,
            src_port=self.src_port,
            dst_ip=self.dst_ip,
            dst_port=self.dst_port,
            hostname=self.hostname,
            route=self.route,
            **more,
        )

    def ended(self) -> asyncio.Future[None]:
        """Done once the flow has closed."""
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
            if self._closed:
                self._ended.set_result(None)
        return self._ended

    # -- answering the peer (TCP) ------------------------------------------------------------

    def refuse(self, reason: str) -> None:
        """RST the peer's SYN (it sees "connection refused" at once) and close with `reason`."""
        if self.conn is not None and not self._closed:
            with contextlib.suppress(Exception):
                self.conn.reject()
        self.close(reason)

    def accept(self) -> Streams:
        """Answer the SYN and give the peer's side as streams, for services that read it.
        Raises `PeerGone` (the flow closed) when the engine gave up on the SYN meanwhile."""
        assert self.conn is not None, "UDP flows have no streams"
        try:
            return self.conn.accept()
        except Exception as exc:
            self.close(f"peer gone before accept: {describe_os_error(exc)}")
            raise PeerGone from exc

    def abort(self) -> None:
        """RST the peer's connection, whatever state it is in."""
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.abort()

    def spliced(self, result: SpliceResult) -> None:
        """A splice of this flow ended in C: take its counters and close."""
        self.bytes_up += result.bytes_up
        self.bytes_down += result.bytes_down
        duration = None
        if self._engine_started is not None:
            duration = max(0.0, result.ended_at - self._engine_started)
        self.close(splice_error(result, self._registry.connect_timeout), duration=duration)

    async def pump(self, peer: Side, destination: Side, read_size: int = MIN_READ_SIZE) -> None:
        """Copy both ways with Python's pump until both ends close (or one fails), counting
        into this flow; its counters are live in the registry meanwhile."""
        self._registry._pumped[self.conn_id] = self
        await splice(peer, destination, read_size=read_size, stats=self)


class PeerGone(Exception):
    """The peer's connection ended before we answered its SYN (the flow is closed)."""


# --- carry -------------------------------------------------------------------------------------


def carry(
    flow: Flow,
    destination: Endpoint | socket.socket,
    *,
    streams: Streams | None = None,
    first: bytes = b"",
) -> None:
    """Relay the flow's connection to `destination` until it ends, then close the flow.

    `destination` is an address to connect to (the SYN is answered once connected, RST if that
    fails), or a socket the caller already connected. `streams`: the peer's side was accepted
    already and read from (TLS passthrough); `first` (what was read, e.g. the ClientHello) is
    sent to the destination ahead of the rest. In C when the engine can take the connection,
    else with Python's pump. Returns at once (`await flow.ended()` to wait for the end: a
    spliced connection needs no task or future of ours)."""
    conn = flow.conn
    assert conn is not None, "carry is for TCP flows"
    flow.bytes_up += len(first)
    if conn.can_splice:
        if streams is None:
            if _splice_unanswered(flow, conn, destination):
                return
        else:
            assert isinstance(destination, socket.socket)
            left = _hand_over(flow, conn, destination, streams, first)
            if left is None:
                return
            first = left
    flow._registry.spawn(_carry_in_python(flow, conn, destination, streams, first))


def _splice_unanswered(flow: Flow, conn: TcpConn, destination: Endpoint | socket.socket) -> bool:
    """Give an unanswered connection to C; False (nothing changed) if C cannot start it."""
    try:
        if isinstance(destination, socket.socket):
            conn.splice_socket(destination, flow.spliced)
        else:
            conn.splice(destination, flow._registry.connect_timeout, flow.spliced)
    except Exception as exc:
        if isinstance(destination, socket.socket):
            destination.close()
        if isinstance(exc, OSError):  # no socket for the connect: refuse, as Python would
            flow.refuse(describe_os_error(exc))
        else:  # the engine no longer has the SYN
            flow.close(f"peer gone before accept: {describe_os_error(exc)}")
    return True


def _hand_over(
    flow: Flow, conn: TcpConn, sock: socket.socket, streams: Streams, first: bytes
) -> bytes | None:
    """Send `first` (and what the reader held) to the destination and let C relay the rest of
    an accepted connection; None once C has it. If the socket does not take it all at once (a
    hello larger than its buffer) or C cannot take the connection, what is left to send, with
    the peer's side back in Python's hands."""
    left = conn.detach_reading(streams[0])
    if left is None:
        return first
    first += left
    flow.bytes_up += len(left)
    try:
        sent = sock.send(first)
    except OSError:  # full (BlockingIOError) or failed: Python's pump reports the latter
        sent = 0
    if sent == len(first):
        try:
            conn.splice_accepted(sock, flow.spliced)
            return None
        except Exception as exc:
            log.debug("connection stays in Python: %s", exc)
    streams[1].transport.resume_reading()  # undoes detach_reading's pause
    return first[sent:]


async def _carry_in_python(
    flow: Flow,
    conn: TcpConn,
    destination: Endpoint | socket.socket,
    streams: Streams | None,
    first: bytes,
) -> None:
    buffer_size = flow._registry.buffer_size
    answered = streams is not None
    try:
        if isinstance(destination, socket.socket):
            host_reader, host_writer = await host_streams(destination, buffer_size)
        else:
            try:
                host_reader, host_writer = await connect_host(
                    *destination,
                    timeout=flow._registry.connect_timeout,
                    buffer_size=buffer_size,
                )
            except ConnectFailed as exc:
                flow.refuse(str(exc))
                return
        if streams is None:
            try:
                streams = flow.accept()
            except PeerGone:
                reset_host_connection(host_writer)
                return
            answered = True
            # Our side of the peer's buffering, if the engine's transport lets us bound it.
            with contextlib.suppress(NotImplementedError, AttributeError):
                streams[1].transport.set_write_buffer_limits(high=buffer_size)
        if first:
            host_writer.write(first)
        peer_reader, peer_writer = streams
        await flow.pump(
            Side("peer", peer_reader, peer_writer, conn.abort),
            Side(
                "destination", host_reader, host_writer, lambda: reset_host_connection(host_writer)
            ),
            read_size=max(MIN_READ_SIZE, buffer_size),
        )
        flow.close()
    except asyncio.CancelledError:
        if answered:
            flow.abort()
            flow.close("cancelled")
        else:
            flow.refuse("cancelled")
        raise
    except Exception as exc:
        # A bug or an engine failure: still tell the peer (RST) and the observers.
        log.exception("relaying %r failed", flow)
        if answered:
            flow.abort()
            flow.close(f"internal error: {describe_os_error(exc)}")
        else:
            flow.refuse(f"internal error: {describe_os_error(exc)}")


# --- the registry ------------------------------------------------------------------------------


class FlowRegistry:
    """Every open flow: made here, counted here until closed (see the module docstring)."""

    def __init__(
        self,
        publish: Callable[[Event], None],
        peer_name: PeerName,
        *,
        buffer_size: int = DEFAULT_TCP_BUFFER,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        budget: DescriptorBudget | None = None,
    ) -> None:
        self.publish = publish
        self.peer_name = peer_name
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self.clock = clock
        self._udp_ids = itertools.count(UDP_FLOW_IDS_START)
        self._open: dict[tuple[str, int], Flow] = {}
        self._per_peer: dict[str, int] = {}
        self._per_dst: dict[str, int] = {}
        self._pumped: dict[int, Flow] = {}  # open TCP flows Python pumps, for live counters
        self._tasks: set[asyncio.Task[None]] = set()
        if budget is None:  # the gateway plans the real one at start, from the raised limit
            budget = DescriptorBudget.plan(
                current_descriptor_limit(),
                max_conns_per_peer=DEFAULT_MAX_CONNS_PER_PEER,
                max_flows_per_peer=DEFAULT_MAX_FLOWS_PER_PEER,
            )
        self.descriptors = DescriptorLedger(budget)

    # -- making flows ------------------------------------------------------------------------

    def tcp(self, conn: TcpConn, *, route: str, hostname: str | None = None) -> Flow:
        return Flow(
            self,
            proto="tcp",
            conn_id=conn.conn_id,
            peer_key=conn.peer_public_key,
            peer_ip=conn.peer_ip,
            src_port=conn.src_port,
            dst_ip=conn.dst_ip,
            dst_port=conn.dst_port,
            route=route,
            hostname=hostname,
            conn=conn,
        )

    def udp(
        self,
        peer_key: bytes,
        peer_ip: str,
        src_port: int,
        dst: Endpoint,
        *,
        route: str,
        hostname: str | None = None,
    ) -> Flow:
        return Flow(
            self,
            proto="udp",
            conn_id=next(self._udp_ids),
            peer_key=peer_key,
            peer_ip=peer_ip,
            src_port=src_port,
            dst_ip=dst[0],
            dst_port=dst[1],
            route=route,
            hostname=hostname,
        )

    def fast_relayed(
        self, opened: FastOpen, peer_key: bytes, *, route: str
    ) -> Callable[[SpliceResult], None]:
        """A connection the engine relayed on its own (a cached verdict): opened now, closed by
        the returned callback with its splice result."""
        flow = Flow(
            self,
            proto="tcp",
            conn_id=opened.conn_id,
            peer_key=peer_key,
            peer_ip=opened.src[0],
            src_port=opened.src[1],
            dst_ip=opened.dst[0],
            dst_port=opened.dst[1],
            route=route,
        )
        flow._engine_started = opened.opened_at
        self.hold_descriptor(flow, force=True)  # the engine holds its socket already
        flow.open()
        return flow.spliced

    def hold_descriptor(self, flow: Flow, *, force: bool = False) -> str | None:
        """Count the host descriptor the flow is about to take (given back when it closes), or
        say why it may not (`Refusal.DESCRIPTORS`: over its peer's share; `Refusal.PRESSURE`:
        the peers' part of the budget is used up); the caller refuses it then."""
        if flow._descriptor:
            return None
        why = self.descriptors.take(flow.peer_key, force=force)
        if why is None:
            flow._descriptor = True
        return why

    def serve(self, flow: Flow, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a service's work on a flow as a task; whatever escapes it still ends the flow
        (RST to the peer, the error in the closing event), and the loop keeps going."""
        return self.spawn(self._serve(flow, job))

    async def _serve(self, flow: Flow, job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except asyncio.CancelledError:
            flow.abort()
            flow.close("cancelled")
            raise
        except Exception as exc:
            log.exception("serving %r failed", flow)
            flow.abort()
            flow.close(f"internal error: {describe_os_error(exc)}")

    def spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a flow's Python work as a task, cancelled by `close()`."""
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("flow task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Cancel every flow's Python work (each flow closes with its error)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- counting ----------------------------------------------------------------------------

    def _opened(self, flow: Flow) -> None:
        key = (flow.proto, flow.conn_id)
        if key in self._open:
            return
        self._open[key] = flow
        self._per_peer[flow.peer_public_key] = self._per_peer.get(flow.peer_public_key, 0) + 1
        self._per_dst[flow.dst_ip] = self._per_dst.get(flow.dst_ip, 0) + 1

    def _closed(self, flow: Flow) -> None:
        if self._open.pop((flow.proto, flow.conn_id), None) is None:
            return
        if flow.proto == "tcp":
            self._pumped.pop(flow.conn_id, None)
        _decrement(self._per_peer, flow.peer_public_key)
        _decrement(self._per_dst, flow.dst_ip)

    def count(self, peer_public_key: str) -> int:
        """Open flows of a peer (public key in base64, as in the events)."""
        return self._per_peer.get(peer_public_key, 0)

    def count_to(self, dst_ip: str) -> int:
        """Open flows to a destination address (as the flow events name it, e.g. a VIP)."""
        return self._per_dst.get(dst_ip, 0)

    @property
    def total(self) -> int:
        return len(self._open)

    def live_bytes(self) -> dict[int, tuple[int, int]]:
        """{conn_id: (up, down)} of open TCP flows Python pumps that moved bytes (the engine
        reports those it splices itself)."""
        return {
            conn_id: (f.bytes_up, f.bytes_down)
            for conn_id, f in self._pumped.items()
            if f.bytes_up or f.bytes_down
        }


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
