"""The status bar: listen port, key, endpoint, uptime and totals, with a throughput sparkline;
alerts (prompts waiting, under load, events dropped, paused) lead its second line."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Sparkline, Static

from unclaw_tui.gateway import GatewaySnapshot
from unclaw_tui.widgets.format import fmt_bytes, fmt_rate, fmt_uptime, short_key
from unclaw_tui.widgets.model import PeersModel


def status_text(
    snap: GatewaySnapshot | None,
    now: float,
    peers: PeersModel,
    *,
    paused: bool = False,
    dropped: int = 0,  # events the console's subscription dropped, since it started
    prompts: int = 0,  # prompts waiting for an answer
) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    if snap is None:
        return text.append("starting…", style="dim")
    text.append("listen ", style="dim").append(f":{snap.listen_port}", style="bold")
    text.append("  key ", style="dim").append(short_key(snap.public_key, 12), style="bold")
    text.append("  endpoint ", style="dim").append(snap.endpoint, style="bold")
    text.append("  up ", style="dim").append(fmt_uptime(now - snap.started_at))
    text.append("\n")
    # Alerts lead the second line: at 80 columns its end is cut off, and they must be seen.
    if prompts:  # held flows wait on these: the first thing the operator should see
        waiting = f" {prompts} prompt{'s' if prompts > 1 else ''} waiting · w "
        text.append(waiting, style="bold black on yellow").append("  ")
    if snap.under_load:
        text.append("UNDER LOAD", style="bold red").append("  ")
    if dropped:  # the console fell behind the gateway's events
        text.append("events dropped ", style="dim").append(str(dropped), style="bold yellow")
        text.append("  ")
    if paused:
        text.append("⏸ PAUSED", style="bold reverse").append("  ")
    text.append(snap.address, style="dim")
    text.append("  peers ", style="dim")
    text.append(f"{peers.online(now)}/{len(snap.peers)}", style="bold").append(" online")
    text.append("  flows ", style="dim").append(str(snap.open_flows), style="bold")
    text.append("  rx ", style="dim").append(fmt_bytes(peers.rx_total))
    text.append("  tx ", style="dim").append(fmt_bytes(peers.tx_total))
    rate = peers.total_history[-1] if peers.total_history else 0.0
    text.append("  now ", style="dim").append(fmt_rate(rate))
    drops = sum(snap.drops.values())
    if drops:
        text.append("  drops ", style="dim").append(str(drops), style="yellow")
    return text


class StatusBar(Horizontal):
    def compose(self) -> ComposeResult:
        yield Static(status_text(None, 0.0, PeersModel()), id="status-text")
        yield Sparkline([], id="throughput")

    def show(self, text: Text, history: Sequence[float]) -> None:
        self.query_one("#status-text", Static).update(text)
        self.query_one("#throughput", Sparkline).data = list(history)
