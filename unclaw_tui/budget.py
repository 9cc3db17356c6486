"""The gateway's budget of file descriptors (sans-IO but for `raise_descriptor_limit`).

Every relayed TCP connection (an engine splice, Python's pump, TLS interception's upstream, a
VIP's connection) and every relayed UDP flow holds one host socket, and a process may hold at
most RLIMIT_NOFILE descriptors: past that every `socket()` fails, for every peer, and so do
the upstream DNS client's sockets and the state files' writes. So at start the soft limit is
raised to the hard one (`raise_descriptor_limit`), and `DescriptorBudget.plan` divides it:

    limit = reserve (the gateway's own work: its sockets, the engine's, state writes, the console)
          + dns     (upstream DNS exchanges in flight at once: one socket each)
          + peers   (every peer's flows together)

and gives each peer a share of `peers` (a quarter, or the configured per-peer connection and
flow limits if smaller): it takes four peers at their full share to use up the peers' part,
and even then the reserve and DNS keep working. `DescriptorLedger` counts the descriptors each
peer's flows hold and says why a new one is refused (the closing event's words, from the one
close-reason table). The engine relays some connections without asking Python (the fast
relay): it does so only while the peer's and the engine's connections are within the share
and the peers' part (`wg_fast_relay_bound`), and its own per-peer connection limit is set a
little above the share (`engine_per_peer`), the backstop for a burst of SYNs handled before
Python hears of the ones already taken.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass

from unclaw_tui.engine.outcomes import Refusal

# The soft limit is raised no further than this even when the hard limit is larger (or
# unlimited): the engine's connection table holds 65,536 connections, and a few tools still
# walk every possible descriptor.
MAX_DESCRIPTORS = 1 << 20
# The reserve for the gateway's own work: an eighth of the limit, within these bounds.
RESERVE_MIN = 64
RESERVE_MAX = 1024
# Upstream DNS sockets in flight: an eighth of what is left after the reserve, within these
# (the DNS service answers at most 1024 UDP queries at once anyway).
DNS_MIN = 4
DNS_MAX = 1024
# A peer's share is at most this fraction of the peers' part.
PEER_SHARE_DIVISOR = 4
# The engine's per-peer connection limit sits this far above the share (at least
# ENGINE_SLACK_MIN): connections Python does not count (DNS over TCP to the gateway, ones
# closing) and fast-relayed ones not reported yet must not make the engine refuse first.
ENGINE_SLACK_DIVISOR = 8
ENGINE_SLACK_MIN = 8


def raise_descriptor_limit(cap: int = MAX_DESCRIPTORS) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (at most `cap`); the soft limit now in
    force. A limit that cannot be raised (a sandbox refusing it) is kept as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return cap if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


def current_descriptor_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_DESCRIPTORS if soft == resource.RLIM_INFINITY else soft


@dataclass(frozen=True, slots=True)
class DescriptorBudget:
    """How the descriptor limit is divided (see the module docstring)."""

    limit: int  # RLIMIT_NOFILE's soft limit, after raising
    reserve: int  # for the gateway's own work
    dns: int  # upstream DNS exchanges at once
    peers: int  # every peer's flows together
    per_peer: int  # one peer's flows (TCP connections and UDP flows with a host socket)
    engine_per_peer: int  # the engine's own per-peer TCP connection limit (the backstop)

    @classmethod
    def plan(
        cls, limit: int, *, max_conns_per_peer: int, max_flows_per_peer: int
    ) -> DescriptorBudget:
        reserve = min(RESERVE_MAX, max(RESERVE_MIN, limit // 8))
        left = max(0, limit - reserve)
        dns = min(DNS_MAX, max(DNS_MIN, left // 8))
        peers = max(1, left - dns)
        per_peer = max(1, min(max_conns_per_peer + max_flows_per_peer, peers // PEER_SHARE_DIVISOR))
        slack = max(ENGINE_SLACK_MIN, per_peer // ENGINE_SLACK_DIVISOR)
        return cls(
            limit=limit,
            reserve=reserve,
            dns=dns,
            peers=peers,
            per_peer=per_peer,
            engine_per_peer=max(1, min(max_conns_per_peer, per_peer + slack)),
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class DescriptorLedger:
    """The descriptors each peer's flows hold, against a `DescriptorBudget`."""

    def __init__(self, budget: DescriptorBudget) -> None:
        self.budget = budget
        self._held: dict[bytes, int] = {}
        self.total = 0
        self.refused = 0  # flows refused for want of a descriptor

    def held(self, peer: bytes) -> int:
        return self._held.get(peer, 0)

    def refusal(self, peer: bytes) -> str | None:
        """Why one more descriptor for this peer is refused (a closing event's error), or None."""
        held = self._held.get(peer, 0)
        if held >= self.budget.per_peer:
            return Refusal.DESCRIPTORS.says(f"{held} of {self.budget.per_peer} in use")
        if self.total >= self.budget.peers:
            return Refusal.PRESSURE.says(
                f"the peers' {self.budget.peers} descriptors are all in use"
            )
        return None

    def take(self, peer: bytes, *, force: bool = False) -> str | None:
        """Count one more descriptor for the peer, or say why not (nothing counted then).
        `force`: the descriptor is held already (the engine took it on its own)."""
        if not force:
            why = self.refusal(peer)
            if why is not None:
                self.refused += 1
                return why
        self._held[peer] = self._held.get(peer, 0) + 1
        self.total += 1
        return None

    def give(self, peer: bytes) -> None:
        left = self._held.get(peer, 0) - 1
        if left > 0:
            self._held[peer] = left
        else:
            self._held.pop(peer, None)
        self.total = max(0, self.total - 1)
