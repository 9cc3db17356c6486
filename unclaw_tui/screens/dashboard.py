"""The main screen: status bar, Peers, Connections, DNS log and TLS hosts."""

from __future__ import annotations

from collections.abc import Callable

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.events import Resize
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
from unclaw_tui.widgets.status_bar import StatusBar, StatusLine
from unclaw_tui.widgets.tls_hosts import TlsHosts

PANE_TITLES = {"peers": "Peers", "connections": "Connections", "dns": "DNS", "tls": "TLS hosts"}


class DashboardScreen(Screen[None]):
    """Lays the panes out and brings them up to date; the app owns the gateway and the model."""

    class Ready(Message):
        """The panes are mounted: a good time for a first snapshot."""

    # Styles: dashboard.tcss beside this file, loaded by the app (this is its default screen).

    def __init__(self, model: ConsoleModel, clock: Callable[[], float]) -> None:
        super().__init__(id="dashboard")
        self.model = model
        self.clock = clock
        # Updates that arrive before the panes are mounted wait in the model's stores.
        self.ready = False
        self._status = StatusBar(id="status")
        self._peers = PeersTable(model.peers.store, id="peers")
        self._connections = ConnectionsTable(model.connections.store, id="connections")
        self._dns = DnsLog(model.dns.store, id="dns")
        self._tls = TlsHosts(model.tls.store, id="tls")

    def compose(self) -> ComposeResult:
        yield self._status
        with Vertical(id="panes"):
            yield self._peers
            yield self._connections
            with Horizontal(id="logs"):
                yield self._dns
                yield self._tls
        yield FilterBar(placeholder="filter… (enter keeps it, escape clears it)", id="filter")
        yield Footer()

    def on_mount(self) -> None:
        for table in self.tables:
            self.retitle(table)
        self.peers.focus()
        self.ready = True
        self.refresh_panes(self.clock(), live=True)
        self.post_message(self.Ready())

    def on_unmount(self) -> None:
        self.ready = False

    def on_resize(self, event: Resize) -> None:
        # No media queries in tcss: below 100 columns the status text needs the sparkline's room.
        self.set_class(event.size.width < 100, "-narrow")

    # Widgets are looked up once: live updates must not query the DOM, which also goes
    # away under them while the app shuts down.
    @property
    def peers(self) -> PeersTable:
        return self._peers

    @property
    def connections(self) -> ConnectionsTable:
        return self._connections

    @property
    def dns(self) -> DnsLog:
        return self._dns

    @property
    def tls(self) -> TlsHosts:
        return self._tls

    @property
    def tables(self) -> list[LiveTable]:  # type: ignore[type-arg]
        return [self.peers, self.connections, self.dns, self.tls]

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

    def show_status(self, status: StatusLine) -> None:
        if not self.ready:
            return
        self._status.show(status, self.model.peers.total_history)

    def status_for(
        self, snapshot: GatewaySnapshot | None, now: float, *, paused: bool, dropped: int
    ) -> StatusLine:
        peers = self.model.peers
        return StatusLine(
            snapshot=snapshot,
            now=now,
            peers_online=peers.online(now),
            rx_bytes=peers.rx_total,
            tx_bytes=peers.tx_total,
            rate=peers.total_history[-1] if peers.total_history else 0.0,
            paused=paused,
            dropped_events=dropped,
        )
