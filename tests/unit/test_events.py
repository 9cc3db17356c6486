"""The event bus: bounded fan-out, one buffer per reader, and a close that polling cannot
swallow."""

from __future__ import annotations

import asyncio
import threading

from tests.helpers import until
from unclaw_tui import events as ev
from unclaw_tui.bus import EventBus, Subscription


def flags(events: list[ev.Event]) -> list[bool]:
    return [e.active for e in events if isinstance(e, ev.UnderLoad)]


async def test_close_ends_the_iterator_even_after_polling() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish(ev.GatewayStopped())
    sub.close()
    seen = []

    async def consume() -> None:
        async for event in sub:
            seen.append(event)
            while (more := sub.get_nowait()) is not None:
                seen.append(more)

    await asyncio.wait_for(consume(), 2)
    assert [type(e) for e in seen] == [ev.GatewayStopped]


async def test_a_slow_subscriber_loses_its_oldest_events_and_counts_them() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=3)
    for i in range(5):
        bus.publish(ev.UnderLoad(active=bool(i % 2)))
    assert sub.dropped == 2
    kept = [sub.get_nowait() for _ in range(3)]
    assert flags([e for e in kept if e is not None]) == [False, True, False]
    assert sub.get_nowait() is None


async def test_each_reader_counts_exactly_what_it_lost_and_others_lose_nothing() -> None:
    bus = EventBus()
    slow = bus.subscribe(maxsize=100)
    fast = bus.subscribe(maxsize=100)
    got: list[ev.Event] = []
    for i in range(1_000):
        bus.publish(ev.UnderLoad(ts=float(i), active=True))
        got += fast.take(10)  # keeps up
    got += fast.take(100)
    assert fast.dropped == 0 and [e.ts for e in got] == [float(i) for i in range(1_000)]
    kept = slow.take(1_000)
    assert len(kept) == 100 and slow.dropped == 900
    assert [e.ts for e in kept] == [float(i) for i in range(900, 1_000)]  # the newest
    assert slow.dropped + len(kept) == 1_000  # what it lost is exactly the count


async def test_a_long_backlog_is_taken_in_order_a_batch_at_a_time() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=1_000)
    for i in range(700):
        bus.publish(ev.UnderLoad(ts=float(i), active=True))
    first = sub.take(300)  # longer than one run of pops under the lock
    assert [e.ts for e in first] == [float(i) for i in range(300)] and len(sub) == 400
    sub.close()
    assert not sub.ended  # 400 still to read
    assert [e.ts for e in sub.take(1_000)] == [float(i) for i in range(300, 700)]
    assert sub.ended and sub.dropped == 0


async def test_closing_does_not_cost_an_event() -> None:
    bus = EventBus()
    sub = bus.subscribe(maxsize=2)
    bus.publish(
        ev.GatewayStarted(listen_port=1, public_key="", endpoint="", address="", state_dir="")
    )
    bus.publish(ev.GatewayStopped())
    sub.close()
    bus.publish(ev.GatewayStopped())  # after close: not delivered, not a drop
    assert sub.dropped == 0
    assert [type(e) for e in sub.take(10)] == [ev.GatewayStarted, ev.GatewayStopped]
    assert sub.ended


async def test_batches_keep_order_and_sleep_while_idle() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    takes = 0
    take = sub.take

    def counting_take(limit: int) -> list[ev.Event]:
        nonlocal takes
        takes += 1
        return take(limit)

    sub.take = counting_take  # type: ignore[method-assign]
    got: list[list[ev.Event]] = []

    async def consume() -> None:
        async for batch in sub.batches(limit=2, interval=0.01):
            got.append(batch)

    task = asyncio.create_task(consume())
    # Idle: the reader parks until the next event instead of polling.
    await until(lambda: sub.waiting, "the reader to park")
    assert takes == 1 and got == []
    for i in range(5):
        bus.publish(ev.UnderLoad(active=bool(i % 2)))
    await until(lambda: sum(map(len, got)) == 5, "all five events")
    sub.close()
    await asyncio.wait_for(task, 2)
    assert flags([e for batch in got for e in batch]) == [False, True, False, True, False]
    assert all(1 <= len(batch) <= 2 for batch in got)


async def test_a_reader_on_another_loop_is_woken_by_a_publisher_thread() -> None:
    """The console's case: the gateway publishes on its own thread, the reader's loop waits."""
    sub = Subscription(maxsize=10_000)
    bus = EventBus()
    bus.attach(sub)
    got: list[ev.Event] = []

    async def consume() -> None:
        async for batch in sub.batches(limit=500, interval=0.001):
            got.extend(batch)

    task = asyncio.create_task(consume())
    await until(lambda: sub.waiting, "the reader to park")

    def publish() -> None:
        for i in range(3_000):
            bus.publish(ev.UnderLoad(ts=float(i), active=True))
        sub.close()

    publisher = threading.Thread(target=publish)
    publisher.start()
    await asyncio.wait_for(task, 5)
    publisher.join()
    assert sub.dropped == 0 and [e.ts for e in got] == [float(i) for i in range(3_000)]


def test_a_thread_reader_waits_until_an_event_or_the_timeout() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    assert sub.wait_sync(0.01) is False  # nothing came
    timer = threading.Timer(0.05, bus.publish, [ev.GatewayStopped()])
    timer.start()
    assert sub.wait_sync(5) is True
    assert [type(e) for e in sub.take(5)] == [ev.GatewayStopped]
    timer.join()
