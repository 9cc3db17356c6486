"""The CA page as transcripts: request heads in, responses out (services/ca_page.py)."""

from __future__ import annotations

import plistlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from unclaw_tui.router import Route, Router, route
from unclaw_tui.services.ca import CertificateAuthority
from unclaw_tui.services.ca_page import CaPage


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path)


def split(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_page_and_files(ca: CertificateAuthority) -> None:
    page = CaPage(ca.cert_pem)
    status, code = page.respond(b"GET / HTTP/1.1\r\nHost: 10.77.0.1\r\n\r\n")
    line, headers, body = split(code)
    assert status == 200 and line == "HTTP/1.1 200 OK"
    assert headers["Content-Type"].startswith("text/html")
    assert int(headers["Content-Length"]) == len(body)
    for platform in (b"Android", b"iOS", b"macOS", b"Windows", b"Linux", b"Firefox"):
        assert platform in body
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
    assert ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).encode() in body

    _, pem = page.respond(b"GET /ca.pem HTTP/1.1\r\n\r\n")
    assert split(pem)[2] == ca.cert_pem  # byte-identical to `unclaw-tui ca`
    _, der = page.respond(b"GET /ca.der?x=1 HTTP/1.0\r\n\r\n")
    assert x509.load_der_x509_certificate(split(der)[2]) == cert
    _, profile = page.respond(b"GET /ca.mobileconfig HTTP/1.1\r\n\r\n")
    doc = plistlib.loads(split(profile)[2])
    assert doc["PayloadType"] == "Configuration"
    (payload,) = doc["PayloadContent"]
    assert payload["PayloadType"] == "com.apple.security.root"
    assert x509.load_der_x509_certificate(payload["PayloadContent"]) == cert
    assert page.respond(b"GET /ca.mobileconfig HTTP/1.1\r\n\r\n")[1] == profile  # stable


def test_head_errors_and_methods(ca: CertificateAuthority) -> None:
    page = CaPage(ca.cert_pem)
    status, head_only = page.respond(b"HEAD /ca.pem HTTP/1.1\r\n\r\n")
    _, headers, body = split(head_only)
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == len(ca.cert_pem)
    assert page.respond(b"GET /etc/passwd HTTP/1.1\r\n\r\n")[0] == 404
    assert page.respond(b"GET /../ca.pem HTTP/1.1\r\n\r\n")[0] == 404
    status, refused = page.respond(b"POST / HTTP/1.1\r\n\r\n")
    assert status == 405 and split(refused)[1]["Allow"] == "GET, HEAD"
    for bad in (b"\x16\x03\x01\x00", b"GET /\r\n\r\n", b"GET / SPDY/3\r\n\r\n", b""):
        assert page.respond(bad)[0] == 400


def test_only_the_gateways_tunnel_address_on_port_80_is_the_page() -> None:
    assert route("tcp", "10.77.0.1", 80, gateway_ip="10.77.0.1") is Route.PAGE
    assert route("tcp", "10.77.0.1", 80) is Route.RELAY  # no page without the address
    assert route("tcp", "10.77.0.5", 80, gateway_ip="10.77.0.1") is Route.RELAY
    assert route("udp", "10.77.0.1", 80, gateway_ip="10.77.0.1") is Route.RELAY
    assert route("tcp", "10.77.0.1", 443, gateway_ip="10.77.0.1") is Route.TLS
    router = Router(gateway_ip="10.77.0.1")
    assert router.decide("tcp", "10.77.0.1", 80) is Route.RELAY  # not enabled yet
    router.enable(Route.PAGE)
    assert router.decide("tcp", "10.77.0.1", 80) is Route.PAGE
