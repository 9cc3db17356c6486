"""SVG snapshots of the main screen, the add-peer modal, the QR screen and the help screen.

Deterministic: the FakeGateway's data, a frozen clock, UTC, seeded rate history. Update the
baselines with `pytest tests/tui --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from textual.pilot import Pilot

from tests.tui.conftest import make_app
from tests.tui.fake_gateway import demo_gateway

SIZES = [pytest.param((120, 40), id="120x40"), pytest.param((80, 24), id="80x24")]
SnapCompare = Callable[..., bool]


async def settle(pilot: Pilot[object]) -> None:
    await pilot.pause()
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
def test_main_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(make_app(demo_gateway()), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_main_screen_light(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    app = make_app(demo_gateway())
    app.theme = "textual-light"
    assert snap_compare(app, terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_add_peer_modal(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(
        make_app(demo_gateway()), press=["a", *"desk"], terminal_size=size, run_before=settle
    )


@pytest.mark.parametrize("size", SIZES)
def test_qr_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(
        make_app(demo_gateway()), press=["enter"], terminal_size=size, run_before=settle
    )


@pytest.mark.parametrize("size", SIZES)
def test_help_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(
        make_app(demo_gateway()), press=["question_mark"], terminal_size=size, run_before=settle
    )
