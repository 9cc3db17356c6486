"""The relay against real loopback servers, with fake tunnel flows that satisfy the flow API
contract (a FakeTcpConn's streams are one end of a loopback TCP connection whose other end plays
the peer's application)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unclaw_tui.config import DEFAULT_TCP_BUFFER
from unclaw_tui.decision import DecisionPoint, Moment, Question
from unclaw_tui.engine import _ffi, splice_error
from unclaw_tui.events import Event, TcpClosed, TcpOpened, UdpFlowClosed, UdpFlowOpened
from unclaw_tui.flow import FlowRegistry, carry
from unclaw_tui.pump import connect_host
from unclaw_tui.router import Router
from unclaw_tui.services.egress import EgressPolicy
from unclaw_tui.services.relay import UdpFlowTable, UdpRelay

PEER_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
LOOPBACK_OK = EgressPolicy(allow=["127.0.0.0/8"], host_addresses=[])


def peer_name(key: bytes) -> str:
    return {PEER_KEY: "phone", OTHER_KEY: "laptop"}[key]


# --- fakes -------------------------------------------------------------------------------------


class CountingReader:
    """A StreamReader that counts what the relay took from it (to see back-pressure)."""

    def __init__(self, inner: asyncio.StreamReader) -> None:
        self.inner = inner
        self.bytes_read = 0

    async def read(self, n: int = -1) -> bytes:
        data = await self.inner.read(n)
        self.bytes_read += len(data)
        return data

    def at_eof(self) -> bool:
        return self.inner.at_eof()


LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close sends RST


def send_rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    writer.transport.abort()


class FakeTcpConn:
    """TcpConn per the contract, over one end of a loopback connection."""

    can_splice = False  # Python\'s pump carries it

    def __init__(
        self,
        dst: tuple[str, int],
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        conn_id: int = 7,
    ) -> None:
        self.conn_id = conn_id
        self.peer_public_key = PEER_KEY
        self.peer_ip = "10.77.0.2"
        self.src_port = 40000
        self.dst_ip, self.dst_port = dst
        self.reader = CountingReader(streams[0])
        self.writer = streams[1]
        self.accepted = self.rejected = self.aborted = False

    def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert not (self.accepted or self.rejected), "accept after a decision"
        self.accepted = True
        return self.reader, self.writer  # type: ignore[return-value]

    def reject(self) -> None:
        assert not (self.accepted or self.rejected), "reject after a decision"
        self.rejected = True
        send_rst(self.writer)  # as the engine answers the SYN

    def abort(self) -> None:
        self.aborted = True
        send_rst(self.writer)


@dataclass
class Tunnel:
    """The peer's application end plus the fake conn the relay gets."""

    peer_reader: asyncio.StreamReader
    peer_writer: asyncio.StreamWriter
    conn: FakeTcpConn


_peer_writers: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def close_peer_ends() -> AsyncIterator[None]:
    yield
    while _peer_writers:
        _peer_writers.pop().close()
    await asyncio.sleep(0)  # let the transports finish closing


async def make_tunnel(dst: tuple[str, int], conn_id: int = 7) -> Tunnel:
    handed: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        handed.set_result((r, w))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    peer_reader, peer_writer = await asyncio.open_connection("127.0.0.1", port)
    streams = await handed
    server.close()
    _peer_writers.extend([peer_writer, streams[1]])
    return Tunnel(peer_reader, peer_writer, FakeTcpConn(dst, streams, conn_id))


@dataclass
class Recorder:
    events: list[Event] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


@contextlib.asynccontextmanager
async def tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    **kwargs: object,
) -> AsyncIterator[tuple[str, int]]:
    tasks: list[asyncio.Task[None]] = []

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            with contextlib.suppress(OSError):
                await handler(r, w)
        finally:
            w.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
    try:
        yield ("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()


def decide_and_carry(
    conn: Any, decisions: DecisionPoint, flows: FlowRegistry
) -> asyncio.Future[None]:
    """What the gateway does with a SYN the router sends to the relay."""
    question = Question(Moment.FLOW, conn.peer_public_key, "tcp", conn.dst_ip, conn.dst_port)
    verdict = decisions.decide(question)
    flow = flows.tcp(conn, route=verdict.route)
    if verdict.refusal is not None:
        flow.refuse(verdict.refusal)
    else:
        flow.open()
        carry(flow, (conn.dst_ip, conn.dst_port))
    return flow.ended()


async def relay_tcp(
    conn: Any,
    policy: EgressPolicy,
    rec: Callable[[Event], None],
    *,
    flows: FlowRegistry | None = None,
    connect_timeout: float = 10.0,
    buffer_size: int = DEFAULT_TCP_BUFFER,
) -> TcpClosed:
    """Relay one connection as the gateway does; its TcpClosed once it ended."""
    closed: list[TcpClosed] = []

    def publish(event: Event) -> None:
        rec(event)
        if isinstance(event, TcpClosed) and event.conn_id == conn.conn_id:
            closed.append(event)

    registry = FlowRegistry(
        publish, peer_name, buffer_size=buffer_size, connect_timeout=connect_timeout
    )
    if flows is not None:  # count in a shared registry too
        registry._opened, registry._closed = flows._opened, flows._closed  # type: ignore[method-assign]
    try:
        await decide_and_carry(conn, DecisionPoint(Router(), policy), registry)
    except asyncio.CancelledError:
        await registry.close()
        raise
    return closed[-1]


def start_relay(
    tunnel: Tunnel, rec: Recorder, policy: EgressPolicy = LOOPBACK_OK, **kwargs: Any
) -> asyncio.Task[TcpClosed]:
    return asyncio.create_task(relay_tcp(tunnel.conn, policy, rec, **kwargs))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- TCP ---------------------------------------------------------------------------------------


async def test_echo_round_trip_with_half_close_and_events() -> None:
    async with tcp_server(echo) as dst:
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        task = start_relay(tunnel, rec)
        tunnel.peer_writer.write(b"hello relay")
        assert await tunnel.peer_reader.readexactly(11) == b"hello relay"
        tunnel.peer_writer.write_eof()  # echo sees EOF, closes; its EOF comes back to us
        assert await asyncio.wait_for(tunnel.peer_reader.read(), 5) == b""
        closed = await asyncio.wait_for(task, 5)
    assert tunnel.conn.accepted and not tunnel.conn.aborted
    opened = rec.of(TcpOpened)
    assert len(opened) == 1 and rec.events[0] is opened[0] and rec.events[-1] is closed
    o = opened[0]
    assert (o.conn_id, o.peer, o.peer_ip, o.dst_ip, o.dst_port, o.route) == (
        7, "phone", "10.77.0.2", "127.0.0.1", dst[1], "relay",
    )  # fmt: skip
    assert o.peer_public_key == "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    assert (closed.bytes_up, closed.bytes_down, closed.error) == (11, 11, None)
    assert 0 < closed.duration < 5


async def test_refused_destination_rejects_at_once() -> None:
    tunnel = await make_tunnel(("127.0.0.1", closed_port()))
    rec = Recorder()
    started = time.monotonic()
    closed = await asyncio.wait_for(start_relay(tunnel, rec), 5)
    assert time.monotonic() - started < 1
    assert tunnel.conn.rejected and not tunnel.conn.accepted
    assert closed.error == "connection refused"
    assert (closed.bytes_up, closed.bytes_down) == (0, 0)
    assert [type(e) for e in rec.events] == [TcpOpened, TcpClosed]
    with pytest.raises(ConnectionResetError):  # the peer's app sees the RST
        await asyncio.wait_for(tunnel.peer_reader.read(1), 5)


async def test_egress_policy_refusal_never_connects() -> None:
    accepted = []

    async def record(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    async with tcp_server(record) as dst:
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        closed = await asyncio.wait_for(start_relay(tunnel, rec, EgressPolicy()), 5)
        await asyncio.sleep(0.05)
    assert tunnel.conn.rejected
    assert closed.error == "refused by egress policy: loopback"
    assert accepted == []
    assert [type(e) for e in rec.events] == [TcpOpened, TcpClosed]


async def test_connect_timeout_rejects() -> None:
    # A listener with a full accept queue drops SYNs: the connect hangs until our timeout.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    dst = ("127.0.0.1", listener.getsockname()[1])
    fillers = []
    try:
        for _ in range(16):
            try:
                fillers.append(await asyncio.wait_for(asyncio.open_connection(*dst), 0.2))
            except TimeoutError:
                break
        else:
            pytest.fail("accept queue never filled")
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        started = time.monotonic()
        closed = await asyncio.wait_for(start_relay(tunnel, rec, connect_timeout=0.3), 5)
        assert 0.25 < time.monotonic() - started < 2
        assert tunnel.conn.rejected
        assert closed.error == "connect timeout after 0.3 s"
    finally:
        for _r, w in fillers:
            w.close()
        listener.close()


async def test_half_close_peer_to_destination() -> None:
    """HTTP/1.0 style: the peer sends a request then EOF; the destination answers after EOF."""

    async def read_all_then_answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await r.read()  # until the peer's EOF arrives through the relay
        w.write(b"got %d bytes" % len(request))
        await w.drain()
        w.close()

    async with tcp_server(read_all_then_answer) as dst:
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        task = start_relay(tunnel, rec)
        tunnel.peer_writer.write(b"x" * 100_000)
        tunnel.peer_writer.write_eof()
        answer = await asyncio.wait_for(tunnel.peer_reader.read(), 5)
        closed = await asyncio.wait_for(task, 5)
    assert answer == b"got 100000 bytes"
    assert (closed.bytes_up, closed.bytes_down, closed.error) == (100_000, 16, None)


async def test_half_close_destination_to_peer() -> None:
    """The destination sends a greeting and shuts down its side, then still reads."""
    received = asyncio.get_running_loop().create_future()

    async def greet_then_listen(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"greeting")
        w.write_eof()
        received.set_result(await r.read())
        w.close()

    async with tcp_server(greet_then_listen) as dst:
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        task = start_relay(tunnel, rec)
        assert await asyncio.wait_for(tunnel.peer_reader.read(), 5) == b"greeting"  # then EOF
        tunnel.peer_writer.write(b"after your EOF")  # our direction is still open
        tunnel.peer_writer.write_eof()
        assert await asyncio.wait_for(received, 5) == b"after your EOF"
        closed = await asyncio.wait_for(task, 5)
    assert (closed.bytes_up, closed.bytes_down, closed.error) == (14, 8, None)


def pattern(seed: int, size: int, chunk: int = 65536) -> list[bytes]:
    """Deterministic pseudo-random chunks (blake2b in counter mode)."""
    out = []
    for i in range(0, size, chunk):
        n = min(chunk, size - i)
        block = b"".join(
            hashlib.blake2b(b"%d:%d:%d" % (seed, i, j)).digest() for j in range(0, n, 64)
        )
        out.append(block[:n])
    return out


async def send_chunks(w: asyncio.StreamWriter, chunks: list[bytes]) -> None:
    for c in chunks:
        w.write(c)
        await w.drain()
    w.write_eof()


async def sha256_of_stream(r: asyncio.StreamReader) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while data := await r.read(65536):
        h.update(data)
        n += len(data)
    return h.hexdigest(), n


async def test_large_transfer_both_ways_intact_with_bounded_memory() -> None:
    size = 24 * 1024 * 1024
    up_chunks, down_chunks = pattern(1, size), pattern(2, size)
    up_sha = hashlib.sha256(b"".join(up_chunks)).hexdigest()
    down_sha = hashlib.sha256(b"".join(down_chunks)).hexdigest()
    at_destination: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    async def bulk(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sender = asyncio.create_task(send_chunks(w, down_chunks))
        at_destination.set_result(await sha256_of_stream(r))
        await sender
        w.close()

    async with tcp_server(bulk) as dst:
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        tracemalloc.start()
        try:
            task = start_relay(tunnel, rec)
            sender = asyncio.create_task(send_chunks(tunnel.peer_writer, up_chunks))
            at_peer = await asyncio.wait_for(sha256_of_stream(tunnel.peer_reader), 60)
            await sender
            closed = await asyncio.wait_for(task, 10)
            _current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert at_peer == (down_sha, size)
    assert await at_destination == (up_sha, size)
    assert (closed.bytes_up, closed.bytes_down, closed.error) == (size, size, None)
    # 48 MiB moved; what was allocated at once stays a few buffers' worth (both test ends
    # included), not the transfer.
    assert peak < 8 * 1024 * 1024, peak


async def test_backpressure_destination_stops_reading() -> None:
    stalled = asyncio.Event()

    async def never_read(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        stalled.set()
        await asyncio.sleep(3600)

    # A small receive buffer at the destination so the stall is reached quickly.
    async with tcp_server(never_read, limit=65536) as dst:
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        task = start_relay(tunnel, rec, buffer_size=65536)
        chunk = b"z" * 65536
        sent = 0

        async def keep_sending() -> None:
            nonlocal sent
            while True:
                tunnel.peer_writer.write(chunk)
                await tunnel.peer_writer.drain()
                sent += len(chunk)

        sender = asyncio.create_task(keep_sending())
        await asyncio.wait_for(stalled.wait(), 5)
        # Wait until the relay's reads stop advancing.
        last = -1
        for _ in range(100):
            await asyncio.sleep(0.1)
            if tunnel.conn.reader.bytes_read == last:
                break
            last = tunnel.conn.reader.bytes_read
        else:
            pytest.fail("the relay kept reading from a peer whose destination stalled")
        await asyncio.sleep(0.5)
        read_from_peer = tunnel.conn.reader.bytes_read
        assert read_from_peer == last  # still stopped
        # Bounded by kernel socket buffers plus our own, not by what the peer offers.
        assert read_from_peer < 16 * 1024 * 1024
        assert not sender.done()  # the peer itself is now blocked in drain()
        sender.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        with pytest.raises(asyncio.CancelledError):
            await task
    closed = rec.events[-1]
    assert isinstance(closed, TcpClosed)
    assert closed.error == "cancelled"
    assert closed.bytes_up == read_from_peer and closed.bytes_up <= sent + len(chunk)
    assert tunnel.conn.aborted


async def test_destination_reset_aborts_the_peer() -> None:
    async def reset_after_hello(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(5)
        send_rst(w)

    async with tcp_server(reset_after_hello) as dst:
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        task = start_relay(tunnel, rec)
        tunnel.peer_writer.write(b"hello")
        closed = await asyncio.wait_for(task, 5)
    assert tunnel.conn.aborted
    assert closed.error is not None and closed.error.startswith("destination: ")
    assert "reset" in closed.error


async def test_peer_abort_aborts_the_destination() -> None:
    destination_saw: asyncio.Future[BaseException | bytes] = (
        asyncio.get_running_loop().create_future()
    )

    async def wait_for_end(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readexactly(5)
            destination_saw.set_result(await r.read())
        except OSError as exc:
            destination_saw.set_result(exc)

    async with tcp_server(wait_for_end) as dst:
        tunnel = await make_tunnel(dst)
        rec = Recorder()
        task = start_relay(tunnel, rec)
        tunnel.peer_writer.write(b"hello")
        await tunnel.peer_writer.drain()
        await asyncio.sleep(0.1)
        send_rst(tunnel.peer_writer)
        closed = await asyncio.wait_for(task, 5)
        outcome = await asyncio.wait_for(destination_saw, 5)
    assert closed.error is not None and closed.error.startswith("peer: ")
    assert isinstance(outcome, ConnectionResetError)  # an abort, not a clean EOF


async def test_engine_giving_up_before_accept_resets_the_destination() -> None:
    destination_saw: asyncio.Future[BaseException | bytes] = (
        asyncio.get_running_loop().create_future()
    )

    async def wait_for_end(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            destination_saw.set_result(await r.read())
        except OSError as exc:
            destination_saw.set_result(exc)

    async with tcp_server(wait_for_end) as dst:
        tunnel = await make_tunnel(dst)

        def gone() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            raise ConnectionResetError("SYN timed out")

        tunnel.conn.accept = gone  # type: ignore[method-assign]
        rec = Recorder()
        closed = await asyncio.wait_for(start_relay(tunnel, rec), 5)
        outcome = await asyncio.wait_for(destination_saw, 5)
    assert closed.error == "peer gone before accept: connection reset"
    assert isinstance(outcome, ConnectionResetError)
    assert [type(e) for e in rec.events] == [TcpOpened, TcpClosed]


async def test_open_flow_counts_per_peer() -> None:
    rec = Recorder()
    counts = FlowRegistry(rec, peer_name)
    decisions = DecisionPoint(Router(), LOOPBACK_OK)
    phone = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    async with tcp_server(echo) as dst:
        tunnels = [await make_tunnel(dst, conn_id=n) for n in range(3)]
        ended = [decide_and_carry(t.conn, decisions, counts) for t in tunnels]
        for t in tunnels:  # a round trip each: all three are open now
            t.peer_writer.write(b"ping")
            await t.peer_reader.readexactly(4)
        refused = await make_tunnel(("127.0.0.1", closed_port()), conn_id=3)
        await asyncio.wait_for(decide_and_carry(refused.conn, decisions, counts), 5)
        assert counts.count(phone) == 3 and counts.total == 3
        inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        relay = UdpRelay(counts, decisions)
        relay.handle(FakeDatagram(inbox, b"x", dst, peer_public_key=OTHER_KEY))
        assert counts.count(phone) == 3 and counts.total == 4
        for t in tunnels[:2]:
            t.peer_writer.write_eof()
        await asyncio.wait_for(asyncio.gather(*ended[:2]), 5)
        assert counts.count(phone) == 1
        relay.close()
        assert counts.total == 1
        tunnels[2].peer_writer.write_eof()
        await asyncio.wait_for(ended[2], 5)
    assert counts.count(phone) == 0 and counts.total == 0
    assert len(rec.of(TcpOpened)) == len(rec.of(TcpClosed)) == 4


async def test_connect_host_sets_nodelay_and_buffer_limit() -> None:
    async with tcp_server(echo) as dst:
        _r, w = await connect_host(*dst, buffer_size=100_000)
        sock = w.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert w.transport.get_write_buffer_limits()[1] == 100_000
        w.close()
        await w.wait_closed()


# --- UDP: the flow table -----------------------------------------------------------------------


def test_flow_table_bound_evicts_least_recently_active() -> None:
    table: UdpFlowTable[str, int] = UdpFlowTable(max_per_peer=2, idle_timeout=10)
    assert table.add(b"A", "a1", 1, now=0) == []
    assert table.add(b"A", "a2", 2, now=1) == []
    assert table.add(b"B", "b1", 3, now=1) == []
    table.touch("a1", now=2)  # a2 is now the least recently active of peer A
    assert table.add(b"A", "a3", 4, now=3) == [("a2", 2)]
    assert (table.count(b"A"), table.count(b"B"), len(table)) == (2, 1, 3)
    assert "a2" not in table and table.get("a1") == 1
    with pytest.raises(KeyError):
        table.add(b"A", "a1", 9, now=3)


def test_flow_table_expiry_and_deadline() -> None:
    table: UdpFlowTable[str, int] = UdpFlowTable(max_per_peer=10, idle_timeout=10)
    assert table.next_deadline() is None
    table.add(b"A", "a", 1, now=0)
    table.add(b"B", "b", 2, now=5)
    assert table.next_deadline() == 10
    assert table.expire(9.99) == []
    table.touch("a", now=8)
    assert table.next_deadline() == 15
    assert table.expire(15) == [("b", 2)]
    assert table.expire(18) == [("a", 1)]
    assert len(table) == 0 and table.count(b"A") == 0 and table.next_deadline() is None
    assert table.pop("a") is None


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "touch", "pop", "expire"]),
        st.sampled_from([b"A", b"B"]),
        st.integers(0, 5),  # flow number
        st.floats(0, 3),  # time step
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=OPS, bound=st.integers(1, 4))
def test_flow_table_matches_naive_model(
    ops: list[tuple[str, bytes, int, float]], bound: int
) -> None:
    idle = 4.0
    table: UdpFlowTable[tuple[bytes, int], int] = UdpFlowTable(
        max_per_peer=bound, idle_timeout=idle
    )
    model: dict[tuple[bytes, int], float] = {}  # key -> last active
    now = 0.0
    for op, peer, n, step in ops:
        now += step
        key = (peer, n)
        if op == "add" and key not in model:
            mine = sorted((k for k in model if k[0] == peer), key=lambda k: model[k])
            expected = [(k, k[1]) for k in mine[: max(0, len(mine) - bound + 1)]]
            for k, _ in expected:
                del model[k]
            model[key] = now
            assert table.add(peer, key, n, now) == expected
        elif op == "touch" and key in model:
            model[key] = now
            table.touch(key, now)
        elif op == "pop":
            assert table.pop(key) == (n if model.pop(key, None) is not None else None)
        elif op == "expire":
            gone = {k for k, last in model.items() if now - last >= idle}
            assert {k for k, _ in table.expire(now)} == gone
            for k in gone:
                del model[k]
        assert len(table) == len(model)
        deadline = min(model.values()) + idle if model else None
        assert table.next_deadline() == deadline


# --- UDP: the relay ----------------------------------------------------------------------------


class FakeDatagram:
    """UdpDatagram per the contract; replies land in the shared `inbox`."""

    def __init__(
        self,
        inbox: asyncio.Queue[tuple[int, bytes]],
        data: bytes,
        dst: tuple[str, int],
        src_port: int = 5353,
        peer_public_key: bytes = PEER_KEY,
    ) -> None:
        self.inbox = inbox
        self.data = data
        self.peer_public_key = peer_public_key
        self.peer_ip = "10.77.0.2"
        self.src_port = src_port
        self.dst_ip, self.dst_port = dst
        self.unreachables: list[bool] = []

    def reply(self, data: bytes) -> None:
        self.inbox.put_nowait((self.src_port, data))

    def unreachable(self, *, admin: bool = False) -> None:
        self.unreachables.append(admin)


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.sources: set[tuple[str, int]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sources.add(addr)
        self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def udp_echo() -> AsyncIterator[tuple[tuple[str, int], UdpEcho]]:
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
        UdpEcho, local_addr=("127.0.0.1", 0)
    )
    try:
        yield transport.get_extra_info("sockname")[:2], proto
    finally:
        transport.close()


def make_udp_relay(rec: Recorder, policy: EgressPolicy = LOOPBACK_OK, **kw: Any) -> UdpRelay:
    return UdpRelay(FlowRegistry(rec, peer_name), DecisionPoint(Router(), policy), **kw)


async def test_udp_round_trip_one_flow_per_source_port() -> None:
    inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    rec = Recorder()
    async with udp_echo() as (dst, server):
        relay = make_udp_relay(rec)
        relay.handle(FakeDatagram(inbox, b"one", dst))
        relay.handle(FakeDatagram(inbox, b"two", dst))  # queued while the socket is made
        replies = [await asyncio.wait_for(inbox.get(), 5) for _ in range(2)]
        assert replies == [(5353, b"echo:one"), (5353, b"echo:two")]
        relay.handle(FakeDatagram(inbox, b"three", dst, src_port=6000))
        assert await asyncio.wait_for(inbox.get(), 5) == (6000, b"echo:three")
        assert relay.open_flows(PEER_KEY) == 2
        assert len(server.sources) == 2  # one host socket per flow
        relay.close()
    opened, closed = rec.of(UdpFlowOpened), rec.of(UdpFlowClosed)
    assert len(opened) == 2 and len(closed) == 2
    assert opened[0].peer == "phone" and opened[0].dst_port == dst[1]
    assert opened[0].conn_id != opened[1].conn_id
    by_id = {e.conn_id: e for e in closed}
    first = by_id[opened[0].conn_id]
    assert (first.bytes_up, first.bytes_down, first.error) == (6, 16, None)
    assert relay.open_flows(PEER_KEY) == 0


async def test_udp_idle_timeout_closes_and_activity_keeps_open() -> None:
    inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    rec = Recorder()
    async with udp_echo() as (dst, _server):
        relay = make_udp_relay(rec, idle_timeout=0.3)
        relay.handle(FakeDatagram(inbox, b"busy", dst, src_port=1))
        relay.handle(FakeDatagram(inbox, b"quiet", dst, src_port=2))
        for _ in range(6):  # flow 1 stays active for 0.6 s, past the timeout
            await asyncio.sleep(0.1)
            relay.handle(FakeDatagram(inbox, b"busy", dst, src_port=1))
        closed = rec.of(UdpFlowClosed)
        assert [e.conn_id for e in closed] == [rec.of(UdpFlowOpened)[1].conn_id]
        assert closed[0].error is None and 0.25 < closed[0].duration < 0.6
        assert relay.open_flows(PEER_KEY) == 1
        await asyncio.sleep(0.5)
        assert len(rec.of(UdpFlowClosed)) == 2 and relay.open_flows(PEER_KEY) == 0
        # The same 5-tuple later is a new flow.
        relay.handle(FakeDatagram(inbox, b"again", dst, src_port=2))
        assert len(rec.of(UdpFlowOpened)) == 3
        relay.close()


async def test_udp_flows_per_peer_are_bounded() -> None:
    inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    rec = Recorder()
    async with udp_echo() as (dst, _server):
        relay = make_udp_relay(rec, max_flows_per_peer=3)
        for port in (1, 2, 3):
            relay.handle(FakeDatagram(inbox, b"x", dst, src_port=port))
            await asyncio.wait_for(inbox.get(), 5)
        relay.handle(FakeDatagram(inbox, b"x", dst, src_port=1))  # 2 is now least recent
        await asyncio.wait_for(inbox.get(), 5)
        relay.handle(FakeDatagram(inbox, b"x", dst, src_port=9, peer_public_key=OTHER_KEY))
        relay.handle(FakeDatagram(inbox, b"x", dst, src_port=4))
        assert relay.open_flows(PEER_KEY) == 3
        assert relay.open_flows(OTHER_KEY) == 1
        (evicted,) = rec.of(UdpFlowClosed)
        assert evicted.error == "closed: flow limit per peer reached"
        assert evicted.conn_id == rec.of(UdpFlowOpened)[1].conn_id  # source port 2
        relay.close()


async def test_udp_policy_refusal_is_unreachable_with_one_event_pair() -> None:
    inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    rec = Recorder()
    async with udp_echo() as (dst, server):
        relay = make_udp_relay(rec, EgressPolicy(host_addresses=[]))
        dgrams = [FakeDatagram(inbox, b"x", dst) for _ in range(3)]
        for d in dgrams:
            relay.handle(d)
        await asyncio.sleep(0.1)
        assert [d.unreachables for d in dgrams] == [[True]] * 3
        assert server.sources == set() and inbox.empty()
        assert relay.open_flows(PEER_KEY) == 0
        relay.close()
    assert [type(e) for e in rec.events] == [UdpFlowOpened, UdpFlowClosed]
    assert rec.events[1].error == "refused by egress policy: loopback"  # type: ignore[attr-defined]


async def test_udp_closed_port_passes_unreachable_on() -> None:
    inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    rec = Recorder()
    relay = make_udp_relay(rec)
    dgram = FakeDatagram(inbox, b"anyone?", ("127.0.0.1", closed_port()))
    relay.handle(dgram)
    for _ in range(50):
        await asyncio.sleep(0.02)
        if dgram.unreachables:
            break
    assert dgram.unreachables == [False]  # port unreachable, not "administratively prohibited"
    relay.close()


async def test_udp_close_ends_everything() -> None:
    inbox: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    rec = Recorder()
    async with udp_echo() as (dst, _server):
        relay = make_udp_relay(rec)
        relay.handle(FakeDatagram(inbox, b"a", dst, src_port=1))
        relay.handle(FakeDatagram(inbox, b"b", dst, src_port=2))  # closed before it is sent
        relay.close()
        await asyncio.sleep(0.1)
        assert len(rec.of(UdpFlowClosed)) == 2 and relay.open_flows(PEER_KEY) == 0
        late = FakeDatagram(inbox, b"late", dst)
        relay.handle(late)
        assert late.unreachables == [False]
        assert inbox.empty()


def test_ipv4_mapped_destination_is_judged_as_ipv4() -> None:
    # The relay passes dst_ip through to the policy as is; a mapped loopback must not slip by.
    assert LOOPBACK_OK.check(str(ipaddress.IPv6Address("::ffff:127.0.0.1"))) is None
    assert EgressPolicy(host_addresses=[]).check("::ffff:169.254.169.254") == "link-local"


# --- relaying in C (engine splices): how each ending is worded --------------------------------


@pytest.mark.parametrize(
    ("outcome", "error", "tcp_close", "expected"),
    [
        (_ffi.SPLICE_OK, 0, 0, None),
        (_ffi.SPLICE_FAIL_CONNECT, errno.ECONNREFUSED, 0, "connection refused"),
        (_ffi.SPLICE_FAIL_CONNECT, errno.ETIMEDOUT, 0, "connect timeout after 10 s"),
        (_ffi.SPLICE_FAIL_CONNECT, errno.EHOSTUNREACH, 0, "no route to host"),
        (_ffi.SPLICE_FAIL_HOST, errno.ECONNRESET, 0, "destination: connection reset"),
        (_ffi.SPLICE_FAIL_HOST, errno.EPIPE, 0, "destination: broken pipe"),
        (_ffi.SPLICE_FAIL_PEER, 0, _ffi.TCP_CLOSE_RESET, "peer: connection reset"),
        (_ffi.SPLICE_FAIL_PEER, 0, _ffi.TCP_CLOSE_TIMEOUT, "peer: timed out"),
        (_ffi.SPLICE_FAIL_PEER, 0, _ffi.TCP_CLOSE_PEER_REMOVED, "peer: peer removed"),
        (_ffi.SPLICE_FAIL_PEER_GONE, 0, _ffi.TCP_CLOSE_RESET,
         "peer gone before accept: connection reset"),
        (_ffi.SPLICE_FAIL_ABORTED, 0, 0, "aborted"),
    ],
)  # fmt: skip
def test_splice_endings_are_worded_as_the_python_relay_words_them(
    outcome: int, error: int, tcp_close: int, expected: str | None
) -> None:
    result = _ffi.SpliceResult(1, outcome, error, tcp_close, 0, 0, 0.0)
    assert splice_error(result, connect_timeout=10.0) == expected


class SpliceConn:
    """A peer connection as the engine hands it over, whose splice is recorded, not run."""

    _ids = iter(range(100, 10_000))
    can_splice = True

    def __init__(self, dst_ip: str, dst_port: int, fail: OSError | None = None) -> None:
        self.conn_id = next(self._ids)
        self.peer_public_key = PEER_KEY
        self.peer_ip, self.src_port = "10.77.0.2", 40000
        self.dst_ip, self.dst_port = dst_ip, dst_port
        self.rejected = False
        self.spliced: tuple[tuple[str, int], float] | None = None
        self.on_done: Callable[[_ffi.SpliceResult], None] | None = None
        self.fail = fail

    def splice(
        self, dst: tuple[str, int], timeout: float, on_done: Callable[[_ffi.SpliceResult], None]
    ) -> None:
        if self.fail is not None:
            raise self.fail
        self.spliced, self.on_done = (dst, timeout), on_done

    def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        raise AssertionError("a spliced connection is answered in C")

    def reject(self) -> None:
        self.rejected = True

    def abort(self) -> None:
        raise AssertionError("not expected here")


async def test_spliced_relay_checks_the_policy_then_hands_over_and_reports_once() -> None:
    rec = Recorder()
    flows = FlowRegistry(rec, peer_name, connect_timeout=3.0)
    decisions = DecisionPoint(Router(), EgressPolicy())
    refused = SpliceConn("127.0.0.1", 22)
    decide_and_carry(refused, decisions, flows)
    assert refused.rejected and refused.spliced is None
    closed = rec.of(TcpClosed)
    assert closed[-1].error == "refused by egress policy: loopback"  # type: ignore[attr-defined]

    conn = SpliceConn("198.18.0.2", 80)
    decide_and_carry(conn, decisions, flows)
    assert conn.spliced == (("198.18.0.2", 80), 3.0) and not conn.rejected
    assert len(rec.of(TcpClosed)) == 1  # nothing more until the splice ends
    assert conn.on_done is not None
    assert flows.total == 1
    conn.on_done(_ffi.SpliceResult(conn.conn_id, _ffi.SPLICE_OK, 0, 0, 100, 2000, 0.0))
    last: Any = rec.of(TcpClosed)[-1]
    assert (last.bytes_up, last.bytes_down, last.error) == (100, 2000, None)
    assert [e.conn_id for e in rec.of(TcpOpened)] == [refused.conn_id, conn.conn_id]  # type: ignore[attr-defined]
    assert flows.total == 0

    unreachable = SpliceConn("198.18.0.2", 80, fail=OSError(errno.ENETUNREACH, "x"))
    decide_and_carry(unreachable, decisions, flows)
    assert unreachable.rejected and rec.of(TcpClosed)[-1].error == "x"  # type: ignore[attr-defined]
