"""The status bar: listen port, key, endpoint, uptime and totals, with a throughput sparkline;
alerts (under load, events dropped, paused) lead its second line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Sparkline, Static

from unclaw_tui.gateway import GatewaySnapshot
from unclaw_tui.widgets.format import fmt_bytes, fmt_rate, fmt_uptime, short_key


@dataclass(frozen=True, slots=True)
class StatusLine:
    """Everything the bar shows, computed by the dashboard from a snapshot and the models."""

    snapshot: GatewaySnapshot | None
    now: float
    peers_online: int
    rx_bytes: int
    tx_bytes: int
    rate: float
    paused: bool
    dropped_events: int = 0  # events the console's subscription dropped, since it started


def status_text(status: StatusLine) -> Text:
    snap = status.snapshot
    text = Text(no_wrap=True, overflow="ellipsis")
    if snap is None:
        text.append("starting…", style="dim")
        return text
    text.append("listen ", style="dim").append(f":{snap.listen_port}", style="bold")
    text.append("  key ", style="dim").append(short_key(snap.public_key, 12), style="bold")
    text.append("  endpoint ", style="dim").append(snap.endpoint, style="bold")
    text.append("  up ", style="dim").append(fmt_uptime(status.now - snap.started_at))
    text.append("\n")
    # Alerts lead the second line: at 80 columns its end is cut off, and they must be seen.
    if snap.under_load:
        text.append("UNDER LOAD", style="bold red").append("  ")
    if status.dropped_events:  # the console fell behind the gateway's events
        text.append("events dropped ", style="dim").append(
            str(status.dropped_events), style="bold yellow"
        )
        text.append("  ")
    if status.paused:
        text.append("⏸ PAUSED", style="bold reverse").append("  ")
    text.append(snap.address, style="dim")
    text.append("  peers ", style="dim")
    text.append(f"{status.peers_online}/{len(snap.peers)}", style="bold").append(" online")
    text.append("  flows ", style="dim").append(str(snap.open_flows), style="bold")
    text.append("  rx ", style="dim").append(fmt_bytes(status.rx_bytes))
    text.append("  tx ", style="dim").append(fmt_bytes(status.tx_bytes))
    text.append("  now ", style="dim").append(fmt_rate(status.rate))
    drops = sum(snap.drops.values())
    if drops:
        text.append("  drops ", style="dim").append(str(drops), style="yellow")
    return text


class StatusBar(Horizontal):
    def compose(self) -> ComposeResult:
        yield Static(status_text(StatusLine(None, 0.0, 0, 0, 0, 0.0, False)), id="status-text")
        yield Sparkline([], id="throughput")

    def show(self, status: StatusLine, history: Sequence[float]) -> None:
        self.query_one("#status-text", Static).update(status_text(status))
        self.query_one("#throughput", Sparkline).data = list(history)
