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
import time
from typing import TextIO

from unclaw_tui.config import Settings
from unclaw_tui.events import Event

PRINT_BATCH = 1000
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


def format_json(event: Event) -> str:
    return json.dumps(event.to_dict(), separators=(",", ":"), sort_keys=False)


async def run_headless(settings: Settings, out: TextIO | None = None) -> int:
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

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    async def printer() -> None:
        # Everything queued goes out in one write and one flush: a flush per event cost ~15 %
        # of the gateway's time when connections come and go fast.
        async for event in events:
            lines = [fmt(event)]
            while len(lines) < PRINT_BATCH and (more := events.get_nowait()) is not None:
                lines.append(fmt(more))
            out.write("\n".join(lines) + "\n")
            out.flush()

    printing = asyncio.create_task(printer())
    try:
        await stop.wait()
    finally:
        await gateway.stop()
        events.close()
        with contextlib.suppress(asyncio.CancelledError):
            await printing
    return 0


def run(settings: Settings) -> int:
    """Run headless on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run_headless(settings))
    return uvloop.run(run_headless(settings))
