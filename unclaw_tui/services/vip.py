"""Connections and datagrams to a VIP: carried on to the real address of the VIP's hostname.

TCP (any port but 443/8443, which the router sends to TLS): the VIP's hostname from the map
(an unknown VIP: RST), its real IPv4 addresses from the upstream (cached by TTL), the decision
point on them, then a connection to the first that accepts (the next one on failure, within
one overall connect budget); only then is the peer's SYN answered, and both ways are spliced
as the relay does (`flow.carry`). Its flow's events carry route "vip" and the hostname.

UDP: a datagram to an unknown VIP gets ICMP port unreachable. UDP to port 443 of a VIP is
dropped without a word: that is QUIC to a host we intercept, and dropping it makes clients fall
back to TCP, where the TLS service sees it. Other datagrams are relayed by a `UdpRelay` whose
flows go to the resolved address (replies still come from the VIP).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

from unclaw_tui.decision import Moment, Question
from unclaw_tui.flow import carry
from unclaw_tui.pump import DEFAULT_CONNECT_TIMEOUT, ConnectFailed, connect_socket
from unclaw_tui.router import Route
from unclaw_tui.services.relay import UdpRelay

if TYPE_CHECKING:
    from unclaw_tui.engine import UdpDatagram
    from unclaw_tui.flow import Flow
    from unclaw_tui.services.base import GatewayServices, Resolver

QUIC_PORT = 443
MAX_ADDRESSES_TRIED = 4
MIN_CONNECT_TIMEOUT = 3.0  # per address, when several share DEFAULT_CONNECT_TIMEOUT
MAX_UDP_RESOLVING = 256  # datagrams waiting for their hostname's addresses; past it, dropped


class VipService:
    """Route.VIP's service (see the module docstring)."""

    def __init__(self, gateway: GatewayServices, resolver: Resolver) -> None:
        self.gateway = gateway
        self.resolver = resolver
        s = gateway.settings
        self.udp = UdpRelay(
            gateway.flows,
            gateway.decisions,
            idle_timeout=s.udp_idle_timeout,
            max_flows_per_peer=s.max_flows_per_peer,
            route=Route.VIP,
        )
        self.counts: Counter[str] = Counter()  # "quic_dropped", "unknown_vip", ...
        self._resolving: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- TCP ---------------------------------------------------------------------------------

    async def handle_tcp(self, flow: Flow) -> None:
        hostname = self.resolver.hostname_for_vip(flow.dst_ip)
        flow.open(hostname)
        if hostname is None:
            self.counts["unknown_vip"] += 1
            flow.refuse("unknown VIP")
            return
        # Carried to the first real address of the hostname that the decision point allows
        # and that accepts; else refused, saying why.
        addresses = (await self.resolver.resolve(hostname))[:MAX_ADDRESSES_TRIED]
        if not addresses:
            flow.refuse(f"{hostname} does not resolve upstream")
            return
        question = Question.about(flow, Moment.FLOW, hostname=hostname, addresses=tuple(addresses))
        verdict = self.gateway.decisions.decide(question)
        errors = [f"{ip}: {why}" for ip, why in verdict.refused]
        if verdict.addresses:
            timeout = max(MIN_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT / len(verdict.addresses))
            for ip in verdict.addresses:
                try:
                    sock = await connect_socket(ip, flow.dst_port, timeout=timeout)
                except ConnectFailed as exc:
                    errors.append(f"{ip}: {exc}")
                    continue
                carry(flow, sock)  # a spliced connection needs no task of ours: not waited for
                return
        flow.refuse("; ".join(errors))

    # -- UDP ---------------------------------------------------------------------------------

    def handle_udp(self, dgram: UdpDatagram) -> None:
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
        task = asyncio.ensure_future(self._udp_first(dgram, hostname))
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _udp_first(self, dgram: UdpDatagram, hostname: str) -> None:
        addresses = await self.resolver.resolve(hostname)
        if self._closed:
            return
        if not addresses:
            dgram.unreachable()
            return
        self.udp.handle(dgram, addresses=tuple(addresses), hostname=hostname)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._resolving):
            task.cancel()
        self.udp.close()
