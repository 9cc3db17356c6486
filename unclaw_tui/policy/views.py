"""What the gateway shows of its policy to the console and the control socket: snapshots, not
live objects (the console observes; it changes rules and answers prompts through the
gateway's API)."""

from __future__ import annotations

from dataclasses import dataclass

from unclaw_tui.policy.rules import Rule


@dataclass(frozen=True, slots=True)
class RuleView:
    rule: Rule
    hits: int = 0
    last_hit: float | None = None  # wall-clock time of the latest flow it decided


@dataclass(frozen=True, slots=True)
class PromptView:
    """An open prompt: the first flow of an undecided (peer, destination), held."""

    id: str
    peer: str
    peer_public_key: str
    hostname: str | None
    dst_ip: str
    dst_port: int
    proto: str  # tcp / udp
    route: str  # tls / relay / vip
    opened: float  # wall-clock
    deadline: float  # wall-clock: the peer's fallback applies then
    waiting: int = 1  # flows held on it
