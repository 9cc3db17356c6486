"""WebSocket inside intercepted TLS, end to end: a `websockets` client in the client
namespace, through wireguard-go and the gateway, to a `websockets` server on the test host;
the request reported as "ws" with status 101, one `websocket_closed` event with the counts
and the close; the same through a client offering h2 to an origin that speaks HTTP/1.1 only;
and `unclaw-tui requests --har -` asking the running gateway for them.

Certificates as in test_h2.py: the origin's from the test CA (trusted by the gateway through
SSL_CERT_FILE), the client trusting the gateway's CA.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.helpers import make_pki
from tests.interop.harness import HOST_ADDR, FlowsSetup, run_json
from tests.interop.test_h2 import bring_up_tls
from tests.interop.ws_hosts import BINARY

pytestmark = pytest.mark.interop

PORT = 443


def closed_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "websocket_closed"]


def test_websocket_messages_counts_and_close_through_the_tunnel(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    cert, key = pki.trusted
    s.start_module_in(
        s.internet, "tests.interop.ws_hosts", "serve", "--port", str(PORT),
        "--cert", str(cert), "--key", str(key), "--alpn", "http/1.1", what="WebSocket server",
    )  # fmt: skip
    gw, our_ca = bring_up_tls(s, pki)

    expected = {"got": ["hello", ["bytes", True], "bye"], "close": [4000, "done here"]}
    # A client offering h2 first: the origin chose http/1.1, and so does the gateway.
    result = run_json(
        s, s.client_ns, "tests.interop.ws_hosts", "client", HOST_ADDR, str(PORT),
        "--ca", str(our_ca), "--alpn", "h2", "--alpn", "http/1.1",
    )  # fmt: skip
    assert result == {**expected, "alpn": "http/1.1"}
    request = gw.wait_event(
        lambda e: e["type"] == "http_request" and e["path"] == "/chat?room=7", 10, "ws request"
    )
    assert (request["protocol"], request["status"], request["method"]) == ("ws", 101, "GET")
    closed = gw.wait_event(lambda e: e["type"] == "websocket_closed", 10, "websocket_closed")
    assert (closed["messages_up"], closed["messages_down"]) == (3, 3)
    size = len("hello") + len(BINARY) + len("bye")
    # websockets compresses (permessage-deflate) by default: the wire bytes are fewer.
    assert 0 < closed["bytes_up"] <= size and 0 < closed["bytes_down"] <= size
    assert (closed["close_code"], closed["close_reason"], closed["closed_by"]) == (
        4000, "done here", "destination")  # fmt: skip
    assert closed["error"] is None and closed["conn_id"] == request["conn_id"]
    assert closed["host"] == "example.test" and closed["path"] == "/chat?room=7"
    tls = [e for e in gw.drain() if e["type"] == "tls_host" and e.get("ok")]
    assert tls and tls[0]["alpn"] == "http/1.1"

    # A client without ALPN.
    result = run_json(
        s, s.client_ns, "tests.interop.ws_hosts", "client", HOST_ADDR, str(PORT),
        "--ca", str(our_ca),
    )  # fmt: skip
    assert result == {**expected, "alpn": None}
    gw.wait_event(lambda e: e["type"] == "websocket_closed", 10, "second websocket_closed")

    # The CLI asks the running gateway: both upgrades, as HAR, with their WebSocket counts.
    har = json.loads(s.cli("requests", "--har", "-").stdout)
    entries = [e for e in har["log"]["entries"] if e["_protocol"] == "ws"]
    assert len(entries) == 2
    assert {e["request"]["url"] for e in entries} == {"wss://example.test/chat?room=7"}
    assert all(e["response"]["status"] == 101 for e in entries)
    assert [e["_webSocket"]["messages_up"] for e in entries] == [3, 3]
    assert gw.proc.poll() is None
