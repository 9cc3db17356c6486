"""Client config text, endpoint resolution and host address detection."""

from __future__ import annotations

import ipaddress
import json

import pytest

from unclaw_tui import keys, netutil, wgquick
from unclaw_tui.state import PeerRecord

PEER_PRIVATE = "xjuQXHnxHxHlnwgpJvpnqMfoRTwwmafRmnUiL9PHR4U="
GATEWAY_PUBLIC = "MlL3Ml3TH+6hglJKKlSK7lYUVcdhZm2IjcCXYF9hW0Q="
PSK = "Xp/fFfkk/BXNmvb4UBaPKVKGQG5+pLCHP4Kmpo8RmOA="


def make_peer(ip: str = "10.77.0.2") -> PeerRecord:
    return PeerRecord(
        name="phone",
        public_key=keys.public_from_private(PEER_PRIVATE),
        private_key=PEER_PRIVATE,
        preshared_key=PSK,
        ip=ip,
        created=0.0,
    )


def test_client_config_exact_text() -> None:
    text = wgquick.client_config(make_peer(), GATEWAY_PUBLIC, "203.0.113.7:51820", "10.77.0.1")
    assert text == (
        "[Interface]\n"
        f"PrivateKey = {PEER_PRIVATE}\n"
        "Address = 10.77.0.2/32\n"
        "DNS = 10.77.0.1\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {GATEWAY_PUBLIC}\n"
        f"PresharedKey = {PSK}\n"
        "Endpoint = 203.0.113.7:51820\n"
        "AllowedIPs = 0.0.0.0/0, ::/0\n"
        "PersistentKeepalive = 25\n"
    )
    assert "#" not in text


def test_client_config_parses_back() -> None:
    text = wgquick.client_config(
        make_peer("10.77.0.9"), GATEWAY_PUBLIC, "vpn.example:1", "198.51.100.1"
    )
    parsed = wgquick.parse_config(text)
    assert parsed == {
        "Interface": {
            "PrivateKey": PEER_PRIVATE,
            "Address": "10.77.0.9/32",
            "DNS": "198.51.100.1",
        },
        "Peer": {
            "PublicKey": GATEWAY_PUBLIC,
            "PresharedKey": PSK,
            "Endpoint": "vpn.example:1",
            "AllowedIPs": "0.0.0.0/0, ::/0",
            "PersistentKeepalive": "25",
        },
    }


def test_client_config_brackets_ipv6_endpoint() -> None:
    text = wgquick.client_config(make_peer(), GATEWAY_PUBLIC, "[2001:db8::1]:51820", "10.77.0.1")
    assert "Endpoint = [2001:db8::1]:51820\n" in text


def test_client_config_needs_a_port() -> None:
    with pytest.raises(ValueError, match="no port"):
        wgquick.client_config(make_peer(), GATEWAY_PUBLIC, "vpn.example.com", "10.77.0.1")


# What `wg-quick strip` prints for the same input (checked by hand against wg-quick), minus
# the extra newline its final `echo` adds.
STRIP_INPUT = f"""[Interface]
PrivateKey = {PEER_PRIVATE}
Address = 10.77.0.2/32
dns = 10.77.0.1
MTU = 1380 # comment
ListenPort = 5555

[Peer]
PublicKey = {GATEWAY_PUBLIC}
PresharedKey = {PSK}
Endpoint = 192.0.2.2:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
"""
STRIP_OUTPUT = f"""[Interface]
PrivateKey = {PEER_PRIVATE}
ListenPort = 5555

[Peer]
PublicKey = {GATEWAY_PUBLIC}
PresharedKey = {PSK}
Endpoint = 192.0.2.2:51820
AllowedIPs = 0.0.0.0/0, ::/0
PersistentKeepalive = 25
"""


def test_strip_for_wg_setconf_matches_wg_quick() -> None:
    assert wgquick.strip_for_wg_setconf(STRIP_INPUT) == STRIP_OUTPUT


def test_strip_keeps_peer_keys_named_like_interface_keys() -> None:
    text = "[Peer]\nPublicKey = x\nDNS = kept-in-peer\n"
    assert wgquick.strip_for_wg_setconf(text) == text


def test_strip_of_client_config() -> None:
    text = wgquick.client_config(make_peer(), GATEWAY_PUBLIC, "203.0.113.7:51820", "10.77.0.1")
    stripped = wgquick.parse_config(wgquick.strip_for_wg_setconf(text))
    assert stripped["Interface"] == {"PrivateKey": PEER_PRIVATE}
    assert stripped["Peer"]["Endpoint"] == "203.0.113.7:51820"


@pytest.mark.parametrize(
    "text",
    ["Key = value\n", "[Interface]\nnoequals\n", "[Peer]\n[Peer]\n", "[Peer]\nA = 1\nA = 2\n"],
)
def test_parse_config_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        wgquick.parse_config(text)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("vpn.example.com", "vpn.example.com:51820"),
        ("vpn.example.com:443", "vpn.example.com:443"),
        ("203.0.113.9", "203.0.113.9:51820"),
        ("203.0.113.9:1", "203.0.113.9:1"),
        ("[2001:db8::1]:51821", "[2001:db8::1]:51821"),
        ("[2001:db8::1]", "[2001:db8::1]:51820"),
        ("2001:db8::1", "[2001:db8::1]:51820"),
        ("::1", "[::1]:51820"),
        ("localhost", "localhost:51820"),
    ],
)
def test_resolve_endpoint(endpoint: str, expected: str) -> None:
    assert wgquick.resolve_endpoint(endpoint, 51820) == expected


def test_resolve_endpoint_none_uses_primary_ipv4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netutil, "primary_ipv4", lambda: "198.51.100.4")
    assert wgquick.resolve_endpoint(None, 4242) == "198.51.100.4:4242"


def test_resolve_endpoint_none_real_host() -> None:
    host, _, port = wgquick.resolve_endpoint(None, 51820).rpartition(":")
    assert port == "51820"
    ipaddress.IPv4Address(host)


@pytest.mark.parametrize(
    "endpoint",
    [
        "",
        " vpn.example.com",
        "vpn example",
        "vpn.example.com:0",
        "vpn.example.com:65536",
        "vpn.example.com:port",
        "vpn.example.com:",
        "2001:db8::1:51820:x",
        "[2001:db8::1",
        "[not-v6]:1",
        "[2001:db8::1]51820",
        "-bad.example",
        "a_b.example",
    ],
)
def test_invalid_endpoints(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        wgquick.resolve_endpoint(endpoint, 51820)


# --- netutil -----------------------------------------------------------------------------------


def test_primary_ipv4_is_a_host_address() -> None:
    primary = ipaddress.IPv4Address(netutil.primary_ipv4())
    assert primary in netutil.host_addresses()


def test_primary_ipv4_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netutil, "default_route_ipv4", lambda: None)
    monkeypatch.setattr(
        netutil,
        "host_addresses",
        lambda: {
            ipaddress.IPv4Address("127.0.0.1"),
            ipaddress.IPv4Address("169.254.1.1"),
            ipaddress.IPv4Address("10.1.2.3"),
            ipaddress.IPv6Address("2001:db8::1"),
        },
    )
    assert netutil.primary_ipv4() == "10.1.2.3"
    monkeypatch.setattr(netutil, "host_addresses", lambda: {ipaddress.IPv4Address("127.0.0.1")})
    assert netutil.primary_ipv4() == "127.0.0.1"


def test_host_addresses_include_loopback() -> None:
    addrs = netutil.host_addresses()
    assert ipaddress.IPv4Address("127.0.0.1") in addrs
    assert ipaddress.IPv6Address("::1") in addrs


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 192.0.2.2
        /32 host LOCAL
     |-- 192.0.2.255
        /32 link BROADCAST
"""


def test_parse_fib_trie_takes_local_host_addresses() -> None:
    assert netutil._parse_fib_trie(FIB_TRIE) == {
        ipaddress.IPv4Address("127.0.0.1"),
        ipaddress.IPv4Address("192.0.2.2"),
    }


def test_parse_if_inet6() -> None:
    text = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe8000000000000000fc00fffe000001 02 40 20 80     eth0\n"
    )
    assert netutil._parse_if_inet6(text) == {
        ipaddress.IPv6Address("::1"),
        ipaddress.IPv6Address("fe80::fc:ff:fe00:1"),
    }


def test_parse_ip_json() -> None:
    text = json.dumps(
        [
            {"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}, {"local": "::1"}]},
            {"ifname": "eth0", "addr_info": [{"local": "fe80::1%eth0"}, {"local": "10.0.0.2"}]},
            {"ifname": "dummy"},
        ]
    )
    assert netutil._parse_ip_json(text) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "fe80::1", "10.0.0.2")
    }
    assert netutil._parse_ip_json("not json") == set()
