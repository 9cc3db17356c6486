"""HAR 1.2 (the HTTP Archive format browsers' developer tools read and write) from request
records: the one exporter behind the console's export, `unclaw-tui requests --har` and the
history's `log --har`.

Only what a record holds goes in, and as it holds it: the values of Authorization, Cookie,
Set-Cookie and Proxy-Authorization stay masked (a record's `secrets` never reach an export).
Bodies appear only when `--capture-bodies` kept them, and then only their first bytes (the
entry's comment says so). What HAR has no field for goes into underscore fields, which HAR
allows: `_peer`, `_protocol` ("h2", "http/1.1", "ws"), `_streamId`, `_grpcStatus`,
`_grpcMessage`, `_trailers`, `_webSocket` (the counts and the close), `_error`, `_id`.

Times: `startedDateTime` is the wall clock when the request's head arrived; `timings.send`
until the request was passed on whole, `wait` until the response's head, `receive` until the
end; `time` is their sum. A part that did not happen counts 0 (HAR allows -1 only for the
optional parts, which we do not measure: blocked, dns, connect, ssl).
"""

from __future__ import annotations

import base64
import datetime
import http
import json
import urllib.parse
from collections.abc import Iterable
from typing import Any

from unclaw_tui import version
from unclaw_tui.services.requests import Headers, RequestRecord

HAR_VERSION = "1.2"
CREATOR = "unclaw-tui"


def har_log(records: Iterable[RequestRecord], comment: str = "") -> dict[str, Any]:
    """The whole document: {"log": {...}}."""
    log: dict[str, Any] = {
        "version": HAR_VERSION,
        "creator": {"name": CREATOR, "version": version()},
        "entries": [har_entry(r) for r in records],
    }
    if comment:
        log["comment"] = comment
    return {"log": log}


def dumps(records: Iterable[RequestRecord], comment: str = "") -> str:
    return json.dumps(har_log(records, comment), indent=2, ensure_ascii=False) + "\n"


def har_entry(r: RequestRecord) -> dict[str, Any]:
    http_version = "HTTP/2" if r.protocol == "h2" else "HTTP/1.1"
    send = _nonneg(r.sent_ms)
    first = r.first_byte_ms
    wait = _nonneg(None if first is None else first - send)
    receive = _nonneg(r.done_ms - (first if first is not None else send + wait))
    entry: dict[str, Any] = {
        "startedDateTime": _iso(r.started_at),
        "time": round(send + wait + receive, 3),
        "request": _request(r, http_version),
        "response": _response(r, http_version),
        "cache": {},
        "timings": {"send": send, "wait": wait, "receive": receive},
        "_id": r.id,
        "_peer": r.peer,
        "_protocol": r.protocol,
    }
    if r.conn_id is not None:
        entry["connection"] = str(r.conn_id)
    optional = {
        "_streamId": r.stream_id,
        "_grpcStatus": r.grpc_status,
        "_grpcMessage": r.grpc_message,
        "_error": r.error,
        "_webSocket": r.websocket.to_dict() if r.websocket is not None else None,
    }
    entry.update((k, v) for k, v in optional.items() if v is not None)
    if r.response_trailers:
        entry["_trailers"] = _headers(r.response_trailers)
    notes = []
    if r.headers_cut:
        notes.append("some headers were too long to keep")
    if r.request_body is not None or r.response_body is not None:
        notes.append("bodies: their first bytes only (--capture-bodies)")
    if notes:
        entry["comment"] = "; ".join(notes)
    return entry


def url_of(r: RequestRecord) -> str:
    scheme = "wss" if r.protocol == "ws" else (r.scheme or "https")
    path = r.path if r.path.startswith("/") else "/" + r.path
    if r.method == "CONNECT" or r.path == "*":
        path = ""
    return f"{scheme}://{r.authority}{path}"


def _request(r: RequestRecord, http_version: str) -> dict[str, Any]:
    query = urllib.parse.urlsplit(r.path).query
    out: dict[str, Any] = {
        "method": r.method,
        "url": url_of(r),
        "httpVersion": http_version,
        "cookies": _cookies(v for n, v in r.request_headers if n.lower() == "cookie"),
        "headers": _headers(r.request_headers),
        "queryString": [
            {"name": n, "value": v}
            for n, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
        ],
        "headersSize": -1,
        "bodySize": r.request_bytes,
    }
    if r.request_body is not None:
        mime = _header(r.request_headers, "content-type") or "application/octet-stream"
        post = {"mimeType": mime, "params": []}
        post.update(_text(r.request_body))
        out["postData"] = post
    return out


def _response(r: RequestRecord, http_version: str) -> dict[str, Any]:
    content: dict[str, Any] = {
        "size": r.response_bytes,
        "mimeType": _header(r.response_headers, "content-type") or "",
    }
    if r.response_body is not None:
        content.update(_text(r.response_body))
    return {
        "status": r.status or 0,  # 0: no response came (as browsers write it)
        "statusText": _reason(r.status),
        "httpVersion": http_version,
        "cookies": _set_cookies(v for n, v in r.response_headers if n.lower() == "set-cookie"),
        "headers": _headers(r.response_headers),
        "content": content,
        "redirectURL": _header(r.response_headers, "location") or "",
        "headersSize": -1,
        "bodySize": r.response_bytes,
    }


def _headers(pairs: Headers) -> list[dict[str, str]]:
    return [{"name": n, "value": v} for n, v in pairs]


def _header(pairs: Headers, name: str) -> str | None:
    return next((v for n, v in pairs if n.lower() == name), None)


def _cookies(values: Iterable[str]) -> list[dict[str, str]]:
    out = []
    for value in values:
        for pair in value.split(";"):
            name, sep, val = pair.strip().partition("=")
            if sep and name:
                out.append({"name": name, "value": val})
    return out


def _set_cookies(values: Iterable[str]) -> list[dict[str, Any]]:
    out = []
    for value in values:
        first, _, attributes = value.partition(";")
        name, sep, val = first.strip().partition("=")
        if not sep or not name:
            continue
        cookie: dict[str, Any] = {"name": name, "value": val}
        for attribute in attributes.split(";"):
            key, _, arg = attribute.strip().partition("=")
            key = key.lower()
            if key in ("path", "domain", "expires"):
                cookie[key] = arg
            elif key in ("httponly", "secure"):
                cookie["httpOnly" if key == "httponly" else "secure"] = True
        out.append(cookie)
    return out


def _text(body: bytes) -> dict[str, str]:
    """A body's `text`: as is when it is UTF-8 text, else base64 (HAR's `encoding`): control
    characters but tab and line ends make it binary (gRPC's frames start with NULs)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or any(ord(c) < 32 and c not in "\t\r\n" for c in text):
        return {"text": base64.b64encode(body).decode(), "encoding": "base64"}
    return {"text": text}


def _reason(status: int | None) -> str:
    if status is None:
        return ""
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _nonneg(ms: float | None) -> float:
    return 0.0 if ms is None else round(max(0.0, ms), 3)


def _iso(ts: float) -> str:
    """ISO 8601 with milliseconds and the zone, as HAR wants (UTC)."""
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
