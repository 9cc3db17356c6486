"""SVG snapshots of the main screen, the add-peer modal, the QR screen, the help screen, and the
policy's screens: the prompt, the Rules screen, the rule form and the peer-policy dialog.

Deterministic: the FakeGateway's data, a frozen clock, UTC, seeded rate history. Update the
baselines with `pytest tests/tui --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from textual.pilot import Pilot

from tests.tui.conftest import make_app, until
from tests.tui.fake_gateway import demo_gateway
from tests.tui.screen_text import screen_text
from unclaw_tui import events as ev
from unclaw_tui.screens.prompt import PromptScreen

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


def test_status_bar_with_dropped_events(snap_compare: SnapCompare) -> None:
    gateway = demo_gateway()
    gateway.backlog = 10

    async def overflow(pilot: Pilot[object]) -> None:
        for _ in range(52):  # 42 more than the console's subscription holds, at once
            gateway.publish(ev.GatewayStopped(ts=gateway.clock()))
        await until(lambda: len(app.model.dns.store) == 4, "the demo rows")
        app.take_snapshot()
        await until(lambda: "events dropped 42" in screen_text(app), "the count")
        await settle(pilot)

    app = make_app(gateway)
    assert snap_compare(app, terminal_size=(80, 24), run_before=overflow)


def open_prompts(*, count: int = 1) -> Callable[[Pilot[object]], Awaitable[None]]:
    """run_before: prompts open on the demo gateway and the prompt screen pops up."""

    async def run(pilot: Pilot[object]) -> None:
        app = pilot.app
        gateway = app.gateway  # type: ignore[attr-defined]
        await settle(pilot)
        gateway.open_prompt("phone", "api.example.com", "10.78.0.5", 443, waiting=2)
        for port in range(1, count):
            gateway.open_prompt("laptop", None, "192.0.2.80", 8000 + port, route="relay")
        await until(lambda: isinstance(app.screen, PromptScreen), "the prompt")
        await settle(pilot)

    return run


@pytest.mark.parametrize("size", SIZES)
def test_prompt_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    # allow · this domain · 1 hour chosen, not yet answered; two more prompts wait.
    assert snap_compare(
        make_app(demo_gateway()),
        press=["a", "3", "o"],
        terminal_size=size,
        run_before=open_prompts(count=3),
    )


@pytest.mark.parametrize("size", SIZES)
def test_rules_screen(snap_compare: SnapCompare, size: tuple[int, int]) -> None:
    assert snap_compare(
        make_app(demo_gateway()), press=["r", "down", "down"], terminal_size=size, run_before=settle
    )


def test_rule_form_with_errors(snap_compare: SnapCompare) -> None:
    assert snap_compare(
        make_app(demo_gateway()),
        press=["r", "n", *"bad*x", "enter"],
        terminal_size=(80, 24),
        run_before=settle,
    )


def test_rule_from_a_connections_row(snap_compare: SnapCompare) -> None:
    assert snap_compare(
        make_app(demo_gateway()), press=["tab", "n"], terminal_size=(120, 40), run_before=settle
    )


def test_peer_policy_dialog(snap_compare: SnapCompare) -> None:
    assert snap_compare(
        make_app(demo_gateway()), press=["e", "k"], terminal_size=(80, 24), run_before=settle
    )
