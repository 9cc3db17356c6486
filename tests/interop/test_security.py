"""Security checks against the real gateway: peer isolation, source spoofing, secrets kept out
of every output, and the state dir's permissions.

client ns (wireguard-go) -> gateway ns (the gateway, as a process or in this test's loop)
-> internet ns (test servers at 198.18.0.2); a second peer sits in its own namespace.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.interop.harness import (
    HOST_ADDR,
    INTERNET_NET,
    REPO_ROOT,
    TUNNEL_NET,
    FlowsSetup,
    GatewaySetup,
    Namespace,
    WgClient,
    replace_endpoint,
    thread_in_namespace,
)
from unclaw_tui import config
from unclaw_tui.gateway import Gateway

pytestmark = pytest.mark.interop

HTTP_PORT = 8080
PEER_PORT = 7000  # a server the second peer runs on its own tunnel address


def address_of(config_text: str) -> str:
    match = re.search(r"^Address\s*=\s*(\S+)", config_text, re.MULTILINE)
    assert match, config_text
    return match.group(1)


def second_client(s: GatewaySetup, config_text: str) -> tuple[Namespace, WgClient]:
    ns = s.topo.namespace("d")
    s.topo.link(ns, "192.168.78.2/24", s.gateway_ns, "192.168.78.1/24")
    client = s.topo.wg_client(
        ns,
        replace_endpoint(config_text, f"192.168.78.1:{s.port}"),
        address_of(config_text),
        routes=(TUNNEL_NET, INTERNET_NET),
    )
    return ns, client


def test_peers_cannot_reach_each_other(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    phone_config = s.add_peer("phone")
    laptop_config = s.add_peer("laptop")
    laptop_ip = address_of(laptop_config).split("/")[0]
    s.start_host("http", HTTP_PORT)
    gw = s.start_gateway()
    phone = s.client(phone_config)
    laptop_ns, laptop = second_client(s, laptop_config)
    assert phone.ping("10.77.0.1").returncode == 0
    assert laptop.ping("10.77.0.1").returncode == 0
    # The laptop serves on its tunnel address; the phone tries TCP and ICMP to it.
    server = s.start_server_in(laptop_ns, "http", PEER_PORT)
    assert server.poll() is None
    probe = s.run_client("connect", laptop_ip, str(PEER_PORT), "--timeout", "5")
    assert probe["result"] == "refused", probe
    closed = gw.wait_event(
        lambda e: e["type"] == "tcp_closed" and e.get("dst_ip") == laptop_ip, 5, "refusal event"
    )
    assert closed["error"] and closed["peer"] == "phone", closed
    assert phone.ping(laptop_ip, count=2).returncode != 0
    # Nothing of it reached the laptop: it received no data packet from the gateway since.
    rx_before = laptop.transfer()[0]
    assert s.run_client("connect", laptop_ip, str(PEER_PORT), "--timeout", "3")["result"] in (
        "refused",
        "timeout",
    )
    assert laptop.transfer()[0] - rx_before < 200  # at most a keepalive or two
    # Both still reach the internet: the refusals were the isolation, not a broken tunnel.
    assert s.run_client("connect", HOST_ADDR, str(HTTP_PORT))["result"] == "connected"


async def _ping(ns: Namespace, dst: str, count: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        *ns.cmd("ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", dst),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_a_peer_cannot_spoof_another_peers_tunnel_ip(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    phone_config = s.add_peer("phone")
    laptop_config = s.add_peer("laptop")
    laptop_ip = address_of(laptop_config)
    # The gateway runs in this loop (in its namespace) so its drop counters can be read.
    with thread_in_namespace(s.gateway_ns.name):
        settings = config.Settings(
            state_dir=s.state_dir, listen_port=s.port, endpoint=f"{s.gateway_addr}:{s.port}"
        )
        gateway = Gateway(settings)
        await gateway.start()
        try:
            # The phone's keys with the laptop's address: authenticated, but every packet's
            # source is outside the phone's allowed IPs.
            s.topo.wg_client(s.client_ns, phone_config, laptop_ip)
            assert await _ping(s.client_ns, "10.77.0.1", 5) != 0
            snap = gateway.snapshot()
            phone = next(p for p in snap.peers if p.name == "phone")
            laptop = next(p for p in snap.peers if p.name == "laptop")
            assert phone.last_handshake is not None, "the tunnel itself must be up"
            print(f"\ndrops with a spoofed source: {snap.drops}")
            assert snap.drops.get("spoofed_src", 0) >= 5, snap.drops
            assert laptop.last_handshake is None and laptop.rx_packets == 0
        finally:
            await gateway.stop()


def _secrets(state_dir: Path) -> dict[str, str]:
    """Every private and preshared key in the state dir, by where it is."""
    found: dict[str, str] = {}
    gateway = json.loads((state_dir / "gateway.json").read_text())
    found["gateway private_key"] = gateway["private_key"]
    for peer in json.loads((state_dir / "peers.json").read_text())["peers"]:
        for field in ("private_key", "preshared_key"):
            if peer.get(field):
                found[f"{peer['name']} {field}"] = peer[field]
    return found


def _forms(key_b64: str) -> list[str]:
    """A key as base64 (padded or not), URL-safe base64 and hex."""
    raw = base64.b64decode(key_b64)
    return [
        key_b64,
        key_b64.rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
    ]


def test_keys_never_appear_in_logs_events_or_stats(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    phone_config = s.add_peer("phone")
    s.start_host("http", HTTP_PORT)
    gw = s.start_gateway()
    phone = s.client(phone_config)
    assert phone.ping("10.77.0.1", count=3).returncode == 0
    assert s.run_client("connect", HOST_ADDR, str(HTTP_PORT))["result"] == "connected"
    # Peers added and removed while it runs, from the CLI.
    s.cli("peer", "add", "tablet")
    gw.wait_event(lambda e: e["type"] == "peer_added" and e["name"] == "tablet", 5, "peer_added")
    secrets = _secrets(s.state_dir)  # the tablet's keys included, before it goes
    s.cli("peer", "remove", "tablet")
    gw.wait_event(lambda e: e["type"] == "peer_removed", 5, "peer_removed")
    wait_for(lambda: (s.state_dir / "stats.json").exists(), "stats.json", 15)
    assert gw.terminate() == 0
    gw.drain()
    outputs = {
        "events": "\n".join(json.dumps(e) for e in gw.events),
        "stderr": "".join(gw.stderr_lines),
        "stats.json": (s.state_dir / "stats.json").read_text(),
        "peer list": s.cli("peer", "list").stdout + s.cli("peer", "list", "--json").stdout,
    }
    assert len(secrets) >= 5  # gateway + 2 peers x (private, preshared)
    assert any(e["type"] == "peer_handshake" for e in gw.events)
    for where, text in outputs.items():
        for what, key in secrets.items():
            for form in _forms(key):
                assert form not in text, f"{what} appears in {where}"


def test_state_files_are_private(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    s.add_peer("phone")
    gw = s.start_gateway()
    wait_for(lambda: (s.state_dir / "stats.json").exists(), "stats.json", 15)
    s.cli("peer", "add", "tablet")
    gw.wait_event(lambda e: e["type"] == "peer_added", 5, "peer_added")
    assert gw.terminate() == 0
    assert stat.S_IMODE(s.state_dir.stat().st_mode) == 0o700
    files = [p for p in s.state_dir.rglob("*")]
    assert {"gateway.json", "peers.json", "stats.json"} <= {p.name for p in files}
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode & 0o077 == 0, (path, oct(mode))


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_group_or_world_writable_state_dir_is_refused(tmp_path: Path, mode: int) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.chmod(state_dir, mode)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for args in (["peer", "list"], ["--no-ui", "--json"]):
        res = subprocess.run(
            [sys.executable, "-m", "unclaw_tui", "--state-dir", str(state_dir), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=str(REPO_ROOT),
        )
        assert res.returncode == 2, (args, res)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "writable" in lines[0], (args, res.stderr)
        assert res.stdout == ""
    assert list(state_dir.iterdir()) == []  # nothing was written into it
    assert stat.S_IMODE(state_dir.stat().st_mode) == mode  # nor was it "fixed" silently
