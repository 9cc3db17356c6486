"""TUI test fixtures: a FakeGateway with fixed data and a frozen clock, UTC for rendered times."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.helpers import FakeClock, until  # noqa: F401  (until: the TUI tests import it from here)
from tests.tui.fake_gateway import (
    FIXED_NOW,
    FakeGateway,
    demo_events,
    demo_gateway,
    seed_rates,
)
from unclaw_tui.app import UnclawApp


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
    return FakeClock(FIXED_NOW)


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
