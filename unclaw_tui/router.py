"""Which service handles a flow a peer opened: the routing table of ARCHITECTURE.md, in one place.

`route()` is the table itself, a pure function of the destination. `Router` adds the one piece
of run-time state: which services exist yet. A route whose service is not enabled falls
through to the relay, so DNS and TLS can land later without any caller deciding anything.

TCP destination                      | route
-------------------------------------|------
the gateway's tunnel address, 80     | PAGE (the CA page, services/ca_page.py)
any IP, port 443 or 8443             | TLS (SNI; a VIP's hostname is known even without SNI)
any IP, port 53                      | DNS over TCP
a VIP (the VIP net), any other port  | VIP (per-hostname handler)
anything else                        | RELAY

UDP destination                      | route
-------------------------------------|------
any IP, port 53                      | DNS
a VIP, any other port                | VIP
anything else                        | RELAY
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable
from enum import StrEnum
from typing import Literal

from unclaw_tui.config import VIP_NETWORK

Proto = Literal["tcp", "udp"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TLS_PORTS = frozenset({443, 8443})
DNS_PORT = 53
PAGE_PORT = 80

_DEFAULT_VIP_NETWORK = ipaddress.ip_network(VIP_NETWORK)


class Route(StrEnum):
    """A handler; the values are the `route` field of the flow events."""

    TLS = "tls"
    DNS = "dns"
    VIP = "vip"
    RELAY = "relay"
    PAGE = "page"


@functools.lru_cache(maxsize=4096)  # per connection otherwise: parsing is not free
def is_vip(dst_ip: str, vip_network: IPNetwork = _DEFAULT_VIP_NETWORK) -> bool:
    try:
        return ipaddress.ip_address(dst_ip) in vip_network
    except ValueError:
        return False


def route(
    proto: Proto,
    dst_ip: str,
    dst_port: int,
    *,
    vip_hostname: str | None = None,
    vip_network: IPNetwork = _DEFAULT_VIP_NETWORK,
    gateway_ip: str | None = None,
) -> Route:
    """The handler for a flow to dst_ip:dst_port (the table of the module docstring).
    `vip_hostname` is the VIP map's hostname for dst_ip when the caller looked it up: a mapped
    address is a VIP even outside `vip_network` (a map kept from a run with another VIP net)."""
    if proto not in ("tcp", "udp"):
        raise ValueError(f"unknown protocol {proto!r}")
    if proto == "tcp" and dst_port == PAGE_PORT and dst_ip == gateway_ip:
        return Route.PAGE
    if proto == "tcp" and dst_port in TLS_PORTS:
        return Route.TLS
    if dst_port == DNS_PORT:
        return Route.DNS
    return Route.VIP if vip_hostname is not None or is_vip(dst_ip, vip_network) else Route.RELAY


class Router:
    """The table plus which services are running; a disabled route falls through to RELAY,
    which is always enabled (the egress policy applies there, so e.g. a VIP reached while the
    VIP service is off is refused, not relayed)."""

    def __init__(
        self,
        enabled: Iterable[Route] = (Route.RELAY,),
        *,
        vip_network: IPNetwork | str = _DEFAULT_VIP_NETWORK,
        gateway_ip: str | None = None,
    ) -> None:
        self.enabled: frozenset[Route] = frozenset(enabled) | {Route.RELAY}
        self.vip_network: IPNetwork = ipaddress.ip_network(vip_network)
        self.gateway_ip = gateway_ip  # the tunnel address the CA page is served on

    def enable(self, *routes: Route) -> None:
        self.enabled = self.enabled | set(routes)

    def decide(
        self, proto: Proto, dst_ip: str, dst_port: int, *, vip_hostname: str | None = None
    ) -> Route:
        chosen = route(
            proto,
            dst_ip,
            dst_port,
            vip_hostname=vip_hostname,
            vip_network=self.vip_network,
            gateway_ip=self.gateway_ip,
        )
        return chosen if chosen in self.enabled else Route.RELAY
