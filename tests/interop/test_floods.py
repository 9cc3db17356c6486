"""Floods and limits against the real gateway process: a handshake flood from many source
addresses, and a SYN flood plus connection exhaustion from one peer while another peer works.

client ns (wireguard-go, flood senders) -> gateway ns (`unclaw-tui --no-ui --json`) -> internet
ns (test servers at 198.18.0.2).  A second client namespace holds the second peer.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.interop.harness import (
    HOST_ADDR,
    INTERNET_NET,
    REPO_ROOT,
    TUNNEL_NET,
    FlowsSetup,
    GatewayProcess,
    Namespace,
    WgClient,
    module_cmd,
    replace_endpoint,
    rss_kib,
    run_json,
)

pytestmark = pytest.mark.interop

HTTP_PORT = 8080
BLACKHOLE = "198.18.0.77"  # on the internet link, but no host: connects to it hang, then fail
MiB_KIB = 1024


def spawn_json(s: FlowsSetup, ns: Namespace, module: str, *args: str) -> subprocess.Popen[str]:
    return s.topo.spawn(
        ns,
        *module_cmd(module, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=s.env(),
        cwd=str(REPO_ROOT),
    )


def result_of(proc: subprocess.Popen[str], timeout: float) -> Any:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exited {proc.returncode}: {err[-2000:]}"
    return json.loads(out.strip().splitlines()[-1])


def second_client(s: FlowsSetup, config: str) -> tuple[Namespace, WgClient]:
    """Another peer in its own namespace, on its own link to the gateway."""
    ns = s.topo.namespace("d")
    s.topo.link(ns, "192.168.78.2/24", s.gateway_ns, "192.168.78.1/24")
    match = re.search(r"^Address\s*=\s*(\S+)", config, re.MULTILINE)
    assert match, config
    client = s.topo.wg_client(
        ns,
        replace_endpoint(config, f"192.168.78.1:{s.port}"),
        match.group(1),
        routes=(TUNNEL_NET, INTERNET_NET),
    )
    return ns, client


def limit_refusals(gw: GatewayProcess, limit: str, peer: str) -> int:
    return sum(
        e["refused"]
        for e in gw.drain()
        if e["type"] == "limit_hit" and e["limit"] == limit and e["peer"] == peer
    )


def test_handshake_flood_gets_cookies_and_a_real_peer_still_connects(
    flows_setup: FlowsSetup,
) -> None:
    s = flows_setup
    config = s.add_peer("phone")
    gw = s.start_gateway()
    public_key = gw.wait_event(lambda e: e["type"] == "gateway_started", 5)["public_key"]
    # 32 source addresses on the client's link, one UDP socket each.
    client_dev = f"va{s.topo.tag}1"[:15]
    sources = [f"192.168.77.{i}" for i in range(10, 42)]
    for addr in sources:
        s.client_ns.run("ip", "addr", "add", f"{addr}/24", "dev", client_dev)
    rss_before = rss_kib(gw.proc.pid)

    flood = spawn_json(
        s,
        s.client_ns,
        "tests.interop.flood",
        "handshake",
        s.gateway_addr,
        str(s.port),
        "--public-key",
        public_key,
        "--sources",
        ",".join(sources),
        "--rate",
        "4000",
        "--seconds",
        "12",
    )
    gw.wait_event(lambda e: e["type"] == "under_load" and e["active"], 10, "under_load")

    # A real wireguard-go peer connects in the middle of it: its first initiation gets a cookie
    # reply, its retry (REKEY_TIMEOUT later) carries MAC2 and is answered.
    t0 = time.monotonic()
    client = s.client(config)
    ping = client.ping("10.77.0.1", count=1, timeout=15)
    latency = time.monotonic() - t0
    print(f"\nhandshake latency during the flood: {latency:.2f} s")
    assert ping.returncode == 0, f"no tunnel during the flood: {ping.stdout}{ping.stderr}"
    assert latency < 10.0
    assert client.latest_handshake() > 0
    # Responsive: the data path answers at once while the flood goes on.
    pings = client.ping("10.77.0.1", count=5, interval=0.2)
    assert pings.returncode == 0, pings.stdout

    result = result_of(flood, 60)
    print(f"flood: {result}")
    assert result["rate"] > 2000, result
    assert result["cookie_replies"] > result["sent"] // 4, result
    rss_growth = rss_kib(gw.proc.pid) - rss_before
    print(f"gateway RSS growth: {rss_growth} KiB")
    assert rss_growth < 64 * MiB_KIB
    gw.wait_event(lambda e: e["type"] == "under_load" and not e["active"], 10, "load over")
    assert client.ping("10.77.0.1", count=2).returncode == 0


def test_syn_flood_and_connection_limits_refuse_one_peer_not_another(
    flows_setup: FlowsSetup,
) -> None:
    s = flows_setup
    config_a = s.add_peer("phone")
    config_b = s.add_peer("laptop")
    s.start_host("http", HTTP_PORT)
    gw = s.start_gateway("--max-conns-per-peer", "10", "--max-half-open-per-peer", "8")
    client_a = s.client(config_a)
    ns_b, client_b = second_client(s, config_b)
    for client in (client_a, client_b):
        assert client.ping("10.77.0.1", count=2).returncode == 0
    rss_before = rss_kib(gw.proc.pid)

    # SYN flood: 40 SYNs at once to a destination that never answers.  The gateway holds 8
    # while it tries to connect upstream and refuses the other 32 with an RST at once.
    flood = run_json(s, s.client_ns, "tests.interop.flood", "syn", BLACKHOLE, "80", "--count", "40")
    print(f"\nSYN flood from phone: {flood}")
    assert flood["refused_fast"] == 32, flood
    # Meanwhile the other peer connects as usual.
    probe = run_json(s, ns_b, "tests.interop.hosts", "connect", HOST_ADDR, str(HTTP_PORT))
    assert probe["result"] == "connected", probe
    gw.wait_event(
        lambda e: e["type"] == "limit_hit" and e["limit"] == "tcp_half_open_per_peer",
        5,
        "half-open limit_hit",
    )
    wait_for(  # the gateway reports refusals twice a second
        lambda: limit_refusals(gw, "tcp_half_open_per_peer", "phone") >= 32,
        "32 half-open refusals reported",
        5,
    )
    assert limit_refusals(gw, "tcp_half_open_per_peer", "phone") == 32
    assert limit_refusals(gw, "tcp_half_open_per_peer", "laptop") == 0
    hit = next(e for e in gw.events if e["type"] == "limit_hit")
    assert hit["value"] == 8 and hit["peer_public_key"], hit

    # Connection exhaustion: 16 connections held open from one peer with a limit of 10, while
    # the other peer holds 8 of its own.  The phone's excess 6 are refused, the laptop's all work.
    wait_for(  # no half-open left
        lambda: (
            sum(e["type"] == "tcp_closed" and e.get("dst_ip") == BLACKHOLE for e in gw.drain()) >= 8
        ),
        "the blackhole's 8 upstream connects given up",
        15,
    )
    hold = ("hold", HOST_ADDR, str(HTTP_PORT), "--hold", "3", "--count")
    many_a = spawn_json(s, s.client_ns, "tests.interop.flood", *hold, "16")
    many_b = spawn_json(s, ns_b, "tests.interop.flood", *hold, "8")
    result_a, result_b = result_of(many_a, 60), result_of(many_b, 60)
    print(f"phone: {result_a}\nlaptop: {result_b}")
    assert result_a == {"connected": 10, "refused": 6, "other": 0}, result_a
    assert result_b == {"connected": 8, "refused": 0, "other": 0}, result_b
    gw.wait_event(
        lambda e: e["type"] == "limit_hit" and e["limit"] == "tcp_conns_per_peer",
        5,
        "connection limit_hit",
    )
    wait_for(
        lambda: limit_refusals(gw, "tcp_conns_per_peer", "phone") >= 6,
        "6 connection-limit refusals reported",
        5,
    )
    assert limit_refusals(gw, "tcp_conns_per_peer", "phone") == 6
    assert limit_refusals(gw, "tcp_conns_per_peer", "laptop") == 0
    rss_growth = rss_kib(gw.proc.pid) - rss_before
    print(f"gateway RSS growth: {rss_growth} KiB")
    assert rss_growth < 64 * MiB_KIB
    # Once the flows are gone, the phone may connect again.
    again = s.run_client("connect", HOST_ADDR, str(HTTP_PORT))
    assert again["result"] == "connected", again
