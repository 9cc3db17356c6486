"""Sans-IO WebSocket relay (RFC 6455) for a connection upgraded inside intercepted TLS.

After an HTTP/1.1 `Upgrade: websocket` answered with 101, the two sides speak WebSocket
frames. `WebSocketRelay` checks and counts them as they pass, frame for frame and byte for
byte: the caller feeds each side's decrypted bytes (`peer_data`, `destination_data`) with the
monotonic time and sends on what comes back (`Relayed.forward`). A frame's header is held until
it is whole and checked (at most 14 bytes), a control frame until it is whole (at most 125
bytes of payload, so a Close is read before it goes on), and data frames' payload goes on as
it arrives: no frame and no message is ever assembled here, whatever its size.

Why byte for byte rather than re-encoding each frame with wsproto's Connection: the frames
stay exactly as the endpoints wrote them (fragmentation, masks, and the compressed payload of
permessage-deflate, RFC 7692, which a re-encoding relay would have to inflate: unbounded per
frame), and nothing but a header is copied. wsproto is the reference the tests check this
against, at both ends.

Checked per frame: the opcode, the reserved bits (RSV1 only where permessage-deflate was
agreed, on a message's first frame), masking (the peer masks, the destination does not),
the minimal length encoding, `max_frame`, control frames short and unfragmented, continuation
order, the Close payload (a valid code, a UTF-8 reason), nothing after a side's Close, and
control frames against a token bucket (a ping flood). Ping, Pong and Close are relayed as the
endpoints sent them: answering them is the endpoints' business.

A malformed frame (or a flood) from one side fails the relay: what came before it goes on,
then a Close (1002 protocol error, 1009 too big, 1008 policy) to each side that has not sent
its own Close yet (`Relayed.forward` for the other side, `Relayed.reply` for the sender), and
nothing more is relayed. `summary()` has the counts, the close code and reason, and the error.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Opcodes (RFC 6455 5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = frozenset({CONTINUATION, TEXT, BINARY})
CONTROL_OPCODES = frozenset({CLOSE, PING, PONG})
RSV1, RSV2, RSV3 = 0x40, 0x20, 0x10
MAX_CONTROL_PAYLOAD = 125
MAX_HEADER = 14  # 2 + 8 (64-bit length) + 4 (mask)

# Close codes (RFC 6455 7.4.1): the ones a relay may send, and the ones reported.
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
NO_STATUS = 1005  # a Close frame without a code
ABNORMAL = 1006  # the connection ended without a Close frame
# Codes a Close frame may carry: the defined ones but 1004-1006 and 1015, and 3000-4999.
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})

DEFAULT_MAX_FRAME = 64 * 1024 * 1024  # payload bytes of one frame (it is never held)


def valid_close_code(code: int) -> bool:
    return code in _SENDABLE or 3000 <= code <= 4999


def close_frame(code: int, reason: str = "", mask_key: bytes | None = None) -> bytes:
    """A Close frame; masked with `mask_key` (4 bytes) when it goes to a server."""
    payload = struct.pack("!H", code) + reason.encode()[: MAX_CONTROL_PAYLOAD - 2]
    if mask_key is None:
        return bytes((0x80 | CLOSE, len(payload))) + payload
    return bytes((0x80 | CLOSE, 0x80 | len(payload))) + mask_key + _unmask(payload, mask_key)


def _unmask(data: bytes, key: bytes) -> bytes:
    """XOR with the repeated 4-byte key (its own inverse); short data only (control frames)."""
    return bytes(b ^ key[i & 3] for i, b in enumerate(data))


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = DEFAULT_MAX_FRAME
    # Control frames per side: a burst, then so many a second (a ping flood ends the relay).
    control_burst: int = 1000
    control_rate: float = 500.0


@dataclass(slots=True)
class WebSocketSummary:
    """What a WebSocket connection carried ("up": from the peer to the destination)."""

    messages_up: int = 0
    messages_down: int = 0
    bytes_up: int = 0  # data frames' payload bytes (as sent: compressed if it was)
    bytes_down: int = 0
    close_code: int | None = None  # the first Close's (1005: none in it; 1006: no Close came)
    close_reason: str = ""
    closed_by: str | None = None  # "peer" or "destination": who sent the first Close
    error: str | None = None  # why the relay failed (a malformed frame, a flood)
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Relayed:
    """What one call gives back: bytes for the other side, bytes back to the sender (a Close
    after a failure), and whether the relay is over (failed: stop carrying)."""

    forward: bytes = b""
    reply: bytes = b""
    failed: bool = False


class _Failure(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Bucket:
    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate, self.tokens = burst, rate, float(burst)
        self.last: float | None = None

    def take(self, now: float) -> bool:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(slots=True)
class _Direction:
    """One direction's frame parser: where it is in the current frame."""

    masked: bool  # frames from this side must be masked (the client's)
    rsv_allowed: int
    limits: Limits
    bucket: _Bucket
    header: bytearray = field(default_factory=bytearray)
    opcode: int = 0
    left: int = 0  # payload bytes of the current frame still to come
    in_payload: bool = False
    control: bytearray | None = None  # a control frame's header + payload, held until whole
    mask_key: bytes = b""
    fin: bool = False
    in_message: bool = False  # a fragmented message is open
    closed: bool = False  # this side sent Close
    messages: int = 0
    bytes: int = 0
    frames: int = 0


class WebSocketRelay:
    """One upgraded connection (see the module docstring). `permessage_deflate`: the 101 agreed
    on it (RSV1 allowed on data). `mask_key` makes the masks of Close frames we send (tests
    pass a fixed one)."""

    def __init__(
        self,
        now: float,
        *,
        limits: Limits | None = None,
        permessage_deflate: bool = False,
        mask_key: Callable[[], bytes] = lambda: os.urandom(4),
    ) -> None:
        self.limits = limits or Limits()
        rsv = RSV1 if permessage_deflate else 0
        lim = self.limits
        self._up = _Direction(True, rsv, lim, _Bucket(lim.control_burst, lim.control_rate))
        self._down = _Direction(False, rsv, lim, _Bucket(lim.control_burst, lim.control_rate))
        self._mask_key = mask_key
        self.started = now
        self.ended: float | None = None
        self.failed = False
        self.error: str | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_by: str | None = None

    # -- input ---------------------------------------------------------------------------------

    def peer_data(self, data: bytes, now: float) -> Relayed:
        return self._feed(self._up, self._down, "peer", data, now)

    def destination_data(self, data: bytes, now: float) -> Relayed:
        return self._feed(self._down, self._up, "destination", data, now)

    def end(self, now: float) -> WebSocketSummary:
        """The connection is over (both ways, or cut): the summary."""
        if self.ended is None:
            self.ended = now
        return self.summary()

    @property
    def held(self) -> int:
        """Bytes held now (partial headers and control frames), for the tests' bound."""
        return sum(
            len(d.header) + (len(d.control) if d.control is not None else 0)
            for d in (self._up, self._down)
        )

    def summary(self) -> WebSocketSummary:
        end = self.ended if self.ended is not None else self.started
        code = self.close_code
        if code is None and not self.failed:
            code = ABNORMAL
        return WebSocketSummary(
            messages_up=self._up.messages,
            messages_down=self._down.messages,
            bytes_up=self._up.bytes,
            bytes_down=self._down.bytes,
            close_code=code,
            close_reason=self.close_reason,
            closed_by=self.closed_by,
            error=self.error,
            duration_ms=round(max(0.0, end - self.started) * 1000, 3),
        )

    # -- the frame walk ------------------------------------------------------------------------

    def _feed(
        self, d: _Direction, other: _Direction, side: str, data: bytes, now: float
    ) -> Relayed:
        if self.failed or not data:
            return Relayed(failed=self.failed)
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        try:
            self._walk(d, side, view, out, now)
        except _Failure as exc:
            self.failed = True
            self.error = f"{side}: {exc.reason}"
            if self.close_code is None:
                self.close_code, self.close_reason = exc.code, exc.reason
                self.closed_by = "gateway"
            # A Close to each side that has not closed already: masked toward the server.
            forward = b"".join(out)
            if not d.closed:
                key = self._mask_key() if d.masked else None
                forward += close_frame(exc.code, exc.reason, key)
            reply = b""
            if not other.closed:
                reply = close_frame(
                    exc.code, exc.reason, self._mask_key() if other.masked else None
                )
            d.closed = other.closed = True
            return Relayed(forward, reply, True)
        if len(out) == 1 and len(out[0]) == len(data):
            return Relayed(data)  # the usual case: the whole chunk goes on as it came
        return Relayed(b"".join(out))

    def _walk(
        self, d: _Direction, side: str, view: memoryview, out: list[bytes | memoryview], now: float
    ) -> None:
        pos, end = 0, len(view)
        run = 0  # data payload from here to pos goes on unchanged, as one slice
        while pos < end:
            if d.in_payload:
                n = min(d.left, end - pos)
                if d.control is not None:
                    d.control += view[pos : pos + n]
                    run = pos + n
                else:
                    d.bytes += n
                pos += n
                d.left -= n
                if d.left == 0:
                    self._frame_done(d, side, out)
                continue
            # A frame boundary: what went by so far goes on first.
            if run < pos:
                out.append(view[run:pos])
            if d.closed:
                raise _Failure(CLOSE_PROTOCOL_ERROR, "data after Close")
            need = self._header_length(d, view, pos, end)
            take = min(need - len(d.header), end - pos)
            d.header += view[pos : pos + take]
            pos = run = pos + take
            if len(d.header) < need:
                break  # held: the rest of the header comes later
            header = bytes(d.header)
            d.header.clear()
            self._start_frame(d, header, now)
            d.in_payload = True
            if d.control is not None:
                d.control += header
            else:
                out.append(header)
            if d.left == 0:
                self._frame_done(d, side, out)
        if run < pos:
            out.append(view[run:pos])

    def _frame_done(self, d: _Direction, side: str, out: list[bytes | memoryview]) -> None:
        d.in_payload = False
        if d.control is not None:
            frame = bytes(d.control)
            d.control = None
            self._control(d, side, frame)
            out.append(frame)
        elif d.fin:
            d.messages += 1

    def _header_length(self, d: _Direction, view: memoryview, pos: int, end: int) -> int:
        """The length of the header starting (or continuing) here: 2 until its second byte
        is known."""
        held = d.header
        if len(held) >= 2:
            second = held[1]
        elif len(held) == 1:
            second = view[pos]
        elif end - pos >= 2:
            second = view[pos + 1]
        else:
            return 2
        length7 = second & 0x7F
        return (
            2 + (2 if length7 == 126 else 8 if length7 == 127 else 0) + (4 if second & 0x80 else 0)
        )

    def _start_frame(self, d: _Direction, header: bytes, now: float) -> None:
        first, second = header[0], header[1]
        fin, rsv, opcode = bool(first & 0x80), first & 0x70, first & 0x0F
        masked = bool(second & 0x80)
        length = second & 0x7F
        at = 2
        if length == 126:
            (length,) = struct.unpack_from("!H", header, 2)
            at = 4
            if length < 126:
                raise _Failure(CLOSE_PROTOCOL_ERROR, "length not in its shortest form")
        elif length == 127:
            (length,) = struct.unpack_from("!Q", header, 2)
            at = 10
            if length >> 63 or length <= 0xFFFF:
                raise _Failure(CLOSE_PROTOCOL_ERROR, "bad 64-bit length")
        if masked != d.masked:
            raise _Failure(
                CLOSE_PROTOCOL_ERROR, "unmasked frame" if d.masked else "masked frame from server"
            )
        if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
            raise _Failure(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if opcode in CONTROL_OPCODES:
            if not fin or length > MAX_CONTROL_PAYLOAD:
                raise _Failure(CLOSE_PROTOCOL_ERROR, "fragmented or long control frame")
            if rsv:
                raise _Failure(CLOSE_PROTOCOL_ERROR, "reserved bits on a control frame")
            if not d.bucket.take(now):
                raise _Failure(CLOSE_POLICY, "too many control frames")
            d.control = bytearray()
        else:
            if rsv & ~d.rsv_allowed or (rsv and opcode == CONTINUATION):
                raise _Failure(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            if length > self.limits.max_frame:
                raise _Failure(CLOSE_TOO_BIG, "frame too big")
            if opcode == CONTINUATION and not d.in_message:
                raise _Failure(CLOSE_PROTOCOL_ERROR, "continuation without a message")
            if opcode != CONTINUATION and d.in_message:
                raise _Failure(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
            d.in_message = not fin
        d.frames += 1
        d.opcode, d.fin, d.left = opcode, fin, length
        d.mask_key = header[at : at + 4] if masked else b""

    def _control(self, d: _Direction, side: str, frame: bytes) -> None:
        """A whole control frame (header and payload), checked before it goes on."""
        if d.opcode != CLOSE:
            return
        payload = frame[len(frame) - (frame[1] & 0x7F) :]  # control: the 7-bit length
        if d.mask_key:
            payload = _unmask(payload, d.mask_key)
        if len(payload) == 1:
            raise _Failure(CLOSE_PROTOCOL_ERROR, "one-byte Close payload")
        code, reason = NO_STATUS, ""
        if payload:
            (code,) = struct.unpack_from("!H", payload)
            if not valid_close_code(code):
                raise _Failure(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise _Failure(CLOSE_PROTOCOL_ERROR, "close reason not UTF-8") from None
        d.closed = True
        if self.close_code is None:
            self.close_code, self.close_reason, self.closed_by = code, reason, side
