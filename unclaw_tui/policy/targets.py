"""What a rule names: a hostname, a glob like `*.example.com`, an IP or a CIDR (IPv4 or IPv6),
and which ports.  The CLI's TARGET forms are parsed here:

    example.com   *.example.com   192.0.2.7   10.0.0.0/8   2001:db8::1   2001:db8::/32
    example.com:443   192.0.2.7:443   [2001:db8::1]:443     (TARGET[:PORT], for `rule test`)

Every parser raises ValueError with a one-line reason.  Hostnames are kept lower case without a
trailing dot, the form the matcher compares.  A glob `*.example.com` matches every name below
example.com (any depth), not example.com itself: a domain scope is the glob plus the name.
IPv4-mapped IPv6 (::ffff:a.b.c.d) is stored, and matched, as the IPv4 it maps to.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_HOSTNAME = 253
MAX_TARGET_TEXT = 300  # bound on what is looked at before any parsing
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_PORT_RE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class TargetKind(StrEnum):
    HOST = "host"  # one hostname
    GLOB = "glob"  # *.suffix: names below suffix
    NET = "net"  # an IP (a /32 or /128) or a CIDR
    PATTERN = "pattern"  # any fnmatch pattern: built-in --passthrough rules only


@dataclass(frozen=True, slots=True)
class Target:
    kind: TargetKind
    text: str  # canonical: host, "*.suffix", "a.b.c.d", "net/len", or the pattern
    network: IPNetwork | None = None  # NET only

    @property
    def suffix(self) -> str:
        """GLOB only: the name below which it matches."""
        return self.text[2:]

    def matches_host(self, hostname: str) -> bool:
        """Slow and plain, for tests and `rule test` explanations; the index does the real work."""
        if self.kind is TargetKind.HOST:
            return hostname == self.text
        if self.kind is TargetKind.GLOB:
            return hostname.endswith("." + self.suffix)
        if self.kind is TargetKind.PATTERN:
            return fnmatch.fnmatchcase(hostname, self.text)
        return False

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Ports:
    """A port or an inclusive range; `None` in a rule means any port."""

    low: int
    high: int

    @property
    def single(self) -> bool:
        return self.low == self.high

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __str__(self) -> str:
        return str(self.low) if self.single else f"{self.low}-{self.high}"


def normalize_hostname(text: str) -> str:
    return text.strip().lower().rstrip(".")


def parse_hostname(text: str) -> str:
    name = normalize_hostname(text)
    if not name or len(name) > MAX_HOSTNAME:
        raise ValueError(f"invalid hostname {text!r}: expected 1-{MAX_HOSTNAME} characters")
    for label in name.split("."):
        if not _LABEL_RE.fullmatch(label):
            raise ValueError(
                f"invalid hostname {text!r}: each label is 1-63 letters, digits, '-' or '_'"
            )
    return name


def normalize_address(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 as the IPv4 address it maps to (as the egress policy judges it)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def normalize_network(network: IPNetwork) -> IPNetwork:
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= 96
        and network.subnet_of(_MAPPED)
    ):
        v4 = ipaddress.IPv4Address(int(network.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((v4, network.prefixlen - 96))
    return network


def parse_network(text: str) -> IPNetwork:
    """An IP or a CIDR (host bits must be zero: `10.0.0.1/8` is a typo, not a /8)."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"invalid IP or CIDR {text!r}: {exc}") from None
    return normalize_network(network)


def parse_target(text: str) -> Target:
    """A rule's TARGET: hostname, `*.suffix` glob, IP or CIDR (no port)."""
    if len(text) > MAX_TARGET_TEXT:
        raise ValueError(f"invalid target: longer than {MAX_TARGET_TEXT} characters")
    stripped = text.strip()
    if not stripped:
        raise ValueError("invalid target: empty")
    if stripped.startswith("*."):
        suffix = parse_hostname(stripped[2:])
        return Target(TargetKind.GLOB, "*." + suffix)
    if "*" in stripped or "?" in stripped or "[" in stripped:
        raise ValueError(
            f"invalid target {text!r}: the only wildcard is a leading '*.', as in *.example.com"
        )
    if ":" in stripped or "/" in stripped or _looks_numeric(stripped):
        network = parse_network(stripped)
        text_form = str(network.network_address) if _is_host(network) else str(network)
        return Target(TargetKind.NET, text_form, network)
    return Target(TargetKind.HOST, parse_hostname(stripped))


def parse_pattern(text: str) -> Target:
    """A built-in `--passthrough` pattern: a rule target if it is one, else an fnmatch pattern
    (the flag has always taken any glob, e.g. `*bank*`)."""
    try:
        return parse_target(text)
    except ValueError:
        pattern = normalize_hostname(text)
        if not pattern or len(pattern) > MAX_HOSTNAME or any(c.isspace() for c in pattern):
            raise ValueError(f"invalid hostname pattern {text!r}") from None
        return Target(TargetKind.PATTERN, pattern)


def parse_ports(text: str) -> Ports:
    """`N` or `N-M` with 1 <= N <= M <= 65535."""
    match = _PORT_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid port {text!r}: expected N or N-M, e.g. 443 or 8000-8100")
    low = int(match[1])
    high = low if match[2] is None else int(match[2])
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"invalid port {text!r}: ports are 1..65535, the range low to high")
    return Ports(low, high)


def parse_port(text: str) -> int:
    ports = parse_ports(text)
    if not ports.single:
        raise ValueError(f"invalid port {text!r}: expected one port")
    return ports.low


def parse_target_port(text: str) -> tuple[Target, int | None]:
    """TARGET[:PORT]: `host:443`, `192.0.2.7:443`, `[2001:db8::1]:443`; a bare IPv6 address
    (more than one ':') has no port."""
    if len(text) > MAX_TARGET_TEXT:
        raise ValueError(f"invalid target: longer than {MAX_TARGET_TEXT} characters")
    stripped = text.strip()
    if stripped.startswith("["):
        inside, sep, rest = stripped[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid target {text!r}: expected [IPv6]:PORT")
        target = parse_target(inside)
        if target.kind is not TargetKind.NET or ":" not in inside:
            raise ValueError(f"invalid target {text!r}: brackets are for IPv6 addresses")
        return target, parse_port(rest[1:]) if rest else None
    if stripped.count(":") == 1:
        host, _, port = stripped.partition(":")
        return parse_target(host), parse_port(port)
    return parse_target(stripped), None


def _looks_numeric(text: str) -> bool:
    # Hostnames may hold digits but a name of only digits and dots is an attempted IPv4.
    return all(c.isdigit() or c == "." for c in text)


def _is_host(network: IPNetwork) -> bool:
    return network.prefixlen == network.max_prefixlen
