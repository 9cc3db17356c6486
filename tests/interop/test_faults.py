"""Faults against the real gateway: a destination that resets mid-transfer, a client that roams
to a new address mid-download, the upstream DNS server dying, hanging and coming back, the test
host's interface going down and up, and `kill -9` of the gateway while peers are added.

client ns (wireguard-go, curl) -> gateway ns (`unclaw-tui --no-ui --json`) -> internet ns
(test servers at 198.18.0.2).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import bring_up, wait_for
from tests.interop.harness import (
    HOST_ADDR,
    REPO_ROOT,
    FlowsSetup,
    GatewayProcess,
    GatewaySetup,
    Namespace,
    module_cmd,
    rss_kib,
    run_json,
    sockets_to,
    wait_ready,
)
from tests.interop.hosts import pattern_sha256
from unclaw_tui.services.vips import VIPS_FILE

pytestmark = pytest.mark.interop

MiB = 1 << 20
HTTP_PORT = 8080
RESET_PORT = 9100
CONNECT_TIMEOUT = 10.0  # services/relay.py: the relay's connect to a destination


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


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

    def resets() -> list[dict[str, Any]]:
        return [
            e for e in gw.drain() if e["type"] == "tcp_closed" and e.get("dst_port") == RESET_PORT
        ]

    wait_for(lambda: len(resets()) >= 3, "the warm-up's 3 connections closed", 10)
    pid = gw.proc.pid
    rss_before, fds_before = rss_kib(pid), fd_count(pid)

    result = run_json(s, s.client_ns, *reader, "--count", "30")
    assert result["outcomes"] == {"reset": 30}, result
    assert all(n > 0 for n in result["received"]), result  # reset mid-transfer, not at connect

    wait_for(lambda: len(resets()) >= 33, "33 tcp_closed for the reset port", 10)
    closed = resets()
    assert len(closed) == 33, closed[-3:]
    assert all(e["error"] for e in closed), [e for e in closed if not e["error"]][:3]
    wait_for(lambda: fd_count(pid) <= fds_before, f"the gateway's fds back to {fds_before}", 3)
    fds_after, rss_growth = fd_count(pid), rss_kib(pid) - rss_before
    print(f"\nafter 30 resets: fds {fds_before} -> {fds_after}, RSS +{rss_growth} KiB")
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
    wait_for(lambda: out.exists() and out.stat().st_size >= 4 * MiB, "the download under way", 20)
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
        time.sleep(rng.uniform(0.0, 0.6))  # not a wait: a random moment of the CLI's write
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


# --- upstream DNS dies, hangs, and comes back ----------------------------------------------

GATEWAY_DNS = "10.77.0.1"
VIP_NET = ipaddress.IPv4Network("10.78.0.0/16")
UPSTREAM_TIMEOUT = 2.0  # services/upstream.py: one question, all servers together


def dig_timed(s: FlowsSetup, name: str) -> tuple[str, list[str], int]:
    """One A query over UDP at the gateway's tunnel address: (status, A answers, dig's own
    query time in ms).  One try of 5 s: a hang shows up as a failure, never as a retry."""
    res = s.client_ns.run(
        "dig", f"@{GATEWAY_DNS}", "+time=5", "+tries=1", "+noall", "+comments", "+answer",
        "+stats", name, "A",
        check=False, timeout=20,
    )  # fmt: skip
    status = re.search(r"status: (\w+)", res.stdout)
    took = re.search(r"Query time: (\d+) msec", res.stdout)
    assert status and took, f"dig {name}: no answer: {res.stdout}{res.stderr}"
    answers = [
        line.split()[-1]
        for line in res.stdout.splitlines()
        if line and not line.startswith(";") and line.split()[3] == "A"
    ]
    return status.group(1), answers, int(took.group(1))


def dns_event(gw: GatewayProcess, qname: str, timeout: float = 5) -> dict[str, Any]:
    return gw.wait_event(
        lambda e: e["type"] == "dns_query" and e["qname"] == qname and e["qtype"] == "A",
        timeout,
        f"dns_query for {qname}",
    )


def vips_saved(s: FlowsSetup, *names: str) -> None:
    """Wait until the gateway's saved VIP map (written at most once a second) holds `names`."""

    def saved() -> bool:
        path = s.state_dir / VIPS_FILE
        return path.exists() and all(f'"{name}"' in path.read_text() for name in names)

    wait_for(saved, f"{', '.join(names)} in the saved VIP map", 5)


def test_upstream_dns_dies_hangs_and_returns(flows_setup: FlowsSetup) -> None:
    """Dead upstream (port unreachable): SERVFAIL at once.  Hung upstream (stopped, silent):
    SERVFAIL after the 2 s upstream budget.  Either way names answered before keep their VIP
    from the gateway's answer cache (for the upstream's TTL, 60 s in the test zone: there is no
    serve-stale), the gateway stays up, no upstream socket or fd is left behind, and the first
    query after the upstream returns resolves."""
    s = flows_setup
    dns_host = s.start_dns_host()
    config = s.add_peer("phone")
    gw = s.start_gateway("--upstream-dns", HOST_ADDR)
    client = s.client(config)
    assert client.ping(GATEWAY_DNS, count=2).returncode == 0
    pid = gw.proc.pid

    status, answers, _ = dig_timed(s, "example.test")
    assert status == "NOERROR" and len(answers) == 1, (status, answers)
    vip = answers[0]
    assert ipaddress.IPv4Address(vip) in VIP_NET
    assert dig_timed(s, "mail.example.test")[0] == "NOERROR"
    assert dig_timed(s, "gone-0.example.test")[0] == "NXDOMAIN"
    vips_saved(s, "example.test", "mail.example.test")
    wait_for(lambda: sockets_to(pid, HOST_ADDR, 53) == 0, "every upstream socket closed", 2)
    fds_before = fd_count(pid)

    # 1. The upstream dies: the kernel answers port unreachable, the gateway SERVFAILs at once.
    dns_host.kill()
    dns_host.wait(timeout=10)
    for i in range(1, 6):
        name = f"gone-{i}.example.test"  # new names: nothing cached for them
        status, answers, ms = dig_timed(s, name)
        assert (status, answers) == ("SERVFAIL", []), (name, status, answers)
        assert ms < 500, f"{name}: SERVFAIL after {ms} ms; a dead upstream must fail at once"
        ev = dns_event(gw, name)
        assert ev["rcode"] == "SERVFAIL" and ev["answers"] == [] and not ev["cached"], ev
        assert ev["upstream_ms"] is not None and ev["upstream_ms"] < 500, ev
    status, answers, _ = dig_timed(s, "www.example.test")  # exists, but cannot be asked now
    assert status == "SERVFAIL"
    assert dns_event(gw, "www.example.test")["rcode"] == "SERVFAIL"
    # Answered before: still answered, with the same VIP, from the cache (no upstream asked).
    gw.events.clear()  # events come in order: the first answer for example.test is in here
    assert dig_timed(s, "example.test")[:2] == ("NOERROR", [vip])
    ev = dns_event(gw, "example.test")
    assert ev["cached"] and ev["upstream_ms"] is None and ev["answers"] == [vip], ev

    # 2. It returns on the same address: the very first new query resolves (failures are not
    # cached).
    dns_host = s.start_dns_host()
    status, answers, _ = dig_timed(s, "www.example.test")
    assert status == "NOERROR" and len(answers) == 1, (status, answers)
    www_vip = answers[0]
    assert www_vip != vip and ipaddress.IPv4Address(www_vip) in VIP_NET
    assert dig_timed(s, "gone-1.example.test")[0] == "NXDOMAIN"

    # 3. It hangs (stopped: the socket is there, nothing answers, no ICMP): SERVFAIL after
    # the upstream budget, while the question is pending one upstream socket is open.
    os.kill(dns_host.pid, signal.SIGSTOP)
    try:
        hung = s.topo.spawn(
            s.client_ns,
            "dig", f"@{GATEWAY_DNS}", "+time=5", "+tries=1", "+noall", "+comments", "+stats",
            "ns.example.test", "A",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        t0 = time.monotonic()
        pending = 0
        while hung.poll() is None and time.monotonic() - t0 < 10:
            pending = max(pending, sockets_to(pid, HOST_ADDR, 53))
            time.sleep(0.05)  # sampling while the question is pending, not a wait
        out, err = hung.communicate(timeout=10)
        assert pending == 1, f"{pending} upstream sockets while one question was pending"
        status_m = re.search(r"status: (\w+)", out)
        took = re.search(r"Query time: (\d+) msec", out)
        assert status_m and took, out + err
        assert status_m.group(1) == "SERVFAIL", out
        ms = int(took.group(1))
        assert UPSTREAM_TIMEOUT * 1000 - 100 <= ms <= UPSTREAM_TIMEOUT * 1000 + 700, ms
        ev = dns_event(gw, "ns.example.test")
        assert ev["rcode"] == "SERVFAIL" and not ev["cached"], ev
        assert ev["upstream_ms"] >= UPSTREAM_TIMEOUT * 1000 - 50, ev
        assert dig_timed(s, "www.example.test")[:2] == ("NOERROR", [www_vip])  # cached
        assert sockets_to(pid, HOST_ADDR, 53) == 0
    finally:
        os.kill(dns_host.pid, signal.SIGCONT)

    # 4. Back from the hang: resolves at once again.
    status, answers, ms = dig_timed(s, "ns.example.test")
    assert status == "NOERROR" and len(answers) == 1 and ms < 1000, (status, answers, ms)

    # Nothing left behind, and the gateway is still the same process, serving.
    vips_saved(s, "www.example.test", "ns.example.test")  # the save (once a second) has run
    assert gw.proc.poll() is None
    assert sockets_to(pid, HOST_ADDR, 53) == 0
    wait_for(lambda: fd_count(pid) <= fds_before, f"the gateway's fds back to {fds_before}", 3)
    print(f"\nfds {fds_before} -> {fd_count(pid)}")
    assert client.ping(GATEWAY_DNS, count=1).returncode == 0


# --- the test host's interface goes down and comes back ------------------------------------


def host_iface(s: FlowsSetup) -> str:
    """The test host's end of the gateway<->internet veth (make_flows_setup's second link)."""
    return f"vb{s.topo.tag}2"[:15]


def link_bytes(ns: Namespace, iface: str) -> tuple[int, int]:
    """(rx, tx) bytes of an interface, from the kernel's counters."""
    stats = json.loads(ns.run("ip", "-j", "-s", "link", "show", iface).stdout)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


def test_host_interface_down_and_up(flows_setup: FlowsSetup) -> None:
    """The test host's link goes down for a few seconds mid-download.  The download survives
    (neither end lost its socket, so TCP retransmits once the link is back) and ends complete
    with a clean TcpClosed; connections attempted meanwhile are reset to the client within the
    relay's connect timeout, each with a TcpClosed naming why; afterwards connections work
    again, and every flow opened is closed, no fd left behind."""
    s = flows_setup
    s.start_host("http", HTTP_PORT)
    gw, _client = bring_up(s)
    pid = gw.proc.pid
    iface = host_iface(s)
    gateway_iface = f"va{s.topo.tag}2"[:15]
    url = f"http://{HOST_ADDR}:{HTTP_PORT}"
    warm = s.run_client("connect", HOST_ADDR, str(HTTP_PORT), "--timeout", "5")
    assert warm["result"] == "connected", warm
    wait_for(
        lambda: any(e["type"] == "tcp_closed" and e["dst_port"] == HTTP_PORT for e in gw.drain()),
        "the warm-up connection closed",
        10,
    )
    fds_before = fd_count(pid)

    # Large enough that much of it must cross the link after the outage: more than what the
    # sockets' and the relay's buffers hold on the way.
    size = 32 * MiB
    out = s.topo.tmp / "outage.bin"
    curl = s.topo.spawn(
        s.client_ns,
        "curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", "45",
        "--limit-rate", "4M", "-o", str(out), "-w", "%{http_code}", f"{url}/bytes/{size}",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: out.exists() and out.stat().st_size >= 4 * MiB, "the download under way", 20)
    assert curl.poll() is None, "the download must still be running when the link goes down"
    s.internet.run("ip", "link", "set", iface, "down")
    t_down = time.monotonic()
    try:
        # What the kernel does on carrier loss anyway (neigh_carrier_down), done explicitly so
        # the outcome does not depend on the kernel: a new connection must resolve the host's
        # MAC, which fails after 3 ARP probes 1 s apart -> EHOSTUNREACH, well inside the
        # relay's 10 s connect timeout.
        s.gateway_ns.run("ip", "neigh", "flush", "dev", gateway_iface)
        probe = module_cmd("tests.interop.hosts", "connect", HOST_ADDR, str(HTTP_PORT))
        probe.extend(("--timeout", "20"))
        spawn = {"stdout": subprocess.PIPE, "text": True, "env": s.env(), "cwd": str(REPO_ROOT)}
        probes = [s.topo.spawn(s.client_ns, *probe, **spawn) for _ in range(3)]
        during = [json.loads(p.communicate(timeout=30)[0]) for p in probes]
        assert curl.poll() is None, "the download ended during the outage"
    finally:
        s.internet.run("ip", "link", "set", iface, "up")
    t_up = time.monotonic()
    _, tx_at_up = link_bytes(s.internet, iface)
    print(f"\noutage {t_up - t_down:.1f} s; attempts meanwhile: {during}")
    for attempt in during:
        # An RST from the gateway once ARP gave up (<= 3 s; the attempts share one resolution,
        # which window updates of the download may already have started): the client is told,
        # it does not hang or time out.
        assert attempt["result"] == "refused", attempt
        assert attempt["seconds"] < CONNECT_TIMEOUT, attempt

    stdout, stderr = curl.communicate(timeout=60)
    _, tx_after = link_bytes(s.internet, iface)
    print(f"download done {time.monotonic() - t_up:.1f} s after the link came back, "
          f"{(tx_after - tx_at_up) / MiB:.1f} MiB sent over it since")  # fmt: skip
    assert curl.returncode == 0 and stdout == "200", (curl.returncode, stdout, stderr)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pattern_sha256(size)
    assert tx_after - tx_at_up > 4 * MiB, "the download did not cross the outage"

    # New connections work again once the link is up (linkwatch may hold it ~1 s).
    after = s.run_client("connect", HOST_ADDR, str(HTTP_PORT), "--timeout", "5")
    assert after["result"] == "connected" and after["reply"].startswith("HTTP/1.1 200"), after
    res = s.curl("--max-time", "10", f"{url}/hello")
    assert res.returncode == 0 and res.stdout == "hello\n", res.stderr

    # Events: every flow opened was closed exactly once (the gateway's open-flow count, which
    # it keeps from these same pairs, is back to 0); the refused ones say why.
    def tcp_events(kind: str) -> list[dict[str, Any]]:
        return [e for e in gw.drain() if e["type"] == kind and e["dst_port"] == HTTP_PORT]

    def ids(kind: str) -> list[int]:
        return sorted(e["conn_id"] for e in tcp_events(kind))

    def clean_closes() -> int:
        return sum(e["error"] is None for e in tcp_events("tcp_closed"))

    # Wait for the two connections made after the outage by name (4 clean closes), not by a
    # count of closes: SYNs that crossed our RSTs add failed ones, and the engine reports
    # fast-relayed connections in batches, so a count can be reached before those two arrive.
    wait_for(
        lambda: clean_closes() >= 4 and ids("tcp_opened") == ids("tcp_closed"),
        "every flow opened closed once",
        10,
    )
    closed = tcp_events("tcp_closed")
    assert len({e["conn_id"] for e in closed}) == len(closed), closed
    ok = [e for e in closed if e["error"] is None]
    failed = [e for e in closed if e["error"] is not None]
    assert len(ok) == 4, closed  # warm-up, download, 2 after
    assert [e["error"] for e in failed].count("no route to host") >= 3, failed
    # ARP gives up after ~3 s, just when the client's SYN is retransmitted (1 s + 2 s): a SYN
    # that crossed our RST is a new connection to the gateway, which the client then resets
    # (or which again finds no route).  At most one per attempt, and none carries a byte.
    assert len(failed) <= 6, failed
    assert all(e["bytes_up"] == 0 and e["bytes_down"] == 0 for e in failed), failed
    download = max(closed, key=lambda e: e["bytes_down"])
    assert download["error"] is None and size < download["bytes_down"] < size + 4096, download
    assert download["duration"] > t_up - t_down

    assert gw.proc.poll() is None
    wait_for(lambda: fd_count(pid) <= fds_before, f"the gateway's fds back to {fds_before}", 3)
    print(f"fds {fds_before} -> {fd_count(pid)}")
