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
