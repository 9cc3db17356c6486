"""The CA page through a real wireguard-go client: `curl http://10.77.0.1/` gets the install
page and the CA files, byte-identical to `unclaw-tui ca`; outside the tunnel nothing serves it."""

from __future__ import annotations

import plistlib
import subprocess

import pytest
from cryptography import x509

from tests.helpers import bring_up
from tests.interop.harness import FlowsSetup

pytestmark = pytest.mark.interop

PAGE = "http://10.77.0.1"


def test_ca_page_serves_the_ca_to_peers_only(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    ca_pem = s.cli("ca").stdout.encode()
    gw, _ = bring_up(s)
    page = s.curl("--max-time", "10", "-w", "\n%{http_code} %{content_type}", f"{PAGE}/")
    body, _, status = page.stdout.rpartition("\n")
    assert status.startswith("200 text/html"), page.stdout[-300:] + page.stderr
    assert "ca.mobileconfig" in body and "Android" in body
    for name in ("ca.pem", "ca.der", "ca.mobileconfig"):
        out = subprocess.run(
            s.client_ns.cmd("curl", "--silent", "--fail", "--max-time", "10", "--noproxy", "*",
                            f"{PAGE}/{name}"),
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 0, (name, out.stderr)
        got = out.stdout
        cert = x509.load_pem_x509_certificate(ca_pem)
        if name == "ca.pem":
            assert got == ca_pem  # byte-identical to `unclaw-tui ca`
        elif name == "ca.der":
            assert x509.load_der_x509_certificate(got) == cert
        else:
            payload = plistlib.loads(got)["PayloadContent"][0]["PayloadContent"]
            assert x509.load_der_x509_certificate(payload) == cert
    closed = gw.wait_event(
        lambda e: e["type"] == "tcp_closed" and e["dst_port"] == 80 and e["route"] == "page",
        5,
        "the page's tcp_closed",
    )
    assert closed["peer"] == "phone" and closed["error"] is None
    # Outside the tunnel the address does not exist: the gateway listens on no TCP port.
    outside = s.gateway_ns.run(
        "curl", "--silent", "--max-time", "3", "--noproxy", "*", f"{PAGE}/", check=False
    )
    assert outside.returncode != 0 and "BEGIN CERTIFICATE" not in outside.stdout
    listening = s.gateway_ns.run("ss", "-Htln", check=False).stdout
    assert ":80 " not in listening, listening
