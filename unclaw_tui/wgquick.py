"""Client configs in wg-quick format, and the endpoint string written into them.

Mobile WireGuard apps reject comments and unknown keys, so only standard keys are emitted.
"""

from __future__ import annotations

import ipaddress
import re

from unclaw_tui import netutil
from unclaw_tui.state import PeerRecord

ALLOWED_IPS = "0.0.0.0/0, ::/0"
PERSISTENT_KEEPALIVE = 25

# Keys only wg-quick understands; `wg setconf` rejects them (the list `wg-quick strip` removes).
WG_QUICK_ONLY_KEYS = frozenset(
    {"address", "dns", "mtu", "table", "preup", "postup", "predown", "postdown", "saveconfig"}
)

# RFC 1123 host names (IPv4 addresses match too): labels of letters, digits and inner hyphens,
# dot-separated.
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def split_endpoint(endpoint: str) -> tuple[str, int | None]:
    """Split "host", "host:port", "[v6]", "[v6]:port" or a bare IPv6 into (host, port|None),
    the host without brackets; ValueError (one line) for anything else."""

    def bad(why: str) -> ValueError:
        return ValueError(f"invalid endpoint {endpoint!r}: {why}")

    def port(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise bad("the port must be 1..65535")
        return int(text)

    if endpoint.strip() != endpoint or not endpoint:
        raise bad("expected HOST[:PORT]")
    if endpoint.startswith("["):
        host, close, rest = endpoint[1:].partition("]")
        if not close:
            raise bad("missing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad("not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise bad("expected [IPv6]:PORT")
        return host, port(rest[1:]) if rest else None
    if endpoint.count(":") > 1:
        try:
            ipaddress.IPv6Address(endpoint)
        except ValueError:
            raise bad("write IPv6 with a port as [ADDR]:PORT") from None
        return endpoint, None
    host, sep, rest = endpoint.partition(":")
    if not _HOSTNAME_RE.fullmatch(host):
        raise bad("expected HOST[:PORT]")
    return host, port(rest) if sep else None


def format_endpoint(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def validate_endpoint(endpoint: str) -> str:
    """Return endpoint unchanged if split_endpoint accepts it (ValueError otherwise)."""
    split_endpoint(endpoint)
    return endpoint


def resolve_endpoint(endpoint: str | None, listen_port: int) -> str:
    """The Endpoint written into client configs: None → this host's primary IPv4 and
    listen_port; a host without a port gets listen_port; a bare IPv6 is bracketed."""
    if endpoint is None:
        return format_endpoint(netutil.primary_ipv4(), listen_port)
    host, port = split_endpoint(endpoint)
    return format_endpoint(host, listen_port if port is None else port)


def client_config(peer: PeerRecord, gateway_public_key: str, endpoint: str, dns: str) -> str:
    """The peer's wg-quick config: only standard keys, no comments, trailing newline."""
    host, port = split_endpoint(endpoint)
    if port is None:
        raise ValueError(f"endpoint {endpoint!r} has no port")
    return (
        "[Interface]\n"
        f"PrivateKey = {peer.private_key}\n"
        f"Address = {peer.ip}/32\n"
        f"DNS = {dns}\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {gateway_public_key}\n"
        f"PresharedKey = {peer.preshared_key}\n"
        f"Endpoint = {format_endpoint(host, port)}\n"
        f"AllowedIPs = {ALLOWED_IPS}\n"
        f"PersistentKeepalive = {PERSISTENT_KEEPALIVE}\n"
    )


def strip_for_wg_setconf(text: str) -> str:
    """Drop the wg-quick-only keys (Address, DNS, MTU, ...) from [Interface] as `wg-quick
    strip` does, which keeps other lines (blank lines and comments too) verbatim."""
    out: list[str] = []
    in_interface = False
    for line in text.splitlines():
        key = line.split("#", 1)[0].split("=", 1)[0].strip()
        if key.startswith("["):
            in_interface = key.lower() == "[interface]"
        elif in_interface and key.lower() in WG_QUICK_ONLY_KEYS:
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def parse_config(text: str) -> dict[str, dict[str, str]]:
    """Parse a single-peer config into {"Interface": {...}, "Peer": {...}}; strict (meant for
    tests): ValueError on text outside a section, a line without '=', a repeated section or key."""
    result: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip()
            if name in result:
                raise ValueError(f"line {number}: repeated section [{name}]")
            current = result[name] = {}
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep:
            raise ValueError(f"line {number}: expected 'Key = Value' inside a section")
        key = key.strip()
        if key in current:
            raise ValueError(f"line {number}: repeated key {key}")
        current[key] = value.strip()
    return result
