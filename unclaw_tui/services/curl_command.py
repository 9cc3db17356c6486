"""A request record as a curl command line ("copy as curl"), quoted for a POSIX shell.

Secret header values stay masked unless `reveal` is asked for: then the originals the record
keeps apart (`RequestRecord.secrets`) are put back. The request body goes in only when
`--capture-bodies` kept all of it; otherwise a trailing shell comment says what is missing, so
the line still runs. Headers curl makes itself (Host when it matches the URL, Content-Length,
HTTP/2's pseudo-headers, hop-by-hop ones) are left out.
"""

from __future__ import annotations

import shlex

from unclaw_tui.services.har import url_of
from unclaw_tui.services.requests import RequestRecord

# Headers curl writes itself, or that are about one hop (RFC 9110 7.6.1).
_SKIP = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
     "proxy-connection", "upgrade", "http2-settings"}
)  # fmt: skip
# A WebSocket's handshake headers stay: they are what makes the request an upgrade.
_WS_KEEP = frozenset({"connection", "upgrade"})


def curl_command(record: RequestRecord, *, reveal: bool = False) -> str:
    r = record
    ws = r.protocol == "ws"
    args = ["curl"]
    if r.protocol == "h2":
        args.append("--http2")
    elif ws:
        args.append("--http1.1")
    if r.method == "HEAD":
        args.append("--head")
    elif r.method not in ("GET", ""):
        args += ["-X", r.method]
    for index, (name, value) in enumerate(r.request_headers):
        lower = name.lower()
        if lower.startswith(":"):
            continue
        if lower == "host":
            if value == r.authority:
                continue
        elif lower in _SKIP and not (ws and lower in _WS_KEEP):
            continue
        if reveal:
            value = r.reveal("request", index) or value
        args += ["-H", f"{name}: {value}"]
    note = ""
    if r.request_bytes:
        body = r.request_body
        if body is not None and len(body) == r.request_bytes:
            try:
                args += ["--data-binary", body.decode("utf-8")]
            except UnicodeDecodeError:
                note = f"# the request body ({r.request_bytes} bytes) is binary: not included"
        else:
            kept = 0 if body is None else len(body)
            note = f"# the request body ({r.request_bytes} bytes) was not captured whole ({kept})"
    url = url_of(r)
    if ws:
        url = "https" + url[len("wss") :]
    args.append(url)
    line = " ".join(shlex.quote(a) for a in args)
    return f"{line}  {note}" if note else line
