"""The one decision point: what happens to a flow, asked each time something new is known of it.

`DecisionPoint.decide(question) -> Verdict` is asked at three moments, always through this one
function:

- `FLOW`: a SYN, or a UDP flow's first datagram, before it is answered (the gateway, the UDP
  relays); later again with a VIP's real addresses once resolved (the VIP and TLS services).
  Verdict today: the route (router.py), and the egress policy for the relay's destination and
  for resolved addresses.
- `HELLO`: a TLS ClientHello (the TLS service): the SNI, judged together with the VIP's
  hostname so that another SNI cannot dodge a verdict. Allowed today (no rule names hosts yet).
- `QUERY`: each DNS query (the DNS service): the name. Allowed today.

Only the first is cached in C: an allowed relayed TCP destination is given to the engine's
fast relay (`ConnTable`), which then splices the peer's next SYNs to it without asking
Python, for as long as the verdict holds; the cache is keyed per peer and destination, and it
is cleared only from here (`changed()`), whenever the rules behind a verdict change.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from unclaw_tui.engine import Refusal
from unclaw_tui.pump import DEFAULT_CONNECT_TIMEOUT
from unclaw_tui.router import Proto, Route, Router
from unclaw_tui.services.egress import EgressPolicy

if TYPE_CHECKING:
    from unclaw_tui.engine import ConnTable  # the engine's cache of FLOW verdicts
    from unclaw_tui.flow import Flow

Endpoint = tuple[str, int]


class Moment(StrEnum):
    FLOW = "flow"
    HELLO = "hello"
    QUERY = "query"


@dataclass(frozen=True, slots=True)
class Question:
    """What is known when the decision point is asked (see the module docstring)."""

    moment: Moment
    peer_key: bytes
    proto: Proto = "tcp"
    dst_ip: str = ""
    dst_port: int = 0
    # FLOW: the VIP's hostname; HELLO: the SNI; QUERY: the name asked for.
    hostname: str | None = None
    # HELLO: the hostname of the VIP connected to (the SNI is judged with it).
    vip_hostname: str | None = None
    # FLOW: the real addresses a VIP resolved to, where the flow would go instead of dst_ip.
    addresses: tuple[str, ...] = ()

    @classmethod
    def about(cls, flow: Flow, moment: Moment, **known: Any) -> Question:
        """The question about a flow that exists already, with what is newly known."""
        proto: Proto = "udp" if flow.proto == "udp" else "tcp"
        return cls(moment, flow.peer_key, proto, flow.dst_ip, flow.dst_port, **known)


@dataclass(frozen=True, slots=True)
class Verdict:
    route: Route
    refusal: str | None = None  # why the flow is refused; None: allowed
    addresses: tuple[str, ...] = ()  # of the question's addresses, those allowed, in order
    refused: tuple[tuple[str, str], ...] = ()  # (address, why) of the others

    @property
    def allowed(self) -> bool:
        return self.refusal is None


class DecisionPoint:
    """See the module docstring."""

    def __init__(self, router: Router, policy: EgressPolicy) -> None:
        self.router = router
        self.policy = policy
        self._cache: ConnTable | None = None
        policy.on_change = self.changed

    def cache_in(self, cache: ConnTable | None) -> None:
        """Let the engine reuse allowed relay verdicts (None: every SYN comes here)."""
        self.changed()
        self._cache = cache

    def changed(self) -> None:
        """The rules behind the verdicts changed: nothing cached may be reused."""
        if self._cache is not None:
            self._cache.fast_relay_clear()

    def decide(self, q: Question) -> Verdict:
        if q.moment is Moment.FLOW:
            return self._flow(q)
        if q.moment is Moment.HELLO:
            names = (q.hostname, q.vip_hostname)
            return Verdict(Route.TLS, refusal=self._judge_names(q.peer_key, names))
        return Verdict(Route.DNS, refusal=self._judge_names(q.peer_key, (q.hostname,)))

    def _flow(self, q: Question) -> Verdict:
        route = self.router.decide(q.proto, q.dst_ip, q.dst_port)
        if q.addresses:
            allowed: list[str] = []
            refused: list[tuple[str, str]] = []
            for ip in q.addresses:
                reason = self.policy.check(ip)
                if reason is None:
                    allowed.append(ip)
                else:
                    refused.append((ip, Refusal.EGRESS.says(reason)))
            refusal = None if allowed else refused[0][1]
            return Verdict(route, refusal, tuple(allowed), tuple(refused))
        if route is not Route.RELAY:
            return Verdict(route)  # decided again by its service once more is known
        reason = self.policy.check(q.dst_ip)
        if reason is not None:
            return Verdict(route, Refusal.EGRESS.says(reason))
        if q.proto == "tcp" and self._cache is not None:
            self._cache.fast_relay_allow(
                q.peer_key,
                (q.dst_ip, q.dst_port),
                self.policy.verdicts_valid_for(),
                DEFAULT_CONNECT_TIMEOUT,
            )
        return Verdict(route)

    def _judge_names(self, peer_key: bytes, names: tuple[str | None, ...]) -> str | None:
        """Why a flow to these hostnames is refused, or None. No rule names a host yet (the
        egress policy judges addresses), so every name is allowed."""
        return None
