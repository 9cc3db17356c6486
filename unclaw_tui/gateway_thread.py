"""The gateway on its own thread and event loop, for the console.

With the console and the gateway on one loop, every frame Textual renders delays the packet
loop (measured: the TUI cost 15-35 % of bulk throughput against `--no-ui`).  Here the gateway
runs on a thread of its own with its own loop (uvloop when installed), and the C engine releases
the GIL while it works.  The UI thread never calls into the engine:

- `snapshot()` returns the latest snapshot the gateway thread published (2 per second, the
  console's refresh rate, and right after every command);
- `subscribe()` gives a subscription on the gateway's own bus, which the console reads from
  its thread in batches (see `bus`): the subscription is the one buffer between the gateway and
  the console, and its `dropped` count is all the console lost;
- commands (add/remove peer, client config, rules, prompt answers, peer policies) run on the
  gateway loop and the caller waits for their result, which they produce at once (a
  state-file write and an engine call).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from unclaw_tui.bus import EventBus, Subscription
from unclaw_tui.config import Settings
from unclaw_tui.gateway import GatewaySnapshot, PeerSnapshot
from unclaw_tui.policy import Rule
from unclaw_tui.policy.views import PromptView, RuleView

if TYPE_CHECKING:
    from unclaw_tui.gateway import Gateway
    from unclaw_tui.services.requests import RequestRecord

T = TypeVar("T")

SNAPSHOT_INTERVAL = 0.5
# Events held for the console while it renders; past it the oldest are dropped and counted.
CONSOLE_BACKLOG = 50_000
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 10.0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ThreadedGateway:
    """A `GatewayProtocol` whose `Gateway` lives on its own thread (see the module docstring)."""

    def __init__(self, settings: Settings, *, snapshot_interval: float = SNAPSHOT_INTERVAL):
        self.settings = settings
        self._snapshot_interval = snapshot_interval
        self._gateway: Gateway | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._latest: GatewaySnapshot | None = None
        # The gateway's bus, made before it so that subscribers do not miss its first events.
        self._bus = EventBus()

    # -- lifecycle (called from the UI loop) ---------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._start_thread)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="unclaw-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise TimeoutError("the gateway did not start in time")
        if self._error is not None:
            raise self._error

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop_thread)

    def _stop_thread(self) -> None:
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is None or stopping is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(stopping.set)
        thread.join(COMMAND_TIMEOUT)

    # -- the gateway thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop = _new_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        from unclaw_tui.gateway import Gateway

        self._stopping = asyncio.Event()
        try:
            gateway = Gateway(self.settings, self._bus)
            await gateway.start()
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._ready.set()
            return
        self._gateway = gateway
        self._latest = gateway.snapshot()
        self._ready.set()
        snapshots = asyncio.create_task(self._publish_snapshots(gateway))
        await self._stopping.wait()
        await gateway.stop()  # GatewayStopped is the last event subscribers get
        snapshots.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await snapshots

    async def _publish_snapshots(self, gateway: Gateway) -> None:
        while True:
            self._latest = gateway.snapshot()
            await asyncio.sleep(self._snapshot_interval)

    # -- GatewayProtocol (called from the UI thread) -----------------------------------------

    def subscribe(self, maxsize: int = CONSOLE_BACKLOG) -> Subscription:
        """Events of the gateway thread's bus, read from the caller's thread; made before
        start(), it sees GatewayStarted too."""
        return self._bus.subscribe(maxsize)

    def snapshot(self) -> GatewaySnapshot:
        if self._latest is not None:
            return self._latest
        return GatewaySnapshot(
            listen_port=self.settings.listen_port,
            public_key="",
            endpoint=self.settings.endpoint or "",
            address=str(self.settings.address),
            started_at=time.time(),
            peers=(),
        )

    def add_peer(self, name: str, ip: str | None = None) -> PeerSnapshot:
        return self._command(lambda gw: gw.add_peer(name, ip))

    def remove_peer(self, name: str) -> None:
        self._command(lambda gw: gw.remove_peer(name))

    def client_config(self, name: str) -> str:
        return self._command(lambda gw: gw.client_config(name))

    def requests(self, limit: int | None = None, peer: str | None = None) -> list[RequestRecord]:
        # Read straight from the ring (it has its own lock): no trip to the gateway's thread,
        # so a console refreshing its Requests pane never waits behind the event loop.
        gateway = self._gateway
        return [] if gateway is None else gateway.request_log.recent(limit, peer)

    def reveal(self, request_id: int, where: str, index: int) -> str | None:
        gateway = self._gateway
        if gateway is None:
            raise KeyError(f"request {request_id} is no longer kept")
        return gateway.reveal(request_id, where, index)

    def set_peer_policy(
        self, name: str, policy: str | None = None, fallback: str | None = None
    ) -> PeerSnapshot:
        return self._command(lambda gw: gw.set_peer_policy(name, policy, fallback))

    def rules(self) -> list[RuleView]:
        return self._command(lambda gw: gw.rules())

    def add_rule(self, rule: Rule, by: str = "console") -> RuleView:
        return self._command(lambda gw: gw.add_rule(rule, by))

    def remove_rule(self, rule_id: str, by: str = "console") -> Rule:
        return self._command(lambda gw: gw.remove_rule(rule_id, by))

    def prompts(self) -> list[PromptView]:
        return self._command(lambda gw: gw.prompts())

    def answer_prompt(
        self,
        prompt_id: str,
        access: str,
        duration: str = "always",
        scope: str = "host",
        by: str = "console",
    ) -> str | None:
        return self._command(lambda gw: gw.answer_prompt(prompt_id, access, duration, scope, by))

    def _command(self, fn: Callable[[Gateway], T]) -> T:
        loop = self._loop
        if loop is None or self._gateway is None:
            raise RuntimeError("the gateway is not running")

        async def run() -> T:
            assert self._gateway is not None
            result = fn(self._gateway)
            self._latest = self._gateway.snapshot()
            return result

        return asyncio.run_coroutine_threadsafe(run(), loop).result(COMMAND_TIMEOUT)

    @property
    def gateway(self) -> Any:
        """The wrapped gateway, for tests and tools on the gateway thread only."""
        return self._gateway
