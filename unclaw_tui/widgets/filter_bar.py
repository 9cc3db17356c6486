"""The one-line filter input that `/` opens under the panes."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import Input


class FilterBar(Input):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Clear filter"),
    ]

    class Cancelled(Message):
        """Escape: drop the filter and close the bar."""

    def action_cancel(self) -> None:
        self.post_message(self.Cancelled())
