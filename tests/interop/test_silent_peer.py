"""A peer that goes away without being removed (issue 13, item 6): its flows end on their own.

The phone (real wireguard-go) holds idle relayed TCP connections and has a UDP flow open,
then its wireguard-go is killed: nothing more comes from it.  With `--silent-peer-after 3`
the gateway ends every one of its flows within a few seconds, each closing event saying why,
publishes `peer_silent`, and gives the host sockets back.  Before, such flows stayed until the
peer was removed (idle TCP forever, UDP until its idle timeout), holding descriptors.

client ns (phone) -> gateway ns (unclaw-tui --no-ui --json --silent-peer-after 3)
-> internet ns (HTTP on :8080, UDP echo on :9000).
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import wait_for
from tests.interop.harness import HOST_ADDR, FlowsSetup
from tests.interop.test_floods import spawn_json
from unclaw_tui.engine import Refusal

pytestmark = pytest.mark.interop

HTTP_PORT = 8080
ECHO_PORT = 9000
HELD = 20
SILENT_AFTER = 3


def test_a_silent_peers_flows_end_and_give_their_sockets_back(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    config = s.add_peer("phone")
    s.start_host("http", HTTP_PORT)
    s.start_host("udp-echo", ECHO_PORT)
    gw = s.start_gateway("--silent-peer-after", str(SILENT_AFTER))
    client = s.client(config)
    assert client.ping("10.77.0.1", count=1, timeout=10).returncode == 0
    fd_dir = f"/proc/{gw.proc.pid}/fd"
    baseline = len(os.listdir(fd_dir))

    hold = spawn_json(
        s, s.client_ns, "tests.interop.flood", "hold", HOST_ADDR, str(HTTP_PORT),
        "--count", str(HELD), "--hold", "60",
    )  # fmt: skip
    try:
        probe = s.run_client("udp-probe", HOST_ADDR, str(ECHO_PORT), "--sizes", "64")
        assert probe["64"]["ok"] == probe["64"]["sent"], probe

        def phone(kind: str) -> list[dict[str, object]]:
            return [
                e
                for e in gw.drain()  # every event so far
                if e["type"] == kind and "phone" in (e.get("peer"), e.get("name"))
            ]

        wait_for(lambda: len(phone("tcp_opened")) >= HELD, "the phone's connections opened", 30)
        assert len(os.listdir(fd_dir)) >= baseline + HELD

        client.proc.kill()  # the phone is gone: no packet, no handshake from now on
        client.proc.wait(10)
        wait_for(lambda: phone("peer_silent"), "peer_silent", SILENT_AFTER + 15)
        (silent,) = phone("peer_silent")
        assert silent["flows_ended"] >= HELD + 1 and silent["silent_seconds"] >= SILENT_AFTER
        wait_for(lambda: len(phone("tcp_closed")) >= HELD, "every TCP flow closed", 10)
        tcp_closed = phone("tcp_closed")
        udp_closed = phone("udp_flow_closed")
        assert len(udp_closed) == 1, udp_closed
        for event in [*tcp_closed, *udp_closed]:
            assert str(event["error"]).startswith(Refusal.PEER_SILENT.value), event
        wait_for(lambda: len(os.listdir(fd_dir)) <= baseline, "the host sockets given back", 10)
        assert not [line for line in gw.stderr_lines if "Traceback" in line], gw.stderr_lines
    finally:
        hold.kill()
        hold.wait(10)
