"""The Rules screen: every rule in force with its hits and expiry; add, edit, remove.

It reads `gateway.rules()` when it opens, when a rule event arrives (the app calls
`refresh_rules`) and once a second for hits; every change goes through the gateway's API, the
same calls the CLI makes.  An edit is a remove and an add under the same id (the old rule is
put back if the gateway refuses the new one).  A long list goes into the table a chunk at
a time, with keys and frames in between (a table row costs ~0.3 ms to add: 10,000 at once froze
the console for 4.5 s); after that a refresh touches only the rows that changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import Footer, Label

from unclaw_tui.policy import Rule
from unclaw_tui.policy.views import RuleView
from unclaw_tui.screens.confirm_remove import ConfirmScreen
from unclaw_tui.screens.rule_form import RuleDraft, RuleFormScreen, draft_from_rule
from unclaw_tui.widgets.filter_bar import FilterBar
from unclaw_tui.widgets.rules_table import RulesTable, describe_rule

if TYPE_CHECKING:
    from unclaw_tui.gateway import GatewayProtocol

REFRESH_S = 1.0
FIRST_ROWS = 200  # shown at once, more than a screenful
CHUNK_ROWS = 1_000  # then this many at a time
CHUNK_PAUSE_S = 0.01
BUILTIN_HINT = "comes from a flag (--allow, --deny, --passthrough): change the flag and restart"


class RulesScreen(Screen[None]):
    CSS_PATH = "policy.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "add_rule", "Add"),
        Binding("e", "edit_rule", "Edit"),
        Binding("d,delete", "remove_rule", "Remove"),
        Binding("slash", "filter", "Filter"),
        Binding("escape,r", "close", "Back"),
    ]

    def __init__(self, gateway: GatewayProtocol, clock: Callable[[], float]) -> None:
        super().__init__(id="rules-screen")
        self.gateway = gateway
        self.clock = clock
        self.table = RulesTable(id="rules")
        # While a long list goes in a chunk per frame: the latest list, and how much is in.
        self._pending: list[RuleView] | None = None
        self._loaded = 0

    def compose(self) -> ComposeResult:
        yield Label("Rules", id="rules-title")
        yield self.table
        yield FilterBar(placeholder="filter rules… (enter keeps it, escape clears it)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        self.table.border_title = "Rules"
        self.refresh_rules()
        self.table.focus()
        self.set_interval(REFRESH_S, self.refresh_rules)

    def refresh_rules(self) -> None:
        try:
            views = self.gateway.rules()
        except Exception as exc:  # the gateway stopping under us: say so, keep the rows
            self.query_one("#rules-title", Label).update(f"Rules (not updated: {exc})")
            return
        if self._pending is not None:  # the chunks go on with the newest list
            self._pending = views
            return
        if self.table.row_count == 0 and len(views) > FIRST_ROWS:
            self._pending, self._loaded = views, 0
            self._load_chunk()
            return
        self._show(views)

    def _load_chunk(self) -> None:
        views = self._pending
        if views is None or not self.is_attached:
            return
        self._loaded += FIRST_ROWS if self._loaded == 0 else CHUNK_ROWS
        if self._loaded >= len(views):
            self._pending = None
            self._show(views)
            return
        # A prefix: rows past it are not in the table yet, so none is removed by mistake.
        self.table.load(views[: self._loaded], self.clock())
        self.query_one("#rules-title", Label).update(
            f"Rules: loading {self._loaded:,} of {len(views):,}…"
        )
        # A timer, not call_after_refresh: keys and frames get their turn between chunks.
        self.set_timer(CHUNK_PAUSE_S, self._load_chunk)

    def _show(self, views: list[RuleView]) -> None:
        now = self.clock()
        self.table.load(views, now)
        self.table.refresh_visible(now)
        builtin = sum(1 for v in views if v.rule.builtin)
        hits = sum(v.hits for v in views)
        self.query_one("#rules-title", Label).update(
            f"Rules: {len(views)} ({builtin} built-in from flags) · {hits} hits · "
            "most specific wins: peer > every peer, host > glob > CIDR, port > range > any"
        )

    # -- changes ------------------------------------------------------------------------------

    def _open_form(self, title: str, draft: RuleDraft, editing: RuleView | None = None) -> None:
        submit = self.gateway.add_rule if editing is None else self._replace(editing)
        taken = frozenset(self.table.store)
        self.app.push_screen(
            RuleFormScreen(title, draft, submit, self.clock, editing=editing, taken=taken),
            callback=self._changed,
        )

    def _replace(self, old: RuleView) -> Callable[[Rule], RuleView]:
        def replace(rule: Rule) -> RuleView:
            self.gateway.remove_rule(old.rule.id)
            try:
                return self.gateway.add_rule(rule)
            except (ValueError, KeyError):
                self.gateway.add_rule(old.rule)  # the old one stays in force
                raise

        return replace

    def _changed(self, view: RuleView | None) -> None:
        if view is not None:
            self.refresh_rules()
            if view.rule.id in self.table.shown_keys():
                self.table.move_cursor(row=self.table.get_row_index(view.rule.id))
            self.notify(f"Rule {view.rule.id}: {describe_rule(view)}")

    def action_add_rule(self) -> None:
        self._open_form("Add a rule", RuleDraft())

    def action_edit_rule(self) -> None:
        view = self.table.selected_rule()
        if view is None:
            return
        if view.rule.builtin:
            self.notify(f"{view.rule.id} {BUILTIN_HINT}", severity="warning")
            return
        draft = draft_from_rule(view, self.clock())
        self._open_form(f"Edit rule {view.rule.id}", draft, editing=view)

    def action_remove_rule(self) -> None:
        view = self.table.selected_rule()
        if view is None:
            return
        if view.rule.builtin:
            self.notify(f"{view.rule.id} {BUILTIN_HINT}", severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if not yes:
                return
            try:
                self.gateway.remove_rule(view.rule.id)
            except KeyError:
                self.notify(f"Rule {view.rule.id} was already gone", severity="warning")
            except ValueError as exc:
                self.notify(str(exc), severity="error")
            self.refresh_rules()

        self.app.push_screen(
            ConfirmScreen(
                f"Remove rule {view.rule.id}?",
                f"{describe_rule(view)}. New flows are decided without it.",
            ),
            callback=confirmed,
        )

    # -- filter -------------------------------------------------------------------------------

    def action_filter(self) -> None:
        bar = self.query_one(FilterBar)
        bar.value = self.table.filter_text
        bar.add_class("-open")
        bar.focus()

    @on(FilterBar.Changed)
    def _filter_changed(self, message: FilterBar.Changed) -> None:
        self.table.set_filter(message.value.strip(), self.clock())
        self.table.border_subtitle = (
            f"filter: {self.table.filter_text}" if self.table.filter_text else ""
        )

    @on(FilterBar.Submitted)
    @on(FilterBar.Cancelled)
    def _close_filter(self, message: FilterBar.Submitted | FilterBar.Cancelled) -> None:
        bar = self.query_one(FilterBar)
        if isinstance(message, FilterBar.Cancelled):
            bar.value = ""  # posts Changed, which clears the table's filter
            self.table.set_filter("", self.clock())
            self.table.border_subtitle = ""
        bar.remove_class("-open")
        self.table.focus()

    def action_close(self) -> None:
        self.dismiss(None)
