"""Settings of a gateway run, built by the CLI from flags and the state dir's saved values."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_LISTEN_PORT = 51820
DEFAULT_ADDRESS = "10.77.0.1/24"
DEFAULT_MTU = 1420
VIP_NETWORK = "10.78.0.0/16"
DEFAULT_TCP_BUFFER = 256 * 1024
DEFAULT_MAX_FLOWS_PER_PEER = 256
DEFAULT_UDP_IDLE_TIMEOUT = 60.0
# TCP connections a peer may hold open, and half-open (SYN received, handshake not finished);
# past either, its new SYNs are refused with an RST (the C stack's own defaults).
DEFAULT_MAX_CONNS_PER_PEER = 4096
DEFAULT_MAX_HALF_OPEN_PER_PEER = 256
# Slow-loris bounds: the time a client of the TLS service may take to send its whole
# ClientHello, and a client of DNS over TCP to start each query.
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_DNS_TCP_IDLE_TIMEOUT = 10.0
# A peer that sent nothing, not even a handshake, for this long (3 x REJECT_AFTER_TIME: its
# keys are gone too) has left: its flows end and give their descriptors back.
DEFAULT_SILENT_PEER_AFTER = 540.0
MAX_CAPTURE_BODIES = 16 * 1024 * 1024  # --capture-bodies: bytes kept per body at most

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/unclaw-tui, else ~/.local/state/unclaw-tui."""
    base = os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base else Path.home() / ".local" / "state"
    return root / "unclaw-tui"


@dataclass(slots=True)
class Settings:
    state_dir: Path = field(default_factory=default_state_dir)
    listen_port: int = DEFAULT_LISTEN_PORT
    # host[:port] written into client configs; None means "this host's primary IPv4 address".
    endpoint: str | None = None
    address: ipaddress.IPv4Interface = field(
        default_factory=lambda: ipaddress.IPv4Interface(DEFAULT_ADDRESS)
    )
    mtu: int = DEFAULT_MTU
    max_peers: int = 4096
    json_events: bool = False
    # Egress policy changes (see services/egress.py for the defaults and precedence); like the
    # buffer and flow limits below they come from flags of this run, never from the state dir.
    allow: list[IPNetwork] = field(default_factory=list)
    deny: list[IPNetwork] = field(default_factory=list)
    tcp_buffer: int = DEFAULT_TCP_BUFFER  # bytes per relayed TCP connection, each way
    max_flows_per_peer: int = DEFAULT_MAX_FLOWS_PER_PEER  # UDP flows
    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT  # seconds
    # DNS: upstream resolvers as (ip, port); empty means the nameservers of /etc/resolv.conf.
    upstream_dns: list[tuple[str, int]] = field(default_factory=list)
    # TLS: hostname globs relayed untouched; with auto_passthrough, hosts whose clients rejected
    # our certificate are passed through from then on.
    passthrough: list[str] = field(default_factory=list)
    auto_passthrough: bool = False
    max_conns_per_peer: int = DEFAULT_MAX_CONNS_PER_PEER  # TCP, this run only
    max_half_open_per_peer: int = DEFAULT_MAX_HALF_OPEN_PER_PEER
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT  # seconds, TLS
    dns_tcp_idle_timeout: float = DEFAULT_DNS_TCP_IDLE_TIMEOUT  # seconds
    silent_peer_after: float = DEFAULT_SILENT_PEER_AFTER  # seconds
    # The data plane on a C thread of its own (off: on the event loop's thread, as before).
    engine_thread: bool = True
    # New connections to a destination the relay already accepted are relayed by the engine
    # without asking Python again, and reported afterwards (off: every SYN is decided in Python).
    fast_relay: bool = True
    # Intercepted HTTP: keep the first this many bytes of each request and response body in
    # the request record (0: none, only sizes).
    capture_bodies: int = 0

    @property
    def gateway_ip(self) -> ipaddress.IPv4Address:
        return self.address.ip

    @property
    def tunnel_network(self) -> ipaddress.IPv4Network:
        return self.address.network
