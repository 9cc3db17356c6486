"""Sans-IO HTTP/2 relay between an intercepted client and its destination, with the `h2` library.

Two h2 connections: a server toward the peer (the client), a client toward the destination.
The caller feeds each side's decrypted bytes (`peer_data`, `destination_data`, the `*_eof`s)
with the monotonic time, sends what `to_peer()` / `to_destination()` return, and gets back the
requests that finished (`RequestRecord`s, requests.py). Streams are relayed as they arrive:
headers at once, DATA as the other side's flow-control window allows, then trailers and the end.

Flow control and memory: DATA received from one side is acknowledged to it (its window given
back) only once the other side took it, so a slow reader stalls its sender and what sits here
is bounded by the windows we advertise: `connection_window` each way per connection
(`buffered` tells the bytes held now, `buffered_peak` the most). Padding is given back at once.

Streams: we advertise SETTINGS_MAX_CONCURRENT_STREAMS = `max_streams` and refuse a stream past
it with RST_STREAM(REFUSED_STREAM) (RFC 9113 5.1.2 allows that stream error; h2 itself would
end the connection); one the destination has no room for (its own limit) is refused the same
way, so the client may retry it. RST_STREAM either way is passed on with its code.

Server push: refused at the source, we send the destination SETTINGS_ENABLE_PUSH = 0 (and the
peer never sees a PUSH_PROMISE; h2 treats one as a connection error).

GOAWAY: h2 carries no stream past a GOAWAY in either direction, so one from either side ends
the relay: the other side gets a GOAWAY with the same code; streams the destination said it
never processed (above its last stream id) are reset toward the client with REFUSED_STREAM,
the others in flight are cut (reported with an error).

Abuse, bounded per connection: header lists by SETTINGS_MAX_HEADER_LIST_SIZE (h2's hpack
decoder enforces it: a connection error), a header block's HEADERS + CONTINUATION frames by
`max_header_block` bytes (the frame walk below; h2 alone would buffer 64 frames of up to the
frame size), control frames (PING, SETTINGS, PRIORITY, RST_STREAM, empty DATA) by a token
bucket, frames by SETTINGS_MAX_FRAME_SIZE before any is buffered (h2 would take in all of a
frame's declared length first), and streams reset by the client before their response ended,
or refused, by another (Rapid Reset, CVE-2023-44487): past a budget the connection ends with
GOAWAY(ENHANCE_YOUR_CALM).
A malformed frame from either side (h2's ProtocolError, or anything else h2 raises on it) ends
the connection: GOAWAY to both, `error` says which side and why. Nothing raises to the caller.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections import deque
from dataclasses import dataclass, field

import h2.events as h2e
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, TooManyStreamsError
from h2.settings import SettingCodes, Settings

from unclaw_tui.services.requests import RequestRecord, keep_headers

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_MAX_STREAMS = 100
DEFAULT_STREAM_WINDOW = 256 * 1024
DEFAULT_CONNECTION_WINDOW = 1024 * 1024
DEFAULT_MAX_HEADER_LIST = 64 * 1024
DEFAULT_MAX_HEADER_BLOCK = 64 * 1024  # HEADERS + CONTINUATION bytes of one block (compressed)
H2_DEFAULT_WINDOW = 65535  # RFC 9113 6.9.2: every window starts here
MAX_FRAME = 16384  # SETTINGS_MAX_FRAME_SIZE: we keep the default, advertised to both sides
MAX_PATH = 2048  # longer paths are cut in the record

# Frame types and flags (RFC 9113 section 6) the frame walk needs.
_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _CONT = 0, 1, 2, 3, 4, 5, 6, 9
_END_STREAM, _END_HEADERS = 0x1, 0x4


@dataclass(frozen=True, slots=True)
class Limits:
    max_streams: int = DEFAULT_MAX_STREAMS
    stream_window: int = DEFAULT_STREAM_WINDOW
    connection_window: int = DEFAULT_CONNECTION_WINDOW
    max_header_list: int = DEFAULT_MAX_HEADER_LIST
    max_header_block: int = DEFAULT_MAX_HEADER_BLOCK
    # Control frames per side: a burst, then so many a second.
    control_burst: int = 1000
    control_rate: float = 500.0
    # Streams the client resets before their response ended, or that we refuse.
    reset_burst: int = 2 * DEFAULT_MAX_STREAMS
    reset_rate: float = DEFAULT_MAX_STREAMS
    capture_bodies: int = 0  # first bytes of each body kept in the record; 0: none


class _Bucket:
    """A token bucket over the caller's clock."""

    def __init__(self, burst: int, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = float(burst)
        self.last: float | None = None

    def take(self, now: float) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _FrameWalk:
    """Walks one direction's frame headers (payloads are skipped, never kept) to bound what h2
    would otherwise accept: the size of a header block across CONTINUATION frames, and the rate
    of control frames. Malformed framing is h2's to find; this only counts."""

    def __init__(self, *, preface: bool, max_block: int, control: _Bucket) -> None:
        self.skip = len(PREFACE) if preface else 0
        self.head = bytearray()
        self.block: int | None = None  # bytes of the header block being received
        self.max_block = max_block
        self.control = control

    def feed(self, data: bytes, now: float) -> str | None:
        """What was exceeded, or None."""
        pos, end = 0, len(data)
        while pos < end:
            if self.skip:
                n = min(self.skip, end - pos)
                pos += n
                self.skip -= n
                continue
            take = 9 - len(self.head)
            self.head += data[pos : pos + take]
            pos += take
            if len(self.head) < 9:
                return None
            length = int.from_bytes(self.head[:3], "big")
            kind, flags = self.head[3], self.head[4]
            self.head.clear()
            self.skip = length
            if length > MAX_FRAME:  # h2 would buffer the whole frame before saying so
                return f"h2 protocol error: a frame of {length} bytes (at most {MAX_FRAME})"
            if kind in (_HEADERS, _PUSH):
                self.block = None if flags & _END_HEADERS else length
            elif kind == _CONT and self.block is not None:
                self.block += length
                if self.block > self.max_block:
                    return f"header block over {self.max_block} bytes (CONTINUATION flood)"
                if flags & _END_HEADERS:
                    self.block = None
            control = kind in (_PRIORITY, _RST, _SETTINGS, _PING) or (
                kind in (_DATA, _CONT) and length == 0 and not flags & (_END_STREAM | 0x4)
            )
            if control and not self.control.take(now):
                return "control frame flood"
        return None


# Queued items toward one side, in order (last headers: trailers, or a head ending the stream).
_DATA_ITEM, _HEADERS_ITEM, _LAST_HEADERS_ITEM, _END_ITEM = range(4)


@dataclass(slots=True)
class _Stream:
    peer_id: int
    started: float
    record: RequestRecord
    dest_id: int | None = None
    to_dest: deque[tuple[int, object]] = field(default_factory=deque)
    to_peer: deque[tuple[int, object]] = field(default_factory=deque)
    queued_up: int = 0  # DATA bytes waiting for the destination's window
    queued_down: int = 0
    up_end_queued: bool = False
    down_end_queued: bool = False
    request_done: bool = False  # its end went to the destination
    response_done: bool = False  # its end went to the client
    request_body: bytearray | None = None
    response_body: bytearray | None = None


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


class H2Relay:
    """See the module docstring."""

    def __init__(self, limits: Limits | None = None, *, default_authority: str = "") -> None:
        self.limits = lim = limits or Limits()
        self.default_authority = default_authority
        # The stream limit is ours to enforce, with REFUSED_STREAM (see _UncountedServer).
        self.peer = _UncountedServer(
            H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        )
        self.peer.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: lim.max_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: lim.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list,
            },
        )
        self.dest = H2Connection(
            H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        )
        self.dest.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # nothing server-initiated (no push)
                SettingCodes.INITIAL_WINDOW_SIZE: lim.stream_window,
                SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list,
            },
        )
        for conn in (self.peer, self.dest):
            # Settings given as initial values are never acknowledged, so h2 does not pass
            # this one on to its decoder by itself.
            conn.decoder.max_header_list_size = lim.max_header_list
            conn.initiate_connection()
            if lim.connection_window > H2_DEFAULT_WINDOW:
                conn.increment_flow_control_window(lim.connection_window - H2_DEFAULT_WINDOW)
        self._peer_walk = _FrameWalk(
            preface=True,
            max_block=lim.max_header_block,
            control=_Bucket(lim.control_burst, lim.control_rate),
        )
        self._dest_walk = _FrameWalk(
            preface=False,
            max_block=lim.max_header_block,
            control=_Bucket(lim.control_burst, lim.control_rate),
        )
        self._resets = _Bucket(lim.reset_burst, lim.reset_rate)
        self.streams: dict[int, _Stream] = {}  # by the client's stream id
        self._by_dest: dict[int, _Stream] = {}
        self._done: list[RequestRecord] = []
        self.closed = False  # the relay is over: send what is left, then close both
        self.error: str | None = None  # why it ended abnormally ("client: ...")
        self.buffered = 0
        self.buffered_peak = 0
        self.streams_seen = 0
        self.streams_refused = 0

    # -- input -------------------------------------------------------------------------------

    def peer_data(self, data: bytes, now: float) -> list[RequestRecord]:
        self._receive(data, now, from_peer=True)
        return self._take_done()

    def destination_data(self, data: bytes, now: float) -> list[RequestRecord]:
        self._receive(data, now, from_peer=False)
        return self._take_done()

    def peer_eof(self, now: float) -> list[RequestRecord]:
        if not self.closed:
            self._shutdown(now, None, "client closed the connection", ErrorCodes.CANCEL)
        return self._take_done()

    def destination_eof(self, now: float) -> list[RequestRecord]:
        if not self.closed:
            self._shutdown(now, None, "destination closed the connection", ErrorCodes.CANCEL)
        return self._take_done()

    def abort(self, now: float, reason: str) -> list[RequestRecord]:
        """The connection failed outside h2 (a socket error): report what was in flight."""
        if not self.closed:
            self._shutdown(now, reason, reason, ErrorCodes.CANCEL)
        return self._take_done()

    # -- output ------------------------------------------------------------------------------

    def to_peer(self) -> bytes:
        return self.peer.data_to_send()

    def to_destination(self) -> bytes:
        return self.dest.data_to_send()

    # -- receiving ---------------------------------------------------------------------------

    def _receive(self, data: bytes, now: float, *, from_peer: bool) -> None:
        if self.closed or not data:
            return
        side = "client" if from_peer else "destination"
        walk = self._peer_walk if from_peer else self._dest_walk
        conn = self.peer if from_peer else self.dest
        exceeded = walk.feed(data, now)
        if exceeded is not None:
            malformed = exceeded.startswith("h2 protocol error")
            conn.close_connection(
                ErrorCodes.FRAME_SIZE_ERROR if malformed else ErrorCodes.ENHANCE_YOUR_CALM
            )
            self._shutdown(now, f"{side}: {exceeded}", f"{side}: {exceeded}", ErrorCodes.CANCEL)
            return
        try:
            events = conn.receive_data(data)
        except Exception as exc:  # h2's ProtocolError, and anything else a bad frame raises
            reason = f"{side}: h2 protocol error: {exc or type(exc).__name__}"
            if not isinstance(exc, H2Error):
                conn.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self._shutdown(now, reason, reason, ErrorCodes.CANCEL)
            return
        try:
            for event in events:
                if self.closed:
                    break
                if from_peer:
                    self._on_peer_event(event, now)
                else:
                    self._on_dest_event(event, now)
        except Exception as exc:  # defence in depth: an h2 state we did not foresee
            reason = f"{side}: h2 relay error: {exc or type(exc).__name__}"
            self._shutdown(now, reason, reason, ErrorCodes.INTERNAL_ERROR, goaway_both=True)

    def _on_peer_event(self, event: h2e.Event, now: float) -> None:
        if isinstance(event, h2e.RequestReceived):
            self._open(event.stream_id, event.headers or [], now, event.stream_ended is not None)
        elif isinstance(event, h2e.DataReceived):
            st = self.streams.get(event.stream_id)
            self._data(st, event, up=True, now=now)
        elif isinstance(event, h2e.TrailersReceived):
            st = self.streams.get(event.stream_id)
            if st is not None and st.dest_id is not None:
                st.to_dest.append((_LAST_HEADERS_ITEM, list(event.headers or [])))
                st.up_end_queued = True
                self._flush(st, up=True, now=now)
        elif isinstance(event, h2e.StreamEnded):
            st = self.streams.get(event.stream_id)
            if st is not None and st.dest_id is not None and not st.up_end_queued:
                st.to_dest.append((_END_ITEM, None))
                st.up_end_queued = True
                self._flush(st, up=True, now=now)
        elif isinstance(event, h2e.StreamReset):
            st = self.streams.get(event.stream_id)
            if st is None:
                return
            code = event.error_code or 0
            if st.dest_id is not None:
                self._quietly(self.dest.reset_stream, st.dest_id, code)
            self._finish(st, now, f"reset by the client ({_code_name(code)})")
            if not self._resets.take(now):
                self._calm(now, "client: too many streams reset (Rapid Reset)")
        elif isinstance(event, h2e.WindowUpdated | h2e.RemoteSettingsChanged):
            self._flush_all(up=False, now=now)
        elif isinstance(event, h2e.ConnectionTerminated):
            code = event.error_code or 0
            error = None if code == 0 else f"client sent GOAWAY ({_code_name(code)})"
            self._shutdown(now, error, "client sent GOAWAY", code)

    def _on_dest_event(self, event: h2e.Event, now: float) -> None:
        if isinstance(event, h2e.ResponseReceived | h2e.InformationalResponseReceived):
            st = self._by_dest.get(event.stream_id)
            if st is None:
                return
            headers = list(event.headers or [])
            kind = _HEADERS_ITEM
            if isinstance(event, h2e.ResponseReceived):
                self._response_head(st, headers, now)
                if event.stream_ended is not None:
                    # END_STREAM stays on the HEADERS frame: a gRPC trailers-only response
                    # must not become headers plus an empty DATA frame.
                    kind = _LAST_HEADERS_ITEM
                    st.down_end_queued = True
            st.to_peer.append((kind, headers))
            self._flush(st, up=False, now=now)
        elif isinstance(event, h2e.DataReceived):
            self._data(self._by_dest.get(event.stream_id), event, up=False, now=now)
        elif isinstance(event, h2e.TrailersReceived):
            st = self._by_dest.get(event.stream_id)
            if st is not None:
                trailers = list(event.headers or [])
                self._response_trailers(st, trailers)
                st.to_peer.append((_LAST_HEADERS_ITEM, trailers))
                st.down_end_queued = True
                self._flush(st, up=False, now=now)
        elif isinstance(event, h2e.StreamEnded):
            st = self._by_dest.get(event.stream_id)
            if st is not None and not st.down_end_queued:
                st.to_peer.append((_END_ITEM, None))
                st.down_end_queued = True
                self._flush(st, up=False, now=now)
        elif isinstance(event, h2e.StreamReset):
            st = self._by_dest.get(event.stream_id)
            if st is None:
                return
            code = event.error_code or 0
            self._quietly(self.peer.reset_stream, st.peer_id, code)
            self._finish(st, now, f"reset by the destination ({_code_name(code)})")
        elif isinstance(event, h2e.WindowUpdated | h2e.RemoteSettingsChanged):
            self._flush_all(up=True, now=now)
        elif isinstance(event, h2e.ConnectionTerminated):
            code = event.error_code or 0
            last = event.last_stream_id or 0
            for st in list(self.streams.values()):
                if st.dest_id is not None and st.dest_id > last:  # never processed: retryable
                    self._quietly(self.peer.reset_stream, st.peer_id, ErrorCodes.REFUSED_STREAM)
                    self._finish(st, now, "refused: the destination sent GOAWAY")
            error = None if code == 0 else f"destination sent GOAWAY ({_code_name(code)})"
            self._shutdown(now, error, "destination sent GOAWAY", code)

    # -- streams -----------------------------------------------------------------------------

    def _open(
        self, peer_id: int, headers: list[tuple[bytes, bytes]], now: float, ended: bool
    ) -> None:
        self.streams_seen += 1
        pseudo = {_text(n): _text(v) for n, v in headers if n.startswith(b":")}
        record = RequestRecord(
            protocol="h2",
            method=pseudo.get(":method", ""),
            scheme=pseudo.get(":scheme", ""),
            authority=pseudo.get(":authority")
            or next((_text(v) for n, v in headers if n == b"host"), self.default_authority),
            path=pseudo.get(":path", "")[:MAX_PATH],
            stream_id=peer_id,
        )
        record.request_headers, cut = keep_headers(
            ((_text(n), _text(v)) for n, v in headers), record.secrets, "request"
        )
        record.headers_cut |= cut
        st = _Stream(peer_id, now, record)
        if self.limits.capture_bodies:
            st.request_body, st.response_body = bytearray(), bytearray()
        if len(self.streams) >= self.limits.max_streams:
            self._refuse(st, now, f"refused: over {self.limits.max_streams} streams")
            return
        try:
            dest_id = self.dest.get_next_available_stream_id()
            self.dest.send_headers(dest_id, headers, end_stream=ended)
        except TooManyStreamsError:
            self._refuse(st, now, "refused: the destination's stream limit")
            return
        except H2Error as exc:  # headers the destination side may not send
            self._quietly(self.peer.reset_stream, peer_id, ErrorCodes.PROTOCOL_ERROR)
            self._record(st, now, f"not relayed: {exc}")
            return
        st.dest_id = dest_id
        if ended:  # END_STREAM on the HEADERS frame went with them (a GET, say)
            st.up_end_queued = st.request_done = True
            record.sent_ms = 0.0
        self.streams[peer_id] = st
        self._by_dest[dest_id] = st

    def _refuse(self, st: _Stream, now: float, why: str) -> None:
        self.streams_refused += 1
        self._quietly(self.peer.reset_stream, st.peer_id, ErrorCodes.REFUSED_STREAM)
        self._record(st, now, why)
        if not self._resets.take(now):
            self._calm(now, "client: too many streams refused or reset (Rapid Reset)")

    def _data(self, st: _Stream | None, event: h2e.DataReceived, *, up: bool, now: float) -> None:
        src = self.peer if up else self.dest
        data = event.data or b""
        counted = event.flow_controlled_length or 0
        if st is None:  # a stream already over: give the window back at once
            if counted:
                src.acknowledge_received_data(counted, event.stream_id)
            return
        if counted > len(data):  # padding: nothing to pass on
            src.acknowledge_received_data(counted - len(data), event.stream_id)
        if not data:
            return
        body = st.request_body if up else st.response_body
        if body is not None and len(body) < self.limits.capture_bodies:
            body += data[: self.limits.capture_bodies - len(body)]
        if up:
            st.record.request_bytes += len(data)
            st.to_dest.append((_DATA_ITEM, data))
            st.queued_up += len(data)
        else:
            st.record.response_bytes += len(data)
            st.to_peer.append((_DATA_ITEM, data))
            st.queued_down += len(data)
        self.buffered += len(data)
        self.buffered_peak = max(self.buffered_peak, self.buffered)
        self._flush(st, up=up, now=now)

    def _flush_all(self, *, up: bool, now: float) -> None:
        for st in list(self.streams.values()):
            if self.closed:
                return
            if st.to_dest if up else st.to_peer:
                self._flush(st, up=up, now=now)

    def _flush(self, st: _Stream, *, up: bool, now: float) -> None:
        """Send what the receiving side's windows allow, in order; give back to the sending
        side what was sent."""
        queue = st.to_dest if up else st.to_peer
        out, src = (self.dest, self.peer) if up else (self.peer, self.dest)
        out_id = st.dest_id if up else st.peer_id
        src_id = st.peer_id if up else st.dest_id
        assert out_id is not None and src_id is not None
        while queue:
            kind, item = queue[0]
            if kind == _DATA_ITEM:
                assert isinstance(item, bytes)
                room = min(out.local_flow_control_window(out_id), out.max_outbound_frame_size)
                if room <= 0:
                    return
                chunk = item[:room]
                out.send_data(out_id, chunk)
                src.acknowledge_received_data(len(chunk), src_id)
                self._unqueue(st, len(chunk), up=up)
                if len(chunk) < len(item):
                    queue[0] = (kind, item[len(chunk) :])
                    continue
            elif kind == _HEADERS_ITEM:
                out.send_headers(out_id, item)  # type: ignore[arg-type]
            else:
                if kind == _LAST_HEADERS_ITEM:
                    out.send_headers(out_id, item, end_stream=True)  # type: ignore[arg-type]
                else:
                    out.end_stream(out_id)
                if up:
                    st.request_done = True
                    st.record.sent_ms = _ms(st.started, now)
                else:
                    st.response_done = True
            queue.popleft()
        if st.request_done and st.response_done:
            self._finish(st, now, None)

    def _unqueue(self, st: _Stream, n: int, *, up: bool) -> None:
        if up:
            st.queued_up -= n
        else:
            st.queued_down -= n
        self.buffered -= n

    def _finish(self, st: _Stream, now: float, error: str | None) -> None:
        """The stream is over: drop what it still held (its windows given back at the
        connection level) and report it."""
        if self.streams.pop(st.peer_id, None) is None:
            return
        if st.dest_id is not None:
            self._by_dest.pop(st.dest_id, None)
        if st.queued_up:
            self._quietly(self.peer.acknowledge_received_data, st.queued_up, st.peer_id)
        if st.queued_down and st.dest_id is not None:
            self._quietly(self.dest.acknowledge_received_data, st.queued_down, st.dest_id)
        self.buffered -= st.queued_up + st.queued_down
        st.queued_up = st.queued_down = 0
        st.to_dest.clear()
        st.to_peer.clear()
        self._record(st, now, error)

    def _record(self, st: _Stream, now: float, error: str | None) -> None:
        r = st.record
        r.done_ms = _ms(st.started, now)
        r.error = error
        if st.request_body is not None:
            r.request_body = bytes(st.request_body)
        if st.response_body is not None:
            r.response_body = bytes(st.response_body)
        self._done.append(r)

    def _response_head(self, st: _Stream, headers: list[tuple[bytes, bytes]], now: float) -> None:
        r = st.record
        status = next((_text(v) for n, v in headers if n == b":status"), "")
        r.status = int(status) if status.isdigit() else None
        r.first_byte_ms = _ms(st.started, now)
        r.response_headers, cut = keep_headers(
            ((_text(n), _text(v)) for n, v in headers), r.secrets, "response"
        )
        r.headers_cut |= cut
        self._grpc(r, headers)  # a trailers-only response carries grpc-status here

    def _response_trailers(self, st: _Stream, trailers: list[tuple[bytes, bytes]]) -> None:
        r = st.record
        r.response_trailers, cut = keep_headers(
            ((_text(n), _text(v)) for n, v in trailers), r.secrets, "trailers"
        )
        r.headers_cut |= cut
        self._grpc(r, trailers)

    @staticmethod
    def _grpc(r: RequestRecord, headers: list[tuple[bytes, bytes]]) -> None:
        for name, value in headers:
            if name == b"grpc-status" and value.isdigit():
                r.grpc_status = int(value)
            elif name == b"grpc-message":
                r.grpc_message = urllib.parse.unquote(_text(value))[:1024]

    # -- ending ------------------------------------------------------------------------------

    def _calm(self, now: float, reason: str) -> None:
        self._quietly(self.peer.close_connection, ErrorCodes.ENHANCE_YOUR_CALM)
        self._shutdown(now, reason, reason, ErrorCodes.CANCEL)

    def _shutdown(
        self,
        now: float,
        error: str | None,
        cut: str,
        code: int,
        *,
        goaway_both: bool = False,
    ) -> None:
        """End the relay: what is in flight is reported as cut (`cut`), both sides get a
        GOAWAY with `code` unless they sent or got one already."""
        if self.closed:
            return
        self.closed = True
        self.error = self.error or error
        for st in list(self.streams.values()):
            self._finish(st, now, cut)
        for conn in (self.peer, self.dest):
            if goaway_both or conn.state_machine.state.name != "CLOSED":
                self._quietly(conn.close_connection, code)

    def _take_done(self) -> list[RequestRecord]:
        done, self._done = self._done, []
        return done

    @staticmethod
    def _quietly(call: object, *args: object) -> None:
        """An h2 call on a stream or connection that may be gone already."""
        with contextlib.suppress(H2Error, KeyError, ValueError):
            call(*args)  # type: ignore[operator]


class _UncountedServer(H2Connection):
    """h2's server connection without its own stream-limit check: h2 makes a stream past the
    advertised limit a connection error, where we refuse that one stream (RFC 9113 5.1.2)
    and keep the count ourselves (`H2Relay.streams`). h2 reads this count only there."""

    @property
    def open_inbound_streams(self) -> int:
        return 0


def _ms(started: float, now: float) -> float:
    return round(max(0.0, now - started) * 1000, 3)
