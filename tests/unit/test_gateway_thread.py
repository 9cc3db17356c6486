"""ThreadedGateway: the real gateway on its own thread, driven from another loop."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from unclaw_tui import config
from unclaw_tui import events as ev
from unclaw_tui.gateway_thread import ThreadedGateway


async def next_event(sub: ev.Subscription, kind: type[ev.Event], timeout: float = 5) -> ev.Event:
    async def wait() -> ev.Event:
        async for event in sub:
            if isinstance(event, kind):
                return event
        raise AssertionError("subscription ended")

    return await asyncio.wait_for(wait(), timeout)


async def test_commands_snapshots_and_events_cross_threads(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = config.Settings(
        state_dir=tmp_path / "state", listen_port=port, endpoint=f"127.0.0.1:{port}"
    )
    gateway = ThreadedGateway(settings, snapshot_interval=0.05)
    sub = gateway.subscribe()
    await gateway.start()
    try:
        started = await next_event(sub, ev.GatewayStarted)
        assert isinstance(started, ev.GatewayStarted)
        assert gateway.gateway is not None
        # The engine lives on another thread, with its own loop.
        assert gateway._thread is not None and gateway._thread is not threading.current_thread()
        assert gateway._loop is not asyncio.get_running_loop()

        peer = gateway.add_peer("phone")
        assert peer.ip == "10.77.0.2"
        # The snapshot is refreshed by the command itself, not only by the timer.
        assert [p.name for p in gateway.snapshot().peers] == ["phone"]
        added = await next_event(sub, ev.PeerAdded)
        assert isinstance(added, ev.PeerAdded) and added.name == "phone"
        assert "PrivateKey = " in gateway.client_config("phone")

        with pytest.raises(ValueError):
            gateway.add_peer("phone")  # duplicate: the gateway thread's error reaches us
        with pytest.raises(KeyError):
            gateway.client_config("nobody")

        gateway.remove_peer("phone")
        assert gateway.snapshot().peers == ()
    finally:
        await gateway.stop()
    await next_event(sub, ev.GatewayStopped)
    assert gateway._thread is not None and not gateway._thread.is_alive()


async def test_a_start_failure_is_reported_to_the_caller(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    gateway = ThreadedGateway(config.Settings(state_dir=blocker, listen_port=0))
    with pytest.raises(Exception, match="state"):
        await gateway.start()
    await gateway.stop()


async def test_requests_and_reveal_from_the_console_thread(tmp_path: Path) -> None:
    """The console's Requests pane: the ring read from another thread, a masked header's
    value given back on request, KeyError once the request has left the ring."""
    from unclaw_tui.services.requests import RequestRecord, keep_headers

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = config.Settings(
        state_dir=tmp_path / "state", listen_port=port, endpoint=f"127.0.0.1:{port}"
    )
    gateway = ThreadedGateway(settings, snapshot_interval=0.05)
    assert gateway.requests() == []  # not started: nothing, no error
    await gateway.start()
    try:
        log = gateway.gateway.request_log
        log.max_records = 3
        for i in range(5):
            r = RequestRecord(protocol="h2", method="GET", scheme="https", authority="a.test",
                              path=f"/{i}", peer_public_key="k" if i % 2 else "other")  # fmt: skip
            r.request_headers, _ = keep_headers(
                [("authorization", f"Bearer token-{i}")], r.secrets, "request"
            )
            log.add(r)
        assert [r.path for r in gateway.requests()] == ["/2", "/3", "/4"]
        assert [r.id for r in gateway.requests(limit=1, peer="k")] == [4]
        assert gateway.requests()[0].request_headers == (("authorization", "Bearer •••"),)
        assert gateway.reveal(3, "request", 0) == "Bearer token-2"
        assert gateway.reveal(3, "response", 0) is None
        with pytest.raises(KeyError):
            gateway.reveal(1, "request", 0)  # gone from the ring
    finally:
        await gateway.stop()
