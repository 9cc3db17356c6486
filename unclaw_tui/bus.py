"""The event bus: fan-out of gateway events to its sinks, one bounded buffer per sink.

Every sink (the headless printer, the console) reads a `Subscription`, and that subscription
is the only place its events wait: the reader takes them straight from it, on whatever thread
or event loop it runs, in batches. So there is one buffer and one drop rule per sink:

- `publish()` never blocks and never fails. A full subscription drops its oldest event to make
  room and counts it in `dropped`, so what a reader lost is always exactly `dropped`.
- A reader that waits on an empty subscription is woken once, by the next event (or close);
  while events keep coming it takes them at its own pace and nobody wakes it.

A subscription has one reader. Publishers may be on another thread than the reader: the queue
and the count sit behind a lock that either side holds only for a few microseconds (the
reader takes everything by swapping the queue, or a long backlog in short runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unclaw_tui.events import Event

DEFAULT_MAXSIZE = 10_000
# take() pops at most this many events per hold of the lock that publish() needs too.
TAKE_RUN = 128


class EventBus:
    """Fan-out of events to any number of subscriptions (see the module docstring)."""

    def __init__(self) -> None:
        # Replaced, never mutated: publish() iterates it without a lock while a reader on
        # another thread subscribes or closes.
        self._subscribers: tuple[Subscription, ...] = ()
        self._lock = threading.Lock()

    def publish(self, event: Event) -> None:
        for sub in self._subscribers:
            sub._offer(event)

    def subscribe(self, maxsize: int = DEFAULT_MAXSIZE) -> Subscription:
        sub = Subscription(maxsize)
        self.attach(sub)
        return sub

    def attach(self, sub: Subscription) -> None:
        """Deliver this bus's events to `sub` from now on."""
        with self._lock:
            if sub._closed:  # its reader gave up already
                return
            sub._bus = self
            self._subscribers = (*self._subscribers, sub)

    def _detach(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not sub)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Subscription:
    """At most `maxsize` events waiting for one reader; the oldest go first, counted in
    `dropped`. Read with `batches()` or `async for` on an event loop, `take()` and
    `wait_sync()` on a thread; `close()` ends it once what is queued has been read."""

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE) -> None:
        if maxsize < 1:
            raise ValueError("a subscription holds at least one event")
        self.maxsize = maxsize
        # A full deque with a maxlen drops its oldest item on append: the drop rule, in O(1).
        self._queue: deque[Event] = deque(maxlen=maxsize)
        self._lock = threading.Lock()
        self._waiter: Callable[[], None] | None = None
        self._bus: EventBus | None = None
        self._closed = False
        self.dropped = 0  # events this reader lost, since subscribing
        self.ended = False  # closed, and everything queued has been read

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def waiting(self) -> bool:
        """A reader is parked until the next event (it is not polling)."""
        return self._waiter is not None

    # -- the publishing side --------------------------------------------------------------------

    def _offer(self, event: Event) -> None:
        with self._lock:
            if self._closed:
                return
            if len(self._queue) == self.maxsize:
                self.dropped += 1
            self._queue.append(event)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter()

    def close(self) -> None:
        """No more events: the reader gets what is queued, then the end."""
        if self._bus is not None:
            self._bus._detach(self)
        with self._lock:
            self._closed = True
            self.ended = not self._queue
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter()

    # -- the reading side -----------------------------------------------------------------------

    def take(self, limit: int) -> list[Event]:
        """Up to `limit` queued events, oldest first, without waiting."""
        with self._lock:
            queue = self._queue
            if len(queue) <= limit:
                # All of them: swap in an empty deque, O(1) under the lock publish() takes.
                self._queue = deque(maxlen=self.maxsize)
                self.ended = self._closed
                return list(queue)
        # More than a batch waits: pop in short runs, so a publisher never waits for more
        # than one run (a few microseconds) to get the lock.
        batch: list[Event] = []
        while len(batch) < limit:
            with self._lock:
                queue = self._queue
                run = min(TAKE_RUN, limit - len(batch), len(queue))
                if not run:
                    break
                batch.extend(queue.popleft() for _ in range(run))
        with self._lock:
            self.ended = self._closed and not self._queue
        return batch

    def get_nowait(self) -> Event | None:
        """The next queued event, or None; for observers that poll at a few Hz."""
        batch = self.take(1)
        return batch[0] if batch else None

    def _park(self, wake: Callable[[], None]) -> bool:
        """Have `wake` called at the next event or close; False if one is there already."""
        with self._lock:
            if self._queue or self._closed:
                return False
            self._waiter = wake
            return True

    def _unpark(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if self._waiter is wake:
                self._waiter = None

    async def wait(self) -> None:
        """Return once an event is queued or the subscription is closed."""
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake() -> None:  # called on the publisher's thread, which may not be ours
            with contextlib.suppress(RuntimeError):  # our loop has closed: nobody waits
                loop.call_soon_threadsafe(_wake, woken)

        if not self._park(wake):
            return
        try:
            await woken
        finally:
            self._unpark(wake)

    def wait_sync(self, timeout: float | None = None) -> bool:
        """`wait()` for a reader on a thread: False if `timeout` seconds passed first."""
        woken = threading.Event()
        wake = woken.set
        if not self._park(wake):
            return True
        try:
            return woken.wait(timeout)
        finally:
            self._unpark(wake)

    async def batches(self, limit: int, interval: float) -> AsyncIterator[list[Event]]:
        """Lists of up to `limit` events, taken every `interval` seconds (at once while more
        wait) until the end: for readers that would rather wake once per batch than once per
        event. With nothing queued it waits for the next event instead, so an idle gateway is
        not woken `1 / interval` times a second."""
        while True:
            batch = self.take(limit)
            if batch:
                yield batch
            if self.ended:
                return
            if not batch:
                await self.wait()
            elif len(batch) < limit:
                await asyncio.sleep(interval)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = self.get_nowait()
            if event is not None:
                yield event
            elif self.ended:
                return
            else:
                await self.wait()
