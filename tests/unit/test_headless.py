"""The headless event printer: a slow reader of the output never blocks the caller."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

from unclaw_tui.events import EventBus, GatewayStopped
from unclaw_tui.headless import EventPrinter, format_json


class StalledOutput(io.StringIO):
    """Output whose writes block until released, as a full pipe or a paused pager does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        if not self.release.wait(10):
            raise TimeoutError("never released")
        return super().write(text)


def _lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_put_never_blocks_on_a_stalled_reader_and_nothing_is_lost() -> None:
    out = StalledOutput()
    printer = EventPrinter(out, format_json)
    started = time.monotonic()
    for _ in range(500):
        printer.put([GatewayStopped()])
    assert time.monotonic() - started < 1.0  # the writes are stalled; put() is not
    out.release.set()
    printer.close()
    lines = _lines(out)
    assert [line["type"] for line in lines] == ["gateway_stopped"] * 500


def test_overflow_drops_the_oldest_and_says_how_many() -> None:
    out = StalledOutput()
    printer = EventPrinter(out, format_json, backlog=10)
    first = GatewayStopped(ts=1.0)
    printer.put([first])  # the writer thread may already hold this one, stalled in write()
    time.sleep(0.2)
    for i in range(30):
        printer.put([GatewayStopped(ts=100.0 + i)])
    out.release.set()
    printer.close()
    lines = _lines(out)
    dropped = [line for line in lines if line["type"] == "events_dropped"]
    kept = [line["ts"] for line in lines if line["type"] == "gateway_stopped"]
    assert kept[-10:] == [100.0 + i for i in range(20, 30)]  # the newest ten survive
    assert sum(d["count"] for d in dropped) + len(kept) == 31
    assert dropped and dropped[0]["count"] >= 20


def test_plain_format_reports_drops_too() -> None:
    out = StalledOutput()
    printer = EventPrinter(out, lambda e: f"event {e.type}", backlog=1)
    printer.put([GatewayStopped()])
    time.sleep(0.2)
    for _ in range(5):
        printer.put([GatewayStopped()])
    out.release.set()
    printer.close()
    text = out.getvalue()
    assert "events_dropped count=" in text and "(output too slow)" in text


async def test_forward_prints_every_event_in_order_and_ends_with_the_subscription() -> None:
    bus = EventBus()
    subscription = bus.subscribe(maxsize=100_000)
    out = io.StringIO()
    printer = EventPrinter(out, format_json)
    forwarding = asyncio.create_task(printer.forward(subscription))
    for i in range(12_000):  # more than one forward batch
        bus.publish(GatewayStopped(ts=float(i)))
    await asyncio.sleep(0.01)
    bus.publish(GatewayStopped(ts=-1.0))  # after the forwarder took a batch
    subscription.close()
    await asyncio.wait_for(forwarding, 5)
    printer.close()
    assert [line["ts"] for line in _lines(out)] == [float(i) for i in range(12_000)] + [-1.0]
