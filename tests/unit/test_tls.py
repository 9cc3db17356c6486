"""The TLS service over fake tunnel connections (one end of a loopback TCP connection, the
other end playing the peer's application) against local TLS origins with their own test CA."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.events
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection

from tests.helpers import TEST_CA_NAME, Pki, make_pki, until
from unclaw_tui.config import Settings
from unclaw_tui.decision import DecisionPoint
from unclaw_tui.engine import b64, unb64
from unclaw_tui.engine.outcomes import Refusal
from unclaw_tui.events import Event, HttpRequest, TcpClosed, TcpOpened, TlsHost
from unclaw_tui.flow import FlowRegistry
from unclaw_tui.router import Route, Router
from unclaw_tui.services import tls
from unclaw_tui.services.autopass import FILE as PASSTHROUGH_FILE
from unclaw_tui.services.autopass import AutoPassthrough
from unclaw_tui.services.ca import CA_CERT_FILE, CertificateAuthority
from unclaw_tui.services.egress import EgressPolicy
from unclaw_tui.services.tls import ClientTls, TlsService, valid_hostname
from unclaw_tui.state import StateDir

PEER_KEY = bytes(range(32))
VIP = "10.78.0.5"

# --- a test PKI (tests.helpers.make_pki): a CA, and leaves for the origins ---------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- origins -------------------------------------------------------------------------------------


@dataclass
class Origin:
    port: int
    server: asyncio.Server
    connections: int = 0
    alpn_seen: list[str | None] = field(default_factory=list)


async def _serve_origin(origin: Origin, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    origin.connections += 1
    ssl_obj = w.get_extra_info("ssl_object")
    alpn = ssl_obj.selected_alpn_protocol() if ssl_obj is not None else None
    origin.alpn_seen.append(alpn)
    try:
        if alpn == "h2":  # not really HTTP/2: an echo is enough to see bytes pass
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            return
        while True:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                return
            path = head.split(b" ")[1]
            body = b"hello from " + path
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        w.close()


async def start_origin(pair: tuple[Path, Path], alpn: list[str] | None = None) -> Origin:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pair)
    ctx.set_alpn_protocols(alpn or ["http/1.1"])
    origin = Origin(0, None)  # type: ignore[arg-type]
    server = await asyncio.start_server(
        lambda r, w: _serve_origin(origin, r, w), "127.0.0.1", 0, ssl=ctx
    )
    origin.server = server
    origin.port = server.sockets[0].getsockname()[1]
    return origin


# --- fakes: the gateway and the tunnel ---------------------------------------------------------


class FakeResolver:
    def __init__(self, names: dict[str, tuple[str, list[str]]], given_to: bytes = PEER_KEY) -> None:
        self.names = names  # vip -> (hostname, real addresses)
        self.given_to = given_to  # the peer our DNS gave these VIPs to

    def hostname_for_vip(self, ip: str, peer: bytes | None = None) -> str | None:
        entry = self.names.get(ip)
        return entry[0] if entry and peer in (None, self.given_to) else None

    async def resolve(self, hostname: str) -> list[str]:
        for name, addresses in self.names.values():
            if name == hostname:
                return addresses
        return []


class FakeGateway:
    def __init__(self, state_dir: Path, **settings: Any) -> None:
        self.settings = Settings(state_dir=state_dir, **settings)
        self.state = StateDir(state_dir)
        self.policy = EgressPolicy(allow=["127.0.0.0/8"], host_addresses=[])
        self.decisions = DecisionPoint(Router(), self.policy)
        self.flows = FlowRegistry(self.publish, self.peer_name)
        self.resolver: FakeResolver | None = None
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def peer_name(self, public_key: bytes) -> str:
        return "phone"

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class FakeTcpConn:
    """TcpConn per the flow contract, over one end of a loopback connection."""

    can_splice = False  # Python\'s pump carries it

    def __init__(
        self,
        dst: tuple[str, int],
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        conn_id: int,
    ) -> None:
        self.conn_id = conn_id
        self.peer_public_key = PEER_KEY
        self.peer_ip = "10.77.0.2"
        self.src_port = 40000 + conn_id
        self.dst_ip, self.dst_port = dst
        self.reader, self.writer = streams
        self.accepted = self.aborted = False

    def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert not self.accepted
        self.accepted = True
        return self.reader, self.writer

    def reject(self) -> None:
        self.abort()

    def abort(self) -> None:
        self.aborted = True
        self.writer.transport.abort()


class Harness:
    """The service plus a loopback 'tunnel': each connection to it becomes a FakeTcpConn to
    `dst` handled by the service."""

    def __init__(self, gateway: FakeGateway, service: TlsService) -> None:
        self.gateway = gateway
        self.service = service
        self.dst: tuple[str, int] = ("127.0.0.1", 9)
        self.peer_key = PEER_KEY  # whose connections open() makes
        self.tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self._ids = iter(range(1, 10_000))
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            conn = FakeTcpConn(self.dst, (r, w), next(self._ids))
            conn.peer_public_key = self.peer_key
            flow = self.gateway.flows.tcp(conn, route="tls")
            self.tasks.append(self.gateway.flows.serve(flow, self.service.handle_tcp(flow)))

        self._server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def settle(self) -> None:
        """Wait until every connection so far has been handled to its end."""
        await asyncio.wait_for(asyncio.gather(*self.tasks), 15)

    async def open(
        self, ctx: ssl.SSLContext | None, server_hostname: str | None = "example.test"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                self.port,
                ssl=ctx,
                server_hostname=server_hostname if ctx is not None else None,
            ),
            10,
        )

    def check_flow_pairs(self) -> None:
        opened = self.gateway.of(TcpOpened)
        closed = self.gateway.of(TcpClosed)
        assert sorted(e.conn_id for e in opened) == sorted(e.conn_id for e in closed)
        assert len({e.conn_id for e in opened}) == len(opened) == len(self.tasks)
        assert all(e.route == "tls" for e in opened + closed)
        assert self.gateway.flows.total == 0

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def make_harness(tmp_path: Path, pki: Pki) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def make(**settings: Any) -> Harness:
        state = tmp_path / "state"
        state.mkdir(mode=0o700, exist_ok=True)
        gateway = FakeGateway(state, **settings)
        ca = CertificateAuthority.load_or_create(state)

        def upstream(alpn: tuple[str, ...]) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(pki.ca_file))
            if alpn:
                ctx.set_alpn_protocols(list(alpn))
            return ctx

        service = TlsService(gateway, ca, upstream_context=upstream, hello_timeout=1.0)
        harness = Harness(gateway, service)
        await harness.start()
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.close()


def our_ca_context(h: Harness, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(h.gateway.state.path / CA_CERT_FILE))
    ctx.set_alpn_protocols(alpn or ["http/1.1"])
    return ctx


def trusting_test_ca(pki: Pki) -> ssl.SSLContext:
    """A client that trusts the origins' test CA only (not ours)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def blocking_handshake(port: int, ctx: ssl.SSLContext) -> None:
    """A handshake from a blocking ssl socket, which (unlike asyncio's) sends its alert when it
    rejects the certificate."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="example.test"),
    ):
        pass


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    assert head.startswith(b"HTTP/1.1 200 ")
    return body


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 5)


def peer_cert_issuer(writer: asyncio.StreamWriter) -> str:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value  # type: ignore[return-value]


# --- tests ---------------------------------------------------------------------------------------


def test_create_makes_the_ca_and_the_tls_route(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir(mode=0o700)
    services = tls.create(FakeGateway(state))  # type: ignore[arg-type]
    assert list(services) == [Route.TLS]
    assert (state / CA_CERT_FILE).exists()


def test_valid_hostname() -> None:
    assert valid_hostname("example.test")
    assert valid_hostname("a_b.example-1.test")
    assert not valid_hostname("bad host")
    assert not valid_hostname("-x.test")
    assert not valid_hostname("a" * 64 + ".test")


async def test_intercept_with_http_events(make_harness: Any, pki: Pki) -> None:
    h: Harness = await make_harness()
    origin = await start_origin(pki.trusted)
    h.dst = ("127.0.0.1", origin.port)
    reader, writer = await h.open(our_ca_context(h, ["h2", "http/1.1"]))
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert peer_cert_issuer(writer).startswith("unclaw-tui local CA")
    assert await http_get(reader, writer, "/first") == b"hello from /first"
    assert await http_get(reader, writer, "/second?q=1") == b"hello from /second?q=1"
    await close_writer(writer)
    await h.settle()
    origin.server.close()

    assert origin.alpn_seen == ["http/1.1"]
    (tls_event,) = h.gateway.of(TlsHost)
    assert (tls_event.sni, tls_event.mode, tls_event.ok, tls_event.alpn) == (
        "example.test",
        "intercepted",
        True,
        "http/1.1",
    )
    requests = h.gateway.of(HttpRequest)
    assert [(r.method, r.host, r.path, r.status, r.bytes) for r in requests] == [
        ("GET", "example.test", "/first", 200, len(b"hello from /first")),
        ("GET", "example.test", "/second?q=1", 200, len(b"hello from /second?q=1")),
    ]
    assert all(r.peer == "phone" and r.ms >= 0 for r in requests)
    (opened,) = h.gateway.of(TcpOpened)
    assert opened.hostname == "example.test"
    # TLS and HTTP events name the connection they came on, and who made it.
    assert (tls_event.conn_id, tls_event.peer_public_key, tls_event.dst_ip) == (
        opened.conn_id, opened.peer_public_key, opened.dst_ip)  # fmt: skip
    assert tls_event.dst_port == opened.dst_port
    assert {(r.conn_id, r.peer_public_key) for r in requests} == {
        (opened.conn_id, opened.peer_public_key)}  # fmt: skip
    (closed,) = h.gateway.of(TcpClosed)
    assert closed.error is None and closed.bytes_down > 0 and closed.bytes_up > 0
    h.check_flow_pairs()


async def test_h2_to_a_destination_speaking_something_else_ends_with_a_reason(
    make_harness: Any, pki: Pki
) -> None:
    """ALPN said h2 but the origin only echoes: its "frames" (our own preface) are malformed,
    so the connection ends with GOAWAY and says why; the stream in flight is reported cut."""
    h: Harness = await make_harness()
    origin = await start_origin(pki.trusted, ["h2", "http/1.1"])
    h.dst = ("127.0.0.1", origin.port)
    reader, writer = await h.open(our_ca_context(h, ["h2", "http/1.1"]))
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    conn = H2Connection(H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", "example.test"), (":path", "/")],
        end_stream=True,
    )
    writer.write(conn.data_to_send())
    seen: list[Any] = []
    while data := await asyncio.wait_for(reader.read(65536), 10):
        seen += conn.receive_data(data)
    await close_writer(writer)
    await h.settle()
    origin.server.close()
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in seen)
    (closed,) = h.gateway.of(TcpClosed)
    assert closed.error.startswith("destination: h2 protocol error"), closed.error
    (request,) = h.gateway.of(HttpRequest)
    assert (request.protocol, request.stream_id, request.status) == ("h2", 1, None)
    assert request.error == closed.error
    h.check_flow_pairs()


async def test_passthrough_relays_the_origin_certificate(make_harness: Any, pki: Pki) -> None:
    h: Harness = await make_harness(passthrough=["*.test"])
    origin = await start_origin(pki.trusted)
    h.dst = ("127.0.0.1", origin.port)
    reader, writer = await h.open(trusting_test_ca(pki))
    assert peer_cert_issuer(writer) == TEST_CA_NAME
    assert await http_get(reader, writer, "/p") == b"hello from /p"
    await close_writer(writer)
    await h.settle()
    origin.server.close()
    (event,) = h.gateway.of(TlsHost)
    assert (event.sni, event.mode, event.ok, event.alpn) == (
        "example.test",
        "passthrough",
        True,
        "http/1.1",
    )
    assert h.gateway.of(HttpRequest) == []  # encrypted: nothing to see
    h.check_flow_pairs()


async def test_untrusted_upstream_closes_the_client(make_harness: Any, pki: Pki) -> None:
    h: Harness = await make_harness()
    origin = await start_origin(pki.untrusted)
    h.dst = ("127.0.0.1", origin.port)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await h.open(our_ca_context(h))
    await h.settle()
    origin.server.close()
    (event,) = h.gateway.of(TlsHost)
    assert event.mode == "intercepted" and not event.ok
    assert event.error is not None and "upstream certificate rejected" in event.error
    assert "unable to get local issuer certificate" in event.error
    (closed,) = h.gateway.of(TcpClosed)
    assert closed.error == event.error
    h.check_flow_pairs()


def add_peers(h: Harness, *names: str) -> list[bytes]:
    """Peers in the state dir (as the gateway has them); their public keys."""
    settings = h.gateway.settings
    return [
        unb64(
            h.gateway.state.add_peer(
                n, None, settings.tunnel_network, settings.gateway_ip
            ).public_key
        )
        for n in names
    ]


async def test_client_rejecting_our_ca_then_auto_passthrough_for_that_peer_only(
    make_harness: Any, pki: Pki
) -> None:
    h: Harness = await make_harness(auto_passthrough=True)
    phone, laptop = add_peers(h, "phone", "laptop")
    h.peer_key = phone
    origin = await start_origin(pki.trusted)
    h.dst = ("127.0.0.1", origin.port)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(blocking_handshake, h.port, trusting_test_ca(pki))
    await h.settle()
    (first,) = h.gateway.of(TlsHost)
    assert first.mode == "intercepted" and not first.ok
    assert first.error == "client rejected our certificate (unknown ca)"
    assert h.service.auto_passthrough.hosts(phone) == ["example.test"]

    # From then on the host is passed through for that peer: the same client now succeeds.
    reader, writer = await h.open(trusting_test_ca(pki))
    assert peer_cert_issuer(writer) == TEST_CA_NAME
    assert await http_get(reader, writer, "/again") == b"hello from /again"
    await close_writer(writer)
    await h.settle()
    second = h.gateway.of(TlsHost)[1]
    assert (second.mode, second.ok) == ("passthrough", True)

    # Another peer's connection to the host is still intercepted (it failed when the list was
    # one for every peer: one peer switched interception off for all).
    h.peer_key = laptop
    reader, writer = await h.open(our_ca_context(h))
    assert peer_cert_issuer(writer) != TEST_CA_NAME
    await close_writer(writer)
    await h.settle()
    origin.server.close()
    third = h.gateway.of(TlsHost)[2]
    assert (third.mode, third.ok) == ("intercepted", True)
    h.check_flow_pairs()

    # Remembered across a restart, per peer: the list is in the state dir (0600), and a new
    # service with auto-passthrough on starts with it.
    saved = h.gateway.state.path / PASSTHROUGH_FILE
    await until(saved.exists, "the passthrough list saved (the write runs off the loop)")
    assert json.loads(saved.read_text()) == {"version": 2, "peers": {b64(phone): ["example.test"]}}
    assert saved.stat().st_mode & 0o777 == 0o600
    again = TlsService(h.gateway, h.service.ca)  # type: ignore[arg-type]
    assert again.is_passthrough("example.test", phone)
    assert not again.is_passthrough("example.test", laptop)
    assert not again.is_passthrough("other.test", phone)


async def test_auto_passthrough_list_of_one_global_file_goes_to_every_existing_peer(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness()
    phone, laptop = add_peers(h, "phone", "laptop")
    h.gateway.state.write_json(PASSTHROUGH_FILE, {"hosts": ["pinned.test", 7]})
    h.gateway.settings.auto_passthrough = True
    service = TlsService(h.gateway, h.service.ca)  # type: ignore[arg-type]
    assert service.is_passthrough("pinned.test", phone)
    assert service.is_passthrough("pinned.test", laptop)
    assert not service.is_passthrough("pinned.test", bytes(32))  # a peer added later
    await service.close()  # writes the new form
    doc = json.loads((h.gateway.state.path / PASSTHROUGH_FILE).read_text())
    assert doc == {
        "version": 2,
        "peers": {b64(phone): ["pinned.test"], b64(laptop): ["pinned.test"]},
    }


def test_auto_passthrough_is_bounded_per_peer() -> None:
    auto = AutoPassthrough(per_peer=3)
    a, b = b"a" * 32, b"b" * 32
    auto.add(b, "kept.test")
    for i in range(5):
        auto.add(a, f"h{i}.test")
    auto.add(a, "h2.test")  # rejected again: most recent
    assert auto.hosts(a) == ["h3.test", "h4.test", "h2.test"]
    assert auto.hosts(b) == ["kept.test"]  # one peer's hosts never push another's out
    restored = AutoPassthrough(per_peer=3)
    problems = restored.load(
        {**auto.to_json(), "peers": {**auto.to_json()["peers"], "bad": []}}, [a]
    )
    assert restored.hosts(a) == auto.hosts(a) and restored.hosts(b) == []  # b no longer exists
    assert problems == ["not a public key: 'bad'"]


async def test_client_rejection_without_auto_passthrough_stays_intercepted(
    make_harness: Any, pki: Pki
) -> None:
    h: Harness = await make_harness()
    origin = await start_origin(pki.trusted)
    h.dst = ("127.0.0.1", origin.port)
    for _ in range(2):
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(blocking_handshake, h.port, trusting_test_ca(pki))
        await h.settle()
    origin.server.close()
    events = h.gateway.of(TlsHost)
    assert [(e.mode, e.error) for e in events] == [
        ("intercepted", "client rejected our certificate (unknown ca)")
    ] * 2
    assert not h.service.auto_passthrough.hosts(PEER_KEY)
    h.check_flow_pairs()


async def test_client_closing_after_our_certificate_counts_as_rejection(
    make_harness: Any, pki: Pki
) -> None:
    """A client that hangs up instead of sending an alert (some pinning apps)."""
    h: Harness = await make_harness(auto_passthrough=True)
    origin = await start_origin(pki.trusted)
    h.dst = ("127.0.0.1", origin.port)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="example.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    reader, writer = await h.open(None)
    writer.write(outgoing.read())
    # Wait for the server's flight (with our certificate), then close without a word.
    assert await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    await h.settle()
    origin.server.close()
    (event,) = h.gateway.of(TlsHost)
    assert (
        event.error
        == "client rejected our certificate (closed the connection after our certificate)"
    )
    assert h.service.auto_passthrough.hosts(PEER_KEY) == ["example.test"]
    h.check_flow_pairs()


async def test_vip_without_sni_uses_the_vip_hostname(make_harness: Any, pki: Pki) -> None:
    h: Harness = await make_harness()
    origin = await start_origin(pki.trusted)
    h.gateway.resolver = FakeResolver({VIP: ("example.test", ["127.0.0.1"])})
    h.dst = (VIP, origin.port)
    ctx = our_ca_context(h)
    ctx.check_hostname = False  # no SNI sent; the leaf's name is checked below
    reader, writer = await h.open(ctx, server_hostname=None)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["example.test"]
    assert await http_get(reader, writer, "/vip") == b"hello from /vip"
    await close_writer(writer)
    await h.settle()
    origin.server.close()
    (event,) = h.gateway.of(TlsHost)
    assert (event.sni, event.ok) == ("", True)
    (opened,) = h.gateway.of(TcpOpened)
    assert (opened.hostname, opened.dst_ip) == ("example.test", VIP)
    (request,) = h.gateway.of(HttpRequest)
    assert request.path == "/vip"
    h.check_flow_pairs()


async def test_a_vip_given_to_another_peer_is_refused_before_the_hello(
    make_harness: Any, pki: Pki
) -> None:
    # Fails before: the VIP's hostname was looked up for any peer, so a hello without SNI to
    # another peer's VIP got a certificate for that peer's host (and a connection to it).
    h: Harness = await make_harness()
    origin = await start_origin(pki.trusted)
    h.gateway.resolver = FakeResolver({VIP: ("example.test", ["127.0.0.1"])}, given_to=bytes(32))
    h.dst = (VIP, origin.port)
    ctx = our_ca_context(h)
    ctx.check_hostname = False
    with pytest.raises((ConnectionError, ssl.SSLError)):
        reader, _writer = await h.open(ctx, server_hostname=None)
        await asyncio.wait_for(reader.read(1), 5)  # the RST may come after the handshake
    await h.settle()
    origin.server.close()
    assert origin.connections == 0 and h.gateway.of(TlsHost) == []
    (closed,) = h.gateway.of(TcpClosed)
    assert (closed.dst_ip, closed.hostname, closed.error) == (
        VIP, None, Refusal.VIP_NOT_GIVEN.says())  # fmt: skip
    h.check_flow_pairs()


async def test_policy_refusal_is_rejected(make_harness: Any, pki: Pki) -> None:
    h: Harness = await make_harness()
    h.gateway.decisions = DecisionPoint(Router(), EgressPolicy(host_addresses=[]))  # as default
    origin = await start_origin(pki.trusted)
    h.dst = ("127.0.0.1", origin.port)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await h.open(our_ca_context(h))
    await h.settle()
    origin.server.close()
    (event,) = h.gateway.of(TlsHost)
    assert event.mode == "rejected" and event.error is not None
    assert event.error.startswith("refused by egress policy")
    assert origin.connections == 0
    h.check_flow_pairs()


def client_hello(server_hostname: str) -> bytes:
    """A real ClientHello, as a TLS client's first flight."""
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


class PlainOrigin:
    """A TCP server that records its connections; the first `close_first` are closed at once,
    the others echo."""

    def __init__(self, close_first: int = 0) -> None:
        self.close_first = close_first
        self.accepted = 0
        self.first_accepted = asyncio.Event()
        self.first_ended = asyncio.Event()
        self.received: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        number = self.accepted
        self.first_accepted.set()
        try:
            if number <= self.close_first:
                return
            received = b""
            while data := await r.read(65536):
                received += data
                w.write(data)
                await w.drain()
            self.received.append(received)
        except ConnectionError:
            pass
        finally:
            w.close()
            if number == 1:
                with contextlib.suppress(ConnectionError):
                    await w.wait_closed()  # the socket is closed: its FIN is sent
                self.first_ended.set()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on (bound, never listening: connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("passthrough", "mode", "error"),
    [
        (False, "intercepted", "upstream: connection refused"),
        (True, "passthrough", "connection refused"),
    ],
)
async def test_a_refused_destination_closes_the_client(
    make_harness: Any, closed_port: int, passthrough: bool, mode: str, error: str
) -> None:
    h: Harness = await make_harness(passthrough=["*.test"] if passthrough else [])
    h.dst = ("127.0.0.1", closed_port)
    reader, writer = await h.open(None)
    writer.write(client_hello("example.test"))
    assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing sent back
    await close_writer(writer)
    await h.settle()
    (event,) = h.gateway.of(TlsHost)
    assert (event.mode, event.ok, event.error) == (mode, False, error)
    (closed,) = h.gateway.of(TcpClosed)
    assert closed.error == error
    h.check_flow_pairs()


async def test_the_destination_is_connected_while_the_hello_arrives(
    make_harness: Any, pki: Pki
) -> None:
    """The connect to the destination does not wait for the ClientHello; a connection that
    turns out not to be TLS closes it again without a byte sent."""
    h: Harness = await make_harness()
    origin = PlainOrigin()
    await origin.start()
    h.dst = ("127.0.0.1", origin.port)
    reader, writer = await h.open(None)
    await asyncio.wait_for(origin.first_accepted.wait(), 5)  # nothing sent yet
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    await asyncio.wait_for(origin.first_ended.wait(), 5)
    await close_writer(writer)
    await h.settle()
    origin.close()
    assert origin.received == [b""]  # connected, closed, never written to
    (event,) = h.gateway.of(TlsHost)
    assert event.mode == "rejected" and event.error is not None
    assert event.error.startswith("not a TLS ClientHello")
    h.check_flow_pairs()


async def test_an_early_connection_the_destination_closed_is_opened_again(
    make_harness: Any, pki: Pki
) -> None:
    """The destination closes the connection made while the client was still silent; the
    hello, when it comes, goes to a new one."""
    h: Harness = await make_harness(passthrough=["*.test"])
    origin = PlainOrigin(close_first=1)
    await origin.start()
    h.dst = ("127.0.0.1", origin.port)
    reader, writer = await h.open(None)
    # Closed, so its FIN is in the gateway's socket (loopback delivers it within the close).
    await asyncio.wait_for(origin.first_ended.wait(), 5)
    hello = client_hello("pass.example.test")
    writer.write(hello)
    assert await asyncio.wait_for(reader.readexactly(len(hello)), 10) == hello  # echoed
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    await close_writer(writer)
    await h.settle()
    origin.close()
    assert origin.accepted == 2 and origin.received == [hello]
    (event,) = h.gateway.of(TlsHost)
    assert (event.mode, event.ok, event.sni) == ("passthrough", True, "pass.example.test")
    (closed,) = h.gateway.of(TcpClosed)
    assert (closed.bytes_up, closed.bytes_down, closed.error) == (len(hello), len(hello), None)
    h.check_flow_pairs()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n", "not a TLS handshake record"),
        (os.urandom(64).replace(b"\x16", b"\x00"), "not a TLS handshake record"),
        ("truncated", "truncated"),
        (b"", "closed before sending anything"),
    ],
)
async def test_garbage_is_closed_cleanly(
    make_harness: Any, pki: Pki, payload: bytes | str, reason: str
) -> None:
    h: Harness = await make_harness()
    origin = await start_origin(pki.trusted)
    h.dst = ("127.0.0.1", origin.port)
    if payload == "truncated":
        data = client_hello("x.test")
        payload = data[: len(data) // 2]
    assert isinstance(payload, bytes)
    reader, writer = await h.open(None)
    writer.write(payload)
    writer.write_eof()
    # A clean close: EOF (FIN), not a reset, and nothing sent back.
    assert await asyncio.wait_for(reader.read(), 10) == b""
    await close_writer(writer)
    await h.settle()
    (event,) = h.gateway.of(TlsHost)
    assert (event.mode, event.ok, event.sni) == ("rejected", False, "")
    assert event.error is not None and reason in event.error
    assert origin.connections == 0

    # ... and the service keeps serving others.
    reader, writer = await h.open(our_ca_context(h))
    assert await http_get(reader, writer, "/next") == b"hello from /next"
    await close_writer(writer)
    await h.settle()
    origin.server.close()
    assert h.gateway.of(TlsHost)[1].ok
    h.check_flow_pairs()


async def test_slow_client_times_out(make_harness: Any, pki: Pki) -> None:
    h: Harness = await make_harness()  # hello_timeout 1 s in the harness
    reader, writer = await h.open(None)
    writer.write(b"\x16\x03\x01\x02\x00\x01")  # a hello's start, then silence
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert loop.time() - started < 3
    await close_writer(writer)
    await h.settle()
    (event,) = h.gateway.of(TlsHost)
    assert event.error == "not a TLS ClientHello: incomplete within 1 s"
    h.check_flow_pairs()


async def test_cancel_still_closes_the_flow(make_harness: Any, pki: Pki) -> None:
    h: Harness = await make_harness()
    _reader, writer = await h.open(None)
    await until(
        lambda: (
            bool(h.tasks)
            and inspect.getcoroutinestate(h.tasks[0].get_coro()) == inspect.CORO_SUSPENDED
        ),
        "the connection's handler waiting for the hello",
    )
    h.tasks[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await h.tasks[0]
    (closed,) = h.gateway.of(TcpClosed)
    assert closed.error == "cancelled"
    await close_writer(writer)
    h.check_flow_pairs()


# --- ClientTls over memory-connected streams ------------------------------------------------------


async def test_client_tls_half_close_keeps_reading(make_harness: Any, pki: Pki) -> None:
    """write_eof sends close_notify + FIN, and the client's later bytes still arrive."""
    h: Harness = await make_harness()
    ca = h.service.ca
    server_side: asyncio.Future[ClientTls] = asyncio.get_running_loop().create_future()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        side = ClientTls(r, w, ca.server_context("example.test", None))
        await side.handshake()
        server_side.set_result(side)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ctx = our_ca_context(h)
    raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", port)
    # A client on memory BIOs too, so it can keep writing after the server's close_notify.
    ci, co = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(ci, co, server_hostname="example.test")
    while True:
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw_writer.write(co.read())
            ci.write(await asyncio.wait_for(raw_reader.read(65536), 5))
    raw_writer.write(co.read())
    side = await asyncio.wait_for(server_side, 5)
    side.write(b"response")
    side.write_eof()
    got = b""
    while True:
        try:
            got += client.read(100)
        except ssl.SSLWantReadError:
            ci.write(await asyncio.wait_for(raw_reader.read(65536), 5))
            continue
        except ssl.SSLZeroReturnError:
            break
        if got == b"response":
            with contextlib.suppress(ssl.SSLWantReadError):
                client.read(100)
            break
    assert got == b"response"
    client.write(b"late request bytes")
    raw_writer.write(co.read())
    assert await asyncio.wait_for(side.read(), 5) == b"late request bytes"
    raw_writer.close()
    assert await asyncio.wait_for(side.read(), 5) == b""
    side.close()
    server.close()
