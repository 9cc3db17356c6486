"""The descriptor budget (issue 13, item 2): the soft limit raised at start, divided into a
reserve, upstream DNS and the peers' part, each peer refused past its share with the reason in
the flow's closing event, and the engine's fast relay leaving SYNs past the share to Python.

The two-peer proof with real wireguard-go clients under a 256-descriptor limit is
tests/interop/test_descriptors.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.helpers import until
from tests.unit.test_relay import (
    LOOPBACK_OK,
    OTHER_KEY,
    PEER_KEY,
    FakeDatagram,
    FakeTcpConn,
    Recorder,
    peer_name,
    udp_echo,
)
from tests.unit.test_splice import fast_peer, listener  # noqa: F401 (a fixture)
from tests.unit.test_wgstack import PEER_ID
from tests.unit.test_wgstack_flows import Client
from unclaw_tui.budget import (
    MAX_DESCRIPTORS,
    DescriptorBudget,
    DescriptorLedger,
)
from unclaw_tui.config import Settings
from unclaw_tui.decision import DecisionPoint
from unclaw_tui.engine import Refusal, _ffi
from unclaw_tui.engine._ffi import Engine
from unclaw_tui.events import Event, TcpClosed, TcpOpened, UdpFlowClosed
from unclaw_tui.flow import FlowRegistry
from unclaw_tui.router import Router
from unclaw_tui.services.relay import UdpRelay
from unclaw_tui.services.upstream import UpstreamClient

REPO_ROOT = Path(__file__).resolve().parents[2]


def small_budget(per_peer: int, peers: int = 100) -> DescriptorBudget:
    return DescriptorBudget(
        limit=peers + 80, reserve=64, dns=16, peers=peers, per_peer=per_peer, engine_per_peer=0
    )


# --- the plan ------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [128, 256, 1024, 4096, 65536, 524288, MAX_DESCRIPTORS])
def test_the_plan_divides_the_whole_limit(limit: int) -> None:
    b = DescriptorBudget.plan(limit, max_conns_per_peer=4096, max_flows_per_peer=256)
    assert b.reserve + b.dns + b.peers == limit
    assert b.reserve >= 64 and b.dns >= 4
    # Four peers at their full share fit in the peers' part: the reserve and DNS stay whole.
    assert b.per_peer >= 1 and 4 * b.per_peer <= b.peers
    assert b.per_peer <= 4096 + 256
    # The engine's backstop sits a little above the share, never above the setting.
    assert b.per_peer < b.engine_per_peer <= 4096 or b.engine_per_peer == 4096


def test_the_plan_at_the_common_limits() -> None:
    plan = DescriptorBudget.plan
    b = plan(256, max_conns_per_peer=4096, max_flows_per_peer=256)
    assert (b.reserve, b.dns, b.peers, b.per_peer, b.engine_per_peer) == (64, 24, 168, 42, 50)
    b = plan(1024, max_conns_per_peer=4096, max_flows_per_peer=256)
    assert (b.reserve, b.dns, b.peers, b.per_peer, b.engine_per_peer) == (128, 112, 784, 196, 220)
    # A large limit leaves the configured per-peer limits as they were.
    b = plan(524288, max_conns_per_peer=4096, max_flows_per_peer=256)
    assert (b.per_peer, b.engine_per_peer) == (4352, 4096)
    # A smaller setting is kept.
    b = plan(1024, max_conns_per_peer=10, max_flows_per_peer=256)
    assert b.engine_per_peer == 10


def test_the_ledger_refuses_past_a_peers_share_and_past_the_peers_part() -> None:
    ledger = DescriptorLedger(small_budget(per_peer=2, peers=3))
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    assert ledger.take(a) is None and ledger.take(a) is None
    assert ledger.take(a) == Refusal.DESCRIPTORS.says("2 of 2 in use")
    assert ledger.take(a) == "over the peer's descriptor share: 2 of 2 in use"
    assert ledger.take(b) is None  # another peer is not refused for the first one's
    assert ledger.take(c) == Refusal.PRESSURE.says("the peers' 3 descriptors are all in use")
    assert (ledger.held(a), ledger.total, ledger.refused) == (2, 3, 3)
    ledger.give(a)
    assert ledger.take(c) is None
    assert ledger.take(a, force=True) is None  # the engine took it already: counted anyway
    assert (ledger.held(a), ledger.total) == (2, 4)


# --- the limit, raised at start --------------------------------------------------------------


def test_raise_descriptor_limit_raises_the_soft_limit_to_the_hard_one() -> None:
    code = (
        "import resource; from unclaw_tui.budget import raise_descriptor_limit as r; "
        "print(r(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT, preexec_fn=_nofile(256, 4096),
    ).stdout.split()  # fmt: skip
    assert out == ["4096", "4096", "4096"]
    out = subprocess.run(  # a cap below the hard limit
        [sys.executable, "-c", code.replace("r()", "r(1000)")],
        capture_output=True, text=True, check=True, cwd=REPO_ROOT, preexec_fn=_nofile(256, 4096),
    ).stdout.split()  # fmt: skip
    assert out == ["1000", "1000", "4096"]


def _nofile(soft: int, hard: int):  # type: ignore[no-untyped-def]
    _soft, current_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if current_hard != resource.RLIM_INFINITY and current_hard < hard and os.geteuid() != 0:
        why = f"the hard descriptor limit here is {current_hard}, below {hard}, and we are not root"
        if os.environ.get("CI") == "true":
            pytest.fail(why)  # CI runs as root: a missing privilege fails there, never skips
        pytest.skip(why)  # not CI: a developer without root; CI fails above
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_gateway_raises_its_soft_limit_at_start_and_says_its_budget(tmp_path: Path) -> None:
    """Started with soft 256 < hard 4096: running, it may hold 4096, and the startup event
    says how they are divided."""
    state_dir = tmp_path / "state"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "unclaw_tui", "--state-dir", str(state_dir), "--no-ui", "--json",
         "--listen-port", str(port), "--endpoint", "gw.example"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, preexec_fn=_nofile(256, 4096),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["type"] == "gateway_started", started
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert line.split()[3:5] == ["4096", "4096"], line
        planned = DescriptorBudget.plan(4096, max_conns_per_peer=4096, max_flows_per_peer=256)
        assert started["descriptors"] == planned.to_dict()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


# --- the engine's fast relay leaves SYNs past the share to Python ----------------------------


def test_fast_relay_hands_syns_past_the_bound_to_the_owner(
    engine: Engine,
    client: Client,
    listener: socket.socket,  # noqa: F811 (the fixture)
) -> None:
    engine.fast_relay_allow(PEER_ID, listener.getsockname(), None, 10.0)
    engine.fast_relay_bound(2, 0)
    for sport in (40000, 40001, 40002, 40003):
        client.send(fast_peer(listener, sport).syn())
    assert len(engine.fast_relay_opened()) == 2  # the peer's first two open connections
    events = engine.tcp_events()
    assert [e[0] for e in events] == [_ffi.TCP_EV_SYN] * 2  # the owner decides the rest
    # The engine-wide bound the same way: one more open connection than allowed.
    engine.fast_relay_bound(0, 4)
    client.send(fast_peer(listener, 40004).syn())
    assert engine.fast_relay_opened() == []
    assert [e[0] for e in engine.tcp_events()] == [_ffi.TCP_EV_SYN]
    engine.fast_relay_bound(0, 0)  # no bound: relayed again
    client.send(fast_peer(listener, 40005).syn())
    assert len(engine.fast_relay_opened()) == 1


# --- UDP flows count against the share -----------------------------------------------------


def udp_relay(rec: Recorder, budget: DescriptorBudget, **kw: object) -> UdpRelay:
    registry = FlowRegistry(rec, peer_name, budget=budget)
    return UdpRelay(registry, DecisionPoint(Router(), LOOPBACK_OK), **kw)  # type: ignore[arg-type]


async def test_udp_flow_past_the_share_replaces_the_peers_oldest_or_is_refused() -> None:
    inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    rec = Recorder()
    async with udp_echo() as (dst, _server):
        relay = udp_relay(rec, small_budget(per_peer=2))
        ledger = relay._registry.descriptors
        for port in (1, 2):
            relay.handle(FakeDatagram(inbox, b"x", dst, src_port=port))
            await asyncio.wait_for(inbox.get(), 5)
        assert ledger.held(PEER_KEY) == 2
        # A third flow: the peer's least recently active one gives its socket up.
        relay.handle(FakeDatagram(inbox, b"x", dst, src_port=3))
        await asyncio.wait_for(inbox.get(), 5)
        (replaced,) = rec.of(UdpFlowClosed)
        assert replaced.error == Refusal.DESCRIPTORS.says("2 of 2 in use")
        assert replaced.src_port == 1 and relay.open_flows(PEER_KEY) == 2
        # With its share held by TCP instead, a new flow has nothing to replace: refused.
        ledger.take(PEER_KEY, force=True)
        other = UdpRelay(relay._registry, DecisionPoint(Router(), LOOPBACK_OK))
        dgram = FakeDatagram(inbox, b"x", dst, src_port=4)
        other.handle(dgram)
        assert dgram.unreachables == [True]  # administratively prohibited
        refused = rec.of(UdpFlowClosed)[-1]
        assert refused.src_port == 4 and refused.error == Refusal.DESCRIPTORS.says("3 of 2 in use")
        # Another peer's flow is not refused for it.
        other.handle(FakeDatagram(inbox, b"x", dst, src_port=5, peer_public_key=OTHER_KEY))
        assert await asyncio.wait_for(inbox.get(), 5) == (5, b"echo:x")
        relay.close()
        other.close()
    assert ledger.total == 1  # what the test took by hand; every flow gave its socket back


# --- TCP at the gateway: every route with a host socket ---------------------------------------


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    w.close()


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[object]:
    from unclaw_tui.gateway import Gateway

    settings = Settings(state_dir=tmp_path / "state", endpoint="gw.example")
    settings.allow.append(__import__("ipaddress").ip_network("127.0.0.0/8"))
    gw = Gateway(settings)
    gw.flows.descriptors.budget = small_budget(per_peer=2)
    yield gw


async def test_tcp_past_the_share_is_refused_with_the_reason_and_another_peer_connects(
    gateway: object,
) -> None:
    from unclaw_tui.gateway import Gateway

    gw: Gateway = gateway  # type: ignore[assignment]
    events: list[Event] = []
    gw.bus.publish = events.append  # type: ignore[method-assign]
    gw.flows.publish = events.append
    conns: list[FakeTcpConn] = []
    async with echo_server() as dst:

        async def connect(key: bytes, conn_id: int) -> FakeTcpConn:
            ours, theirs = socket.socketpair()
            streams = await asyncio.open_connection(sock=ours)
            conn = FakeTcpConn(dst, streams, conn_id=conn_id)
            conn.peer_public_key = key
            conn._theirs = theirs  # type: ignore[attr-defined]
            conns.append(conn)
            gw._on_tcp(conn)  # type: ignore[arg-type]
            return conn

        first, second = await connect(PEER_KEY, 1), await connect(PEER_KEY, 2)
        await until(lambda: first.accepted and second.accepted, "two connections relayed")
        third = await connect(PEER_KEY, 3)
        assert third.rejected  # RST at once: no socket was made for it
        closed = [e for e in events if isinstance(e, TcpClosed)]
        assert [(e.conn_id, e.error) for e in closed] == [
            (3, Refusal.DESCRIPTORS.says("2 of 2 in use"))
        ]
        laptop = await connect(OTHER_KEY, 4)
        await until(lambda: laptop.accepted, "the other peer's connection relayed")
        assert gw.flows.descriptors.held(PEER_KEY) == 2
        await gw.flows.close()
        assert gw.flows.descriptors.total == 0  # every socket given back with its flow
    assert sum(isinstance(e, TcpOpened) for e in events) == 4
    for conn in conns:
        conn._theirs.close()  # type: ignore[attr-defined]


# --- upstream DNS sockets stay within their part ---------------------------------------------


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_upstream_dns_holds_at_most_its_sockets_at_once() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never answers
    silent.bind(("127.0.0.1", 0))
    try:
        client = UpstreamClient([silent.getsockname()], timeout=0.6)
        client.limit_sockets(3)
        before = open_descriptors()
        peak = 0
        lookups = asyncio.gather(*(client.lookup(f"n{i}.example", 1) for i in range(20)))
        deadline = time.monotonic() + 5
        while not lookups.done() and time.monotonic() < deadline:
            peak = max(peak, open_descriptors() - before)
            await asyncio.sleep(0.005)  # sampling, not waiting for a condition
        answers = await lookups
        assert peak <= 3, peak
        assert client.sockets_peak == 3
        assert all(a.response is None for a in answers)  # SERVFAIL within the time bound
        assert open_descriptors() == before
    finally:
        silent.close()


def test_the_startup_line_shows_the_budget() -> None:
    from unclaw_tui.events import GatewayStarted
    from unclaw_tui.headless import format_json, format_plain

    budget = DescriptorBudget.plan(256, max_conns_per_peer=4096, max_flows_per_peer=256)
    event = GatewayStarted(
        listen_port=51820, public_key="k", endpoint="gw.example:51820", address="10.77.0.1/24",
        state_dir="/s", descriptors=budget.to_dict(),
    )  # fmt: skip
    assert format_plain(event).endswith(
        " descriptors=limit:256,reserve:64,dns:24,peers:168,per_peer:42,engine_per_peer:50"
    )
    assert json.loads(format_json(event))["descriptors"]["per_peer"] == 42
