"""Python's side of carrying a connection: sockets to the destination, and the pump that copies
between two pairs of asyncio streams (the peer's and the destination's) with back-pressure.

The engine relays most connections in C (splices); this pump carries those whose bytes Python
must see (TLS interception) or that C cannot take. It reads in large chunks and `drain()`s after
each write, so a slow side stalls the other side's reads and memory per connection stays bounded
by the buffers. EOF one way is passed on as a half-close while the other way keeps running; an
error either way aborts both. Payload is never kept, only counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from unclaw_tui.config import DEFAULT_TCP_BUFFER
from unclaw_tui.engine import connect_error, describe_os_error

DEFAULT_CONNECT_TIMEOUT = 10.0
MIN_READ_SIZE = 64 * 1024
CLOSE_WAIT = 5.0  # seconds to let a closing side flush before giving up on it


class Counters(Protocol):
    """What the pump counts into (a `Flow`, or a `SpliceStats`)."""

    bytes_up: int
    bytes_down: int
    error: str | None


class ConnectFailed(Exception):
    """The destination could not be reached; str() is the short reason for the event."""


async def connect_host(
    ip: str,
    port: int,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    buffer_size: int = DEFAULT_TCP_BUFFER,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from this host, with TCP_NODELAY and buffers bounded by buffer_size."""
    return await host_streams(await connect_socket(ip, port, timeout=timeout), buffer_size)


async def host_streams(
    sock: socket.socket, buffer_size: int = DEFAULT_TCP_BUFFER
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over a connected host socket, with buffers bounded by buffer_size."""
    reader, writer = await asyncio.open_connection(sock=sock, limit=buffer_size)
    writer.transport.set_write_buffer_limits(high=buffer_size)
    return reader, writer


async def connect_socket(
    ip: str, port: int, *, timeout: float = DEFAULT_CONNECT_TIMEOUT
) -> socket.socket:
    """A connected non-blocking TCP socket from this host (TCP_NODELAY), for the engine's
    splices to take over; errors as `connect_host`."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (ip, port)), timeout)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, TimeoutError | OSError):
            raise ConnectFailed(connect_error(exc, timeout)) from None
        raise
    return sock


_LINGER_ZERO = struct.pack("ii", 1, 0)


def reset_host_connection(writer: asyncio.StreamWriter) -> None:
    """Abort with an RST, not a FIN: a plain close would tell the destination that the data so
    far was complete, when the peer's side actually failed."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    writer.transport.abort()


@dataclass(slots=True)
class SpliceStats:
    """Live counters of a pump; `error` is set when it ended abnormally (a `Flow` has the
    same three attributes and is what the services pass)."""

    bytes_up: int = 0  # peer -> destination
    bytes_down: int = 0  # destination -> peer
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a splice: its streams and how to abort it (RST)."""

    name: str  # "peer" / "destination", for error messages
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    abort: Callable[[], None]


class _SideFailed(Exception):
    def __init__(self, side: str, exc: BaseException) -> None:
        super().__init__(f"{side}: {describe_os_error(exc)}")


async def _pump(src: Side, dst: Side, read_size: int, stats: Counters, counter: str) -> None:
    while True:
        try:
            data = await src.reader.read(read_size)
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise _SideFailed(src.name, exc) from exc
        try:
            if not data:
                # Half-close: pass the EOF on, the other direction keeps running.
                if dst.writer.can_write_eof():
                    dst.writer.write_eof()
                return
            dst.writer.write(data)
            setattr(stats, counter, getattr(stats, counter) + len(data))
            await dst.writer.drain()  # back-pressure: stop reading while dst is full
        except (OSError, RuntimeError) as exc:
            raise _SideFailed(dst.name, exc) from exc


async def _close_gracefully(side: Side) -> None:
    side.writer.close()
    try:
        await asyncio.wait_for(side.writer.wait_closed(), CLOSE_WAIT)
    except (OSError, TimeoutError):
        side.abort()


async def splice(
    peer: Side,
    destination: Side,
    *,
    read_size: int = MIN_READ_SIZE,
    stats: Counters | None = None,
) -> Counters:
    """Copy both ways until both have seen EOF (then close both) or either fails (then abort
    both). Cancelling aborts both. Counters in `stats` are live while it runs."""
    stats = stats if stats is not None else SpliceStats()
    up = asyncio.ensure_future(_pump(peer, destination, read_size, stats, "bytes_up"))
    down = asyncio.ensure_future(_pump(destination, peer, read_size, stats, "bytes_down"))
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        stats.error = "cancelled"
        _abort_all(peer, destination, up, down)
        raise
    for task in (up, down):
        exc = task.exception() if task.done() else None
        if exc is not None:
            stats.error = str(exc) if isinstance(exc, _SideFailed) else describe_os_error(exc)
            _abort_all(peer, destination, up, down)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(up, down, return_exceptions=True)
            return stats
    await asyncio.gather(_close_gracefully(peer), _close_gracefully(destination))
    return stats


def _abort_all(peer: Side, destination: Side, *tasks: asyncio.Future[None]) -> None:
    for task in tasks:
        task.cancel()
        # Nobody awaits them on this path: fetch the outcome so asyncio does not log it.
        task.add_done_callback(_consume_outcome)
    for side in (peer, destination):
        with contextlib.suppress(Exception):
            side.abort()


def _consume_outcome(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
