"""DNS with per-hostname VIPs through the tunnel: dig and curl in the client namespace, the
gateway using an authoritative dnslib server for example.test on the test host as upstream.

client ns (wireguard-go, dig, curl) -> gateway ns (`unclaw-tui --no-ui --json
--upstream-dns 198.18.0.2`) -> internet ns (tests.interop.dns_host on :53, an HTTP server on :80).
"""

from __future__ import annotations

import ipaddress
import re
import sys
import time

import pytest

from tests.interop.harness import HOST_ADDR, FlowsSetup, Namespace

pytestmark = pytest.mark.interop

VIP_NET = ipaddress.IPv4Network("10.78.0.0/16")
HTTP_PORT = 80


def dig(s: FlowsSetup, *args: str) -> tuple[str, list[str]]:
    """dig from the client namespace through the tunnel at the gateway."""
    return dig_in(s.client_ns, *args)


def dig_in(ns: Namespace, *args: str) -> tuple[str, list[str]]:
    """dig through the tunnel at the gateway from ns: (status, answer lines)."""
    res = ns.run(
        "dig", "@10.77.0.1", "+time=3", "+tries=2", "+noall", "+comments", "+answer", *args,
        check=False, timeout=20,
    )  # fmt: skip
    status = re.search(r"status: (\w+)", res.stdout)
    assert status, f"dig {args}: {res.stdout}{res.stderr}"
    answers = [line for line in res.stdout.splitlines() if line and not line.startswith(";")]
    return status.group(1), answers


def a_record(answers: list[str]) -> str:
    addrs = [line.split()[-1] for line in answers if line.split()[3] == "A"]
    assert len(addrs) == 1, answers
    return addrs[0]


def test_dns_vips_through_the_tunnel(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    dns_host = s.start_dns_host()
    s.start_host("http", HTTP_PORT)
    config = s.add_peer("phone")
    gw = s.start_gateway("--upstream-dns", HOST_ADDR)
    client = s.client(config, extra_routes=(str(VIP_NET),))
    assert client.ping("10.77.0.1", count=2).returncode == 0

    # A: a VIP, the same one again, over TCP too.
    status, answers = dig(s, "example.test")
    assert status == "NOERROR"
    vip = a_record(answers)
    assert ipaddress.IPv4Address(vip) in VIP_NET
    assert answers[0].split()[1] == "30"  # TTL
    assert a_record(dig(s, "example.test")[1]) == vip
    assert a_record(dig(s, "+tcp", "example.test")[1]) == vip
    assert dig(s, "nope.example.test") == ("NXDOMAIN", [])
    assert dig(s, "example.test", "AAAA") == ("NOERROR", [])
    status, answers = dig(s, "example.test", "MX")  # forwarded
    assert status == "NOERROR" and answers[0].split()[-2:] == ["10", "mail.example.test."]
    status, answers = dig(s, "-x", vip)
    assert status == "NOERROR" and answers[0].split()[-1] == "example.test."

    # The page through the VIP the tunnel's DNS gave (curl resolves nothing itself here).
    res = s.curl("--max-time", "10", "--resolve", f"example.test:{HTTP_PORT}:{vip}",
                 f"http://example.test:{HTTP_PORT}/hello")  # fmt: skip
    assert res.returncode == 0 and res.stdout == "hello\n", res.stderr
    closed = gw.wait_event(
        lambda e: e["type"] == "tcp_closed" and e["dst_ip"] == vip, 10, "tcp_closed to the VIP"
    )
    assert closed["route"] == "vip" and closed["hostname"] == "example.test"
    assert closed["error"] is None and closed["bytes_down"] > 0

    events = [e for e in gw.drain() if e["type"] == "dns_query"]
    first = next(e for e in events if e["qname"] == "example.test" and e["qtype"] == "A")
    assert first["peer"] == "phone" and first["answers"] == [vip]
    assert first["rcode"] == "NOERROR" and first["upstream_ms"] is not None
    assert any(e["rcode"] == "NXDOMAIN" for e in events)

    # Garbage on port 53, UDP and TCP: dropped / closed, reported, and DNS keeps working.
    s.client_ns.run(sys.executable, "-c", "import socket; socket.socket(socket.AF_INET, "
                    "socket.SOCK_DGRAM).sendto(b'\\xff' * 7, ('10.77.0.1', 53))")  # fmt: skip
    gw.wait_event(lambda e: e["type"] == "dns_query" and e["rcode"] == "MALFORMED", 5, "malformed")
    stuffed = s.run_client("stuff", "10.77.0.1", "53", "--max-bytes", "4096", "--max-seconds", "5")
    assert stuffed["sent"] > 0
    gw.wait_event(
        lambda e: e["type"] == "tcp_closed" and e["dst_port"] == 53 and e["error"], 10, "closed"
    )
    assert a_record(dig(s, "example.test")[1]) == vip

    # A restart keeps the map (clients' cached answers stay valid).
    assert gw.terminate() == 0
    gw = s.start_gateway("--upstream-dns", HOST_ADDR)
    # The client would wait 15 s on its stale session; a fresh peer entry handshakes at once.
    gateway_key = re.search(r"(?m)^PublicKey\s*=\s*(\S+)", config)
    assert gateway_key
    s.client_ns.run("wg", "set", client.ifname, "peer", gateway_key.group(1), "remove")
    client.setconf(config)
    assert a_record(dig(s, "example.test")[1]) == vip
    other = a_record(dig(s, "www.example.test")[1])
    assert other != vip and ipaddress.IPv4Address(other) in VIP_NET

    # Upstream down: SERVFAIL, quickly, not a hang.
    dns_host.terminate()
    dns_host.wait(timeout=10)
    t0 = time.monotonic()
    status, _ = dig(s, "down.example.test")
    assert status == "SERVFAIL"
    assert time.monotonic() - t0 < 3.0
    gw.wait_event(
        lambda e: e["type"] == "dns_query" and e["rcode"] == "SERVFAIL", 5, "SERVFAIL event"
    )
