"""A UDP impairment relay: loss, reordering, duplication, delay and jitter, seeded.

    python -m tests.interop.impair --listen 127.0.0.1:51821 --to 192.168.77.1:51820 \\
        --loss 0.02 --reorder 0.02 --duplicate 0.01 --jitter-ms 5 --seed 1

Stands in for tc netem (not available here) between a WireGuard client and the gateway.
Datagrams from any client on --listen go to --to from a socket of that client's own, so the
far side sees one endpoint per client; answers go back to the client they belong to.  Both
directions are impaired with the same parameters and independent, seeded random streams.

Semantics (per direction):
- loss: the datagram is dropped.
- delay + jitter: each datagram is held delay + U(0, jitter) ms, but never overtakes the one
  before it (jitter alone does not reorder, as with netem's rate-limited jitter).
- reorder: the datagram is held reorder-ms longer and leaves the FIFO, so later ones overtake it.
- duplicate: a second copy leaves right after the first.
- queues are bounded (--max-queue datagrams per direction); beyond that datagrams are dropped
  and counted as overflow.

Prints `ready PORT` once bound; on SIGTERM/SIGINT (or after --max-seconds) prints its counters
as one JSON line and exits.  `Impairment` is the sans-IO core; `ImpairRelay` the socket glue.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import json
import random
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Generic, TypeVar

Endpoint = tuple[str, int]
T = TypeVar("T")

MAX_CLIENTS = 64
RECV_BATCH = 256
MAX_DATAGRAM = 65535


@dataclass(frozen=True, slots=True)
class ImpairParams:
    loss: float = 0.0
    reorder: float = 0.0
    duplicate: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder_ms: float = 10.0
    max_queue: int = 4096

    def __post_init__(self) -> None:
        for name in ("loss", "reorder", "duplicate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], not {value}")
        if min(self.delay_ms, self.jitter_ms, self.reorder_ms) < 0 or self.max_queue < 1:
            raise ValueError("delays must be >= 0 and max_queue >= 1")


@dataclass(slots=True)
class ImpairStats:
    received: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    overflow: int = 0
    delivered: int = 0


@dataclass(slots=True)
class Impairment(Generic[T]):
    """One direction's impairment: `offer` items as they arrive, take them back from `due`."""

    params: ImpairParams
    rng: random.Random
    stats: ImpairStats = field(default_factory=ImpairStats)
    _heap: list[tuple[float, int, T]] = field(default_factory=list)
    _seq: int = 0
    _fifo_tail: float = 0.0

    def _push(self, at: float, item: T) -> bool:
        if len(self._heap) >= self.params.max_queue:
            self.stats.overflow += 1
            return False
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, item))
        return True

    def offer(self, now: float, item: T) -> None:
        p = self.params
        self.stats.received += 1
        # Draw every decision for every datagram so one knob does not shift the others' stream.
        lose, reorder, dup, jitter = (self.rng.random() for _ in range(4))
        if lose < p.loss:
            self.stats.dropped += 1
            return
        at = now + (p.delay_ms + jitter * p.jitter_ms) / 1000.0
        if reorder < p.reorder:
            at += p.reorder_ms / 1000.0
            self.stats.reordered += 1
        else:
            at = max(at, self._fifo_tail)
            self._fifo_tail = at
        if self._push(at, item) and dup < p.duplicate:
            self.stats.duplicated += 1
            self._push(at, item)

    def next_deadline(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[T]:
        out: list[T] = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        self.stats.delivered += len(out)
        return out

    def __len__(self) -> int:
        return len(self._heap)


def parse_endpoint(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host, int(port)


class ImpairRelay:
    """The relay's sockets and loop; run it in a thread (`start`) or in the foreground (`run`)."""

    def __init__(self, listen: Endpoint, to: Endpoint, params: ImpairParams, seed: int = 0) -> None:
        self.to = to
        self.up: Impairment[tuple[socket.socket, bytes]] = Impairment(
            params, random.Random(seed * 2 + 1)
        )
        self.down: Impairment[tuple[Endpoint, bytes]] = Impairment(
            params, random.Random(seed * 2 + 2)
        )
        self.send_errors = 0
        self.refused_clients = 0
        self.clients_seen = 0
        self._sel = selectors.DefaultSelector()
        self._listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._listen.bind(listen)
        self._listen.setblocking(False)
        self._sel.register(self._listen, selectors.EVENT_READ, None)
        self._upstream: dict[Endpoint, socket.socket] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> Endpoint:
        host, port = self._listen.getsockname()[:2]
        return host, port

    def stats(self) -> dict[str, object]:
        return {
            "up": asdict(self.up.stats),
            "down": asdict(self.down.stats),
            "clients": self.clients_seen,
            "send_errors": self.send_errors,
            "refused_clients": self.refused_clients,
        }

    def _upstream_for(self, client: Endpoint) -> socket.socket | None:
        sock = self._upstream.get(client)
        if sock is None:
            if len(self._upstream) >= MAX_CLIENTS:
                self.refused_clients += 1
                return None
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect(self.to)
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ, client)
            self._upstream[client] = sock
            self.clients_seen += 1
        return sock

    def _drain(self, sock: socket.socket, client: Endpoint | None, now: float) -> None:
        for _ in range(RECV_BATCH):
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue  # ICMP unreachable from the far side: like a lost datagram
            if client is None:
                upstream = self._upstream_for((addr[0], addr[1]))
                if upstream is not None:
                    self.up.offer(now, (upstream, data))
            else:
                self.down.offer(now, (client, data))

    def _send(self, fn: Callable[[], object]) -> None:
        try:
            fn()
        except OSError as exc:
            # A full socket buffer or an unreachable far side: the datagram is lost, as it
            # would be on a real path.
            if exc.errno not in (errno.EAGAIN, errno.ECONNREFUSED, errno.ENOBUFS):
                raise
            self.send_errors += 1

    def run(self, max_seconds: float | None = None) -> None:
        end = None if max_seconds is None else time.monotonic() + max_seconds
        while not self._stop.is_set():
            now = time.monotonic()
            if end is not None and now >= end:
                return
            deadlines = [
                d for d in (self.up.next_deadline(), self.down.next_deadline()) if d is not None
            ]
            timeout = 0.05 if not deadlines else max(0.0, min(min(deadlines) - now, 0.05))
            for key, _ in self._sel.select(timeout):
                self._drain(key.fileobj, key.data, time.monotonic())  # type: ignore[arg-type]
            now = time.monotonic()
            for upstream, data in self.up.due(now):
                self._send(lambda s=upstream, d=data: s.send(d))
            for client, data in self.down.due(now):
                self._send(lambda c=client, d=data: self._listen.sendto(d, c))

    def start(self) -> ImpairRelay:
        self._thread = threading.Thread(target=self.run, name="impair-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.close()

    def close(self) -> None:
        for sock in [self._listen, *self._upstream.values()]:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            sock.close()
        self._upstream.clear()
        self._sel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.interop.impair")
    parser.add_argument("--listen", type=parse_endpoint, required=True, metavar="HOST:PORT")
    parser.add_argument("--to", type=parse_endpoint, required=True, metavar="HOST:PORT")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--reorder", type=float, default=0.0)
    parser.add_argument("--duplicate", type=float, default=0.0)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--reorder-ms", type=float, default=10.0)
    parser.add_argument("--max-queue", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself")
    args = parser.parse_args(argv)
    try:
        params = ImpairParams(
            loss=args.loss,
            reorder=args.reorder,
            duplicate=args.duplicate,
            delay_ms=args.delay_ms,
            jitter_ms=args.jitter_ms,
            reorder_ms=args.reorder_ms,
            max_queue=args.max_queue,
        )
    except ValueError as exc:
        parser.error(str(exc))
    relay = ImpairRelay(args.listen, args.to, params, args.seed)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: relay._stop.set())
    print(f"ready {relay.address[1]}", flush=True)
    try:
        relay.run(args.max_seconds)
    finally:
        print(json.dumps(relay.stats()), flush=True)
        relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
