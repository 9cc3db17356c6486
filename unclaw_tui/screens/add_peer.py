"""The add-peer modal: asks for a name; the gateway assigns the IP and the peer is live at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label

from unclaw_tui.gateway import PeerSnapshot


class AddPeerScreen(ModalScreen[PeerSnapshot | None]):
    """Dismisses with the new peer, or None when cancelled; errors stay in the dialog."""

    CSS_PATH = "modals.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, add_peer: Callable[[str], PeerSnapshot]) -> None:
        super().__init__()
        self._add_peer = add_peer

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Add a peer", id="dialog-title")
            yield Label("A name for the device; its tunnel IP is assigned.", classes="hint")
            yield Input(placeholder="phone", id="name", max_length=64)
            yield Label("", id="error")
            with Horizontal(id="buttons"):
                yield Button("Add", variant="primary", id="add")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted, "#name")
    @on(Button.Pressed, "#add")
    def submit(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        error = self.query_one("#error", Label)
        if not name:
            error.update("Type a name first.")
            return
        try:
            peer = self._add_peer(name)
        except ValueError as exc:
            error.update(str(exc))
            return
        self.dismiss(peer)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
