"""Typed gateway events; `bus.py` fans them out to observers (the TUI, the headless printer).

Events are small frozen dataclasses with a wall-clock timestamp.  They never carry private
keys or preshared keys: only public keys (base64), names and addresses.  `to_dict()` gives the
JSON-lines form documented in the README: {"ts": ..., "type": "...", ...fields}.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    type: ClassVar[str] = "event"
    ts: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ts": round(self.ts, 3), "type": self.type}
        out.update((name, getattr(self, name)) for name in _field_names(type(self)))
        return out


@functools.cache
def _field_names(cls: type[Event]) -> tuple[str, ...]:
    """The fields of an event class but ts, in order (looked up once per class: the headless
    printer formats an event per flow end, thousands a second)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "ts")


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayStarted(Event):
    type: ClassVar[str] = "gateway_started"
    listen_port: int
    public_key: str
    endpoint: str
    address: str
    state_dir: str
    # How the descriptor limit is divided (budget.py `DescriptorBudget`): limit, reserve, dns,
    # peers, per_peer, engine_per_peer.
    descriptors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayStopped(Event):
    type: ClassVar[str] = "gateway_stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEvent(Event):
    """Who every peer event is about."""

    name: str
    public_key: str
    ip: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAdded(PeerEvent):
    type: ClassVar[str] = "peer_added"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerRemoved(PeerEvent):
    type: ClassVar[str] = "peer_removed"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerHandshake(PeerEvent):
    """A handshake with the peer completed (as responder or initiator)."""

    type: ClassVar[str] = "peer_handshake"
    endpoint: str
    initiator: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerEndpointChanged(PeerEvent):
    """The peer roamed: an authenticated packet came from a new address."""

    type: ClassVar[str] = "peer_endpoint"
    endpoint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerHandshakeFailed(PeerEvent):
    """We initiated and got no answer within REKEY_ATTEMPT_TIME."""

    type: ClassVar[str] = "peer_handshake_failed"


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSilent(PeerEvent):
    """Nothing received from the peer for `--silent-peer-after` seconds: its open flows were
    ended (each closing event says "peer silent") and their descriptors given back."""

    type: ClassVar[str] = "peer_silent"
    silent_seconds: int
    flows_ended: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UnderLoad(Event):
    """The handshake rate crossed the threshold: cookie replies (MAC2) are now required."""

    type: ClassVar[str] = "under_load"
    active: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsDropped(Event):
    """A reader of the events fell behind: `count` events meant for it were dropped, the
    oldest first, since its previous events_dropped (at most one a second while it lasts).
    Made by the reader from its subscription's count, never published: the gateway itself
    never waits for a reader."""

    type: ClassVar[str] = "events_dropped"
    count: int


# Flow, DNS, TLS and HTTP events: what the console's Connections, DNS and TLS panes show.
# Routes: "tls" (443/8443), "dns" (53), "vip" (a 10.78/16 hostname address), "relay".


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowEvent(Event):
    """What every event of one TCP connection or UDP flow says of it: who, from where, to
    where, and how it was routed.  Only `flow.Flow` builds these (exactly one opened and one
    closed per flow)."""

    conn_id: int
    peer: str
    peer_public_key: str
    peer_ip: str
    src_port: int = 0
    dst_ip: str
    dst_port: int
    hostname: str | None = None  # from the VIP map or the TLS SNI
    route: str = "relay"
    # The policy's answer (issue 14): "allow" or "deny" (held flows: "ask" until answered),
    # and the id of the rule that gave it, or "default" (the peer's policy).
    verdict: str = "allow"
    rule: str = "default"


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowEnded(FlowEvent):
    """The end of a flow: its counters, and `error` when it ended abnormally or was refused."""

    bytes_up: int = 0  # peer -> destination
    bytes_down: int = 0  # destination -> peer
    duration: float = 0.0
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpOpened(FlowEvent):
    type: ClassVar[str] = "tcp_opened"


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpClosed(FlowEnded):
    type: ClassVar[str] = "tcp_closed"


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpFlowOpened(FlowEvent):
    type: ClassVar[str] = "udp_flow_opened"


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpFlowClosed(FlowEnded):
    """A UDP flow ended (idle timeout, eviction or error)."""

    type: ClassVar[str] = "udp_flow_closed"


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsQuery(Event):
    type: ClassVar[str] = "dns_query"
    peer: str
    peer_ip: str
    qname: str
    qtype: str  # "A", "AAAA", "HTTPS", ...
    answers: list[str] = field(default_factory=list)
    rcode: str = "NOERROR"
    upstream_ms: float | None = None  # None when answered locally (VIP or cache)
    cached: bool = False
    # Why it failed (SERVFAIL: the upstream's error; MALFORMED: what was wrong), else None.
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsHost(Event):
    """A TLS ClientHello was seen and handled."""

    type: ClassVar[str] = "tls_host"
    peer: str
    sni: str
    alpn: str | None = None
    mode: str = "intercepted"  # "intercepted" / "passthrough" / "rejected"
    ok: bool = True
    error: str | None = None
    # The TCP connection it came on (joins tcp_opened / tcp_closed), and who made it.
    conn_id: int | None = None
    peer_public_key: str = ""
    dst_ip: str = ""
    dst_port: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest(Event):
    """An HTTP request seen inside an intercepted TLS connection: an HTTP/1.x exchange or an
    HTTP/2 stream. No header values (the request record in services/requests.py has them,
    secrets masked)."""

    type: ClassVar[str] = "http_request"
    peer: str
    method: str
    host: str
    path: str
    status: int | None = None  # None when no response came
    bytes: int = 0  # response body bytes
    ms: float = 0.0
    conn_id: int | None = None  # the TCP connection it came on
    peer_public_key: str = ""
    protocol: str = "http/1.1"  # or "h2"
    stream_id: int | None = None  # HTTP/2: the client's stream id
    request_bytes: int = 0  # request body bytes
    grpc_status: int | None = None  # gRPC: from the trailers (or a trailers-only response)
    grpc_message: str | None = None
    error: str | None = None  # reset, refused, or cut short with its connection


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitHit(Event):
    """A per-peer limit refused new connections: `limit` is "tcp_conns_per_peer" or
    "tcp_half_open_per_peer", `value` its setting, `refused` the SYNs refused (with an RST)
    since the previous event for this peer and limit (at most one each half second)."""

    type: ClassVar[str] = "limit_hit"
    peer: str
    peer_public_key: str
    limit: str
    value: int
    refused: int


# Policy events (issue 14).  A rule is given in its file form (policy/rules.py `rule_to_doc`):
# id, action, what, who, port, proto, until, note.  `by` says who made the change: "cli",
# "console", "prompt", "file" (rules.json edited by hand), "control".


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyDecision(Event):
    """A flow denied, held for a prompt, or decided by a rule that is not the default: one
    event per such decision (an ordinary allowed flow says its verdict on tcp_opened only)."""

    type: ClassVar[str] = "policy_decision"
    peer: str
    peer_public_key: str
    hostname: str | None = None
    dst_ip: str = ""
    dst_port: int = 0
    proto: str = "tcp"
    verdict: str  # allow / deny / ask / intercept / passthrough
    rule: str = "default"
    reason: str = ""  # e.g. "rule r7", "peer policy deny", "prompt p3 timed out: fallback deny"
    conn_id: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleAdded(Event):
    type: ClassVar[str] = "rule_added"
    rule: dict[str, Any]
    by: str = "cli"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleRemoved(Event):
    type: ClassVar[str] = "rule_removed"
    rule: dict[str, Any]
    by: str = "cli"


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleExpired(Event):
    """A timed rule's time ran out, or a `once` rule decided its flow."""

    type: ClassVar[str] = "rule_expired"
    rule: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class RulesRejected(Event):
    """rules.json, edited by hand, has a bad rule: the last good set stays in force."""

    type: ClassVar[str] = "rules_rejected"
    file: str
    line: int | None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptOpened(Event):
    """A flow of a peer whose policy is `ask` met no rule: it is held until the operator
    answers (console, `unclaw-tui decide ID`) or `--prompt-timeout` applies the fallback."""

    type: ClassVar[str] = "prompt_opened"
    id: str
    peer: str
    peer_public_key: str
    hostname: str | None = None
    dst_ip: str
    dst_port: int
    proto: str
    route: str = "relay"
    timeout: float = 0.0  # seconds until the fallback applies


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptAnswered(Event):
    type: ClassVar[str] = "prompt_answered"
    id: str
    peer: str
    access: str  # allow / deny
    duration: str  # once / restart / always / 15m ...
    scope: str  # port / host / domain
    rule: str | None = None  # the rule the answer made (None for once)
    by: str = "console"
    flows: int = 0  # held flows it released or refused


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptTimedOut(Event):
    type: ClassVar[str] = "prompt_timed_out"
    id: str
    peer: str
    fallback: str  # allow / deny: what the held flows got
    flows: int = 0
