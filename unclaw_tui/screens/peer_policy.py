"""A peer's default: allow, deny or ask, and for ask what an unanswered prompt gets."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

POLICIES = (
    ("a", "allow", "every flow goes, but for the rules that deny"),
    ("d", "deny", "no flow goes, but for the rules that allow"),
    ("k", "ask", "a flow no rule decides waits for your answer"),
)


class PeerPolicyScreen(ModalScreen[tuple[str, str] | None]):
    """Dismisses with (policy, fallback), or None when cancelled."""

    CSS_PATH: ClassVar[list[str | Path]] = ["modals.tcss", "policy.tcss"]
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(key, f"policy('{word}')", word) for key, word, _ in POLICIES),
        Binding("f", "toggle_fallback", "Fallback"),
        Binding("enter", "save", "Save"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, peer: str, policy: str, fallback: str) -> None:
        super().__init__()
        self.peer = peer
        self.policy = policy
        self.fallback = fallback

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="peer-policy"):
            yield Label(f"Policy of {self.peer}", id="dialog-title")
            yield Static("", id="policy-choices")
            yield Label(
                "a/d/k choose · f switches the fallback · enter saves · escape cancels",
                classes="hint",
            )

    def on_mount(self) -> None:
        self._show()

    def _show(self) -> None:
        text = Text()
        for key, word, what in POLICIES:
            chosen = word == self.policy
            text.append(f" {key} {word} ", style="bold reverse" if chosen else "bold")
            text.append(f"  {what}\n", style="" if chosen else "dim")
        text.append("\nFallback ", style="dim")
        text.append(f" f {self.fallback} ", style="bold reverse" if self.policy == "ask" else "")
        text.append("  what a prompt nobody answers in time gets", style="dim")
        self.query_one("#policy-choices", Static).update(text)

    def action_policy(self, policy: str) -> None:
        self.policy = policy
        self._show()

    def action_toggle_fallback(self) -> None:
        self.fallback = "allow" if self.fallback == "deny" else "deny"
        self._show()

    def action_save(self) -> None:
        self.dismiss((self.policy, self.fallback))

    def action_cancel(self) -> None:
        self.dismiss(None)
