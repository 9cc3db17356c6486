"""HTTP/2 and gRPC inside intercepted TLS, end to end: real clients (curl --http2, nghttp,
grpcio, raw h2 clients) in the client namespace, through wireguard-go and the gateway, to real
origins (nghttpd, a grpcio server, the HTTP/1.1-only test host) on the test host.

The origins' certificates come from the test CA (tests.helpers.make_pki), which the gateway
trusts through SSL_CERT_FILE; the clients trust the gateway's CA. curl resolves the name with
--resolve; nghttp through the client namespace's own hosts file (/etc/netns/<ns>/hosts, which
`ip netns exec` mounts over /etc/hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import HOSTNAME, Pki, bring_up, make_pki, until
from tests.interop.harness import (
    HOST_ADDR,
    FlowsSetup,
    GatewayProcess,
    run_json,
    thread_in_namespace,
    wait_for,
)
from tests.interop.test_tls import start_tls_host
from unclaw_tui import config
from unclaw_tui.gateway import Gateway
from unclaw_tui.services import inspector
from unclaw_tui.services.h2relay import DEFAULT_CONNECTION_WINDOW, DEFAULT_MAX_STREAMS, H2Relay

pytestmark = pytest.mark.interop

PORT = 443
H1_PORT = 8443
HELLO = b"hello over h2\n"


def http_events(events: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["type"] == "http_request" and all(e.get(k) == v for k, v in fields.items())
    ]


def bring_up_tls(s: FlowsSetup, pki: Pki) -> tuple[GatewayProcess, Path]:
    """The gateway trusting the test CA upstream, a client; our CA's path."""
    our_ca = Path(s.cli("ca", "--path").stdout.strip())
    gw, _ = bring_up(s, env={"SSL_CERT_FILE": str(pki.ca_file)})
    return gw, our_ca


def start_nghttpd(s: FlowsSetup, pair: tuple[Path, Path], docroot: Path) -> None:
    cert, key = pair
    s.topo.spawn(
        s.internet, "nghttpd", "-d", str(docroot), str(PORT), str(key), str(cert),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_for(
        lambda: (
            s.internet.run("sh", "-c", f"ss -ltn | grep -q ':{PORT} '", check=False).returncode == 0
        ),
        "nghttpd listening",
        10,
    )


@contextlib.contextmanager
def hosts_file(s: FlowsSetup) -> Iterator[None]:
    """example.test at the test host for every program in the client namespace."""
    directory = Path("/etc/netns") / s.client_ns.name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hosts").write_text(f"127.0.0.1 localhost\n{HOST_ADDR} {HOSTNAME}\n")
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def docroot(s: FlowsSetup) -> Path:
    root = s.topo.tmp / "htdocs"
    root.mkdir()
    (root / "hello").write_bytes(HELLO)
    for name in ("a", "b", "c"):
        (root / name).write_bytes(name.encode() * 1000)
    os.chmod(root, 0o755)
    return root


def test_curl_nghttp_limits_and_malformed_frames(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    start_nghttpd(s, pki.trusted, docroot(s))
    gw, our_ca = bring_up_tls(s, pki)

    # curl --http2: one stream, one event with the status and the size.
    res = s.curl(
        "--http2", "--max-time", "15", "--cacert", str(our_ca),
        "--resolve", f"{HOSTNAME}:{PORT}:{HOST_ADDR}", "-w", "\n%{http_version} %{http_code}",
        f"https://{HOSTNAME}/hello",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout == HELLO.decode() + "\n2 200"
    tls = gw.wait_event(lambda e: e["type"] == "tls_host" and e.get("ok"), 10, "tls_host")
    assert tls["alpn"] == "h2" and tls["mode"] == "intercepted"
    event = gw.wait_event(lambda e: e["type"] == "http_request", 10, "http_request")
    assert (event["protocol"], event["stream_id"], event["method"], event["host"]) == (
        "h2", 1, "GET", HOSTNAME,
    )  # fmt: skip
    assert (event["path"], event["status"], event["bytes"], event["error"]) == (
        "/hello", 200, len(HELLO), None,
    )  # fmt: skip

    # nghttp: three requests on one connection, one event per stream.
    with hosts_file(s):
        res = s.client_ns.run(
            "nghttp", "-n", "-s", "--no-dep", "--timeout=15",
            *(f"https://{HOSTNAME}/{p}" for p in ("a", "b", "c")),
            check=False, timeout=40,
        )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("a", "b", "c"):
        e = gw.wait_event(
            lambda e, n=name: e["type"] == "http_request" and e["path"] == f"/{n}", 10, name
        )
        assert (e["protocol"], e["status"], e["bytes"]) == ("h2", 200, 1000), e
    conns = {e["conn_id"] for e in http_events(gw.drain()) if e["path"] in ("/a", "/b", "/c")}
    streams = {e["stream_id"] for e in http_events(gw.drain()) if e["path"] in ("/a", "/b", "/c")}
    assert len(conns) == 1 and len(streams) == 3

    # A client ignoring the advertised stream limit: the streams past it are refused, the
    # others complete.
    extra = 20
    result = run_json(
        s, s.client_ns, "tests.interop.h2_hosts", "flood", HOST_ADDR, str(PORT),
        "--ca", str(our_ca), "--streams", str(DEFAULT_MAX_STREAMS + extra), "--path", "/a",
    )  # fmt: skip
    assert result["advertised"] == DEFAULT_MAX_STREAMS
    assert len(result["refused"]) == extra, result
    assert len(result["completed"]) == DEFAULT_MAX_STREAMS, result
    flood_conn = lambda: {e["conn_id"] for e in http_events(gw.drain(), path="/a")} - conns  # noqa: E731

    def flood_events() -> list[dict[str, Any]]:
        ids = flood_conn()
        return [e for e in http_events(gw.drain(), path="/a") if e["conn_id"] in ids]

    wait_for(lambda: len(flood_events()) == DEFAULT_MAX_STREAMS + extra, "an event per stream", 15)
    refused = [e for e in flood_events() if (e["error"] or "").startswith("refused")]
    assert len(refused) == extra and all(e["status"] is None for e in refused)

    # Malformed frames: that connection ends with GOAWAY(PROTOCOL_ERROR) and an event; the
    # gateway goes on serving.
    result = run_json(
        s, s.client_ns, "tests.interop.h2_hosts", "malformed", HOST_ADDR, str(PORT),
        "--ca", str(our_ca),
    )  # fmt: skip
    assert result == {"first_ok": True, "goaway": 1, "ended": True}, result
    closed = gw.wait_event(
        lambda e: (
            e["type"] == "tcp_closed"
            and (e.get("error") or "").startswith("client: h2 protocol error")
        ),
        10,
        "the malformed connection's close",
    )
    assert closed["route"] == "tls"
    res = s.curl(
        "--http2", "--max-time", "15", "--cacert", str(our_ca),
        "--resolve", f"{HOSTNAME}:{PORT}:{HOST_ADDR}", f"https://{HOSTNAME}/hello",
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout == HELLO.decode(), res.stderr
    assert gw.proc.poll() is None


def test_grpc_and_an_http1_only_origin(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    cert, key = pki.trusted
    s.start_module_in(
        s.internet, "tests.interop.h2_hosts", "grpc-serve", "--port", str(PORT),
        "--cert", str(cert), "--key", str(key), what="gRPC server",
    )  # fmt: skip
    start_tls_host(s, H1_PORT, pki.trusted)
    gw, our_ca = bring_up_tls(s, pki)

    result = run_json(
        s, s.client_ns, "tests.interop.h2_hosts", "grpc-call", HOST_ADDR, str(PORT),
        "--ca", str(our_ca),
    )  # fmt: skip
    assert result == {
        "unary": "echo:hi",
        "fail": [5, "no such thing: x"],
        "stream": [f"item {i}" for i in range(5)],
    }
    unary = gw.wait_event(
        lambda e: e["type"] == "http_request" and e["path"] == "/test.Echo/Unary", 10, "unary"
    )
    assert (unary["protocol"], unary["status"], unary["grpc_status"]) == ("h2", 200, 0)
    assert unary["request_bytes"] == 5 + 2 and unary["bytes"] == 5 + len("echo:hi")
    fail = gw.wait_event(
        lambda e: e["type"] == "http_request" and e["path"] == "/test.Echo/Fail", 10, "fail"
    )
    assert (fail["grpc_status"], fail["grpc_message"]) == (5, "no such thing: x")
    count = gw.wait_event(
        lambda e: e["type"] == "http_request" and e["path"] == "/test.Echo/Count", 10, "count"
    )
    assert count["grpc_status"] == 0
    assert count["bytes"] == sum(5 + len(f"item {i}") for i in range(5))

    # An HTTP/1.1-only origin and a client offering h2: ALPN settles on http/1.1 both ways.
    res = s.curl(
        "--http2", "--max-time", "15", "--cacert", str(our_ca),
        "--resolve", f"{HOSTNAME}:{H1_PORT}:{HOST_ADDR}", "-w", "\n%{http_version}",
        f"https://{HOSTNAME}:{H1_PORT}/one",
    )  # fmt: skip
    assert res.returncode == 0 and res.stdout == "hello from /one\n\n1.1", res.stderr
    h1 = gw.wait_event(
        lambda e: e["type"] == "http_request" and e["path"] == "/one", 10, "http/1.1 event"
    )
    assert (h1["protocol"], h1["stream_id"], h1["status"]) == ("http/1.1", None, 200)
    tls = [e for e in gw.drain() if e["type"] == "tls_host" and e["dst_port"] == H1_PORT]
    assert tls and tls[0]["alpn"] == "http/1.1"


async def test_a_body_larger_than_the_windows_is_not_held_whole(
    flows_setup: FlowsSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway in this test's process (so the relay itself can be asked what it held):
    a 24 MiB download read slowly by the client goes through with at most the windows held."""
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    root = docroot(s)
    size = 24 << 20
    blob = os.urandom(size)
    (root / "big").write_bytes(blob)
    start_nghttpd(s, pki.trusted, root)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    relays: list[H2Relay] = []

    class Watched(H2Relay):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            relays.append(self)

    monkeypatch.setattr(inspector, "H2Relay", Watched)
    config_text = s.add_peer("phone")
    our_ca = Path(s.cli("ca", "--path").stdout.strip())
    out = s.topo.tmp / "big.out"
    with thread_in_namespace(s.gateway_ns.name):
        settings = config.Settings(
            state_dir=s.state_dir, listen_port=s.port, endpoint=f"{s.gateway_addr}:{s.port}"
        )
        gateway = Gateway(settings)
        await gateway.start()
        try:
            s.client(config_text)
            curl = await asyncio.create_subprocess_exec(
                *s.client_ns.cmd(
                    "curl", "-s", "--http2", "--max-time", "60", "--cacert", str(our_ca),
                    "--limit-rate", "8M", "--resolve", f"{HOSTNAME}:{PORT}:{HOST_ADDR}",
                    "-o", str(out), "-w", "%{http_code}", f"https://{HOSTNAME}/big",
                ),
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            status, _ = await asyncio.wait_for(curl.communicate(), 90)
            assert status == b"200"
            await until(lambda: len(gateway.requests()) == 1, "the request record")
        finally:
            await gateway.stop()
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(blob).digest()
    (record,) = gateway.requests()
    assert (record.protocol, record.status, record.response_bytes) == ("h2", 200, size)
    assert record.first_byte_ms is not None and record.done_ms > record.first_byte_ms
    (relay,) = relays
    # Never more than the windows each way, and far less than the body.
    assert 0 < relay.buffered_peak <= 2 * DEFAULT_CONNECTION_WINDOW, relay.buffered_peak
    assert relay.buffered_peak < size // 8 and relay.buffered == 0
