"""The Connections pane: TCP and UDP flows of all peers or of the selected one."""

from __future__ import annotations

from unclaw_tui.widgets.format import fmt_bytes, fmt_duration
from unclaw_tui.widgets.live_table import Cell, LiveTable
from unclaw_tui.widgets.model import ConnectionRow, RowStore

ROUTE_STYLES = {"tls": "magenta", "dns": "cyan", "vip": "blue", "relay": ""}
VERDICT_STYLES = {"allow": "", "deny": "bold red", "ask": "bold yellow"}


def verdict_text(verdict: str, rule: str) -> str:
    """'allow default', 'deny r3', 'ask' (held: no rule decided it yet)."""
    return verdict if verdict == "ask" else f"{verdict} {rule}"


class ConnectionsTable(LiveTable[ConnectionRow]):
    COLUMNS = (
        ("proto", "Proto"),
        ("peer", "Peer"),
        ("dst", "Destination"),
        ("host", "Hostname"),
        ("route", "Route"),
        ("verdict", "Verdict"),
        ("state", "State"),
        ("up", "Up"),
        ("down", "Down"),
        ("age", "Age"),
    )
    TIME_DEPENDENT = True
    FOLLOW_TAIL = True

    def __init__(self, store: RowStore[ConnectionRow], *, id: str | None = None) -> None:
        super().__init__(store, id=id)
        # None: all peers; else the public key of the one peer shown.
        self.peer_scope: str | None = None

    def in_scope(self, row: ConnectionRow) -> bool:
        return self.peer_scope is None or row.peer_public_key == self.peer_scope

    def cells(self, row: ConnectionRow, now: float) -> tuple[Cell, ...]:
        if row.closed_at is None:
            base = ""
            state: Cell = ("open", "green")
            age = fmt_duration(now - row.opened_at)
        else:
            base = "dim"
            state = (f"error: {row.error}", "dim red") if row.error else ("closed", "dim")
            age = fmt_duration(row.closed_at - row.opened_at)
        return (
            (row.proto, base),
            (row.peer, base),
            (row.dst, base),
            (row.hostname or "-", base),
            (row.route, base or ROUTE_STYLES.get(row.route, "")),
            (verdict_text(row.verdict, row.rule), base or VERDICT_STYLES.get(row.verdict, "")),
            state,
            (fmt_bytes(row.bytes_up), base),
            (fmt_bytes(row.bytes_down), base),
            (age, base),
        )

    def search_text(self, row: ConnectionRow) -> str:
        return (
            f"{row.proto} {row.peer} {row.dst} {row.hostname or ''} {row.route} "
            f"{verdict_text(row.verdict, row.rule)} {row.error or ''}"
        )
