"""Asks before something is removed: a peer (its key stops working at once) or a rule."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label


class ConfirmScreen(ModalScreen[bool]):
    """`y` (or the red button) dismisses with True; `n`, escape or Keep with False."""

    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "confirm", "Remove"),
        Binding("n,escape", "cancel", "Keep"),
    ]

    def __init__(self, question: str, hint: str) -> None:
        super().__init__()
        self.question = question
        self.hint = hint

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, id="dialog-title")
            yield Label(self.hint, classes="hint")
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


class ConfirmRemoveScreen(ConfirmScreen):
    def __init__(self, name: str, ip: str) -> None:
        super().__init__(
            f"Remove peer {name} ({ip})?",
            "Its key stops working at once and its config is deleted.",
        )
        self.peer_name = name
        self.peer_ip = ip
