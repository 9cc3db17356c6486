"""The routing table (ARCHITECTURE.md), one row per case, and the fall-through to the relay."""

from __future__ import annotations

import ipaddress

import pytest

from unclaw_tui.router import Route, Router, route

TABLE = [
    # proto, dst ip, dst port, expected route
    ("tcp", "93.184.216.34", 443, Route.TLS),
    ("tcp", "93.184.216.34", 8443, Route.TLS),
    ("tcp", "10.78.0.5", 443, Route.TLS),  # a VIP on 443 is still TLS (hostname from the map)
    ("tcp", "10.78.255.254", 8443, Route.TLS),
    ("tcp", "198.51.100.1", 53, Route.DNS),
    ("tcp", "10.77.0.1", 53, Route.DNS),
    ("tcp", "10.78.3.4", 53, Route.DNS),
    ("tcp", "10.78.0.1", 80, Route.VIP),
    ("tcp", "10.78.255.255", 22, Route.VIP),
    ("tcp", "10.78.0.0", 1, Route.VIP),
    ("tcp", "10.79.0.1", 80, Route.RELAY),  # just outside the VIP net
    ("tcp", "10.77.255.255", 80, Route.RELAY),
    ("tcp", "93.184.216.34", 80, Route.RELAY),
    ("tcp", "93.184.216.34", 444, Route.RELAY),
    ("tcp", "93.184.216.34", 8080, Route.RELAY),
    ("tcp", "2001:db8::1", 443, Route.TLS),
    ("tcp", "2001:db8::1", 80, Route.RELAY),
    ("udp", "203.0.113.8", 53, Route.DNS),
    ("udp", "10.77.0.1", 53, Route.DNS),
    ("udp", "10.78.0.9", 53, Route.DNS),
    ("udp", "10.78.0.9", 443, Route.VIP),  # QUIC to a VIP: the VIP service decides
    ("udp", "10.78.0.9", 5000, Route.VIP),
    ("udp", "203.0.113.8", 443, Route.RELAY),
    ("udp", "203.0.113.8", 123, Route.RELAY),
    ("udp", "203.0.113.8", 8443, Route.RELAY),  # TLS ports mean nothing for UDP
    ("udp", "2001:db8::1", 53, Route.DNS),
]


@pytest.mark.parametrize(("proto", "dst_ip", "dst_port", "expected"), TABLE)
def test_table(proto: str, dst_ip: str, dst_port: int, expected: Route) -> None:
    assert route(proto, dst_ip, dst_port) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("proto", "dst_ip", "dst_port", "expected"), TABLE)
def test_router_with_every_service_agrees_with_the_table(
    proto: str, dst_ip: str, dst_port: int, expected: Route
) -> None:
    router = Router(enabled=set(Route))
    assert router.decide(proto, dst_ip, dst_port) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("proto", "dst_ip", "dst_port", "expected"), TABLE)
def test_disabled_routes_fall_through_to_the_relay(
    proto: str, dst_ip: str, dst_port: int, expected: Route
) -> None:
    assert Router().decide(proto, dst_ip, dst_port) is Route.RELAY  # type: ignore[arg-type]
    only_dns = Router(enabled={Route.DNS})
    want = Route.DNS if expected is Route.DNS else Route.RELAY
    assert only_dns.decide(proto, dst_ip, dst_port) is want  # type: ignore[arg-type]


def test_enable_later_and_relay_always_on() -> None:
    router = Router(enabled=())
    assert Route.RELAY in router.enabled
    assert router.decide("tcp", "1.2.3.4", 443) is Route.RELAY
    router.enable(Route.TLS)
    assert router.decide("tcp", "1.2.3.4", 443) is Route.TLS
    assert router.decide("tcp", "1.2.3.4", 53) is Route.RELAY


def test_route_values_are_the_event_strings() -> None:
    assert [str(r) for r in Route] == ["tls", "dns", "vip", "relay", "page"]


def test_vip_network_is_configurable_and_a_known_hostname_marks_a_vip() -> None:
    router = Router(enabled=set(Route), vip_network="10.99.0.0/16")
    assert router.decide("tcp", "10.99.1.1", 80) is Route.VIP
    assert router.decide("tcp", "10.78.1.1", 80) is Route.RELAY
    # A mapped VIP (say from a run with the default VIP net) is a VIP wherever it lies.
    assert router.decide("tcp", "10.78.1.1", 80, vip_hostname="example.test") is Route.VIP
    assert route("udp", "10.78.1.1", 9, vip_network=ipaddress.ip_network("10.0.0.0/8")) is (
        Route.VIP
    )


def test_unknown_protocol_is_an_error() -> None:
    with pytest.raises(ValueError, match="protocol"):
        route("icmp", "1.2.3.4", 0)  # type: ignore[arg-type]
