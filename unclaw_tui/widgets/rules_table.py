"""The Rules screen's table: every rule in force with its hits, kept in place like the panes.

`load()` takes the gateway's list (`rules()`) and touches only the rows that changed, so a
screen over thousands of rules refreshes in time proportional to what moved.
"""

from __future__ import annotations

from unclaw_tui.policy import Lifetime
from unclaw_tui.policy.views import RuleView
from unclaw_tui.widgets.format import fmt_ago, fmt_duration
from unclaw_tui.widgets.live_table import Cell, LiveTable
from unclaw_tui.widgets.model import RowStore

ACTION_STYLES = {"allow": "green", "deny": "bold red", "intercept": "magenta", "passthrough": ""}


def ports_text(view: RuleView) -> str:
    ports = view.rule.ports
    return "any" if ports is None else str(ports)


def until_text(view: RuleView, now: float) -> str:
    """always / until restart / once / '50 min left' / expired."""
    rule = view.rule
    if rule.lifetime is Lifetime.RESTART:
        return "until restart"
    if rule.expires is None:
        return rule.lifetime.value
    left = rule.expires - now
    return "expired" if left <= 0 else f"{fmt_duration(left)} left"


def describe_rule(view: RuleView) -> str:
    """One line for dialogs: 'allow *.example.com for phone, port 443/tcp'."""
    rule = view.rule
    who = "every peer" if rule.who == "*" else rule.who
    where = f", port {ports_text(view)}" if rule.ports is not None else ""
    proto = f"/{rule.proto.value}" if rule.proto.value != "any" else ""
    return f"{rule.action.value} {rule.target.text} for {who}{where}{proto}"


class RulesTable(LiveTable[RuleView]):
    COLUMNS = (
        ("id", "Id"),
        ("action", "Action"),
        ("target", "Target"),
        ("who", "Who"),
        ("port", "Port"),
        ("proto", "Proto"),
        ("until", "Until"),
        ("hits", "Hits"),
        ("last", "Last hit"),
        ("note", "Note"),
    )
    TIME_DEPENDENT = True

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(RowStore(), id=id)

    def load(self, views: list[RuleView], now: float) -> None:
        """Make the rows the gateway's list, then bring the table up to date."""
        store = self.store
        seen: set[str] = set()
        for view in views:
            seen.add(view.rule.id)
            if store.get(view.rule.id) != view:
                store.put(view.rule.id, view)
        for key in [key for key in store if key not in seen]:
            store.remove(key)
        self.sync(now)

    def selected_rule(self) -> RuleView | None:
        key = self.selected_key
        return None if key is None else self.store.get(key)

    def cells(self, row: RuleView, now: float) -> tuple[Cell, ...]:
        rule = row.rule
        base = "dim" if rule.builtin else ""
        return (
            (rule.id, base or "bold"),
            (rule.action.value, base or ACTION_STYLES.get(rule.action.value, "")),
            (rule.target.text, base or "bold"),
            (rule.who, base),
            (ports_text(row), base),
            (rule.proto.value, base),
            (until_text(row, now), base),
            (str(row.hits), base),
            (fmt_ago(row.last_hit, now), base or "dim"),
            (rule.note, base or "italic"),
        )

    def search_text(self, row: RuleView) -> str:
        rule = row.rule
        return (
            f"{rule.id} {rule.action.value} {rule.target.text} {rule.who} {ports_text(row)} "
            f"{rule.proto.value} {rule.note}"
        )
