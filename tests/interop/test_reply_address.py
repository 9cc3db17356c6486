"""Replies leave from the address the peer wrote to: a gateway host with two addresses on its
interface (IPv4, and IPv6 outside), a real wireguard-go client configured with the address the
route back to it does not pick handshakes and talks; a flood of initiations sent to that address
from connected UDP sockets (the kernel drops whatever comes back from another address) gets its
cookie replies.

client ns 192.168.77.2, fd00:77::2 --veth-- gateway ns 192.168.77.1 + .3, fd00:77::1 + ::3
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.interop.harness import (
    REPO_ROOT,
    TUNNEL_NET,
    GatewaySetup,
    module_cmd,
    replace_endpoint,
)

pytestmark = pytest.mark.interop

ADDRESSES = {
    4: ("192.168.77.1", "192.168.77.3", "192.168.77.2"),
    6: ("fd00:77::1", "fd00:77::3", "fd00:77::2"),
}


def add_addresses(s: GatewaySetup) -> None:
    gw_dev, cl_dev = f"vb{s.topo.tag}1"[:15], f"va{s.topo.tag}1"[:15]
    s.gateway_ns.run("ip", "addr", "add", "192.168.77.3/24", "dev", gw_dev)
    for addr in ("fd00:77::1/64", "fd00:77::3/64"):  # nodad: usable at once, binds never fail
        s.gateway_ns.run("ip", "-6", "addr", "add", addr, "dev", gw_dev, "nodad")
    s.client_ns.run("ip", "-6", "addr", "add", "fd00:77::2/64", "dev", cl_dev, "nodad")


def address_not_picked(s: GatewaySetup, family: int) -> str:
    """Of the gateway's two addresses, the one the route back to the client does not use as
    its source: what a reply would wrongly leave from is then the other one."""
    a, b, client = ADDRESSES[family]
    out = s.gateway_ns.run("ip", f"-{family}", "route", "get", client).stdout
    match = re.search(r"\bsrc (\S+)", out)
    assert match and match.group(1) in (a, b), out
    return b if match.group(1) == a else a


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


@pytest.mark.parametrize("family", [4, 6])
def test_client_of_the_second_address_handshakes_and_a_flood_gets_cookies(
    wg_setup: GatewaySetup, family: int
) -> None:
    s = wg_setup
    add_addresses(s)
    second = address_not_picked(s, family)
    config = s.add_peer("phone")
    gw = s.start_gateway()
    public_key = gw.wait_event(lambda e: e["type"] == "gateway_started", 5)["public_key"]

    client = s.topo.wg_client(
        s.client_ns,
        replace_endpoint(config, endpoint(second, s.port)),
        "10.77.0.2/32",
        routes=(TUNNEL_NET,),
    )
    ping = client.ping("10.77.0.1", count=3, interval=0.2, timeout=5)
    assert ping.returncode == 0, f"no tunnel through {second}: {ping.stdout}{ping.stderr}"
    assert client.latest_handshake() > 0
    shown = s.client_ns.run("wg", "show", client.ifname, "endpoints").stdout
    assert endpoint(second, s.port) in shown, shown  # never roamed to the other address

    flood = subprocess.run(
        s.client_ns.cmd(
            *module_cmd(
                "tests.interop.flood", "handshake", second, str(s.port),
                "--public-key", public_key, "--sources", ADDRESSES[family][2],
                "--rate", "1000", "--seconds", "2", "--connect",
            )
        ),
        capture_output=True, text=True, timeout=60, cwd=str(REPO_ROOT),
    )  # fmt: skip
    assert flood.returncode == 0, flood.stderr[-2000:]
    result = json.loads(flood.stdout.strip().splitlines()[-1])
    print(f"\nflood to {second} from a connected socket: {result}")
    gw.wait_event(lambda e: e["type"] == "under_load" and e["active"], 5, "under_load")
    assert result["sent"] >= 1500, result
    assert result["cookie_replies"] > result["sent"] // 4, result
