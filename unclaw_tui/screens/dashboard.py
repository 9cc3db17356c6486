"""The main screen: status bar, Peers, Connections, DNS log and TLS hosts."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer

from unclaw_tui.gateway import GatewaySnapshot
from unclaw_tui.widgets.connections_table import ConnectionsTable
from unclaw_tui.widgets.dns_log import DnsLog
from unclaw_tui.widgets.filter_bar import FilterBar
from unclaw_tui.widgets.live_table import LiveTable
from unclaw_tui.widgets.model import ConsoleModel
from unclaw_tui.widgets.peers_table import PeersTable
from unclaw_tui.widgets.status_bar import StatusBar, status_text
from unclaw_tui.widgets.tls_hosts import TlsHosts

PANE_TITLES = {"peers": "Peers", "connections": "Connections", "dns": "DNS", "tls": "TLS hosts"}


class DashboardScreen(Screen[None]):
    """Lays the panes out and brings them up to date; the app owns the gateway and the model.

    Its styles, dashboard.tcss beside this file, are loaded by the app (its default screen).
    """

    # Below 100 columns the status text needs the sparkline's room (dashboard.tcss).
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (100, "-wide")]

    class Ready(Message):
        """The panes are mounted: a good time for a first snapshot."""

    def __init__(self, model: ConsoleModel, clock: Callable[[], float]) -> None:
        super().__init__(id="dashboard")
        self.model = model
        self.clock = clock
        # Updates that arrive before the panes are mounted wait in the model's stores.
        self.ready = False
        # The widgets are kept here: live updates must not query the DOM, which also goes
        # away under them while the app shuts down.
        self._status = StatusBar(id="status")
        self.peers = PeersTable(model.peers.store, id="peers")
        self.connections = ConnectionsTable(model.connections.store, id="connections")
        self.dns = DnsLog(model.dns.store, id="dns")
        self.tls = TlsHosts(model.tls.store, id="tls")

    def compose(self) -> ComposeResult:
        yield self._status
        with Vertical(id="panes"):
            yield self.peers
            yield self.connections
            with Horizontal(id="logs"):
                yield self.dns
                yield self.tls
        yield FilterBar(placeholder="filter… (enter keeps it, escape clears it)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        for table in (self.peers, self.connections, self.dns, self.tls):
            self.retitle(table)
        self.peers.focus()
        self.ready = True
        self.refresh_panes(self.clock(), live=True)
        self.post_message(self.Ready())

    def on_unmount(self) -> None:
        self.ready = False

    def retitle(self, table: LiveTable) -> None:  # type: ignore[type-arg]
        title = PANE_TITLES[table.id or ""]
        if isinstance(table, ConnectionsTable):
            scope = self.model.peers.store.get(table.peer_scope) if table.peer_scope else None
            title += f" · {scope.name}" if scope else " · all peers"
        table.border_title = title
        table.border_subtitle = f"filter: {table.filter_text}" if table.filter_text else ""

    def refresh_panes(self, now: float, *, live: bool) -> None:
        """Bring the tables up to date; `live` False leaves the paused log panes as they are."""
        if not self.ready:
            return
        self.peers.sync(now)
        self.peers.refresh_visible(now)
        if live:
            self.refresh_logs(now)

    def refresh_logs(self, now: float, *, clock_text: bool = True) -> None:
        """Sync the log panes; `clock_text` also re-renders on-screen ages."""
        if not self.ready:
            return
        for table in (self.connections, self.dns, self.tls):
            table.sync(now)
            if clock_text:
                table.refresh_visible(now)

    def show_status(
        self,
        snapshot: GatewaySnapshot | None,
        now: float,
        *,
        paused: bool,
        dropped: int,
        prompts: int = 0,
    ) -> None:
        if not self.ready:
            return
        peers = self.model.peers
        text = status_text(snapshot, now, peers, paused=paused, dropped=dropped, prompts=prompts)
        self._status.show(text, peers.total_history)
