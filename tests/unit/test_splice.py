"""Splices (`_splice.c`): a peer's connection joined in C to a real loopback TCP socket.

The peer side is scripted sans-IO through the whole engine (helpers of test_wgstack_flows);
the destination is a real listening socket on 127.0.0.1 in this process, so connect, refusal,
reset and back-pressure are the kernel's own.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import random
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from tests.unit.test_tcp import ACK, FIN, RST, SYN, Peer
from tests.unit.test_wgstack import PEER_ID
from tests.unit.test_wgstack_flows import (
    GW_WSCALE,
    Client,
    add_test_peer,
    establish,
    syn_event,
    window_batch,
)
from unclaw_tui.engine import _ffi
from unclaw_tui.engine._ffi import Engine, EngineError, SpliceResult

WAIT = 5.0  # seconds any single step may take before the test fails


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(WAIT)
    yield sock
    sock.close()


def service(client: Client, rounds: int = 1) -> list[SpliceResult]:
    """Let the engine see its sockets' news (waiting up to WAIT s for the first), as the
    event loop does when the epoll fd turns readable."""
    results: list[SpliceResult] = []
    for i in range(rounds):
        _ready, _, _ = select.select([client.engine.splice_fd()], [], [], WAIT if i == 0 else 0.05)
        client.engine.splice_service(client.now)
        results += client.engine.splice_results(client.now)
    return results


def spliced(client: Client, listener: socket.socket, peer: Peer | None = None):
    """SYN -> splice_connect -> the destination accepts -> SYN-ACK -> ACK."""
    peer = peer or Peer()
    conn = syn_event(client, peer)
    client.engine.splice_connect(conn, listener.getsockname(), client.now + 10, client.now)
    server, _ = listener.accept()
    server.settimeout(WAIT)
    assert service(client) == []
    [synack] = client.segments()
    assert synack.flags == SYN | ACK and synack.ack == peer.iss + 1
    peer.rcv_nxt = (synack.seq + 1) & 0xFFFFFFFF
    client.send(peer.seg())
    return peer, conn, server


def test_bytes_flow_both_ways_with_half_close_and_one_clean_result(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    peer, conn, server = spliced(client, listener)
    assert engine.splice_active() == 1
    client.send(peer.data(b"GET / HTTP/1.0\r\n\r\n", flags=ACK | FIN))  # request, then EOF
    engine.splice_results(client.now)
    assert server.recv(100) == b"GET / HTTP/1.0\r\n\r\n"
    assert server.recv(100) == b""  # the peer's FIN became a half-close
    server.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello")
    server.close()
    # Both EOFs passed on: the splice is over; the stack finishes the FIN exchange alone.
    [result] = service(client)
    assert result == SpliceResult(conn, _ffi.SPLICE_OK, 0, 0, 18, 24, client.now)
    assert engine.splice_active() == 0 and engine.splice_bytes(conn) is None
    segs = client.segments()
    assert b"".join(s.payload for s in segs) == b"HTTP/1.0 200 OK\r\n\r\nhello"
    assert segs[-1].flags & FIN
    assert engine.tcp_events() == []  # a spliced connection's events stayed in C
    peer.rcv_nxt = (segs[-1].seq + len(segs[-1].payload) + 1) & 0xFFFFFFFF
    client.send(peer.seg())
    assert engine.tcp_stats()["conns"] == 0  # LAST-ACK ended with the peer's ACK


def test_refused_destination_answers_the_syn_with_rst(engine: Engine, client: Client) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    peer = Peer()
    conn = syn_event(client, peer)
    engine.splice_connect(conn, ("127.0.0.1", port), client.now + 10, client.now)
    [result] = service(client)
    assert (result.outcome, result.error) == (_ffi.SPLICE_FAIL_CONNECT, errno.ECONNREFUSED)
    [rst] = client.segments()
    assert rst.flags == RST | ACK and rst.ack == peer.iss + 1


def test_unreachable_network_fails_at_once_and_the_handle_stays_the_callers(
    engine: Engine, client: Client
) -> None:
    conn = syn_event(client, Peer())
    with pytest.raises(OSError) as failure:  # multicast: no route for TCP, nothing is sent
        engine.splice_connect(conn, ("224.0.0.1", 80), client.now + 10, client.now)
    assert failure.value.errno == errno.ENETUNREACH
    assert engine.splice_active() == 0
    engine.tcp_reject(conn, client.now)  # still ours to answer
    assert client.segments()[0].flags & RST


def test_connect_past_its_deadline_times_out(engine: Engine, client: Client) -> None:
    # A listener whose backlog is full drops further SYNs: the connect never completes.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
        fillers.append(filler)
    try:
        conn = syn_event(client, Peer())
        engine.splice_connect(conn, full.getsockname(), client.now + 3, client.now)
        assert engine.next_deadline() == pytest.approx(client.now + 3)
        assert service(client, rounds=2) == []
        client.now += 3.5
        engine.tick(client.now)
        [result] = engine.splice_results(client.now)
        assert (result.outcome, result.error) == (_ffi.SPLICE_FAIL_CONNECT, errno.ETIMEDOUT)
        assert client.segments()[-1].flags & RST
    finally:
        for sock in [*fillers, full]:
            sock.close()


def test_destination_reset_resets_the_peer(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    _peer, _conn, server = spliced(client, listener)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()  # RST
    [result] = service(client)
    assert (result.outcome, result.error) == (_ffi.SPLICE_FAIL_HOST, errno.ECONNRESET)
    assert client.segments()[-1].flags & RST


def test_peer_reset_resets_the_destination(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    peer, _conn, server = spliced(client, listener)
    client.send(peer.seg(flags=RST))
    [result] = engine.splice_results(client.now)
    assert (result.outcome, result.tcp_close) == (_ffi.SPLICE_FAIL_PEER, _ffi.TCP_CLOSE_RESET)
    with pytest.raises(ConnectionResetError):
        server.recv(10)


def test_peer_removal_and_abort_reset_the_destination(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    _peer, _conn, server = spliced(client, listener)
    _other_peer, other, other_server = spliced(client, listener, Peer(sport=40001))
    assert engine.splice_abort(other, client.now)
    [aborted] = engine.splice_results(client.now)
    assert aborted.outcome == _ffi.SPLICE_FAIL_ABORTED
    with pytest.raises(ConnectionResetError):
        other_server.recv(10)
    engine.peer_remove(PEER_ID)
    [removed] = engine.splice_results(client.now)
    assert (removed.outcome, removed.tcp_close) == (
        _ffi.SPLICE_FAIL_PEER,
        _ffi.TCP_CLOSE_PEER_REMOVED,
    )
    with pytest.raises(ConnectionResetError):
        server.recv(10)
    assert engine.splice_active() == 0


def test_megabytes_both_ways_with_back_pressure_arrive_intact(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    rng = random.Random(11)
    up, down = rng.randbytes(3 << 20), rng.randbytes(3 << 20)
    peer, conn, server = spliced(client, listener)
    server.setblocking(False)
    up_sent = up_acked = written = 0
    got_up, got_down = bytearray(), bytearray()
    gw_window = 65535
    stalled_rounds = 0
    for step in range(20_000):
        if len(got_up) == len(up) and len(got_down) == len(down):
            break
        batch = window_batch(peer, up, up_sent, up_acked, gw_window)
        up_sent += sum(len(seg.payload) for seg in batch)
        if batch:
            client.send(*batch)
        # the destination reads only every other step at first: the peer must be held back
        if step > 200 or step % 2:
            try:
                while chunk := server.recv(1 << 20):
                    got_up += chunk
            except BlockingIOError:
                pass
        if written < len(down):
            with contextlib.suppress(BlockingIOError):
                written += server.send(down[written : written + (256 << 10)])
        select.select([engine.splice_fd()], [], [], 0.01)
        engine.splice_service(client.now)
        segs = client.segments()
        for seg in segs:
            up_acked = max(up_acked, (seg.ack - peer.iss - 1) & 0xFFFFFFFF)
            gw_window = seg.wnd << GW_WSCALE
            if seg.payload:
                assert seg.seq == peer.rcv_nxt
                got_down += seg.payload
                peer.rcv_nxt = (peer.rcv_nxt + len(seg.payload)) & 0xFFFFFFFF
        client.send(peer.seg())
        stalled_rounds = 0 if segs or batch else stalled_rounds + 1
        assert up_sent - up_acked <= (256 << 10)  # never more in flight than our window
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    assert engine.splice_bytes(conn) == (len(up), len(down))


def test_an_attached_socket_is_answered_at_the_next_poll(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    peer = Peer()
    conn = syn_event(client, peer)
    host = socket.create_connection(listener.getsockname(), timeout=WAIT)
    server, _ = listener.accept()
    engine.splice_attach(conn, host.detach(), client.now)
    assert service(client) == []
    [synack] = client.segments()
    assert synack.flags == SYN | ACK
    peer.rcv_nxt = (synack.seq + 1) & 0xFFFFFFFF
    client.send(peer.seg(), peer.data(b"ping"))
    engine.splice_results(client.now)
    assert server.recv(10) == b"ping"
    server.sendall(b"pong")
    assert service(client) == []
    assert [s.payload for s in client.segments() if s.payload] == [b"pong"]
    assert engine.splice_bytes(conn) == (4, 4)
    assert engine.splice_active_flows(since=client.now) == {conn: (4, 4)}
    assert engine.splice_active_flows(since=client.now + 1) == {}  # nothing moved since
    with pytest.raises(EngineError):  # the handle is the table's now
        engine.splice_attach(conn, 0, client.now)


# ---- The fast relay: SYNs to approved destinations spliced without the owner ---------------

LOOPBACK = 0x7F000001


def fast_peer(listener: socket.socket, sport: int = 40000) -> Peer:
    """A peer connecting to the listener itself (the engine connects where the SYN goes)."""
    return Peer(sport=sport, dport=listener.getsockname()[1], dst_ip=LOOPBACK)


def test_fast_relay_splices_an_approved_destination_without_asking_and_reports_it(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    dst = listener.getsockname()
    engine.fast_relay_allow(PEER_ID, dst, None, 10.0)
    peer = fast_peer(listener)
    client.send(peer.syn())
    assert engine.tcp_events() == []  # no decision asked for
    [opened] = engine.fast_relay_opened()
    assert opened.peer_id == PEER_ID and opened.opened_at == client.now
    assert opened.src == ("10.77.0.2", peer.sport) and opened.dst == dst
    assert engine.fast_relay_opened() == []  # each is reported once
    assert engine.stats()["fast_relayed"] == 1
    server, _ = listener.accept()
    server.settimeout(WAIT)
    assert service(client) == []
    [synack] = client.segments()  # the SYN's answer came once the destination accepted
    assert synack.flags == SYN | ACK and synack.ack == peer.iss + 1
    peer.rcv_nxt = (synack.seq + 1) & 0xFFFFFFFF
    client.send(peer.seg(), peer.data(b"ping", flags=ACK | FIN))
    engine.splice_results(client.now)
    assert server.recv(100) == b"ping" and server.recv(100) == b""
    server.sendall(b"pong")
    server.close()
    client.now += 0.5
    [result] = service(client)
    assert result == SpliceResult(opened.conn_id, _ffi.SPLICE_OK, 0, 0, 4, 4, client.now)
    assert b"".join(s.payload for s in client.segments()) == b"pong"


def test_fast_relay_refused_destination_still_gets_an_honest_rst(
    engine: Engine, client: Client
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    engine.fast_relay_allow(PEER_ID, ("127.0.0.1", port), None, 10.0)
    peer = Peer(dport=port, dst_ip=LOOPBACK)
    client.send(peer.syn())
    [opened] = engine.fast_relay_opened()
    [result] = service(client)
    assert result.conn_id == opened.conn_id
    assert (result.outcome, result.error) == (_ffi.SPLICE_FAIL_CONNECT, errno.ECONNREFUSED)
    [rst] = client.segments()
    assert rst.flags == RST | ACK and rst.ack == peer.iss + 1


@pytest.mark.parametrize(
    "case", ["other_port", "other_address", "other_peer", "expired", "cleared", "peer_removed"]
)
def test_fast_relay_leaves_every_other_syn_to_the_owner(
    engine: Engine, client: Client, listener: socket.socket, case: str
) -> None:
    ip, port = listener.getsockname()
    approved_for = PEER_ID + 1 if case == "other_peer" else PEER_ID
    if case == "other_peer":
        engine.peer_add(approved_for)
    engine.fast_relay_allow(approved_for, (ip, port), client.now + 5, 10.0)
    peer = fast_peer(listener)
    if case == "peer_removed":  # the id given to a new peer has none of the old one's approvals
        engine.peer_remove(PEER_ID)
        add_test_peer(engine, client.now)
    if case == "other_port":
        peer.dport = port + 1 if port < 65535 else port - 1
    elif case == "other_address":
        peer.dst_ip = LOOPBACK + 1
    elif case == "expired":
        client.now += 5
    else:
        engine.fast_relay_clear()
    syn_event(client, peer)
    assert engine.fast_relay_opened() == [] and engine.stats()["fast_relayed"] == 0


def test_fast_relay_approvals_are_checked(engine: Engine) -> None:
    for dst, timeout in [(("127.0.0.1", 0), 10.0), (("0.0.0.0", 80), 10.0),
                         (("127.0.0.1", 80), -1.0)]:  # fmt: skip
        with pytest.raises(EngineError):
            engine.fast_relay_allow(PEER_ID, dst, None, timeout)
    with pytest.raises(EngineError):
        engine.fast_relay_allow(PEER_ID, ("::1", 80), None, 10.0)  # IPv4 only, as the stack
    with pytest.raises(EngineError):
        engine.fast_relay_allow(1 << 20, ("127.0.0.1", 80), None, 10.0)  # no such peer id


# ---- Adopting a connection the owner accepted and read from (TLS passthrough) ---------------


def test_adopted_connection_relays_what_the_owner_left_and_all_that_follows(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    peer, conn = establish(client)
    client.send(peer.data(b"hello:"), peer.data(b"still-in-the-ring:"))
    assert engine.tcp_read(conn, 6, client.now) == b"hello:"  # what the owner read itself
    host = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    server.settimeout(WAIT)
    host.sendall(b"hello:")  # the owner sends it on before handing over
    engine.tcp_events()  # READABLE, the owner's until now
    engine.splice_adopt(conn, host.detach(), client.now)
    client.send(peer.data(b"after", flags=ACK | FIN))
    engine.splice_results(client.now)
    received = b""
    while not received.endswith(b"after"):
        received += server.recv(100)
    assert received == b"hello:still-in-the-ring:after"
    assert server.recv(100) == b""  # the peer's FIN went on as a half-close
    assert service(client, rounds=1) == []
    server.sendall(b"response")
    server.close()
    [result] = service(client)
    assert (result.conn_id, result.outcome) == (conn, _ffi.SPLICE_OK)
    assert (result.bytes_up, result.bytes_down) == (len("still-in-the-ring:after"), 8)
    segs = client.segments()
    assert b"".join(s.payload for s in segs) == b"response" and segs[-1].flags & FIN
    assert engine.tcp_events() == []  # the spliced connection's events stayed in C


def test_adopt_wants_an_accepted_connection_not_yet_spliced(
    engine: Engine, client: Client, listener: socket.socket
) -> None:
    conn = syn_event(client, Peer())
    sock = socket.create_connection(listener.getsockname())
    try:
        with pytest.raises(EngineError):  # a SYN still pending: splice_attach's case
            engine.splice_adopt(conn, sock.fileno(), client.now)
        engine.tcp_accept(conn, client.now)
        with pytest.raises(EngineError):  # SYN-RECEIVED: not established yet
            engine.splice_adopt(conn, sock.fileno(), client.now)
    finally:
        sock.close()


def test_splice_calls_after_close_raise_instead_of_reaching_freed_memory(engine: Engine) -> None:
    # Fails before: the splice table's pointer outlived the engine that owned it.
    assert engine.can_splice
    engine.close()
    with pytest.raises(_ffi.EngineError):
        engine.splice_connect(1, ("127.0.0.1", 9), 1.0, 0.0)
    assert engine.splice_bytes(1) is None and not engine.splice_abort(1, 0.0)
    assert engine.splice_results(0.0) == [] and engine.splice_fd() == -1
