"""Asyncio glue around the C data plane and the Python handshake.

The pipeline: the UDP socket becomes readable → one call into C receives a batch (recvmmsg),
decrypts, answers pings and queues replies → Python drains the few events C raised (handshake
messages, "a handshake is needed", roaming, key expiry, new connections) → one call flushes the
batch (sendmmsg).  Nothing here runs per data packet.

Where eventfd exists, C does the receiving on a thread of its own (`_worker.h`): it waits on the
UDP socket, the splices' sockets and the engine's timers, and wakes this loop through an eventfd
only when something waits for Python.  Every use of the engine from here then holds the engine
lock (`Engine.locked`, taken per call otherwise); bulk traffic never needs the interpreter, so a
busy console thread cannot slow it.  Without the worker, the loop watches the UDP socket and the
splices' epoll fd itself, and a single timer armed at the earliest of C's deadline and our
handshake retransmissions drives the protocol timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from unclaw_tui.engine import _ffi, constants
from unclaw_tui.engine.flows import (
    FastRelayHandler,
    SpliceDone,
    TcpConn,
    TcpHandler,
    UdpDatagram,
    UdpHandler,
)
from unclaw_tui.engine.noise import HandshakeCore, HandshakeError, Keypair
from unclaw_tui.engine.ratelimit import LoadMonitor, SourceRateLimiter

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]

# How many datagrams one readable callback may take before yielding to the loop.
RECV_BUDGET = 4096
SOCKET_BUFFER_BYTES = 8 * 1024 * 1024


def endpoint_bytes(ep: Endpoint) -> bytes:
    """The cookie's view of a source: IP bytes then the port, big-endian."""
    return ipaddress.ip_address(ep[0]).packed + ep[1].to_bytes(2, "big")


@dataclass(frozen=True, slots=True)
class TunnelEvent:
    """Something the gateway may want to tell the operator."""

    kind: str  # "handshake", "endpoint", "handshake_failed", "under_load", "keys_expired"
    public_key: bytes | None = None
    endpoint: Endpoint | None = None
    initiator: bool = False
    active: bool = False


@dataclass(slots=True)
class PeerInfo:
    """Per-peer view for the gateway: identity plus live counters from C."""

    public_key: bytes
    allowed_ips: tuple[str, ...]
    endpoint: Endpoint | None
    last_handshake: float | None  # wall clock
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


@dataclass(slots=True)
class _Peer:
    peer_id: int
    public_key: bytes
    allowed_ips: tuple[str, ...]
    last_handshake_wall: float | None = None
    # Our own initiation attempt (gateway as initiator), per the whitepaper's timer rules.
    attempt_started: float | None = None
    next_retransmit: float | None = None
    last_initiation_sent: float = field(default=-1e9)


class Tunnel:
    """A WireGuard interface in userspace: `Tunnel(private_key, listen_port, address)`."""

    def __init__(
        self,
        private_key: bytes,
        listen_port: int,
        address: ipaddress.IPv4Interface,
        *,
        listen_host: str = "",
        mtu: int = 1420,
        max_peers: int = 4096,
        on_event: Callable[[TunnelEvent], None] | None = None,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
        tcp_buffer: int = 0,
        max_conns_per_peer: int = 0,
        max_half_open_per_peer: int = 0,
        engine_thread: bool = True,
    ) -> None:
        """`engine_thread`: run the data plane on its own C thread (_worker.h) when the
        platform has eventfd; off with an injected `clock`, which that thread cannot follow."""
        self.listen_port = listen_port
        self.listen_host = listen_host
        self.address = address
        self._core = HandshakeCore(private_key, wall_clock=wall_clock)
        self.public_key = self._core.public_key
        _ffi.Engine.tune_allocator()
        self._engine = _ffi.Engine(
            str(address.ip),
            address.network.prefixlen,
            mtu=mtu,
            max_peers=max_peers,
            tcp_rcvbuf=tcp_buffer,
            tcp_sndbuf=tcp_buffer,
            tcp_max_conns_per_peer=max_conns_per_peer,
            tcp_max_half_open_per_peer=max_half_open_per_peer,
        )
        # Per-peer TCP limit refusals already reported (C counts them; limit_hits() polls).
        self._limit_refusals_seen = 0
        self._limit_hits_seen: dict[int, tuple[int, int]] = {}
        self._max_peers = max_peers
        self._peers: dict[bytes, _Peer] = {}
        self._by_id: dict[int, _Peer] = {}
        self._initiating: dict[int, _Peer] = {}  # peers with a handshake retransmission armed
        self._free_ids: list[int] = list(range(max_peers - 1, -1, -1))
        self._on_event = on_event or (lambda _e: None)
        self._clock = clock
        self._wall = wall_clock
        self._load = LoadMonitor()
        self._limiter = SourceRateLimiter()
        self._under_load = False
        self.handshake_drops: Counter[str] = Counter()
        self.cookies_sent = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        self._conns: dict[int, TcpConn] = {}
        # Connections relayed in C (`splice`, or the fast relay's with no TcpConn): their
        # owner's callback for when they end.
        self._spliced: dict[int, tuple[TcpConn | None, SpliceDone]] = {}
        # Reports taken from C under the engine lock, handled after it is given back (see
        # _take_reports): a fast-relayed connection opened (with its peer's key), a splice ended.
        self._reports: list[tuple[_ffi.FastOpen, bytes] | _ffi.SpliceResult] = []
        self._reports_scheduled = False
        self._splice_watched = False
        self._splices_started = False  # splice_connect/attach ran in this engine turn
        self._flush_scheduled = False
        self._use_worker = engine_thread and clock is None and hasattr(os, "eventfd")
        self._notify_fd: int | None = None
        # Where new flows go; with no handler, SYNs are refused and datagrams dropped.
        self.on_tcp: TcpHandler | None = None
        self.on_udp: UdpHandler | None = None
        # Told of each connection the engine relayed on its own (see `fast_relay_allow`).
        self.on_fast_relay: FastRelayHandler | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock, family = self._bind()
        self._sock = sock
        self.listen_port = sock.getsockname()[1]
        self._engine.io_attach(sock.fileno(), family)
        if self._use_worker:
            # C takes the socket, the splices and the engine's timers; we hear of our part.
            self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                self._engine.worker_start(self._notify_fd)
            except OSError:
                os.close(self._notify_fd)
                self._notify_fd = None
                raise
            self._loop.add_reader(self._notify_fd, self._on_notify)
        else:
            self._loop.add_reader(sock.fileno(), self._on_readable)
        self._rearm(self._engine_deadline())

    def _bind(self) -> tuple[socket.socket, int]:
        host = self.listen_host
        if host in ("", "::") and socket.has_ipv6:
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                family = 6
                sock.bind(("::", self.listen_port))
            except OSError:
                sock.close()
                sock, family = self._bind_v4("0.0.0.0")
        elif ":" in host:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            family = 6
            sock.bind((host, self.listen_port))
        else:
            sock, family = self._bind_v4(host or "0.0.0.0")
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        return sock, family

    def _bind_v4(self, host: str) -> tuple[socket.socket, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, self.listen_port))
        except OSError:
            sock.close()
            raise
        return sock, 4

    def close(self) -> None:
        if self._closed:
            return
        # First: from here on the engine is this thread's alone, as without the worker.
        self._engine.worker_stop()
        if self._notify_fd is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._notify_fd)
            os.close(self._notify_fd)
            self._notify_fd = None
        self._use_worker = False
        for conn in list(self._conns.values()):
            conn.abort()
        now = self._now() if self._loop is not None or self._clock is not None else 0.0
        self._take_reports(now)  # fast-relayed connections not reported yet end with a report too
        self._deliver_reports()
        for conn_id in list(self._spliced):
            self._engine.splice_abort(conn_id, now)
        self._take_reports(now)
        self._deliver_reports()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._splice_watched and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._engine.splice_fd())
        if self._sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._engine.close()

    # -- peers -----------------------------------------------------------------------------

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: Iterable[str] = (),
        persistent_keepalive: int = 0,
        endpoint: Endpoint | None = None,
    ) -> None:
        if public_key in self._peers:
            raise ValueError("peer already present")
        if not self._free_ids:
            raise ValueError(f"too many peers (max {self._max_peers})")
        nets = tuple(str(ipaddress.ip_network(n, strict=False)) for n in allowed_ips)
        with self._engine.locked():  # the worker never sees a peer half set up
            self._add_peer(public_key, preshared_key, nets, persistent_keepalive, endpoint)

    def _add_peer(
        self,
        public_key: bytes,
        preshared_key: bytes | None,
        nets: tuple[str, ...],
        persistent_keepalive: int,
        endpoint: Endpoint | None,
    ) -> None:
        peer_id = self._free_ids.pop()
        self._engine.peer_add(peer_id, persistent_keepalive)
        try:
            for net in nets:
                self._engine.peer_add_allowed_ip(peer_id, net)
            if endpoint is not None:
                self._engine.peer_set_endpoint(peer_id, endpoint)
            self._core.add_peer(public_key, preshared_key)
        except Exception:
            self._engine.peer_remove(peer_id)
            self._free_ids.append(peer_id)
            raise
        peer = _Peer(peer_id, public_key, nets)
        self._peers[public_key] = peer
        self._by_id[peer_id] = peer
        # C keeps the counts of a reused peer id: only what happens from now on is this peer's.
        self._limit_hits_seen[peer_id] = self._engine.tcp_peer_limit_hits(peer_id)

    def remove_peer(self, public_key: bytes) -> None:
        with self._engine.locked():
            self._remove_peer(public_key)

    def _remove_peer(self, public_key: bytes) -> None:
        # Reports of the peer's fast-relayed connections name it by its id: read them while
        # the id is still this peer's.
        self._take_reports(self._now())
        for conn in [c for c in self._conns.values() if c.peer_public_key == public_key]:
            conn.abort()
        peer = self._peers.pop(public_key)
        del self._by_id[peer.peer_id]
        self._initiating.pop(peer.peer_id, None)
        self._engine.peer_remove(peer.peer_id)
        self._core.remove_peer(public_key)
        self._free_ids.append(peer.peer_id)

    def peer_info(self, public_key: bytes) -> PeerInfo:
        peer = self._peers[public_key]
        return self._info(peer, self._engine.peer_stats(peer.peer_id))

    @property
    def peers(self) -> dict[bytes, PeerInfo]:
        """Every peer's info, from one C call."""
        peers = list(self._peers.values())
        stats = self._engine.peers_stats([p.peer_id for p in peers])
        return {p.public_key: self._info(p, st) for p, st in zip(peers, stats, strict=True)}

    @staticmethod
    def _info(peer: _Peer, st: _ffi.PeerStats) -> PeerInfo:
        return PeerInfo(
            public_key=peer.public_key,
            allowed_ips=peer.allowed_ips,
            endpoint=st.endpoint,
            last_handshake=peer.last_handshake_wall,
            rx_bytes=st.rx_bytes,
            tx_bytes=st.tx_bytes,
            rx_packets=st.rx_packets,
            tx_packets=st.tx_packets,
        )

    def drop_counts(self) -> dict[str, int]:
        counts = {k: v for k, v in self._engine.drop_counts().items() if v}
        for reason, n in self.handshake_drops.items():
            counts[f"handshake_{reason}"] = n
        return counts

    def limit_hits(self) -> list[tuple[bytes, str, int]]:
        """(public key, "conns" or "half_open", SYNs refused) for each peer whose per-peer TCP
        limit refused connections since the last call.  Cheap when nothing was refused: one
        pair of C counters; the peers are looked at only when those moved."""
        total = self._engine.tcp_limit_refusals()
        if total == self._limit_refusals_seen:
            return []
        self._limit_refusals_seen = total
        hits: list[tuple[bytes, str, int]] = []
        for peer_id, peer in self._by_id.items():
            conns, half_open = self._engine.tcp_peer_limit_hits(peer_id)
            seen_conns, seen_half_open = self._limit_hits_seen.get(peer_id, (0, 0))
            if conns > seen_conns:
                hits.append((peer.public_key, "conns", conns - seen_conns))
            if half_open > seen_half_open:
                hits.append((peer.public_key, "half_open", half_open - seen_half_open))
            self._limit_hits_seen[peer_id] = (conns, half_open)
        return hits

    def engine_stats(self) -> dict[str, int]:
        stats = dict(self._engine.stats())
        stats["cookie_replies_sent"] = self.cookies_sent
        return stats

    @property
    def under_load(self) -> bool:
        return self._under_load

    def send_inner(self, packet: bytes) -> None:
        """Route an inner IP packet to its peer by allowed IPs, encrypt and send it (staged,
        with a handshake started, if there is no session yet)."""
        with self._engine.locked():
            now = self._now()
            self._engine.send_inner(packet, now)
            self._after_engine_work(now)

    # -- the loop --------------------------------------------------------------------------

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        if self._use_worker:
            return time.monotonic()  # the worker's clock (CLOCK_MONOTONIC)
        assert self._loop is not None
        return self._loop.time()

    def _engine_deadline(self) -> float | None:
        """The engine's own deadline, when our timer has to drive it (no worker)."""
        return None if self._use_worker else self._engine.next_deadline()

    def _on_notify(self) -> None:
        """The worker says the engine has work for us."""
        assert self._notify_fd is not None
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._notify_fd)
        if self._closed:
            return
        with self._engine.locked():
            self._after_engine_work(self._now())

    def _on_readable(self) -> None:
        if self._closed:
            return
        now = self._now()
        try:
            self._engine.io_recv(now, RECV_BUDGET)
        except OSError as exc:  # e.g. ICMP errors surfaced on the socket: keep serving
            log.debug("UDP receive error: %s", exc)
        self._after_engine_work(now)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        with self._engine.locked():
            now = self._now()
            if not self._use_worker:  # else the worker runs the engine's timers
                self._engine.tick(now)
            self._handshake_timers(now)
            self._after_engine_work(now)

    def _after_engine_work(self, now: float) -> None:
        """Handle what C raised, send what is queued, re-arm the single timer.

        One C call says what waits, and only those are drained: each call into C gives up the
        interpreter lock, and getting it back can mean waiting for the console's thread."""
        pending = self._engine.collect(now)
        handled = False
        if pending.events:
            handled = True
            try:
                self._drain_events(now)
            except Exception:  # the loop must survive any single bad event
                log.exception("event handling failed")
        else:
            self._check_load(now)
        if pending.tcp_events or pending.udp_datagrams:
            handled = True
            try:
                self._drain_flows(tcp=pending.tcp_events > 0, udp=pending.udp_datagrams > 0)
            except Exception:
                log.exception("flow handling failed")
        if self._splices_started:
            # A connect to a nearby host often completes inside connect() itself: take the
            # sockets' news now, so the SYN-ACKs leave in this turn instead of the next one.
            self._splices_started = False
            self._engine.splice_service(now)
            handled = True
            self._take_reports(now)
        elif pending.fast_opened or pending.splice_results:
            handled = True
            self._take_reports(now)
        if handled:  # handlers may have queued packets and moved deadlines
            self._engine.io_flush()
            self._rearm(self._engine_deadline())
        else:
            if pending.outputs:
                self._engine.io_flush()
            self._rearm(None if self._use_worker else pending.next_deadline or None)

    # -- splices: relayed connections joined in C to a host socket --------------------------

    @property
    def can_splice(self) -> bool:
        return self._engine.can_splice

    def _splice(
        self,
        conn: TcpConn,
        target: Endpoint | socket.socket,
        timeout: float,
        on_done: SpliceDone,
        *,
        accepted: bool = False,
    ) -> None:
        """See `TcpConn.splice`, `TcpConn.splice_socket` and (accepted) `splice_accepted`."""
        now = self._now()
        if isinstance(target, socket.socket):
            if accepted:
                self._engine.splice_adopt(conn.conn_id, target.fileno(), now)
            else:
                self._engine.splice_attach(conn.conn_id, target.fileno(), now)
            target.detach()  # the fd is C's now
        else:
            self._engine.splice_connect(conn.conn_id, target, now + timeout, now)
        self._conns.pop(conn.conn_id, None)
        self._spliced[conn.conn_id] = (conn, on_done)
        self._splices_started = True
        if not self._splice_watched and self._loop is not None and not self._use_worker:
            self._loop.add_reader(self._engine.splice_fd(), self._on_splice_ready)
            self._splice_watched = True
        self._schedule_flush()  # the deadline joins the timer

    def fast_relay_allow(
        self, peer_key: bytes, dst: Endpoint, ttl: float | None, connect_timeout: float
    ) -> None:
        """From now on, SYNs to dst are spliced by the engine itself, without `on_tcp`, for
        ttl seconds (None: until `fast_relay_clear`); each is reported to `on_fast_relay`.
        For destinations whose every connection `on_tcp` would relay anyway.  The engine keys
        its cache by destination alone: callers may approve only verdicts that do not depend
        on the peer (`peer_key` names whose verdict it was)."""
        expires = None if ttl is None else self._now() + ttl
        self._engine.fast_relay_allow(dst, expires, connect_timeout)

    def fast_relay_clear(self) -> None:
        """Every SYN goes to `on_tcp` again, until the next `fast_relay_allow`."""
        self._engine.fast_relay_clear()

    def _take_reports(self, now: float) -> None:
        """Move C's reports (fast-relayed connections opened, splices ended, in that order: a
        result may be of a connection opened in the same batch) to `_reports`.  Called under
        the engine lock; they are handled after it, so that building events for a batch of
        connections never keeps the engine's thread waiting."""
        for opened in self._engine.fast_relay_opened():
            peer = self._by_id.get(opened.peer_id)
            if peer is not None:  # always: see _remove_peer
                self._reports.append((opened, peer.public_key))
        self._reports.extend(self._engine.splice_results(now))
        if self._reports and not self._reports_scheduled and self._loop is not None:
            self._reports_scheduled = True
            self._loop.call_soon(self._deliver_reports)

    def _deliver_reports(self) -> None:
        self._reports_scheduled = False
        reports, self._reports = self._reports, []
        for report in reports:
            if isinstance(report, tuple):
                opened, public_key = report
                if self.on_fast_relay is None:
                    continue
                try:
                    done = self.on_fast_relay(opened, public_key)
                except Exception:
                    log.exception("fast relay handler failed")
                    continue
                self._spliced[opened.conn_id] = (None, done)
                continue
            entry = self._spliced.pop(report.conn_id, None)
            if entry is None:
                continue
            conn, on_done = entry
            if conn is not None:
                conn._spliced_done(report)
            try:
                on_done(report)
            except Exception:
                log.exception("splice completion handler failed")

    def _on_splice_ready(self) -> None:
        if self._closed:
            return
        now = self._now()
        self._engine.splice_service(now)
        self._after_engine_work(now)

    def trim_memory(self) -> None:
        """Give free C heap back to the system; callable from any thread (see wg_trim_memory)."""
        self._engine.trim_memory()

    def spliced_flow_bytes(self, within: float) -> dict[int, tuple[int, int]]:
        """{conn_id: (up, down)} of spliced connections whose bytes moved in the last `within`
        seconds: what a console needs to keep open connections' counters live."""
        return self._engine.splice_active_flows(self._now() - within)

    def splice_bytes(self, conn_id: int) -> tuple[int, int] | None:
        """Live (up, down) bytes of a spliced connection."""
        return self._engine.splice_bytes(conn_id)

    # -- flows (TCP connections, UDP datagrams) --------------------------------------------

    def _drain_flows(self, *, tcp: bool = True, udp: bool = True) -> None:
        for ev_type, conn_id, arg in self._engine.tcp_events() if tcp else ():
            if ev_type == _ffi.TCP_EV_SYN:
                self._new_conn(conn_id)
                continue
            conn = self._conns.get(conn_id)
            if conn is None:
                continue
            try:
                if ev_type == _ffi.TCP_EV_READABLE or ev_type == _ffi.TCP_EV_PEER_FIN:
                    conn._on_readable()
                elif ev_type == _ffi.TCP_EV_WRITABLE:
                    conn._on_writable()
                elif ev_type == _ffi.TCP_EV_CLOSED:
                    conn._on_closed(arg)
            except Exception:  # a misbehaving protocol must not take the loop down
                log.exception("TCP event on %r failed", conn)
                conn.abort()
        datagrams = self._engine.udp_datagrams() if udp else None
        if datagrams:
            for meta in datagrams:
                peer = self._by_id.get(meta.peer_id)
                if peer is None or self.on_udp is None:
                    continue
                try:
                    self.on_udp(UdpDatagram(self, meta, peer.public_key))
                except Exception:
                    log.exception("UDP handler failed")

    def _new_conn(self, conn_id: int) -> None:
        now = self._now()
        info = self._engine.tcp_info(conn_id)
        peer = self._by_id.get(info.peer_id)
        if peer is None or self.on_tcp is None:
            self._engine.tcp_reject(conn_id, now)
            self._engine.tcp_release(conn_id, now)
            return
        conn = TcpConn(self, conn_id, info, peer.public_key)
        self._conns[conn_id] = conn
        try:
            self.on_tcp(conn)
        except Exception:
            log.exception("TCP handler failed")
            conn.reject()

    def _tcp_call(self, fn: Callable[[_ffi.Engine, float], Any]) -> Any:
        """Run one engine call for a flow, then make sure its packets go out this loop turn."""
        result = fn(self._engine, self._now())
        self._schedule_flush()
        return result

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_flows)

    def _flush_flows(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        with self._engine.locked():
            self._after_engine_work(self._now())

    def _forget_conn(self, conn: TcpConn) -> None:
        self._conns.pop(conn.conn_id, None)

    @property
    def open_flows(self) -> int:
        return len(self._conns)

    @property
    def connections(self) -> AsyncIterator[TcpConn]:
        """Every TCP connection peers open, from now on (replaces `on_tcp`)."""
        queue: asyncio.Queue[TcpConn] = asyncio.Queue()
        self.on_tcp = queue.put_nowait
        return _drain_queue(queue)

    @property
    def datagrams(self) -> AsyncIterator[UdpDatagram]:
        """Every UDP datagram peers send, from now on (replaces `on_udp`)."""
        queue: asyncio.Queue[UdpDatagram] = asyncio.Queue(maxsize=65536)

        def offer(dgram: UdpDatagram) -> None:
            with contextlib.suppress(asyncio.QueueFull):  # UDP: dropping is allowed
                queue.put_nowait(dgram)

        self.on_udp = offer
        return _drain_queue(queue)

    def _rearm(self, engine_deadline: float | None) -> None:
        """Arm the single timer for the earliest of C's deadline and ours."""
        if self._loop is None or self._closed:
            return
        deadlines = [engine_deadline] if engine_deadline else []
        # Only peers with a handshake in flight: no pass over every peer per packet batch.
        deadlines += [p.next_retransmit for p in self._initiating.values() if p.next_retransmit]
        if self._under_load:
            deadlines.append(self._now() + 1.0)
        if not deadlines:
            return
        at = min(deadlines)
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= at:
                return
            self._timer.cancel()
        delay = max(0.0, at - self._now())
        self._timer = self._loop.call_later(delay, self._on_timer)
        self._timer_at = at

    # -- events from C ---------------------------------------------------------------------

    def _drain_events(self, now: float) -> None:
        for ev in self._engine.events():
            if ev.type == _ffi.EV_HANDSHAKE_PACKET:
                assert ev.src is not None
                self._handle_handshake_packet(ev.data, ev.src, now)
                continue
            peer = self._by_id.get(ev.peer_id)
            if peer is None:
                continue
            if ev.type == _ffi.EV_NEED_HANDSHAKE:
                self._want_handshake(peer, now)
            elif ev.type == _ffi.EV_KEYPAIR_CONFIRMED:
                # The initiator used the keypair we answered with: the handshake is complete.
                self._handshake_complete(peer, initiator=False)
            elif ev.type == _ffi.EV_ENDPOINT_CHANGED:
                self._on_event(TunnelEvent("endpoint", peer.public_key, ev.src))
            elif ev.type == _ffi.EV_KEYS_EXPIRED:
                self._on_event(TunnelEvent("keys_expired", peer.public_key))
        self._check_load(now)

    def _check_load(self, now: float) -> None:
        under = self._load.under_load(now)
        if under != self._under_load:
            self._under_load = under
            self._on_event(TunnelEvent("under_load", active=under))

    def _handle_handshake_packet(self, data: bytes, src: Endpoint, now: float) -> None:
        self._load.note(now)
        msg_type = data[0]
        try:
            if msg_type == constants.MESSAGE_COOKIE_REPLY_TYPE:
                self._core.consume_cookie_reply(data, now)
                return
            if not self._core.check_mac1(data):
                self.handshake_drops["bad_mac1"] += 1
                return
            if self._load.under_load(now):
                src_bytes = endpoint_bytes(src)
                if not self._core.check_mac2(data, src_bytes, now):
                    reply = self._core.create_cookie_reply(data, src_bytes, now)
                    self._engine.send_raw(reply, src)
                    self.cookies_sent += 1
                    return
                if not self._limiter.allow(src_bytes[:-2], now):
                    self.handshake_drops["rate_limited"] += 1
                    return
            if msg_type == constants.MESSAGE_INITIATION_TYPE:
                self._answer_initiation(data, src, now)
            elif msg_type == constants.MESSAGE_RESPONSE_TYPE:
                peer_key, keypair = self._core.consume_response(data, now)
                peer = self._peers.get(peer_key)
                if peer is None:
                    self.handshake_drops["unknown_peer"] += 1
                    return
                self._engine.peer_set_endpoint(peer.peer_id, src)
                self._install(peer, keypair, now)
                self._handshake_complete(peer, initiator=True)
        except HandshakeError as exc:
            self.handshake_drops[exc.reason] += 1

    def _answer_initiation(self, data: bytes, src: Endpoint, now: float) -> None:
        consumed = self._core.consume_initiation(data, now)
        peer = self._peers.get(consumed.peer_public_key)
        if peer is None:  # removed between the core's check and now
            self.handshake_drops["unknown_peer"] += 1
            return
        index = self._allocate_index()
        response, keypair = self._core.create_response(peer.public_key, index, now)
        # The initiation authenticated the peer: its source is now its endpoint (roaming).
        # C then sees no change on the next packet, so a roam through a handshake is told here.
        previous = self._engine.peer_stats(peer.peer_id).endpoint
        self._engine.peer_set_endpoint(peer.peer_id, src)
        if previous is not None and previous != src:
            self._on_event(TunnelEvent("endpoint", peer.public_key, src))
        self._engine.send_raw(response, src)
        self._install(peer, keypair, now)

    def _install(self, peer: _Peer, keypair: Keypair, now: float) -> None:
        self._engine.install_keypair(
            peer.peer_id,
            keypair.local_index,
            keypair.remote_index,
            keypair.send_key,
            keypair.recv_key,
            keypair.is_initiator,
            now,
        )

    def _handshake_complete(self, peer: _Peer, *, initiator: bool) -> None:
        peer.attempt_started = None
        self._set_retransmit(peer, None)
        peer.last_handshake_wall = self._wall()
        st = self._engine.peer_stats(peer.peer_id)
        self._on_event(TunnelEvent("handshake", peer.public_key, st.endpoint, initiator=initiator))

    def _allocate_index(self) -> int:
        pending = self._core.pending_indices()
        for _ in range(64):
            index = random.getrandbits(32)
            if index not in pending and not self._engine.index_in_use(index):
                return index
        raise RuntimeError("no free session index")  # 2^32 space: unreachable in practice

    # -- our own handshakes (gateway as initiator) -----------------------------------------

    def _want_handshake(self, peer: _Peer, now: float) -> None:
        if peer.attempt_started is not None:
            return
        if self._engine.peer_stats(peer.peer_id).endpoint is None:
            return  # never heard from it: nowhere to send an initiation
        peer.attempt_started = now
        self._send_initiation(peer, now)

    def _send_initiation(self, peer: _Peer, now: float) -> None:
        endpoint = self._engine.peer_stats(peer.peer_id).endpoint
        if endpoint is None:
            peer.attempt_started = None
            self._set_retransmit(peer, None)
            return
        message = self._core.create_initiation(peer.public_key, self._allocate_index(), now)
        self._engine.send_raw(message, endpoint)
        peer.last_initiation_sent = now
        self._set_retransmit(
            peer,
            now + constants.REKEY_TIMEOUT + random.uniform(0, constants.REKEY_TIMEOUT_JITTER_MAX),
        )

    def _set_retransmit(self, peer: _Peer, at: float | None) -> None:
        peer.next_retransmit = at
        if at is None:
            self._initiating.pop(peer.peer_id, None)
        else:
            self._initiating[peer.peer_id] = peer

    def _handshake_timers(self, now: float) -> None:
        for peer in list(self._initiating.values()):
            if peer.next_retransmit is None or now < peer.next_retransmit:
                continue
            assert peer.attempt_started is not None
            if now - peer.attempt_started >= constants.REKEY_ATTEMPT_TIME:
                peer.attempt_started = None
                self._set_retransmit(peer, None)
                self._engine.peer_drop_staged(peer.peer_id)
                self._on_event(TunnelEvent("handshake_failed", peer.public_key))
            else:
                self._send_initiation(peer, now)


async def _drain_queue(queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        yield await queue.get()
