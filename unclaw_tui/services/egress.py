"""Egress policy: which destinations the relay may reach from this host on a peer's behalf.

Refused by default (a peer must not reach the gateway host itself, its cloud metadata service or
other peers through us):

  loopback       127.0.0.0/8, ::1
  link-local     169.254.0.0/16 (most clouds' metadata: 169.254.169.254), fe80::/10
  cloud metadata the ones outside link-local: 100.100.100.200, fd00:ec2::254
  multicast      224.0.0.0/4, ff00::/8
  broadcast      255.255.255.255 (limited broadcast); reserved 240.0.0.0/4 around it
  unspecified    0.0.0.0/8, ::
  tunnel network the gateway's tunnel net (no peer-to-peer through the relay)
  VIP network    10.78.0.0/16 (VIPs are handled by the VIP service, never relayed)
  host address   every address configured on this host (refreshed every 30 s by default)

IPv4-mapped IPv6 destinations (::ffff:a.b.c.d) are judged as the IPv4 address they map to.

Precedence: every rule is a network; the most specific network (longest prefix) containing the
destination decides. For the same network, `--deny` beats `--allow`, which beats a default
refusal. So `--allow 127.0.0.0/8` opens loopback, `--allow 10.77.0.0/16` does not open the
tunnel's /24 (the default /24 is more specific), and `--deny 8.8.8.0/24 --allow 8.8.8.8/32`
refuses that /24 except 8.8.8.8. A host address inside a default range (127.0.0.1 in loopback,
fe80::… in link-local) is left to that range's rule; any other host address is its own /32
(/128) rule, so opening it takes an `--allow` of exactly that address.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

from unclaw_tui import netutil
from unclaw_tui.config import DEFAULT_ADDRESS, VIP_NETWORK

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_TUNNEL_NET = ipaddress.IPv4Interface(DEFAULT_ADDRESS).network
HOST_ADDRESS_REFRESH = 30.0  # seconds; interfaces come and go (DHCP, VPNs, containers)
# Destinations whose verdict is remembered (the cache starts over when full).
VERDICT_CACHE = 4096


class Kind(IntEnum):
    """Rule kinds, in ascending precedence for rules on the same network."""

    DEFAULT = 0
    ALLOW = 1
    DENY = 2


@dataclass(frozen=True, slots=True)
class Rule:
    network: IPNetwork
    kind: Kind
    reason: str  # why the destination is refused; unused for ALLOW


DEFAULT_REFUSALS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("::/128", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("::1/128", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("fe80::/10", "link-local"),
    ("100.100.100.200/32", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("224.0.0.0/4", "multicast"),
    ("ff00::/8", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("255.255.255.255/32", "broadcast"),
)


def parse_cidr(text: str | IPNetwork) -> IPNetwork:
    """A network from "a.b.c.d/n", "v6/n" or a bare address (a /32 or /128); a network as is.

    Host bits are allowed and dropped ("192.168.1.5/24" is 192.168.1.0/24): that is how people
    write an interface's subnet.
    """
    try:
        return ipaddress.ip_network(text.strip() if isinstance(text, str) else text, strict=False)
    except ValueError:
        raise ValueError(
            f"invalid CIDR {text!r}: expected a network like 192.168.1.0/24 or 2001:db8::/32"
        ) from None


def normalize(ip: str | IPAddress) -> IPAddress:
    """The address to judge: an IPv4-mapped IPv6 address is its IPv4 address."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class RuleTable:
    """Longest-prefix match over rules: one dict per (version, prefix length).

    A lookup masks the address once per prefix length in use (a few dozen at most), instead of
    scanning every rule: host addresses can number in the hundreds on a container host.
    """

    def __init__(self, rules: Iterable[Rule]) -> None:
        # (version, prefixlen) -> {net int: rule}
        self._by_length: dict[tuple[int, int], dict[int, Rule]] = {}
        for rule in rules:
            key = (rule.network.version, rule.network.prefixlen)
            slot = self._by_length.setdefault(key, {})
            net = int(rule.network.network_address)
            current = slot.get(net)
            # Same network: the higher kind wins; equal kinds keep the first rule.
            if current is None or rule.kind > current.kind:
                slot[net] = rule
        # version -> prefix lengths in use, longest first
        self._lengths = {
            v: sorted((n for w, n in self._by_length if w == v), reverse=True) for v in (4, 6)
        }

    def match(self, addr: IPAddress) -> Rule | None:
        bits = addr.max_prefixlen
        value = int(addr)
        for prefixlen in self._lengths[addr.version]:
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen)
            rule = self._by_length[(addr.version, prefixlen)].get(value & mask)
            if rule is not None:
                return rule
        return None


class EgressPolicy:
    """`check(ip)` → None when the relay may connect, else a short reason for events."""

    def __init__(
        self,
        allow: Iterable[str | IPNetwork] = (),
        deny: Iterable[str | IPNetwork] = (),
        host_addresses: Iterable[str | IPAddress] | None = None,
        tunnel_net: str | IPNetwork = DEFAULT_TUNNEL_NET,
        vip_net: str | IPNetwork = VIP_NETWORK,
        *,
        refresh_interval: float = HOST_ADDRESS_REFRESH,
        clock: Callable[[], float] = time.monotonic,
        host_address_source: Callable[[], Iterable[IPAddress]] = netutil.host_addresses,
    ) -> None:
        """host_addresses=None reads this host's addresses now and again every
        `refresh_interval` seconds (on the next check); a given set is used as is."""
        self.allow = [parse_cidr(n) for n in allow]
        self.deny = [parse_cidr(n) for n in deny]
        self.tunnel_net = parse_cidr(tunnel_net)
        self.vip_net = parse_cidr(vip_net)
        self._static_hosts = host_addresses is not None
        self._host_source = host_address_source
        self._clock = clock
        self._refresh_interval = refresh_interval
        self._refreshed_at = clock()
        # Called whenever the rules change, so that verdicts kept elsewhere can be dropped.
        self.on_change: Callable[[], None] | None = None
        hosts = host_addresses if host_addresses is not None else host_address_source()
        self._install(hosts)

    def _fixed_rules(self) -> list[Rule]:
        rules = [Rule(ipaddress.ip_network(n), Kind.DEFAULT, r) for n, r in DEFAULT_REFUSALS]
        rules.append(Rule(self.tunnel_net, Kind.DEFAULT, "tunnel network"))
        rules.append(Rule(self.vip_net, Kind.DEFAULT, "VIP network"))
        rules += [Rule(n, Kind.ALLOW, "") for n in self.allow]
        rules += [Rule(n, Kind.DENY, f"denied by --deny {n}") for n in self.deny]
        return rules

    def _install(self, hosts: Iterable[str | IPAddress]) -> None:
        fixed = self._fixed_rules()
        defaults = RuleTable(r for r in fixed if r.kind == Kind.DEFAULT)
        host_rules = []
        self.host_addresses: frozenset[IPAddress] = frozenset(normalize(h) for h in hosts)
        for addr in sorted(self.host_addresses, key=lambda a: (a.version, int(a))):
            if defaults.match(addr) is None:
                host_rules.append(Rule(ipaddress.ip_network(addr), Kind.DEFAULT, "host address"))
        self.rules: tuple[Rule, ...] = (*fixed, *host_rules)
        self._table = RuleTable(self.rules)
        self._verdicts: dict[str | IPAddress, str | None] = {}
        if self.on_change is not None:
            self.on_change()

    def verdicts_valid_for(self) -> float | None:
        """Seconds a verdict given now stays right, unless `on_change` says otherwise first:
        until the host addresses are read again (None when they never are, a fixed set having
        been given).  After it, ask `check` again."""
        if self._static_hosts:
            return None
        return max(0.0, self._refreshed_at + self._refresh_interval - self._clock())

    def refresh_host_addresses(self, hosts: Iterable[str | IPAddress] | None = None) -> None:
        """Re-read this host's addresses (or take the given ones)."""
        self._refreshed_at = self._clock()
        self._install(hosts if hosts is not None else self._host_source())

    def check(self, ip: str | IPAddress) -> str | None:
        """None if the destination is allowed, else why not ("loopback", "host address", ...)."""
        if not self._static_hosts and self._clock() - self._refreshed_at >= self._refresh_interval:
            self.refresh_host_addresses()
        # Remembered per destination until the rules change: parsing and matching an address
        # was a few per cent of the gateway's time at thousands of connections a second.
        verdicts = self._verdicts
        try:
            return verdicts[ip]
        except KeyError:
            pass
        try:
            addr = normalize(ip)
        except ValueError:
            return "invalid address"
        rule = self._table.match(addr)
        verdict = rule.reason if rule is not None and rule.kind != Kind.ALLOW else None
        if len(verdicts) >= VERDICT_CACHE:
            verdicts.clear()
        verdicts[ip] = verdict
        return verdict
