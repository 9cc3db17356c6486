"""The operator console: a Textual app over a gateway that runs on the same event loop.

The gateway is injected (`UnclawApp(gateway)`), so tests pass a fake and integration tests a
real `Gateway`. The app never blocks the loop: it reads `gateway.snapshot()` a few times a
second, and a worker takes subscribed events in batches straight from the subscription (the
one buffer between the gateway and the console; what it drops is counted and shown in the
status bar) into the model, then announces them with a collapsing `EventsArrived` message; the
panes then update only the rows that changed.

Policy (issue 14): prompts queue in the model from their events (and from `gateway.prompts()`
when a snapshot's count disagrees, e.g. after dropped events); a new one pops the prompt screen
over the dashboard unless the operator said "later"; the status bar counts them.  Rules,
answers and peer policies go through the gateway's API, as the CLI's do.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable

from unclaw_tui import events as ev
from unclaw_tui.gateway import GatewayProtocol, GatewaySnapshot
from unclaw_tui.screens.add_peer import AddPeerScreen
from unclaw_tui.screens.confirm_remove import ConfirmRemoveScreen
from unclaw_tui.screens.dashboard import DashboardScreen
from unclaw_tui.screens.help import HelpScreen
from unclaw_tui.screens.peer_policy import PeerPolicyScreen
from unclaw_tui.screens.peer_qr import PeerQrScreen
from unclaw_tui.screens.prompt import PromptScreen, headline
from unclaw_tui.screens.rule_form import RuleDraft, RuleFormScreen, draft_from_row
from unclaw_tui.screens.rules import RulesScreen
from unclaw_tui.widgets.filter_bar import FilterBar
from unclaw_tui.widgets.live_table import LiveTable
from unclaw_tui.widgets.messages import EventsArrived, PeerCreated, PeerDeleted, SnapshotTaken
from unclaw_tui.widgets.model import ConsoleModel
from unclaw_tui.widgets.peers_table import PeersTable
from unclaw_tui.widgets.rules_table import describe_rule

if TYPE_CHECKING:
    from unclaw_tui import config

REFRESH_INTERVAL_S = 0.5
UI_SWITCH_INTERVAL = 0.0005  # seconds; see run_app
# Events are taken from the subscription at most this many at a time, every EVENT_INTERVAL s
# (at once while more wait): one model update and one render per batch, not per event.
EVENT_BATCH = 2_000
EVENT_INTERVAL = 0.05
FILTER_DEBOUNCE_S = 0.15
# Events that change the peer list or its counters: take a snapshot now rather than later.
PEER_EVENTS = (ev.PeerAdded, ev.PeerRemoved, ev.PeerHandshake, ev.PeerEndpointChanged)
DASHBOARD_ACTIONS = {
    "add_peer",
    "remove_peer",
    "filter",
    "toggle_scope",
    "toggle_pause",
    "rules",
    "rule_from_row",
    "peer_policy",
}


class UnclawApp(App[int]):
    # The dashboard is the default screen, which Textual does not load a CSS_PATH for.
    CSS_PATH: ClassVar[list[str | Path]] = ["app.tcss", "screens/dashboard.tcss"]
    TITLE = "unclaw-tui"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "add_peer", "Add peer"),
        Binding("d", "remove_peer", "Remove peer"),
        Binding("slash", "filter", "Filter"),
        Binding("c", "toggle_scope", "Conns scope"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("r", "rules", "Rules"),
        Binding("n", "rule_from_row", "New rule"),
        Binding("e", "peer_policy", "Policy"),
        Binding("w", "prompts", "Prompts"),
        Binding("t", "toggle_dark", "Theme", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        gateway: GatewayProtocol,
        *,
        title_suffix: str = "",
        clock: Callable[[], float] = time.time,
        state_dir: Path | None = None,
        manage_gateway: bool = True,
        refresh_interval: float = REFRESH_INTERVAL_S,
        max_connections: int = 10_000,
        on_started: Callable[[], None] | None = None,
    ) -> None:
        """`clock` gives the wall time shown in the panes (tests freeze it); `state_dir` is
        where QR PNGs go; with `manage_gateway` the app calls `gateway.start()` on mount (then
        `on_started`) and `gateway.stop()` on exit when the gateway has them."""
        super().__init__()
        self.gateway = gateway
        self.clock = clock
        self.state_dir = state_dir
        self.manage_gateway = manage_gateway
        self.refresh_interval = refresh_interval
        self.on_started = on_started
        self.title = f"unclaw-tui{title_suffix}"
        self.model = ConsoleModel(max_connections=max_connections)
        self.paused = False
        self.snapshot: GatewaySnapshot | None = None
        self.gateway_started = False
        self._subscription: ev.Subscription | None = None
        self._filter_target: LiveTable[Any] | None = None
        self._filter_timer: Timer | None = None
        self._scope_timer: Timer | None = None
        # Prompts: how many had opened when last looked, and whether the operator said
        # "later" (no pop-ups then until the queue empties or `w`).
        self._prompts_seen = 0
        self._prompts_later = False

    # -- lifecycle --------------------------------------------------------------------------

    def get_default_screen(self) -> Screen[Any]:
        return DashboardScreen(self.model, self.clock)

    @property
    def closing(self) -> bool:
        """True once the app has started to shut down (Textual clears `is_running` before it
        removes the widgets) or to close its screens: late messages are ignored."""
        return not self.is_running or not self.screen_stack

    @property
    def dashboard(self) -> DashboardScreen:
        screen = self.screen_stack[0]
        assert isinstance(screen, DashboardScreen)
        return screen

    async def on_mount(self) -> None:
        # Subscribe before starting, so GatewayStarted and early handshakes are seen.
        self._subscription = self.gateway.subscribe()
        self._pump_events(self._subscription)
        start = getattr(self.gateway, "start", None)
        if self.manage_gateway and start is not None:
            try:
                await start()
            except Exception as exc:
                self.exit(1, return_code=1, message=f"unclaw-tui: the gateway did not start: {exc}")
                return
            self.gateway_started = True
            if self.on_started is not None:
                self.on_started()
        self.set_interval(self.refresh_interval, self.take_snapshot)

    @on(DashboardScreen.Ready)
    def _dashboard_ready(self) -> None:
        self.take_snapshot()

    async def on_unmount(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
        stop = getattr(self.gateway, "stop", None)
        if self.gateway_started and stop is not None:
            self.gateway_started = False
            await stop()

    # -- data in ------------------------------------------------------------------------------

    def take_snapshot(self) -> None:
        self.post_message(SnapshotTaken(self.gateway.snapshot()))

    @work(exclusive=True, group="events")
    async def _pump_events(self, subscription: ev.Subscription) -> None:
        # The model is updated here, on the app's loop, from a batch that left the
        # subscription: events never wait anywhere else (a second queue would be a second
        # place to drop them). Rendering follows through one collapsing message per batch.
        async for batch in subscription.batches(EVENT_BATCH, EVENT_INTERVAL):
            self._apply(batch)
            self.post_message(EventsArrived())
            await asyncio.sleep(0)  # a full batch is taken again at once: let keys through

    def _apply(self, events: Iterable[ev.Event]) -> None:
        peers_changed = False
        model = self.model
        prompts, rules = model.prompts.version, model.rules_version
        for event in events:
            model.apply(event)
            peers_changed = peers_changed or isinstance(event, PEER_EVENTS)
        if peers_changed and self.is_running:
            self.take_snapshot()
        if model.prompts.version != prompts and self.is_running:
            self.call_later(self._prompts_changed)
        if model.rules_version != rules and self.is_running:
            self.call_later(self._rules_changed)

    def inject_events(self, events: Iterable[ev.Event]) -> None:
        """Feed events as if they came from the subscription (used by tests and demos)."""
        self._apply(events)
        if self.is_running:
            self.post_message(EventsArrived())

    @on(SnapshotTaken)
    def _apply_snapshot(self, message: SnapshotTaken) -> None:
        if self.closing:
            return
        now = self.clock()
        self.snapshot = message.snapshot
        self.model.peers.update(message.snapshot, now)
        self.model.connections.live_bytes(message.snapshot.flow_bytes)
        self.model.connections.prune(now)
        self.dashboard.refresh_panes(now, live=not self.paused)
        if message.snapshot.prompts_open != len(self.model.prompts):
            self._sync_prompts()
        self._show_status(now)

    @on(EventsArrived)
    def _show_events(self) -> None:
        if self.closing or self.paused:
            return
        # Incremental: the cost follows the number of changed rows, and under a flood
        # EventsArrived messages collapse, so this runs a bounded number of times.
        self.dashboard.refresh_logs(self.clock(), clock_text=False)

    @property
    def events_dropped(self) -> int:
        """Events the console lost because it fell behind (its subscription's count)."""
        return self._subscription.dropped if self._subscription is not None else 0

    # -- actions -------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Dashboard keys do nothing (and are hidden) while a dialog or the QR screen is up;
        # the prompt queue opens from the dashboard and the Rules screen.
        if action == "prompts":
            return isinstance(self.screen, DashboardScreen | RulesScreen)
        return action not in DASHBOARD_ACTIONS or isinstance(self.screen, DashboardScreen)

    def action_add_peer(self) -> None:
        self.push_screen(AddPeerScreen(self.gateway.add_peer), callback=self._peer_added)

    def _peer_added(self, peer: Any) -> None:
        if peer is not None:
            self.post_message(PeerCreated(peer))

    @on(PeerCreated)
    def _show_new_peer(self, message: PeerCreated) -> None:
        self.take_snapshot()
        self.show_peer_qr(message.peer.name)

    @on(PeersTable.ShowPeer)
    def _show_selected_peer(self, message: PeersTable.ShowPeer) -> None:
        row = self.model.peers.store.get(message.public_key)
        if row is not None:
            self.show_peer_qr(row.name)

    def show_peer_qr(self, name: str) -> None:
        try:
            config_text = self.gateway.client_config(name)
        except KeyError:
            self.notify(f"No peer named {name}", severity="error")
            return
        self.push_screen(PeerQrScreen(name, config_text, self.state_dir))

    def action_remove_peer(self) -> None:
        peer = self.dashboard.peers.selected_peer()
        if peer is None:
            self.notify("Select a peer in the Peers pane first", severity="warning")
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                try:
                    self.gateway.remove_peer(peer.name)
                except KeyError:
                    self.notify(f"{peer.name} was already gone", severity="warning")
                self.post_message(PeerDeleted(peer.name))

        self.push_screen(ConfirmRemoveScreen(peer.name, peer.ip), callback=confirmed)

    @on(PeerDeleted)
    def _peer_deleted(self, message: PeerDeleted) -> None:
        self.take_snapshot()
        self.notify(f"Removed peer {message.name}")

    def _show_status(self, now: float) -> None:
        dropped = self.events_dropped
        self.dashboard.show_status(
            self.snapshot, now, paused=self.paused, dropped=dropped, prompts=len(self.model.prompts)
        )

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused
        now = self.clock()
        if not self.paused:  # catch up with everything that came meanwhile
            self.dashboard.refresh_logs(now)
        self._show_status(now)

    def action_toggle_scope(self) -> None:
        connections = self.dashboard.connections
        selected = self.dashboard.peers.selected_key
        connections.peer_scope = None if connections.peer_scope is not None else selected
        self._rescope()

    def _rescope(self) -> None:
        connections = self.dashboard.connections
        connections.rebuild(self.clock())
        self.dashboard.retitle(connections)

    @on(DataTable.RowHighlighted, "#peers")
    def _peer_highlighted(self, message: DataTable.RowHighlighted) -> None:
        connections = self.dashboard.connections
        key = message.row_key.value
        if connections.peer_scope is None or key == connections.peer_scope or key is None:
            return
        connections.peer_scope = key
        # Moving through peers with the arrow keys should not rebuild the table at every step.
        if self._scope_timer is not None:
            self._scope_timer.stop()
        # The timer belongs to the dashboard so that it dies with it instead of firing at exit.
        self._scope_timer = self.dashboard.set_timer(FILTER_DEBOUNCE_S, self._rescope)

    def action_filter(self) -> None:
        dashboard = self.dashboard
        focused = dashboard.focused
        target = focused if isinstance(focused, LiveTable) else self._filter_target
        self._filter_target = target or dashboard.peers
        bar = dashboard.query_one(FilterBar)
        bar.value = self._filter_target.filter_text
        bar.placeholder = f"filter {self._filter_target.border_title}… (enter keeps, escape clears)"
        bar.add_class("-open")
        bar.focus()

    @on(FilterBar.Changed)
    def _filter_changed(self) -> None:
        if self.closing:
            return
        if self._filter_timer is not None:
            self._filter_timer.stop()
        self._filter_timer = self.dashboard.set_timer(FILTER_DEBOUNCE_S, self._apply_filter)

    def _apply_filter(self) -> None:
        target = self._filter_target
        if target is None or self.closing:
            return
        target.set_filter(self.dashboard.query_one(FilterBar).value.strip(), self.clock())
        self.dashboard.retitle(target)

    @on(FilterBar.Submitted)
    @on(FilterBar.Cancelled)
    def _close_filter(self, message: FilterBar.Submitted | FilterBar.Cancelled) -> None:
        bar = self.dashboard.query_one(FilterBar)
        if isinstance(message, FilterBar.Cancelled):
            bar.value = ""
        self._apply_filter()
        if self._filter_timer is not None:
            self._filter_timer.stop()
            self._filter_timer = None
        bar.remove_class("-open")
        if self._filter_target is not None:
            self._filter_target.focus()

    # -- policy: prompts, rules, peer policies ---------------------------------------------------

    def _sync_prompts(self) -> None:
        """Take the gateway's own list of open prompts (the events may have been dropped)."""
        try:
            views = self.gateway.prompts()
        except Exception as exc:  # the gateway stopping: the next snapshot tries again
            self.log.warning(f"prompts: {exc}")
            return
        before = self.model.prompts.version
        self.model.prompts.replace(views)
        if self.model.prompts.version != before:
            self._prompts_changed()

    def _prompt_screen(self) -> PromptScreen | None:
        return next((s for s in self.screen_stack if isinstance(s, PromptScreen)), None)

    def _prompts_changed(self) -> None:
        if self.closing:
            return
        prompts = self.model.prompts
        self._show_status(self.clock())
        if not prompts:
            self._prompts_later = False
        new = prompts.opened_count > self._prompts_seen
        self._prompts_seen = prompts.opened_count
        screen = self._prompt_screen()
        if screen is not None:
            if screen is self.screen:
                screen.follow_queue()
            return
        if not new or not prompts or self._prompts_later:
            return
        focused = self.screen.focused
        if isinstance(self.screen, DashboardScreen) and not isinstance(focused, FilterBar):
            self.action_prompts()
        else:  # over a dialog or a form: say so, do not take the keys being typed
            first = prompts.queue()[-1]
            self.notify(f"Prompt: {headline(first)} · w answers", severity="warning", timeout=6)

    def action_prompts(self) -> None:
        if not self.model.prompts:
            self.notify("No prompts waiting")
            return
        self._prompts_later = False
        if self._prompt_screen() is None:
            self.push_screen(
                PromptScreen(
                    self.model.prompts,
                    self._answer,
                    self._fallback_of,
                    self.clock,
                    sync=self._sync_prompts,
                ),
                callback=self._prompt_closed,
            )

    def _answer(self, prompt_id: str, access: str, duration: str, scope: str) -> str | None:
        """Answer through the gateway; the prompt leaves the queue now, not at its event."""
        prompts = self.model.prompts
        try:
            made = self.gateway.answer_prompt(prompt_id, access, duration, scope, by="console")
        except KeyError:  # answered elsewhere or timed out a moment ago: its event is on the way
            prompts.close(prompt_id, "closed")
            self._show_status(self.clock())
            raise
        prompts.close(prompt_id, f"{access} ({duration}) by you")
        self._show_status(self.clock())
        return made

    def _fallback_of(self, peer: str) -> str:
        peers = self.snapshot.peers if self.snapshot is not None else ()
        return next((p.fallback for p in peers if p.name == peer), "deny")

    def _prompt_closed(self, later: bool | None) -> None:
        self._prompts_later = bool(later) and bool(self.model.prompts)
        self._show_status(self.clock())

    def _rules_changed(self) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, RulesScreen):
                screen.refresh_rules()

    def action_rules(self) -> None:
        self.push_screen(RulesScreen(self.gateway, self.clock))

    def action_rule_from_row(self) -> None:
        dashboard = self.dashboard
        focused = dashboard.focused
        draft: RuleDraft | None = None
        if isinstance(focused, LiveTable) and (key := focused.selected_key) is not None:
            row = focused.store.get(key)
            if row is not None:
                draft = draft_from_row(row)
        if draft is None:
            self.notify(
                "Select a row in Connections, DNS, TLS hosts or Peers first", severity="warning"
            )
            return
        self.push_screen(
            RuleFormScreen("Rule from this row", draft, self.gateway.add_rule, self.clock),
            callback=self._rule_added,
        )

    def _rule_added(self, view: Any) -> None:
        if view is not None:
            self.notify(f"Rule {view.rule.id}: {describe_rule(view)}")

    def action_peer_policy(self) -> None:
        peer = self.dashboard.peers.selected_peer()
        if peer is None:
            self.notify("Select a peer in the Peers pane first", severity="warning")
            return

        def chosen(choice: tuple[str, str] | None) -> None:
            if choice is None:
                return
            policy, fallback = choice
            try:
                self.gateway.set_peer_policy(peer.name, policy, fallback)
            except (KeyError, ValueError) as exc:
                self.notify(f"{peer.name}: {exc}", severity="error")
                return
            self.take_snapshot()
            what = f"ask, else {fallback}" if policy == "ask" else policy
            self.notify(f"{peer.name}: {what}")

        self.push_screen(PeerPolicyScreen(peer.name, peer.policy, peer.fallback), callback=chosen)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_dark(self) -> None:
        self.theme = "textual-light" if self.theme == "textual-dark" else "textual-dark"

    async def action_quit(self) -> None:
        self.exit(0)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if isinstance(screen, DashboardScreen):
            yield SystemCommand("Add peer", "Add a peer and show its QR code", self.action_add_peer)
            yield SystemCommand(
                "Show peer config",
                "Config text and QR code of the selected peer",
                screen.peers.action_show_peer,
            )
            yield SystemCommand(
                "Remove peer", "Remove the selected peer (asks first)", self.action_remove_peer
            )
            yield SystemCommand("Filter", "Filter the focused pane", self.action_filter)
            yield SystemCommand(
                "Pause / resume", "Pause or resume the live panes", self.action_toggle_pause
            )
            yield SystemCommand(
                "Connections scope",
                "Connections of all peers / of the selected peer",
                self.action_toggle_scope,
            )
            yield SystemCommand(
                "Rules", "Every rule with its hits: add, edit, remove", self.action_rules
            )
            yield SystemCommand(
                "Rule from this row",
                "A rule prefilled from the selected row of the focused pane",
                self.action_rule_from_row,
            )
            yield SystemCommand(
                "Peer policy", "Allow, deny or ask for the selected peer", self.action_peer_policy
            )
        if isinstance(screen, DashboardScreen | RulesScreen):
            yield SystemCommand("Prompts", "Answer the waiting prompts", self.action_prompts)
        yield SystemCommand("Help", "What each key does", self.action_help)
        yield SystemCommand(
            "Dark / light", "Switch between dark and light", self.action_toggle_dark
        )


def run_app(settings: config.Settings, on_started: Callable[[], None] | None = None) -> int:
    """Run the console; the gateway runs on its own thread and loop (see gateway_thread)."""
    from unclaw_tui.gateway_thread import ThreadedGateway  # tests import this module with fakes

    # The gateway thread spends its time in C with the interpreter lock released and needs it
    # back for a moment after each batch; if the console thread holds it, the default 5 ms
    # switch interval stalls the data path (python -m bench.tui: download 0.81x -> 0.88x).
    sys.setswitchinterval(UI_SWITCH_INTERVAL)
    app = UnclawApp(ThreadedGateway(settings), state_dir=settings.state_dir, on_started=on_started)
    return app.run() or 0
