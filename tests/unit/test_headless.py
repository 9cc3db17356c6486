"""The headless event printer: a slow reader of the output never blocks the publisher, and
what the printer's subscription drops is reported, counted exactly."""

from __future__ import annotations

import io
import itertools
import json
import threading
import time

import pytest

from tests.helpers import until
from unclaw_tui import headless
from unclaw_tui.bus import EventBus
from unclaw_tui.events import GatewayStopped
from unclaw_tui.headless import EventPrinter, format_json, format_plain


class StalledOutput(io.StringIO):
    """Output whose writes block until released, as a full pipe or a paused pager does."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writing = threading.Event()  # a write has started (and is stalled)

    def write(self, text: str) -> int:
        self.writing.set()
        if not self.release.wait(10):
            raise TimeoutError("never released")
        return super().write(text)


def _lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_publish_never_blocks_on_a_stalled_reader_and_nothing_is_lost() -> None:
    bus = EventBus()
    out = StalledOutput()
    printer = EventPrinter(bus.subscribe(1_000), out, format_json)
    started = time.monotonic()
    for _ in range(500):
        bus.publish(GatewayStopped())
    assert time.monotonic() - started < 1.0  # the writes are stalled; publish() is not
    out.release.set()
    printer.close()
    lines = _lines(out)
    assert [line["type"] for line in lines] == ["gateway_stopped"] * 500


def test_overflow_drops_the_oldest_and_says_exactly_how_many() -> None:
    bus = EventBus()
    out = StalledOutput()
    printer = EventPrinter(bus.subscribe(10), out, format_json)
    bus.publish(GatewayStopped(ts=1.0))
    assert out.writing.wait(5), "the printer took the first event"  # and is stalled on it
    for i in range(30):
        bus.publish(GatewayStopped(ts=100.0 + i))
    out.release.set()
    printer.close()
    lines = _lines(out)
    dropped = [line for line in lines if line["type"] == "events_dropped"]
    kept = [line["ts"] for line in lines if line["type"] == "gateway_stopped"]
    assert kept == [1.0] + [100.0 + i for i in range(20, 30)]  # the first, then the newest ten
    assert [d["count"] for d in dropped] == [20]
    assert set(dropped[0]) == {"ts", "type", "count"}  # the README's schema
    assert [line["type"] for line in lines][1] == "events_dropped"  # where the gap is


def test_plain_format_reports_drops_too() -> None:
    bus = EventBus()
    out = StalledOutput()
    printer = EventPrinter(bus.subscribe(1), out, format_plain)
    bus.publish(GatewayStopped())
    assert out.writing.wait(5), "the printer took the first event"
    for _ in range(5):
        bus.publish(GatewayStopped())
    out.release.set()
    printer.close()
    text = out.getvalue()
    assert "events_dropped count=4 (output too slow)" in text


async def test_drops_are_reported_at_most_once_a_second_and_all_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(headless, "DROPS_REPORT_INTERVAL", 0.2)
    bus = EventBus()
    sub = bus.subscribe(5)
    out = io.StringIO()
    printer = EventPrinter(sub, out, format_json, interval=0.01)
    published = 0
    for _ in range(4):  # four bursts, each overflowing the buffer while the printer sleeps
        for _ in range(20):
            bus.publish(GatewayStopped(ts=float(published)))
            published += 1
        await until(lambda: len(sub) == 0, "the printer to take the burst")
    await until(lambda: sub.dropped == printer._reported, "every drop to be reported")
    printer.close()
    lines = _lines(out)
    reports = [line for line in lines if line["type"] == "events_dropped"]
    kept = [line for line in lines if line["type"] == "gateway_stopped"]
    assert sub.dropped > 0 and len(reports) >= 2
    assert sum(r["count"] for r in reports) == sub.dropped == published - len(kept)
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(reports)]
    assert all(gap >= 0.15 for gap in gaps)  # no faster than the interval (wall-clock ts)


async def test_prints_every_event_in_order_and_ends_with_the_subscription() -> None:
    bus = EventBus()
    subscription = bus.subscribe(maxsize=100_000)
    out = io.StringIO()
    printer = EventPrinter(subscription, out, format_json)
    for i in range(12_000):  # more than one print batch
        bus.publish(GatewayStopped(ts=float(i)))
    await until(lambda: len(subscription) == 0, "the printer to take everything")
    bus.publish(GatewayStopped(ts=-1.0))  # after the printer took the rest
    printer.close()
    assert [line["ts"] for line in _lines(out)] == [float(i) for i in range(12_000)] + [-1.0]
    assert subscription.dropped == 0
