"""The composition root: engine, state, router and services, offered to the UI and the CLI.

This module's top half is the interface the UI codes against (snapshot dataclasses and the
GatewayProtocol); a FakeGateway in the TUI tests implements the same protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

from unclaw_tui import version
from unclaw_tui.budget import DescriptorBudget, raise_descriptor_limit
from unclaw_tui.bus import EventBus, Subscription
from unclaw_tui.config import Settings
from unclaw_tui.control.commands import register_policy_commands
from unclaw_tui.control.requests import register as register_requests
from unclaw_tui.control.server import ControlServer
from unclaw_tui.control.status import status
from unclaw_tui.decision import DecisionPoint, Moment, Question
from unclaw_tui.engine import (
    CloseReason,
    EndpointChanged,
    HandshakeDone,
    HandshakeFailed,
    KeysExpired,
    LoadChanged,
    Refusal,
    TunnelEvent,
    unb64,
)
from unclaw_tui.events import (
    Event,
    GatewayStarted,
    GatewayStopped,
    LimitHit,
    PeerAdded,
    PeerEndpointChanged,
    PeerHandshake,
    PeerHandshakeFailed,
    PeerRemoved,
    PeerSilent,
    UnderLoad,
)
from unclaw_tui.flow import FlowRegistry, carry
from unclaw_tui.policy import Rule
from unclaw_tui.policy.views import PromptView, RuleView
from unclaw_tui.router import Route, Router
from unclaw_tui.services import registry
from unclaw_tui.services.base import Resolver
from unclaw_tui.services.egress import EgressPolicy
from unclaw_tui.services.relay import UdpRelay
from unclaw_tui.services.requests import RequestLog, RequestRecord
from unclaw_tui.services.upstream import UpstreamClient
from unclaw_tui.state import COUNTERS, PeerRecord, PeerRuntime, StateDir
from unclaw_tui.wgquick import client_config, format_endpoint, resolve_endpoint

if TYPE_CHECKING:  # the engine (a compiled module) is imported when the gateway starts
    from unclaw_tui.engine import FastOpen, PeerInfo, SpliceDone, TcpConn, Tunnel, UdpDatagram

log = logging.getLogger(__name__)


def _endpoint(ep: tuple[str, int] | None) -> str | None:
    return None if ep is None else format_endpoint(*ep)


@dataclass(frozen=True, slots=True)
class PeerSnapshot:
    name: str
    public_key: str  # base64
    ip: str  # tunnel IP, e.g. "10.77.0.2"
    created: float  # wall clock
    endpoint: str | None  # "203.0.113.5:51820" / "[2001:db8::1]:51820", None if never seen
    last_handshake: float | None  # wall clock of the last completed handshake
    rx_bytes: int  # bytes received from the peer (cumulative, survives restarts)
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    open_connections: int = 0
    policy: str = "allow"  # the peer's default: allow / deny / ask
    fallback: str = "deny"  # ask's answer when no one answers in time


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    listen_port: int
    public_key: str  # base64
    endpoint: str  # as written into client configs, host:port
    address: str  # "10.77.0.1/24"
    started_at: float  # wall clock
    peers: tuple[PeerSnapshot, ...]
    drops: dict[str, int] = field(default_factory=dict)  # reason -> count
    open_flows: int = 0
    under_load: bool = False
    # Live (bytes_up, bytes_down) of open TCP connections that moved bytes lately, by conn_id.
    flow_bytes: dict[int, tuple[int, int]] = field(default_factory=dict)
    prompts_open: int = 0  # prompts waiting for the operator (the status bar's count)

    @property
    def peers_online(self) -> int:
        """Peers with a handshake in the last 180 s (REJECT_AFTER_TIME)."""
        now = time.time()
        return sum(
            1 for p in self.peers if p.last_handshake is not None and now - p.last_handshake < 180
        )


class GatewayProtocol(Protocol):
    """What the UI and the CLI may do with a running gateway."""

    def snapshot(self) -> GatewaySnapshot: ...

    def subscribe(self) -> Subscription: ...

    def add_peer(self, name: str, ip: str | None = None) -> PeerSnapshot:
        """Add a peer (persisted, live at once). Raises ValueError with a one-line reason."""

    def remove_peer(self, name: str) -> None:
        """Remove a peer (persisted, live at once). Raises KeyError if unknown."""

    def client_config(self, name: str) -> str:
        """The peer's wg-quick config text. Raises KeyError if unknown."""

    # --- policy (issue 14): the same calls serve the console and the control socket ---------

    def set_peer_policy(
        self, name: str, policy: str | None = None, fallback: str | None = None
    ) -> PeerSnapshot:
        """A peer's default (allow/deny/ask) and ask's fallback (allow/deny), persisted, live
        at once.  KeyError if unknown, ValueError for a bad value."""

    def rules(self) -> list[RuleView]:
        """Every rule in force, built-in ones first, with their hits."""

    def add_rule(self, rule: Rule, by: str = "console") -> RuleView:
        """Add a rule (always/timed ones persisted in rules.json), live at once; flows it now
        denies are closed.  ValueError if the id is taken."""

    def remove_rule(self, rule_id: str, by: str = "console") -> Rule:
        """KeyError if unknown; ValueError for a built-in rule (it comes from a flag)."""

    def prompts(self) -> list[PromptView]:
        """Open prompts, oldest first."""

    def answer_prompt(
        self,
        prompt_id: str,
        access: str,
        duration: str = "always",
        scope: str = "host",
        by: str = "console",
    ) -> str | None:
        """Answer a prompt: access allow/deny, duration as the CLI's DURATION, scope
        port/host/domain; its held flows go on or are refused at once.  Returns the id of the
        rule made (None for once).  KeyError if no such prompt is open (answered or timed out
        already), ValueError for a bad value."""

    # --- requests seen inside intercepted TLS (issue 15) ------------------------------------

    def requests(self, limit: int | None = None, peer: str | None = None) -> list[RequestRecord]:
        """The most recent requests (at most `limit`), oldest first, secret header values
        masked; `peer` (a public key, base64) keeps one peer's.  Each has an `id`."""

    def reveal(self, request_id: int, where: str, index: int) -> str | None:
        """The original value of a masked header of a request still kept: `where` is
        "request", "response" or "trailers", `index` the header's place in that list.  None
        if that header was not masked; KeyError if the request is no longer kept."""


# --- the real gateway --------------------------------------------------------------------

# How often the state dir is polled for peers added or removed by the CLI, and stats written.
PEERS_POLL_INTERVAL = 0.5
STATS_WRITE_INTERVAL = 2.0
PRESSURE_INTERVAL = 1.0  # seconds between two reliefs of one peer's zero-window connections
# Spliced connections appear in snapshots while their bytes moved this recently: long enough
# that a console polling a few times a second sees each one's final live count.
FLOW_BYTES_WINDOW = 3.0


class Gateway:
    """Engine + state, offered to the UI and the CLI as one object (see GatewayProtocol)."""

    def __init__(self, settings: Settings, bus: EventBus | None = None) -> None:
        self.settings = settings
        self.bus = bus or EventBus()
        self.state = StateDir(settings.state_dir)
        self.identity = self.state.identity()
        self.endpoint = resolve_endpoint(settings.endpoint, settings.listen_port)
        self.started_at = time.time()
        self._tunnel: Tunnel | None = None
        self._records: dict[str, PeerRecord] = {}  # by name
        self._by_key: dict[bytes, PeerRecord] = {}
        self._baseline: dict[str, PeerRuntime] = {}  # stats from earlier runs, by public key
        self._silenced: set[bytes] = set()  # peers whose flows were ended for their silence
        self._relieved: dict[bytes, float] = {}  # peer -> when its zero-window flows last ended
        self._peers_signature: tuple[int, int, int] = (0, 0, 0)
        self._tasks: list[asyncio.Task[None]] = []
        self.control: ControlServer | None = None  # control.sock, served from start() on
        # DNS, TLS and the CA page's routes are enabled as those services land.
        self.router = Router(gateway_ip=str(settings.gateway_ip))
        self.policy = EgressPolicy(
            allow=[str(n) for n in settings.allow],
            deny=[str(n) for n in settings.deny],
            tunnel_net=settings.tunnel_network,
        )
        self.decisions = DecisionPoint(self.router, self.policy)
        self.flows = FlowRegistry(self.publish, self.peer_name, buffer_size=settings.tcp_buffer)
        self.resolver: Resolver | None = None
        # Requests seen inside intercepted TLS, the most recent (services/requests.py).
        self.request_log = RequestLog()
        self._udp_relay = UdpRelay(
            self.flows,
            self.decisions,
            idle_timeout=settings.udp_idle_timeout,
            max_flows_per_peer=settings.max_flows_per_peer,
        )
        self.services = registry.build(self)
        self.router.enable(*self.services)
        self.budget = self.flows.descriptors.budget  # planned again at start

    def _plan_descriptors(self) -> DescriptorBudget:
        """Raise the descriptor limit and divide it (budget.py): the ledger the flows are
        counted in, the upstream DNS client's sockets, the engine's per-peer limit."""
        s = self.settings
        budget = DescriptorBudget.plan(
            raise_descriptor_limit(),
            max_conns_per_peer=s.max_conns_per_peer,
            max_flows_per_peer=s.max_flows_per_peer,
        )
        self.budget = budget
        self.flows.descriptors.budget = budget
        upstream = getattr(self.resolver, "upstream", None)
        if isinstance(upstream, UpstreamClient):
            upstream.limit_sockets(budget.dns)
        log.info("descriptors: %s", budget.to_dict())
        return budget

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        # First: a second gateway on this state dir stops here, before it touches anything.
        self.control = ControlServer(s.state_dir, version())
        self.control.register(
            "status", lambda params: status(self.snapshot(), version(), time.time())
        )
        register_requests(self.control, self.request_log)
        register_policy_commands(self.control, self)
        await self.control.start()
        try:
            await self._start_tunnel()
        except BaseException:
            await self.control.stop()
            raise

    async def _start_tunnel(self) -> None:
        from unclaw_tui.engine import Tunnel

        s = self.settings
        budget = self._plan_descriptors()
        self._tunnel = Tunnel(
            unb64(self.identity.private_key),
            s.listen_port,
            s.address,
            mtu=s.mtu,
            max_peers=s.max_peers,
            on_event=self._on_tunnel_event,
            tcp_buffer=s.tcp_buffer,
            max_conns_per_peer=budget.engine_per_peer,
            max_half_open_per_peer=self._half_open_limit,
            engine_thread=s.engine_thread,
        )
        conns = self._tunnel.conns
        conns.on_tcp = self._on_tcp
        conns.on_udp = self._on_udp
        conns.on_fast_relay = self._on_fast_relay
        # Past the share (or the peers' part), SYNs come to Python, which refuses them saying why.
        conns.fast_relay_bound(budget.per_peer, budget.peers)
        await self._tunnel.start()
        # The engine's fast relay caches the decision point's verdicts for relayed connections.
        if s.fast_relay and self._tunnel.can_splice:
            self.decisions.cache_in(conns)
        self._baseline = self.state.read_stats()
        self._reconcile_peers(announce=False)
        self._tasks.append(asyncio.create_task(self._poll_state()))
        self.bus.publish(
            GatewayStarted(
                listen_port=self._tunnel.listen_port,
                public_key=self.identity.public_key,
                endpoint=self.endpoint,
                address=str(s.address),
                state_dir=str(s.state_dir),
                descriptors=budget.to_dict(),
            )
        )

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.stop()  # no command arrives during the teardown
        self._udp_relay.close()
        for service in self.services.values():
            await service.close()
        await self.flows.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._tunnel is not None:
            self.state.write_stats(self._collect_stats())
            self.decisions.cache_in(None)
            self._tunnel.close()
            self._tunnel = None
            self.bus.publish(GatewayStopped())

    @property
    def tunnel(self) -> Tunnel:
        if self._tunnel is None:
            raise RuntimeError("gateway not started")
        return self._tunnel

    # -- GatewayProtocol -------------------------------------------------------------------

    def subscribe(self) -> Subscription:
        return self.bus.subscribe()

    def add_peer(self, name: str, ip: str | None = None) -> PeerSnapshot:
        record = self.state.add_peer(
            name, ip, self.settings.tunnel_network, self.settings.gateway_ip
        )
        self._reconcile_peers(announce=True)
        return self._peer_snapshot(record)

    def remove_peer(self, name: str) -> None:
        self.state.remove_peer(name)
        self._reconcile_peers(announce=True)

    def client_config(self, name: str) -> str:
        record = self._records.get(name) or self.state.peer(name)
        return client_config(
            record, self.identity.public_key, self.endpoint, str(self.settings.gateway_ip)
        )

    def requests(self, limit: int | None = None, peer: str | None = None) -> list[RequestRecord]:
        """The most recent requests seen inside intercepted TLS, oldest first (secrets masked
        in their fields); `peer` (a public key, base64) keeps one peer's."""
        return self.request_log.recent(limit, peer)

    def reveal(self, request_id: int, where: str, index: int) -> str | None:
        record = self.request_log.get(request_id)
        if record is None:
            raise KeyError(f"request {request_id} is no longer kept")
        return record.reveal(where, index)

    def snapshot(self) -> GatewaySnapshot:
        tunnel = self._tunnel
        live = tunnel.peers if tunnel is not None else {}
        flow_bytes = self.flows.live_bytes()
        if tunnel is not None:
            flow_bytes.update(tunnel.conns.spliced_flow_bytes(within=FLOW_BYTES_WINDOW))
        return GatewaySnapshot(
            listen_port=tunnel.listen_port if tunnel else self.settings.listen_port,
            public_key=self.identity.public_key,
            endpoint=self.endpoint,
            address=str(self.settings.address),
            started_at=self.started_at,
            peers=tuple(self._peer_snapshot(r, live) for r in self._records.values()),
            drops=tunnel.drop_counts() if tunnel else {},
            open_flows=self.flows.total,
            under_load=tunnel.under_load if tunnel else False,
            flow_bytes=flow_bytes,
        )

    # -- internals -------------------------------------------------------------------------

    def _peer_runtime(
        self, record: PeerRecord, infos: dict[bytes, PeerInfo] | None = None
    ) -> PeerRuntime:
        """Counters of this run added to those saved by earlier runs (`infos`: the tunnel's
        peers, when the caller already has them)."""
        base = self._baseline.get(record.public_key) or PeerRuntime()
        key = unb64(record.public_key)
        live = None
        if infos is not None:
            live = infos.get(key)
        elif self._tunnel is not None and key in self._by_key:
            live = self._tunnel.peer_info(key)
        if live is None:
            return base
        return PeerRuntime(
            endpoint=_endpoint(live.endpoint) or base.endpoint,
            last_handshake=live.last_handshake or base.last_handshake,
            **{name: getattr(base, name) + getattr(live, name) for name in COUNTERS},
        )

    def _peer_snapshot(
        self, record: PeerRecord, infos: dict[bytes, PeerInfo] | None = None
    ) -> PeerSnapshot:
        return PeerSnapshot(
            name=record.name,
            public_key=record.public_key,
            ip=record.ip,
            created=record.created,
            **asdict(self._peer_runtime(record, infos)),
            open_connections=self.flows.count(record.public_key),
            policy=record.policy,
            fallback=record.fallback,
        )

    def _reconcile_peers(self, *, announce: bool) -> None:
        """Make the tunnel's peers match peers.json (the CLI may have changed it)."""
        self._peers_signature = self.state.peers_signature()
        wanted = {r.public_key: r for r in self.state.peers()}
        current = {r.public_key: r for r in self._records.values()}
        for key, record in current.items():
            if key not in wanted or wanted[key].ip != record.ip:
                self._drop_peer(record, announce)
        for key, record in wanted.items():
            if key not in current or current[key].ip != record.ip:
                self._take_peer(record, announce)
            else:
                self._records[record.name] = record

    def _take_peer(self, record: PeerRecord, announce: bool) -> None:
        key = unb64(record.public_key)
        self.tunnel.add_peer(
            key,
            preshared_key=unb64(record.preshared_key),
            allowed_ips=[f"{record.ip}/32"],
        )
        self._records[record.name] = record
        self._by_key[key] = record
        if announce:
            self.bus.publish(PeerAdded(**_who(record)))

    def _drop_peer(self, record: PeerRecord, announce: bool) -> None:
        key = unb64(record.public_key)
        # Keep its counters for the stats file before the engine forgets them.
        self._baseline[record.public_key] = self._peer_runtime(record)
        self.tunnel.remove_peer(key)
        self._by_key.pop(key, None)
        self._relieved.pop(key, None)
        self._silenced.discard(key)
        if self._records.get(record.name) is record:
            del self._records[record.name]
        else:
            self._records = {n: r for n, r in self._records.items() if r is not record}
        if announce:
            self.bus.publish(PeerRemoved(**_who(record)))

    async def _poll_state(self) -> None:
        last_stats = time.monotonic()
        last_activity: tuple[int, ...] | None = None
        while True:
            await asyncio.sleep(PEERS_POLL_INTERVAL)
            try:
                if self.state.peers_signature() != self._peers_signature:
                    self._reconcile_peers(announce=True)
                self._publish_limit_hits()
                self._end_silent_peers()
                if time.monotonic() - last_stats >= STATS_WRITE_INTERVAL:
                    last_stats = time.monotonic()
                    activity = self._activity()
                    if activity == last_activity:
                        continue  # nothing moved: the stats file says it already
                    last_activity = activity
                    # fsync and the file lock may block: keep them off the packet loop.
                    await asyncio.to_thread(self.state.write_stats, self._collect_stats())
                    if self._tunnel is not None:
                        await asyncio.to_thread(self._tunnel.trim_memory)
            except Exception:  # a bad edit of the state files must not stop the gateway
                log.exception("state poll failed")

    def _end_silent_peers(self) -> None:
        """A peer that sent nothing, not even a handshake, for `silent_peer_after` has left
        (ours keep their sessions up with a keepalive every 25 s, a handshake every 2 min): its
        flows end now, not when it is removed, and give their descriptors back."""
        if self._tunnel is None:
            return
        for key, info in self._tunnel.peers.items():
            record = self._by_key.get(key)
            quiet = info.quiet_for
            if record is None or quiet is None or quiet < self.settings.silent_peer_after:
                self._silenced.discard(key)  # heard from again (or never yet)
                continue
            if key in self._silenced or not self.flows.count(record.public_key):
                continue  # ended already: the engine's reports close its flows meanwhile
            self._silenced.add(key)
            silent = round(quiet)
            ended = self.flows.end_peer(
                record.public_key, Refusal.PEER_SILENT.says(f"nothing received for {silent} s")
            )
            self._tunnel.end_peer_flows(key, CloseReason.PEER_GONE)
            self.bus.publish(PeerSilent(silent_seconds=silent, flows_ended=ended, **_who(record)))

    def _activity(self) -> tuple[int, ...]:
        """What changes whenever a peer's stats can: the peer set, datagrams in and out."""
        if self._tunnel is None:
            return self._peers_signature
        engine = self._tunnel.engine_stats()
        return (*self._peers_signature, engine["rx_datagrams"], engine["tx_datagrams"])

    @property
    def _half_open_limit(self) -> int:
        return min(self.settings.max_half_open_per_peer, self.budget.engine_per_peer)

    def _publish_limit_hits(self) -> None:
        if self._tunnel is None:
            return
        limits = {  # as the engine applies them (the budget may lower the settings)
            "conns": ("tcp_conns_per_peer", self.budget.engine_per_peer),
            "half_open": ("tcp_half_open_per_peer", self._half_open_limit),
        }
        for public_key, which, refused in self._tunnel.limit_hits():
            record = self._by_key.get(public_key)
            limit, value = limits[which]
            self.bus.publish(
                LimitHit(
                    peer=record.name if record else "?",
                    peer_public_key=record.public_key if record else "",
                    limit=limit,
                    value=value,
                    refused=refused,
                )
            )

    def _collect_stats(self) -> dict[str, PeerRuntime]:
        stats = dict(self._baseline)
        infos = self._tunnel.peers if self._tunnel is not None else {}
        for record in self._records.values():
            stats[record.public_key] = self._peer_runtime(record, infos)
        return stats

    # -- flows -----------------------------------------------------------------------------

    def peer_name(self, public_key: bytes) -> str:
        record = self._by_key.get(public_key)
        return record.name if record else "?"

    def publish(self, event: Event) -> None:
        self.bus.publish(event)

    def _on_tcp(self, conn: TcpConn) -> None:
        """A SYN: decided, then refused, or handed to its route's service (the relay's C
        splices need no task of ours)."""
        verdict = self.decisions.decide(
            Question(Moment.FLOW, conn.peer_public_key, "tcp", conn.dst_ip, conn.dst_port)
        )
        flow = self.flows.tcp(conn, route=verdict.route)
        if verdict.refusal is not None:
            flow.refuse(verdict.refusal)
            return
        # Every route but DNS and the CA page (answered here) takes a host socket: the relay's,
        # TLS's upstream, a VIP's real address. Counted before any is made, refused past the
        # peer's share.
        if verdict.route not in (Route.DNS, Route.PAGE):
            why = self.flows.hold_descriptor(flow)
            if why is not None:
                flow.refuse(why)
                self._relieve(conn.peer_public_key)
                return
        service = self.services.get(verdict.route)
        if service is None:
            flow.open()
            carry(flow, (conn.dst_ip, conn.dst_port))
        else:
            self.flows.serve(flow, service.handle_tcp(flow))

    def _relieve(self, peer_key: bytes) -> None:
        """A peer at its descriptor share: the connections its zero window holds open end (RST,
        "resource pressure": RFC 6429), at most once per PRESSURE_INTERVAL, so that what it
        still reads can go on.  After this decision, not inside it (the engine is mid-batch)."""
        now = time.monotonic()
        if now - self._relieved.get(peer_key, -PRESSURE_INTERVAL) < PRESSURE_INTERVAL:
            return
        self._relieved[peer_key] = now
        tunnel = self._tunnel
        if tunnel is not None:
            asyncio.get_running_loop().call_soon(
                tunnel.end_peer_flows, peer_key, CloseReason.PRESSURE
            )

    def _on_fast_relay(self, opened: FastOpen, peer_public_key: bytes) -> SpliceDone:
        return self.flows.fast_relayed(opened, peer_public_key, route=Route.RELAY)

    def _on_udp(self, dgram: UdpDatagram) -> None:
        # Each datagram goes to its route's handler by the routing table alone; the decision
        # point is asked per flow, on its first datagram (the UDP relays), or per DNS query.
        service = self.services.get(self.router.decide("udp", dgram.dst_ip, dgram.dst_port))
        if service is not None:
            service.handle_udp(dgram)
        else:
            self._udp_relay.handle(dgram)

    def _on_tunnel_event(self, ev: TunnelEvent) -> None:
        if isinstance(ev, LoadChanged):
            self.bus.publish(UnderLoad(active=ev.active))
            return
        record = self._by_key.get(ev.public_key)
        if record is None:
            return
        who = _who(record)
        match ev:
            case HandshakeDone():
                endpoint = _endpoint(ev.endpoint) or ""
                self.bus.publish(PeerHandshake(endpoint=endpoint, initiator=ev.initiator, **who))
            case EndpointChanged():
                self.bus.publish(PeerEndpointChanged(endpoint=_endpoint(ev.endpoint) or "", **who))
            case HandshakeFailed():
                self.bus.publish(PeerHandshakeFailed(**who))
            case KeysExpired():
                pass  # the next handshake says the peer is back; nothing to tell until then


def _who(record: PeerRecord) -> dict[str, str]:
    """Who a peer event is about."""
    return {"name": record.name, "public_key": record.public_key, "ip": record.ip}
