"""Fixtures shared by the engine's flow tests (test_wgstack_flows, test_splice)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.test_wgstack_flows import Client, new_engine
from unclaw_tui.engine._ffi import Engine


@pytest.fixture
def engine() -> Iterator[Engine]:
    """An engine with the test peer set up and its session confirmed."""
    engine = new_engine()
    yield engine
    engine.close()


@pytest.fixture
def client(engine: Engine) -> Client:
    """The test peer's side of `engine`."""
    return Client(engine)
