"""What a `Tunnel` tells its owner: handshakes, roaming, failures, load (typed, past tense).

Pure Python, so the gateway can match on them without loading the compiled engine.
"""

from __future__ import annotations

from dataclasses import dataclass

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class HandshakeDone:
    """A handshake with the peer completed (`initiator`: we started it)."""

    public_key: bytes
    endpoint: Endpoint | None
    initiator: bool


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """The peer roamed: an authenticated packet came from a new address."""

    public_key: bytes
    endpoint: Endpoint | None


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """We initiated and got no answer within REKEY_ATTEMPT_TIME."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class KeysExpired:
    """The peer's session keys expired (3 x REJECT_AFTER_TIME without a new handshake)."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class LoadChanged:
    """The handshake rate crossed the threshold (cookies required while `active`)."""

    active: bool


TunnelEvent = HandshakeDone | EndpointChanged | HandshakeFailed | KeysExpired | LoadChanged
