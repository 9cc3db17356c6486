"""A busy session across the client's REKEY_AFTER_TIME (120 s) never drops a packet."""

from __future__ import annotations

import re

import pytest

from tests.interop.harness import GatewaySetup

pytestmark = [pytest.mark.interop, pytest.mark.slow]


def test_session_survives_rekey(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    config = s.add_peer("busy")
    gw = s.start_gateway()
    client = s.topo.wg_client(s.client_ns, config, "10.77.0.2/32")
    # 135 s of pings every 0.2 s: the initiator rekeys at 120 s on its next send.
    res = client.ping("10.77.0.1", count=675, interval=0.2, timeout=2)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", res.stdout)
    assert m, res.stdout
    sent, received = int(m.group(1)), int(m.group(2))
    assert sent == 675 and received == sent, res.stdout[-400:]
    handshakes = [e for e in gw.drain() if e["type"] == "peer_handshake"]
    assert len(handshakes) >= 2, f"expected a rekey handshake, saw {handshakes}"
