"""The prompt: a held flow waits while the operator decides, one prompt at a time.

Prompts queue oldest first; the screen shows the head, how many more wait and how long is
left before the peer's fallback applies.  Single keys choose: `a`/`d` the access, `1`-`5`
how long, `p`/`h`/`o` the scope, then `enter` answers (so one stray key never answers).  The
choices start at `decide`'s defaults (always, this host), and "allow · this domain · 1 hour"
is `a 3 o enter`.  A prompt answered elsewhere (`unclaw-tui decide`) or timed out leaves the
queue through its event, and the screen moves on to the next; with none left it closes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from unclaw_tui.policy import registrable_domain
from unclaw_tui.policy.views import PromptView
from unclaw_tui.widgets.format import fmt_duration
from unclaw_tui.widgets.model import PromptsModel

# (key, duration in the CLI's words, label)
DURATIONS = (
    ("1", "once", "once"),
    ("2", "15m", "15 min"),
    ("3", "1h", "1 hour"),
    ("4", "restart", "until restart"),
    ("5", "always", "always"),
)
SCOPES = (("p", "port"), ("h", "host"), ("o", "domain"))
DEFAULT_DURATION = "always"  # as `unclaw-tui decide`
DEFAULT_SCOPE = "host"
ROUTE_LABELS = {"tls": "TLS", "vip": "via VIP", "dns": "DNS"}

# answer(prompt_id, access, duration, scope) -> the rule made, or None for once; it takes the
# prompt out of the queue (KeyError: it was closed already)
Answer = Callable[[str, str, str, str], "str | None"]


def destination(prompt: PromptView) -> str:
    host = prompt.hostname or (f"[{prompt.dst_ip}]" if ":" in prompt.dst_ip else prompt.dst_ip)
    return f"{host}:{prompt.dst_port}"


def kind_text(prompt: PromptView) -> str:
    """'TLS', 'TCP via VIP', 'UDP'."""
    proto = prompt.proto.upper()
    label = ROUTE_LABELS.get(prompt.route)
    if label is None:
        return proto
    return label if prompt.route in ("tls", "dns") else f"{proto} {label}"


def headline(prompt: PromptView) -> str:
    """'phone → api.example.com:443 (TLS, first contact)'."""
    return f"{prompt.peer} → {destination(prompt)} ({kind_text(prompt)}, first contact)"


def domain_of(prompt: PromptView) -> str | None:
    if prompt.hostname is None:
        return None
    try:
        return registrable_domain(prompt.hostname)
    except ValueError:
        return None


class PromptScreen(ModalScreen[bool]):
    """Dismisses with True when the operator said "later", False when the queue emptied."""

    CSS_PATH: ClassVar[list[str | Path]] = ["modals.tcss", "policy.tcss"]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "access('allow')", "Allow"),
        Binding("d", "access('deny')", "Deny"),
        *(Binding(key, f"duration('{word}')", label, show=False) for key, word, label in DURATIONS),
        *(Binding(key, f"scope('{scope}')", scope, show=False) for key, scope in SCOPES),
        Binding("enter", "answer", "Answer"),
        Binding("right,n", "browse(1)", "Next", show=False),
        Binding("left", "browse(-1)", "Previous", show=False),
        Binding("escape,w", "later", "Later"),
    ]

    def __init__(
        self,
        prompts: PromptsModel,
        answer: Answer,
        fallback_of: Callable[[str], str],
        clock: Callable[[], float],
        sync: Callable[[], None] = lambda: None,
    ) -> None:
        """`fallback_of(peer name)`: what an unanswered prompt of that peer gets; `sync()`
        reads the gateway's own list (the flows held on each prompt have no events)."""
        super().__init__()
        self._sync = sync
        self.prompts = prompts
        self._answer = answer
        self._fallback_of = fallback_of
        self._clock = clock
        self.shown: PromptView | None = None
        self.access: str | None = None  # no default: enter alone never answers
        self.duration = DEFAULT_DURATION
        self.scope = DEFAULT_SCOPE

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="prompt"):
            yield Label("", id="dialog-title")
            yield Static("", id="prompt-headline")
            yield Static("", id="prompt-detail")
            yield Static("", id="prompt-choices")
            yield Label("", id="error")
            yield Label(
                "enter answers · ←/→ other prompts · escape: later (w reopens)", classes="hint"
            )

    def on_mount(self) -> None:
        self._sync()
        self.follow_queue()
        # The countdown and the held flows change without events: once a second.
        self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        self._sync()
        self._show()

    # -- what is shown ------------------------------------------------------------------------

    def follow_queue(self) -> None:
        """Keep showing the same prompt while it is open, else the oldest; close when none."""
        queue = self.prompts.queue()
        if not queue:
            self.shown = None
            self.dismiss(False)
            return
        if self.shown is None or self.shown.id not in self.prompts:
            if self.shown is not None:
                why = self.prompts.closed.get(self.shown.id, "closed")
                self.notify(f"Prompt {self.shown.id} was answered elsewhere: {why}", timeout=4)
            self._select(queue[0])
        else:
            self.shown = self.prompts.get(self.shown.id) or self.shown
            self._show()

    def _select(self, prompt: PromptView) -> None:
        self.shown = prompt
        self.access = None
        self.duration = DEFAULT_DURATION
        self.scope = DEFAULT_SCOPE
        self.query_one("#error", Label).update("")
        self._show()

    def _show(self) -> None:
        prompt = self.shown
        if prompt is None or not self.is_mounted:
            return
        queue = self.prompts.queue()
        position = next((i for i, p in enumerate(queue) if p.id == prompt.id), 0) + 1
        more = len(queue) - 1
        title = f"Prompt {prompt.id} · {position} of {len(queue)}"
        if more:
            title += f" · {more} more waiting"
        self.query_one("#dialog-title", Label).update(title)
        self.query_one("#prompt-headline", Static).update(Text(headline(prompt), style="bold"))
        left = prompt.deadline - self._clock()
        held = f"{prompt.waiting} flow{'s' if prompt.waiting != 1 else ''} held"
        countdown = (
            f"{fmt_duration(left)} left, then {self._fallback_of(prompt.peer)}"
            if left > 0
            else f"time is up: {self._fallback_of(prompt.peer)}"
        )
        detail = Text(f"{prompt.dst_ip} · {prompt.proto} · {held} · ", style="dim")
        detail.append(countdown, style="bold yellow" if left < 10 else "")
        self.query_one("#prompt-detail", Static).update(detail)
        self.query_one("#prompt-choices", Static).update(self._choices(prompt))

    def _choices(self, prompt: PromptView) -> Text:
        text = Text()

        def option(key: str, label: str, chosen: bool, usable: bool = True) -> None:
            if not usable:
                text.append(f" {key} {label} ", style="dim strike")
            elif chosen:
                text.append(f" {key} {label} ", style="bold reverse")
            else:
                text.append(f" {key} ", style="bold").append(f"{label} ")
            text.append(" ")

        text.append("Access ", style="dim")
        option("a", "allow", self.access == "allow")
        option("d", "deny", self.access == "deny")
        if self.access is None:
            text.append("← choose", style="yellow")
        text.append("\nFor    ", style="dim")
        for key, word, label in DURATIONS:
            option(key, label, self.duration == word)
        text.append("\nScope  ", style="dim")
        domain = domain_of(prompt)
        target = prompt.hostname or prompt.dst_ip
        option("p", f"port {prompt.dst_port}/{prompt.proto}", self.scope == "port")
        option("h", f"host {target}", self.scope == "host")
        option("o", f"domain {domain or '-'}", self.scope == "domain", domain is not None)
        return text

    # -- keys ---------------------------------------------------------------------------------

    def action_access(self, access: str) -> None:
        self.access = access
        self._show()

    def action_duration(self, duration: str) -> None:
        self.duration = duration
        self._show()

    def action_scope(self, scope: str) -> None:
        if scope == "domain" and self.shown is not None and domain_of(self.shown) is None:
            self.app.bell()
            return
        self.scope = scope
        self._show()

    def action_browse(self, step: int) -> None:
        queue = self.prompts.queue()
        if self.shown is None or len(queue) < 2:
            return
        index = next((i for i, p in enumerate(queue) if p.id == self.shown.id), 0)
        self._select(queue[(index + step) % len(queue)])

    def action_answer(self) -> None:
        prompt = self.shown
        error = self.query_one("#error", Label)
        if prompt is None:
            return
        if self.access is None:
            error.update("Choose a (allow) or d (deny) first.")
            return
        try:
            self._answer(prompt.id, self.access, self.duration, self.scope)
        except KeyError:  # answered elsewhere or timed out a moment ago
            self.notify(f"Prompt {prompt.id} was closed already", severity="warning")
        except ValueError as exc:
            error.update(str(exc))
            return
        self.shown = None
        self.follow_queue()

    def on_screen_resume(self) -> None:
        # Back on top (a help screen closed over it): catch up with the queue.
        if self.is_mounted:
            self.follow_queue()

    def action_later(self) -> None:
        self.dismiss(True)
