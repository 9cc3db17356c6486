"""The WireGuard core against a real wireguard-go client (issue: WireGuard core)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.helpers import wait_for
from tests.interop.harness import GatewaySetup

pytestmark = __import__("pytest").mark.interop


def _handshake_event(name: str):
    return lambda e: e["type"] == "peer_handshake" and e["name"] == name


def test_handshake_ping_and_peer_list_without_privileges(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    config = s.add_peer("phone")
    gw = s.start_gateway(drop_caps=True)
    caps = Path(f"/proc/{gw.proc.pid}/status").read_text()
    assert "CapEff:\t0000000000000000" in caps, "the gateway must run with no capability"

    t0 = time.monotonic()
    client = s.topo.wg_client(s.client_ns, config, "10.77.0.2/32")
    ping = client.ping("10.77.0.1", count=3)
    ev = gw.wait_event(_handshake_event("phone"), 5, "peer_handshake")
    assert client.latest_handshake() > 0
    assert time.monotonic() - t0 < 2 + 3 * 0.2 + 2, "handshake took longer than 2 s"
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert " 0% packet loss" in ping.stdout
    assert ev["endpoint"].startswith("192.168.77.2:")
    assert ev["ip"] == "10.77.0.2"

    # peer list reads the stats the running gateway writes.
    def listed() -> dict:
        peers = json.loads(s.cli("peer", "list", "--json").stdout)
        return next(p for p in peers if p["name"] == "phone")

    wait_for(lambda: listed().get("last_handshake") is not None, "stats in peer list", 6)
    entry = listed()
    assert entry["endpoint"].startswith("192.168.77.2:")
    assert entry["rx_bytes"] > 0 and entry["tx_bytes"] > 0
    human = s.cli("peer", "list").stdout
    assert "phone" in human and "192.168.77.2:" in human


def test_two_peers_each_seen_with_its_own_key(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    configs = {"alpha": s.add_peer("alpha")}
    gw = s.start_gateway()
    # beta is added by the CLI while the gateway runs: live within a second, with an event.
    t0 = time.monotonic()
    configs["beta"] = s.add_peer("beta")
    gw.wait_event(lambda e: e["type"] == "peer_added" and e["name"] == "beta", 3, "peer_added")
    assert time.monotonic() - t0 < 1.0 + 1.0  # poll interval 0.5 s, plus the CLI's own start
    keys = {p["name"]: p["public_key"] for p in json.loads(s.cli("peer", "list", "--json").stdout)}
    # A second client machine on another link to the gateway.
    other_ns = s.topo.namespace("d")
    s.topo.link(other_ns, "192.168.78.2/24", s.gateway_ns, "192.168.78.1/24")
    other_ns.run("ip", "route", "add", "default", "via", "192.168.78.1")
    clients = {
        "alpha": s.topo.wg_client(s.client_ns, configs["alpha"], "10.77.0.2/32"),
        "beta": s.topo.wg_client(other_ns, configs["beta"], "10.77.0.3/32"),
    }
    for name, client in clients.items():
        res = client.ping("10.77.0.1", count=2)
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"
    for name in clients:
        ev = gw.wait_event(_handshake_event(name), 5, f"{name} handshake")
        assert ev["public_key"] == keys[name]
    assert keys["alpha"] != keys["beta"]


def test_peer_removed_live_cannot_handshake(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    config = s.add_peer("laptop")
    gw = s.start_gateway()
    client = s.topo.wg_client(s.client_ns, config, "10.77.0.2/32")
    assert client.ping("10.77.0.1", count=2).returncode == 0
    s.cli("peer", "remove", "laptop")
    gw.wait_event(
        lambda e: e["type"] == "peer_removed" and e["name"] == "laptop",
        2,
        "peer_removed within a second or two",
    )
    # The old session is gone at once...
    assert client.ping("10.77.0.1", count=2, timeout=1).returncode != 0
    # ...and a fresh handshake (new client interface, same keys) does not complete.
    client.proc.terminate()
    client.proc.wait(timeout=5)
    again = s.topo.wg_client(s.client_ns, config, "10.77.0.2/32")
    res = again.ping("10.77.0.1", count=3, timeout=1)
    assert res.returncode != 0
    assert again.latest_handshake() == 0
    handshakes = [e for e in gw.drain() if e["type"] == "peer_handshake"]
    assert len(handshakes) == 1


def test_kill9_restart_keeps_keys_and_client_reconnects(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    config = s.add_peer("vm")
    before = (s.state_dir / "gateway.json").read_text()
    gw = s.start_gateway()
    client = s.topo.wg_client(s.client_ns, config, "10.77.0.2/32")
    assert client.ping("10.77.0.1", count=2).returncode == 0
    gw.kill9()
    assert (s.state_dir / "gateway.json").read_text() == before
    gw2 = s.start_gateway()
    # The client still holds the old session: after 15 s without answers it handshakes again
    # with the same config, and the restarted gateway (same keys) answers.
    res = client.ping("10.77.0.1", count=60, interval=0.5, timeout=1)
    gw2.wait_event(_handshake_event("vm"), 5, "handshake after restart")
    assert "bytes from 10.77.0.1" in res.stdout
    assert client.ping("10.77.0.1", count=2).returncode == 0
