"""The event bus: bounded fan-out, and a close that polling cannot swallow."""

from __future__ import annotations

import asyncio

from unclaw_tui import events as ev


async def test_close_ends_the_iterator_even_after_polling() -> None:
    bus = ev.EventBus()
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
    bus = ev.EventBus()
    sub = bus.subscribe(maxsize=3)
    for i in range(5):
        bus.publish(ev.UnderLoad(active=bool(i % 2)))
    assert sub.dropped == 2
    kept = [sub.get_nowait() for _ in range(3)]
    assert [e.active for e in kept if isinstance(e, ev.UnderLoad)] == [False, True, False]
    assert sub.get_nowait() is None


async def test_batches_keep_order_and_sleep_while_idle() -> None:
    bus = ev.EventBus()
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
    await asyncio.sleep(0.3)  # idle: the reader waits for an event instead of polling
    assert takes == 1 and got == []
    for i in range(5):
        bus.publish(ev.UnderLoad(active=bool(i % 2)))
    await asyncio.sleep(0.2)
    sub.close()
    await asyncio.wait_for(task, 2)
    flat = [e for batch in got for e in batch]
    assert [e.active for e in flat if isinstance(e, ev.UnderLoad)] == [
        False, True, False, True, False
    ]  # fmt: skip
    assert all(1 <= len(batch) <= 2 for batch in got)
