"""How a connection ends, in one table: the C engine's codes, their names, the gateway's own
refusals, and the words the flow events use for them.

Pure Python (no compiled engine needed): `_ffi` checks at load that these values are the C
headers' (`TCP_CLOSE_*` in _tcp.h, `SPLICE_*` in _splice.h).
"""

from __future__ import annotations

import errno
import os
from enum import Enum, IntEnum
from typing import NamedTuple


class Refusal(Enum):
    """Why the gateway refused a flow or ended it early on its own: the closing event's words
    (`says`), the same whichever part of the gateway refused it."""

    EGRESS = "refused by egress policy"
    DESCRIPTORS = "over the peer's descriptor share"
    SHARE = "over the peer's share"
    VIP_NOT_GIVEN = "VIP not given to this peer"
    PEER_SILENT = "peer silent"
    PRESSURE = "resource pressure"

    def says(self, detail: str = "") -> str:
        return f"{self.value}: {detail}" if detail else self.value


class CloseReason(IntEnum):
    """Why the C stack closed a connection (`TCP_CLOSE_*`); `.label` names it in Python."""

    NORMAL = 1
    RESET = 2
    TIMEOUT = 3
    ABORTED = 4
    REJECTED = 5
    SYN_TIMEOUT = 6
    PEER_REMOVED = 7
    EVICTED = 8
    PEER_GONE = 9  # wg_peer_abort_flows: the peer went away
    PRESSURE = 10  # wg_peer_abort_flows: held by a zero window, its resources needed (RFC 6429)

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def peer_error(self) -> str:
        """What a flow's closing event says when the peer's side ended this way."""
        return _PEER_ERRORS[self]


# The one table of words for the peer's side of a connection ending early.
_PEER_ERRORS = {
    CloseReason.NORMAL: "connection closed early",
    CloseReason.RESET: "connection reset",
    CloseReason.TIMEOUT: "timed out",
    CloseReason.ABORTED: "aborted",
    CloseReason.REJECTED: "connection closed early",
    CloseReason.SYN_TIMEOUT: "handshake timed out",
    CloseReason.PEER_REMOVED: "peer removed",
    CloseReason.EVICTED: "evicted",
    CloseReason.PEER_GONE: Refusal.PEER_SILENT.value,
    CloseReason.PRESSURE: Refusal.PRESSURE.value,
}


def close_reason(code: int) -> CloseReason | None:
    try:
        return CloseReason(code)
    except ValueError:
        return None


class SpliceOutcome(IntEnum):
    """How a connection relayed in C ended (`SPLICE_*`)."""

    OK = 0
    FAIL_CONNECT = 1
    FAIL_PEER = 2
    FAIL_HOST = 3
    FAIL_PEER_GONE = 4
    FAIL_ABORTED = 5


class SpliceEnd(NamedTuple):
    """The parts of a splice result that say how it ended (`_ffi.SpliceResult` has them)."""

    outcome: int
    error: int  # errno, for FAIL_CONNECT / FAIL_HOST
    tcp_close: int  # CloseReason, for FAIL_PEER / FAIL_PEER_GONE


def describe_os_error(exc: BaseException) -> str:
    """A short lower-case reason for an OS-level failure, as the flow events word them."""
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, BrokenPipeError):
        return "broken pipe"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def connect_error(exc: BaseException, timeout: float) -> str:
    """Why a connect to the destination failed, worded the same for C's and Python's."""
    if isinstance(exc, TimeoutError) or (isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT):
        return f"connect timeout after {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return describe_os_error(exc)


def splice_error(end: SpliceEnd, connect_timeout: float) -> str | None:
    """The closing event's `error` for how a splice ended (None: it ended normally)."""
    outcome = end.outcome
    if outcome == SpliceOutcome.OK:
        return None
    if outcome == SpliceOutcome.FAIL_CONNECT:
        return connect_error(_os_error(end.error), connect_timeout)
    if outcome == SpliceOutcome.FAIL_HOST:
        return f"destination: {describe_os_error(_os_error(end.error))}"
    reason = close_reason(end.tcp_close)
    peer_error = reason.peer_error if reason is not None else "connection closed early"
    if outcome == SpliceOutcome.FAIL_PEER:
        return f"peer: {peer_error}"
    if outcome == SpliceOutcome.FAIL_PEER_GONE:
        return f"peer gone before accept: {peer_error}"
    return "aborted"


def splice_close_label(end: SpliceEnd) -> str:
    """The connection's close reason label after a splice (as `TcpConn.close_reason`)."""
    if end.outcome == SpliceOutcome.OK:
        return CloseReason.NORMAL.label
    if end.outcome in (SpliceOutcome.FAIL_PEER, SpliceOutcome.FAIL_PEER_GONE):
        reason = close_reason(end.tcp_close)
        return reason.label if reason is not None else CloseReason.RESET.label
    if end.outcome == SpliceOutcome.FAIL_CONNECT:
        return CloseReason.REJECTED.label
    return CloseReason.ABORTED.label


def _os_error(code: int) -> OSError:
    if code == errno.ECONNREFUSED:
        return ConnectionRefusedError(code, os.strerror(code))
    return OSError(code, os.strerror(code))
