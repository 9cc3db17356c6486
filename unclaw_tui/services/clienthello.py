"""Sans-IO TLS ClientHello parser: SNI and ALPN from the first bytes of a connection.

`parse(data)` looks at everything a client has sent so far (`HelloParser.feed` the same, piece
by piece as it arrives, in linear time) and answers one of:
- `NeedMore`: a ClientHello so far, not complete yet (read more, within the caller's bounds);
- `NotTls`: not a TLS ClientHello (garbage, another protocol, a malformed or oversized hello);
- `ClientHello`: the parsed hello (SNI, ALPN protocols) and how many bytes its records took.

The hello may span several TLS records (RFC 8446 5.1 allows a handshake message fragmented
across records). Everything is bounded: records are at most 2^14 bytes, and the whole hello at
most `max_size` bytes of records, so a client cannot make us buffer more than that. The parser
never raises on any input (fuzzed with hypothesis in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

RECORD_HEADER = 5
HANDSHAKE_HEADER = 4
CONTENT_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
MAX_RECORD_PAYLOAD = 1 << 14  # RFC 8446 5.1: TLSPlaintext.length MUST NOT exceed 2^14
DEFAULT_MAX_SIZE = 16 * 1024

EXT_SERVER_NAME = 0
EXT_ALPN = 16
SNI_HOST_NAME = 0


@dataclass(frozen=True, slots=True)
class NeedMore:
    """A valid prefix of a ClientHello; read more."""


@dataclass(frozen=True, slots=True)
class NotTls:
    reason: str


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str | None  # the host_name of server_name, lower-case, without a trailing dot
    alpn: tuple[str, ...]  # the client's protocols in its order of preference
    size: int  # bytes of the records that carried the hello (the rest is later data)


Result = NeedMore | NotTls | ClientHello


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds-checked reads over a bytes object; any overrun raises _Malformed."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise _Malformed(f"{what} overruns its container")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def take_all(self) -> bytes:
        return self.take(self.left(), "vector")

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def sub(self, length_size: int, what: str) -> _Reader:
        """A reader over the next length-prefixed vector, skipped in this one."""
        return _Reader(self.take(self.uint(length_size, f"{what} length"), what))


def parse(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Result:
    """Parse the start of a client's byte stream (see the module docstring)."""
    return HelloParser(max_size).feed(data)


class HelloParser:
    """`parse` for a stream read in pieces: `feed` each piece as it arrives.

    Records already walked are not walked again, so the cost is linear in the bytes fed.
    Re-parsing from the start on every read would be quadratic: a hello cut into one-byte
    records, sent in tiny segments, cost seconds of CPU per connection within the byte bound.
    Once the answer is not `NeedMore` it stays that answer."""

    __slots__ = ("_handshake", "_needed", "_pos", "_result", "data", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self.data = bytearray()  # everything fed so far
        self._pos = 0  # the end of the last whole record walked
        self._handshake = bytearray()  # the handshake bytes of those records
        self._needed: int | None = None  # handshake bytes of the whole hello, once known
        self._result: Result = NeedMore()

    def feed(self, data: bytes) -> Result:
        if isinstance(self._result, NeedMore):
            self.data += data
            self._result = self._walk()
        return self._result

    def _walk(self) -> Result:
        data, max_size, handshake = self.data, self.max_size, self._handshake
        while True:
            if self._needed is not None and len(handshake) >= self._needed:
                break
            pos = self._pos
            if len(data) - pos < RECORD_HEADER:
                return _need_more(data, pos, max_size, partial=len(data) > pos)
            content_type = data[pos]
            major = data[pos + 1]
            length = int.from_bytes(data[pos + 3 : pos + 5], "big")
            if content_type != CONTENT_HANDSHAKE:
                return NotTls("not a TLS handshake record")
            if major != 3:
                return NotTls("not a TLS record version")
            if length == 0 or length > MAX_RECORD_PAYLOAD:
                return NotTls(f"bad TLS record length {length}")
            if pos + RECORD_HEADER + length > max_size:
                return NotTls(f"ClientHello larger than {max_size} bytes")
            if len(data) < pos + RECORD_HEADER + length:
                return NeedMore()
            handshake += data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
            self._pos = pos + RECORD_HEADER + length
            if self._needed is None and len(handshake) >= HANDSHAKE_HEADER:
                if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                    return NotTls("first handshake message is not a ClientHello")
                self._needed = HANDSHAKE_HEADER + int.from_bytes(handshake[1:4], "big")
                if self._needed > max_size:
                    return NotTls(f"ClientHello larger than {max_size} bytes")
        try:
            sni, alpn = _parse_body(bytes(handshake[HANDSHAKE_HEADER : self._needed]))
        except _Malformed as exc:
            return NotTls(f"malformed ClientHello: {exc}")
        return ClientHello(sni=sni, alpn=alpn, size=self._pos)


def _need_more(data: bytes | bytearray, pos: int, max_size: int, *, partial: bool) -> Result:
    if pos >= max_size:
        return NotTls(f"ClientHello larger than {max_size} bytes")
    if partial:
        # Judge a partial record header by what is there, so garbage fails at its first byte.
        if data[pos] != CONTENT_HANDSHAKE:
            return NotTls("not a TLS handshake record")
        if len(data) - pos >= 2 and data[pos + 1] != 3:
            return NotTls("not a TLS record version")
    return NeedMore()


def _parse_body(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    r = _Reader(body)
    r.take(2, "legacy_version")
    r.take(32, "random")
    session_id = r.sub(1, "session_id")
    if session_id.left() > 32:
        raise _Malformed("session_id longer than 32 bytes")
    suites = r.sub(2, "cipher_suites")
    if suites.left() == 0 or suites.left() % 2:
        raise _Malformed("bad cipher_suites length")
    compression = r.sub(1, "compression_methods")
    if compression.left() == 0:
        raise _Malformed("no compression methods")
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    if r.left() == 0:
        return sni, alpn  # no extensions at all (old clients)
    extensions = r.sub(2, "extensions")
    seen: set[int] = set()
    while extensions.left():
        ext_type = extensions.uint(2, "extension type")
        ext = extensions.sub(2, "extension")
        if ext_type in seen:
            raise _Malformed(f"duplicate extension {ext_type}")
        seen.add(ext_type)
        if ext_type == EXT_SERVER_NAME:
            sni = _parse_server_name(ext)
        elif ext_type == EXT_ALPN:
            alpn = _parse_alpn(ext)
    return sni, alpn


def _parse_server_name(ext: _Reader) -> str | None:
    names = ext.sub(2, "server_name_list")
    host: str | None = None
    while names.left():
        name_type = names.uint(1, "server name type")
        name = names.sub(2, "server name").take_all()
        if name_type == SNI_HOST_NAME and host is None:
            if not name:
                raise _Malformed("empty host_name")
            try:
                text = name.decode("ascii")
            except UnicodeDecodeError:
                raise _Malformed("host_name is not ASCII") from None
            host = text.lower().rstrip(".") or None
    return host


def _parse_alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.sub(2, "protocol_name_list")
    out: list[str] = []
    while protocols.left():
        name = protocols.sub(1, "protocol name").take_all()
        if not name:
            raise _Malformed("empty ALPN protocol name")
        # Protocol names are opaque bytes; latin-1 keeps every one representable and reversible.
        out.append(name.decode("latin-1"))
    return tuple(out)
