"""The sans-IO HTTP/2 relay as transcripts: a real h2 client and a real h2 server (the `h2`
library's own connections, in memory) on either side of `H2Relay`, bytes moved by hand, and
what each end saw, what the relay holds and what it reports checked after each step."""

from __future__ import annotations

from typing import Any

import h2.events as h2e
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from unclaw_tui.services.h2relay import PREFACE, H2Relay, Limits
from unclaw_tui.services.requests import MASK, RequestLog, RequestRecord, mask_value

AUTHORITY = b"example.test"


def request(
    path: bytes = b"/", method: bytes = b"GET", **extra: bytes
) -> list[tuple[bytes, bytes]]:
    headers = [(b":method", method), (b":scheme", b"https"), (b":authority", AUTHORITY)]
    headers.append((b":path", path))
    headers += [(k.replace("_", "-").encode(), v) for k, v in extra.items()]
    return headers


class Transcript:
    """client <-> relay <-> server, all in memory; `pump()` moves bytes until nothing moves."""

    def __init__(self, limits: Limits | None = None, server_settings: dict[int, int] | None = None):
        self.relay = H2Relay(limits, default_authority="example.test")
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.server.initiate_connection()
        if server_settings:
            self.server.update_settings(server_settings)
        self.now = 0.0
        self.at_client: list[h2e.Event] = []
        self.at_server: list[h2e.Event] = []
        self.records: list[RequestRecord] = []
        self.client_failed: Exception | None = None
        self.server_failed: Exception | None = None
        self.pump()

    def pump(self) -> None:
        for _ in range(1000):
            moved = False
            if data := self.client.data_to_send():
                self.records += self.relay.peer_data(data, self.now)
                moved = True
            if (data := self.relay.to_destination()) and self.server_failed is None:
                try:
                    self.at_server += self.server.receive_data(data)
                except ProtocolError as exc:
                    self.server_failed = exc
                moved = True
            if data := self.server.data_to_send():
                self.records += self.relay.destination_data(data, self.now)
                moved = True
            if (data := self.relay.to_peer()) and self.client_failed is None:
                try:
                    self.at_client += self.client.receive_data(data)
                except ProtocolError as exc:
                    self.client_failed = exc
                moved = True
            if not moved:
                return
        raise AssertionError("the transcript never settled")

    def raw_from_client(self, data: bytes) -> None:
        self.records += self.relay.peer_data(data, self.now)
        self.pump()

    def raw_from_server(self, data: bytes) -> None:
        self.records += self.relay.destination_data(data, self.now)
        self.pump()

    def server_requests(self) -> list[h2e.RequestReceived]:
        return [e for e in self.at_server if isinstance(e, h2e.RequestReceived)]

    def respond(
        self,
        stream_id: int,
        body: bytes = b"",
        status: bytes = b"200",
        headers: list[tuple[bytes, bytes]] | None = None,
        trailers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        head = [(b":status", status), *(headers or [])]
        self.server.send_headers(stream_id, head, end_stream=not body and not trailers)
        if body:
            self.server.send_data(stream_id, body, end_stream=not trailers)
        if trailers:
            self.server.send_headers(stream_id, trailers, end_stream=True)
        self.pump()

    def at(self, side: str, kind: type[Any]) -> list[Any]:
        events = self.at_client if side == "client" else self.at_server
        return [e for e in events if isinstance(e, kind)]

    def body_at_client(self, stream_id: int) -> bytes:
        return b"".join(
            e.data
            for e in self.at(side="client", kind=h2e.DataReceived)
            if e.stream_id == stream_id
        )


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


# --- the ordinary exchange ---------------------------------------------------------------------


def test_a_get_is_relayed_and_reported_with_masked_secrets() -> None:
    t = Transcript()
    headers = request(b"/hello?x=1", authorization=b"Bearer s3cret", cookie=b"a=1; b=2")
    t.client.send_headers(1, headers, end_stream=True)
    t.now = 0.010
    t.pump()
    (got,) = t.server_requests()
    assert (b":path", b"/hello?x=1") in got.headers and (
        b"authorization",
        b"Bearer s3cret",
    ) in got.headers
    assert not t.records  # not before the response ended
    t.now = 0.030
    t.respond(got.stream_id, b"hello", headers=[(b"set-cookie", b"sid=xyz; Path=/")])
    assert t.body_at_client(1) == b"hello"
    assert t.at("client", h2e.StreamEnded)
    (r,) = t.records
    assert (r.protocol, r.method, r.scheme, r.authority, r.path) == (
        "h2", "GET", "https", "example.test", "/hello?x=1",
    )  # fmt: skip
    assert (r.status, r.stream_id, r.request_bytes, r.response_bytes, r.error) == (
        200, 1, 0, 5, None,
    )  # fmt: skip
    assert (
        r.sent_ms == 0.0
        and r.first_byte_ms == pytest.approx(20.0)
        and r.done_ms == pytest.approx(20.0)
    )
    assert ("authorization", f"Bearer {MASK}") in r.request_headers
    assert ("cookie", f"a={MASK}; b={MASK}") in r.request_headers
    assert ("set-cookie", f"sid={MASK}; Path=/") in r.response_headers
    assert "s3cret" not in repr(r.to_dict()) and "xyz" not in repr(r.to_dict())
    index = [n for n, _ in r.request_headers].index("authorization")
    assert r.reveal("request", index) == "Bearer s3cret"
    assert r.request_body is None and r.response_body is None  # --capture-bodies is off
    assert t.relay.buffered == 0 and not t.relay.streams and t.relay.error is None


def test_request_body_and_trailers_and_grpc_status() -> None:
    t = Transcript()
    t.client.send_headers(
        1, request(b"/pkg.Svc/Get", b"POST", content_type=b"application/grpc", te=b"trailers")
    )
    t.client.send_data(1, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    t.pump()
    (got,) = t.server_requests()
    assert t.at("server", h2e.DataReceived)[0].data == b"\x00\x00\x00\x00\x02hi"
    t.respond(
        got.stream_id,
        b"\x00\x00\x00\x00\x00",
        headers=[(b"content-type", b"application/grpc")],
        trailers=[(b"grpc-status", b"5"), (b"grpc-message", b"no%20such%20thing")],
    )
    (trailers,) = t.at("client", h2e.TrailersReceived)
    assert (b"grpc-status", b"5") in trailers.headers
    (r,) = t.records
    assert (r.grpc_status, r.grpc_message, r.grpc) == (5, "no such thing", True)
    assert (r.request_bytes, r.response_bytes, r.status) == (7, 5, 200)
    assert ("grpc-status", "5") in r.response_trailers


def test_trailers_only_grpc_response_and_informational_head() -> None:
    t = Transcript()
    t.client.send_headers(
        1, request(b"/pkg.Svc/Fail", b"POST", content_type=b"application/grpc"), end_stream=True
    )
    t.pump()
    t.server.send_headers(1, [(b":status", b"103"), (b"link", b"</a.css>; rel=preload")])
    t.respond(1, headers=[(b"content-type", b"application/grpc"), (b"grpc-status", b"7")])
    assert [e.headers[0] for e in t.at("client", h2e.InformationalResponseReceived)] == [
        (b":status", b"103")
    ]
    (head,) = t.at("client", h2e.ResponseReceived)
    assert head.stream_ended is not None  # END_STREAM stayed on the HEADERS frame
    assert not t.at("client", h2e.DataReceived)
    (r,) = t.records
    assert (r.status, r.grpc_status, r.grpc_message) == (200, 7, None)


def test_capture_bodies_keeps_only_the_first_bytes() -> None:
    t = Transcript(Limits(capture_bodies=4))
    t.client.send_headers(1, request(b"/up", b"POST"))
    t.client.send_data(1, b"abcdefgh", end_stream=True)
    t.pump()
    t.respond(1, b"0123456789")
    (r,) = t.records
    assert (r.request_body, r.response_body) == (b"abcd", b"0123")
    assert (r.request_bytes, r.response_bytes) == (8, 10)


# --- flow control: nothing held beyond the windows -----------------------------------------------


def test_a_slow_destination_backs_the_client_up_within_the_window() -> None:
    limits = Limits(stream_window=64 * 1024, connection_window=128 * 1024)
    t = Transcript(limits)
    body = bytes(range(256)) * 4096  # 1 MiB, far beyond every window
    t.client.send_headers(1, request(b"/upload", b"PUT"))
    sent = 0
    received = bytearray()
    for _ in range(200):
        # The client sends what its window allows; the server reads but acknowledges only
        # after the check below: a slow reader.
        room = min(t.client.local_flow_control_window(1), len(body) - sent)
        while room > 0:
            n = min(room, t.client.max_outbound_frame_size)
            t.client.send_data(1, body[sent : sent + n], end_stream=sent + n == len(body))
            sent += n
            room -= n
        t.pump()
        assert t.relay.buffered <= limits.connection_window
        new = [e for e in t.at_server if isinstance(e, h2e.DataReceived)]
        for e in new:
            received += e.data
            t.server.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        t.at_server = [e for e in t.at_server if not isinstance(e, h2e.DataReceived)]
        t.pump()
        if sent == len(body) and t.at("server", h2e.StreamEnded):
            break
    received += b"".join(e.data for e in t.at("server", h2e.DataReceived))
    assert bytes(received) == body
    assert 0 < t.relay.buffered_peak <= limits.connection_window
    t.respond(1)
    (r,) = t.records
    assert r.request_bytes == len(body) and r.status == 200


def test_a_slow_client_backs_the_destination_up_within_the_window() -> None:
    limits = Limits(stream_window=32 * 1024, connection_window=64 * 1024)
    t = Transcript(limits)
    t.client.send_headers(1, request(b"/big"), end_stream=True)
    t.pump()
    body = b"x" * (512 * 1024)
    t.server.send_headers(1, [(b":status", b"200")])
    sent = 0
    # The client never acknowledges: the server can send only what the windows allow.
    while (room := t.server.local_flow_control_window(1)) > 0:
        n = min(room, t.server.max_outbound_frame_size, len(body) - sent)
        t.server.send_data(1, body[sent : sent + n])
        sent += n
        t.pump()
    held = t.relay.buffered
    assert sent < len(body) and held <= limits.connection_window
    assert t.relay.buffered_peak <= limits.connection_window
    # The client reads: everything moves on, and the relay holds nothing at the end.
    got = len(t.body_at_client(1))
    for _ in range(200):
        for e in t.at("client", h2e.DataReceived):
            t.client.acknowledge_received_data(e.flow_controlled_length, 1)
        t.at_client = [e for e in t.at_client if not isinstance(e, h2e.DataReceived)]
        t.pump()
        room = min(t.server.local_flow_control_window(1), len(body) - sent)
        while room > 0:
            n = min(room, t.server.max_outbound_frame_size)
            t.server.send_data(1, body[sent : sent + n], end_stream=sent + n == len(body))
            sent += n
            room -= n
        t.pump()
        if t.records:
            break
        assert t.relay.buffered <= limits.connection_window
    (r,) = t.records
    assert r.response_bytes == len(body) and got > 0
    assert t.relay.buffered == 0


# --- stream limits and resets ------------------------------------------------------------------


def test_streams_past_the_limit_are_refused_and_the_others_complete() -> None:
    t = Transcript(Limits(max_streams=2))
    assert t.client.remote_settings.max_concurrent_streams == 2
    # A client that ignores the advertised limit opens a third stream.
    t.client.remote_settings.update({SettingCodes.MAX_CONCURRENT_STREAMS: 10})
    t.client.remote_settings.acknowledge()
    for sid in (1, 3, 5):
        t.client.send_headers(sid, request(f"/{sid}".encode()), end_stream=True)
    t.pump()
    resets = t.at("client", h2e.StreamReset)
    assert [(e.stream_id, e.error_code) for e in resets] == [(5, ErrorCodes.REFUSED_STREAM)]
    assert [e.stream_id for e in t.server_requests()] == [1, 3]
    refused = [r for r in t.records if r.stream_id == 5]
    assert refused and refused[0].error == "refused: over 2 streams"
    for sid in (1, 3):
        t.respond(sid, b"ok")
    assert sorted((r.stream_id, r.status) for r in t.records) == [(1, 200), (3, 200), (5, None)]
    assert t.relay.error is None and not t.relay.closed
    # Room again: a new stream goes through.
    t.client.send_headers(7, request(b"/7"), end_stream=True)
    t.pump()
    assert t.server_requests()[-1].stream_id == 5  # the destination numbers its own streams
    t.respond(5, b"late")
    assert t.body_at_client(7) == b"late"


def test_the_destinations_own_stream_limit_refuses_streams_too() -> None:
    t = Transcript(server_settings={SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    for sid in (1, 3):
        t.client.send_headers(sid, request(f"/{sid}".encode()), end_stream=True)
    t.pump()
    assert [(e.stream_id, e.error_code) for e in t.at("client", h2e.StreamReset)] == [
        (3, ErrorCodes.REFUSED_STREAM)
    ]
    assert [r.error for r in t.records] == ["refused: the destination's stream limit"]


def test_resets_are_passed_on_both_ways() -> None:
    t = Transcript()
    t.client.send_headers(1, request(b"/a"), end_stream=True)
    t.client.send_headers(3, request(b"/b"), end_stream=True)
    t.pump()
    t.client.reset_stream(1, ErrorCodes.CANCEL)
    t.pump()
    assert [(e.stream_id, e.error_code) for e in t.at("server", h2e.StreamReset)] == [
        (1, ErrorCodes.CANCEL)
    ]
    t.server.reset_stream(3, ErrorCodes.INTERNAL_ERROR)
    t.pump()
    assert [(e.stream_id, e.error_code) for e in t.at("client", h2e.StreamReset)] == [
        (3, ErrorCodes.INTERNAL_ERROR)
    ]
    assert [r.error for r in t.records] == [
        "reset by the client (CANCEL)",
        "reset by the destination (INTERNAL_ERROR)",
    ]
    assert t.relay.error is None and not t.relay.streams


def test_rapid_reset_ends_the_connection() -> None:
    t = Transcript(Limits(reset_burst=20, reset_rate=10))
    sid = 1
    for _ in range(40):
        t.client.send_headers(sid, request(b"/"), end_stream=True)
        t.client.reset_stream(sid, ErrorCodes.CANCEL)
        sid += 2
    t.pump()
    assert t.relay.closed and t.relay.error == "client: too many streams reset (Rapid Reset)"
    (goaway,) = t.at("client", h2e.ConnectionTerminated)
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert t.at("server", h2e.ConnectionTerminated)
    assert len(t.server_requests()) <= 21  # the origin saw no more than the budget
    assert len(t.records) <= 21


def test_resets_within_the_budget_rate_are_fine() -> None:
    t = Transcript(Limits(reset_burst=5, reset_rate=10))
    sid = 1
    for _ in range(30):
        t.now += 0.2  # two tokens back per reset
        t.client.send_headers(sid, request(b"/"), end_stream=True)
        t.client.reset_stream(sid, ErrorCodes.CANCEL)
        sid += 2
        t.pump()
    assert not t.relay.closed and len(t.records) == 30


# --- abuse and malformed input -------------------------------------------------------------------


def test_continuation_flood_ends_the_connection() -> None:
    t = Transcript(Limits(max_header_block=16 * 1024))
    headers_frame = frame(1, 0, 1, b"\x82")  # HEADERS without END_HEADERS, ":method: GET"
    flood = headers_frame + b"".join(frame(9, 0, 1, b"\x84" * 4096) for _ in range(10))
    t.raw_from_client(flood)
    assert t.relay.closed
    assert t.relay.error == "client: header block over 16384 bytes (CONTINUATION flood)"
    assert t.at("client", h2e.ConnectionTerminated)[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert t.at("server", h2e.ConnectionTerminated)


def test_ping_flood_ends_the_connection() -> None:
    t = Transcript(Limits(control_burst=50, control_rate=10))
    t.raw_from_client(b"".join(frame(6, 0, 0, b"12345678") for _ in range(100)))
    assert t.relay.error == "client: control frame flood"
    assert len(t.at("client", h2e.PingAckReceived)) <= 50


def test_an_oversized_header_list_ends_the_connection() -> None:
    t = Transcript(Limits(max_header_list=4096))
    t.client.send_headers(1, request(b"/", x_big=b"y" * 8000), end_stream=True)
    t.pump()
    assert t.relay.closed and "client: h2 protocol error" in (t.relay.error or "")
    assert not t.server_requests()
    assert t.at("server", h2e.ConnectionTerminated)


@pytest.mark.parametrize(
    ("side", "bad"),
    [
        ("client", frame(0, 0, 0, b"data on stream zero")),
        ("client", frame(4, 0, 0, b"\x00\x04\xff\xff\xff\xff")),  # window size past 2^31-1
        ("client", b"\x00" * 9 + b"this is no frame at all"),
        ("destination", frame(1, 4, 2, b"\x88")),  # a stream the client side never opened
        ("destination", frame(6, 0, 1, b"12345678")),  # PING on a stream
        ("destination", PREFACE + b"\x00" * 64),  # a frame of 5 MB declared: refused at once
        ("client", frame(0, 0, 1, b"").replace(b"\x00\x00\x00", b"\x01\x00\x00", 1)),
    ],
)
def test_malformed_frames_end_the_connection_with_a_reason(side: str, bad: bytes) -> None:
    t = Transcript()
    t.client.send_headers(1, request(b"/inflight"), end_stream=True)
    t.pump()
    if side == "client":
        t.raw_from_client(bad)
    else:
        t.raw_from_server(bad)
    assert t.relay.closed
    assert (t.relay.error or "").startswith(f"{side}: h2 protocol error"), t.relay.error
    assert t.at("client", h2e.ConnectionTerminated) or t.client_failed
    assert t.at("server", h2e.ConnectionTerminated) or t.server_failed
    (r,) = t.records
    assert r.path == "/inflight" and r.status is None and r.error == t.relay.error
    # Nothing more is taken in or sent afterwards.
    assert t.relay.peer_data(frame(6, 0, 0, b"12345678"), 1.0) == []
    assert t.relay.to_peer() == b"" and t.relay.to_destination() == b""


def test_push_is_disabled_toward_the_destination() -> None:
    t = Transcript()
    assert t.server.remote_settings.enable_push == 0
    t.client.send_headers(1, request(b"/"), end_stream=True)
    t.pump()
    with pytest.raises(ProtocolError):
        t.server.push_stream(1, 2, request(b"/pushed"))


# --- GOAWAY and the end ------------------------------------------------------------------------


def test_destination_goaway_refuses_what_it_never_processed() -> None:
    t = Transcript()
    for sid in (1, 3):
        t.client.send_headers(sid, request(f"/{sid}".encode()), end_stream=True)
    t.pump()
    t.server.close_connection(ErrorCodes.NO_ERROR, last_stream_id=1)
    t.pump()
    resets = {e.stream_id: e.error_code for e in t.at("client", h2e.StreamReset)}
    assert resets == {3: ErrorCodes.REFUSED_STREAM}
    assert t.at("client", h2e.ConnectionTerminated)[0].error_code == ErrorCodes.NO_ERROR
    errors = {r.stream_id: r.error for r in t.records}
    assert errors == {1: "destination sent GOAWAY", 3: "refused: the destination sent GOAWAY"}
    assert t.relay.closed and t.relay.error is None  # a graceful GOAWAY is no error


def test_client_goaway_and_eof() -> None:
    t = Transcript()
    t.client.send_headers(1, request(b"/"), end_stream=True)
    t.pump()
    t.respond(1, b"done")
    t.client.close_connection()
    t.pump()
    assert t.relay.closed and t.relay.error is None
    assert t.at("server", h2e.ConnectionTerminated)[0].error_code == ErrorCodes.NO_ERROR
    u = Transcript()
    u.client.send_headers(1, request(b"/cut"), end_stream=True)
    u.pump()
    (r,) = u.relay.peer_eof(2.0)
    assert r.error == "client closed the connection" and u.relay.closed


def test_preface_alone_and_bytes_in_pieces() -> None:
    """The frame walk and h2 take the bytes however they are cut."""
    t = Transcript()
    t.client.send_headers(1, request(b"/pieces", b"POST"))
    t.client.send_data(1, b"z" * 3000, end_stream=True)
    data = t.client.data_to_send()
    for i in range(len(data)):
        t.records += t.relay.peer_data(data[i : i + 1], 0.0)
    t.pump()
    assert t.at("server", h2e.StreamEnded)
    t.respond(1)
    assert t.records[0].request_bytes == 3000
    assert PREFACE  # the walk skipped it byte by byte above


# --- requests.py -------------------------------------------------------------------------------


def test_mask_value() -> None:
    assert mask_value("Authorization", "Basic dXNlcjpwYXNz") == f"Basic {MASK}"
    assert mask_value("proxy-authorization", "token") == MASK
    assert mask_value("cookie", "a=1;b=2") == f"a={MASK}; b={MASK}"
    assert mask_value("set-cookie", "id=9; HttpOnly") == f"id={MASK}; HttpOnly"
    assert mask_value("accept", "*/*") == "*/*"


def test_request_log_is_bounded_by_count_and_bytes() -> None:
    log = RequestLog(max_records=3, max_bytes=10_000)
    for i in range(5):
        log.add(RequestRecord("h2", "GET", "https", "a", f"/{i}", peer_public_key="k"))
    assert [r.path for r in log.recent()] == ["/2", "/3", "/4"]
    assert (log.added, log.dropped) == (5, 2)
    assert [r.path for r in log.recent(1)] == ["/4"] and log.recent(peer="other") == []
    big = RequestRecord("h2", "GET", "https", "a", "/big", response_body=b"x" * 9600)
    log.add(big)
    assert [r.path for r in log.recent()] == ["/big"] and log.bytes <= 10_000
