"""The CA page: `http://<gateway tunnel address>/` for connected peers, so a device can trust our
interception CA without copying files around (mitmproxy's `mitm.it` is the model).

Served on the gateway's own tunnel address, port 80: that address exists only inside our
TCP/IP stack, so nothing outside the tunnel can reach the page.  Paths: `/` (install steps per
platform), `/ca.pem`, `/ca.der` (Android and Windows install a `.crt`/`.der` file),
`/ca.mobileconfig` (an iOS/macOS configuration profile carrying the certificate).  One request
per connection, GET or HEAD; the request head is bounded in size and time.

`respond(head)` is sans-IO (bytes in, bytes out); `CaPageService` is the thin asyncio glue.
"""

from __future__ import annotations

import asyncio
import html
import plistlib
import uuid
from typing import TYPE_CHECKING, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from unclaw_tui.flow import Flow, PeerGone
from unclaw_tui.router import Route
from unclaw_tui.services.ca import CertificateAuthority

if TYPE_CHECKING:
    from unclaw_tui.engine import UdpDatagram
    from unclaw_tui.services.base import GatewayServices, Service

MAX_HEAD = 8192  # a browser's GET is well under this
HEAD_TIMEOUT = 10.0
WRITE_TIMEOUT = 30.0
_PROFILE_NAMESPACE = uuid.UUID("6f1d6c1e-3b8a-4c62-9a55-0b7a6f2c9d10")  # stable profile UUIDs


def url_for(gateway_ip: str) -> str:
    return f"http://{gateway_ip}/"


def mobileconfig(cert_der: bytes, fingerprint: str) -> bytes:
    """An (unsigned) configuration profile installing the CA as a root.  Its UUIDs derive from
    the certificate, so every download of one CA is the same file and reinstalling replaces it."""
    payload_uuid = str(uuid.uuid5(_PROFILE_NAMESPACE, "cert:" + fingerprint)).upper()
    profile_uuid = str(uuid.uuid5(_PROFILE_NAMESPACE, "profile:" + fingerprint)).upper()
    profile = {
        "PayloadContent": [
            {
                "PayloadCertificateFileName": "unclaw-tui-ca.cer",
                "PayloadContent": cert_der,
                "PayloadDescription": "Adds the unclaw-tui interception CA",
                "PayloadDisplayName": "unclaw-tui CA",
                "PayloadIdentifier": f"org.unclaw-tui.ca.{payload_uuid}",
                "PayloadType": "com.apple.security.root",
                "PayloadUUID": payload_uuid,
                "PayloadVersion": 1,
            }
        ],
        "PayloadDisplayName": "unclaw-tui CA",
        "PayloadIdentifier": f"org.unclaw-tui.profile.{profile_uuid}",
        "PayloadRemovalDisallowed": False,
        "PayloadType": "Configuration",
        "PayloadUUID": profile_uuid,
        "PayloadVersion": 1,
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)


def _page(fingerprint: str) -> bytes:
    spaced = html.escape(":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2)))
    steps = (
        ("Android", "Download <a href='/ca.der'>ca.der</a>, then Settings → Security → "
         "Encryption &amp; credentials → Install a certificate → CA certificate.  Apps trust "
         "user CAs only if they opt in (most browsers do; many apps do not)."),
        ("iOS / iPadOS", "Open <a href='/ca.mobileconfig'>ca.mobileconfig</a> in Safari, "
         "install it under Settings → General → VPN &amp; Device Management, then turn it on "
         "under Settings → General → About → Certificate Trust Settings."),
        ("macOS", "Open <a href='/ca.mobileconfig'>ca.mobileconfig</a> and install it in System "
         "Settings → Privacy &amp; Security → Profiles, or add <a href='/ca.pem'>ca.pem</a> to "
         "the System keychain and set it to Always Trust."),
        ("Windows", "Download <a href='/ca.der'>ca.der</a>, open it, Install Certificate → "
         "Local Machine → Trusted Root Certification Authorities."),
        ("Linux", "Download <a href='/ca.pem'>ca.pem</a>; Debian/Ubuntu: copy it to "
         "/usr/local/share/ca-certificates/unclaw-tui.crt and run update-ca-certificates; "
         "Fedora: /etc/pki/ca-trust/source/anchors/, then update-ca-trust."),
        ("Firefox (its own store)", "Settings → Privacy &amp; Security → Certificates → View "
         "Certificates → Authorities → Import <a href='/ca.pem'>ca.pem</a>, trust it for "
         "websites."),
    )  # fmt: skip
    items = "\n".join(f"<h2>{name}</h2>\n<p>{text}</p>" for name, text in steps)
    return (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>unclaw-tui CA</title></head><body>\n"
        "<h1>Trust the unclaw-tui CA</h1>\n"
        "<p>This gateway decrypts TLS to show and control what this device does.  Install its "
        "CA only on devices you own, and remove it when you are done.</p>\n"
        "<p>Files: <a href='/ca.pem'>ca.pem</a> · <a href='/ca.der'>ca.der</a> · "
        "<a href='/ca.mobileconfig'>ca.mobileconfig</a></p>\n"
        f"<p>SHA-256 fingerprint: <code>{spaced}</code></p>\n{items}\n</body></html>\n"
    ).encode()


class CaPage:
    """The page's files, made once from the CA's certificate; `respond` answers one request."""

    def __init__(self, cert_pem: bytes) -> None:
        cert = x509.load_pem_x509_certificate(cert_pem)
        der = cert.public_bytes(serialization.Encoding.DER)
        fingerprint = cert.fingerprint(hashes.SHA256()).hex().upper()
        self.files: dict[str, tuple[str, bytes]] = {
            "/": ("text/html; charset=utf-8", _page(fingerprint)),
            "/ca.pem": ("application/x-pem-file", cert_pem),
            "/ca.der": ("application/x-x509-ca-cert", der),
            "/ca.crt": ("application/x-x509-ca-cert", der),
            "/ca.mobileconfig": (
                "application/x-apple-aspen-config",
                mobileconfig(der, fingerprint),
            ),
        }

    def respond(self, head: bytes) -> tuple[int, bytes]:
        """The status and the whole response to one request head (up to its blank line)."""
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response(400, "text/plain", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0].decode("ascii", "replace")
        if method not in (b"GET", b"HEAD"):
            return _response(405, "text/plain", b"only GET and HEAD\n", allow=True)
        found = self.files.get(target)
        if found is None:
            return _response(404, "text/plain", b"not found: try /\n", head_only=method == b"HEAD")
        content_type, body = found
        return _response(200, content_type, body, head_only=method == b"HEAD", name=target)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    head_only: bool = False,
    allow: bool = False,
    name: str = "/",
) -> tuple[int, bytes]:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        headers.append("Allow: GET, HEAD")
    if name != "/":
        headers.append(f'Content-Disposition: attachment; filename="unclaw-tui-{name[1:]}"')
    out = ("\r\n".join(headers) + "\r\n\r\n").encode()
    return status, out if head_only else out + body


class HeadTooLong(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """Up to the blank line that ends a request head, reading at most MAX_HEAD bytes."""
    head = bytearray()
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) >= MAX_HEAD:
            raise HeadTooLong
        chunk = await reader.read(MAX_HEAD - len(head))
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(head), None)
        head += chunk
    return bytes(head[: end + 4])


class CaPageService:
    def __init__(self, page: CaPage, head_timeout: float = HEAD_TIMEOUT) -> None:
        self.page = page
        self.head_timeout = head_timeout

    async def handle_tcp(self, flow: Flow) -> None:
        flow.open()
        try:
            reader, writer = flow.accept()
        except PeerGone:
            return
        error: str | None = None
        try:
            head = await asyncio.wait_for(_read_head(reader), self.head_timeout)
            flow.bytes_up += len(head)
            _, response = self.page.respond(head)
            writer.write(response)
            flow.bytes_down += len(response)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
        except HeadTooLong:
            error = f"request head over {MAX_HEAD} bytes"
        except asyncio.IncompleteReadError:
            error = "closed before a whole request head"
        except TimeoutError:
            error = "no request head in time"
        except (OSError, RuntimeError) as exc:
            error = str(exc) or type(exc).__name__
        if error is None:
            writer.close()
        else:
            flow.abort()
        flow.close(error)

    def handle_udp(self, dgram: UdpDatagram) -> None:  # the route is TCP only
        pass

    async def close(self) -> None:
        pass


def create(gateway: GatewayServices) -> dict[Route, Service]:
    ca = CertificateAuthority.load_or_create(gateway.state.path)
    return {Route.PAGE: cast("Service", CaPageService(CaPage(ca.cert_pem)))}
