"""Who runs the engine: its receiving, its timers, and how Python hears that work waits for it.

Two drivers, one seam (`Driver`):
- `ThreadDriver` (production, where eventfd exists): C receives on a thread of its own
  (`_worker.h`): it waits on the UDP socket, the splices' sockets and the engine's timers, and
  wakes the event loop through an eventfd only when something waits for Python. Every use of
  the engine from Python then holds the engine lock (`Engine.locked` around a sequence, else
  per call). Its clock is CLOCK_MONOTONIC, the worker's.
- `LoopDriver` (`--no-engine-thread`, and tests that need a fake clock): the event loop watches
  the UDP socket and the splices' epoll fd itself, and one timer armed at the earliest of C's
  deadline and Python's own drives the engine's timers.

Either way, all of the package's Python runs on the event loop's thread, and the driver calls
`on_work(now)` (the tunnel's dispatch) when the engine has work for Python, under the engine
lock, and `on_timer(now)` when Python's own deadline (`deadlines()`) is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable

from unclaw_tui.engine import _ffi

log = logging.getLogger(__name__)

# How many datagrams one readable callback may take before yielding to the loop.
RECV_BUDGET = 4096


class Driver:
    """The seam (see the module docstring); subclasses say who receives and runs C's timers."""

    def __init__(
        self,
        engine: _ffi.Engine,
        on_work: Callable[[float], None],
        on_timer: Callable[[float], None],
        deadlines: Callable[[], Iterable[float]],
    ) -> None:
        self.engine = engine
        self._on_work = on_work
        self._on_timer = on_timer
        self._deadlines = deadlines
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self.started = False
        self.closed = False

    # -- what both drivers do ----------------------------------------------------------------

    def now(self) -> float:
        raise NotImplementedError

    async def start(self, sock: socket.socket) -> None:
        self._loop = asyncio.get_running_loop()
        self.started = True

    def stop(self) -> None:
        """From here on the engine is this thread's alone; no more callbacks."""
        self.closed = True
        self.cancel_timer()

    def call(self, fn: Callable[[_ffi.Engine, float], object]) -> object:
        """Run one engine call for a flow, then make sure its packets go out this loop turn."""
        result = fn(self.engine, self.now())
        self.flush_soon()
        return result

    def flush_soon(self) -> None:
        """Handle what the engine raised and send what is queued, later in this loop turn."""
        if not self._flush_scheduled and self._loop is not None and not self.closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._work()

    def _work(self) -> None:
        if not self.closed:
            with self.engine.locked():
                self._on_work(self.now())

    def later(self, fn: Callable[[], object]) -> None:
        """Call fn on the loop, soon (once started)."""
        if self._loop is not None:
            self._loop.call_soon(fn)

    def splices_started(self) -> None:
        """A splice was started this turn: its sockets must be watched."""

    def engine_deadline(self) -> float | None:
        """The engine's own deadline, when Python's timer has to drive it."""
        return None

    def rearm(self, engine_deadline: float | None = None) -> None:
        """Arm the single timer for the earliest of `engine_deadline` and Python's own."""
        if self._loop is None or self.closed:
            return
        deadlines = [engine_deadline] if engine_deadline else []
        deadlines += self._deadlines()
        if not deadlines:
            return
        at = min(deadlines)
        if self._timer is not None:
            if self._timer_at is not None and self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer = self._loop.call_later(max(0.0, at - self.now()), self._timer_due)
        self._timer_at = at

    def cancel_timer(self) -> None:
        """Disarm Python's timer until the next `rearm`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    def fire_timer(self) -> None:
        """Run what the timer runs, now (tests with a fake clock step time by hand)."""
        self._timer_due()

    def _timer_due(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        with self.engine.locked():
            now = self.now()
            self._tick(now)
            self._on_timer(now)

    def _tick(self, now: float) -> None:
        """Run the engine's timers, if this driver is the one that must."""


class ThreadDriver(Driver):
    """C's own thread receives and runs the engine's timers (see the module docstring)."""

    _notify_fd: int | None = None  # the worker's eventfd, once started

    @staticmethod
    def available() -> bool:
        return hasattr(os, "eventfd")

    def now(self) -> float:
        return time.monotonic()  # the worker's clock (CLOCK_MONOTONIC)

    def rearm(self, engine_deadline: float | None = None) -> None:
        super().rearm(None)  # the worker runs the engine's timers: only Python's own here

    async def start(self, sock: socket.socket) -> None:
        await super().start(sock)
        assert self._loop is not None
        self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self.engine.worker_start(self._notify_fd)
        except OSError:
            os.close(self._notify_fd)
            self._notify_fd = None
            raise
        self._loop.add_reader(self._notify_fd, self._on_notify)
        self.rearm()

    def stop(self) -> None:
        self.engine.worker_stop()
        if self._notify_fd is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._notify_fd)
            os.close(self._notify_fd)
            self._notify_fd = None
        super().stop()

    def _on_notify(self) -> None:
        """The worker says the engine has work for us."""
        assert self._notify_fd is not None
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._notify_fd)
        self._work()


class LoopDriver(Driver):
    """The event loop receives and drives the engine's timers (see the module docstring)."""

    _sock: socket.socket | None = None  # the UDP socket, once started
    _splice_watched = False  # the splices' epoll fd is watched (from the first splice on)

    def __init__(
        self, *args: object, clock: Callable[[], float] | None = None, **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._clock = clock

    def now(self) -> float:
        if self._clock is not None:
            return self._clock()
        assert self._loop is not None
        return self._loop.time()

    async def start(self, sock: socket.socket) -> None:
        await super().start(sock)
        assert self._loop is not None
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self.rearm(self.engine_deadline())

    def stop(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                if self._splice_watched:
                    self._loop.remove_reader(self.engine.splice_fd())
                if self._sock is not None:
                    self._loop.remove_reader(self._sock.fileno())
        super().stop()

    def engine_deadline(self) -> float | None:
        return self.engine.next_deadline()

    def splices_started(self) -> None:
        if not self._splice_watched and self._loop is not None:
            self._loop.add_reader(self.engine.splice_fd(), self._on_splice_ready)
            self._splice_watched = True

    def _on_readable(self) -> None:
        if self.closed:
            return
        now = self.now()
        try:
            self.engine.io_recv(now, RECV_BUDGET)
        except OSError as exc:  # e.g. ICMP errors surfaced on the socket: keep serving
            log.debug("UDP receive error: %s", exc)
        self._on_work(now)

    def _on_splice_ready(self) -> None:
        if self.closed:
            return
        now = self.now()
        self.engine.splice_service(now)
        self._on_work(now)

    def _tick(self, now: float) -> None:
        self.engine.tick(now)
