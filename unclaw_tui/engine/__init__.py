"""The data plane (C) and the WireGuard protocol (Python), with nothing of the router or UI.

The public face: everything outside `engine/` imports these names from here, never `_ffi` or a
module's private members. The compiled parts load on first use of a name that needs them, so
the CLI can read and write state without the C engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from unclaw_tui.engine.noise import b64, unb64
from unclaw_tui.engine.outcomes import (
    CloseReason,
    SpliceOutcome,
    connect_error,
    describe_os_error,
    splice_error,
)
from unclaw_tui.engine.tunnel_events import (
    EndpointChanged,
    HandshakeDone,
    HandshakeFailed,
    KeysExpired,
    LoadChanged,
    TunnelEvent,
)

if TYPE_CHECKING:
    from unclaw_tui.engine._ffi import EngineError, FastOpen, SpliceResult
    from unclaw_tui.engine.conns import ConnTable
    from unclaw_tui.engine.dnscheck import (
        MAX_DNS_QUERY_LEN,
        DnsQueryShape,
        DnsVerdict,
        check_dns_query,
    )
    from unclaw_tui.engine.flows import SpliceDone, TcpConn, UdpDatagram
    from unclaw_tui.engine.tunnel import PeerInfo, Tunnel

_LAZY = {
    "ConnTable": "unclaw_tui.engine.conns",
    "DnsQueryShape": "unclaw_tui.engine.dnscheck",
    "MAX_DNS_QUERY_LEN": "unclaw_tui.engine.dnscheck",
    "DnsVerdict": "unclaw_tui.engine.dnscheck",
    "check_dns_query": "unclaw_tui.engine.dnscheck",
    "EngineError": "unclaw_tui.engine._ffi",
    "FastOpen": "unclaw_tui.engine._ffi",
    "SpliceResult": "unclaw_tui.engine._ffi",
    "SpliceDone": "unclaw_tui.engine.flows",
    "TcpConn": "unclaw_tui.engine.flows",
    "UdpDatagram": "unclaw_tui.engine.flows",
    "PeerInfo": "unclaw_tui.engine.tunnel",
    "Tunnel": "unclaw_tui.engine.tunnel",
}

__all__ = [
    "MAX_DNS_QUERY_LEN",
    "CloseReason",
    "ConnTable",
    "DnsQueryShape",
    "DnsVerdict",
    "EndpointChanged",
    "EngineError",
    "FastOpen",
    "HandshakeDone",
    "HandshakeFailed",
    "KeysExpired",
    "LoadChanged",
    "PeerInfo",
    "SpliceDone",
    "SpliceOutcome",
    "SpliceResult",
    "TcpConn",
    "Tunnel",
    "TunnelEvent",
    "UdpDatagram",
    "b64",
    "check_dns_query",
    "connect_error",
    "describe_os_error",
    "splice_error",
    "unb64",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
