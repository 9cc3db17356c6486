"""The DNS log pane: one row per query, newest at the bottom."""

from __future__ import annotations

from unclaw_tui.widgets.format import fmt_clock
from unclaw_tui.widgets.live_table import Cell, LiveTable
from unclaw_tui.widgets.model import DnsRow

RCODE_STYLES = {"NOERROR": "", "NXDOMAIN": "yellow", "SERVFAIL": "red", "REFUSED": "red"}


class DnsLog(LiveTable[DnsRow]):
    COLUMNS = (
        ("time", "Time"),
        ("peer", "Peer"),
        ("name", "Name"),
        ("type", "Type"),
        ("answer", "Answer"),
        ("rcode", "Rcode"),
        ("ms", "ms"),
    )
    FOLLOW_TAIL = True

    def cells(self, row: DnsRow, now: float) -> tuple[Cell, ...]:
        if row.cached:
            ms = "cache"
        elif row.upstream_ms is None:
            ms = "local"
        else:
            ms = f"{row.upstream_ms:.0f}"
        return (
            (fmt_clock(row.ts), "dim"),
            (row.peer, ""),
            (row.qname, "bold"),
            (row.qtype, ""),
            (row.answer, ""),
            (row.rcode, RCODE_STYLES.get(row.rcode, "red")),
            (ms, "dim" if row.cached else ""),
        )

    def search_text(self, row: DnsRow) -> str:
        return f"{row.peer} {row.qname} {row.qtype} {row.answer} {row.rcode}"
