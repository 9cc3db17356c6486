"""The decision point and the flow lifecycle, sans-IO: what each moment decides, what the fast
relay's cache is told, and that a flow publishes its events exactly once."""

from __future__ import annotations

from typing import Any

from unclaw_tui.decision import DecisionPoint, Moment, Question
from unclaw_tui.engine import SpliceOutcome
from unclaw_tui.events import Event, TcpClosed, TcpOpened
from unclaw_tui.flow import FlowRegistry
from unclaw_tui.router import Route, Router
from unclaw_tui.services.egress import EgressPolicy

PEER = bytes(range(32))


class Cache:
    def __init__(self) -> None:
        self.allowed: list[tuple[bytes, tuple[str, int], float | None]] = []
        self.clears = 0

    def fast_relay_allow(
        self, peer_key: bytes, dst: tuple[str, int], ttl: float | None, connect_timeout: float
    ) -> None:
        self.allowed.append((peer_key, dst, ttl))

    def fast_relay_clear(self) -> None:
        self.clears += 1


def flow_question(dst: str, port: int, proto: Any = "tcp", **kw: Any) -> Question:
    return Question(Moment.FLOW, PEER, proto, dst, port, **kw)


def test_flow_verdicts_route_and_refuse_and_fill_the_cache_only_for_relayed_tcp() -> None:
    policy = EgressPolicy(host_addresses=[])
    decisions = DecisionPoint(Router([Route.TLS, Route.DNS, Route.VIP]), policy)
    cache = Cache()
    decisions.cache_in(cache)
    assert cache.clears == 0
    allowed = decisions.decide(flow_question("198.51.100.7", 8080))
    assert (allowed.route, allowed.refusal) == (Route.RELAY, None)
    assert cache.allowed == [(PEER, ("198.51.100.7", 8080), policy.verdicts_valid_for())]
    refused = decisions.decide(flow_question("127.0.0.1", 22))
    assert refused.refusal == "refused by egress policy: loopback" and not refused.allowed
    decisions.decide(flow_question("198.51.100.7", 53, "udp"))  # DNS: not cached
    decisions.decide(flow_question("198.51.100.7", 9999, "udp"))  # UDP: not cached
    decisions.decide(flow_question("198.51.100.7", 443))  # TLS: decided again at the hello
    assert decisions.decide(flow_question("10.78.0.5", 80)).route is Route.VIP
    assert len(cache.allowed) == 1
    policy.refresh_host_addresses(["192.0.2.1"])  # the rules behind verdicts changed
    assert cache.clears == 1


def test_resolved_addresses_are_judged_one_by_one() -> None:
    decisions = DecisionPoint(Router([Route.VIP]), EgressPolicy(host_addresses=[]))
    verdict = decisions.decide(
        flow_question("10.78.0.5", 80, addresses=("169.254.169.254", "198.51.100.7"))
    )
    assert verdict.allowed and verdict.addresses == ("198.51.100.7",)
    assert verdict.refused == (("169.254.169.254", "refused by egress policy: link-local"),)
    none = decisions.decide(flow_question("10.78.0.5", 80, addresses=("127.0.0.1",)))
    assert none.refusal == "refused by egress policy: loopback" and none.addresses == ()


def test_hello_and_query_are_asked_through_the_same_function() -> None:
    decisions = DecisionPoint(Router(), EgressPolicy(host_addresses=[]))
    hello = Question(Moment.HELLO, PEER, hostname="a.test", vip_hostname="b.test")
    assert decisions.decide(hello).route is Route.TLS and decisions.decide(hello).allowed
    query = Question(Moment.QUERY, PEER, "udp", hostname="a.test")
    assert decisions.decide(query).route is Route.DNS and decisions.decide(query).allowed


class Conn:
    conn_id, peer_public_key, peer_ip, src_port = 5, PEER, "10.77.0.2", 40000
    dst_ip, dst_port, can_splice = "198.51.100.7", 80, False
    rejected = False

    def reject(self) -> None:
        self.rejected = True


def test_a_flow_publishes_one_opened_and_one_closed_whatever_is_called() -> None:
    events: list[Event] = []
    flows = FlowRegistry(events.append, lambda key: "phone")
    flow = flows.tcp(Conn(), route="relay")  # type: ignore[arg-type]
    flow.open("h.test")
    flow.open("other.test")
    assert flows.total == 1 and flows.count(flow.peer_public_key) == 1
    flow.bytes_up, flow.bytes_down = 10, 20
    flows._pumped[flow.conn_id] = flow  # as Python's pump registers it
    assert flows.live_bytes() == {5: (10, 20)}
    flow.close("first")
    flow.close("second")
    assert [type(e) for e in events] == [TcpOpened, TcpClosed]
    closed: Any = events[1]
    assert (closed.hostname, closed.src_port, closed.error) == ("h.test", 40000, "first")
    assert flows.total == 0 and flows.live_bytes() == {}


def test_a_refused_flow_is_reset_and_reported_with_its_reason() -> None:
    events: list[Event] = []
    conn = Conn()
    flow = FlowRegistry(events.append, lambda key: "phone").tcp(conn, route="relay")  # type: ignore[arg-type]
    flow.refuse("refused by egress policy: loopback")
    assert conn.rejected
    assert [type(e) for e in events] == [TcpOpened, TcpClosed]
    assert events[1].error == "refused by egress policy: loopback"  # type: ignore[attr-defined]


def test_a_fast_relayed_flow_takes_the_engines_times_and_counters() -> None:
    from unclaw_tui.engine import FastOpen, SpliceResult

    events: list[Event] = []
    flows = FlowRegistry(events.append, lambda key: "phone")
    done = flows.fast_relayed(
        FastOpen(9, 0, ("10.77.0.2", 40001), ("198.51.100.7", 80), 100.0), PEER, route="relay"
    )
    assert [type(e) for e in events] == [TcpOpened] and flows.total == 1
    done(SpliceResult(9, SpliceOutcome.OK, 0, 0, 3, 4, 100.25))
    closed: Any = events[1]
    assert (closed.bytes_up, closed.bytes_down, closed.duration, closed.error) == (3, 4, 0.25, None)
    assert flows.total == 0
