"""Unit tests of the userspace TCP (`_tcp.c`) on byte buffers with a fake clock.

Each test is a transcript: segments from a scripted peer go in (`>>`), the packets the stack emits
and the events it raises come out (`<<`) and are asserted on.
"""

from __future__ import annotations

import array
import hashlib
import heapq
import random
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unclaw_tui.engine import _wgstack_cffi

# The TCP stack is compiled into the engine module (and declared in its cdef): test it there,
# on its own, through its sans-IO API with Python callbacks.
ffi: Any = _wgstack_cffi.ffi
lib: Any = _wgstack_cffi.lib

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
PEER_IP = 0x0A4D0002  # 10.77.0.2, the peer's tunnel address
DST_IP = 0x5DB8D822  # 93.184.216.34, where the peer wants to go
MSS = 1380  # mtu 1420 - 40


def ip_str(addr: int) -> str:
    return ".".join(str(b) for b in addr.to_bytes(4, "big"))


# ---- wire helpers --------------------------------------------------------------------------------
def checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum, summed in C by array (byte order fixed up after folding)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(array.array("H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    if sys.byteorder == "little":
        total = ((total & 0xFF) << 8) | (total >> 8)
    return ~total & 0xFFFF


@dataclass
class Seg:
    seq: int = 0
    ack: int = 0
    flags: int = ACK
    wnd: int = 65535
    payload: bytes = b""
    mss: int | None = None
    wscale: int | None = None
    src_ip: int = PEER_IP
    dst_ip: int = DST_IP
    sport: int = 40000
    dport: int = 80
    raw_options: bytes = b""
    sack_permitted: bool = False
    sack: list[tuple[int, int]] = field(default_factory=list)

    def build(self, corrupt: bool = False) -> bytes:
        opts = self.raw_options
        if self.mss is not None:
            opts += struct.pack("!BBH", 2, 4, self.mss)
        if self.wscale is not None:
            opts += struct.pack("!BBBB", 1, 3, 3, self.wscale)
        if self.sack_permitted:
            opts += struct.pack("!BBBB", 1, 1, 4, 2)
        if self.sack:
            opts += struct.pack("!BBBB", 1, 1, 5, 2 + 8 * len(self.sack))
            for start, end in self.sack:
                opts += struct.pack("!II", start & 0xFFFFFFFF, end & 0xFFFFFFFF)
        opts += b"\0" * (-len(opts) % 4)
        thl = 20 + len(opts)
        tcp = struct.pack(
            "!HHIIBBHHH",
            self.sport,
            self.dport,
            self.seq & 0xFFFFFFFF,
            self.ack & 0xFFFFFFFF,
            (thl // 4) << 4,
            self.flags,
            self.wnd,
            0,
            0,
        )
        tcp += opts + self.payload
        pseudo = struct.pack("!IIBBH", self.src_ip, self.dst_ip, 0, 6, len(tcp))
        csum = checksum(pseudo + tcp)
        if corrupt:
            csum ^= 0x0101
        tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
        total = 20 + len(tcp)
        ip = struct.pack(
            "!BBHHHBBHII", 0x45, 0, total, 1, 0x4000, 64, 6, 0, self.src_ip, self.dst_ip
        )
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return ip + tcp


def parse(packet: bytes) -> Seg:
    """Parse what the stack emitted, asserting valid IPv4 and TCP checksums."""
    assert packet[0] == 0x45 and packet[9] == 6
    total = struct.unpack("!H", packet[2:4])[0]
    assert total == len(packet)
    assert checksum(packet[:20]) == 0, "bad IP checksum"
    src, dst = struct.unpack("!II", packet[12:20])
    tcp = packet[20:]
    pseudo = struct.pack("!IIBBH", src, dst, 0, 6, len(tcp))
    assert checksum(pseudo + tcp) == 0, "bad TCP checksum"
    sport, dport, seq, ack, off, flags, wnd = struct.unpack("!HHIIBBH", tcp[:16])
    thl = (off >> 4) * 4
    seg = Seg(seq, ack, flags, wnd, tcp[thl:], src_ip=src, dst_ip=dst, sport=sport, dport=dport)
    i = 20
    while i < thl:
        kind = tcp[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        olen = tcp[i + 1]
        if kind == 2:
            seg.mss = struct.unpack("!H", tcp[i + 2 : i + 4])[0]
        elif kind == 3:
            seg.wscale = tcp[i + 2]
        elif kind == 4:
            seg.sack_permitted = True
        elif kind == 5:
            blocks = tcp[i + 2 : i + olen]
            seg.sack = [struct.unpack("!II", blocks[b : b + 8]) for b in range(0, len(blocks), 8)]
        i += olen
    return seg


# ---- the stack under test, with a fake clock ----------------------------------------------------
class Stack:
    def __init__(self, **config: int) -> None:
        self.out: list[tuple[int, Seg]] = []
        self.events: list[tuple[int, int, int]] = []
        self.now = 100.0
        # an exception inside a C callback is only printed by cffi: keep it and raise it later
        self.errors: list[BaseException] = []
        self._emit = ffi.callback(
            "void(void *, uint32_t, const uint8_t *, size_t, double)",
            self._on_emit,
            onerror=self._on_callback_error,
        )
        self._event = ffi.callback(
            "void(void *, const tcp_event *)", self._on_event, onerror=self._on_callback_error
        )
        cb = ffi.new("tcp_callbacks *", {"emit": self._emit, "event": self._event})
        cfg = ffi.new("tcp_config *", {"iss_seed": 1234, **config})
        self.ptr = ffi.gc(lib.tcp_stack_new(cfg, cb), lib.tcp_stack_free)
        assert self.ptr != ffi.NULL
        self.raw_out: list[tuple[int, bytes]] = []

    def _on_callback_error(self, _exc_type: Any, exc: BaseException, _tb: Any) -> None:
        self.errors.append(exc)

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def _on_emit(self, _ctx: Any, peer_id: int, pkt: Any, length: int, now: float) -> None:
        assert now == self.now  # the time of the call that produced it
        data = bytes(ffi.buffer(pkt, length))
        self.raw_out.append((peer_id, data))
        self.out.append((peer_id, parse(data)))

    def _on_event(self, _ctx: Any, ev: Any) -> None:
        self.events.append((ev.type, ev.conn_id, ev.arg))

    # >> in
    def input(self, seg: Seg | bytes, peer: int = 0) -> int:
        data = seg if isinstance(seg, bytes) else seg.build()
        return lib.tcp_input(self.ptr, peer, data, len(data), self.now)

    def advance(self, dt: float) -> None:
        self.now += dt
        lib.tcp_tick(self.ptr, self.now)

    def run_until(self, t: float) -> None:
        """Tick at every deadline up to t, as an event loop would."""
        while True:
            d = lib.tcp_next_deadline(self.ptr)
            if d == 0 or d > t:
                break
            self.now = max(self.now, d)
            lib.tcp_tick(self.ptr, self.now)
        self.now = t
        lib.tcp_tick(self.ptr, self.now)

    # << out
    def take(self) -> list[Seg]:
        self.check()
        segs = [s for _, s in self.out]
        self.out.clear()
        return segs

    def take_events(self) -> list[tuple[int, int, int]]:
        self.check()
        evs = list(self.events)
        self.events.clear()
        return evs

    # owner calls
    def accept(self, conn: int) -> int:
        return lib.tcp_accept(self.ptr, conn, self.now)

    def read(self, conn: int, cap: int = 1 << 20) -> bytes | int:
        buf = ffi.new("uint8_t[]", cap)
        n = lib.tcp_read(self.ptr, conn, buf, cap, self.now)
        return bytes(buf[0:n]) if n > 0 else n

    def write(self, conn: int, data: bytes) -> int:
        return lib.tcp_write(self.ptr, conn, data, len(data), self.now)

    def info(self, conn: int) -> Any:
        out = ffi.new("tcp_conn_info *")
        assert lib.tcp_get_info(self.ptr, conn, out) == 0
        return out

    def stats(self) -> Any:
        self.check()
        out = ffi.new("tcp_stats *")
        lib.tcp_get_stats(self.ptr, out)
        return out

    def drops(self, reason: int) -> int:
        return lib.tcp_drop_count(self.ptr, reason)


@dataclass
class Peer:
    """The scripted client side of one connection: remembers its sequence numbers."""

    sport: int = 40000
    dport: int = 80
    iss: int = 1000
    dst_ip: int = DST_IP
    wscale: int | None = 7
    sack_permitted: bool = False
    snd_nxt: int = 0
    rcv_nxt: int = 0
    sent: list[Seg] = field(default_factory=list)

    def seg(self, **kw: Any) -> Seg:
        kw.setdefault("seq", self.snd_nxt)
        kw.setdefault("ack", self.rcv_nxt)
        kw.setdefault("wnd", 2048 if self.wscale is not None else 65535)
        return Seg(sport=self.sport, dport=self.dport, dst_ip=self.dst_ip, **kw)

    def syn(self) -> Seg:
        self.snd_nxt = self.iss + 1
        return Seg(
            seq=self.iss, ack=0, flags=SYN, wnd=65535, mss=MSS, wscale=self.wscale,
            sport=self.sport, dport=self.dport, dst_ip=self.dst_ip,
            sack_permitted=self.sack_permitted,
        )  # fmt: skip

    def data(self, payload: bytes, flags: int = ACK | PSH, **kw: Any) -> Seg:
        s = self.seg(flags=flags, payload=payload, **kw)
        if "seq" not in kw:
            self.snd_nxt += len(payload) + (1 if flags & FIN else 0)
        return s


def connect(
    stack: Stack, peer: Peer | None = None, peer_id: int = 0, rtt: float = 0.0
) -> tuple[Peer, int, Seg]:
    """SYN -> TCP_EV_SYN -> accept -> SYN-ACK -> (rtt later) ACK: an established connection."""
    peer = peer or Peer()
    assert stack.input(peer.syn(), peer_id) == 0
    (ev,) = [e for e in stack.take_events() if e[0] == lib.TCP_EV_SYN]
    conn = ev[1]
    assert stack.accept(conn) == 0
    (synack,) = stack.take()
    peer.rcv_nxt = synack.seq + 1
    stack.now += rtt
    assert stack.input(peer.seg(), peer_id) == 0
    assert stack.info(conn).state == lib.TCP_ST_ESTABLISHED
    return peer, conn, synack


@pytest.fixture
def stack() -> Stack:
    return Stack()


# ---- handshake -----------------------------------------------------------------------------------
def test_handshake_peeks_syn_then_accept(stack: Stack) -> None:
    peer = Peer(dport=5432)
    # >> SYN to an arbitrary port: no listener, an event
    assert stack.input(peer.syn(), peer=3) == 0
    (ev,) = stack.take_events()
    assert ev[0] == lib.TCP_EV_SYN and ev[1] != 0
    conn = ev[1]
    info = stack.info(conn)
    assert (info.peer_id, ip_str(info.src_ip), info.src_port) == (3, "10.77.0.2", 40000)
    assert (ip_str(info.dst_ip), info.dst_port) == ("93.184.216.34", 5432)
    assert info.state == lib.TCP_ST_SYN_PENDING
    assert stack.take() == []  # nothing is answered before the owner decides
    # accept << SYN-ACK with MSS and window scale
    stack.accept(conn)
    (synack,) = stack.take()
    assert synack.flags == SYN | ACK
    assert synack.ack == peer.iss + 1
    assert synack.mss == MSS
    assert synack.wscale == 3  # 256 KiB >> 3 fits 16 bits
    assert synack.wnd == 65535  # a SYN's window is never scaled
    assert (synack.src_ip, synack.sport, synack.dst_ip, synack.dport) == (
        DST_IP, 5432, PEER_IP, 40000,
    )  # fmt: skip
    assert stack.out == []
    # >> ACK
    peer.rcv_nxt = synack.seq + 1
    stack.input(peer.seg(), peer=3)
    info = stack.info(conn)
    assert info.state == lib.TCP_ST_ESTABLISHED
    assert info.wscale_ok and info.snd_wscale == 7 and info.rcv_wscale == 3
    assert info.snd_wnd == 2048 << 7
    assert info.snd_mss == MSS
    assert stack.stats().established == 1
    assert stack.accept(conn) == lib.TCP_ESTATE


def test_handshake_without_window_scaling() -> None:
    stack = Stack()
    peer = Peer(wscale=None)
    _, conn, synack = connect(stack, peer)
    assert synack.wscale is None
    info = stack.info(conn)
    assert not info.wscale_ok and info.snd_wscale == 0 and info.rcv_wscale == 0
    # window stays within 16 bits, unscaled
    stack.input(peer.data(b"x" * 100))
    stack.read(conn)
    lib.tcp_flush(stack.ptr, stack.now)
    assert all(s.wnd <= 65535 for s in stack.take())


def test_peer_mss_is_honoured() -> None:
    stack = Stack()
    peer = Peer()
    stack.input(Seg(seq=peer.iss, ack=0, flags=SYN, mss=536, wscale=7, sport=peer.sport))
    peer.snd_nxt = peer.iss + 1
    conn = stack.take_events()[0][1]
    stack.accept(conn)
    (synack,) = stack.take()
    peer.rcv_nxt = synack.seq + 1
    stack.input(peer.seg())
    stack.write(conn, b"a" * 2000)
    assert [len(s.payload) for s in stack.take()] == [536, 536, 536, 392]


def test_reject_sends_rst_and_closes(stack: Stack) -> None:
    peer = Peer()
    stack.input(peer.syn())
    conn = stack.take_events()[0][1]
    assert lib.tcp_reject(stack.ptr, conn, stack.now) == 0
    (rst,) = stack.take()
    assert rst.flags == RST | ACK and rst.seq == 0 and rst.ack == peer.iss + 1
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_REJECTED)]
    assert stack.info(conn).state == lib.TCP_ST_CLOSED
    assert lib.tcp_release(stack.ptr, conn, stack.now) == 0
    assert lib.tcp_get_info(stack.ptr, conn, ffi.new("tcp_conn_info *")) == lib.TCP_ENOCONN
    assert stack.stats().conns == 0


def test_syn_retransmissions_absorbed_while_pending(stack: Stack) -> None:
    peer = Peer()
    stack.input(peer.syn())
    stack.advance(1.0)
    stack.input(peer.syn())
    stack.advance(2.0)
    stack.input(peer.syn())
    assert len(stack.take_events()) == 1
    assert stack.take() == []
    assert stack.drops(lib.TCP_DROP_SYN_DUPLICATE) == 2
    assert stack.stats().conns == 1


def test_unanswered_syn_times_out_with_rst() -> None:
    stack = Stack(syn_pending_ms=5000)
    peer = Peer()
    stack.input(peer.syn())
    conn = stack.take_events()[0][1]
    assert lib.tcp_next_deadline(stack.ptr) == pytest.approx(stack.now + 5.0)
    stack.run_until(stack.now + 4.9)
    assert stack.take() == []
    stack.run_until(stack.now + 0.2)
    (rst,) = stack.take()
    assert rst.flags & RST and rst.ack == peer.iss + 1
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_SYN_TIMEOUT)]


def test_synack_retransmitted_then_gives_up(stack: Stack) -> None:
    peer = Peer()
    stack.input(peer.syn())
    conn = stack.take_events()[0][1]
    stack.accept(conn)
    (first,) = stack.take()
    sent: list[tuple[float, Seg]] = []
    start = stack.now
    for _ in range(200):
        d = lib.tcp_next_deadline(stack.ptr)
        if d == 0:
            break
        stack.now = d
        lib.tcp_tick(stack.ptr, d)
        sent += [(round(stack.now - start, 3), s) for s in stack.take()]
    synacks = [(t, s.seq) for t, s in sent if s.flags == SYN | ACK]
    assert synacks == [(t, first.seq) for t in (1.0, 3.0, 7.0, 15.0, 31.0)]  # RTO 1 s, doubled
    assert sent[-1][1].flags & RST
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_TIMEOUT)]
    assert stack.info(conn).state == lib.TCP_ST_CLOSED  # the handle stays valid until release


def test_lost_synack_resent_on_peer_syn_retransmit(stack: Stack) -> None:
    peer = Peer()
    stack.input(peer.syn())
    conn = stack.take_events()[0][1]
    stack.accept(conn)
    (synack,) = stack.take()
    stack.input(peer.syn())
    (again,) = stack.take()
    assert again.flags == SYN | ACK and again.seq == synack.seq


# ---- data from the peer --------------------------------------------------------------------------
def test_data_in_readable_once_then_read(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.take_events()
    stack.input(peer.data(b"hello "))
    stack.input(peer.data(b"world"))
    assert stack.take_events() == [(lib.TCP_EV_READABLE, conn, 0)]  # an edge, raised once
    assert stack.take() == []  # small segments: ACK deferred to the end of the batch
    lib.tcp_flush(stack.ptr, stack.now)
    (ack,) = stack.take()
    assert ack.flags == ACK and ack.ack == peer.snd_nxt
    assert stack.read(conn) == b"hello world"
    assert stack.read(conn) == lib.TCP_EAGAIN
    stack.input(peer.data(b"!"))
    assert stack.take_events() == [(lib.TCP_EV_READABLE, conn, 0)]  # re-armed by the read
    assert stack.info(conn).bytes_in == 12


def test_delayed_ack_timer_without_flush(stack: Stack) -> None:
    peer, _conn, _ = connect(stack)
    stack.input(peer.data(b"x" * 10))
    assert stack.take() == []
    assert lib.tcp_next_deadline(stack.ptr) == pytest.approx(stack.now + lib.TCP_DELACK_MS / 1e3)
    stack.advance(lib.TCP_DELACK_MS / 1e3)
    (ack,) = stack.take()
    assert ack.ack == peer.snd_nxt


def test_every_second_full_segment_acked_at_once(stack: Stack) -> None:
    peer, _conn, _ = connect(stack)
    stack.input(peer.data(b"a" * MSS))
    assert stack.take() == []
    stack.input(peer.data(b"b" * MSS))
    (ack,) = stack.take()
    assert ack.ack == peer.snd_nxt


def test_out_of_order_segments_reassembled(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.take_events()
    base = peer.snd_nxt
    chunks = [bytes([65 + i]) * 500 for i in range(4)]
    # >> segments 2, 4, 3 before 1
    for i in (1, 3, 2):
        stack.input(peer.seg(seq=base + 500 * i, flags=ACK, payload=chunks[i]))
        (dup,) = stack.take()
        assert dup.ack == base  # immediate duplicate ACK on each out-of-order segment
    assert stack.take_events() == []
    assert stack.read(conn) == lib.TCP_EAGAIN
    stack.input(peer.seg(seq=base, flags=ACK, payload=chunks[0]))
    (ack,) = stack.take()
    assert ack.ack == base + 2000  # the hole filled: ACKed at once, all of it
    assert stack.take_events() == [(lib.TCP_EV_READABLE, conn, 0)]
    assert stack.read(conn) == b"".join(chunks)


def test_duplicate_and_overlapping_segments(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    base = peer.snd_nxt
    stack.input(peer.seg(seq=base, payload=b"abcdef"))
    stack.input(peer.seg(seq=base, payload=b"abcdef"))  # exact duplicate
    (ack,) = stack.take()
    assert ack.ack == base + 6
    stack.input(peer.seg(seq=base + 3, payload=b"defghi"))  # overlaps the old part
    assert stack.read(conn) == b"abcdefghi"
    assert stack.info(conn).bytes_in == 9


def test_receive_window_closes_then_update_on_read() -> None:
    stack = Stack(rcvbuf=8 * MSS)
    peer = Peer(wscale=None)
    _, conn, synack = connect(stack, peer)
    assert synack.wnd == 8 * MSS
    windows = []
    for _ in range(8):
        stack.input(peer.data(b"z" * MSS))
        lib.tcp_flush(stack.ptr, stack.now)
        windows += [s.wnd for s in stack.take()]
    assert windows[-1] == 0  # buffer full: the window shut
    assert windows == sorted(windows, reverse=True)
    # >> more data into a zero window: not taken, answered with ACK, window 0
    stack.input(peer.data(b"overflow"))
    (ack,) = stack.take()
    assert ack.wnd == 0 and ack.ack == peer.snd_nxt - len(b"overflow")
    peer.snd_nxt -= len(b"overflow")
    # a small read does not reopen (SWS avoidance), a big one sends a window update
    assert len(stack.read(conn, 100)) == 100
    assert stack.take() == []
    assert len(stack.read(conn)) == 8 * MSS - 100
    (update,) = stack.take()
    assert update.wnd == 8 * MSS and update.ack == peer.snd_nxt


def test_rcvbuf_memory_freed_when_drained(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    idle = stack.info(conn).mem
    assert idle <= 4096  # the target for an idle connection
    stack.input(peer.data(b"q" * 1000))
    assert stack.info(conn).mem == idle + 256 * 1024
    stack.read(conn)
    assert stack.info(conn).mem == idle


# ---- data to the peer ----------------------------------------------------------------------------
def test_write_sends_at_once_without_nagle(stack: Stack) -> None:
    peer, conn, synack = connect(stack)
    iss = synack.seq
    assert stack.write(conn, b"GET") == 3
    (s1,) = stack.take()
    assert s1.payload == b"GET" and s1.seq == iss + 1 and s1.flags == ACK | PSH
    # another small write before any ACK: still sent at once
    assert stack.write(conn, b" /") == 2
    (s2,) = stack.take()
    assert s2.payload == b" /" and s2.seq == iss + 4
    stack.input(peer.seg(ack=iss + 6))
    info = stack.info(conn)
    assert info.bytes_out == 5 and info.snd_queued == 0


def test_initial_window_then_slow_start(stack: Stack) -> None:
    peer, conn, synack = connect(stack)
    data = bytes(range(256)) * 400  # 100 KiB
    assert stack.write(conn, data) == len(data)
    first = stack.take()
    assert [len(s.payload) for s in first] == [MSS] * 10  # initial window 10 segments
    # ACK two segments -> cwnd grows by 2 MSS, 4 more segments go
    stack.input(peer.seg(ack=synack.seq + 1 + 2 * MSS))
    assert len(stack.take()) == 4
    assert stack.info(conn).cwnd == 12 * MSS


def test_send_buffer_back_pressure_and_writable() -> None:
    stack = Stack(sndbuf=16384)
    peer, conn, synack = connect(stack)
    stack.take_events()
    assert stack.write(conn, b"w" * 20000) == 16384
    assert stack.write(conn, b"w") == 0
    sent = stack.take()
    assert sum(len(s.payload) for s in sent) == 10 * MSS
    stack.input(peer.seg(ack=synack.seq + 1 + 2 * MSS))
    assert stack.take_events() == []  # not yet a quarter free
    stack.input(peer.seg(ack=synack.seq + 1 + 4 * MSS))
    assert stack.take_events() == [(lib.TCP_EV_WRITABLE, conn, 0)]


def test_peer_window_limits_sending(stack: Stack) -> None:
    peer, conn, synack = connect(stack)
    stack.input(peer.seg(ack=synack.seq + 1, wnd=15))  # scaled by 2^7: 1920 bytes
    stack.write(conn, b"p" * 10000)
    # one full segment; the 540 bytes left of the window wait (sender SWS avoidance)
    assert [len(s.payload) for s in stack.take()] == [MSS]
    stack.input(peer.seg(ack=synack.seq + 1 + MSS, wnd=15))
    assert [len(s.payload) for s in stack.take()] == [MSS]


def test_retransmission_timeout_backoff_and_rtt(stack: Stack) -> None:
    peer, conn, synack = connect(stack, rtt=0.05)
    info = stack.info(conn)
    assert info.srtt == pytest.approx(0.05)  # first sample, from the SYN-ACK: SRTT = R
    assert info.rttvar == pytest.approx(0.025)  # RTTVAR = R / 2
    una = synack.seq + 1
    stack.write(conn, b"a" * 100)
    stack.take()
    stack.now += 0.13
    stack.input(peer.seg(ack=una + 100))
    info = stack.info(conn)
    assert info.srtt == pytest.approx(0.875 * 0.05 + 0.125 * 0.13)
    assert info.rttvar == pytest.approx(0.75 * 0.025 + 0.25 * 0.08)
    assert info.rto == pytest.approx(info.srtt + 4 * info.rttvar)
    stack.write(conn, b"b" * 100)
    (orig,) = stack.take()
    t0 = stack.now
    sends = []
    for _ in range(3):
        stack.now = lib.tcp_next_deadline(stack.ptr)
        lib.tcp_tick(stack.ptr, stack.now)
        (re,) = stack.take()
        assert re.seq == orig.seq and re.payload == orig.payload
        sends.append(round(stack.now - t0, 3))
    rto = stack.info(conn).rto / 8
    assert sends == pytest.approx([rto, 3 * rto, 7 * rto], abs=1e-3)  # doubled each time
    assert stack.info(conn).retransmits == 3
    assert stack.info(conn).cwnd == MSS  # loss window
    stack.input(peer.seg(ack=una + 200))
    info = stack.info(conn)
    assert info.snd_queued == 0 and info.rto == pytest.approx(rto)  # back-off undone
    assert lib.tcp_next_deadline(stack.ptr) == 0
    assert info.srtt == pytest.approx(0.875 * 0.05 + 0.125 * 0.13)  # Karn: no sample


def test_retransmission_gives_up(stack: Stack) -> None:
    _peer, conn, _ = connect(stack)
    stack.take_events()
    stack.write(conn, b"lost")
    stack.take()
    for _ in range(100):
        d = lib.tcp_next_deadline(stack.ptr)
        if d == 0:
            break
        stack.now = d
        lib.tcp_tick(stack.ptr, d)
    out = stack.take()
    assert out[-1].flags & RST
    assert len(out) == 11  # 10 retransmissions, then the RST
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_TIMEOUT)]
    assert stack.read(conn) == lib.TCP_ERESET
    assert stack.write(conn, b"x") == lib.TCP_ERESET


def test_fast_retransmit_and_newreno_recovery(stack: Stack) -> None:
    peer, conn, synack = connect(stack)
    una = synack.seq + 1
    stack.write(conn, b"".join(bytes([i]) * MSS for i in range(10)))
    segs = stack.take()
    assert len(segs) == 10
    # segments 2 and 5 lost: the peer ACKs 1, then sends dup ACKs
    stack.input(peer.seg(ack=una + MSS))
    stack.take()  # slow start lets new data out
    for _ in range(2):
        stack.input(peer.seg(ack=una + MSS))
    assert stack.take() == []
    stack.input(peer.seg(ack=una + MSS))  # third duplicate
    (fr,) = stack.take()
    assert fr.seq == una + MSS and fr.payload == bytes([1]) * MSS
    assert stack.stats().fast_retransmits == 1
    assert lib.tcp_next_deadline(stack.ptr) > stack.now + 0.1  # no RTO needed
    # partial ACK (up to the next hole, segment 5): NewReno resends it at once
    stack.input(peer.seg(ack=una + 4 * MSS))
    out = stack.take()
    assert out and out[0].seq == una + 4 * MSS and out[0].payload == bytes([4]) * MSS
    assert stack.stats().fast_retransmits == 1 and stack.stats().rto_expirations == 0
    # full ACK ends recovery
    info = stack.info(conn)
    stack.input(peer.seg(ack=una + 10 * MSS + sum(len(s.payload) for s in out[1:])))
    assert stack.info(conn).cwnd <= info.ssthresh + MSS


def test_zero_window_probe_with_backoff(stack: Stack) -> None:
    peer, conn, synack = connect(stack)
    una = synack.seq + 1
    stack.input(peer.seg(ack=una, wnd=0))
    assert stack.write(conn, b"waiting") == 7
    assert stack.take() == []
    t0 = stack.now
    probes = []
    for _ in range(3):
        stack.now = lib.tcp_next_deadline(stack.ptr)
        lib.tcp_tick(stack.ptr, stack.now)
        (probe,) = stack.take()
        assert probe.seq == una - 1 and probe.payload == b""  # an old seq makes the peer answer
        probes.append(round(stack.now - t0, 3))
        stack.input(peer.seg(ack=una, wnd=0))  # the peer answers: still closed
        assert stack.take() == []
    assert probes[1] - probes[0] < probes[2] - probes[1]  # backed off
    assert stack.stats().zero_window_probes == 3
    stack.input(peer.seg(ack=una, wnd=100))
    (data,) = stack.take()
    assert data.payload == b"waiting"
    assert stack.info(conn).state == lib.TCP_ST_ESTABLISHED


def test_zero_window_probes_answered_keep_the_connection_unanswered_end_it(stack: Stack) -> None:
    # RFC 1122 4.2.2.17: open for as long as the peer answers the probes, however long that is;
    # a peer that stopped answering (gone, or never there) must not hold the connection forever.
    peer, conn, synack = connect(stack)
    una = synack.seq + 1
    stack.input(peer.seg(ack=una, wnd=0))
    stack.write(conn, b"waiting")
    stack.take_events()
    end = stack.now + 1000
    while stack.now < end:
        stack.now = lib.tcp_next_deadline(stack.ptr)
        lib.tcp_tick(stack.ptr, stack.now)
        assert [p.seq for p in stack.take()] == [una - 1]
        stack.input(peer.seg(ack=una, wnd=0))  # answered, window still shut
    assert stack.info(conn).state == lib.TCP_ST_ESTABLISHED
    stack.run_until(stack.now + 1000)  # from here on the probes go unanswered
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_TIMEOUT)]
    lib.tcp_release(stack.ptr, conn, stack.now)
    assert stack.stats().conns == 0 and lib.tcp_next_deadline(stack.ptr) == 0


def test_we_answer_peer_zero_window_probe() -> None:
    stack = Stack(rcvbuf=4 * MSS)
    peer = Peer(wscale=None)
    _, _conn, _ = connect(stack, peer)
    for _ in range(4):
        stack.input(peer.data(b"f" * MSS))
    lib.tcp_flush(stack.ptr, stack.now)
    stack.take()
    stack.input(peer.seg(flags=ACK, payload=b"p"))  # a 1-byte probe into the closed window
    (ack,) = stack.take()
    assert ack.wnd == 0 and ack.ack == peer.snd_nxt


def test_peer_probe_or_keepalive_below_rcv_nxt_answered(stack: Stack) -> None:
    """A peer that missed our window update probes with seq = rcv_nxt - 1: it must get an ACK
    (found against the Linux stack, which otherwise waits for ever)."""
    peer, _conn, _ = connect(stack)
    stack.input(peer.seg(seq=peer.snd_nxt - 1))
    (ack,) = stack.take()
    assert ack.flags == ACK and ack.ack == peer.snd_nxt and ack.wnd > 0
    # an older pure ACK (overtaken by reordering) is taken silently
    stack.input(peer.data(b"d" * 100))
    stack.input(peer.seg(seq=peer.snd_nxt - 100 - 50))
    lib.tcp_flush(stack.ptr, stack.now)
    assert len(stack.take()) == 1


def test_write_before_handshake_completes_goes_out_after_it(stack: Stack) -> None:
    """Server-speaks-first (SMTP banner): the relay may write as soon as it accepted."""
    peer = Peer()
    stack.input(peer.syn())
    conn = stack.take_events()[0][1]
    stack.accept(conn)
    (synack,) = stack.take()
    assert stack.write(conn, b"220 hello\r\n") == 11
    assert stack.take() == []  # nothing before the handshake completes
    peer.rcv_nxt = synack.seq + 1
    stack.input(peer.seg())
    (banner,) = stack.take()
    assert banner.payload == b"220 hello\r\n" and banner.seq == synack.seq + 1


def test_fin_ahead_of_missing_data_waits_for_the_hole(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.take_events()
    base = peer.snd_nxt
    stack.input(peer.seg(seq=base + 5, flags=ACK | FIN, payload=b"world"))
    (dup,) = stack.take()
    assert dup.ack == base
    assert stack.take_events() == []
    assert stack.info(conn).state == lib.TCP_ST_ESTABLISHED
    stack.input(peer.seg(seq=base, payload=b"hello"))
    (ack,) = stack.take()
    assert ack.ack == base + 11  # data and the FIN
    assert [e[0] for e in stack.take_events()] == [lib.TCP_EV_READABLE, lib.TCP_EV_PEER_FIN]
    assert stack.read(conn) == b"helloworld" and stack.read(conn) == 0


# ---- SACK (RFC 2018) ----------------------------------------------------------------------------
def test_sack_permitted_only_when_offered(stack: Stack) -> None:
    _, _, synack = connect(stack, Peer(sport=1, sack_permitted=True))
    assert synack.sack_permitted and synack.mss == MSS and synack.wscale == 3
    _, conn, synack = connect(stack, Peer(sport=2))
    assert not synack.sack_permitted and not stack.info(conn).sack_ok


def test_sack_blocks_report_out_of_order_data(stack: Stack) -> None:
    peer, conn, _ = connect(stack, Peer(sack_permitted=True))
    base = peer.snd_nxt
    stack.input(peer.seg(seq=base + 1000, payload=b"b" * 500))
    (dup,) = stack.take()
    assert dup.ack == base and dup.sack == [(base + 1000, base + 1500)]
    stack.input(peer.seg(seq=base + 2000, payload=b"c" * 500))
    (dup,) = stack.take()
    assert dup.sack == [(base + 2000, base + 2500), (base + 1000, base + 1500)]  # latest first
    stack.input(peer.seg(seq=base + 1500, payload=b"x" * 500))  # joins both ranges
    (dup,) = stack.take()
    assert dup.sack == [(base + 1000, base + 2500)]
    stack.input(peer.seg(seq=base, payload=b"a" * 1000))
    (ack,) = stack.take()
    assert ack.ack == base + 2500 and ack.sack == []
    assert stack.read(conn) == b"a" * 1000 + b"b" * 500 + b"x" * 500 + b"c" * 500


def test_sack_recovery_resends_every_hole_without_waiting(stack: Stack) -> None:
    peer, conn, synack = connect(stack, Peer(sack_permitted=True))
    una = synack.seq + 1
    stack.write(conn, b"".join(bytes([i]) * MSS for i in range(10)))
    assert len(stack.take()) == 10

    def at(i: int) -> int:
        return una + i * MSS

    # segments 0 and 4 lost; the peer SACKs what came
    for upto in (3, 4, 6):
        blocks = [(at(1), at(min(upto, 4)))] + ([(at(5), at(upto))] if upto > 4 else [])
        stack.input(peer.seg(ack=una, sack=blocks[::-1]))
    out = stack.take()
    assert out[0].seq == at(0) and out[0].payload == bytes([0]) * MSS  # fast retransmit
    stack.input(peer.seg(ack=una, sack=[(at(5), at(8)), (at(1), at(4))]))
    out = stack.take()
    assert out and out[0].seq == at(4)  # the second hole, before any partial ACK
    assert stack.stats().rto_expirations == 0


def test_rto_does_not_resend_sacked_data(stack: Stack) -> None:
    peer, conn, synack = connect(stack, Peer(sack_permitted=True))
    una = synack.seq + 1
    stack.write(conn, bytes(10 * MSS))
    stack.take()
    stack.input(peer.seg(ack=una, sack=[(una + 3 * MSS, una + 10 * MSS)]))
    stack.take()
    stack.now = lib.tcp_next_deadline(stack.ptr)
    lib.tcp_tick(stack.ptr, stack.now)
    (rto,) = stack.take()
    assert rto.seq == una
    resent = []
    for i in range(1, 4):
        stack.input(peer.seg(ack=una + i * MSS, sack=[(una + 3 * MSS, una + 10 * MSS)]))
        resent += [s.seq for s in stack.take() if s.payload]
    assert resent == [una + MSS, una + 2 * MSS]  # the SACKed segments 3..9 are never resent


# ---- closing -------------------------------------------------------------------------------------
def test_peer_fin_after_data_then_our_fin(stack: Stack) -> None:
    peer, conn, synack = connect(stack)
    stack.take_events()
    stack.input(peer.data(b"last words", flags=ACK | PSH | FIN))
    (ack,) = stack.take()
    assert ack.ack == peer.snd_nxt  # the FIN is ACKed at once
    assert [e[0] for e in stack.take_events()] == [lib.TCP_EV_READABLE, lib.TCP_EV_PEER_FIN]
    assert stack.info(conn).state == lib.TCP_ST_CLOSE_WAIT
    assert stack.read(conn) == b"last words"
    assert stack.read(conn) == 0  # EOF after the data
    # half-close: we can still send
    stack.write(conn, b"reply")
    (rep,) = stack.take()
    assert rep.payload == b"reply"
    assert lib.tcp_shutdown_write(stack.ptr, conn, stack.now) == 0
    (fin,) = stack.take()
    assert fin.flags & FIN and fin.seq == synack.seq + 6
    assert stack.info(conn).state == lib.TCP_ST_LAST_ACK
    stack.input(peer.seg(ack=fin.seq + 1))
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_NORMAL)]
    assert stack.info(conn).state == lib.TCP_ST_CLOSED
    assert stack.read(conn) == 0
    lib.tcp_release(stack.ptr, conn, stack.now)
    assert stack.stats().conns == 0 and stack.stats().mem == 0


def test_our_fin_first_then_time_wait() -> None:
    stack = Stack(time_wait_ms=500)
    peer, conn, synack = connect(stack)
    stack.take_events()
    stack.write(conn, b"bye")
    lib.tcp_shutdown_write(stack.ptr, conn, stack.now)
    segs = stack.take()
    assert segs[-1].flags & FIN and segs[-1].seq == synack.seq + 4
    assert stack.write(conn, b"more") == lib.TCP_ESTATE
    assert stack.info(conn).state == lib.TCP_ST_FIN_WAIT_1
    stack.input(peer.seg(ack=synack.seq + 5))
    assert stack.info(conn).state == lib.TCP_ST_FIN_WAIT_2
    # the peer still sends, then closes
    stack.input(peer.data(b"ok", flags=ACK | FIN))
    (ack,) = stack.take()
    assert ack.ack == peer.snd_nxt
    assert stack.info(conn).state == lib.TCP_ST_TIME_WAIT
    evs = stack.take_events()
    assert evs[-1] == (lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_NORMAL)
    assert stack.read(conn) == b"ok"
    lib.tcp_release(stack.ptr, conn, stack.now)
    # a retransmitted FIN in TIME-WAIT is ACKed again
    stack.input(peer.seg(seq=peer.snd_nxt - 1, flags=ACK | FIN))
    (again,) = stack.take()
    assert again.ack == peer.snd_nxt
    assert stack.stats().time_wait == 1
    stack.run_until(stack.now + 0.6)
    assert stack.stats().time_wait == 0 and stack.stats().conns == 0


def test_simultaneous_close(stack: Stack) -> None:
    peer, conn, synack = connect(stack)
    lib.tcp_shutdown_write(stack.ptr, conn, stack.now)
    (fin,) = stack.take()
    stack.input(peer.seg(flags=ACK | FIN, ack=synack.seq + 1))  # FIN crossing ours
    peer.snd_nxt += 1
    assert stack.info(conn).state == lib.TCP_ST_CLOSING
    stack.input(peer.seg(ack=fin.seq + 1))
    assert stack.info(conn).state == lib.TCP_ST_TIME_WAIT


def test_release_of_open_connection_finishes_with_fin(stack: Stack) -> None:
    peer, conn, synack = connect(stack)
    stack.take_events()
    stack.write(conn, b"tail")
    stack.take()
    assert lib.tcp_release(stack.ptr, conn, stack.now) == 0
    (fin,) = stack.take()
    assert fin.flags & FIN and fin.seq == synack.seq + 5
    assert lib.tcp_read(stack.ptr, conn, ffi.NULL, 0, stack.now) == lib.TCP_ENOCONN
    stack.input(peer.seg(ack=fin.seq + 1))
    stack.input(peer.data(b"late", flags=ACK | FIN))  # discarded, still ACKed
    (ack,) = stack.take()
    assert ack.ack == peer.snd_nxt
    assert stack.take_events() == []  # no events for a released handle
    stack.run_until(stack.now + 5)
    assert stack.stats().conns == 0


def test_release_with_unread_data_resets(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.input(peer.data(b"unread"))
    lib.tcp_flush(stack.ptr, stack.now)
    stack.take()
    lib.tcp_release(stack.ptr, conn, stack.now)
    (rst,) = stack.take()
    assert rst.flags & RST
    assert stack.stats().conns == 0


def test_abort_sends_rst(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.take_events()
    assert lib.tcp_abort(stack.ptr, conn, stack.now) == 0
    (rst,) = stack.take()
    assert rst.flags & RST and rst.ack == peer.snd_nxt
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_ABORTED)]


# ---- RST -----------------------------------------------------------------------------------------
def test_rst_exact_in_window_closes(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.take_events()
    stack.input(peer.seg(flags=RST))
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, conn, lib.TCP_CLOSE_RESET)]
    assert stack.take() == []
    assert stack.read(conn) == lib.TCP_ERESET


def test_rst_in_window_but_not_exact_gets_challenge_ack(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.take_events()
    stack.input(peer.seg(seq=peer.snd_nxt + 1000, flags=RST))
    (challenge,) = stack.take()
    assert challenge.flags == ACK and challenge.ack == peer.snd_nxt
    assert stack.info(conn).state == lib.TCP_ST_ESTABLISHED
    assert stack.drops(lib.TCP_DROP_RST_IGNORED) == 1


def test_rst_out_of_window_ignored(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.take_events()
    stack.input(peer.seg(seq=peer.snd_nxt + 10_000_000, flags=RST))
    stack.input(peer.seg(seq=peer.snd_nxt - 5, flags=RST))
    assert stack.take() == [] and stack.take_events() == []
    assert stack.info(conn).state == lib.TCP_ST_ESTABLISHED
    assert stack.drops(lib.TCP_DROP_RST_IGNORED) == 2


def test_syn_on_established_gets_challenge_ack(stack: Stack) -> None:
    peer, conn, _ = connect(stack)
    stack.input(peer.seg(seq=peer.snd_nxt + 5, flags=SYN))
    (challenge,) = stack.take()
    assert challenge.flags == ACK
    assert stack.info(conn).state == lib.TCP_ST_ESTABLISHED


def test_challenge_acks_are_rate_limited_per_connection(stack: Stack) -> None:
    # RFC 5961 7: a flood of SYNs and inexact in-window RSTs is not answered one for one.
    peer, conn, _ = connect(stack)
    _other_peer, other, _ = connect(stack, Peer(sport=40001))
    for i in range(100):
        stack.input(peer.seg(seq=peer.snd_nxt + 5 + i, flags=SYN))
        stack.input(peer.seg(seq=peer.snd_nxt + 1000 + i, flags=RST))
    answers = stack.take()
    assert len(answers) == lib.TCP_CHALLENGE_ACKS_PER_S
    assert all(a.flags == ACK and a.ack == peer.snd_nxt for a in answers)
    assert stack.stats().challenge_acks == lib.TCP_CHALLENGE_ACKS_PER_S
    assert stack.stats().challenge_acks_limited == 200 - lib.TCP_CHALLENGE_ACKS_PER_S
    assert stack.info(conn).state == lib.TCP_ST_ESTABLISHED
    # another connection keeps its own allowance, and the first gets its back a second later
    stack.input(Peer(sport=40001).seg(seq=999_999, flags=SYN))
    assert [a.dport for a in stack.take()] == [40001]
    assert stack.info(other).state == lib.TCP_ST_ESTABLISHED
    stack.now += 1.0
    stack.input(peer.seg(seq=peer.snd_nxt + 5, flags=SYN))
    assert len(stack.take()) == 1


def time_wait_conn(stack: Stack) -> tuple[Peer, int]:
    """A connection that we closed first, now in TIME-WAIT."""
    peer, conn, synack = connect(stack)
    lib.tcp_shutdown_write(stack.ptr, conn, stack.now)
    stack.take()
    stack.input(peer.seg(ack=synack.seq + 2))
    stack.input(peer.data(b"", flags=ACK | FIN))
    stack.take()
    assert stack.info(conn).state == lib.TCP_ST_TIME_WAIT
    stack.take_events()
    return peer, conn


def test_rst_does_not_end_time_wait() -> None:
    # RFC 1337: an RST (even an exact one) must not cut TIME-WAIT short.
    stack = Stack(time_wait_ms=1000)
    peer, conn = time_wait_conn(stack)
    stack.input(peer.seg(flags=RST))
    stack.input(peer.seg(flags=RST | ACK))
    assert stack.info(conn).state == lib.TCP_ST_TIME_WAIT
    assert stack.take() == [] and stack.take_events() == []
    assert stack.drops(lib.TCP_DROP_RST_IGNORED) == 2
    stack.run_until(stack.now + 1.1)
    assert stack.stats().time_wait == 0


def test_time_wait_reopens_only_for_a_higher_isn() -> None:
    # TIME-WAIT is 1 s, not 2 MSL (see _tcp.c); reuse stays safe by RFC 1122 4.2.2.13.
    stack = Stack(time_wait_ms=1000)
    peer, conn = time_wait_conn(stack)
    old = Peer(iss=peer.snd_nxt - 100)  # an ISN below the old connection's last sequence
    stack.input(old.syn())
    (challenge,) = stack.take()
    assert challenge.flags == ACK and challenge.ack == peer.snd_nxt
    assert stack.take_events() == [] and stack.info(conn).state == lib.TCP_ST_TIME_WAIT
    new = Peer(iss=peer.snd_nxt + 100_000)
    stack.input(new.syn())
    [(ev, new_conn, _)] = stack.take_events()
    assert ev == lib.TCP_EV_SYN and new_conn != conn
    assert stack.info(new_conn).state == lib.TCP_ST_SYN_PENDING


def test_sender_avoids_silly_windows() -> None:
    # RFC 1122 4.2.3.4: a peer offering slivers of window gets no stream of tiny segments.
    stack = Stack()
    peer, conn, synack = connect(stack, Peer(wscale=None))
    una = synack.seq + 1
    stack.write(conn, b"s" * 20 * MSS)
    first = stack.take()
    una += sum(len(s.payload) for s in first)
    for wnd in (1, 2, 10, 100, 500):  # everything ACKed, the window a sliver each time
        stack.input(peer.seg(ack=una, wnd=wnd))
        assert stack.take() == []
    stack.input(peer.seg(ack=una, wnd=MSS))  # a full segment fits: it goes at once
    (full,) = stack.take()
    assert len(full.payload) == MSS
    una += MSS
    stack.input(peer.seg(ack=una, wnd=40))
    assert stack.take() == []
    # nothing in flight, the window stays small: the persist timer lets the sliver go
    stack.now = lib.tcp_next_deadline(stack.ptr)
    lib.tcp_tick(stack.ptr, stack.now)
    (sliver,) = stack.take()
    assert len(sliver.payload) == 40 and sliver.seq == una
    # a short write that is all there is still goes at once (no Nagle)
    _peer2, conn2, _ = connect(stack, Peer(sport=40002, wscale=None))
    stack.write(conn2, b"hi")
    assert [s.payload for s in stack.take()] == [b"hi"]


# ---- drops, unknown connections, limits ----------------------------------------------------------
def test_bad_checksum_dropped_and_counted(stack: Stack) -> None:
    peer = Peer()
    assert stack.input(peer.syn().build(corrupt=True)) == 1
    assert stack.drops(lib.TCP_DROP_BAD_CHECKSUM) == 1
    assert stack.take() == [] and stack.take_events() == []
    assert ffi.string(lib.tcp_drop_reason_name(lib.TCP_DROP_BAD_CHECKSUM)) == b"bad_checksum"


def test_segment_for_unknown_connection_gets_rst(stack: Stack) -> None:
    stack.input(Seg(seq=500, ack=777, flags=ACK, payload=b"stale"))
    (rst,) = stack.take()
    assert rst.flags == RST and rst.seq == 777
    stack.input(Seg(seq=500, flags=FIN, payload=b"ab"))  # no ACK bit: RST+ACK of it
    (rst,) = stack.take()
    assert rst.flags == RST | ACK and rst.seq == 0 and rst.ack == 503
    stack.input(Seg(seq=500, flags=RST))  # never answer an RST
    assert stack.take() == []
    assert stack.drops(lib.TCP_DROP_NO_CONN) == 3


def test_malformed_and_bad_addresses(stack: Stack) -> None:
    good = Peer().syn().build()
    assert stack.input(good[:30]) == 1
    assert stack.input(Seg(flags=SYN, sport=0).build()) == 1
    assert stack.input(Seg(flags=SYN, dst_ip=0xFFFFFFFF).build()) == 1
    assert stack.drops(lib.TCP_DROP_MALFORMED) == 1
    assert stack.drops(lib.TCP_DROP_BAD_ADDRESS) == 2
    assert stack.stats().conns == 0


def test_half_open_limit_per_peer() -> None:
    stack = Stack(max_half_open_per_peer=2)
    for port in (1, 2, 3):
        stack.input(Peer(sport=port).syn(), peer=7)
    assert len(stack.take_events()) == 2
    (rst,) = stack.take()
    assert rst.flags & RST and rst.dport == 3
    assert stack.drops(lib.TCP_DROP_LIMIT_HALF_OPEN) == 1
    stack.input(Peer(sport=4).syn(), peer=8)  # another peer is not affected
    assert len(stack.take_events()) == 1
    opened, half = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    lib.tcp_peer_counts(stack.ptr, 7, opened, half)
    assert (opened[0], half[0]) == (2, 2)


def test_connection_limit_per_peer_and_total() -> None:
    stack = Stack(max_conns=3, max_conns_per_peer=2)
    for port in (1, 2):
        connect(stack, Peer(sport=port), peer_id=1)
    stack.input(Peer(sport=3).syn(), peer=1)
    assert stack.take()[0].flags & RST
    assert stack.drops(lib.TCP_DROP_LIMIT_PEER) == 1
    connect(stack, Peer(sport=4), peer_id=2)
    stack.input(Peer(sport=5).syn(), peer=2)
    assert stack.take()[0].flags & RST
    assert stack.drops(lib.TCP_DROP_LIMIT_CONNS) == 1


def test_time_wait_is_bounded() -> None:
    stack = Stack(time_wait_max=2, time_wait_ms=2000)
    for port in range(1, 6):
        peer, conn, synack = connect(stack, Peer(sport=port))
        lib.tcp_shutdown_write(stack.ptr, conn, stack.now)
        stack.input(peer.seg(ack=synack.seq + 2, flags=ACK | FIN))
        lib.tcp_release(stack.ptr, conn, stack.now)
        stack.take()
    st_ = stack.stats()
    assert st_.time_wait == 2 and st_.conns == 2


def test_time_wait_gives_way_when_table_full() -> None:
    stack = Stack(max_conns=1, time_wait_ms=2000)
    peer, conn, synack = connect(stack, Peer(sport=1))
    lib.tcp_shutdown_write(stack.ptr, conn, stack.now)
    stack.input(peer.seg(ack=synack.seq + 2, flags=ACK | FIN))
    lib.tcp_release(stack.ptr, conn, stack.now)
    stack.take()
    assert stack.stats().time_wait == 1
    connect(stack, Peer(sport=2))
    assert stack.stats().conns == 1


def test_handles_not_reused_soon() -> None:
    stack = Stack(max_conns=4)
    seen = set()
    for port in range(1, 20):
        stack.input(Peer(sport=port).syn())
        conn = stack.take_events()[0][1]
        assert conn not in seen and conn != 0
        seen.add(conn)
        lib.tcp_reject(stack.ptr, conn, stack.now)
        lib.tcp_release(stack.ptr, conn, stack.now)
        stack.take_events()
        assert stack.accept(conn) == lib.TCP_ENOCONN


def test_remove_peer_closes_its_connections() -> None:
    stack = Stack()
    _, c1, _ = connect(stack, Peer(sport=1), peer_id=1)
    _, c2, _ = connect(stack, Peer(sport=2), peer_id=2)
    stack.take_events()
    stack.take()
    assert lib.tcp_remove_peer(stack.ptr, 1, stack.now) == 1
    assert stack.take() == []  # nothing sent to a removed peer
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, c1, lib.TCP_CLOSE_PEER_REMOVED)]
    assert stack.info(c2).state == lib.TCP_ST_ESTABLISHED


# ---- a bulk transfer through a lossy, reordering link -------------------------------------------
class SimClient:
    """A small reliable TCP sender/receiver in Python: window of segments, go-back-N on a fixed
    timeout, fast retransmit on three dup ACKs; out-of-order data kept until the gap fills."""

    def __init__(self, upload: bytes) -> None:
        self.peer = Peer(sport=50000, dport=443)
        self.upload = upload
        self.una = 0  # offsets into upload; len(upload) is the FIN
        self.nxt = 0
        self.peer_wnd = 65535
        self.dupacks = 0
        self.rto_at = 0.0
        self.got = hashlib.sha256()
        self.got_len = 0
        self.got_fin = False
        self.base_rcv = 0
        self.ooo: dict[int, Seg] = {}

    def established(self, synack: Seg) -> None:
        self.peer.rcv_nxt = synack.seq + 1
        self.base_rcv = synack.seq + 1
        self.base_snd = self.peer.iss + 1

    def on_segment(self, seg: Seg, now: float) -> list[Seg]:
        out: list[Seg] = []
        if seg.flags & RST:
            # after a normal close, late ACKs (reordered) rightly meet an RST; before, never
            assert self.got_fin and self.una == len(self.upload) + 1, "reset during transfer"
            return out
        # receive
        if seg.payload or seg.flags & FIN:
            if ((seg.seq - self.peer.rcv_nxt) & 0xFFFFFFFF) < 1 << 30:
                self.ooo[seg.seq] = seg
            while self.peer.rcv_nxt in self.ooo:
                s = self.ooo.pop(self.peer.rcv_nxt)
                self.got.update(s.payload)
                self.got_len += len(s.payload)
                self.peer.rcv_nxt += len(s.payload)
                if s.flags & FIN:
                    self.peer.rcv_nxt += 1
                    self.got_fin = True
            out.append(self._seg(ACK, b"", self.nxt))
        # send side
        acked = (seg.ack - self.base_snd) & 0xFFFFFFFF
        self.peer_wnd = seg.wnd << 3
        if acked > self.una and acked <= len(self.upload) + 1:
            self.una = acked
            self.nxt = max(self.nxt, self.una)
            self.dupacks = 0
            self.rto_at = now + 0.3 if self.una < len(self.upload) + 1 else 0.0
        elif acked == self.una and not seg.payload and self.una < self.nxt:
            self.dupacks += 1
            if self.dupacks == 3:
                out.append(self._data_at(self.una))
        return out + self.pump(now)

    def _seg(self, flags: int, payload: bytes, off: int) -> Seg:
        return self.peer.seg(seq=self.base_snd + off, flags=flags, payload=payload, wnd=2048)

    def _data_at(self, off: int) -> Seg:
        if off >= len(self.upload):
            return self._seg(ACK | FIN, b"", len(self.upload))
        return self._seg(ACK | PSH, self.upload[off : off + MSS], off)

    def pump(self, now: float) -> list[Seg]:
        out = []
        limit = self.una + min(self.peer_wnd, 64 * 1024)
        while self.nxt <= len(self.upload) and self.nxt < limit:
            seg = self._data_at(self.nxt)
            out.append(seg)
            self.nxt += len(seg.payload) or 1
            if not self.rto_at:
                self.rto_at = now + 0.3
        return out

    def on_timer(self, now: float) -> list[Seg]:
        if self.rto_at and now >= self.rto_at and self.una <= len(self.upload):
            self.nxt = self.una
            self.rto_at = now + 0.3
            return self.pump(now)
        return []


def run_lossy_transfer(size: int, seed: int, loss: float, jitter: float = 0.004) -> float:
    """Both directions at once through a link with 5 ms delay, jitter (reordering) and random
    loss; returns the simulated seconds it took."""
    rng = random.Random(seed)
    upload = rng.randbytes(size)
    download = rng.randbytes(size)
    stack = Stack(sndbuf=256 * 1024, rcvbuf=256 * 1024)
    client = SimClient(upload)
    link: list[tuple[float, int, str, bytes]] = []
    counter = 0

    def send(direction: str, pkt: bytes) -> None:
        nonlocal counter
        if rng.random() < loss:
            return
        counter += 1
        heapq.heappush(link, (stack.now + 0.005 + rng.uniform(0, jitter), counter, direction, pkt))

    def flush_stack_out() -> None:
        for _, pkt in stack.raw_out:
            send("to_client", pkt)
        stack.raw_out.clear()
        stack.out.clear()

    start = stack.now
    stack.input(client.peer.syn())
    conn = stack.take_events()[0][1]
    stack.accept(conn)
    (synack,) = stack.take()
    stack.raw_out.clear()
    client.established(synack)
    stack.input(client._seg(ACK, b"", 0))
    written = 0
    up = hashlib.sha256()
    up_len = 0
    up_eof = False
    shut = False
    peak_mem = 0
    for seg in client.pump(stack.now):
        send("to_stack", seg.build())

    def app() -> None:
        nonlocal written, up_len, up_eof, shut
        for _ in stack.take_events():
            pass
        while True:
            r = stack.read(conn, 65536)
            if isinstance(r, int):
                if r == 0:
                    up_eof = True
                break
            up.update(r)
            up_len += len(r)
        while written < len(download):
            n = stack.write(conn, download[written : written + 65536])
            assert n >= 0
            if n == 0:
                break
            written += n
        if written == len(download) and not shut:
            assert lib.tcp_shutdown_write(stack.ptr, conn, stack.now) == 0
            shut = True

    app()
    flush_stack_out()
    steps = 0
    linger_until = 0.0
    while True:
        done = client.got_fin and up_eof and client.una == len(upload) + 1
        if done and not linger_until:
            linger_until = stack.now + 3.0  # let the last ACKs cross the link
            elapsed = stack.now - start
        steps += 1
        assert steps < 400_000, "transfer stalled"
        deadlines = [d for d in (lib.tcp_next_deadline(stack.ptr), client.rto_at) if d]
        if link:
            deadlines.append(link[0][0])
        if linger_until and (not deadlines or min(deadlines) > linger_until):
            break
        assert deadlines, "nothing in flight and nothing armed"
        stack.now = max(stack.now, min(deadlines))
        while link and link[0][0] <= stack.now:
            _, _, direction, pkt = heapq.heappop(link)
            if direction == "to_stack":
                stack.input(pkt)
            else:
                for reply in client.on_segment(parse(pkt), stack.now):
                    send("to_stack", reply.build())
        lib.tcp_flush(stack.ptr, stack.now)
        lib.tcp_tick(stack.ptr, stack.now)
        for reply in client.on_timer(stack.now):
            send("to_stack", reply.build())
        app()
        flush_stack_out()
        peak_mem = max(peak_mem, stack.stats().mem)
    assert up_len == len(upload) and up.digest() == hashlib.sha256(upload).digest()
    assert client.got_len == len(download)
    assert client.got.digest() == hashlib.sha256(download).digest()
    # bounded memory: one struct and at most the two ring buffers, whatever was transferred
    assert peak_mem <= 2 * 256 * 1024 + 4096
    stats = stack.stats()
    if loss:
        assert stats.retransmits > 0 and stats.fast_retransmits > 0
    assert stack.info(conn).close_reason == lib.TCP_CLOSE_NORMAL
    lib.tcp_release(stack.ptr, conn, stack.now)
    stack.run_until(stack.now + 5)
    assert stack.stats().conns == 0 and stack.stats().mem == 0
    return elapsed


def test_bulk_transfer_lossy_link_intact() -> None:
    run_lossy_transfer(3 * 1024 * 1024, seed=7, loss=0.02)


def test_bulk_transfer_clean_link() -> None:
    run_lossy_transfer(1024 * 1024, seed=8, loss=0.0)


# ---- fuzzing -------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    stack = Stack()
    stack.input(data)
    # with a plausible IPv4 header in front, the TCP parser sees the rest
    hdr = struct.pack("!BBHHHBBHII", 0x45, 0, 20 + len(data), 0, 0, 64, 6, 0, PEER_IP, DST_IP)
    stack.input(hdr + data)
    stack.advance(100)


segment_strategy = st.builds(
    dict,
    seq_off=st.integers(-70000, 70000) | st.sampled_from([0, 1, -1]),
    ack_off=st.integers(-70000, 70000) | st.sampled_from([0, 1, -1]),
    flags=st.integers(0, 63),
    wnd=st.integers(0, 65535),
    payload=st.binary(max_size=64) | st.just(b"P" * 1380),
    options=st.binary(max_size=40),
    dt=st.floats(0, 3),
    action=st.sampled_from(["none", "read", "write", "shutdown", "flush", "release"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(segment_strategy, max_size=25))
def test_random_segments_on_a_connection_never_crash(steps: list[dict[str, Any]]) -> None:
    stack = Stack(rcvbuf=8192, sndbuf=8192, max_conns=8)
    peer, conn, synack = connect(stack)
    released = False
    for step in steps:
        opts = step["options"][: 40 - (len(step["options"]) % 4 or 0)]
        seg = peer.seg(
            seq=peer.snd_nxt + step["seq_off"],
            ack=synack.seq + 1 + step["ack_off"],
            flags=step["flags"],
            wnd=step["wnd"],
            payload=step["payload"],
            raw_options=opts[: len(opts) - len(opts) % 4],
        )
        stack.input(seg)
        stack.advance(step["dt"])
        if not released:
            action = step["action"]
            if action == "read":
                stack.read(conn)
            elif action == "write":
                stack.write(conn, step["payload"] or b"x")
            elif action == "shutdown":
                lib.tcp_shutdown_write(stack.ptr, conn, stack.now)
            elif action == "flush":
                lib.tcp_flush(stack.ptr, stack.now)
            elif action == "release":
                lib.tcp_release(stack.ptr, conn, stack.now)
                released = True
        stack.take()
    if not released:
        lib.tcp_release(stack.ptr, conn, stack.now)
    # a new SYN on the tuple (after a reset) announced new handles: the owner releases them too
    for ev_type, handle, _ in stack.take_events():
        if ev_type == lib.TCP_EV_SYN:
            lib.tcp_release(stack.ptr, handle, stack.now)
    stack.run_until(stack.now + 1000)
    st_ = stack.stats()
    assert st_.conns == 0 and st_.mem == 0 and st_.open == 0 and st_.half_open == 0
    assert lib.tcp_next_deadline(stack.ptr) == 0


def test_pressure_ends_only_connections_a_zero_window_holds_open(stack: Stack) -> None:
    # RFC 6429: under resource pressure a connection kept open only by the peer's zero window
    # (it answers the probes, so RFC 1122 4.2.2.17 alone would keep it forever) may be aborted;
    # the peer's other connections stay.  Fails when pressure ends every connection of the peer.
    peer, stuck, synack = connect(stack, Peer(sport=40100))
    stack.input(peer.seg(ack=synack.seq + 1, wnd=0))
    assert stack.write(stuck, b"waiting") == 7
    _other, idle, _ = connect(stack, Peer(sport=40101))
    stack.take()
    stack.take_events()
    assert lib.tcp_abort_peer(stack.ptr, 0, lib.TCP_CLOSE_PRESSURE, stack.now) == 1
    assert stack.take_events() == [(lib.TCP_EV_CLOSED, stuck, lib.TCP_CLOSE_PRESSURE)]
    (rst,) = stack.take()
    assert rst.flags & RST and rst.dport == 40100
    assert stack.info(idle).state == lib.TCP_ST_ESTABLISHED
    assert lib.tcp_abort_peer(stack.ptr, 0, lib.TCP_CLOSE_PEER_GONE, stack.now) == 1  # the rest
