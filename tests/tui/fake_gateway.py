"""A FakeGateway implementing GatewayProtocol with deterministic data, for TUI tests and demos.

Keys are derived from names (not real key pairs); times come from a fixed, settable clock.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import replace

from tests.helpers import FakeClock
from unclaw_tui import events as ev
from unclaw_tui.bus import EventBus, Subscription
from unclaw_tui.gateway import GatewaySnapshot, PeerSnapshot
from unclaw_tui.policy import (
    Lifetime,
    Rule,
    builtin_rules,
    domain_scope,
    make_rule,
    parse_duration,
)
from unclaw_tui.policy.rules import rule_to_doc
from unclaw_tui.policy.views import PromptView, RuleView
from unclaw_tui.services.requests import RequestLog, RequestRecord, keep_headers
from unclaw_tui.services.websocket import WebSocketSummary
from unclaw_tui.widgets.model import PeersModel

# 2026-01-01 12:00:00 UTC: every rendered time derives from this in tests.
FIXED_NOW = 1_767_268_800.0
GATEWAY_KEY = base64.b64encode(hashlib.sha256(b"gateway").digest()).decode()
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


def fake_key(label: str) -> str:
    return base64.b64encode(hashlib.sha256(label.encode()).digest()).decode()


class FakeGateway:
    """Records every command in `calls`; publishes the events a real gateway would."""

    def __init__(self, clock: FakeClock | None = None, *, backlog: int = 10_000) -> None:
        """`backlog`: the size of the console's subscription (small, to make it drop)."""
        self.clock = clock or FakeClock(FIXED_NOW)
        self.bus = EventBus()
        self.backlog = backlog
        self.peers: dict[str, PeerSnapshot] = {}
        self.calls: list[tuple[str, ...]] = []
        self.started = False
        self.stopped = False
        self.open_flows = 0
        self.started_at = self.clock() - 3723.0  # up 01:02:03
        self._network = ipaddress.IPv4Network("10.77.0.0/16")
        self._next_host = 2
        self.request_log = RequestLog()  # what requests() answers; see demo_requests
        self._rules: dict[str, RuleView] = {r.id: RuleView(r) for r in builtin_rules()}
        self._prompts: dict[str, PromptView] = {}
        self._next_rule = 1
        self._next_prompt = 1
        self.prompt_timeout = 30.0

    # -- lifecycle (the real Gateway has these too) --------------------------------------

    async def start(self) -> None:
        self.calls.append(("start",))
        self.started = True

    async def stop(self) -> None:
        self.calls.append(("stop",))
        self.stopped = True

    # -- GatewayProtocol ---------------------------------------------------------------------

    def snapshot(self) -> GatewaySnapshot:
        return GatewaySnapshot(
            listen_port=51820,
            public_key=GATEWAY_KEY,
            endpoint="203.0.113.10:51820",
            address="10.77.0.1/24",
            started_at=self.started_at,
            peers=tuple(self.peers.values()),
            open_flows=self.open_flows,
            prompts_open=len(self._prompts),
        )

    def subscribe(self) -> Subscription:
        return self.bus.subscribe(self.backlog)

    def add_peer(self, name: str, ip: str | None = None) -> PeerSnapshot:
        self.calls.append(("add_peer", name))
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"invalid peer name {name!r}: use letters, digits, '.', '_' or '-'")
        if name in self.peers:
            raise ValueError(f"a peer named {name!r} exists already")
        if ip is None:
            ip = str(self._network[self._next_host])
            self._next_host += 1
        peer = PeerSnapshot(
            name=name,
            public_key=fake_key(name),
            ip=ip,
            created=self.clock(),
            endpoint=None,
            last_handshake=None,
            rx_bytes=0,
            tx_bytes=0,
            rx_packets=0,
            tx_packets=0,
        )
        self.peers[name] = peer
        self.bus.publish(
            ev.PeerAdded(ts=self.clock(), name=name, public_key=peer.public_key, ip=ip)
        )
        return peer

    def remove_peer(self, name: str) -> None:
        self.calls.append(("remove_peer", name))
        peer = self.peers.pop(name)  # KeyError if unknown, as the protocol says
        self.bus.publish(
            ev.PeerRemoved(ts=self.clock(), name=name, public_key=peer.public_key, ip=peer.ip)
        )

    def client_config(self, name: str) -> str:
        self.calls.append(("client_config", name))
        peer = self.peers[name]
        return (
            "[Interface]\n"
            f"PrivateKey = {fake_key('private ' + name)}\n"
            f"Address = {peer.ip}/32\n"
            "DNS = 10.77.0.1\n"
            "MTU = 1420\n"
            "\n"
            "[Peer]\n"
            f"PublicKey = {GATEWAY_KEY}\n"
            "AllowedIPs = 0.0.0.0/0, ::/0\n"
            "Endpoint = 203.0.113.10:51820\n"
            "PersistentKeepalive = 25\n"
        )

    def requests(self, limit: int | None = None, peer: str | None = None) -> list[RequestRecord]:
        return self.request_log.recent(limit, peer)

    def reveal(self, request_id: int, where: str, index: int) -> str | None:
        self.calls.append(("reveal", str(request_id), where, str(index)))
        record = self.request_log.get(request_id)
        if record is None:
            raise KeyError(f"request {request_id} is no longer kept")
        return record.reveal(where, index)

    # -- policy (GatewayProtocol) -----------------------------------------------------------

    def set_peer_policy(
        self, name: str, policy: str | None = None, fallback: str | None = None
    ) -> PeerSnapshot:
        self.calls.append(("set_peer_policy", name, str(policy), str(fallback)))
        peer = self.peers[name]  # KeyError if unknown
        if policy not in (None, "allow", "deny", "ask"):
            raise ValueError(f"invalid policy {policy!r}: expected allow, deny or ask")
        if fallback not in (None, "allow", "deny"):
            raise ValueError(f"invalid fallback {fallback!r}: expected allow or deny")
        self.peers[name] = replace(
            peer, policy=policy or peer.policy, fallback=fallback or peer.fallback
        )
        return self.peers[name]

    def rules(self) -> list[RuleView]:
        return sorted(self._rules.values(), key=lambda v: not v.rule.builtin)

    def add_rule(self, rule: Rule, by: str = "console") -> RuleView:
        self.calls.append(("add_rule", rule.id, by))
        if rule.id in self._rules:
            raise ValueError(f"a rule with id {rule.id!r} exists already")
        view = self._rules[rule.id] = RuleView(rule)
        self.bus.publish(ev.RuleAdded(ts=self.clock(), rule=rule_doc(rule), by=by))
        return view

    def remove_rule(self, rule_id: str, by: str = "console") -> Rule:
        self.calls.append(("remove_rule", rule_id, by))
        view = self._rules[rule_id]  # KeyError if unknown
        if view.rule.builtin:
            raise ValueError(f"rule {rule_id} is built in (a flag): change the flag")
        del self._rules[rule_id]
        self.bus.publish(ev.RuleRemoved(ts=self.clock(), rule=rule_doc(view.rule), by=by))
        return view.rule

    def prompts(self) -> list[PromptView]:
        return sorted(self._prompts.values(), key=lambda p: (p.opened, p.id))

    def answer_prompt(
        self,
        prompt_id: str,
        access: str,
        duration: str = "always",
        scope: str = "host",
        by: str = "console",
    ) -> str | None:
        self.calls.append(("answer_prompt", prompt_id, access, duration, scope, by))
        prompt = self._prompts[prompt_id]  # KeyError: answered or timed out already
        if access not in ("allow", "deny"):
            raise ValueError(f"invalid access {access!r}: expected allow or deny")
        if scope not in ("port", "host", "domain"):
            raise ValueError(f"invalid scope {scope!r}: expected port, host or domain")
        if scope == "domain" and prompt.hostname is None:
            raise ValueError("a prompt for an IP address has no domain: use port or host")
        lifetime = parse_duration(duration)
        del self._prompts[prompt_id]
        made: str | None = None
        if lifetime.lifetime is not Lifetime.ONCE:
            target = prompt.hostname or prompt.dst_ip
            # The domain scope: the glob and the registrable name, two rules.
            targets = domain_scope(target) if scope == "domain" else (target,)
            for what in sorted(targets, reverse=True):  # *.example.com first
                rule = make_rule(
                    access,
                    what,
                    now=self.clock(),
                    who=prompt.peer,
                    ports=str(prompt.dst_port) if scope == "port" else None,
                    proto=prompt.proto if scope == "port" else "any",
                    duration=lifetime,
                    note=f"prompt {prompt_id}",
                    rule_id=self._new_rule_id(),
                )
                self.add_rule(rule, by=by)
                made = made or rule.id
        self.bus.publish(
            ev.PromptAnswered(
                ts=self.clock(),
                id=prompt_id,
                peer=prompt.peer,
                access=access,
                duration=duration,
                scope=scope,
                rule=made,
                by=by,
                flows=prompt.waiting,
            )
        )
        return made

    def _new_rule_id(self) -> str:
        while f"r{self._next_rule}" in self._rules:
            self._next_rule += 1
        return f"r{self._next_rule}"

    # -- test helpers ------------------------------------------------------------------------

    def open_prompt(
        self,
        peer: str,
        hostname: str | None,
        dst_ip: str,
        dst_port: int,
        proto: str = "tcp",
        route: str = "tls",
        waiting: int = 1,
        publish: bool = True,
    ) -> PromptView:
        """A held flow of `peer` meets no rule: a prompt opens (as PromptBook.ask); without
        `publish` its event is lost (as when a console's subscription drops it)."""
        prompt_id = f"p{self._next_prompt}"
        self._next_prompt += 1
        now = self.clock()
        view = self._prompts[prompt_id] = PromptView(
            id=prompt_id,
            peer=peer,
            peer_public_key=self.peers[peer].public_key,
            hostname=hostname,
            dst_ip=dst_ip,
            dst_port=dst_port,
            proto=proto,
            route=route,
            opened=now,
            deadline=now + self.prompt_timeout,
            waiting=waiting,
        )
        if not publish:
            return view
        self.bus.publish(
            ev.PromptOpened(
                ts=now,
                id=prompt_id,
                peer=peer,
                peer_public_key=view.peer_public_key,
                hostname=hostname,
                dst_ip=dst_ip,
                dst_port=dst_port,
                proto=proto,
                route=route,
                timeout=self.prompt_timeout,
            )
        )
        return view

    def time_out_prompt(self, prompt_id: str) -> None:
        prompt = self._prompts.pop(prompt_id)
        fallback = self.peers[prompt.peer].fallback
        self.bus.publish(
            ev.PromptTimedOut(
                ts=self.clock(), id=prompt_id, peer=prompt.peer, fallback=fallback, flows=1
            )
        )

    def put_rule(self, rule: Rule, hits: int = 0, last_hit: float | None = None) -> None:
        """A rule in force from before (no event), with its hits."""
        self._rules[rule.id] = RuleView(rule, hits, last_hit)

    def set_peer(self, name: str, **changes: object) -> None:
        self.peers[name] = replace(self.peers[name], **changes)  # type: ignore[arg-type]

    def publish(self, event: ev.Event) -> None:
        self.bus.publish(event)


def rule_doc(rule: Rule) -> dict[str, object]:
    """The rule as events carry it (the file's form; once and restart say so)."""
    doc: dict[str, object] = rule_to_doc(rule)
    if rule.lifetime in (Lifetime.ONCE, Lifetime.RESTART):
        doc["until"] = rule.lifetime.value
    return doc


def demo_gateway(clock: FakeClock | None = None) -> FakeGateway:
    """Four peers in different states: fresh, busy, stale, never seen."""
    gw = FakeGateway(clock)
    now = gw.clock()
    for name in ("phone", "laptop", "vm-build", "tablet"):
        gw.add_peer(name)
    gw.set_peer(
        "phone",
        endpoint="198.51.100.7:41641",
        last_handshake=now - 12,
        rx_bytes=1_234_567,
        tx_bytes=45_678_901,
        open_connections=3,
    )
    gw.set_peer(
        "laptop",
        endpoint="[2001:db8::5]:51820",
        last_handshake=now - 95,
        rx_bytes=987_654_321,
        tx_bytes=12_345_678_901,
        open_connections=2,
    )
    gw.set_peer(
        "vm-build",
        endpoint="192.0.2.44:51820",
        last_handshake=now - 3 * 3600,
        rx_bytes=4_096,
        tx_bytes=8_192,
    )
    gw.set_peer("phone", policy="ask")
    gw.set_peer("vm-build", policy="deny", fallback="deny")
    gw.open_flows = 4
    demo_rules(gw)
    gw.calls.clear()
    return gw


def demo_rules(gw: FakeGateway) -> None:
    """A built-in rule from a flag and three of the operator's, with hits."""
    now = gw.clock()
    gw.put_rule(builtin_rules(passthrough=["pinned.example.org"])[0])
    gw.put_rule(
        make_rule("deny", "tracker.example", now=now - 86400, note="ads", rule_id="r1"),
        hits=4,
        last_hit=now - 12,
    )
    gw.put_rule(
        make_rule(
            "allow",
            "*.example.com",
            now=now - 600,
            who="phone",
            ports="443",
            proto="tcp",
            duration=parse_duration("1h"),
            note="prompt p1",
            rule_id="r2",
        ),
        hits=12,
        last_hit=now - 28,
    )
    gw.put_rule(
        make_rule(
            "allow",
            "git.internal",
            now=now - 300,
            who="laptop",
            ports="22",
            proto="tcp",
            duration=parse_duration("restart"),
            rule_id="r3",
        ),
        hits=1,
        last_hit=now - 18,
    )


def demo_events(gw: FakeGateway) -> list[ev.Event]:
    """Flows, DNS queries, TLS hosts and HTTP requests of the demo peers, at fixed times."""
    now = gw.clock()
    phone, laptop = gw.peers["phone"], gw.peers["laptop"]

    def who(peer: PeerSnapshot) -> dict[str, str]:
        return {"peer": peer.name, "peer_public_key": peer.public_key, "peer_ip": peer.ip}

    out: list[ev.Event] = [
        ev.DnsQuery(
            ts=now - 30,
            peer="phone",
            peer_ip=phone.ip,
            qname="api.example.com.",
            qtype="A",
            answers=["10.78.0.5"],
            upstream_ms=None,
        ),
        ev.DnsQuery(
            ts=now - 29,
            peer="phone",
            peer_ip=phone.ip,
            qname="cdn.example.net.",
            qtype="AAAA",
            answers=[],
            rcode="NOERROR",
            upstream_ms=21.4,
        ),
        ev.DnsQuery(
            ts=now - 20,
            peer="laptop",
            peer_ip=laptop.ip,
            qname="nope.invalid.",
            qtype="A",
            answers=[],
            rcode="NXDOMAIN",
            upstream_ms=8.0,
        ),
        ev.DnsQuery(
            ts=now - 5,
            peer="laptop",
            peer_ip=laptop.ip,
            qname="api.example.com.",
            qtype="A",
            answers=["10.78.0.5"],
            cached=True,
        ),
        ev.TcpOpened(
            ts=now - 28,
            conn_id=1,
            **who(phone),
            dst_ip="10.78.0.5",
            dst_port=443,
            hostname="api.example.com",
            route="tls",
            rule="r2",
        ),
        ev.TlsHost(ts=now - 28, peer="phone", sni="api.example.com", alpn="h2"),
        ev.HttpRequest(
            ts=now - 27,
            peer="phone",
            method="GET",
            host="api.example.com",
            path="/v1/items",
            status=200,
            bytes=5120,
            ms=84.0,
        ),
        ev.TcpOpened(
            ts=now - 25,
            conn_id=2,
            **who(phone),
            dst_ip="93.184.216.34",
            dst_port=80,
            route="relay",
        ),
        ev.TcpClosed(
            ts=now - 10,
            conn_id=2,
            **who(phone),
            dst_ip="93.184.216.34",
            dst_port=80,
            route="relay",
            bytes_up=420,
            bytes_down=90_112,
            duration=15.0,
        ),
        ev.UdpFlowOpened(
            ts=now - 20,
            conn_id=3,
            **who(laptop),
            dst_ip="10.77.0.1",
            dst_port=53,
            route="dns",
        ),
        ev.TcpOpened(
            ts=now - 18,
            conn_id=4,
            **who(laptop),
            dst_ip="10.78.0.9",
            dst_port=22,
            hostname="git.internal",
            route="vip",
            rule="r3",
        ),
        ev.TcpOpened(
            ts=now - 15,
            conn_id=5,
            **who(laptop),
            dst_ip="203.0.113.99",
            dst_port=443,
            hostname="pinned.example.org",
            route="tls",
        ),
        ev.TlsHost(
            ts=now - 15,
            peer="laptop",
            sni="pinned.example.org",
            mode="passthrough",
        ),
        ev.TlsHost(
            ts=now - 12,
            peer="laptop",
            sni="tracker.example",
            mode="rejected",
            ok=False,
            error="denied by policy",
        ),
        ev.TcpClosed(
            ts=now - 12,
            conn_id=6,
            **who(laptop),
            dst_ip="198.18.0.1",
            dst_port=443,
            hostname="tracker.example",
            route="tls",
            duration=0.2,
            error="denied by policy",
            verdict="deny",
            rule="r1",
        ),
    ]
    return sorted(out, key=lambda e: e.ts)


# Bytes per second of the demo peers over the last 16 s, so rates and sparklines have shape.
RATE_PATTERN = (3, 5, 8, 13, 9, 6, 4, 7, 12, 15, 11, 8, 5, 9, 14, 10)
RATE_SCALE = {"phone": 20_000, "laptop": 150_000}


def seed_rates(model: PeersModel, gw: FakeGateway) -> None:
    """Feed the model one snapshot a second for the last 16 s, ending where `gw` is now."""
    now = gw.clock()
    final = gw.snapshot()
    steps = len(RATE_PATTERN)
    for i in range(steps):
        t = now - (steps - i)
        # Bytes still to come after time t: the pattern's increments from index i on.
        peers = []
        for p in final.peers:
            to_come = sum(RATE_PATTERN[i:]) * RATE_SCALE.get(p.name, 0)
            peers.append(
                replace(
                    p,
                    rx_bytes=p.rx_bytes - to_come // 4,
                    tx_bytes=p.tx_bytes - to_come + to_come // 4,
                )
            )
        model.update(replace(final, peers=tuple(peers)), t)


def demo_requests(gw: FakeGateway) -> list[RequestRecord]:
    """Requests of the demo peers at fixed times, one of each kind: HTTP/1.1 with an
    Authorization and cookies (masked; `reveal` gives them back), an HTTP/2 page, a failed
    gRPC call, a WebSocket, a request without a response. Added to `gw.request_log`."""
    now = gw.clock()
    phone, laptop = gw.peers["phone"], gw.peers["laptop"]

    def make(
        peer: PeerSnapshot,
        ago: float,
        protocol: str,
        method: str,
        path: str,
        req: list[tuple[str, str]],
        res: list[tuple[str, str]],
        **fields: object,
    ) -> RequestRecord:
        r = RequestRecord(
            protocol=protocol,
            method=method,
            scheme="https",
            authority=str(fields.pop("authority", "api.example.com")),
            path=path,
            peer=peer.name,
            peer_public_key=peer.public_key,
            started_at=now - ago,
            **fields,
        )  # type: ignore[arg-type]
        r.request_headers, _ = keep_headers(req, r.secrets, "request")
        r.response_headers, _ = keep_headers(res, r.secrets, "response")
        gw.request_log.add(r)
        return r

    out = [
        make(
            phone,
            40,
            "http/1.1",
            "GET",
            "/v1/me?fields=name",
            [
                ("host", "api.example.com"),
                ("authorization", "Bearer eyJhbGciOi.demo.token"),
                ("cookie", "sid=1f2e3d; theme=dark"),
                ("accept", "application/json"),
            ],
            [("content-type", "application/json"), ("set-cookie", "sid=9a8b7c; Path=/; Secure")],
            conn_id=11,
            status=200,
            response_bytes=512,
            sent_ms=0.4,
            first_byte_ms=38.2,
            done_ms=39.0,
        ),
        make(
            laptop,
            30,
            "h2",
            "GET",
            "/",
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", "www.example.org"),
                (":path", "/"),
                ("user-agent", "curl/8.5.0"),
            ],
            [(":status", "200"), ("content-type", "text/html")],
            authority="www.example.org",
            conn_id=12,
            stream_id=1,
            status=200,
            response_bytes=48_213,
            sent_ms=0.1,
            first_byte_ms=61.5,
            done_ms=140.2,
        ),
        make(
            laptop,
            20,
            "h2",
            "POST",
            "/shop.Cart/Add",
            [
                (":method", "POST"),
                (":path", "/shop.Cart/Add"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
            [(":status", "200"), ("content-type", "application/grpc")],
            authority="grpc.example.net",
            conn_id=13,
            stream_id=3,
            status=200,
            request_bytes=21,
            response_bytes=0,
            grpc_status=5,
            grpc_message="no such item",
            sent_ms=0.2,
            first_byte_ms=9.9,
            done_ms=10.1,
        ),
        make(
            phone,
            15,
            "ws",
            "GET",
            "/live",
            [
                ("host", "chat.example.com"),
                ("upgrade", "websocket"),
                ("connection", "Upgrade"),
                ("sec-websocket-version", "13"),
            ],
            [("upgrade", "websocket"), ("connection", "Upgrade")],
            authority="chat.example.com",
            conn_id=14,
            status=101,
            first_byte_ms=22.0,
            done_ms=22.0,
        ),
        make(
            phone,
            5,
            "http/1.1",
            "POST",
            "/upload",
            [("host", "api.example.com")],
            [],
            conn_id=15,
            request_bytes=1_000_000,
            error="no response",
            done_ms=5000.0,
        ),
    ]
    out[2].response_trailers = (("grpc-status", "5"), ("grpc-message", "no such item"))
    out[3].websocket = WebSocketSummary(
        messages_up=12,
        messages_down=30,
        bytes_up=1_024,
        bytes_down=20_480,
        close_code=1000,
        close_reason="bye",
        closed_by="peer",
        duration_ms=14_000.0,
    )
    return out
