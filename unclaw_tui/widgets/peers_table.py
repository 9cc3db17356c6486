"""The Peers pane: one row per peer, handshake age, traffic, rate with a sparkline."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.message import Message

from unclaw_tui.widgets.format import fmt_ago, fmt_bytes, fmt_rate, sparkline
from unclaw_tui.widgets.live_table import Cell, LiveTable
from unclaw_tui.widgets.model import STALE_AFTER_S, PeerRow

SPARK_WIDTH = 8
POLICY_STYLES = {"allow": "", "deny": "red", "ask": "yellow"}


def policy_text(policy: str, fallback: str) -> str:
    """'allow', 'deny', or 'ask→deny' (ask, and what an unanswered prompt gets)."""
    return f"ask→{fallback}" if policy == "ask" else policy


class PeersTable(LiveTable[PeerRow]):
    COLUMNS = (
        ("name", "Name"),
        ("ip", "Tunnel IP"),
        ("policy", "Policy"),
        ("endpoint", "Endpoint"),
        ("handshake", "Handshake"),
        ("rx", "Rx"),
        ("tx", "Tx"),
        ("rate", "Rate"),
        ("spark", "Recent"),
        ("conns", "Conns"),
    )
    TIME_DEPENDENT = True
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "show_peer", "Config + QR"),
    ]

    class ShowPeer(Message):
        """The operator asked for a peer's config and QR code."""

        def __init__(self, public_key: str) -> None:
            super().__init__()
            self.public_key = public_key

    def cells(self, row: PeerRow, now: float) -> tuple[Cell, ...]:
        stale = row.last_handshake is None or now - row.last_handshake >= STALE_AFTER_S
        base = "dim" if stale else ""
        handshake_style = "dim" if stale else "bold"
        return (
            (row.name, base or "bold"),
            (row.ip, base),
            (policy_text(row.policy, row.fallback), base or POLICY_STYLES.get(row.policy, "")),
            (row.endpoint or "-", base),
            (fmt_ago(row.last_handshake, now), handshake_style),
            (fmt_bytes(row.rx_bytes), base),
            (fmt_bytes(row.tx_bytes), base),
            (fmt_rate(row.rate), base),
            (sparkline(row.history, SPARK_WIDTH), base or "green"),
            (str(row.open_connections), base),
        )

    def search_text(self, row: PeerRow) -> str:
        return f"{row.name} {row.ip} {row.endpoint or ''} {row.public_key} {row.policy}"

    def action_show_peer(self) -> None:
        key = self.selected_key
        if key is not None:
            self.post_message(self.ShowPeer(key))

    def selected_peer(self) -> PeerRow | None:
        key = self.selected_key
        return None if key is None else self.store.get(key)
