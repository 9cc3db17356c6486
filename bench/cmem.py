"""The C core's memory per idle TCP connection and per idle peer, measured in-process.

    python -m bench.cmem                       # 10,000 connections, 1,000 peers (~20 s)
    python -m bench.cmem --conns 2000 --peers 200

No namespaces: one engine driven sans-IO, the way the unit tests drive it (a scripted peer
encrypts hand-built segments with a known key; helpers of tests/unit).  Two measures:

- the C stack's own accounting: `tcp_stats().mem` (heap bytes held by connections, struct and
  buffers) divided by the connections;
- glibc's heap in use (`mallinfo2()`: uordblks + hblkhd) before and after, divided by the
  count: every C allocation the step made (connection structs, buffers, hash growth, keypairs,
  route table growth), malloc's own overhead included.  Python allocations in the window are
  kept out by building every packet first and dropping temporary lists before reading.

Per peer: the engine allocates a peer slot and a timer slot for each of `max_peers` up front;
that size per slot is measured as the heap difference between engines made with `max_peers`
4096 and 8192, divided by 4096.  A peer's allocations when it is added, given its allowed IP,
its endpoint and a current keypair (as after a handshake) come on top; both are reported and
their sum is the figure compared with the target.

Connections are measured in two idle states: right after the handshake (never carried data)
and after a 1 KiB request and a 1 KiB response, read and acknowledged (buffers the stack kept).
The table arrays sized by the connection limit (65,536 slots by default) are fixed costs,
reported per slot separately.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from typing import Any

from bench.common import Figure, figures_table, machine_description, save_figures

PART = "cmem"
CONN_TARGET = 4096
PEER_TARGET = 2048


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _Mallinfo2


def heap_in_use() -> int:
    gc.collect()
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def measure_connections(count: int) -> dict[str, Any]:
    from tests.unit.test_tcp import Peer
    from tests.unit.test_wgstack_flows import Client, new_engine
    from unclaw_tui.engine import _ffi

    engine = new_engine(tcp_max_conns_per_peer=count, tcp_max_half_open_per_peer=count)
    client = Client(engine)
    peers = [Peer(sport=10000 + i) for i in range(count)]
    batch = 500
    base_heap = heap_in_use()
    base_mem = engine.tcp_stats()["mem"]
    conns: dict[int, int] = {}
    for start in range(0, count, batch):
        chunk = peers[start : start + batch]
        client.send(*(p.syn() for p in chunk))
        for _, conn, _ in engine.tcp_events():
            conns[engine.tcp_info(conn).src[1]] = conn
        for p in chunk:
            engine.tcp_accept(conns[p.sport], client.now)
        for synack in client.segments():
            peers[synack.dport - 10000].rcv_nxt = (synack.seq + 1) & 0xFFFFFFFF
        client.send(*(p.seg() for p in chunk))
        engine.tcp_events()
    stats = engine.tcp_stats()
    states = {engine.tcp_info(c).state for c in list(conns.values())[:50]}
    assert states == {_ffi.TCP_ST_ESTABLISHED}, states
    fresh = {
        "conns": stats["open"],
        "c_mem": (stats["mem"] - base_mem) / max(1, stats["open"]),
        "heap": (heap_in_use() - base_heap) / max(1, stats["open"]),
    }
    # A 1 KiB request in, read; a 1 KiB response out, acknowledged by the peer.
    request, response = bytes(1024), bytes(1024)
    for start in range(0, count, batch):
        chunk = peers[start : start + batch]
        client.send(*(p.data(request) for p in chunk))
        engine.tcp_events()
        for p in chunk:
            engine.tcp_read(conns[p.sport], 4096, client.now)
            engine.tcp_write(conns[p.sport], response, client.now)
        engine.tcp_flush(client.now)
        acks = []
        for seg in client.segments():
            if seg.payload:
                peer = peers[seg.dport - 10000]
                peer.rcv_nxt = (seg.seq + len(seg.payload)) & 0xFFFFFFFF
                acks.append(peer)
        client.send(*(p.seg() for p in acks))
        engine.tcp_events()
    client.now += 1.0
    engine.tick(client.now)  # delayed ACKs and timers settle
    client.segments()
    stats = engine.tcp_stats()
    used = {
        "conns": stats["open"],
        "c_mem": (stats["mem"] - base_mem) / max(1, stats["open"]),
        "heap": (heap_in_use() - base_heap) / max(1, stats["open"]),
    }
    engine.close()
    return {"fresh": fresh, "used": used}


def measure_tables() -> dict[str, float]:
    """Fixed costs per slot: peer slots (max_peers) and connection table slots (max_conns)."""
    from unclaw_tui.engine._ffi import Engine

    def engine_heap(**kw: int) -> int:
        before = heap_in_use()
        engine = Engine("10.77.0.1", 24, **kw)
        size = heap_in_use() - before
        engine.close()
        del engine
        return size

    peers_4k = engine_heap(max_peers=4096)
    peers_8k = engine_heap(max_peers=8192)
    conns_64k = engine_heap(tcp_max_conns=65536)
    conns_128k = engine_heap(tcp_max_conns=131072)
    return {
        "peer_slot": (peers_8k - peers_4k) / 4096,
        "conn_slot": (conns_128k - conns_64k) / 65536,
        "engine_default": float(peers_4k),
    }


def measure_peers(count: int) -> dict[str, float]:
    """Heap per peer added with an allowed IP, an endpoint and a current keypair."""
    from unclaw_tui.engine._ffi import Engine

    engine = Engine("10.77.0.1", 16, max_peers=max(4096, count + 1))
    keys = [(i.to_bytes(4, "big") * 8, (i + 7).to_bytes(4, "big") * 8) for i in range(count)]
    ips = [f"10.77.{(i + 2) // 256}.{(i + 2) % 256}/32" for i in range(count)]
    endpoints = [("192.0.2.10", 20000 + i) for i in range(count)]
    before = heap_in_use()
    for i in range(count):
        engine.peer_add(i, 25)
        engine.peer_add_allowed_ip(i, ips[i])
        engine.peer_set_endpoint(i, endpoints[i])
        send, recv = keys[i]
        engine.install_keypair(i, 0x1000 + i, 0x2000 + i, send, recv, True, 1000.0)
        if i % 256 == 255:
            engine.outputs()  # the keepalive each initiator keypair sends
            engine.events()
    engine.outputs()
    engine.events()
    per_peer = (heap_in_use() - before) / count
    engine.close()
    return {"added": per_peer}


def run(conns: int = 10_000, peers: int = 1_000) -> list[Figure]:
    c = measure_connections(conns)
    t = measure_tables()
    p = measure_peers(peers)
    per_peer = t["peer_slot"] + p["added"]
    idle_fresh = max(c["fresh"]["heap"], c["fresh"]["c_mem"])
    idle_used = max(c["used"]["heap"], c["used"]["c_mem"])
    figures = [
        Figure(PART, "C bytes per idle TCP connection (after handshake)", "B", idle_fresh,
               CONN_TARGET, "target", f"<= {CONN_TARGET} B", idle_fresh <= CONN_TARGET,
               note=f"tcp_stats mem {c['fresh']['c_mem']:.0f} B, heap {c['fresh']['heap']:.0f} B"),
        Figure(PART, "C bytes per idle TCP connection (after 1 KiB each way)", "B", idle_used,
               CONN_TARGET, "target", f"<= {CONN_TARGET} B", idle_used <= CONN_TARGET,
               note=f"tcp_stats mem {c['used']['c_mem']:.0f} B, heap {c['used']['heap']:.0f} B"),
        Figure(PART, "C bytes per connection-table slot (fixed, 65,536 slots)", "B",
               t["conn_slot"]),
        Figure(PART, "C bytes per idle peer (slot + keypair, IP, endpoint)", "B", per_peer,
               PEER_TARGET, "target", f"<= {PEER_TARGET} B", per_peer <= PEER_TARGET,
               note=f"slot {t['peer_slot']:.0f} B + added {p['added']:.0f} B"),
    ]  # fmt: skip
    report = (
        "# The C core's memory per idle connection and per idle peer\n\n"
        f"`python -m bench.cmem --conns {conns} --peers {peers}` on {machine_description()}.\n\n"
        "In-process, sans-IO (see the module docstring for the method).  The figure is the "
        "larger of the C stack's own accounting and glibc's heap delta.\n\n"
        f"{figures_table(figures)}\n\n"
        f"An engine with the default limits (4,096 peers, 65,536 connection slots, rings and "
        f"the UDP arena) holds {t['engine_default'] / 1048576:.1f} MiB before any peer.\n"
    )
    save_figures(PART, figures, report)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cmem", description=__doc__)
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--peers", type=int, default=1_000)
    args = parser.parse_args(argv)
    run(args.conns, args.peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
