"""One peer's lookups are its own: two real wireguard-go peers, one gateway, the test zone.

phone (client ns) resolves example.test through the tunnel's DNS and gets a VIP; laptop (its
own namespace, its own link) has not asked that name: its PTR for the VIP is NXDOMAIN and its
connections to it (plain and TLS port) are refused, with the reason in the closing event,
across a gateway restart too, while the phone's work; once the laptop asks the name itself it
gets the same VIP and its connection works.
"""

from __future__ import annotations

import ipaddress
import re

import pytest

from tests.interop.harness import (
    HOST_ADDR,
    INTERNET_NET,
    TUNNEL_NET,
    FlowsSetup,
    GatewayProcess,
    Namespace,
    WgClient,
    replace_endpoint,
    run_json,
)
from tests.interop.test_dns import a_record
from tests.interop.test_dns import dig_in as dig
from unclaw_tui.engine.outcomes import Refusal

pytestmark = pytest.mark.interop

VIP_NET = "10.78.0.0/16"
HTTP_PORT = 80


def second_client(s: FlowsSetup, config: str) -> tuple[Namespace, WgClient, str]:
    """Another peer in its own namespace, on its own link to the gateway (and its config)."""
    ns = s.topo.namespace("d")
    s.topo.link(ns, "192.168.78.2/24", s.gateway_ns, "192.168.78.1/24")
    match = re.search(r"^Address\s*=\s*(\S+)", config, re.MULTILINE)
    assert match, config
    config = replace_endpoint(config, f"192.168.78.1:{s.port}")
    routes = (TUNNEL_NET, INTERNET_NET, VIP_NET)
    client = s.topo.wg_client(ns, config, match.group(1), routes=routes)
    return ns, client, config


def rehandshake(client: WgClient, config: str) -> None:
    """After a gateway restart: a fresh peer entry handshakes at once (the stale session would
    wait 15 s)."""
    gateway_key = re.search(r"(?m)^PublicKey\s*=\s*(\S+)", config)
    assert gateway_key
    client.ns.run("wg", "set", client.ifname, "peer", gateway_key.group(1), "remove")
    client.setconf(config)


def refused_to(gw: GatewayProcess, vip: str, port: int) -> dict[str, object]:
    return gw.wait_event(
        lambda e: (
            e["type"] == "tcp_closed"
            and e["dst_ip"] == vip
            and e["dst_port"] == port
            and e["peer"] == "laptop"
        ),
        10,
        f"the laptop's connection to {vip}:{port} closed",
    )


def test_a_vip_answers_only_the_peers_our_dns_gave_it(flows_setup: FlowsSetup) -> None:
    # Fails before: the laptop's PTR named the phone's host and its connection reached it.
    s = flows_setup
    s.start_dns_host()
    s.start_host("http", HTTP_PORT)
    config_a = s.add_peer("phone")
    config_b = s.add_peer("laptop")
    gw = s.start_gateway("--upstream-dns", HOST_ADDR)
    client_a = s.client(config_a, extra_routes=(VIP_NET,))
    ns_b, client_b, config_b = second_client(s, config_b)
    for client in (client_a, client_b):
        assert client.ping("10.77.0.1", count=2).returncode == 0

    status, answers = dig(s.client_ns, "example.test")
    assert status == "NOERROR"
    vip = a_record(answers)
    assert ipaddress.IPv4Address(vip) in ipaddress.IPv4Network(VIP_NET)
    status, answers = dig(s.client_ns, "-x", vip)
    assert status == "NOERROR" and answers[0].split()[-1] == "example.test."

    # The laptop was not given the VIP: nothing behind it, for any protocol.
    assert dig(ns_b, "-x", vip) == ("NXDOMAIN", [])
    for port in (HTTP_PORT, 443):
        probe = run_json(s, ns_b, "tests.interop.hosts", "connect", vip, str(port))
        assert probe["result"] == "refused", probe
        closed = refused_to(gw, vip, port)
        assert closed["error"] == Refusal.VIP_NOT_GIVEN.says() and closed["hostname"] is None
    res = s.curl("--max-time", "10", "--resolve", f"example.test:{HTTP_PORT}:{vip}",
                 f"http://example.test:{HTTP_PORT}/hello")  # fmt: skip
    assert res.returncode == 0 and res.stdout == "hello\n", res.stderr

    # Kept across a restart: the phone keeps its VIP, the laptop still has none.
    assert gw.terminate() == 0
    gw = s.start_gateway("--upstream-dns", HOST_ADDR)
    rehandshake(client_a, config_a)
    rehandshake(client_b, config_b)
    status, answers = dig(s.client_ns, "-x", vip)
    assert status == "NOERROR" and answers[0].split()[-1] == "example.test."
    assert dig(ns_b, "-x", vip) == ("NXDOMAIN", [])
    probe = run_json(s, ns_b, "tests.interop.hosts", "connect", vip, str(HTTP_PORT))
    assert probe["result"] == "refused", probe

    # The laptop asks the name itself: the same VIP, given to it too, and it connects.
    assert a_record(dig(ns_b, "example.test")[1]) == vip
    probe = run_json(s, ns_b, "tests.interop.hosts", "connect", vip, str(HTTP_PORT))
    assert probe["result"] == "connected" and "hello" in str(probe["reply"]), probe
    status, answers = dig(ns_b, "-x", vip)
    assert status == "NOERROR" and answers[0].split()[-1] == "example.test."
