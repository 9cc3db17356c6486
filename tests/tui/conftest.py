"""TUI test fixtures: a FakeGateway with fixed data and a frozen clock, UTC for rendered times."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator

import pytest

from tests.tui.fake_gateway import FakeClock, FakeGateway, demo_events, demo_gateway, seed_rates
from unclaw_tui.app import UnclawApp


# Stands in for tests/helpers.py `until` (being written on another branch): swap when merged.
async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait until `pred()` holds, looking every 5 ms (the app runs meanwhile, on this loop);
    fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.fixture(autouse=True, scope="session")
def _utc() -> Iterator[None]:
    # The DNS log shows local times of day; snapshots must not depend on the machine's zone.
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gateway(clock: FakeClock) -> FakeGateway:
    return demo_gateway(clock)


def make_app(gateway: FakeGateway, *, demo: bool = True, **kwargs: object) -> UnclawApp:
    """An app over the fake; with `demo`, rate history and events are there from the start."""
    app = UnclawApp(gateway, clock=gateway.clock, **kwargs)  # type: ignore[arg-type]
    if demo:
        seed_rates(app.model.peers, gateway)
        app.inject_events(demo_events(gateway))
    return app


@pytest.fixture
def app(gateway: FakeGateway) -> UnclawApp:
    return make_app(gateway)
