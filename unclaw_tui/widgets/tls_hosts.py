"""The TLS hosts pane: per SNI hostname, who used it, how it was handled, the last request."""

from __future__ import annotations

from unclaw_tui.widgets.live_table import Cell, LiveTable
from unclaw_tui.widgets.model import TlsHostRow

MODE_STYLES = {"intercepted": "magenta", "passthrough": "", "rejected": "red"}


def peers_text(peers: set[str], shown: int = 2) -> str:
    names = sorted(peers)
    text = ", ".join(names[:shown])
    return f"{text} +{len(names) - shown}" if len(names) > shown else text


class TlsHosts(LiveTable[TlsHostRow]):
    COLUMNS = (
        ("host", "Hostname"),
        ("peers", "Peers"),
        ("conns", "Conns"),
        ("mode", "Mode"),
        ("request", "Last request"),
        ("errors", "Errors"),
    )

    def cells(self, row: TlsHostRow, now: float) -> tuple[Cell, ...]:
        if row.errors:
            errors: Cell = (f"{row.errors} {row.last_error or ''}".strip(), "red")
        else:
            errors = ("0", "dim")
        return (
            (row.hostname, "bold"),
            (peers_text(row.peers), ""),
            (str(row.connections), ""),
            (row.mode, MODE_STYLES.get(row.mode, "")),
            (row.last_request or "-", ""),
            errors,
        )

    def search_text(self, row: TlsHostRow) -> str:
        return f"{row.hostname} {' '.join(row.peers)} {row.mode} {row.last_request or ''}"
