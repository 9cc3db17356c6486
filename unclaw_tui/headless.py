"""`unclaw-tui --no-ui`: the same gateway, with events printed one per line.

Plain lines by default; `--json` prints each event's `to_dict()` as a JSON object per line
(the schema is in the README).  Runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from unclaw_tui.bus import Subscription
from unclaw_tui.config import Settings
from unclaw_tui.events import Event, EventsDropped

PRINT_BATCH = 1000
# How often events are taken and printed while they come: output lags at most this much.
PRINT_INTERVAL = 0.05
# Events held for a slow reader of our output; past it the oldest are dropped and counted.
PRINT_BACKLOG = 100_000
# While events are being dropped, an events_dropped line at most this often (seconds).
DROPS_REPORT_INTERVAL = 1.0
# Fields shown first in a plain line, when the event has them.
_LEAD_FIELDS = ("name", "ip", "endpoint")


def format_plain(event: Event) -> str:
    data = event.to_dict()
    stamp = time.strftime("%H:%M:%S", time.localtime(data.pop("ts")))
    kind = data.pop("type")
    parts = [stamp, kind]
    parts += [str(data.pop(k)) for k in _LEAD_FIELDS if data.get(k) not in (None, "")]
    parts += [f"{k}={_plain_value(v)}" for k, v in data.items() if v not in (None, "", {})]
    if isinstance(event, EventsDropped):
        parts.append("(output too slow)")
    return " ".join(parts)


def _plain_value(value: object) -> str:
    """A field's value in a plain line; a mapping (the startup's descriptor budget) as
    key:value pairs, no spaces, so the line still splits into fields on spaces."""
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    return str(value)


_JSON = json.JSONEncoder(separators=(",", ":"))  # json.dumps with options builds one per call


def format_json(event: Event) -> str:
    return _JSON.encode(event.to_dict())


class EventPrinter:
    """Prints a subscription's events from a thread of its own, so a slow reader of our output
    (a paused pager, a full pipe) never stalls the gateway's loop. The subscription is the only
    buffer: this thread takes events straight from it, a batch at a time, and when the reader
    falls so far behind that it fills, the oldest are dropped there and an events_dropped line
    (at most one a second) says how many since the previous one."""

    def __init__(
        self,
        events: Subscription,
        out: TextIO,
        fmt: Callable[[Event], str],
        *,
        interval: float = PRINT_INTERVAL,
    ) -> None:
        self._events = events
        self._out = out
        self._fmt = fmt
        self._interval = interval
        self._reported = 0  # of events.dropped, already in an events_dropped line
        self._reported_at = float("-inf")  # the first drops are reported at once
        self._thread = threading.Thread(target=self._run, name="event-printer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Close the subscription, print what is left (waiting at most timeout s for the
        reader), then stop."""
        self._events.close()
        self._thread.join(timeout)

    def _run(self) -> None:
        events = self._events
        while True:
            # Drops counted before this take were of events older than the ones taken.
            dropped = events.dropped
            batch = events.take(PRINT_BATCH)
            lines = [self._fmt(event) for event in batch]
            report = self._drops_report(dropped, final=events.ended)
            if report is not None:
                lines.insert(0, self._fmt(report))
            if lines:
                try:
                    # One write and one flush per batch: a flush per event cost ~15 % of the
                    # gateway's time when connections come and go fast.
                    self._out.write("\n".join(lines) + "\n")
                    self._out.flush()
                except (OSError, ValueError):  # the reader went away: nothing left to do
                    return
            if events.ended:
                return
            if not batch:
                events.wait_sync(self._until_next_report())
            elif len(batch) < PRINT_BATCH:
                # Let a few more come: a wake-up of this thread per event cost the gateway
                # more than the printing, at thousands of connections a second.
                time.sleep(self._interval)

    def _drops_report(self, dropped: int, *, final: bool) -> EventsDropped | None:
        unreported = dropped - self._reported
        now = time.monotonic()
        if not unreported or (not final and now - self._reported_at < DROPS_REPORT_INTERVAL):
            return None
        self._reported, self._reported_at = dropped, now
        return EventsDropped(count=unreported)

    def _until_next_report(self) -> float | None:
        """How long an idle printer may wait: until a held-back drop report is due."""
        if self._events.dropped == self._reported:
            return None
        return max(0.0, self._reported_at + DROPS_REPORT_INTERVAL - time.monotonic())


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
    # Subscribed before start(), so the first events are printed too; sized for the printer.
    events = gateway.bus.subscribe(PRINT_BACKLOG)
    try:
        await gateway.start()
    except StateError as exc:  # the control socket: another gateway runs on this state dir
        print(f"unclaw-tui: error: {exc}", file=sys.stderr)
        return 1
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

    printer = EventPrinter(events, out, fmt)
    try:
        await stop.wait()
    finally:
        await gateway.stop()
        printer.close()  # prints what is left, gateway_stopped last
    return 0


def run(settings: Settings, on_started: Callable[[], None] | None = None) -> int:
    """Run headless on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_headless(settings, on_started=on_started))
    return uvloop.run(run_headless(settings, on_started=on_started))
