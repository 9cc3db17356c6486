"""What a service (DNS, TLS, ...) offers the gateway, and what the gateway offers it.

Each service module has `create(gateway) -> dict[Route, Service]`; `registry.build` collects
them and the gateway sends every flow whose route has a service to it (the rest to the relay).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from unclaw_tui.config import Settings
    from unclaw_tui.decision import DecisionPoint
    from unclaw_tui.engine import UdpDatagram
    from unclaw_tui.events import Event
    from unclaw_tui.flow import Flow, FlowRegistry
    from unclaw_tui.state import StateDir

K = TypeVar("K")
V = TypeVar("V")


class Service(Protocol):
    async def handle_tcp(self, flow: Flow) -> None:
        """Serve a decided connection: open its flow, answer the SYN (`flow.accept`, `carry`)
        or refuse it, and see that it ends; the flow publishes its own events."""
        ...

    def handle_udp(self, dgram: UdpDatagram) -> None:
        """Answer or forward one datagram; must not block (start a task if needed)."""
        ...

    async def close(self) -> None: ...


class Resolver(Protocol):
    """Offered by the DNS service as `gateway.resolver` for VIP-aware services."""

    def hostname_for_vip(self, ip: str) -> str | None: ...

    async def resolve(self, hostname: str) -> list[str]:
        """The hostname's real IPv4 addresses from the upstream (cached by TTL); [] if none."""
        ...


class GatewayServices(Protocol):
    """The part of the gateway a service may use."""

    settings: Settings
    state: StateDir
    decisions: DecisionPoint
    flows: FlowRegistry
    resolver: Resolver | None

    def publish(self, event: Event) -> None:
        """Send an event to the bus."""
        ...

    def peer_name(self, public_key: bytes) -> str: ...


def lru_put(cache: OrderedDict[K, V], key: K, value: V, limit: int) -> None:
    """Store `key` as the most recently used entry, dropping the least recent past `limit`."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)
