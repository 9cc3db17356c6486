"""The data plane (C) and the WireGuard protocol (Python), with nothing of the router or UI.

A batch of datagrams is received in C (recvmmsg), decrypted, pings answered and replies queued;
C raises the few events that need Python (handshake messages, "a handshake is needed", roaming,
key expiry, new connections), and one call flushes the batch (sendmmsg): no Python runs per data
packet.  `tunnel.py` holds the peers and their handshakes, `conns.py` and `flows.py` the
connections and datagrams peers send, `driver.py` who runs the engine (its thread, the lock),
`_ffi.py` the checked calls into C.

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
    Refusal,
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

_LAZY = {  # module: the names it gives
    "_ffi": ("EngineError", "FastOpen", "SpliceResult"),
    "conns": ("ConnTable",),
    "dnscheck": ("MAX_DNS_QUERY_LEN", "DnsQueryShape", "DnsVerdict", "check_dns_query"),
    "flows": ("SpliceDone", "TcpConn", "UdpDatagram"),
    "tunnel": ("PeerInfo", "Tunnel"),
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
    "Refusal",
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
    for module, names in _LAZY.items():
        if name in names:
            return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
