"""Faults against the real gateway: a destination that resets mid-transfer, a client that roams
to a new address mid-download, and `kill -9` of the gateway while peers are added.

client ns (wireguard-go, curl) -> gateway ns (`unclaw-tui --no-ui --json`) -> internet ns
(test servers at 198.18.0.2).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.interop.harness import (
    HOST_ADDR,
    REPO_ROOT,
    FlowsSetup,
    GatewayProcess,
    GatewaySetup,
    Namespace,
    module_cmd,
    rss_kib,
    wait_ready,
)
from tests.interop.hosts import pattern_sha256
from tests.interop.test_flows import bring_up

pytestmark = pytest.mark.interop

MiB = 1 << 20
HTTP_PORT = 8080
RESET_PORT = 9100


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run_json(s: FlowsSetup, ns: Namespace, module: str, *args: str, timeout: float = 90) -> Any:
    res = subprocess.run(
        ns.cmd(*module_cmd(module, *args)),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=s.env(),
        cwd=str(REPO_ROOT),
    )
    assert res.returncode == 0, f"{module} {args} exited {res.returncode}: {res.stderr[-2000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_destination_reset_mid_transfer_resets_the_client_and_leaks_nothing(
    flows_setup: FlowsSetup,
) -> None:
    s = flows_setup
    gw, _client = bring_up(s)
    server = s.topo.spawn(
        s.internet,
        *module_cmd("tests.interop.faulty", "reset-server", "--port", str(RESET_PORT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=s.env(),
        cwd=str(REPO_ROOT),
    )
    wait_ready(server, 20, "reset server")
    reader = ("tests.interop.faulty", "read-until-reset", HOST_ADDR, str(RESET_PORT))
    warm = run_json(s, s.client_ns, *reader, "--count", "3")  # lazily made things exist now
    assert warm["outcomes"] == {"reset": 3}, warm
    time.sleep(1.0)
    pid = gw.proc.pid
    rss_before, fds_before = rss_kib(pid), fd_count(pid)

    result = run_json(s, s.client_ns, *reader, "--count", "30")
    assert result["outcomes"] == {"reset": 30}, result
    assert all(n > 0 for n in result["received"]), result  # reset mid-transfer, not at connect

    def resets() -> list[dict[str, Any]]:
        return [
            e for e in gw.drain() if e["type"] == "tcp_closed" and e.get("dst_port") == RESET_PORT
        ]

    deadline = time.monotonic() + 10
    while len(resets()) < 33 and time.monotonic() < deadline:
        time.sleep(0.1)
    closed = resets()
    assert len(closed) == 33, closed[-3:]
    assert all(e["error"] for e in closed), [e for e in closed if not e["error"]][:3]
    time.sleep(1.0)
    fds_after, rss_growth = fd_count(pid), rss_kib(pid) - rss_before
    print(f"\nafter 30 resets: fds {fds_before} -> {fds_after}, RSS +{rss_growth} KiB")
    assert fds_after <= fds_before
    assert rss_growth < 16 * 1024


def test_client_roams_to_a_new_address_mid_download(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    s.start_host("http", HTTP_PORT)
    gw, client = bring_up(s)
    dev = f"va{s.topo.tag}1"[:15]
    # A second address on the client's link that survives the first one's removal.
    s.client_ns.run("sysctl", "-q", "-w", f"net.ipv4.conf.{dev}.promote_secondaries=1")
    s.client_ns.run("ip", "addr", "add", "192.168.77.3/24", "dev", dev)
    size = 24 * MiB
    out = s.topo.tmp / "roam.bin"
    curl = s.topo.spawn(
        s.client_ns,
        "curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", "60",
        "--limit-rate", "4M", "-o", str(out), "-w", "%{http_code}",
        f"http://{HOST_ADDR}:{HTTP_PORT}/bytes/{size}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2.0)
    assert curl.poll() is None, "the download must still be running when the client roams"
    # The old address goes, and wireguard-go moves to a new port (as after a NAT rebinding):
    # its next packets come from 192.168.77.3 and a port the gateway has not seen.
    s.client_ns.run("ip", "addr", "del", "192.168.77.2/24", "dev", dev)
    client.ns.run("wg", "set", client.ifname, "listen-port", "40123")
    t_roam = time.monotonic()
    stdout, stderr = curl.communicate(timeout=90)
    print(f"\ndownload finished {time.monotonic() - t_roam:.1f} s after the roam")
    assert curl.returncode == 0 and stdout == "200", (stdout, stderr)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(size)
    roamed = gw.wait_event(
        lambda e: e["type"] == "peer_endpoint" and e["endpoint"] == "192.168.77.3:40123",
        5,
        "peer_endpoint to the new address",
    )
    assert roamed["name"] == "phone"


def _listing(s: GatewaySetup) -> dict[str, dict[str, Any]]:
    rows = json.loads(s.cli("peer", "list", "--json").stdout)
    return {row["name"]: row for row in rows}


def _gateway_identity(state_dir: Path) -> tuple[str, str]:
    doc = json.loads((state_dir / "gateway.json").read_text())
    return doc["private_key"], doc["public_key"]


def test_kill9_while_peers_are_added_loses_nothing(wg_setup: GatewaySetup) -> None:
    s = wg_setup
    s.add_peer("first")
    identity = _gateway_identity(s.state_dir)
    rng = random.Random(20261124)
    reported: dict[str, str] = {}  # name -> public key, for every add that said it worked
    for round_no in range(5):
        # Started without waiting: some kills land during startup, some while it serves.
        gw = GatewayProcess(s.topo, s.gateway_ns, s.state_dir, "--listen-port", str(s.port))
        killer = threading.Timer(rng.uniform(0.1, 2.5), gw.kill9)
        killer.start()
        for i in range(4):
            name = f"r{round_no}p{i}"
            if s.cli("peer", "add", name, check=False).returncode == 0:
                reported[name] = ""
        # And a CLI killed at a random moment of its own write.
        cli = subprocess.Popen(
            [sys.executable, "-m", "unclaw_tui", "--state-dir",
             str(s.state_dir), "peer", "add", f"r{round_no}killed"],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, cwd=str(REPO_ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(rng.uniform(0.0, 0.6))
        cli.kill()
        cli.wait(timeout=10)
        killer.join()
        assert gw.proc.returncode == -9
        # The state dir reads back whole; every reported peer is there, keys unchanged.
        listing = _listing(s)
        for name in reported:
            assert name in listing, f"{name} was reported added, then lost"
            if reported[name]:
                assert listing[name]["public_key"] == reported[name], name
            reported[name] = listing[name]["public_key"]
        assert _gateway_identity(s.state_dir) == identity
    assert len(reported) == 20
    # A gateway started on what is left runs, and knows every peer.
    gw = s.start_gateway()
    gw.wait_event(lambda e: e["type"] == "gateway_started", 5)
    assert set(reported) <= set(_listing(s))
