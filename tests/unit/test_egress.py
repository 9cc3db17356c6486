"""Egress policy: the default refusals, --allow/--deny precedence, host address refresh, and the
rule table against a slow reference on random inputs."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unclaw_tui import netutil
from unclaw_tui.services.egress import EgressPolicy, normalize, parse_cidr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HOSTS = {"192.0.2.10", "2001:db8:1::10", "127.0.0.1", "::1", "fe80::1"}


def policy(**kwargs: object) -> EgressPolicy:
    kwargs.setdefault("host_addresses", HOSTS)
    return EgressPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: judged as the IPv4 address
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1234", "link-local"),
        ("100.100.100.200", "cloud metadata"),  # in shared address space, not link-local
        ("fd00:ec2::254", "cloud metadata"),  # the IPv6 one, in the ULA range
        ("224.0.0.251", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("10.77.0.1", "tunnel network"),
        ("10.77.0.200", "tunnel network"),
        ("10.78.0.1", "VIP network"),
        ("10.78.200.3", "VIP network"),
        ("192.0.2.10", "host address"),
        ("::ffff:192.0.2.10", "host address"),
        ("2001:db8:1::10", "host address"),
        ("not an ip", "invalid address"),
        ("93.184.216.34", None),
        ("192.0.2.11", None),
        ("10.77.1.1", None),  # outside the /24 tunnel net
        ("10.79.0.1", None),
        ("192.168.1.1", None),  # private LANs are reachable unless --deny says otherwise
        ("2606:4700::1111", None),
        ("fd00::1", None),
    ],
)
def test_defaults(ip: str, reason: str | None) -> None:
    assert policy().check(ip) == reason


def test_real_host_addresses_are_refused_by_default() -> None:
    real = EgressPolicy()
    for addr in netutil.host_addresses():
        assert real.check(addr) is not None, addr
    assert real.check("127.0.0.1") == "loopback"
    assert real.check("169.254.169.254") == "link-local"


def test_allow_opens_a_default_range_and_deny_refuses_more() -> None:
    p = policy(
        allow=["127.0.0.0/8", "169.254.169.254/32"], deny=["203.0.113.0/24", "2001:db8::/32"]
    )
    assert p.check("127.0.0.1") is None  # the host's loopback address goes with the range
    assert p.check("::1") == "loopback"  # IPv6 loopback was not opened
    assert p.check("169.254.169.254") is None
    assert p.check("169.254.169.253") == "link-local"
    assert p.check("203.0.113.8") == "denied by --deny 203.0.113.0/24"
    assert p.check("192.0.2.44") is None
    assert p.check("2001:db8:1::10") == "host address"  # the /128 is more specific than the deny
    assert p.check("2001:db8::5") == "denied by --deny 2001:db8::/32"


def test_precedence_most_specific_wins_then_deny_over_allow() -> None:
    p = policy(
        deny=["203.0.113.0/24", "198.51.100.0/24"],
        allow=["203.0.113.8", "198.51.100.0/24", "10.77.0.0/16"],
    )
    assert p.check("203.0.113.8") is None  # the /32 allow is more specific than the /24 deny
    assert p.check("203.0.113.9") == "denied by --deny 203.0.113.0/24"
    assert p.check("198.51.100.1") == "denied by --deny 198.51.100.0/24"  # same network: deny wins
    # A wider allow does not open the tunnel's /24 (the default is more specific)...
    assert p.check("10.77.0.5") == "tunnel network"
    assert p.check("10.77.1.5") is None
    # ...and a host address needs an allow of exactly that address.
    assert policy(allow=["192.0.2.0/24"]).check("192.0.2.10") == "host address"
    assert policy(allow=["192.0.2.10/32"]).check("192.0.2.10") is None


def test_tunnel_and_vip_nets_follow_the_settings() -> None:
    p = policy(tunnel_net="10.50.0.0/16", vip_net="10.99.0.0/16")
    assert p.check("10.50.3.3") == "tunnel network"
    assert p.check("10.99.3.3") == "VIP network"
    assert p.check("10.77.0.5") is None
    assert p.check("10.78.0.5") is None


def test_host_addresses_are_refreshed_now_and_then() -> None:
    now = [0.0]
    current = [ipaddress.ip_address("192.0.2.50")]
    reads = []

    def source() -> list[IPAddress]:
        reads.append(now[0])
        return list(current)

    p = EgressPolicy(clock=lambda: now[0], host_address_source=source, refresh_interval=30)
    changes = []
    p.on_change = lambda: changes.append(now[0])
    assert p.check("192.0.2.50") == "host address"
    assert p.check("192.0.2.51") is None
    current[:] = [ipaddress.ip_address("192.0.2.51")]  # an interface changed its address
    now[0] = 29.0
    # A verdict kept elsewhere (the engine's fast relay) must lapse when the policy re-reads.
    assert p.verdicts_valid_for() == 1.0
    assert p.check("192.0.2.51") is None  # not re-read yet
    assert changes == []
    now[0] = 30.0
    assert p.check("192.0.2.51") == "host address"
    assert changes == [30.0]  # kept verdicts are told to go
    assert p.verdicts_valid_for() == 30.0
    assert p.check("192.0.2.50") is None
    assert reads == [0.0, 30.0]
    p.refresh_host_addresses(["192.0.2.52"])
    assert changes == [30.0, 30.0] and p.check("192.0.2.52") == "host address"
    # Given addresses are static: never re-read, and verdicts never lapse on their own.
    fixed = EgressPolicy(host_addresses=["192.0.2.9"], clock=lambda: now[0])
    assert fixed.verdicts_valid_for() is None
    now[0] = 1e9
    assert fixed.check("192.0.2.9") == "host address"


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("192.168.1.0/24", "192.168.1.0/24"),
        ("192.168.1.5/24", "192.168.1.0/24"),  # host bits dropped, as people write subnets
        (" 10.0.0.1 ", "10.0.0.1/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_parse_cidr(text: str, network: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize("text", ["", "banana", "10.0.0.0/33", "1.2.3.4/-1", "::/129", "1.2.3"])
def test_parse_cidr_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid CIDR"):
        parse_cidr(text)


# --- the rule table against a slow reference ---------------------------------------------------

REFERENCE_DEFAULTS = [
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
]


def slow_check(
    ip: str,
    allow: list[IPNetwork],
    deny: list[IPNetwork],
    hosts: list[IPAddress],
    tunnel: IPNetwork,
    vip: IPNetwork,
) -> str | None:
    """The documented precedence, by brute force: every containing rule is a candidate and the
    best is the one with the longest prefix, then deny > allow > default."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    defaults = [(ipaddress.ip_network(n), r) for n, r in REFERENCE_DEFAULTS]
    defaults += [(tunnel, "tunnel network"), (vip, "VIP network")]
    candidates: list[tuple[int, int, str | None]] = []
    for net, reason in defaults:
        if addr in net:
            candidates.append((net.prefixlen, 0, reason))
    for host in hosts:
        host = normalize(host)
        if host == addr and not any(host in net for net, _ in defaults):
            candidates.append((addr.max_prefixlen, 0, "host address"))
    for net in allow:
        if addr in net:
            candidates.append((net.prefixlen, 1, None))
    for net in deny:
        if addr in net:
            candidates.append((net.prefixlen, 2, f"denied by --deny {net}"))
    if not candidates:
        return None
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


# Addresses cluster around the interesting ranges so that random rules overlap them often.
ANCHORS = [
    "0.0.0.0", "10.77.0.0", "10.78.0.0", "127.0.0.0", "169.254.169.0", "192.0.2.0",
    "192.168.0.0", "224.0.0.0", "255.255.255.0", "8.8.8.0", "::", "::1", "fe80::",
    "2001:db8::", "ff02::", "fd00::", "::ffff:127.0.0.0", "::ffff:10.77.0.0",
]  # fmt: skip


@st.composite
def addresses(draw: st.DrawFn) -> IPAddress:
    anchor = ipaddress.ip_address(draw(st.sampled_from(ANCHORS)))
    if draw(st.booleans()):
        offset = draw(st.integers(0, 2**12))
    else:
        offset = draw(st.integers(0, 2**32 - 1))
    value = (int(anchor) + offset) % (2**anchor.max_prefixlen)
    return type(anchor)(value)


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    addr = draw(addresses())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # rules are written in IPv4 for IPv4 ranges
    prefixlen = draw(st.integers(addr.max_prefixlen - 24, addr.max_prefixlen))
    return ipaddress.ip_network(f"{addr}/{prefixlen}", strict=False)


TUNNEL_NETS = ["10.77.0.0/24", "10.50.0.0/16", "192.168.0.0/24", "fd00::/64"]
VIP_NETS = ["10.78.0.0/16", "10.99.0.0/16", "172.16.0.0/12"]


@settings(max_examples=300, deadline=None)
@given(
    allow=st.lists(networks(), max_size=6),
    deny=st.lists(networks(), max_size=6),
    hosts=st.lists(addresses(), max_size=8),
    tunnel=st.sampled_from(TUNNEL_NETS),
    vip=st.sampled_from(VIP_NETS),
    probes=st.lists(addresses(), min_size=1, max_size=30),
)
def test_policy_matches_slow_reference(
    allow: list[IPNetwork],
    deny: list[IPNetwork],
    hosts: list[IPAddress],
    tunnel: str,
    vip: str,
    probes: list[IPAddress],
) -> None:
    tunnel_net, vip_net = ipaddress.ip_network(tunnel), ipaddress.ip_network(vip)
    p = EgressPolicy(
        allow=allow, deny=deny, host_addresses=hosts, tunnel_net=tunnel_net, vip_net=vip_net
    )
    # Probe the rules' own edges too: that is where an off-by-one in masking would show.
    edges = [n.network_address for n in allow + deny] + [n.broadcast_address for n in allow + deny]
    for addr in [*probes, *hosts, *edges]:
        expected = slow_check(str(addr), allow, deny, hosts, tunnel_net, vip_net)
        assert p.check(str(addr)) == expected, addr
