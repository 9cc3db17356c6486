"""The `status` method: what `unclaw-tui status` shows about a running gateway.

A plain function of what it needs, so whoever hosts the control server registers it:

    server.register("status", lambda params: status(gateway.snapshot(), version, time.time()))
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from unclaw_tui.control.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from unclaw_tui.gateway import GatewaySnapshot


def status(snapshot: GatewaySnapshot, version: str, now: float) -> dict[str, Any]:
    """The result of `status`: public facts only (never a private or preshared key)."""
    return {
        "version": version,
        "protocol": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "started_at": round(snapshot.started_at, 3),
        "uptime": round(max(0.0, now - snapshot.started_at), 3),
        "listen_port": snapshot.listen_port,
        "public_key": snapshot.public_key,
        "endpoint": snapshot.endpoint,
        "peers": len(snapshot.peers),
        "peers_online": snapshot.peers_online,
        "open_flows": snapshot.open_flows,
        "under_load": snapshot.under_load,
    }
