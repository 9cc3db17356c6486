"""The engine's fast relay against a real wireguard-go client: once Python has sent a connection
to a destination to the relay, the next ones to it are relayed by the engine alone, and they are
reported exactly as Python-decided ones; a refused destination is still refused at once, and a
change of the egress rules takes the approvals away.

client ns (wireguard-go, curl) -> gateway ns (the gateway, in this test's loop, so that its
engine counters and egress policy can be reached) -> internet ns (test servers at 198.18.0.2).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.interop.harness import HOST_ADDR, FlowsSetup, thread_in_namespace
from unclaw_tui import config
from unclaw_tui.events import Event, Subscription, TcpClosed, TcpOpened
from unclaw_tui.gateway import Gateway

pytestmark = pytest.mark.interop

HTTP_PORT = 8080
CLOSED_PORT = 9  # nothing listens there on the test host
REQUESTS = 12


async def flow_events(
    events: Subscription, seen: list[Event], closed: int, timeout: float = 10.0
) -> list[Event]:
    """Every event so far, once `closed` TcpClosed have come (bounded by timeout)."""
    deadline = time.monotonic() + timeout
    while sum(isinstance(e, TcpClosed) for e in seen) < closed:
        if time.monotonic() > deadline:
            raise AssertionError(f"{closed} tcp_closed expected, got: {seen[-5:]}")
        await asyncio.sleep(0.05)
        seen += events.take(10_000)
    return seen


def without_volatile(ev: TcpOpened | TcpClosed) -> dict[str, Any]:
    """The event's fields but those that differ between any two connections."""
    fields = ev.to_dict()
    for name in ("conn_id", "src_port", "duration", "ts"):
        fields.pop(name, None)
    return fields


@pytest.mark.parametrize("engine_thread", [True, False], ids=["engine-thread", "event-loop"])
async def test_repeat_connections_are_relayed_by_the_engine_and_reported_alike(
    flows_setup: FlowsSetup, engine_thread: bool
) -> None:
    s = flows_setup
    s.start_host("http", HTTP_PORT)
    peer_config = s.add_peer("phone")
    with thread_in_namespace(s.gateway_ns.name):
        settings = config.Settings(
            state_dir=s.state_dir,
            listen_port=s.port,
            endpoint=f"{s.gateway_addr}:{s.port}",
            engine_thread=engine_thread,
        )
        gateway = Gateway(settings)
        events = gateway.subscribe()
        await gateway.start()
        try:
            s.client(peer_config)
            tunnel = gateway.tunnel

            # The first connection is decided in Python, the others only reported.
            result = await asyncio.to_thread(
                s.run_client, "many", HOST_ADDR, str(HTTP_PORT), "--count", str(REQUESTS),
                "--bytes", "3000", "--one-at-a-time", "--timeout", "30", timeout=60,
            )  # fmt: skip
            assert result["ok"] == REQUESTS, result
            seen = await flow_events(events, [], REQUESTS)
            assert tunnel.engine_stats()["fast_relayed"] == REQUESTS - 1
            opened = [e for e in seen if isinstance(e, TcpOpened)]
            closed = [e for e in seen if isinstance(e, TcpClosed)]
            assert len(opened) == len(closed) == REQUESTS
            assert len({e.conn_id for e in opened}) == REQUESTS
            assert {e.conn_id for e in opened} == {e.conn_id for e in closed}
            # Python's report of the first is the engine's of the others, field by field.
            first_opened, first_closed = without_volatile(opened[0]), without_volatile(closed[0])
            assert first_opened["peer"] == "phone" and first_opened["route"] == "relay"
            assert first_closed["error"] is None and first_closed["bytes_down"] > 3000
            for ev in opened[1:]:
                assert without_volatile(ev) == first_opened
            for ev in closed[1:]:
                assert without_volatile(ev) == first_closed
                assert 0 < ev.duration < 5

            # A refused destination: every attempt gets its RST at once, the engine's too.
            for _ in range(3):
                t0 = time.monotonic()
                result = await asyncio.to_thread(
                    s.run_client, "connect", HOST_ADDR, str(CLOSED_PORT), "--timeout", "5"
                )
                assert result["result"] == "refused", result
                assert time.monotonic() - t0 < 5.0
            seen = await flow_events(events, seen, REQUESTS + 3)
            refused = [e for e in seen if isinstance(e, TcpClosed) and e.dst_port == CLOSED_PORT]
            assert [e.error for e in refused] == ["connection refused"] * 3
            assert tunnel.engine_stats()["fast_relayed"] == REQUESTS - 1 + 2

            # The rules change (this host now has the test host's address): the approvals go,
            # and the very next connection is decided, and refused, by the policy.
            gateway.policy.refresh_host_addresses([HOST_ADDR])
            result = await asyncio.to_thread(
                s.run_client, "connect", HOST_ADDR, str(HTTP_PORT), "--timeout", "5"
            )
            assert result["result"] == "refused", result
            seen = await flow_events(events, seen, REQUESTS + 4)
            assert seen[-1].error == "refused by egress policy: host address"  # type: ignore[attr-defined]
            assert tunnel.engine_stats()["fast_relayed"] == REQUESTS - 1 + 2
        finally:
            await gateway.stop()
