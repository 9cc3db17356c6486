"""Flood senders for tests/interop/test_floods.py, run as subprocesses in a client namespace.

    python -m tests.interop.flood handshake HOST PORT --public-key B64 --sources A,B,C \
        --rate 4000 --seconds 10
        WireGuard initiations from unknown keys (valid MAC1: it only needs the gateway's public
        key), a pool replayed round-robin from one UDP socket per source address; counts the
        cookie replies that come back.  --connect: each socket is connected to HOST PORT, so the
        kernel only lets through replies from exactly that address (IPv6 HOST and sources too).
    python -m tests.interop.flood syn HOST PORT --count 40
        `count` TCP connects at once (one SYN each); reports which were refused (RST) at once.
    python -m tests.interop.flood hold HOST PORT --count 16 --hold 2
        `count` TCP connections opened one after another and held open together.

Each prints one JSON object.  Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import json
import os
import select
import socket
import time
from typing import Any

from unclaw_tui.engine.noise import HandshakeCore

COOKIE_REPLY_TYPE = 3


def initiation_pool(gateway_public_key: bytes, size: int) -> list[bytes]:
    """Initiations from `size` random identities the gateway does not know."""
    pool = []
    for i in range(size):
        core = HandshakeCore(os.urandom(32))
        core.add_peer(gateway_public_key)
        pool.append(core.create_initiation(gateway_public_key, 0x10000 + i, time.monotonic()))
    return pool


def handshake_flood(
    host: str,
    port: int,
    public_key: bytes,
    sources: list[str],
    rate: int,
    seconds: float,
    connect: bool = False,
) -> dict[str, Any]:
    pool = initiation_pool(public_key, 128)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for src in sources:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((src, 0))
        if connect:
            sock.connect((host, port))
        sock.setblocking(False)
        socks.append(sock)
    sent = cookies = 0
    t0 = time.monotonic()
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    while (now := time.monotonic()) - t0 < seconds:
        due = int((now - t0) * rate)
        burst = min(per_tick * 4, due - sent)
        for _ in range(max(0, burst)):
            sock = socks[sent % len(socks)]
            with contextlib.suppress(BlockingIOError):  # a full socket buffer: the flood goes on
                if connect:
                    sock.send(pool[sent % len(pool)])
                else:
                    sock.sendto(pool[sent % len(pool)], (host, port))
            sent += 1
        readable, _, _ = select.select(socks, [], [], tick)
        for sock in readable:
            for _ in range(256):
                try:
                    data = sock.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if data[:1] == bytes([COOKIE_REPLY_TYPE]):
                    cookies += 1
    elapsed = time.monotonic() - t0
    for sock in socks:
        sock.close()
    return {"sent": sent, "cookie_replies": cookies, "seconds": elapsed, "rate": sent / elapsed}


def syn_burst(host: str, port: int, count: int, fast: float, wait: float) -> dict[str, Any]:
    """Start `count` connects together; a refusal within `fast` seconds was the gateway's RST."""
    t0 = time.monotonic()
    pending: dict[socket.socket, int] = {}
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err not in (errno.EINPROGRESS, 0):
            raise OSError(err, f"connect {i}")
        pending[sock] = i
    outcome: dict[str, int] = {"refused_fast": 0, "refused_late": 0, "connected": 0, "other": 0}
    while pending and time.monotonic() - t0 < wait:
        _, writable, _ = select.select([], list(pending), [], 0.05)
        for sock in writable:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                outcome["connected"] += 1
            elif err == errno.ECONNREFUSED:
                late = time.monotonic() - t0 > fast
                outcome["refused_late" if late else "refused_fast"] += 1
            else:
                outcome["other"] += 1
            del pending[sock]
            sock.close()
    outcome["pending"] = len(pending)
    for sock in pending:
        sock.close()
    return outcome


def hold_connections(
    host: str, port: int, count: int, hold: float, request: bytes = b""
) -> dict[str, Any]:
    """Connect one at a time (so no more than one is half-open), keep them all, then close.
    With `request`, send it on each and never read: a small receive buffer fills at once and
    the connection sits on a zero window (a client that stopped reading)."""
    held: list[socket.socket] = []
    outcome = {"connected": 0, "refused": 0, "other": 0}
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            if request:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            try:
                sock.connect((host, port))
                if request:
                    sock.sendall(request)
            except ConnectionRefusedError:
                outcome["refused"] += 1
                sock.close()
                continue
            except OSError:
                outcome["other"] += 1
                sock.close()
                continue
            outcome["connected"] += 1
            held.append(sock)
        time.sleep(hold)  # the behaviour: connections held open `hold` seconds
    finally:
        for sock in held:
            sock.close()
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flood")
    kinds = parser.add_subparsers(dest="kind", required=True)
    hs = kinds.add_parser("handshake")
    hs.add_argument("host")
    hs.add_argument("port", type=int)
    hs.add_argument("--public-key", required=True)
    hs.add_argument("--sources", required=True, help="comma-separated source addresses")
    hs.add_argument("--rate", type=int, default=4000)
    hs.add_argument("--seconds", type=float, default=10.0)
    hs.add_argument("--connect", action="store_true", help="connected sockets (see above)")
    syn = kinds.add_parser("syn")
    syn.add_argument("host")
    syn.add_argument("port", type=int)
    syn.add_argument("--count", type=int, default=40)
    syn.add_argument("--fast", type=float, default=0.5)
    syn.add_argument("--wait", type=float, default=2.0)
    keep = kinds.add_parser("hold")
    keep.add_argument("host")
    keep.add_argument("port", type=int)
    keep.add_argument("--count", type=int, default=16)
    keep.add_argument("--hold", type=float, default=2.0)
    keep.add_argument("--request", default="", help="sent on each connection, never read after")
    args = parser.parse_args(argv)
    if args.kind == "handshake":
        result = handshake_flood(
            args.host,
            args.port,
            base64.b64decode(args.public_key),
            args.sources.split(","),
            min(args.rate, 50_000),
            min(args.seconds, 60.0),
            args.connect,
        )
    elif args.kind == "hold":
        result = hold_connections(
            args.host, args.port, min(args.count, 4096), min(args.hold, 30), args.request.encode()
        )
    else:
        result = syn_burst(args.host, args.port, min(args.count, 4096), args.fast, args.wait)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
