# ruff: noqa: E501  (the docstring's Markdown table cannot wrap; code lines are kept short by ruff format)
"""The policy's verdict for a flow: which rule decides its access and which its TLS mode.

`Policy.decide(peer_name, peer_key, hostname, address, port, proto, now) -> Verdict` is sans-IO
(time is a parameter) and costs the same with 10,000 rules as with 10 (index.py).  A flow gets
one answer on each dimension, access (`allow`/`deny`) and mode (`intercept`/`passthrough`),
each from its own most specific live rule; with none, the caller's default (the peer's policy:
allow, deny or ask; intercept for mode) and the rule id "default".

## Which rule wins

The most specific matching rule, compared in this order; the first difference decides:

1. **who**: a rule naming the peer (by name or key) beats a rule for every peer;
2. **what**: an exact host > a longer glob > a shorter glob > a longer CIDR prefix > a shorter
   one (any hostname rule beats any CIDR rule).  A hostname rule matches the flow's hostname (the
   VIP's name, the TLS SNI); a CIDR matches the real destination address (for a VIP, the
   resolved one).  Built-in `--passthrough` patterns that are no plain glob (`*bank*`) rank
   just below the globs;
3. **port**: a single port > a range (a narrower range first) > any port;
4. **protocol**: tcp or udp > any;
5. **action**: at a tie, deny beats allow (and passthrough beats intercept).

| rules | flow | verdict | why |
|---|---|---|---|
| `deny example.com`; `allow example.com --peer phone` | phone → example.com:443 | allow (the phone rule) | the peer's own rule beats every peer's |
| `deny example.com`; `allow example.com --peer phone` | laptop → example.com:443 | deny | the phone rule does not name the laptop |
| `allow 10.0.0.0/8 --peer phone`; `deny api.example.com` | phone → api.example.com (10.1.1.1):443 | allow | who comes before what |
| `deny *.example.com`; `allow api.example.com` | api.example.com:443 | allow | exact host > glob |
| `deny *.example.com`; `allow *.cdn.example.com` | img.cdn.example.com:443 | allow | longer glob > shorter |
| `deny *.example.com` | example.com:443 | default | `*.example.com` is the names below it, not the name |
| `allow 93.184.216.0/24`; `deny *.example.com` | www.example.com (93.184.216.34):443 | deny | a hostname rule > a CIDR |
| `deny 10.0.0.0/8`; `allow 10.1.0.0/16` | 10.1.2.3:22 | allow | longer prefix > shorter |
| `deny 203.0.113.0/24` | app.test (VIP, resolved to 203.0.113.5):443 | deny | a CIDR judges the real address |
| `deny example.com`; `allow example.com --port 8000-8100`; `deny example.com --port 8080` | example.com:8080 | deny (the 8080 rule) | single port > range |
| (same three) | example.com:8081 | allow | range > any port |
| (same three) | example.com:443 | deny | only the any-port rule matches |
| `deny example.com --port 53`; `allow example.com --port 53 --proto udp` | example.com:53 udp | allow | a protocol > any |
| (same two) | example.com:53 tcp | deny | the udp rule does not match tcp |
| `allow example.com`; `deny example.com` | example.com:443 | deny | at a tie deny beats allow |
| `allow example.com --for 1h`; `deny *.example.com` | www.example.com:443, 2 h later | deny | an expired rule never matches |
| `passthrough *.bank.example`; `intercept login.bank.example`; `deny ads.bank.example` | login.bank.example:443 | allow (default), intercept | each dimension by its own rules |
| (same three) | ads.bank.example:443 | deny, passthrough | the deny does not touch the mode |

## A name denied as a whole

`denies_name(peer_name, peer_key, hostname, now)` is for DNS: the deny rule that makes a name
NXDOMAIN, or None.  A name is denied as a whole by a deny rule with no port and any protocol
(`rule add deny ads.example.com`), unless an allow at least as specific opens some port of it
(`allow ads.example.com --port 443` next to it: the name must resolve for 443).  CIDR rules
play no part (a query has no address yet); `once` rules neither (they are for one flow).

## Once, expiry, caching

- A `once` rule decides one flow: `Verdict.once` names the once rules it used, and the caller
  calls `consume(verdict)` right after acting on it (same thread, before the next decide),
  which removes them and returns them (for `rule_expired`-like events).
- Timed rules stop matching at their expiry by themselves; `expire(now)` removes the ones past
  it (for events and the file), `next_expiry()` says when to call it.
- `Verdict.valid_until`: the earliest expiry of the rules that decided it (None: until the rules
  change).  `generation` grows with every change of the rule set, so a cache of verdicts (the
  fast relay's) knows when to start over.  A verdict with `once` rules is never cached.
"""

from __future__ import annotations

import base64
import heapq
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from unclaw_tui.policy.durations import Lifetime
from unclaw_tui.policy.index import Address, RuleIndex
from unclaw_tui.policy.rules import DEFAULT_RULE, Action, Proto, Rule
from unclaw_tui.policy.targets import IPAddress, normalize_hostname


class Access(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"  # only as a peer's default: the flow waits on a prompt


class Mode(StrEnum):
    INTERCEPT = "intercept"
    PASSTHROUGH = "passthrough"


_ACCESS = {Action.ALLOW: Access.ALLOW, Action.DENY: Access.DENY}
_MODE = {Action.INTERCEPT: Mode.INTERCEPT, Action.PASSTHROUGH: Mode.PASSTHROUGH}
_PROTO = {"tcp": Proto.TCP, "udp": Proto.UDP}


@dataclass(frozen=True, slots=True)
class Verdict:
    access: Access
    access_rule: str  # the deciding rule's id, or "default"
    mode: Mode
    mode_rule: str
    valid_until: float | None = None  # the earliest expiry among the deciding rules
    once: tuple[str, ...] = ()  # once rules used: the caller consumes them

    @property
    def cacheable(self) -> bool:
        return not self.once


class Policy:
    """The rule set in force: the file's rules, this run's `once`/`restart` rules, and the
    built-in rules of the flags.  Not thread-safe: one owner (the gateway's loop) calls it."""

    def __init__(self, rules: Iterable[Rule] = (), builtins: Iterable[Rule] = ()) -> None:
        self._rules: dict[str, Rule] = {}
        self._index = RuleIndex()
        self._expiries: list[tuple[float, str]] = []  # a heap; stale entries skipped
        self.generation = 0
        for rule in (*builtins, *rules):
            self.add(rule)

    # --- the rule set -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rules)

    def __contains__(self, rule_id: object) -> bool:
        return rule_id in self._rules

    def get(self, rule_id: str) -> Rule | None:
        return self._rules.get(rule_id)

    def rules(self) -> list[Rule]:
        """Every rule, built-in ones first, then by creation time."""
        return sorted(self._rules.values(), key=lambda r: (not r.builtin, r.created, r.id))

    def add(self, rule: Rule) -> None:
        """ValueError if a rule of that id exists."""
        if rule.id in self._rules:
            raise ValueError(f"a rule with id {rule.id!r} exists")
        self._rules[rule.id] = rule
        self._index.add(rule)
        if rule.expires is not None:
            heapq.heappush(self._expiries, (rule.expires, rule.id))
        self.generation += 1

    def remove(self, rule_id: str) -> Rule | None:
        rule = self._rules.pop(rule_id, None)
        if rule is not None:
            self._index.remove(rule)
            self.generation += 1
        return rule

    def replace_persistent(self, rules: Iterable[Rule]) -> tuple[list[Rule], list[Rule]]:
        """Make the file's rules (reloaded) the persistent set; this run's once/restart rules
        and the built-in ones stay.  Returns (added, removed); a changed rule is in both.
        ValueError (nothing changed) if a file rule's id is one of the others'."""
        new = {rule.id: rule for rule in rules}
        for rule_id in new:
            kept = self._rules.get(rule_id)
            if kept is not None and not kept.persistent:
                raise ValueError(f"rule id {rule_id!r} is taken by a rule of this run")
        old = {r.id: r for r in self._rules.values() if r.persistent}
        removed = [r for rule_id, r in old.items() if new.get(rule_id) != r]
        added = [r for rule_id, r in new.items() if old.get(rule_id) != r]
        for rule in removed:
            self.remove(rule.id)
        for rule in added:
            self.add(rule)
        return added, removed

    def consume(self, verdict: Verdict) -> list[Rule]:
        """Remove the once rules a verdict used (call it right after acting on the verdict)."""
        return [r for r in (self.remove(rule_id) for rule_id in verdict.once) if r is not None]

    def expire(self, now: float) -> list[Rule]:
        """Remove and return the rules whose expiry has come."""
        gone: list[Rule] = []
        while self._expiries and self._expiries[0][0] <= now:
            expires, rule_id = heapq.heappop(self._expiries)
            rule = self._rules.get(rule_id)
            if rule is not None and rule.expires == expires:
                gone.append(rule)
                self.remove(rule_id)
        return gone

    def next_expiry(self) -> float | None:
        while self._expiries:
            expires, rule_id = self._expiries[0]
            rule = self._rules.get(rule_id)
            if rule is not None and rule.expires == expires:
                return expires
            heapq.heappop(self._expiries)  # removed or replaced since
        return None

    # --- verdicts ------------------------------------------------------------------------------

    def decide(
        self,
        peer_name: str,
        peer_key: str | bytes,
        hostname: str | None,
        address: str | IPAddress | None,
        port: int,
        proto: str,
        now: float,
        *,
        default_access: Access = Access.ALLOW,
        default_mode: Mode = Mode.INTERCEPT,
    ) -> Verdict:
        """The verdict for a flow of peer (name, public key as base64 text or 32 bytes) to
        hostname (None if unknown) at address (None if not resolved yet), port, proto ("tcp" /
        "udp")."""
        whos = self._whos(peer_name, peer_key)
        name = normalize_hostname(hostname) if hostname else None
        access_rule, mode_rule = self._index.best(
            whos, name, _address(address), port, _PROTO.get(proto) or Proto(proto), now
        )
        if access_rule is None and mode_rule is None:
            return Verdict(default_access, DEFAULT_RULE, default_mode, DEFAULT_RULE)
        expiries = [r.expires for r in (access_rule, mode_rule) if r and r.expires is not None]
        once = tuple(
            r.id for r in (access_rule, mode_rule) if r is not None and r.lifetime is Lifetime.ONCE
        )
        return Verdict(
            access=default_access if access_rule is None else _ACCESS[access_rule.action],
            access_rule=DEFAULT_RULE if access_rule is None else access_rule.id,
            mode=default_mode if mode_rule is None else _MODE[mode_rule.action],
            mode_rule=DEFAULT_RULE if mode_rule is None else mode_rule.id,
            valid_until=min(expiries) if expiries else None,
            once=once,
        )

    def denies_name(
        self, peer_name: str, peer_key: str | bytes, hostname: str, now: float
    ) -> str | None:
        """The id of the deny rule that denies hostname as a whole (NXDOMAIN), or None."""
        whos = self._whos(peer_name, peer_key)
        rule = self._index.name_denial(whos, normalize_hostname(hostname), now)
        return None if rule is None else rule.id

    def _whos(self, peer_name: str, peer_key: str | bytes) -> tuple[str, ...]:
        if not self._index.names_peers():
            return ()
        if isinstance(peer_key, bytes):
            peer_key = base64.b64encode(peer_key).decode()
        return (peer_name, peer_key)


def _address(address: str | IPAddress | None) -> Address | None:
    """(version, integer); IPv4-mapped IPv6 as the IPv4 it maps to.  inet_pton: a tenth of the
    cost of ipaddress, per flow."""
    if address is None:
        return None
    if isinstance(address, str):
        try:
            packed = socket.inet_pton(
                socket.AF_INET6 if ":" in address else socket.AF_INET, address
            )
        except OSError:
            raise ValueError(f"invalid IP address {address!r}") from None
    else:
        packed = address.packed
    bits = int.from_bytes(packed)
    if len(packed) == 4:
        return (4, bits)
    if bits >> 32 == 0xFFFF:
        return (4, bits & 0xFFFFFFFF)
    return (6, bits)
