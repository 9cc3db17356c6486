"""`unclaw-tui --no-ui`: the same gateway, with events printed one per line.

Plain lines by default; `--json` prints each event's `to_dict()` as a JSON object per line
(the schema is in the README).  Runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from unclaw_tui.config import Settings
from unclaw_tui.events import Event, Subscription

PRINT_BATCH = 1000
FORWARD_BATCH = 5000
# How often events are taken from the gateway and printed: output lags at most this much.
PRINT_INTERVAL = 0.05
# Events held for a slow reader of our output; past it the oldest are dropped and counted.
PRINT_BACKLOG = 100_000
# Fields shown first in a plain line, when the event has them.
_LEAD_FIELDS = ("name", "ip", "endpoint")


def format_plain(event: Event) -> str:
    data = event.to_dict()
    stamp = time.strftime("%H:%M:%S", time.localtime(data.pop("ts")))
    kind = data.pop("type")
    parts = [stamp, kind]
    parts += [str(data.pop(k)) for k in _LEAD_FIELDS if data.get(k) not in (None, "")]
    parts += [f"{k}={v}" for k, v in data.items() if v not in (None, "")]
    return " ".join(parts)


_JSON = json.JSONEncoder(separators=(",", ":"))  # json.dumps with options builds one per call


def format_json(event: Event) -> str:
    return _JSON.encode(event.to_dict())


class EventPrinter:
    """Prints events from a thread of its own, so a slow reader of our output (a paused pager,
    a full pipe) never stalls the gateway's loop: events wait in a bounded backlog, and if even
    that fills, the oldest are dropped and a line says how many."""

    def __init__(
        self, out: TextIO, fmt: Callable[[Event], str], backlog: int = PRINT_BACKLOG
    ) -> None:
        self._out = out
        self._fmt = fmt
        self._backlog: collections.deque[Event] = collections.deque()
        self._limit = backlog
        self._dropped = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="event-printer", daemon=True)
        self._thread.start()

    async def forward(self, events: Subscription) -> None:
        """Move events into the backlog until the subscription ends, a batch at a time: at
        thousands of connections a second, a wake-up of this thread per event cost the gateway
        more than the printing."""
        async for batch in events.batches(FORWARD_BATCH, PRINT_INTERVAL):
            self.put(batch)

    def put(self, events: list[Event]) -> None:
        with self._lock:
            backlog = self._backlog
            backlog.extend(events)
            excess = len(backlog) - self._limit
            for _ in range(max(0, excess)):
                backlog.popleft()
            self._dropped += max(0, excess)
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Print what is left (waiting at most timeout s for the reader), then stop."""
        self._closing = True
        self._wake.set()
        self._thread.join(timeout)

    def _take(self) -> tuple[list[Event], int]:
        with self._lock:
            batch = [self._backlog.popleft() for _ in range(min(PRINT_BATCH, len(self._backlog)))]
            dropped, self._dropped = self._dropped, 0
        return batch, dropped

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while True:
                batch, dropped = self._take()
                if not batch and not dropped:
                    break
                lines = [self._fmt(event) for event in batch]
                if dropped:
                    lines.insert(0, self._dropped_line(dropped))
                try:
                    # One write and one flush per batch: a flush per event cost ~15 % of the
                    # gateway's time when connections come and go fast.
                    self._out.write("\n".join(lines) + "\n")
                    self._out.flush()
                except (OSError, ValueError):  # the reader went away: nothing left to do
                    return
            if self._closing:
                return

    def _dropped_line(self, count: int) -> str:
        if self._fmt is format_json:
            line = {"ts": round(time.time(), 3), "type": "events_dropped", "count": count}
            return json.dumps(line, separators=(",", ":"))
        return f"{time.strftime('%H:%M:%S')} events_dropped count={count} (output too slow)"


async def run_headless(
    settings: Settings, out: TextIO | None = None, on_started: Callable[[], None] | None = None
) -> int:
    """Run until SIGINT/SIGTERM; on_started is called once the gateway listens."""
    from unclaw_tui.gateway import Gateway
    from unclaw_tui.state import StateError

    out = out or sys.stdout
    fmt = format_json if settings.json_events else format_plain
    try:
        gateway = Gateway(settings)
    except StateError as exc:
        print(f"unclaw-tui: error: {exc}", file=sys.stderr)
        return 2
    events = gateway.subscribe()
    try:
        await gateway.start()
    except OSError as exc:
        print(
            f"unclaw-tui: error: cannot listen on UDP port {settings.listen_port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    if on_started is not None:
        on_started()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    printer = EventPrinter(out, fmt)
    printing = asyncio.create_task(printer.forward(events))
    try:
        await stop.wait()
    finally:
        await gateway.stop()
        events.close()
        with contextlib.suppress(asyncio.CancelledError):
            await printing
        printer.close()
    return 0


def run(settings: Settings, on_started: Callable[[], None] | None = None) -> int:
    """Run headless on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_headless(settings, on_started=on_started))
    return uvloop.run(run_headless(settings, on_started=on_started))
