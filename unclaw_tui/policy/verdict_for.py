"""What the policy says of one flow a peer might open: `unclaw-tui rule test` and the control
method `rule.test` compute it here, from the same `Policy.decide` the gateway acts on.

Sans-IO: the caller brings the Policy (from rules.json, or from a running gateway's rules), the
peer (a `PeerRecord` or a `PeerSnapshot`: name, key, policy, fallback) and the flow.

- `hostname` is what a hostname rule matches: the name itself, or a VIP's hostname.  `address`
  is what a CIDR rule matches (the real destination; None for a name not resolved here, so CIDR
  rules cannot decide it: the answer says so).
- `port` None asks about the destination as a whole: only rules for any port can match.
- `mode` is judged for every flow but means something only where the gateway terminates TLS
  (TCP to 443 or 8443): `tls` says whether it does.
- For a hostname, `dns` says whether our DNS answers the name or gives NXDOMAIN (a deny rule
  with no port and any protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from unclaw_tui.policy.matcher import Access, Policy
from unclaw_tui.policy.rules import DEFAULT_RULE
from unclaw_tui.router import TLS_PORTS

NO_PORT = 0  # matches no port-specific rule: every real port is 1..65535


class PeerLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def public_key(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def fallback(self) -> str: ...


@dataclass(frozen=True, slots=True)
class FlowQuery:
    hostname: str | None
    address: str | None
    port: int | None
    proto: str = "tcp"  # tcp / udp

    def describe(self) -> str:
        where = self.hostname or self.address or "?"
        if self.hostname and self.address:
            where = f"{self.hostname} ({self.address})"
        if ":" in where and self.hostname is None:
            where = f"[{where}]"
        if self.port is None:
            return f"{where}, any port, {self.proto}"
        return f"{where}:{self.port}/{self.proto}"


def verdict_for(policy: Policy, peer: PeerLike, query: FlowQuery, now: float) -> dict[str, Any]:
    """The verdict as a JSON-ready dict: access and mode with the deciding rule id (or
    "default"), what the default is, and for hostnames whether the name resolves."""
    if query.proto not in ("tcp", "udp"):
        raise ValueError(f"invalid protocol {query.proto!r}: expected tcp or udp")
    if query.hostname is None and query.address is None:
        raise ValueError("a flow needs a hostname or an address")
    default = Access(peer.policy)
    verdict = policy.decide(
        peer.name,
        peer.public_key,
        query.hostname,
        query.address,
        NO_PORT if query.port is None else query.port,
        query.proto,
        now,
        default_access=default,
    )
    denied_by = None
    if query.hostname is not None:
        denied_by = policy.denies_name(peer.name, peer.public_key, query.hostname, now)
    return {
        "peer": peer.name,
        "hostname": query.hostname,
        "address": query.address,
        "port": query.port,
        "proto": query.proto,
        "access": verdict.access.value,
        "access_rule": verdict.access_rule,
        "mode": verdict.mode.value,
        "mode_rule": verdict.mode_rule,
        "tls": query.proto == "tcp" and query.port in TLS_PORTS,
        "policy": peer.policy,
        "fallback": peer.fallback,
        "valid_until": verdict.valid_until,
        "once": list(verdict.once),
        "dns": None if query.hostname is None else ("nxdomain" if denied_by else "answers"),
        "dns_rule": denied_by,
    }


def describe_verdict(result: dict[str, Any]) -> list[str]:
    """The verdict in a few lines for people: `access deny  rule r7kq2m`."""
    lines = [f"access  {result['access']:<11}  {_why(result, 'access_rule')}"]
    if result.get("tls"):
        lines.append(f"mode    {result['mode']:<11}  {_why(result, 'mode_rule')}")
    if result.get("dns") == "nxdomain":
        lines.append(f"dns     {'nxdomain':<11}  rule {result.get('dns_rule')}")
    if result.get("hostname") and not result.get("address"):
        lines.append("(no address: CIDR rules judge the resolved address; test an IP for them)")
    if result.get("once"):
        lines.append(f"(once rule {', '.join(result['once'])}: used up by the next such flow)")
    return lines


def _why(result: dict[str, Any], key: str) -> str:
    rule_id = result.get(key)
    if rule_id != DEFAULT_RULE:
        return f"rule {rule_id}"
    if key == "mode_rule":
        return "default"
    text = f"default (peer {result.get('peer')}'s policy: {result.get('policy')}"
    if result.get("policy") == Access.ASK:
        text += f"; unanswered: {result.get('fallback')}"
    return text + ")"
