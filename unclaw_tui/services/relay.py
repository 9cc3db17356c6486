"""The relay: a peer's TCP connections and UDP flows, carried on from this host's own sockets.

TCP needs nothing of its own here: the gateway carries every connection that no service takes
to its destination once the decision point allowed it (`flow.carry` says how).

UDP (`UdpRelay`): a connected host socket per (peer, peer source port, destination) flow,
created on the flow's first datagram, which is when the decision point is asked; replies go
back from the original destination. Flows end after an idle timeout; each peer has a bounded
number of flows (past it the least recently active one is closed), and each flow's host socket
counts against the peer's share of the gateway's descriptors (budget.py), together with its TCP
connections: past the share a new flow replaces the peer's least recently active one here, and
with none to replace it is refused (ICMP administratively prohibited, and a closing event saying
why). The flow bookkeeping is the
sans-IO `UdpFlowTable`. Refusals are reported once per flow per idle period, not per datagram.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from unclaw_tui.config import DEFAULT_MAX_FLOWS_PER_PEER, DEFAULT_UDP_IDLE_TIMEOUT
from unclaw_tui.decision import Moment, Question
from unclaw_tui.engine import describe_os_error
from unclaw_tui.router import Route
from unclaw_tui.services.base import lru_put

if TYPE_CHECKING:  # tests pass stand-ins for UdpDatagram with the methods used here
    from unclaw_tui.decision import DecisionPoint
    from unclaw_tui.engine import UdpDatagram
    from unclaw_tui.flow import Flow, FlowRegistry

# Datagrams held while a flow's host socket is being created, and bytes queued in a host socket
# the kernel would not take yet; past either, datagrams are dropped (UDP may lose them anyway).
UDP_PENDING_DATAGRAMS = 32
UDP_WRITE_BUFFER_LIMIT = 256 * 1024
# Refused UDP destinations remembered so a chatty client yields one event, not one per datagram.
UDP_REFUSALS_REMEMBERED = 1024


# --- UDP: the flow table (sans-IO) -----------------------------------------------------------

K = TypeVar("K")
V = TypeVar("V")


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    last_active: float


class UdpFlowTable(Generic[K, V]):
    """Flows by key, grouped per peer in order of last activity (least recent first).

    Time is a parameter: `add`/`touch` take `now`, `expire(now)` removes idle flows and
    `next_deadline()` says when the next one goes idle.
    """

    def __init__(self, *, max_per_peer: int, idle_timeout: float) -> None:
        if max_per_peer < 1:
            raise ValueError("max_per_peer must be at least 1")
        self.max_per_peer = max_per_peer
        self.idle_timeout = idle_timeout
        self._by_peer: dict[bytes, OrderedDict[K, _Entry[V]]] = {}
        self._peer_of: dict[K, bytes] = {}

    def __len__(self) -> int:
        return len(self._peer_of)

    def __contains__(self, key: K) -> bool:
        return key in self._peer_of

    def get(self, key: K) -> V | None:
        peer = self._peer_of.get(key)
        return None if peer is None else self._by_peer[peer][key].value

    def count(self, peer: bytes) -> int:
        flows = self._by_peer.get(peer)
        return len(flows) if flows else 0

    def values(self) -> list[V]:
        return [e.value for flows in self._by_peer.values() for e in flows.values()]

    def touch(self, key: K, now: float) -> None:
        flows = self._by_peer[self._peer_of[key]]
        flows[key].last_active = now
        flows.move_to_end(key)

    def add(self, peer: bytes, key: K, value: V, now: float) -> list[tuple[K, V]]:
        """Insert a new flow; returns the flows evicted to keep the peer within its bound."""
        if key in self._peer_of:
            raise KeyError(f"flow already present: {key!r}")
        flows = self._by_peer.setdefault(peer, OrderedDict())
        evicted: list[tuple[K, V]] = []
        while len(flows) >= self.max_per_peer:
            old_key, old = flows.popitem(last=False)
            del self._peer_of[old_key]
            evicted.append((old_key, old.value))
        flows[key] = _Entry(value, now)
        self._peer_of[key] = peer
        return evicted

    def pop_oldest(self, peer: bytes) -> V | None:
        """Remove and return the peer's least recently active flow (None: it has none)."""
        flows = self._by_peer.get(peer)
        if not flows:
            return None
        key, entry = flows.popitem(last=False)
        del self._peer_of[key]
        if not flows:
            del self._by_peer[peer]
        return entry.value

    def pop(self, key: K) -> V | None:
        peer = self._peer_of.pop(key, None)
        if peer is None:
            return None
        flows = self._by_peer[peer]
        entry = flows.pop(key)
        if not flows:
            del self._by_peer[peer]
        return entry.value

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Remove and return every flow idle for idle_timeout or longer."""
        expired: list[tuple[K, V]] = []
        for peer in list(self._by_peer):
            flows = self._by_peer[peer]
            while flows:
                key, entry = next(iter(flows.items()))
                if now - entry.last_active < self.idle_timeout:
                    break
                flows.popitem(last=False)
                del self._peer_of[key]
                expired.append((key, entry.value))
            if not flows:
                del self._by_peer[peer]
        return expired

    def next_deadline(self) -> float | None:
        """When the least recently active flow goes idle, or None with no flows."""
        firsts = [next(iter(flows.values())).last_active for flows in self._by_peer.values()]
        return min(firsts) + self.idle_timeout if firsts else None


# --- UDP: the relay ----------------------------------------------------------------------------

FlowKey = tuple[bytes, int, str, int]  # peer public key, peer source port, dst ip, dst port


@dataclass(slots=True, eq=False)
class _UdpFlow:
    key: FlowKey
    flow: Flow  # identity, counters and events
    # The latest datagram of the flow, only to answer through (`reply`, `unreachable`).
    reply_to: UdpDatagram | None
    target_ip: str = ""  # where the host socket goes; the key's dst ip unless overridden
    pending: list[bytes] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None
    opening: asyncio.Task[None] | None = None
    closed: bool = False


class _HostSocket(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay, flow: _UdpFlow) -> None:
        self.relay = relay
        self.flow = flow

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.relay._on_reply(self.flow, data)

    def error_received(self, exc: Exception) -> None:
        # The socket is connected, so the kernel reports the destination's ICMP errors here:
        # pass "port unreachable" on so the client fails fast, as it would without us.
        if isinstance(exc, ConnectionRefusedError) and self.flow.reply_to is not None:
            self.flow.reply_to.unreachable()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.flow.closed:
            self.relay._finish(self.flow, describe_os_error(exc) if exc else "host socket closed")


class UdpRelay:
    """UDP flows from peers, relayed through connected host sockets. `handle` is synchronous
    (fit for `tunnel.on_udp`); `close()` ends every flow."""

    def __init__(
        self,
        flows: FlowRegistry,
        decisions: DecisionPoint,
        *,
        idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT,
        max_flows_per_peer: int = DEFAULT_MAX_FLOWS_PER_PEER,
        route: Route = Route.RELAY,
    ) -> None:
        self._registry = flows
        self._decisions = decisions
        self._route = route
        self.flows: UdpFlowTable[FlowKey, _UdpFlow] = UdpFlowTable(
            max_per_peer=max_flows_per_peer, idle_timeout=idle_timeout
        )
        self._refused: OrderedDict[FlowKey, float] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- public -------------------------------------------------------------------------------

    def open_flows(self, peer_public_key: bytes) -> int:
        return self.flows.count(peer_public_key)

    def handle(
        self, dgram: UdpDatagram, *, addresses: tuple[str, ...] = (), hostname: str | None = None
    ) -> None:
        """Relay one datagram from a peer (creating its flow on first use).

        `addresses`: where a new flow may go instead of the datagram's destination (a VIP's
        real addresses): the first the decision point allows. Replies still come from the
        destination the peer used, and the events name it with `hostname`. An existing flow
        keeps its target."""
        if self._closed:
            dgram.unreachable()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        key: FlowKey = (dgram.peer_public_key, dgram.src_port, dgram.dst_ip, dgram.dst_port)
        entry = self.flows.get(key)
        if entry is not None:
            self.flows.touch(key, now)
            entry.reply_to = dgram
            self._send(entry, dgram.data)
            return
        verdict = self._decisions.decide(
            Question(
                Moment.FLOW,
                dgram.peer_public_key,
                "udp",
                dgram.dst_ip,
                dgram.dst_port,
                hostname=hostname,
                addresses=addresses,
            )
        )
        if verdict.refusal is not None:
            dgram.unreachable(admin=True)
            self._report_refusal(key, dgram, verdict.refusal, now, hostname)
            return
        # Past the peer's descriptor share: the new flow takes the socket of the peer's least
        # recently active one, if it has one here (a flow evicted below frees its own anyway).
        peer = dgram.peer_public_key
        if self.flows.count(peer) < self.flows.max_per_peer and (
            why := self._registry.descriptors.refusal(peer)
        ):
            oldest = self.flows.pop_oldest(peer)
            if oldest is None:
                self._registry.descriptors.refused += 1
                dgram.unreachable(admin=True)
                self._report_refusal(key, dgram, why, now, hostname)
                return
            self._finish(oldest, why, remove=False)
        entry = _UdpFlow(
            key=key,
            flow=self._new_flow(dgram, hostname),
            reply_to=dgram,
            target_ip=verdict.addresses[0] if addresses else dgram.dst_ip,
        )
        for _key, old in self.flows.add(dgram.peer_public_key, key, entry, now):
            self._finish(old, "closed: flow limit per peer reached", remove=False)
        self._registry.hold_descriptor(entry.flow, force=True)  # checked above
        entry.flow.open()
        entry.pending.append(dgram.data)
        entry.opening = loop.create_task(self._open(entry))
        self._arm(loop)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for entry in self.flows.values():
            self._finish(entry, None)
        self._refused.clear()

    # -- flows --------------------------------------------------------------------------------

    def _new_flow(self, dgram: UdpDatagram, hostname: str | None) -> Flow:
        return self._registry.udp(
            dgram.peer_public_key,
            dgram.peer_ip,
            dgram.src_port,
            (dgram.dst_ip, dgram.dst_port),
            route=self._route,
            hostname=hostname,
        )

    async def _open(self, entry: _UdpFlow) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _HostSocket(self, entry), remote_addr=(entry.target_ip, entry.key[3])
            )
        except OSError as exc:
            if entry.reply_to is not None:
                entry.reply_to.unreachable()
            self._finish(entry, describe_os_error(exc))
            return
        entry.opening = None
        if entry.closed:  # evicted or relay closed while the socket was being made
            transport.abort()
            return
        entry.transport = transport
        pending, entry.pending = entry.pending, []
        for data in pending:
            self._send(entry, data)

    def _send(self, entry: _UdpFlow, data: bytes) -> None:
        if entry.transport is None:
            if len(entry.pending) < UDP_PENDING_DATAGRAMS:
                entry.pending.append(data)
            return
        # The transport queues what the kernel refuses; keep that queue bounded.
        if entry.transport.get_write_buffer_size() > UDP_WRITE_BUFFER_LIMIT:
            return
        entry.transport.sendto(data)
        entry.flow.bytes_up += len(data)

    def _on_reply(self, entry: _UdpFlow, data: bytes) -> None:
        if entry.closed or entry.reply_to is None:
            return
        self.flows.touch(entry.key, asyncio.get_running_loop().time())
        entry.flow.bytes_down += len(data)
        entry.reply_to.reply(data)

    def _finish(self, entry: _UdpFlow, error: str | None, *, remove: bool = True) -> None:
        if entry.closed:
            return
        entry.closed = True
        if remove:
            self.flows.pop(entry.key)
        if entry.opening is not None:
            entry.opening.cancel()
            entry.opening = None
        if entry.transport is not None:
            entry.transport.abort()
            entry.transport = None
        entry.pending.clear()
        entry.reply_to = None
        entry.flow.close(error)

    def _report_refusal(
        self, key: FlowKey, dgram: UdpDatagram, reason: str, now: float, hostname: str | None
    ) -> None:
        seen = self._refused.get(key)
        if seen is not None and now - seen < self.flows.idle_timeout:
            return
        lru_put(self._refused, key, now, UDP_REFUSALS_REMEMBERED)
        self._new_flow(dgram, hostname).close(reason)

    # -- idle timer: one timer for the next flow to go idle ----------------------------------

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        deadline = None if self._closed else self.flows.next_deadline()
        if self._timer is not None:
            if deadline is not None and self._timer.when() <= deadline:
                return  # fires early at worst, then re-arms for the later deadline
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._sweep, loop, deadline)

    def _sweep(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self._timer = None
        # call_at may run a hair before `deadline` (clock resolution): never judge earlier.
        for _key, entry in self.flows.expire(max(loop.time(), deadline)):
            self._finish(entry, None, remove=False)
        self._arm(loop)
