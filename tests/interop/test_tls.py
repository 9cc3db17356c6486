"""TLS interception end to end: curl in the client namespace, through wireguard-go and the
gateway, to HTTPS servers for `example.test` on the test host (a test CA the gateway trusts
through SSL_CERT_FILE, and a server whose certificate nobody trusts).

curl resolves the name itself (`--resolve example.test:443:198.18.0.2`), so the TLS service is
reached on the original IP with the SNI; the VIP path is the DNS tests' business.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import HOSTNAME, OTHER_HOSTNAME, Pki, bring_up, make_pki
from tests.interop.harness import (
    HOST_ADDR,
    FlowsSetup,
    GatewayProcess,
    module_cmd,
)
from tests.interop.hosts import pattern_sha256

pytestmark = pytest.mark.interop

TRUSTED_PORT = 443
UNTRUSTED_PORT = 8443
VIP_NET = "10.78.0.0/16"
CURL_CA_ERROR = 60  # CURLE_PEER_FAILED_VERIFICATION


def start_tls_host(s: FlowsSetup, port: int, pair: tuple[Path, Path]) -> subprocess.Popen[str]:
    cert, key = pair
    return s.start_module_in(
        s.internet, "tests.interop.tls_host", "serve", "--port", str(port),
        "--cert", str(cert), "--key", str(key), what=f"HTTPS test host on {port}",
    )  # fmt: skip


def bring_up_tls(
    s: FlowsSetup, pki: Pki, *gateway_args: str, extra_routes: tuple[str, ...] = ()
) -> tuple[GatewayProcess, Path]:
    """Test hosts, the gateway trusting the test CA upstream, a client; our CA's path."""
    start_tls_host(s, TRUSTED_PORT, pki.trusted)
    start_tls_host(s, UNTRUSTED_PORT, pki.untrusted)
    our_ca = Path(s.cli("ca", "--path").stdout.strip())
    assert our_ca.read_text().startswith("-----BEGIN CERTIFICATE-----")
    env = {"SSL_CERT_FILE": str(pki.ca_file)}
    gw, _ = bring_up(s, *gateway_args, env=env, extra_routes=extra_routes)
    return gw, our_ca


def https_args(
    cafile: Path,
    path: str = "/",
    port: int = TRUSTED_PORT,
    host: str = HOSTNAME,
    addr: str = HOST_ADDR,
) -> list[str]:
    """curl's arguments for GET https://host:port/path at addr, trusting cafile; the output
    ends with a line holding the HTTP status."""
    return [
        "--max-time", "15", "--cacert", str(cafile),
        "--resolve", f"{host}:{port}:{addr}",
        "-w", "\n%{http_code}", f"https://{host}:{port}{path}",
    ]  # fmt: skip


def curl_https(
    s: FlowsSetup,
    cafile: Path,
    path: str = "/",
    port: int = TRUSTED_PORT,
    host: str = HOSTNAME,
    addr: str = HOST_ADDR,
) -> subprocess.CompletedProcess[str]:
    return s.curl(*https_args(cafile, path, port, host, addr), timeout=30)


def tls_event(**fields: Any) -> Callable[[dict[str, Any]], bool]:
    def pred(e: dict[str, Any]) -> bool:
        return e["type"] == "tls_host" and all(e.get(k) == v for k, v in fields.items())

    return pred


def garbage(s: FlowsSetup, kind: str) -> dict[str, Any]:
    res = s.client_ns.run(
        *module_cmd("tests.interop.tls_host", "garbage", HOST_ADDR, str(TRUSTED_PORT),
                    "--kind", kind),
        check=False, timeout=40,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def check_flow_pairs(gw: GatewayProcess, timeout: float = 5.0) -> None:
    """Every TLS connection opened is closed, once (the last close may still be on its way)."""
    deadline = time.monotonic() + timeout
    while True:
        events = gw.drain()
        opened = [e["conn_id"] for e in events if e["type"] == "tcp_opened" and e["route"] == "tls"]
        closed = [e["conn_id"] for e in events if e["type"] == "tcp_closed" and e["route"] == "tls"]
        if sorted(opened) == sorted(closed) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert opened and sorted(opened) == sorted(closed)
    assert len(set(opened)) == len(opened)


def test_intercept_refusals_and_garbage(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    gw, our_ca = bring_up_tls(s, pki)

    # With our CA installed: 200 through interception, and an http event with the path.
    res = curl_https(s, our_ca, "/hello?x=1")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from /hello?x=1\n\n200"
    ok = gw.wait_event(tls_event(sni=HOSTNAME, mode="intercepted", ok=True), 10, "tls ok")
    assert ok["alpn"] == "http/1.1"
    http = gw.wait_event(lambda e: e["type"] == "http_request", 10, "http_request")
    assert (http["method"], http["host"], http["path"], http["status"]) == (
        "GET",
        HOSTNAME,
        "/hello?x=1",
        200,
    )
    assert http["bytes"] == len("hello from /hello?x=1\n") and http["peer"] == "phone"
    opened = gw.wait_event(
        lambda e: e["type"] == "tcp_opened" and e.get("route") == "tls", 10, "tcp_opened"
    )
    assert opened["hostname"] == HOSTNAME and opened["dst_port"] == TRUSTED_PORT

    # Without our CA (trusting only the origin's): the client refuses, and the event says so.
    res = curl_https(s, pki.ca_file, "/no-ca")
    assert res.returncode == CURL_CA_ERROR, (res.returncode, res.stderr)
    refused = gw.wait_event(tls_event(ok=False, mode="intercepted"), 10, "client refusal")
    assert refused["error"].startswith("client rejected our certificate"), refused
    assert not [e for e in gw.drain() if e["type"] == "http_request" and e["path"] == "/no-ca"]

    # An upstream with an untrusted certificate: the client's connection is closed.
    res = curl_https(s, our_ca, "/untrusted", port=UNTRUSTED_PORT)
    assert res.returncode != 0 and not res.stdout.endswith("200")
    upstream = gw.wait_event(
        lambda e: e["type"] == "tls_host" and "upstream" in (e.get("error") or ""), 10, "upstream"
    )
    assert upstream["ok"] is False
    assert "upstream certificate rejected" in upstream["error"]
    closed = gw.wait_event(
        lambda e: e["type"] == "tcp_closed" and e.get("dst_port") == UNTRUSTED_PORT, 10, "closed"
    )
    assert "upstream certificate rejected" in closed["error"]

    # Garbage on 443: a clean close and an event each, quickly.
    seen_rejections: list[dict[str, Any]] = []
    for kind, reason in (
        ("random", "not a TLS handshake record"),
        ("truncated", "truncated"),
        ("http", "not a TLS handshake record"),
    ):
        result = garbage(s, kind)
        assert result["result"] == "eof" and result["received"] == 0, (kind, result)
        assert result["seconds"] < 5, (kind, result)
        event = gw.wait_event(
            lambda e, r=reason: (
                e["type"] == "tls_host"
                and e["mode"] == "rejected"
                and r in (e.get("error") or "")
                and e not in seen_rejections
            ),
            10,
            f"event for {kind}",
        )
        seen_rejections.append(event)

    # ... and the gateway keeps serving others.
    res = curl_https(s, our_ca, "/after-garbage")
    assert res.returncode == 0 and res.stdout.endswith("200"), res.stderr
    gw.wait_event(
        lambda e: e["type"] == "http_request" and e["path"] == "/after-garbage", 10, "http again"
    )
    check_flow_pairs(gw)
    assert gw.proc.poll() is None


def test_passthrough_shows_the_origin_certificate(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    gw, our_ca = bring_up_tls(s, pki, "--passthrough", "example.*", "--auto-passthrough")

    # The origin's own certificate reaches the client: its CA works, ours does not.
    res = curl_https(s, pki.ca_file, "/through")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from /through\n\n200"
    event = gw.wait_event(tls_event(sni=HOSTNAME, mode="passthrough"), 10, "passthrough event")
    assert event["ok"] is True
    res = curl_https(s, our_ca, "/ours")
    assert res.returncode == CURL_CA_ERROR, (res.returncode, res.stderr)
    # Encrypted end to end: no HTTP events.
    assert not [e for e in gw.drain() if e["type"] == "http_request"]
    check_flow_pairs(gw)

    # auto.test matches no pattern: intercepted until a client rejects our certificate for
    # it, passed through from then on (--auto-passthrough).
    res = curl_https(s, pki.ca_file, "/first", host=OTHER_HOSTNAME)
    assert res.returncode == CURL_CA_ERROR, (res.returncode, res.stderr)
    refused = gw.wait_event(tls_event(sni=OTHER_HOSTNAME, ok=False), 10, "rejection")
    assert refused["mode"] == "intercepted"
    # curl sends an unknown_ca alert and closes; when the close overtakes the alert, the
    # gateway sees only the close after its certificate: a rejection either way.
    assert refused["error"].startswith("client rejected our certificate"), refused
    res = curl_https(s, pki.ca_file, "/second", host=OTHER_HOSTNAME)
    assert res.returncode == 0 and res.stdout == "hello from /second\n\n200", res.stderr
    gw.wait_event(tls_event(sni=OTHER_HOSTNAME, mode="passthrough", ok=True), 10, "auto")
    check_flow_pairs(gw)


def test_passthrough_bulk_download_is_relayed_intact(flows_setup: FlowsSetup) -> None:
    """A passed-through connection goes to the engine after its ClientHello: 32 MiB arrive
    intact, the half-closes on either side end it cleanly, and the byte counts add up."""
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    gw, _ = bring_up_tls(s, pki, "--passthrough", "example.*")
    size = 32 << 20
    out = s.topo.tmp / "through.bin"
    res = s.curl(*https_args(pki.ca_file, f"/bytes/{size}"), "-o", str(out), timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "200", (res.returncode, res.stderr)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    assert digest == pattern_sha256(size)
    gw.wait_event(tls_event(sni=HOSTNAME, mode="passthrough", ok=True), 10, "passthrough event")
    closed = gw.wait_event(
        lambda e: e["type"] == "tcp_closed" and e["hostname"] == HOSTNAME, 10, "tcp_closed"
    )
    # curl closes right after its last byte; the server's close_notify, still on its way,
    # then meets a closed socket and the client's kernel resets: the peer's doing, reported.
    assert closed["error"] in (None, "peer: connection reset"), closed
    assert closed["route"] == "tls", closed
    assert size < closed["bytes_down"] < size + size // 50, closed  # TLS records' overhead
    assert 200 < closed["bytes_up"] < 16384, closed  # the ClientHello and a few records
    check_flow_pairs(gw)


def test_tls_to_a_vip(flows_setup: FlowsSetup) -> None:
    """The name resolved through the tunnel's DNS to a VIP: TLS to the VIP reaches the real
    host, and the events name it."""
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    s.start_dns_host()
    gw, our_ca = bring_up_tls(s, pki, "--upstream-dns", HOST_ADDR, extra_routes=(VIP_NET,))
    res = s.client_ns.run(
        "dig", "@10.77.0.1", "+time=3", "+tries=2", "+short", HOSTNAME, "A",
        check=False, timeout=20,
    )  # fmt: skip
    vip = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert vip.startswith("10.78."), (res.stdout, res.stderr)

    res = curl_https(s, our_ca, "/via-vip", addr=vip)
    assert res.returncode == 0 and res.stdout == "hello from /via-vip\n\n200", res.stderr
    gw.wait_event(tls_event(sni=HOSTNAME, mode="intercepted", ok=True), 10, "tls ok")
    http = gw.wait_event(lambda e: e["type"] == "http_request", 10, "http_request")
    assert http["path"] == "/via-vip" and http["status"] == 200
    opened = gw.wait_event(
        lambda e: e["type"] == "tcp_opened" and e.get("route") == "tls", 10, "tcp_opened"
    )
    assert (opened["dst_ip"], opened["hostname"]) == (vip, HOSTNAME)
    check_flow_pairs(gw)
