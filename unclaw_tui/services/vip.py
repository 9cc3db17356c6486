"""Connections and datagrams to a VIP: carried on to the real address of the VIP's hostname.

TCP (any port but 443/8443, which the router sends to TLS): the VIP's hostname from the map
(an unknown VIP: RST), its real IPv4 addresses from the upstream (cached by TTL), the egress
policy on each, then a connection to the first that accepts (the next one on failure, within
one overall connect budget); only then is the peer's SYN answered, and both ways are spliced
as the relay does: by the engine in C when the connection offers `splice_socket`, else by
asyncio streams. Every connection yields one `TcpOpened` and one `TcpClosed` with route
"vip" and the hostname.

UDP: a datagram to an unknown VIP gets ICMP port unreachable. UDP to port 443 of a VIP is
dropped without a word: that is QUIC to a host we intercept, and dropping it makes clients fall
back to TCP, where the TLS service sees it. Other datagrams are relayed by a `UdpRelay` whose
flows go to the resolved address (replies still come from the VIP).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from unclaw_tui.events import TcpClosed, TcpOpened
from unclaw_tui.router import Route
from unclaw_tui.services.relay import (
    DEFAULT_CONNECT_TIMEOUT,
    MIN_READ_SIZE,
    ConnectFailed,
    Side,
    SpliceStats,
    UdpRelay,
    connect_host,
    connect_socket,
    flow_ident,
    reset_host_connection,
    splice,
    spliced_stats,
)

if TYPE_CHECKING:
    from unclaw_tui.engine._ffi import SpliceResult
    from unclaw_tui.services.base import GatewayServices
    from unclaw_tui.services.relay import TcpConnLike, UdpDatagramLike

HostT = TypeVar("HostT")
QUIC_PORT = 443
MAX_ADDRESSES_TRIED = 4
MIN_CONNECT_TIMEOUT = 3.0  # per address, when several share DEFAULT_CONNECT_TIMEOUT
MAX_UDP_RESOLVING = 256  # datagrams waiting for their hostname's addresses; past it, dropped
# UDP flow ids of this relay: far from the engine's TCP ids and the main relay's UDP ids (which
# start at 1 << 32), since OpenFlows keys flows by id.
UDP_FLOW_IDS_START = 5 << 32


class VipResolver(Protocol):
    def hostname_for_vip(self, ip: str) -> str | None: ...
    async def resolve(self, hostname: str) -> list[str]: ...


class VipService:
    """Route.VIP's service (see the module docstring)."""

    def __init__(self, gateway: GatewayServices, resolver: VipResolver) -> None:
        self.gateway = gateway
        self.resolver = resolver
        s = gateway.settings
        self.udp = UdpRelay(
            gateway.policy,
            peer_name=gateway.peer_name,
            on_open=gateway.publish,
            on_close=gateway.publish,
            idle_timeout=s.udp_idle_timeout,
            max_flows_per_peer=s.max_flows_per_peer,
            flow_ids=itertools.count(UDP_FLOW_IDS_START),
            route=str(Route.VIP),
        )
        self.counts: Counter[str] = Counter()  # "quic_dropped", "unknown_vip", ...
        self._resolving: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- TCP ---------------------------------------------------------------------------------

    async def handle_tcp(self, conn: TcpConnLike) -> None:
        started = time.monotonic()
        hostname = self.resolver.hostname_for_vip(conn.dst_ip)
        ident = flow_ident(conn, self.gateway.peer_name, str(Route.VIP), hostname)
        self.gateway.publish(TcpOpened(**ident))
        stats = SpliceStats()
        answered = reported = False
        try:
            if hostname is None:
                self.counts["unknown_vip"] += 1
                stats.error = "unknown VIP"
                return
            splice_socket = getattr(conn, "splice_socket", None)
            if splice_socket is not None:
                # The engine can splice in C: connect a plain socket and hand it over.
                sock = await self._connect(hostname, conn.dst_port, stats, connect_socket)
                if sock is None:
                    return
                try:
                    splice_socket(sock, lambda result: self._spliced(ident, started, result))
                except Exception as exc:
                    sock.close()
                    answered = True  # the engine gave up on the SYN: nothing left to reject
                    stats.error = f"peer gone before accept: {exc}"
                    return
                answered = reported = True  # TcpClosed comes when the splice ends
                return
            self.gateway.open_flows.track(conn.conn_id, stats)
            host = await self._connect(hostname, conn.dst_port, stats, self._connect_streams)
            if host is None:
                return
            host_reader, host_writer = host
            try:
                peer_reader, peer_writer = conn.accept()
            except Exception as exc:
                reset_host_connection(host_writer)
                answered = True  # the engine gave up on the SYN: nothing left to reject
                stats.error = f"peer gone before accept: {exc}"
                return
            answered = True
            buffer = self.gateway.settings.tcp_buffer
            with contextlib.suppress(NotImplementedError, AttributeError):
                peer_writer.transport.set_write_buffer_limits(high=buffer)
            await splice(
                Side("peer", peer_reader, peer_writer, conn.abort),
                Side(
                    "destination",
                    host_reader,
                    host_writer,
                    lambda: reset_host_connection(host_writer),
                ),
                read_size=max(MIN_READ_SIZE, buffer),
                stats=stats,
            )
        except asyncio.CancelledError:
            stats.error = stats.error or "cancelled"
            raise
        except Exception as exc:
            stats.error = f"internal error: {exc}"
            with contextlib.suppress(Exception):
                if answered:
                    conn.abort()
                else:
                    conn.reject()
            answered = True
            raise
        finally:
            if not answered:
                with contextlib.suppress(Exception):
                    conn.reject()  # RST: the client sees "connection refused" at once
            if not reported:
                self.gateway.publish(
                    TcpClosed(
                        **ident,
                        bytes_up=stats.bytes_up,
                        bytes_down=stats.bytes_down,
                        duration=time.monotonic() - started,
                        error=stats.error,
                    )
                )

    def _spliced(self, ident: dict[str, Any], started: float, result: SpliceResult) -> None:
        stats = spliced_stats(result, DEFAULT_CONNECT_TIMEOUT)
        self.gateway.publish(
            TcpClosed(
                **ident,
                bytes_up=stats.bytes_up,
                bytes_down=stats.bytes_down,
                duration=time.monotonic() - started,
                error=stats.error,
            )
        )

    async def _connect_streams(
        self, ip: str, port: int, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        buffer = self.gateway.settings.tcp_buffer
        return await connect_host(ip, port, timeout=timeout, buffer_size=buffer)

    async def _connect(
        self,
        hostname: str,
        port: int,
        stats: SpliceStats,
        connect: Callable[..., Awaitable[HostT]],
    ) -> HostT | None:
        """`connect(ip, port, timeout)` to the first real address that the policy allows and
        that accepts; None (with stats.error saying why) if there is none."""
        addresses = (await self.resolver.resolve(hostname))[:MAX_ADDRESSES_TRIED]
        if not addresses:
            stats.error = f"{hostname} does not resolve upstream"
            return None
        allowed: list[str] = []
        errors: list[str] = []
        for ip in addresses:
            reason = self.gateway.policy.check(ip)
            if reason is None:
                allowed.append(ip)
            else:
                errors.append(f"{ip}: refused by egress policy: {reason}")
        if allowed:
            timeout = max(MIN_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT / len(allowed))
            for ip in allowed:
                try:
                    return await connect(ip, port, timeout=timeout)
                except ConnectFailed as exc:
                    errors.append(f"{ip}: {exc}")
        stats.error = "; ".join(errors)
        return None

    # -- UDP ---------------------------------------------------------------------------------

    def handle_udp(self, dgram: UdpDatagramLike) -> None:
        if self._closed:
            return
        hostname = self.resolver.hostname_for_vip(dgram.dst_ip)
        if hostname is None:
            self.counts["unknown_vip"] += 1
            dgram.unreachable()
            return
        if dgram.dst_port == QUIC_PORT:
            self.counts["quic_dropped"] += 1
            return
        key = (dgram.peer_public_key, dgram.src_port, dgram.dst_ip, dgram.dst_port)
        if key in self.udp.flows:
            self.udp.handle(dgram)
            return
        if len(self._resolving) >= MAX_UDP_RESOLVING:
            self.counts["udp_dropped"] += 1
            return
        self._spawn(self._udp_first(dgram, hostname))

    async def _udp_first(self, dgram: UdpDatagramLike, hostname: str) -> None:
        addresses = await self.resolver.resolve(hostname)
        if self._closed:
            return
        if not addresses:
            dgram.unreachable()
            return
        # The first address the policy allows; else the first, so the refusal is reported.
        target = next((ip for ip in addresses if self.gateway.policy.check(ip) is None), None)
        self.udp.handle(dgram, target_ip=target or addresses[0], hostname=hostname)

    def _spawn(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(job)
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._resolving):
            task.cancel()
        self.udp.close()
