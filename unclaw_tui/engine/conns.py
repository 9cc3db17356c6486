"""The engine's flow registry: the connections and datagrams peers send, as Python objects.

It turns the engine's TCP events into `TcpConn` calls and its UDP queue into `UdpDatagram`s for
`on_tcp` / `on_udp`, hands connections to C's splices and keeps their owners' completion
callbacks, and reports the connections the engine relayed on its own (the fast relay) through
`on_fast_relay`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from unclaw_tui.engine import _ffi
from unclaw_tui.engine.driver import Driver
from unclaw_tui.engine.flows import (
    FastRelayHandler,
    SpliceDone,
    TcpConn,
    TcpHandler,
    UdpDatagram,
    UdpHandler,
)

log = logging.getLogger(__name__)

TCP_EVENTS_PER_TURN = 64  # each a decision and its events in Python: about 5-10 ms a turn

Endpoint = tuple[str, int]


class ConnTable:
    """See the module docstring. `peer_key(peer_id)` names the peer the engine numbers."""

    def __init__(
        self,
        driver: Driver,
        peer_key: Callable[[int], bytes | None],
        peer_id: Callable[[bytes], int | None],
    ) -> None:
        self._driver = driver
        self._engine = driver.engine
        self._peer_key = peer_key
        self._peer_id = peer_id
        self._conns: dict[int, TcpConn] = {}
        # Connections relayed in C (`splice`, or the fast relay's with no TcpConn): their
        # owner's callback for when they end.
        self._spliced: dict[int, tuple[TcpConn | None, SpliceDone]] = {}
        # A fast-relayed connection opened (with its peer's key), a splice ended.
        self._reports: list[tuple[_ffi.FastOpen, bytes] | _ffi.SpliceResult] = []
        self._reports_scheduled = False
        self._splices_started = False  # a splice was started in this engine turn
        # Where new flows go; with no handler, SYNs are refused and datagrams dropped.
        self.on_tcp: TcpHandler | None = None
        self.on_udp: UdpHandler | None = None
        # Told of each connection the engine relayed on its own (see `fast_relay_allow`).
        self.on_fast_relay: FastRelayHandler | None = None

    # -- what TcpConn asks of the engine ---------------------------------------------------

    def call(self, fn: Callable[[_ffi.Engine, float], Any]) -> Any:
        """One engine call for a flow; its packets go out this loop turn."""
        return self._driver.call(fn)

    @property
    def can_splice(self) -> bool:
        return self._engine.can_splice

    def splice_abort(self, conn_id: int) -> None:
        self._engine.splice_abort(conn_id, self._driver.now())
        self._driver.flush_soon()

    def splice(
        self,
        conn: TcpConn,
        target: Endpoint | socket.socket,
        timeout: float,
        on_done: SpliceDone,
        *,
        accepted: bool = False,
    ) -> None:
        """See `TcpConn.splice`, `TcpConn.splice_socket` and (accepted) `splice_accepted`."""
        now = self._driver.now()
        if isinstance(target, socket.socket):
            hand_over = self._engine.splice_adopt if accepted else self._engine.splice_attach
            hand_over(conn.conn_id, target.fileno(), now)
            target.detach()  # the fd is C's now
        else:
            self._engine.splice_connect(conn.conn_id, target, now + timeout, now)
        self._conns.pop(conn.conn_id, None)
        self._spliced[conn.conn_id] = (conn, on_done)
        self._splices_started = True
        self._driver.splices_started()

    def forget(self, conn: TcpConn) -> None:
        self._conns.pop(conn.conn_id, None)

    # -- the fast relay --------------------------------------------------------------------

    def fast_relay_allow(
        self, peer_key: bytes, dst: Endpoint, ttl: float | None, connect_timeout: float
    ) -> None:
        """From now on, that peer's SYNs to dst are spliced by the engine itself, without
        `on_tcp`, for ttl seconds (None: until `fast_relay_clear`, or the peer's removal);
        each is reported to `on_fast_relay`.  For destinations whose every connection from
        that peer `on_tcp` would relay anyway."""
        peer_id = self._peer_id(peer_key)
        if peer_id is None:
            return  # gone meanwhile: nothing to approve
        expires = None if ttl is None else self._driver.now() + ttl
        self._engine.fast_relay_allow(peer_id, dst, expires, connect_timeout)

    def fast_relay_bound(self, per_peer: int, total: int) -> None:
        """The fast relay takes a SYN only while its peer has at most per_peer open connections
        and the engine at most total; past either, `on_tcp` decides it (and can refuse it)."""
        self._engine.fast_relay_bound(per_peer, total)

    def fast_relay_clear(self) -> None:
        """Every SYN goes to `on_tcp` again, until the next `fast_relay_allow`."""
        self._engine.fast_relay_clear()

    def spliced_flow_bytes(self, within: float) -> dict[int, tuple[int, int]]:
        """{conn_id: (up, down)} of spliced connections whose bytes moved in the last `within`
        seconds: what a console needs to keep open connections' counters live."""
        return self._engine.splice_active_flows(self._driver.now() - within)

    # -- from the engine (called by the tunnel's dispatch, under the engine lock) ----------

    def drain(self, *, tcp: bool, udp: bool) -> None:
        # At most TCP_EVENTS_PER_TURN TCP events a turn, the rest on the next (flush_soon):
        # a burst of one peer's SYNs must not keep every peer's handshakes waiting behind it.
        events = self._engine.tcp_events(TCP_EVENTS_PER_TURN) if tcp else []
        if len(events) == TCP_EVENTS_PER_TURN:
            self._driver.flush_soon()
        for ev_type, conn_id, arg in events:
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
        for meta in self._engine.udp_datagrams() if udp else ():
            key = self._peer_key(meta.peer_id)
            if key is None or self.on_udp is None:
                continue
            try:
                self.on_udp(UdpDatagram(self, meta, key))
            except Exception:
                log.exception("UDP handler failed")

    def _new_conn(self, conn_id: int) -> None:
        info = self._engine.tcp_info(conn_id)
        key = self._peer_key(info.peer_id)
        if key is None or self.on_tcp is None:
            now = self._driver.now()
            self._engine.tcp_reject(conn_id, now)
            self._engine.tcp_release(conn_id, now)
            return
        conn = TcpConn(self, conn_id, info, key)
        self._conns[conn_id] = conn
        try:
            self.on_tcp(conn)
        except Exception:
            log.exception("TCP handler failed")
            conn.reject()

    def service_splices(self, now: float, *, reports: bool) -> bool:
        """Settle splices started this turn (a connect to a nearby host often completes inside
        connect() itself: the SYN-ACKs then leave in this turn, not the next) and take the
        reports waiting; True if there was anything to do."""
        started, self._splices_started = self._splices_started, False
        if started:
            self._engine.splice_service(now)
        if started or reports:
            self.take_reports(now)
        return started or reports

    def take_reports(self, now: float) -> None:
        """Move C's reports (fast-relayed connections opened, splices ended, in that order: a
        result may be of a connection opened in the same batch) to be delivered after the
        engine lock is given back: building events for a batch of connections must not keep
        the engine's thread waiting."""
        for opened in self._engine.fast_relay_opened():
            key = self._peer_key(opened.peer_id)
            if key is not None:  # always: the tunnel takes reports before removing a peer
                self._reports.append((opened, key))
        self._reports.extend(self._engine.splice_results(now))
        if self._reports and not self._reports_scheduled:
            self._reports_scheduled = True
            self._driver.later(self.deliver_reports)

    def deliver_reports(self) -> None:
        self._reports_scheduled = False
        reports, self._reports = self._reports, []
        for report in reports:
            if isinstance(report, tuple):
                opened, public_key = report
                try:
                    if self.on_fast_relay is not None:
                        done = self.on_fast_relay(opened, public_key)
                        self._spliced[opened.conn_id] = (None, done)
                except Exception:
                    log.exception("fast relay handler failed")
                continue
            if (entry := self._spliced.pop(report.conn_id, None)) is None:
                continue
            conn, on_done = entry
            if conn is not None:
                conn._spliced_done(report)
            try:
                on_done(report)
            except Exception:
                log.exception("splice completion handler failed")

    # -- peers and closing -----------------------------------------------------------------

    def abort_peer(self, public_key: bytes) -> None:
        """End a departing peer's connections (reports of its fast-relayed ones first: they
        name it by an id that is about to be reused)."""
        self.take_reports(self._driver.now())
        for conn in [c for c in self._conns.values() if c.peer_public_key == public_key]:
            conn.abort()

    def close(self, now: float) -> None:
        """Abort everything; each connection still ends with its report."""
        for conn in list(self._conns.values()):
            conn.abort()
        self.take_reports(now)  # fast-relayed connections not reported yet end with one too
        self.deliver_reports()
        for conn_id in list(self._spliced):
            self._engine.splice_abort(conn_id, now)
        self.take_reports(now)
        self.deliver_reports()
