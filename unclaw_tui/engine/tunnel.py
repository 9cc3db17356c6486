"""A WireGuard interface in userspace over the C data plane: peers, the Noise handshake
(`noise.py`) and its timers, and the tunnel's events (the package docstring has the rest)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from unclaw_tui.engine import _ffi, constants
from unclaw_tui.engine.conns import ConnTable
from unclaw_tui.engine.driver import Driver, LoopDriver, ThreadDriver
from unclaw_tui.engine.noise import HandshakeCore, HandshakeError, Keypair
from unclaw_tui.engine.outcomes import CloseReason
from unclaw_tui.engine.ratelimit import LoadMonitor, SourceRateLimiter
from unclaw_tui.engine.tunnel_events import (
    EndpointChanged,
    HandshakeDone,
    HandshakeFailed,
    KeysExpired,
    LoadChanged,
    TunnelEvent,
)

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
Local = _ffi.Local

SOCKET_BUFFER_BYTES = 8 * 1024 * 1024


def endpoint_bytes(ep: Endpoint) -> bytes:
    """The cookie's view of a source: IP bytes then the port, big-endian."""
    return ipaddress.ip_address(ep[0]).packed + ep[1].to_bytes(2, "big")


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
    quiet_for: float | None = None  # seconds since its last packet, handshake or data


@dataclass(slots=True)
class _Peer:
    peer_id: int
    public_key: bytes
    allowed_ips: tuple[str, ...]
    last_handshake_wall: float | None = None
    # Our own initiation attempt (gateway as initiator), per the whitepaper's timer rules.
    attempt_started: float | None = None
    next_retransmit: float | None = None


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
        """`engine_thread`: run the data plane on its own C thread (driver.py) when the
        platform has eventfd; a fake `clock` needs it off (that thread keeps its own time)."""
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
        self._wall = wall_clock
        self._load = LoadMonitor()
        self._limiter = SourceRateLimiter()
        self._under_load = False
        self.handshake_drops: Counter[str] = Counter()
        self.cookies_sent = 0
        self._sock: socket.socket | None = None
        self._closed = False
        if engine_thread and clock is not None:
            raise ValueError("the engine's thread keeps its own time: a clock needs it off")
        hooks = (self._on_engine_work, self._on_timer, self._own_deadlines)
        self._driver: Driver = (
            ThreadDriver(self._engine, *hooks)
            if engine_thread and ThreadDriver.available()
            else LoopDriver(self._engine, *hooks, clock=clock)
        )
        self.conns = ConnTable(self._driver, self._peer_key, self._peer_id)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        sock = self._bind()
        self._sock = sock
        self.listen_port = sock.getsockname()[1]
        self._engine.io_attach(sock.fileno(), 6 if sock.family == socket.AF_INET6 else 4)
        await self._driver.start(sock)

    def _bind(self) -> socket.socket:
        host = self.listen_host
        if host in ("", "::") and socket.has_ipv6:
            try:
                sock = self._bind_to(socket.AF_INET6, "::")
            except OSError:
                sock = self._bind_to(socket.AF_INET, "0.0.0.0")
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = self._bind_to(family, host or "0.0.0.0")
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        return sock

    def _bind_to(self, family: socket.AddressFamily, host: str) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if host == "::":  # IPv4 clients too
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, self.listen_port))
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        if self._closed:
            return
        self._driver.stop()  # first: from here on the engine is this thread's alone
        self.conns.close(self._driver.now() if self._driver.started else 0.0)
        self._closed = True
        if self._sock is not None:
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
            # C keeps the counts of a reused peer id: only what happens from now on counts.
            self._limit_hits_seen[peer_id] = self._engine.tcp_peer_limit_hits(peer_id)

    def end_peer_flows(self, public_key: bytes, reason: CloseReason) -> int:
        """End a peer's connections and splices in C (PEER_GONE: all, silently; PRESSURE: those
        its zero window holds open, an RST each); each ends with its usual report.  Returns
        how many."""
        with self._engine.locked():
            peer = self._peers.get(public_key)
            if peer is None:
                return 0
            now = self._driver.now()
            self.conns.take_reports(now)  # fast-relayed opens first: their ends follow
            ended = self._engine.peer_abort_flows(peer.peer_id, reason, now)
            self.conns.drain(tcp=True, udp=False)
            self.conns.take_reports(now)
            return ended

    def remove_peer(self, public_key: bytes) -> None:
        with self._engine.locked():
            self.conns.abort_peer(public_key)  # while its id still names it
            peer = self._peers.pop(public_key)
            del self._by_id[peer.peer_id]
            self._initiating.pop(peer.peer_id, None)
            self._engine.peer_remove(peer.peer_id)
            self._core.remove_peer(public_key)
            self._free_ids.append(peer.peer_id)

    def peer_info(self, public_key: bytes) -> PeerInfo:
        peer = self._peers[public_key]
        st = self._engine.peer_stats(peer.peer_id)
        return self._info(peer, st, self._driver.now(), self._wall())

    @property
    def peers(self) -> dict[bytes, PeerInfo]:
        """Every peer's info, from one C call."""
        peers = list(self._peers.values())
        stats = self._engine.peers_stats([p.peer_id for p in peers])
        now, wall = self._driver.now(), self._wall()
        return {
            p.public_key: self._info(p, st, now, wall) for p, st in zip(peers, stats, strict=True)
        }

    @staticmethod
    def _info(peer: _Peer, st: _ffi.PeerStats, now: float, wall: float) -> PeerInfo:
        ages = [now - t for t in (st.last_rx,) if t is not None]
        if peer.last_handshake_wall is not None:
            ages.append(wall - peer.last_handshake_wall)
        return PeerInfo(
            public_key=peer.public_key,
            allowed_ips=peer.allowed_ips,
            endpoint=st.endpoint,
            last_handshake=peer.last_handshake_wall,
            rx_bytes=st.rx_bytes,
            tx_bytes=st.tx_bytes,
            rx_packets=st.rx_packets,
            tx_packets=st.tx_packets,
            quiet_for=max(0.0, min(ages)) if ages else None,
        )

    def drop_counts(self) -> dict[str, int]:
        counts = {k: v for k, v in self._engine.drop_counts().items() if v}
        counts.update((f"handshake_{reason}", n) for reason, n in self.handshake_drops.items())
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
        return {**self._engine.stats(), "cookie_replies_sent": self.cookies_sent}

    @property
    def under_load(self) -> bool:
        return self._under_load

    def send_inner(self, packet: bytes) -> None:
        """Route an inner IP packet to its peer by allowed IPs, encrypt and send it (staged,
        with a handshake started, if there is no session yet)."""
        with self._engine.locked():
            now = self._driver.now()
            self._engine.send_inner(packet, now)
            self._on_engine_work(now)

    def trim_memory(self) -> None:
        """Give free C heap back to the system; callable from any thread (see wg_trim_memory)."""
        self._engine.trim_memory()

    @property
    def can_splice(self) -> bool:
        return self._engine.can_splice

    @property
    def driver(self) -> Driver:
        return self._driver

    # -- what the driver calls (under the engine lock) -------------------------------------

    def _peer_key(self, peer_id: int) -> bytes | None:
        peer = self._by_id.get(peer_id)
        return None if peer is None else peer.public_key

    def _peer_id(self, public_key: bytes) -> int | None:
        peer = self._peers.get(public_key)
        return None if peer is None else peer.peer_id

    def _own_deadlines(self) -> list[float]:
        """Python's own deadlines: handshake retransmissions (only the peers with one in
        flight: no pass over every peer per batch), and a look at the load while under it."""
        deadlines = [p.next_retransmit for p in self._initiating.values() if p.next_retransmit]
        if self._under_load:
            deadlines.append(self._driver.now() + 1.0)
        return deadlines

    def _on_timer(self, now: float) -> None:
        self._handshake_timers(now)
        self._on_engine_work(now)

    def _on_engine_work(self, now: float) -> None:
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
                self.conns.drain(tcp=pending.tcp_events > 0, udp=pending.udp_datagrams > 0)
            except Exception:
                log.exception("flow handling failed")
        reports = bool(pending.fast_opened or pending.splice_results)
        handled = self.conns.service_splices(now, reports=reports) or handled
        if handled or pending.outputs:
            self._engine.io_flush()
        # Handlers may have queued packets and moved deadlines: then ask C again.
        self._driver.rearm(
            self._driver.engine_deadline() if handled else pending.next_deadline or None
        )

    # -- events from C ---------------------------------------------------------------------

    def _drain_events(self, now: float) -> None:
        for ev in self._engine.events():
            if ev.type == _ffi.EV_HANDSHAKE_PACKET:
                assert ev.src is not None
                self._handle_handshake_packet(ev.data, ev.src, ev.local, now)
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
                self._on_event(EndpointChanged(peer.public_key, ev.src))
            elif ev.type == _ffi.EV_KEYS_EXPIRED:
                self._on_event(KeysExpired(peer.public_key))
        self._check_load(now)

    def _check_load(self, now: float) -> None:
        under = self._load.under_load(now)
        if under != self._under_load:
            self._under_load = under
            self._on_event(LoadChanged(under))

    def _handle_handshake_packet(
        self, data: bytes, src: Endpoint, local: Local | None, now: float
    ) -> None:
        """Every answer leaves from local, the address src wrote to (see wg_endpoint)."""
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
                    self._engine.send_raw(reply, src, local)
                    self.cookies_sent += 1
                    return
                if not self._limiter.allow(src_bytes[:-2], now):
                    self.handshake_drops["rate_limited"] += 1
                    return
            if msg_type == constants.MESSAGE_INITIATION_TYPE:
                self._answer_initiation(data, src, local, now)
            elif msg_type == constants.MESSAGE_RESPONSE_TYPE:
                peer_key, keypair = self._core.consume_response(data, now)
                peer = self._peers.get(peer_key)
                if peer is None:
                    self.handshake_drops["unknown_peer"] += 1
                    return
                self._engine.peer_set_endpoint(peer.peer_id, src, local)
                self._install(peer, keypair, now)
                self._handshake_complete(peer, initiator=True)
        except HandshakeError as exc:
            self.handshake_drops[exc.reason] += 1

    def _answer_initiation(
        self, data: bytes, src: Endpoint, local: Local | None, now: float
    ) -> None:
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
        self._engine.peer_set_endpoint(peer.peer_id, src, local)
        if previous is not None and previous != src:
            self._on_event(EndpointChanged(peer.public_key, src))
        self._engine.send_raw(response, src, local)
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
        self._set_retransmit(peer, None)
        peer.last_handshake_wall = self._wall()
        st = self._engine.peer_stats(peer.peer_id)
        self._on_event(HandshakeDone(peer.public_key, st.endpoint, initiator))

    def _allocate_index(self) -> int:
        pending = self._core.pending_indices()
        for _ in range(64):
            index = random.getrandbits(32)
            if index not in pending and not self._engine.index_in_use(index):
                return index
        raise RuntimeError("no free session index")  # 2^32 space: unreachable in practice

    # -- our own handshakes (gateway as initiator) -----------------------------------------

    def _want_handshake(self, peer: _Peer, now: float) -> None:
        if peer.attempt_started is None:
            peer.attempt_started = now
            self._send_initiation(peer, now)

    def _send_initiation(self, peer: _Peer, now: float) -> None:
        st = self._engine.peer_stats(peer.peer_id)
        if st.endpoint is None:  # never heard from it: nowhere to send an initiation
            self._set_retransmit(peer, None)
            return
        message = self._core.create_initiation(peer.public_key, self._allocate_index(), now)
        self._engine.send_raw(message, st.endpoint, st.local)
        self._set_retransmit(
            peer,
            now + constants.REKEY_TIMEOUT + random.uniform(0, constants.REKEY_TIMEOUT_JITTER_MAX),
        )

    def _set_retransmit(self, peer: _Peer, at: float | None) -> None:
        """Arm the next retransmission of our initiation; None ends the attempt."""
        peer.next_retransmit = at
        if at is None:
            peer.attempt_started = None
            self._initiating.pop(peer.peer_id, None)
        else:
            self._initiating[peer.peer_id] = peer

    def _handshake_timers(self, now: float) -> None:
        for peer in list(self._initiating.values()):
            if peer.next_retransmit is None or now < peer.next_retransmit:
                continue
            assert peer.attempt_started is not None
            if now - peer.attempt_started >= constants.REKEY_ATTEMPT_TIME:
                self._set_retransmit(peer, None)
                self._engine.peer_drop_staged(peer.peer_id)
                self._on_event(HandshakeFailed(peer.public_key))
            else:
                self._send_initiation(peer, now)
