"""The matching index: a rule set arranged so that finding a flow's most specific rule costs the
same with 10,000 rules as with 10.

One `RuleIndex` holds both dimensions (access, mode).  Inside it, rules are grouped by who (a
peer name, a key, or every peer) and then by what, each group a `_Bucket`:

- exact hosts in a dict by name; globs `*.suffix` in a dict by suffix, probed with each suffix
  of the asked name (one dict lookup per label);
- CIDRs per address family in a dict per prefix length, keyed by the network's bits, probed
  longest prefix first (at most 33 / 129 lookups, only lengths some rule uses);
- built-in `--passthrough` patterns that are no rule target (`*bank*`) in a short list, tried
  with fnmatch: they come only from this run's flags.

A bucket holds the rules of one (who, what), per dimension: a dict of single ports plus a list
of ranges and a list of any-port rules, each list kept in precedence order, so its best live
match is the first one that fits.  Many rules on one host with different port ranges are
scanned within that host's bucket; rules elsewhere cost nothing.  One walk of the index finds
the buckets for both dimensions.  The cost of a decision grows with the labels of the name and
the distinct prefix lengths in use, never with the number of rules.
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Iterable

from unclaw_tui.policy.durations import Lifetime
from unclaw_tui.policy.rules import EVERY_PEER, Action, Dimension, Proto, Rule
from unclaw_tui.policy.targets import TargetKind

WhatKey = tuple[int, int]  # rule.order[1:3]: smaller is more specific
DIMENSIONS = (Dimension.ACCESS, Dimension.MODE)
Address = tuple[int, int]  # (IP version, the address as an integer)


class _Ports:
    """The rules of one (who, what) and one dimension, by port."""

    __slots__ = ("anyport", "ranges", "singles")

    def __init__(self) -> None:
        self.singles: dict[int, list[Rule]] = {}
        self.ranges: list[Rule] = []
        self.anyport: list[Rule] = []

    def _list_for(self, rule: Rule, create: bool) -> list[Rule] | None:
        if rule.ports is None:
            return self.anyport
        if not rule.ports.single:
            return self.ranges
        if create:
            return self.singles.setdefault(rule.ports.low, [])
        return self.singles.get(rule.ports.low)

    def add(self, rule: Rule) -> None:
        rules = self._list_for(rule, create=True)
        assert rules is not None
        bisect.insort(rules, rule, key=_order)

    def remove(self, rule: Rule) -> None:
        rules = self._list_for(rule, create=False)
        if rules is None:
            return
        rules.remove(rule)
        if not rules and rule.ports is not None and rule.ports.single:
            del self.singles[rule.ports.low]

    def empty(self) -> bool:
        return not (self.singles or self.ranges or self.anyport)

    def best(self, port: int, proto: Proto, now: float) -> Rule | None:
        """The most specific live rule for port and proto: a single port beats a range beats
        any port, and each list is already in precedence order."""
        singles = self.singles.get(port)
        if singles:
            for rule in singles:
                if (rule.proto is Proto.ANY or rule.proto is proto) and rule.live(now):
                    return rule
        for rule in self.ranges:
            if (
                rule.ports is not None
                and rule.ports.low <= port <= rule.ports.high
                and (rule.proto is Proto.ANY or rule.proto is proto)
                and rule.live(now)
            ):
                return rule
        for rule in self.anyport:
            if (rule.proto is Proto.ANY or rule.proto is proto) and rule.live(now):
                return rule
        return None

    def all_rules(self) -> Iterable[Rule]:
        for rules in self.singles.values():
            yield from rules
        yield from self.ranges
        yield from self.anyport


def _order(rule: Rule) -> tuple[object, ...]:
    return rule.order


class _Bucket:
    """The rules of one (who, what): both dimensions, so one walk of the index serves both."""

    __slots__ = ("dimensions",)

    def __init__(self) -> None:
        self.dimensions = (_Ports(), _Ports())  # access, mode

    def add(self, rule: Rule) -> None:
        self.dimensions[DIMENSIONS.index(rule.dimension)].add(rule)

    def remove(self, rule: Rule) -> None:
        self.dimensions[DIMENSIONS.index(rule.dimension)].remove(rule)

    def empty(self) -> bool:
        return self.dimensions[0].empty() and self.dimensions[1].empty()


class _WhatIndex:
    """One who's rules of one dimension, by what."""

    __slots__ = ("globs", "hosts", "nets", "patterns", "prefixes")

    def __init__(self) -> None:
        self.hosts: dict[str, _Bucket] = {}
        self.globs: dict[str, _Bucket] = {}
        self.patterns: dict[str, _Bucket] = {}
        # per IP version: prefix length -> network bits -> bucket; and the lengths in use,
        # longest first
        self.nets: dict[int, dict[int, dict[int, _Bucket]]] = {4: {}, 6: {}}
        self.prefixes: dict[int, list[int]] = {4: [], 6: []}

    def _bucket(self, rule: Rule, create: bool) -> _Bucket | None:
        target = rule.target
        table: dict[object, _Bucket]
        if target.kind is TargetKind.NET:
            network = target.network
            assert network is not None
            by_length = self.nets[network.version]
            plen = network.prefixlen
            if plen not in by_length:
                if not create:
                    return None
                by_length[plen] = {}
                self.prefixes[network.version] = sorted(by_length, reverse=True)
            table = by_length[plen]  # type: ignore[assignment]
            key: object = int(network.network_address) >> (network.max_prefixlen - plen)
        elif target.kind is TargetKind.HOST:
            table, key = self.hosts, target.text  # type: ignore[assignment]
        elif target.kind is TargetKind.GLOB:
            table, key = self.globs, target.suffix  # type: ignore[assignment]
        else:
            table, key = self.patterns, target.text  # type: ignore[assignment]
        bucket = table.get(key)
        if bucket is None and create:
            bucket = table[key] = _Bucket()
        return bucket

    def add(self, rule: Rule) -> None:
        bucket = self._bucket(rule, create=True)
        assert bucket is not None
        bucket.add(rule)

    def remove(self, rule: Rule) -> None:
        bucket = self._bucket(rule, create=False)
        if bucket is None:
            return
        bucket.remove(rule)
        if bucket.empty():
            self._drop(rule)

    def _drop(self, rule: Rule) -> None:
        target = rule.target
        if target.kind is TargetKind.NET:
            network = target.network
            assert network is not None
            by_length = self.nets[network.version]
            plen = network.prefixlen
            by_length[plen].pop(int(network.network_address) >> (network.max_prefixlen - plen))
            if not by_length[plen]:
                del by_length[plen]
                self.prefixes[network.version] = sorted(by_length, reverse=True)
        elif target.kind is TargetKind.HOST:
            del self.hosts[target.text]
        elif target.kind is TargetKind.GLOB:
            del self.globs[target.suffix]
        else:
            del self.patterns[target.text]

    def empty(self) -> bool:
        return not (self.hosts or self.globs or self.patterns or any(self.prefixes.values()))

    def host_buckets(self, hostname: str, out: list[tuple[WhatKey, _Bucket]]) -> None:
        """Appends the buckets whose hostname rules match, most specific first."""
        if self.hosts:
            bucket = self.hosts.get(hostname)
            if bucket is not None:
                out.append(((-3, 0), bucket))
        if self.globs:
            labels = hostname.count(".")  # labels of the first (longest) proper suffix
            dot = hostname.find(".")
            while dot >= 0:
                bucket = self.globs.get(hostname[dot + 1 :])
                if bucket is not None:
                    out.append(((-2, -labels), bucket))
                labels -= 1
                dot = hostname.find(".", dot + 1)
        if self.patterns:
            for pattern, bucket in self.patterns.items():
                if fnmatch.fnmatchcase(hostname, pattern):
                    out.append(((-1, 0), bucket))

    def net_buckets(self, address: Address, out: list[tuple[WhatKey, _Bucket]]) -> None:
        """Appends the buckets whose CIDRs hold address, longest prefix first."""
        version, bits = address
        lengths = self.prefixes[version]
        if not lengths:
            return
        by_length = self.nets[version]
        width = 32 if version == 4 else 128
        for plen in lengths:
            bucket = by_length[plen].get(bits >> (width - plen))
            if bucket is not None:
                out.append(((0, -plen), bucket))


class RuleIndex:
    """Both dimensions' rules, for `best` (a flow) and `name_denial` (a DNS name)."""

    def __init__(self) -> None:
        self._by_who: dict[str, _WhatIndex] = {}

    def add(self, rule: Rule) -> None:
        index = self._by_who.get(rule.who)
        if index is None:
            index = self._by_who[rule.who] = _WhatIndex()
        index.add(rule)

    def remove(self, rule: Rule) -> None:
        index = self._by_who.get(rule.who)
        if index is None:
            return
        index.remove(rule)
        if index.empty():
            del self._by_who[rule.who]

    def names_peers(self) -> bool:
        """Whether any rule names a peer (else a query skips the peer-specific level)."""
        return len(self._by_who) > (EVERY_PEER in self._by_who)

    def _levels(
        self, whos: tuple[str, ...], hostname: str | None, address: Address | None
    ) -> list[list[tuple[WhatKey, _Bucket]]]:
        """The matching buckets, per who-level (peer-specific first), most specific first."""
        levels = []
        by_who = self._by_who
        for names in (whos, (EVERY_PEER,)):
            candidates: list[tuple[WhatKey, _Bucket]] = []
            found = 0
            for who in names:
                index = by_who.get(who)
                if index is None:
                    continue
                found += 1
                if hostname is not None:
                    index.host_buckets(hostname, candidates)
                if address is not None:
                    index.net_buckets(address, candidates)
            if found > 1:
                candidates.sort(key=lambda c: c[0])  # a name's and a key's rules interleave
            if candidates:
                levels.append(candidates)
        return levels

    def best(
        self,
        whos: tuple[str, ...],
        hostname: str | None,
        address: Address | None,
        port: int,
        proto: Proto,
        now: float,
    ) -> tuple[Rule | None, Rule | None]:
        """The most specific live rule matching the flow on each dimension (access, mode)."""
        levels = self._levels(whos, hostname, address)
        return (
            _best(levels, 0, port, proto, now) if levels else None,
            _best(levels, 1, port, proto, now) if levels else None,
        )

    def name_denial(self, whos: tuple[str, ...], hostname: str, now: float) -> Rule | None:
        """The deny rule that denies hostname as a whole, if one does: the most specific live
        whole-name deny (no port, any protocol) with no allow at least as specific for some
        port or protocol.  `once` rules are left out: they are for one flow."""
        for candidates in self._levels(whos, hostname, None):
            position = 0
            while position < len(candidates):
                what = candidates[position][0]
                group: list[Rule] = []
                while position < len(candidates) and candidates[position][0] == what:
                    group.extend(candidates[position][1].dimensions[0].all_rules())
                    position += 1
                live = [r for r in group if r.live(now) and r.lifetime is not Lifetime.ONCE]
                denies = [r for r in live if r.action is Action.DENY and r.whole_name]
                allows = [r for r in live if r.action is Action.ALLOW]
                if denies:
                    deny = min(denies, key=_order)
                    # An allow beats it only where it is more specific (a port, a protocol).
                    if any(a.order < deny.order for a in allows):
                        return None
                    return deny
                if allows:
                    return None
        return None


def _best(
    levels: list[list[tuple[WhatKey, _Bucket]]], dimension: int, port: int, proto: Proto, now: float
) -> Rule | None:
    for candidates in levels:
        found: Rule | None = None
        for what, bucket in candidates:
            if found is not None and what > found.order[1:3]:
                break  # every further bucket is less specific than the one found
            rule = bucket.dimensions[dimension].best(port, proto, now)
            if rule is not None and (found is None or rule.order < found.order):
                found = rule
        if found is not None:
            return found
    return None
