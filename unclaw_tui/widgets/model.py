"""What the console knows, without Textual: rows per pane, fed by snapshots and events.

Each pane's rows live in a `RowStore` that remembers which keys changed since the view last
looked, so a table can be brought up to date in place, in time proportional to the changes
(and a paused view can catch up later). Time is always passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from unclaw_tui import events as ev
from unclaw_tui.gateway import GatewaySnapshot
from unclaw_tui.policy.views import PromptView

R = TypeVar("R")

# A peer without a handshake for this long has no usable session (REJECT_AFTER_TIME).
STALE_AFTER_S = 180.0


class RowStore(Generic[R]):
    """Rows by key in insertion order, plus the set of keys changed since `take_changes()`."""

    def __init__(self) -> None:
        self._rows: dict[str, R] = {}
        self._changed: dict[str, None] = {}  # an ordered set

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def get(self, key: str) -> R | None:
        return self._rows.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def items(self) -> Iterator[tuple[str, R]]:
        return iter(self._rows.items())

    def put(self, key: str, row: R) -> None:
        self._rows[key] = row
        self._changed[key] = None

    def touch(self, key: str) -> None:
        """Mark a row changed after mutating it in place."""
        if key in self._rows:
            self._changed[key] = None

    def remove(self, key: str) -> None:
        if self._rows.pop(key, None) is not None:
            self._changed[key] = None

    def trim(self, max_rows: int) -> None:
        """Drop the oldest rows beyond `max_rows`."""
        while len(self._rows) > max_rows:
            self.remove(next(iter(self._rows)))

    def take_changes(self) -> list[str]:
        """Keys added, changed or removed since the last call, in first-change order."""
        keys = list(self._changed)
        self._changed.clear()
        return keys


# -- peers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerRow:
    name: str
    public_key: str
    ip: str
    endpoint: str | None
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    open_connections: int
    rate: float  # bytes/s, both directions
    history: tuple[float, ...]  # recent rates, oldest first
    policy: str = "allow"  # the peer's default: allow / deny / ask
    fallback: str = "deny"  # ask's answer when no one answers in time


class RateSampler:
    """Bytes/s from successive byte totals, sampled at most once per `SAMPLE_EVERY_S`."""

    SAMPLE_EVERY_S = 1.0

    def __init__(self, maxlen: int) -> None:
        self.history: deque[float] = deque(maxlen=maxlen)
        self._last: tuple[float, int] | None = None

    def sample(self, total: int, now: float) -> None:
        if self._last is None:
            self._last = (now, total)
        elif now - self._last[0] >= self.SAMPLE_EVERY_S:
            then, before = self._last
            self.history.append(max(0.0, (total - before) / (now - then)))
            self._last = (now, total)


class PeersModel:
    """Peer rows from successive snapshots, with their recent rates and the gateway's."""

    HISTORY = 16
    TOTAL_HISTORY = 120

    def __init__(self) -> None:
        self.store: RowStore[PeerRow] = RowStore()
        self._rates: dict[str, RateSampler] = {}
        self._total_rate = RateSampler(self.TOTAL_HISTORY)
        self.total_history = self._total_rate.history
        self.rx_total = 0
        self.tx_total = 0

    def update(self, snapshot: GatewaySnapshot, now: float) -> None:
        seen: set[str] = set()
        for peer in snapshot.peers:
            key = peer.public_key
            seen.add(key)
            if (rate := self._rates.get(key)) is None:
                rate = self._rates[key] = RateSampler(self.HISTORY)
            rate.sample(peer.rx_bytes + peer.tx_bytes, now)
            history = rate.history
            row = PeerRow(
                name=peer.name,
                public_key=peer.public_key,
                ip=peer.ip,
                endpoint=peer.endpoint,
                last_handshake=peer.last_handshake,
                rx_bytes=peer.rx_bytes,
                tx_bytes=peer.tx_bytes,
                open_connections=peer.open_connections,
                rate=history[-1] if history else 0.0,
                history=tuple(history),
                policy=peer.policy,
                fallback=peer.fallback,
            )
            if self.store.get(key) != row:
                self.store.put(key, row)
        for key in [k for k in self.store if k not in seen]:
            self.store.remove(key)
            self._rates.pop(key, None)
        self.rx_total = sum(p.rx_bytes for p in snapshot.peers)
        self.tx_total = sum(p.tx_bytes for p in snapshot.peers)
        self._total_rate.sample(self.rx_total + self.tx_total, now)

    def online(self, now: float) -> int:
        return sum(
            1
            for _, row in self.store.items()
            if row.last_handshake is not None and now - row.last_handshake < STALE_AFTER_S
        )


# -- connections -----------------------------------------------------------------------------


@dataclass(slots=True)
class ConnectionRow:
    proto: str  # "TCP" / "UDP"
    peer: str
    peer_public_key: str
    dst: str  # "ip:port"
    hostname: str | None
    route: str
    opened_at: float
    dst_ip: str = ""
    dst_port: int = 0
    closed_at: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None
    verdict: str = "allow"  # the policy's answer: allow / deny / ask (held, undecided)
    rule: str = "default"  # the rule that gave it, or "default" (the peer's policy)


OpenedEvent = ev.TcpOpened | ev.UdpFlowOpened
ClosedEvent = ev.TcpClosed | ev.UdpFlowClosed


def _dst(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class ConnectionsModel:
    """Open flows, and closed ones for `closed_ttl` seconds; at most `max_rows` rows."""

    def __init__(self, max_rows: int = 10_000, closed_ttl: float = 60.0) -> None:
        self.store: RowStore[ConnectionRow] = RowStore()
        self.max_rows = max_rows
        self.closed_ttl = closed_ttl
        self._closed_order: deque[tuple[float, str]] = deque()

    @staticmethod
    def key_of(event: OpenedEvent | ClosedEvent) -> str:
        # TCP and UDP ids are separate spaces in the engine.
        proto = "t" if isinstance(event, ev.TcpOpened | ev.TcpClosed) else "u"
        return f"{proto}{event.conn_id}"

    @staticmethod
    def _row(event: OpenedEvent | ClosedEvent, opened_at: float) -> ConnectionRow:
        return ConnectionRow(
            proto="TCP" if isinstance(event, ev.TcpOpened | ev.TcpClosed) else "UDP",
            peer=event.peer,
            peer_public_key=event.peer_public_key,
            dst=_dst(event.dst_ip, event.dst_port),
            hostname=event.hostname,
            route=event.route,
            opened_at=opened_at,
            dst_ip=event.dst_ip,
            dst_port=event.dst_port,
            verdict=event.verdict,
            rule=event.rule,
        )

    def opened(self, event: OpenedEvent) -> None:
        self.store.put(self.key_of(event), self._row(event, event.ts))
        self._bound()

    def closed(self, event: ClosedEvent) -> None:
        key = self.key_of(event)
        row = self.store.get(key)
        if row is None:  # the open event was dropped, or came before we subscribed
            row = self._row(event, event.ts - event.duration)
            self.store.put(key, row)
        row.closed_at = event.ts
        row.bytes_up = event.bytes_up
        row.bytes_down = event.bytes_down
        row.error = event.error
        row.hostname = row.hostname or event.hostname
        # A held flow opened as "ask"; its close says how the prompt was answered.
        row.verdict, row.rule = event.verdict, event.rule
        self.store.touch(key)
        self._closed_order.append((event.ts, key))
        self._bound()

    def live_bytes(self, flow_bytes: dict[int, tuple[int, int]]) -> None:
        """Live counters of open TCP connections (from a snapshot); closed rows keep the
        final counts their close event brought."""
        for conn_id, (up, down) in flow_bytes.items():
            key = f"t{conn_id}"
            row = self.store.get(key)
            if row is None or row.closed_at is not None:
                continue
            if (row.bytes_up, row.bytes_down) != (up, down):
                row.bytes_up, row.bytes_down = up, down
                self.store.touch(key)

    def prune(self, now: float) -> None:
        """Forget closed flows older than the TTL."""
        while self._closed_order and self._closed_order[0][0] + self.closed_ttl <= now:
            _, key = self._closed_order.popleft()
            row = self.store.get(key)
            if row is not None and row.closed_at is not None:
                self.store.remove(key)

    def _bound(self) -> None:
        while len(self.store) > self.max_rows and self._closed_order:  # closed flows go first
            _, key = self._closed_order.popleft()
            row = self.store.get(key)
            if row is not None and row.closed_at is not None:
                self.store.remove(key)
        self.store.trim(self.max_rows)


# -- DNS -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsRow:
    ts: float
    peer: str
    qname: str
    qtype: str
    answer: str
    rcode: str
    upstream_ms: float | None
    cached: bool


class DnsModel:
    def __init__(self, max_rows: int = 2_000) -> None:
        self.store: RowStore[DnsRow] = RowStore()
        self.max_rows = max_rows
        self._seq = 0

    def query(self, event: ev.DnsQuery) -> None:
        self._seq += 1
        answer = ", ".join(event.answers) if event.answers else (event.error or "-")
        self.store.put(
            f"q{self._seq}",
            DnsRow(
                ts=event.ts,
                peer=event.peer,
                qname=event.qname.rstrip("."),
                qtype=event.qtype,
                answer=answer,
                rcode=event.rcode,
                upstream_ms=event.upstream_ms,
                cached=event.cached,
            ),
        )
        self.store.trim(self.max_rows)


# -- TLS hosts -----------------------------------------------------------------------------------


@dataclass(slots=True)
class TlsHostRow:
    hostname: str
    peers: set[str] = field(default_factory=set)
    connections: int = 0
    mode: str = "intercepted"
    last_request: str | None = None
    errors: int = 0
    last_error: str | None = None
    last_seen: float = 0.0


class TlsHostsModel:
    def __init__(self, max_rows: int = 1_000) -> None:
        self.store: RowStore[TlsHostRow] = RowStore()
        self.max_rows = max_rows

    def _row(self, hostname: str, event: ev.TlsHost | ev.HttpRequest) -> TlsHostRow:
        """The host's row (created if new), marked changed and seen by the event's peer."""
        key = hostname.lower().rstrip(".")
        row = self.store.get(key)
        if row is None:
            row = TlsHostRow(hostname=key)
            self.store.put(key, row)
            self.store.trim(self.max_rows)
        row.last_seen = event.ts
        row.peers.add(event.peer)
        self.store.touch(key)
        return row

    def host(self, event: ev.TlsHost) -> None:
        row = self._row(event.sni, event)
        row.connections += 1
        row.mode = event.mode
        if not event.ok:
            row.errors += 1
            row.last_error = event.error

    def request(self, event: ev.HttpRequest) -> None:
        host = event.host.rsplit(":", 1)[0] if event.host.count(":") == 1 else event.host
        status = "-" if event.status is None else str(event.status)
        self._row(host, event).last_request = f"{event.method} {event.path} {status}"


# -- prompts -------------------------------------------------------------------------------------


class PromptsModel:
    """The open prompts, oldest first: kept from the prompt events, and replaced by the
    gateway's own list (`replace`) whenever the two might disagree (events dropped, a console
    started after a prompt opened).  `version` moves at every change."""

    def __init__(self) -> None:
        self._open: dict[str, PromptView] = {}
        self.version = 0
        self.opened_count = 0  # prompts seen to open, ever: "is there a new one?"
        # The last answer or timeout of each prompt closed lately, for the prompt screen to
        # say why the one it showed went away (bounded: only the newest are kept).
        self.closed: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self._open

    def queue(self) -> list[PromptView]:
        return sorted(self._open.values(), key=lambda p: (p.opened, p.id))

    def get(self, prompt_id: str) -> PromptView | None:
        return self._open.get(prompt_id)

    def opened(self, event: ev.PromptOpened) -> None:
        if event.id in self.closed:  # the gateway's list, read meanwhile, had it closed
            return
        self._open[event.id] = PromptView(
            id=event.id,
            peer=event.peer,
            peer_public_key=event.peer_public_key,
            hostname=event.hostname,
            dst_ip=event.dst_ip,
            dst_port=event.dst_port,
            proto=event.proto,
            route=event.route,
            opened=event.ts,
            deadline=event.ts + event.timeout,
        )
        self.version += 1
        self.opened_count += 1

    def close(self, prompt_id: str, why: str) -> None:
        self.closed[prompt_id] = why
        while len(self.closed) > 256:
            del self.closed[next(iter(self.closed))]
        if self._open.pop(prompt_id, None) is not None:
            self.version += 1

    def replace(self, views: list[PromptView]) -> None:
        fresh = {view.id: view for view in views}
        if fresh != self._open:
            self.opened_count += len(fresh.keys() - self._open.keys())
            self._open = fresh
            self.version += 1


class ConsoleModel:
    """All panes' rows; `apply()` takes any event and ignores what no pane shows."""

    def __init__(self, max_connections: int = 10_000, closed_ttl: float = 60.0) -> None:
        self.peers = PeersModel()
        self.connections = ConnectionsModel(max_connections, closed_ttl)
        self.dns = DnsModel()
        self.tls = TlsHostsModel()
        self.prompts = PromptsModel()
        self.rules_version = 0  # moves when a rule is added, removed or expires

    def apply(self, event: ev.Event) -> None:
        match event:
            case ev.TcpOpened() | ev.UdpFlowOpened():
                self.connections.opened(event)
            case ev.TcpClosed() | ev.UdpFlowClosed():
                self.connections.closed(event)
            case ev.DnsQuery():
                self.dns.query(event)
            case ev.TlsHost():
                self.tls.host(event)
            case ev.HttpRequest():
                self.tls.request(event)
            case ev.PromptOpened():
                self.prompts.opened(event)
            case ev.PromptAnswered():
                until = event.duration if event.rule is None else f"{event.duration}, {event.rule}"
                self.prompts.close(event.id, f"{event.access} ({until}) by {event.by}")
            case ev.PromptTimedOut():
                self.prompts.close(event.id, f"timed out: {event.fallback}")
            case ev.RuleAdded() | ev.RuleRemoved() | ev.RuleExpired() | ev.RulesRejected():
                self.rules_version += 1
