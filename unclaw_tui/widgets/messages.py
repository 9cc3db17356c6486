"""Messages between the gateway plumbing and the console's screens.

High-rate ones (`SnapshotTaken`, `EventsArrived`) override `can_replace`, so a backlog collapses
into the latest one instead of queueing work the UI cannot keep up with.
"""

from __future__ import annotations

from textual.message import Message

from unclaw_tui.gateway import GatewaySnapshot, PeerSnapshot


class SnapshotTaken(Message):
    """Fresh counters from `gateway.snapshot()`."""

    def __init__(self, snapshot: GatewaySnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotTaken)


class EventsArrived(Message):
    """New events are in the model; the handler brings the live panes up to date."""

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EventsArrived)


class PeerCreated(Message):
    """The operator added a peer (it is live already)."""

    def __init__(self, peer: PeerSnapshot) -> None:
        super().__init__()
        self.peer = peer


class PeerDeleted(Message):
    """The operator removed a peer."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
