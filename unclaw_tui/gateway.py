"""The composition root: engine + state (+ router and services later), offered to the UI and CLI.

This module's top half is the interface the UI codes against (snapshot dataclasses and the
GatewayProtocol); a FakeGateway in the TUI tests implements the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from unclaw_tui.events import Subscription


@dataclass(frozen=True, slots=True)
class PeerSnapshot:
    name: str
    public_key: str  # base64
    ip: str  # tunnel IP, e.g. "10.77.0.2"
    created: float  # wall clock
    endpoint: str | None  # "203.0.113.5:51820" / "[2001:db8::1]:51820", None if never seen
    last_handshake: float | None  # wall clock of the last completed handshake
    rx_bytes: int  # bytes received from the peer (cumulative, survives restarts)
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    open_connections: int = 0


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    listen_port: int
    public_key: str  # base64
    endpoint: str  # as written into client configs, host:port
    address: str  # "10.77.0.1/24"
    started_at: float  # wall clock
    peers: tuple[PeerSnapshot, ...]
    drops: dict[str, int] = field(default_factory=dict)  # reason -> count
    open_flows: int = 0
    under_load: bool = False

    @property
    def peers_online(self) -> int:
        """Peers with a handshake in the last 180 s (REJECT_AFTER_TIME)."""
        import time

        now = time.time()
        return sum(
            1 for p in self.peers if p.last_handshake is not None and now - p.last_handshake < 180
        )


class GatewayProtocol(Protocol):
    """What the UI and the CLI may do with a running gateway."""

    def snapshot(self) -> GatewaySnapshot: ...

    def subscribe(self) -> Subscription: ...

    def add_peer(self, name: str, ip: str | None = None) -> PeerSnapshot:
        """Add a peer (persisted, live at once). Raises ValueError with a one-line reason."""
        ...

    def remove_peer(self, name: str) -> None:
        """Remove a peer (persisted, live at once). Raises KeyError if unknown."""
        ...

    def client_config(self, name: str) -> str:
        """The peer's wg-quick config text. Raises KeyError if unknown."""
        ...
