"""The help screen: what each key does."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

KEYS: tuple[tuple[str, str], ...] = (
    ("a", "add a peer: name it, the IP is assigned, its QR code opens"),
    ("enter", "show the selected peer's config and QR code"),
    ("d", "remove the selected peer (asks first)"),
    ("/", "filter the focused pane (enter keeps it, escape clears it)"),
    ("c", "connections: all peers / only the selected peer"),
    ("p", "pause or resume the live panes (connections, DNS, TLS)"),
    ("w", "answer the waiting prompts (a/d, 1-5, p/h/o, enter)"),
    ("r", "rules with hits and expiry: n add, e edit, d remove"),
    ("n", "a rule from the selected row of the focused pane"),
    ("e", "the selected peer's policy: allow, deny or ask"),
    ("tab", "move to the next pane (shift+tab: previous)"),
    ("t", "switch between dark and light themes"),
    ("ctrl+p", "command palette"),
    ("?", "this help"),
    ("q", "quit (the gateway stops)"),
)


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "close", "Close"),
    ]

    def compose(self) -> ComposeResult:
        keys = Table.grid(padding=(0, 2))
        keys.add_column(style="bold", no_wrap=True)
        keys.add_column()
        for key, what in KEYS:
            keys.add_row(key, what)
        with Vertical(id="dialog", classes="help"):
            yield Label("unclaw-tui keys", id="dialog-title")
            yield Static(keys, id="keys")
            yield Label(
                "Mouse: click a row to select it, scroll with the wheel · escape closes",
                classes="hint",
            )

    def action_close(self) -> None:
        self.dismiss(None)
