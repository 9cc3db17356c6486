"""The `requests.list` method: the requests a running gateway keeps (services/requests.py's
ring), for `unclaw-tui requests` and anything else on the control socket; and its wire form.

Records go out masked (`RequestRecord.to_dict`: a record's secrets never leave the gateway
this way), with bodies cut to WIRE_BODY bytes. A control line is at most 64 KiB, so the answer
comes in pages: the first call (`limit`, `peer`) fixes the set, the newest `limit` records,
and says `until` (the newest id in it); each page says `next`, and while `more` is true the
caller asks again with `after` = next and the same `until`.

    register(server, gateway.request_log)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from unclaw_tui.control.protocol import MAX_MESSAGE, Param
from unclaw_tui.services.requests import RequestLog, RequestRecord
from unclaw_tui.services.websocket import WebSocketSummary

if TYPE_CHECKING:
    from unclaw_tui.control.server import ControlServer

METHOD = "requests.list"
WIRE_BODY = 4096  # bytes of each captured body sent (the record in the gateway keeps more)
PAGE_BYTES = MAX_MESSAGE // 2  # records' JSON per page: the rest is room for the envelope
PARAMS = {
    "peer": Param((str, type(None)), required=False),  # a public key (base64)
    "limit": Param((int, type(None)), required=False),
    "after": Param(int, required=False),
    "until": Param(int, required=False),
}


def register(server: ControlServer, log: RequestLog) -> None:
    server.register(METHOD, lambda params: list_page(log, **params), PARAMS)


def list_page(
    log: RequestLog,
    *,
    peer: str | None = None,
    limit: int | None = None,
    after: int = 0,
    until: int | None = None,
) -> dict[str, Any]:
    if limit is not None and limit < 0:
        raise ValueError("limit must be 0 or more")
    records = log.recent(limit, peer)
    if until is None:
        until = records[-1].id if records else after
    page: list[dict[str, Any]] = []
    size = 0
    more = False
    last = after
    for r in records:
        if r.id <= after or r.id > until:
            continue
        doc = to_wire(r)
        cost = len(json.dumps(doc))
        if cost > PAGE_BYTES:  # one huge record (headers near their bound): heads, bodies go
            doc = to_wire(r, heads=False)
            cost = len(json.dumps(doc))
        if page and size + cost > PAGE_BYTES:
            more = True
            break
        page.append(doc)
        size += cost
        last = r.id
    return {"requests": page, "next": last, "until": until, "more": more,
            "dropped": log.dropped}  # fmt: skip


def to_wire(r: RequestRecord, *, heads: bool = True) -> dict[str, Any]:
    doc = r.to_dict()
    for name in ("request_body", "response_body"):
        body = doc.get(name)
        if body is not None and len(body) > WIRE_BODY:
            doc[name] = body[:WIRE_BODY]
    if not heads:  # what is left is small: the path (bounded), sizes, times
        doc["request_headers"] = doc["response_headers"] = doc["response_trailers"] = []
        doc["request_body"] = doc["response_body"] = None
        doc["headers_cut"] = True
    return doc


def from_wire(doc: dict[str, Any]) -> RequestRecord:
    """A record back from its wire form (masked: it has no secrets to reveal)."""
    fields = dict(doc)
    for name in ("request_headers", "response_headers", "response_trailers"):
        fields[name] = tuple((str(n), str(v)) for n, v in fields.get(name) or ())
    for name in ("request_body", "response_body"):
        if fields.get(name) is not None:
            fields[name] = str(fields[name]).encode("latin-1")
    ws = fields.pop("websocket", None)
    known = set(RequestRecord.__slots__)  # type: ignore[attr-defined]
    record = RequestRecord(**{k: v for k, v in fields.items() if k in known})
    if isinstance(ws, dict):
        names = set(WebSocketSummary.__slots__)  # type: ignore[attr-defined]
        record.websocket = WebSocketSummary(**{k: v for k, v in ws.items() if k in names})
    return record


def fetch_all(
    call: Any, *, peer: str | None = None, limit: int | None = None
) -> tuple[list[RequestRecord], int]:
    """Every page through `call(method, params)` (a ControlClient's call): the records, oldest
    first, and how many the gateway's ring had dropped."""
    params: dict[str, Any] = {"peer": peer, "limit": limit}
    records: list[RequestRecord] = []
    while True:
        result = call(METHOD, params)
        records += [from_wire(d) for d in result["requests"]]
        if not result["more"]:
            return records, int(result["dropped"])
        params = {"peer": peer, "after": result["next"], "until": result["until"]}
