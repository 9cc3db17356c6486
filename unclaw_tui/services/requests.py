"""What is kept of each HTTP request seen inside intercepted TLS, and the ring that keeps it.

A `RequestRecord` is one request (an HTTP/1.x exchange or an HTTP/2 stream): who, what, the
headers both ways, sizes and timings, the gRPC outcome, and the first bytes of each body when
`--capture-bodies` asks for them. Secrets never sit in the record's ordinary fields: the values
of Authorization, Proxy-Authorization, Cookie and Set-Cookie are masked there (`mask_value`),
and the originals are kept apart (`secrets`, left out of `to_dict`) so the console can reveal
one on request. Anything written or published uses `to_dict`, masked.

`RequestLog` is a bounded in-memory ring of the most recent records (by count and by the bytes
they hold), safe to read from another thread (the console's) while the event loop adds.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
MASK = "•••"
# Header bytes kept per list (request, response, trailers): a record stays small whatever the
# header list size the protocol allowed; values past it are dropped and `headers_cut` says so.
MAX_KEPT_HEADER_BYTES = 8 * 1024
DEFAULT_MAX_RECORDS = 1024
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

Headers = tuple[tuple[str, str], ...]


def mask_value(name: str, value: str) -> str:
    """A secret header's value with its secret parts masked (other headers unchanged): the
    scheme of an Authorization stays ("Bearer •••"), cookie names stay, values go, Set-Cookie's
    attributes stay."""
    name = name.lower()
    if name not in SECRET_HEADERS:
        return value
    if name in ("authorization", "proxy-authorization"):
        scheme, sep, _ = value.partition(" ")
        return f"{scheme} {MASK}" if sep else MASK
    if name == "cookie":
        return "; ".join(_mask_pair(p) for p in value.split(";"))
    first, sep, attributes = value.partition(";")  # set-cookie: name=value; attributes
    return _mask_pair(first) + (sep + attributes if sep else "")


def _mask_pair(pair: str) -> str:
    name, sep, _ = pair.strip().partition("=")
    return f"{name}={MASK}" if sep else MASK


def keep_headers(
    pairs: Iterable[tuple[str, str]], secrets: dict[str, str], where: str
) -> tuple[Headers, bool]:
    """The headers as kept in a record: masked, bounded to MAX_KEPT_HEADER_BYTES; the secret
    originals go into `secrets` under "<where>:<index>". Second: whether any were dropped."""
    kept: list[tuple[str, str]] = []
    size = 0
    cut = False
    for name, value in pairs:
        size += len(name) + len(value)
        if size > MAX_KEPT_HEADER_BYTES:
            cut = True
            break
        masked = mask_value(name, value)
        if masked != value:
            secrets[f"{where}:{len(kept)}"] = value
        kept.append((name, masked))
    return tuple(kept), cut


@dataclass(slots=True)
class RequestRecord:
    """One request. Times: `started_at` is the wall clock when its head arrived; the `*_ms`
    are milliseconds from then: the request fully sent on to the destination, the response
    head back, the whole exchange done (None when it did not happen)."""

    protocol: str  # "h2" or "http/1.1"
    method: str
    scheme: str
    authority: str
    path: str
    peer: str = ""
    peer_public_key: str = ""
    conn_id: int | None = None
    stream_id: int | None = None  # HTTP/2 only
    status: int | None = None  # the final status; None when no response came
    request_headers: Headers = ()
    response_headers: Headers = ()
    response_trailers: Headers = ()
    headers_cut: bool = False
    request_bytes: int = 0  # body bytes
    response_bytes: int = 0
    started_at: float = 0.0
    sent_ms: float | None = None
    first_byte_ms: float | None = None
    done_ms: float = 0.0
    grpc_status: int | None = None
    grpc_message: str | None = None
    error: str | None = None  # a reset, a refusal, a cut connection
    request_body: bytes | None = None  # the first --capture-bodies bytes, when on
    response_body: bytes | None = None
    secrets: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def grpc(self) -> bool:
        return self.grpc_status is not None or any(
            n == "content-type" and v.startswith("application/grpc")
            for n, v in self.request_headers
        )

    def size(self) -> int:
        """Roughly the bytes this record holds (for the ring's budget)."""
        heads = self.request_headers + self.response_headers + self.response_trailers
        return (
            256
            + sum(len(n) + len(v) for n, v in heads)
            + sum(len(v) for v in self.secrets.values())
            + len(self.request_body or b"")
            + len(self.response_body or b"")
            + len(self.path)
        )

    def reveal(self, where: str, index: int) -> str | None:
        """The original value of a masked header ("request"/"response", its index)."""
        return self.secrets.get(f"{where}:{index}")

    def to_dict(self) -> dict[str, Any]:
        """The masked form, for anything written or shown by default."""
        out: dict[str, Any] = {}
        for name in self.__slots__:  # type: ignore[attr-defined]
            if name == "secrets":
                continue
            value = getattr(self, name)
            if isinstance(value, tuple):
                value = [list(pair) for pair in value]
            elif isinstance(value, bytes):
                value = value.decode("latin-1")
            out[name] = value
        return out


class RequestLog:
    """The most recent records, at most `max_records` of them holding at most `max_bytes`."""

    def __init__(
        self, max_records: int = DEFAULT_MAX_RECORDS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._ring: deque[tuple[RequestRecord, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.added = 0  # ever, so a reader can tell what it missed
        self.dropped = 0  # evicted to stay in bounds

    def add(self, record: RequestRecord) -> None:
        size = record.size()
        with self._lock:
            self._ring.append((record, size))
            self._bytes += size
            self.added += 1
            # The newest always stays (a record is bounded by itself: headers and captures).
            while len(self._ring) > 1 and (
                len(self._ring) > self.max_records or self._bytes > self.max_bytes
            ):
                _, gone = self._ring.popleft()
                self._bytes -= gone
                self.dropped += 1

    def recent(self, limit: int | None = None, peer: str | None = None) -> list[RequestRecord]:
        """Oldest first; `peer` (its public key, base64) keeps only that peer's."""
        with self._lock:
            records = [r for r, _ in self._ring]
        if peer is not None:
            records = [r for r in records if r.peer_public_key == peer]
        return records if limit is None else records[-limit:] if limit > 0 else []

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._ring)
