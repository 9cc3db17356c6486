"""The data plane's own thread (_worker.c) under a real Tunnel over loopback UDP: Python hears
from it only for Python's work, C's timers run without Python, the engine lock serializes
Python's calls with the thread's batches, and stopping it hands the engine back."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from tests.packets import ping_packet
from tests.unit.test_tcp import RST, SYN, Seg
from unclaw_tui.engine import _ffi
from unclaw_tui.engine.flows import SpliceDone
from unclaw_tui.engine.noise import generate_private_key
from unclaw_tui.engine.tunnel import HandshakeDone, Tunnel, TunnelEvent


async def until(pred: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if pred():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


class Pair:
    """A gateway Tunnel with the worker and a client Tunnel without one, peered."""

    def __init__(self) -> None:
        self.gw_events: list[TunnelEvent] = []
        self.cl_events: list[TunnelEvent] = []
        self.gw = Tunnel(generate_private_key(), 0, ipaddress.IPv4Interface("10.77.0.1/24"),
                         listen_host="127.0.0.1", on_event=self.gw_events.append)  # fmt: skip
        self.cl = Tunnel(generate_private_key(), 0, ipaddress.IPv4Interface("10.77.0.2/24"),
                         listen_host="127.0.0.1", on_event=self.cl_events.append,
                         engine_thread=False)  # fmt: skip

    async def start(self, *, keepalive: int = 0, client_routes: str = "10.77.0.1/32") -> None:
        await self.gw.start()
        await self.cl.start()
        self.gw.add_peer(self.cl.public_key, allowed_ips=["10.77.0.2/32"],
                         persistent_keepalive=keepalive)  # fmt: skip
        self.cl.add_peer(self.gw.public_key, allowed_ips=[client_routes],
                         endpoint=("127.0.0.1", self.gw.listen_port))  # fmt: skip

    def echo_replies(self) -> int:
        return self.gw.engine_stats()["icmp_echo_replies"]

    async def ping(self, seq: int) -> None:
        before = self.echo_replies()
        self.cl.send_inner(ping_packet("10.77.0.2", "10.77.0.1", seq=seq))
        await until(lambda: self.echo_replies() > before, f"echo reply {seq}")

    def close(self) -> None:
        self.gw.close()
        self.cl.close()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def worker(tunnel: Tunnel) -> _ffi.Engine:
    return tunnel.driver.engine


async def test_worker_answers_pings_and_wakes_python_only_for_its_work(pair: Pair) -> None:
    await pair.start()
    assert worker(pair.gw).threaded and not worker(pair.cl).threaded
    await pair.ping(1)  # the handshake goes through Python: the worker must have said so
    assert any(isinstance(e, HandshakeDone) for e in pair.gw_events)
    stats = worker(pair.gw).worker_stats()
    assert stats["notifications"] >= 1
    for seq in range(2, 52):  # answered in C, nothing for Python
        await pair.ping(seq)
    after = worker(pair.gw).worker_stats()
    assert after["wakeups"] >= stats["wakeups"] + 50
    assert after["notifications"] - stats["notifications"] <= 2


async def test_engine_timers_run_on_the_worker(pair: Pair) -> None:
    await pair.start(keepalive=1)
    await pair.ping(1)
    received = pair.cl.peer_info(pair.gw.public_key).rx_packets
    driver = pair.gw.driver
    driver.rearm = lambda _deadline=None: None  # type: ignore[method-assign]  # no Python timer
    driver.cancel_timer()
    # Persistent keepalives every second come from C's timers alone.
    await until(
        lambda: pair.cl.peer_info(pair.gw.public_key).rx_packets >= received + 2,
        "keepalives",
        seconds=6,
    )


async def test_python_calls_interleave_with_the_worker_batches(pair: Pair) -> None:
    await pair.start()
    await pair.ping(1)
    stop = threading.Event()
    loop = asyncio.get_running_loop()

    async def hammer() -> int:
        calls = 0
        while not stop.is_set():
            for _ in range(50):  # each takes and gives back the engine lock
                assert pair.gw.peers
                pair.gw.drop_counts()
                calls += 2
            await asyncio.sleep(0)
        return calls

    task = loop.create_task(hammer())
    for seq in range(2, 202):
        pair.cl.send_inner(ping_packet("10.77.0.2", "10.77.0.1", seq=seq))
        if seq % 20 == 0:
            await asyncio.sleep(0.005)
    await until(lambda: pair.echo_replies() >= 201, "every echo reply")
    stop.set()
    assert await task > 100
    assert pair.gw.peer_info(pair.cl.public_key).rx_packets >= 201


async def test_close_stops_the_thread_and_the_engine_is_ours_again(pair: Pair) -> None:
    await pair.start()
    await pair.ping(1)
    engine = worker(pair.gw)
    fd = pair.gw.driver._notify_fd  # type: ignore[attr-defined]
    assert fd is not None
    threads = threading.active_count()  # the worker is a C thread: not counted here
    pair.gw.close()
    assert not engine.threaded
    with pytest.raises(OSError):
        os.fstat(fd)  # the eventfd is closed
    assert threading.active_count() == threads
    # Closing twice, and the client's own close, are harmless.
    pair.gw.close()


async def test_lock_is_reentrant_on_the_owner_thread(pair: Pair) -> None:
    await pair.start()
    engine = worker(pair.gw)
    with engine.locked():
        with engine.locked():  # nested: no deadlock
            assert engine.next_deadline() is None or engine.next_deadline() > 0
        engine.stats()  # a serialized call inside a held lock: no deadlock either


async def test_stopping_inside_the_lock_is_refused_not_a_deadlock(pair: Pair) -> None:
    await pair.start()
    engine = worker(pair.gw)
    with engine.locked(), pytest.raises(RuntimeError):
        engine.worker_stop()
    assert engine.threaded  # still running, and stoppable once the lock is given back
    engine.worker_stop()
    assert not engine.threaded


async def test_fast_relayed_connections_reach_python_in_batches(pair: Pair) -> None:
    """SYNs to an approved destination are spliced by the worker alone; Python hears of them
    in a few batched notifications, not one per connection, and each gets its report pair."""
    await pair.start(client_routes="0.0.0.0/0")  # the client sends everything to the gateway
    await pair.ping(1)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    opened: list[_ffi.FastOpen] = []
    ended: list[_ffi.SpliceResult] = []

    def on_fast_relay(meta: _ffi.FastOpen, public_key: bytes) -> SpliceDone:
        assert public_key == pair.cl.public_key
        opened.append(meta)
        return ended.append

    pair.gw.conns.on_fast_relay = on_fast_relay
    pair.gw.conns.fast_relay_allow(pair.cl.public_key, ("127.0.0.1", port), None, 5.0)
    before = worker(pair.gw).worker_stats()["notifications"]
    count = 40
    segment = functools.partial(Seg, seq=1000, ack=0, wnd=65535, dst_ip=0x7F000001, dport=port)
    for i in range(count):  # spread out: each could wake Python on its own
        pair.cl.send_inner(segment(flags=SYN, sport=41000 + i).build())
        await asyncio.sleep(0.001)
    await until(lambda: len(opened) == count, "every fast-relayed connection's report")
    for i in range(count):  # the peer gives up: each ends with a reset
        pair.cl.send_inner(segment(flags=RST, seq=1001, sport=41000 + i).build())
        await asyncio.sleep(0.001)
    await until(lambda: len(ended) == count, "every fast-relayed connection's end")
    notifications = worker(pair.gw).worker_stats()["notifications"] - before
    assert len(opened) == count and {m.src[1] for m in opened} == set(range(41000, 41040))
    assert {r.conn_id for r in ended} == {m.conn_id for m in opened}
    assert all(r.ended_at >= m.opened_at for r, m in zip(ended, opened, strict=True))
    print(f"\n{count} fast-relayed connections, {notifications} notifications")
    assert notifications < count // 4, notifications
    with contextlib.suppress(BlockingIOError):
        while True:
            listener.accept()[0].close()
    listener.close()
