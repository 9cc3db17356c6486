"""Sans-IO observer of HTTP/1.x inside a relayed connection: one `Exchange` per request.

The relay feeds it the bytes going each way (`request_data`, `response_data`) with the time,
and gets back the exchanges that completed: method, Host, path, status, the headers both ways,
body bytes both ways and the times (from the request head: request body sent, response head,
response end). Only heads, chunk-size lines and trailers are buffered, each bounded
(`max_head`); bodies are counted, and kept only up to `capture_bodies` bytes each.

Framing follows RFC 9112 section 6: chunked, Content-Length, or (responses only) until the
connection closes; HEAD requests and 1xx/204/304 responses have no body. Interim 1xx responses
are skipped. A 101 upgrade or a successful CONNECT ends the HTTP part (reported, then the
observer goes quiet), as does anything that is not HTTP/1.x: the relay itself never depends on
the observer, so a confused observer only means fewer events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum, auto

DEFAULT_MAX_HEAD = 64 * 1024
MAX_PENDING = 128  # pipelined requests without a response yet
MAX_PATH = 2048  # longer targets are cut in the event


@dataclass(frozen=True, slots=True)
class Exchange:
    method: str
    host: str | None
    path: str
    status: int | None  # None when no response came
    bytes: int  # response body bytes
    ms: float
    # The details, for the request record (left out of ==: the transcripts compare the above).
    request_bytes: int = field(default=0, compare=False)
    sent_ms: float | None = field(default=None, compare=False)  # the request's end went by
    first_byte_ms: float | None = field(default=None, compare=False)  # the final head came
    request_headers: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    response_headers: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    request_body: bytes | None = field(default=None, compare=False)  # first capture bytes
    response_body: bytes | None = field(default=None, compare=False)


# --- message framing ---------------------------------------------------------------------------


class _State(Enum):
    HEAD = auto()
    BODY = auto()  # Content-Length bytes left
    CHUNK_SIZE = auto()
    CHUNK_DATA = auto()
    CHUNK_CRLF = auto()
    TRAILERS = auto()
    UNTIL_CLOSE = auto()
    END_PENDING = auto()  # the head said "no body": the message ends at once
    STOPPED = auto()  # not HTTP/1.x (any more): ignore everything


@dataclass(frozen=True, slots=True)
class _Head:
    start_line: str
    headers: dict[str, str]  # lower-case names; repeated names joined with ", "
    pairs: tuple[tuple[str, str], ...] = ()  # as they came


@dataclass(frozen=True, slots=True)
class _End:
    body_bytes: int
    captured: bytes | None = None


class _Malformed(Exception):
    pass


class _Framer:
    """Splits one direction's bytes into message heads and ends. After yielding a `_Head` it
    waits for the caller to choose the body framing (`expect`, `stop`) before going on."""

    def __init__(self, max_head: int, capture: int = 0) -> None:
        self.max_head = max_head
        self.state = _State.HEAD
        self.buf = bytearray()
        self.left = 0
        self.body = 0
        self.capture = capture
        self.captured = bytearray()

    def _keep(self, data: bytes, start: int, end: int) -> None:
        room = self.capture - len(self.captured)
        if room > 0:
            self.captured += data[start : min(end, start + room)]

    def expect(self, framing: _State, length: int = 0) -> None:
        """The body after a head: END_PENDING (none), BODY (`length` bytes), CHUNK_SIZE
        (chunked) or UNTIL_CLOSE."""
        if framing is _State.BODY and not length:
            framing = _State.END_PENDING
        self.state, self.left = framing, length

    def stop(self) -> None:
        self.state = _State.STOPPED
        self.buf.clear()

    def eof(self) -> Iterator[_End]:
        if self.state is _State.UNTIL_CLOSE:
            self.state = _State.HEAD
            yield self._end()

    def _end(self) -> _End:
        end = _End(self.body, bytes(self.captured) if self.capture else None)
        self.body = 0
        self.captured.clear()
        return end

    def feed(self, data: bytes) -> Iterator[_Head | _End]:
        pos = 0
        while True:
            state = self.state
            if state is _State.STOPPED:
                return
            if state is _State.END_PENDING:
                self.state = _State.HEAD
                yield self._end()
                continue
            if state is _State.UNTIL_CLOSE:
                self.body += len(data) - pos
                self._keep(data, pos, len(data))
                return
            if state in (_State.BODY, _State.CHUNK_DATA):
                n = min(self.left, len(data) - pos)
                self._keep(data, pos, pos + n)
                pos += n
                self.left -= n
                self.body += n
                if self.left:
                    return  # all of data was body
                if state is _State.BODY:
                    self.state = _State.HEAD
                    yield self._end()
                else:
                    self.state = _State.CHUNK_CRLF
                continue
            # Line-oriented states work on the buffer (bounded by max_head).
            if pos < len(data):
                self.buf += data[pos:]
                pos = len(data)
            item = self._step()
            if item is False:
                if len(self.buf) > self.max_head:
                    raise _Malformed("head or chunk line too long")
                return
            if item is not True:
                yield item
            # What followed the parsed line goes round again (it may be body bytes).
            data, pos = bytes(self.buf), 0
            self.buf.clear()

    def _step(self) -> _Head | _End | bool:
        """Parse one unit from the buffer, leaving the rest in it: what it completed, else
        True; False: need more bytes."""
        buf = self.buf
        state = self.state
        if state is _State.HEAD:
            while buf.startswith(b"\r\n"):  # RFC 9112 2.2: ignore empty lines before a message
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = _parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            return head
        end = buf.find(b"\r\n")
        if state is _State.CHUNK_CRLF:
            if len(buf) < 2:
                return False
            if end != 0:
                raise _Malformed("chunk data not followed by CRLF")
            del buf[:2]
            self.state = _State.CHUNK_SIZE
            return True
        if end < 0:
            return False
        line = bytes(buf[:end])
        del buf[: end + 2]
        if state is _State.CHUNK_SIZE:
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Malformed("bad chunk size") from None
            if size < 0 or not size_text.isalnum():
                raise _Malformed("bad chunk size")
            if size:
                self.state, self.left = _State.CHUNK_DATA, size
            else:
                self.state = _State.TRAILERS
            return True
        # TRAILERS: until an empty line
        if not line:
            self.state = _State.HEAD
            return self._end()
        return True


def _parse_head(raw: bytes) -> _Head:
    lines = raw.decode("latin-1").split("\r\n")  # latin-1 decodes any bytes
    headers: dict[str, str] = {}
    pairs: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Malformed("bad header line")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
        pairs.append((key, value))
    return _Head(lines[0], headers, tuple(pairs))


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise _Malformed("conflicting Content-Length")
    (single,) = values
    if not single.isdigit():
        raise _Malformed("bad Content-Length")
    return int(single)


def _is_chunked(headers: dict[str, str]) -> bool:
    codings = [c.strip().lower() for c in headers.get("transfer-encoding", "").split(",")]
    return codings[-1] == "chunked"


# --- the observer ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    method: str
    host: str | None
    path: str
    started: float
    headers: tuple[tuple[str, str], ...] = ()
    status: int | None = None
    request_bytes: int = 0
    sent: float | None = None
    first_byte: float | None = None
    response_headers: tuple[tuple[str, str], ...] = ()
    request_body: bytes | None = None


class Http1Observer:
    """Watches one connection's HTTP/1.x traffic (see the module docstring)."""

    def __init__(
        self,
        *,
        default_host: str | None = None,
        max_head: int = DEFAULT_MAX_HEAD,
        capture_bodies: int = 0,
    ) -> None:
        self.default_host = default_host
        self._requests = _Framer(max_head, capture_bodies)
        self._responses = _Framer(max_head, capture_bodies)
        self._pending: deque[_Pending] = deque()
        self.active = True
        self.stopped_reason: str | None = None

    # -- input ---------------------------------------------------------------------------------

    def request_data(self, data: bytes, now: float) -> list[Exchange]:
        if not self.active or not data:
            return []
        try:
            for item in self._requests.feed(data):
                if isinstance(item, _Head):
                    self._on_request_head(item, now)
                elif self._pending:  # the request's end: the newest request is complete
                    last = self._pending[-1]
                    last.request_bytes, last.sent = item.body_bytes, now
                    last.request_body = item.captured
        except _Malformed as exc:
            self._stop(f"request: {exc}")
        return []

    def response_data(self, data: bytes, now: float) -> list[Exchange]:
        if not self.active or not data:
            return []
        done: list[Exchange] = []
        try:
            for item in self._responses.feed(data):
                if isinstance(item, _Head):
                    self._on_response_head(item, now, done)
                else:
                    self._on_response_end(item, now, done)
        except _Malformed as exc:
            self._stop(f"response: {exc}")
        return done

    def response_eof(self, now: float) -> list[Exchange]:
        """The server closed: a body read until close ends here."""
        done: list[Exchange] = []
        if self.active:
            for end in self._responses.eof():
                self._on_response_end(end, now, done)
        return done

    def close(self, now: float) -> list[Exchange]:
        """The connection ended: requests still waiting are reported without a status (or
        with the status of a response whose body was cut short)."""
        done = self.response_eof(now)
        while self._pending:
            p = self._pending.popleft()
            body = self._responses.body if p.status is not None else 0
            done.append(_exchange(p, p.status, body, now))
        self._responses.body = 0
        return done

    # -- heads and ends ------------------------------------------------------------------------

    def _on_request_head(self, head: _Head, now: float) -> None:
        parts = head.start_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
            raise _Malformed("not an HTTP/1.x request line")
        method, target = parts[0], parts[1]
        if len(self._pending) >= MAX_PENDING:
            raise _Malformed("too many requests without a response")
        host = head.headers.get("host") or self.default_host
        self._pending.append(_Pending(method, host, target[:MAX_PATH], now, head.pairs))
        if _is_chunked(head.headers):
            self._requests.expect(_State.CHUNK_SIZE)
        else:
            self._requests.expect(_State.BODY, _content_length(head.headers) or 0)

    def _on_response_head(self, head: _Head, now: float, done: list[Exchange]) -> None:
        parts = head.start_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _Malformed("not an HTTP/1.x status line")
        status = int(parts[1])
        if not self._pending:
            raise _Malformed("a response without a request")
        request = self._pending[0]
        if status == 101 or (request.method == "CONNECT" and 200 <= status < 300):
            # The connection becomes something else: report this exchange and go quiet.
            self._pending.popleft()
            done.append(_exchange(request, status, 0, now))
            self._stop("upgraded")
            return
        if 100 <= status < 200:
            self._responses.expect(_State.END_PENDING)  # interim: the real response follows
            return
        request.status = status
        request.first_byte = now
        request.response_headers = head.pairs
        headers = head.headers
        if request.method == "HEAD" or status in (204, 304):
            self._responses.expect(_State.END_PENDING)
        elif _is_chunked(headers):
            self._responses.expect(_State.CHUNK_SIZE)
        elif "transfer-encoding" in headers or (length := _content_length(headers)) is None:
            self._responses.expect(_State.UNTIL_CLOSE)
        else:
            self._responses.expect(_State.BODY, length)

    def _on_response_end(self, end: _End, now: float, done: list[Exchange]) -> None:
        if not self._pending:
            return
        request = self._pending[0]
        if request.status is None:
            return  # the end of an interim response
        self._pending.popleft()
        done.append(_exchange(request, request.status, end.body_bytes, now, end.captured))

    def _stop(self, reason: str) -> None:
        self.active = False
        self.stopped_reason = reason
        self._requests.stop()
        self._responses.stop()


def _exchange(
    p: _Pending, status: int | None, body: int, now: float, captured: bytes | None = None
) -> Exchange:
    return Exchange(
        method=p.method,
        host=p.host,
        path=p.path,
        status=status,
        bytes=body,
        ms=_ms(p.started, now),
        request_bytes=p.request_bytes,
        sent_ms=None if p.sent is None else _ms(p.started, p.sent),
        first_byte_ms=None if p.first_byte is None else _ms(p.started, p.first_byte),
        request_headers=p.headers,
        response_headers=p.response_headers,
        request_body=p.request_body,
        response_body=captured,
    )


def _ms(start: float, end: float) -> float:
    return round(max(0.0, end - start) * 1000, 3)
