"""Asks before a peer is removed: its key stops working at once."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label


class ConfirmRemoveScreen(ModalScreen[bool]):
    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "confirm", "Remove"),
        Binding("n,escape", "cancel", "Keep"),
    ]

    def __init__(self, name: str, ip: str) -> None:
        super().__init__()
        self.peer_name = name
        self.peer_ip = ip

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Remove peer {self.peer_name} ({self.peer_ip})?", id="dialog-title")
            yield Label("Its key stops working at once and its config is deleted.", classes="hint")
            with Horizontal(id="buttons"):
                yield Button("Remove", variant="error", id="remove")
                yield Button("Keep", id="keep")

    def on_mount(self) -> None:
        self.query_one("#keep", Button).focus()

    @on(Button.Pressed, "#remove")
    def action_confirm(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#keep")
    def action_cancel(self) -> None:
        self.dismiss(False)
