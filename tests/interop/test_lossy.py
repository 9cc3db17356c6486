"""TCP through the gateway over a bad path: loss, reordering, duplication and jitter.

The seeded impairment relay (tests.interop.impair) sits in the client namespace between the
wireguard-go client and the gateway and impairs both directions of the WireGuard UDP stream,
so the gateway's TCP sees the loss on what it sends and on what it receives.  A correctness
test: the time bounds are generous, and only integrity is asserted.
"""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest

from tests.interop.harness import HOST_ADDR, FlowsSetup
from tests.interop.hosts import pattern_sha256, write_pattern_file
from tests.interop.test_flows import HTTP_PORT, MiB, sha256_file, wait_events

pytestmark = pytest.mark.interop

RELAY_PORT = 51999
IMPAIRMENT = (
    "--loss", "0.02", "--reorder", "0.02", "--duplicate", "0.01", "--jitter-ms", "5",
    "--seed", "20240601",
)  # fmt: skip
SIZE = 16 * MiB


def _relay_stats(relay: subprocess.Popen[str]) -> dict[str, Any]:
    relay.send_signal(signal.SIGTERM)
    out, _ = relay.communicate(timeout=10)
    return json.loads(out.strip().splitlines()[-1])


def test_16mib_each_way_intact_over_a_lossy_path(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    s.start_host("http", HTTP_PORT)
    config = s.add_peer("phone")
    gw = s.start_gateway()
    relay = s.start_impair(*IMPAIRMENT, listen_port=RELAY_PORT)
    client = s.client(config, endpoint=f"127.0.0.1:{RELAY_PORT}")
    # Handshake messages can be lost too: wireguard-go retries them every 5 s.
    ping = client.ping("10.77.0.1", count=20, interval=0.5, timeout=1)
    assert "bytes from 10.77.0.1" in ping.stdout, ping.stdout + ping.stderr
    url = f"http://{HOST_ADDR}:{HTTP_PORT}"

    out = s.topo.tmp / "download.bin"
    res = s.curl(
        "--max-time", "150", "-o", str(out), "-w", "%{http_code}", f"{url}/bytes/{SIZE}?seed=7",
        timeout=170,
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout == "200", f"curl: {res.returncode} {res.stderr}"
    assert sha256_file(out) == pattern_sha256(SIZE, seed=7)
    out.unlink()

    upload = s.topo.tmp / "upload.bin"
    digest = write_pattern_file(str(upload), SIZE, seed=8)
    res = s.curl(
        "--max-time", "150", "-T", str(upload), f"{url}/upload", timeout=170,
    )  # fmt: skip
    upload.unlink()
    assert res.returncode == 0, f"curl: {res.returncode} {res.stderr}"
    assert json.loads(res.stdout) == {"sha256": digest, "bytes": SIZE}

    closed = wait_events(
        gw,
        lambda e: (
            e["type"] == "tcp_closed"
            and e.get("dst_ip") == HOST_ADDR
            and e.get("dst_port") == HTTP_PORT
        ),
        2,
        10,
    )
    # The gateway's counters count payload once, however often it was retransmitted or
    # duplicated on the way.
    assert SIZE < closed[0]["bytes_down"] < SIZE + 4096, closed[0]
    assert SIZE < closed[1]["bytes_up"] < SIZE + 4096, closed[1]

    # The path really was bad, both ways.
    stats = _relay_stats(relay)
    for direction in ("up", "down"):
        d = stats[direction]
        assert d["received"] > 5_000, stats
        assert d["dropped"] > 0.01 * d["received"], stats
        assert d["reordered"] > 0.01 * d["received"], stats
        assert d["duplicated"] > 0.005 * d["received"], stats
        assert d["overflow"] == 0, stats
