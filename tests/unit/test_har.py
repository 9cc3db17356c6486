"""The HAR 1.2 exporter and copy-as-curl: records of each protocol, the document checked
against HAR 1.2's required structure, secrets masked (revealed in curl only when asked),
curl lines that a shell splits back into the intended arguments."""

from __future__ import annotations

import base64
import json
import shlex
from typing import Any

from unclaw_tui.services.curl_command import curl_command
from unclaw_tui.services.har import dumps, har_log
from unclaw_tui.services.requests import MASK, RequestLog, RequestRecord, keep_headers
from unclaw_tui.services.websocket import WebSocketSummary

STARTED = 1_767_268_800.25  # 2026-01-01 12:00:00.250 UTC


def record(protocol: str = "http/1.1", **fields: Any) -> RequestRecord:
    request_headers = fields.pop("request_headers", [("host", "api.example.test")])
    response_headers = fields.pop("response_headers", [("content-type", "application/json")])
    r = RequestRecord(
        protocol=protocol,
        method=fields.pop("method", "GET"),
        scheme="https",
        authority="api.example.test",
        path=fields.pop("path", "/v1/items?q=a%20b&empty="),
        peer="phone",
        peer_public_key="cGhvbmU=",
        conn_id=7,
        status=fields.pop("status", 200),
        request_bytes=fields.pop("request_bytes", 0),
        response_bytes=fields.pop("response_bytes", 42),
        started_at=STARTED,
        sent_ms=1.5,
        first_byte_ms=10.0,
        done_ms=12.25,
        **fields,
    )
    r.request_headers, _ = keep_headers(request_headers, r.secrets, "request")
    r.response_headers, _ = keep_headers(response_headers, r.secrets, "response")
    return r


def check_har(doc: dict[str, Any]) -> None:
    """HAR 1.2's required fields and their types (the spec's object tables)."""

    def has(obj: dict[str, Any], **types: Any) -> None:
        for name, t in types.items():
            assert name in obj, f"missing {name} in {sorted(obj)}"
            assert isinstance(obj[name], t), f"{name}: {obj[name]!r} is not {t}"

    log = doc["log"]
    has(log, version=str, creator=dict, entries=list)
    assert log["version"] == "1.2"
    has(log["creator"], name=str, version=str)
    for e in log["entries"]:
        has(e, startedDateTime=str, time=(int, float), request=dict, response=dict, cache=dict,
            timings=dict)  # fmt: skip
        assert e["startedDateTime"].endswith("Z") and "T" in e["startedDateTime"]
        req, res, t = e["request"], e["response"], e["timings"]
        has(req, method=str, url=str, httpVersion=str, cookies=list, headers=list,
            queryString=list, headersSize=int, bodySize=int)  # fmt: skip
        has(res, status=int, statusText=str, httpVersion=str, cookies=list, headers=list,
            content=dict, redirectURL=str, headersSize=int, bodySize=int)  # fmt: skip
        has(res["content"], size=int, mimeType=str)
        has(t, send=(int, float), wait=(int, float), receive=(int, float))
        assert min(t["send"], t["wait"], t["receive"]) >= 0
        assert abs(e["time"] - (t["send"] + t["wait"] + t["receive"])) < 0.01
        for pair in req["headers"] + res["headers"] + req["queryString"]:
            has(pair, name=str, value=str)
        for cookie in req["cookies"] + res["cookies"]:
            has(cookie, name=str, value=str)
        if "postData" in req:
            has(req["postData"], mimeType=str, text=str)
    # And it is JSON through and through.
    assert json.loads(json.dumps(doc)) == doc


def test_har_of_each_protocol_with_secrets_masked() -> None:
    h1 = record(
        request_headers=[("host", "api.example.test"), ("authorization", "Bearer s3cret"),
                         ("cookie", "sid=abc; theme=dark")],
        response_headers=[("content-type", "text/plain"), ("location", "/next"),
                          ("set-cookie", "sid=new; Path=/; HttpOnly; Secure")],
        status=302,
    )  # fmt: skip
    h2 = record("h2", request_headers=[(":method", "POST"), (":path", "/x.Svc/Call"),
                                       ("content-type", "application/grpc")],
                method="POST", path="/x.Svc/Call", stream_id=3, grpc_status=5,
                grpc_message="not found", request_bytes=7, request_body=b"\x00\x00\x00\x00\x02hi",
                response_body=b"partial")  # fmt: skip
    h2.response_trailers = (("grpc-status", "5"),)
    ws = record("ws", status=101, path="/chat", response_headers=[("upgrade", "websocket")])
    ws.websocket = WebSocketSummary(messages_up=3, messages_down=2, close_code=1000)
    lost = record(status=None, error="no response", response_bytes=0)
    lost.first_byte_ms = None
    log = RequestLog()
    for r in (h1, h2, ws, lost):
        log.add(r)

    doc = har_log(log.recent())
    check_har(doc)
    e1, e2, e3, e4 = doc["log"]["entries"]
    assert e1["startedDateTime"] == "2026-01-01T12:00:00.250Z"
    assert e1["timings"] == {"send": 1.5, "wait": 8.5, "receive": 2.25} and e1["time"] == 12.25
    assert e1["request"]["url"] == "https://api.example.test/v1/items?q=a%20b&empty="
    assert e1["request"]["queryString"] == [
        {"name": "q", "value": "a b"}, {"name": "empty", "value": ""}]  # fmt: skip
    assert {"name": "authorization", "value": f"Bearer {MASK}"} in e1["request"]["headers"]
    assert e1["request"]["cookies"] == [
        {"name": "sid", "value": MASK}, {"name": "theme", "value": MASK}]  # fmt: skip
    assert e1["response"]["cookies"] == [
        {"name": "sid", "value": MASK, "path": "/", "httpOnly": True, "secure": True}]  # fmt: skip
    assert (e1["response"]["status"], e1["response"]["statusText"]) == (302, "Found")
    assert e1["response"]["redirectURL"] == "/next"
    assert e1["response"]["content"] == {"size": 42, "mimeType": "text/plain"}
    text = dumps(log.recent())
    assert "s3cret" not in text and "abc" not in text and "dark" not in text

    assert (e2["request"]["httpVersion"], e2["_streamId"], e2["_grpcStatus"]) == ("HTTP/2", 3, 5)
    assert e2["_trailers"] == [{"name": "grpc-status", "value": "5"}]
    assert e2["request"]["postData"]["encoding"] == "base64"
    assert base64.b64decode(e2["request"]["postData"]["text"]) == b"\x00\x00\x00\x00\x02hi"
    assert e2["response"]["content"]["text"] == "partial"
    assert "first bytes only" in e2["comment"]

    assert e3["request"]["url"] == "wss://api.example.test/chat"
    assert e3["_webSocket"]["messages_up"] == 3 and e3["_webSocket"]["close_code"] == 1000
    assert (e4["response"]["status"], e4["_error"]) == (0, "no response")
    assert [e["_id"] for e in (e1, e2, e3, e4)] == [1, 2, 3, 4]


def test_curl_masks_unless_revealed_and_quotes_for_the_shell() -> None:
    r = record(
        method="POST",
        request_headers=[("host", "api.example.test"), ("authorization", "Bearer s3cret"),
                         ("x-note", "it's $HOME; `rm -rf`"), ("content-length", "11"),
                         ("connection", "keep-alive")],
        request_bytes=11, request_body=b'{"a": "b"}\n',
    )  # fmt: skip
    line = curl_command(r)
    assert shlex.split(line) == [
        "curl", "-X", "POST",
        "-H", f"authorization: Bearer {MASK}",
        "-H", "x-note: it's $HOME; `rm -rf`",
        "--data-binary", '{"a": "b"}\n',
        "https://api.example.test/v1/items?q=a%20b&empty=",
    ]  # fmt: skip
    assert "s3cret" not in line
    assert "authorization: Bearer s3cret" in shlex.split(curl_command(r, reveal=True))


def test_curl_for_h2_ws_a_body_not_kept_and_another_host() -> None:
    h2 = record("h2", request_headers=[(":method", "GET"), (":authority", "api.example.test"),
                                       ("accept", "*/*")])  # fmt: skip
    assert shlex.split(curl_command(h2)) == [
        "curl", "--http2", "-H", "accept: */*", "https://api.example.test/v1/items?q=a%20b&empty="
    ]  # fmt: skip
    ws = record("ws", path="/chat", request_headers=[
        ("host", "api.example.test"), ("upgrade", "websocket"), ("connection", "Upgrade"),
        ("sec-websocket-version", "13")])  # fmt: skip
    assert shlex.split(curl_command(ws)) == [
        "curl", "--http1.1", "-H", "upgrade: websocket", "-H", "connection: Upgrade",
        "-H", "sec-websocket-version: 13", "https://api.example.test/chat",
    ]  # fmt: skip
    put = record(method="PUT", request_bytes=5000, request_body=b"x" * 100,
                 request_headers=[("host", "other.example.test")])  # fmt: skip
    line = curl_command(put)
    assert line.endswith("# the request body (5000 bytes) was not captured whole (100)")
    assert shlex.split(line, comments=True) == [
        "curl", "-X", "PUT", "-H", "host: other.example.test",
        "https://api.example.test/v1/items?q=a%20b&empty=",
    ]  # fmt: skip
    head = record(method="HEAD")
    assert shlex.split(curl_command(head))[1] == "--head"
