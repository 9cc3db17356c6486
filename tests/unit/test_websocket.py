"""The sans-IO WebSocket relay as transcripts: wsproto's own client and server connections (in
memory) on either side of `WebSocketRelay`, bytes moved by hand; what each end received, what
the relay held and what it counted checked after each step."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from unclaw_tui.services.websocket import (
    ABNORMAL,
    MAX_HEADER,
    NO_STATUS,
    Limits,
    WebSocketRelay,
    close_frame,
)

KEY = b"\x01\x02\x03\x04"


class Transcript:
    """client <-> relay <-> server; each send goes through at once (in `chunk`-byte pieces)."""

    def __init__(self, deflate: bool = False, limits: Limits | None = None, chunk: int = 0):
        ext_c: list[Any] = [PerMessageDeflate()] if deflate else []
        ext_s: list[Any] = [PerMessageDeflate()] if deflate else []
        if deflate:  # as if the handshake agreed on it (both sides' defaults)
            ext_c[0].finalize(ext_s[0].accept("permessage-deflate"))
        self.client = Connection(ConnectionType.CLIENT, extensions=ext_c)
        self.server = Connection(ConnectionType.SERVER, extensions=ext_s)
        self.relay = WebSocketRelay(0.0, limits=limits, permessage_deflate=deflate,
                                    mask_key=lambda: KEY)  # fmt: skip
        self.chunk = chunk
        self.now = 0.0
        self.at_client: list[Event] = []
        self.at_server: list[Event] = []
        self.forwarded_up: list[bytes] = []
        self.max_held = 0

    def _pieces(self, data: bytes) -> list[bytes]:
        if not self.chunk:
            return [data]
        return [data[i : i + self.chunk] for i in range(0, len(data), self.chunk)]

    def up(self, data: bytes) -> None:
        """Bytes from the client, through the relay, into the server."""
        for piece in self._pieces(data):
            out = self.relay.peer_data(piece, self.now)
            self.max_held = max(self.max_held, self.relay.held)
            self.forwarded_up.append(out.forward)
            if out.forward:
                self.server.receive_data(out.forward)
                self.at_server += list(self.server.events())
            if out.reply:
                self.client.receive_data(out.reply)
                self.at_client += list(self.client.events())

    def down(self, data: bytes) -> None:
        for piece in self._pieces(data):
            out = self.relay.destination_data(piece, self.now)
            self.max_held = max(self.max_held, self.relay.held)
            if out.forward:
                self.client.receive_data(out.forward)
                self.at_client += list(self.client.events())
            if out.reply:
                self.server.receive_data(out.reply)
                self.at_server += list(self.server.events())

    def client_sends(self, event: Event) -> None:
        self.up(self.client.send(event))

    def server_sends(self, event: Event) -> None:
        self.down(self.server.send(event))


def messages(events: list[Event]) -> list[tuple[str, Any]]:
    """Whole messages (wsproto hands over each message in the pieces that came)."""
    out: list[tuple[str, Any]] = []
    open_: list[Any] = []
    for e in events:
        if isinstance(e, Message):
            open_.append(e.data)
            if e.message_finished:
                kind = "text" if isinstance(e, TextMessage) else "bytes"
                out.append((kind, ("" if kind == "text" else b"").join(open_)))
                open_ = []
    return out


@pytest.mark.parametrize("chunk", [0, 1, 3, 7])
def test_messages_both_ways_and_the_close_handshake(chunk: int) -> None:
    t = Transcript(chunk=chunk)
    t.client_sends(TextMessage(data="hello"))
    t.client_sends(BytesMessage(data=b"\x00\x01" * 200))
    t.server_sends(TextMessage(data="héllo back"))
    t.server_sends(BytesMessage(data=b"z" * 70_000))  # a 64-bit length
    assert messages(t.at_server) == [("text", "hello"), ("bytes", b"\x00\x01" * 200)]
    assert messages(t.at_client) == [("text", "héllo back"), ("bytes", b"z" * 70_000)]
    t.now = 2.5
    t.client_sends(CloseConnection(code=1000, reason="bye"))
    (close,) = [e for e in t.at_server if isinstance(e, CloseConnection)]
    assert (close.code, close.reason) == (1000, "bye")
    t.server_sends(close.response())
    assert [e.code for e in t.at_client if isinstance(e, CloseConnection)] == [1000]
    s = t.relay.end(3.0)
    assert (s.messages_up, s.messages_down) == (2, 2)
    assert (s.bytes_up, s.bytes_down) == (5 + 400, len("héllo back".encode()) + 70_000)
    assert (s.close_code, s.close_reason, s.closed_by, s.error) == (1000, "bye", "peer", None)
    assert s.duration_ms == 3000.0
    assert t.max_held <= MAX_HEADER


def test_frames_go_on_byte_for_byte_and_a_big_frame_is_never_held() -> None:
    t = Transcript(chunk=64 * 1024)
    wire = t.client.send(BytesMessage(data=b"a" * (5 * 1024 * 1024)))
    t.up(wire)
    assert b"".join(t.forwarded_up) == wire  # the mask, the length: all as the client wrote
    # Each piece went on as it came (the header held for no piece of payload).
    assert [len(p) for p in t.forwarded_up] == [len(p) for p in t._pieces(wire)]
    assert t.max_held == 0
    assert messages(t.at_server) == [("bytes", b"a" * (5 * 1024 * 1024))]


def test_a_fragmented_message_counts_once_and_pings_pass_in_between() -> None:
    t = Transcript()
    t.client_sends(TextMessage(data="part1 ", message_finished=False))
    t.client_sends(Ping(payload=b"are you there"))
    t.client_sends(TextMessage(data="part2", message_finished=True))
    (ping,) = [e for e in t.at_server if isinstance(e, Ping)]
    t.server_sends(ping.response())
    assert [e.payload for e in t.at_client if isinstance(e, Pong)] == [b"are you there"]
    assert messages(t.at_server) == [("text", "part1 part2")]
    s = t.relay.summary()
    assert (s.messages_up, s.messages_down, s.bytes_up) == (1, 0, 11)


def test_permessage_deflate_passes_compressed() -> None:
    t = Transcript(deflate=True)
    text = "compress me " * 1000
    wire = t.client.send(TextMessage(data=text))
    assert len(wire) < len(text) // 10  # it really is compressed (RSV1 set)
    t.up(wire)
    t.server_sends(TextMessage(data=text))
    assert messages(t.at_server) == [("text", text)] == messages(t.at_client)
    assert t.relay.summary().bytes_up == len(wire) - 6  # the payload as sent: compressed


def test_no_close_frame_is_abnormal_and_an_empty_close_has_no_status() -> None:
    t = Transcript()
    t.client_sends(TextMessage(data="x"))
    assert t.relay.end(1.0).close_code == ABNORMAL
    t = Transcript()
    t.up(b"\x88\x80" + KEY)  # Close, masked, no payload
    assert t.relay.summary().close_code == NO_STATUS


def masked(first: int, payload: bytes, length_bytes: bytes | None = None) -> bytes:
    """A client frame by hand: `first` is FIN/RSV/opcode; `length_bytes` overrides the length."""
    body = bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
    if length_bytes is None:
        length_bytes = bytes((0x80 | len(payload),))
    return bytes((first,)) + length_bytes + KEY + body


@pytest.mark.parametrize(
    ("frame", "code", "why"),
    [
        (b"\x81\x02hi", 1002, "unmasked frame"),
        (masked(0x83, b""), 1002, "unknown opcode 0x3"),
        (masked(0x89, b"p" * 126, b"\xfe\x00\x7e"), 1002, "fragmented or long control frame"),
        (masked(0x09, b"p"), 1002, "fragmented or long control frame"),
        (masked(0x80, b"x"), 1002, "continuation without a message"),
        (masked(0xC1, b"x"), 1002, "reserved bits set"),  # RSV1 without permessage-deflate
        (masked(0xE1, b"x"), 1002, "reserved bits set"),
        (masked(0x81, b"x" * 5, b"\xfe\x00\x05"), 1002, "length not in its shortest form"),
        (masked(0x88, struct.pack("!H", 1005)), 1002, "invalid close code 1005"),
        (masked(0x88, b"\x03"), 1002, "one-byte Close payload"),
        (masked(0x88, struct.pack("!H", 1000) + b"\xff"), 1002, "close reason not UTF-8"),
        (masked(0x82, b"", b"\xff" + (1 << 20).to_bytes(8, "big")), 1009, "frame too big"),
    ],
)
def test_a_malformed_frame_from_the_peer_closes_both_sides(
    frame: bytes, code: int, why: str
) -> None:
    t = Transcript(limits=Limits(max_frame=1024))
    t.client_sends(TextMessage(data="before"))
    t.up(frame + masked(0x81, b"after"))
    assert messages(t.at_server) == [("text", "before")]  # nothing from the bad frame on
    (to_server,) = [e for e in t.at_server if isinstance(e, CloseConnection)]
    (to_client,) = [e for e in t.at_client if isinstance(e, CloseConnection)]
    assert (to_server.code, to_client.code) == (code, code) and to_client.reason == why
    s = t.relay.summary()
    assert s.error == f"peer: {why}" and (s.close_code, s.closed_by) == (code, "gateway")
    # Nothing more is relayed, either way.
    assert t.relay.destination_data(b"\x81\x01x", 1.0).forward == b""
    assert t.relay.peer_data(masked(0x81, b"x"), 1.0).failed


def test_a_masked_frame_from_the_server_and_data_after_close() -> None:
    t = Transcript()
    t.down(masked(0x81, b"x"))
    assert t.relay.summary().error == "destination: masked frame from server"
    (to_client,) = [e for e in t.at_client if isinstance(e, CloseConnection)]
    assert to_client.code == 1002
    t = Transcript()
    t.client_sends(CloseConnection(code=1001))
    out = t.relay.peer_data(masked(0x81, b"late"), 0.0)
    # The client closed already: no second Close goes to the server; it gets one back.
    assert out.failed and out.forward == b"" and out.reply == close_frame(1002, "data after Close")
    assert t.relay.summary().close_code == 1001  # the first Close's code stays


def test_a_ping_flood_ends_the_relay_with_policy_violation() -> None:
    t = Transcript(limits=Limits(control_burst=10, control_rate=1.0))
    for _ in range(10):
        t.client_sends(Ping(payload=b"p"))
    assert len([e for e in t.at_server if isinstance(e, Ping)]) == 10
    t.client_sends(Ping(payload=b"p"))
    assert t.relay.summary().error == "peer: too many control frames"
    assert [e.code for e in t.at_client if isinstance(e, CloseConnection)] == [1008]
    t = Transcript(limits=Limits(control_burst=10, control_rate=1.0))
    for i in range(30):  # at the rate: fine
        t.now = float(i)
        t.client_sends(Ping(payload=b"p"))
    assert t.relay.summary().error is None
