"""The control protocol, sans-IO: framing, messages and one server connection's rules.

A running gateway is reached through a Unix stream socket (`server.py`); the CLI (`client.py`)
and, later, consoles in other processes speak this protocol over it.

Framing: one JSON object per line (UTF-8, `\\n`-terminated; JSON escapes newlines inside
strings, so a line is always one whole message).  A line is at most MAX_MESSAGE bytes; a longer
one is fatal to the connection, since nothing in it can be trusted to find the next message.

Messages, told apart by their keys:

    server -> client, once on connect  {"hello": {"protocol": 1, "server": "0.1.0"}}
    client -> server                   {"id": 7, "method": "status", "params": {...}}
    server -> client                   {"id": 7, "result": ...}
                                       {"id": 7, "error": {"code": "...", "message": "..."}}
    server -> client, unasked          {"event": {"type": "...", ...}}

`id` is the client's (an integer or a short string) and comes back on its response; responses
may come in any order.  An error about a line that had no usable id carries `"id": null`.
Events are for subscriptions: a later `subscribe` method answers with a result and then pushes
events (the same dicts as `--no-ui --json` prints) on the same connection, interleaved with
responses; a client reads lines and sorts them by key, so this framing needs no change for it.

`ServerSession` is one connection's state on the server side: bytes in, commands out
(`Dispatch` a request to its handler, `Send` bytes, `Close`), tested as transcripts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1
MAX_MESSAGE = 64 * 1024  # bytes in one line, without its newline
MAX_IN_FLIGHT = 8  # requests of one connection whose responses are not sent yet
MAX_ID_LENGTH = 64
MAX_SAFE_INT = 2**53  # ids stay exact in every JSON reader (JavaScript's Number included)

_METHOD_RE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_REQUEST_KEYS = frozenset({"id", "method", "params"})


class ErrorCode(StrEnum):
    """The `code` of an error response; clients branch on these, so they never change."""

    BAD_JSON = "bad_json"  # the line is not UTF-8 JSON
    BAD_REQUEST = "bad_request"  # JSON, but not a request
    UNKNOWN_METHOD = "unknown_method"
    BAD_PARAMS = "bad_params"
    TOO_LARGE = "too_large"  # a message over MAX_MESSAGE (fatal when received)
    BUSY = "busy"  # too many requests in flight, or too many connections
    FORBIDDEN = "forbidden"  # the peer is another user
    IDLE = "idle"  # nothing asked for too long; the server closes
    INVALID = "invalid"  # the handler refused the request (a ValueError's one-line reason)
    NOT_FOUND = "not_found"  # the handler found no such thing (a KeyError)
    INTERNAL = "internal"  # a bug in a handler; the server logs it


class ProtocolError(Exception):
    """A message that breaks the protocol: what to answer (code, message) and about which id."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class ControlError(Exception):
    """An error response, raised by handlers to answer with it and by the client on receiving
    one.  code is an ErrorCode or a handler's own short code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = str(code)
        self.message = message


RequestId = int | str


@dataclass(frozen=True, slots=True)
class Hello:
    protocol: int
    server: str


@dataclass(frozen=True, slots=True)
class Request:
    id: RequestId
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Response:
    id: RequestId
    result: Any


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    id: RequestId | None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class EventMessage:
    event: dict[str, Any]


ServerMessage = Hello | Response | ErrorResponse | EventMessage


# --- framing ------------------------------------------------------------------------------------


class TooLarge(Exception):
    """A message over the bound."""


class LineDecoder:
    """Bytes in, whole lines out (without the newline), each at most max_line bytes.

    The buffer never holds more than max_line bytes of an unfinished line: a longer line sets
    `overflow` (why, naming the line) as soon as it is seen, not when (if ever) its newline
    comes; the lines before it are still returned, and nothing after it, ever."""

    def __init__(self, max_line: int = MAX_MESSAGE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self.lines_seen = 0  # for errors that name the line
        self.overflow: str | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.overflow is not None:
            return []
        self._buffer += data
        lines: list[bytes] = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0 and end - start <= self.max_line:
            lines.append(bytes(self._buffer[start:end]))
            self.lines_seen += 1
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.max_line:
            self.overflow = f"line {self.lines_seen + 1} is over {self.max_line} bytes"
            self._buffer.clear()
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line."""
        return len(self._buffer)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # two readers could take either value: refuse both
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json_line(line: bytes, number: int) -> Any:
    """One line as JSON, strictly (no NaN, no duplicate keys); ProtocolError(BAD_JSON) naming
    the line otherwise."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            ErrorCode.BAD_JSON, f"line {number}: not UTF-8 (byte {exc.start})"
        ) from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            ErrorCode.BAD_JSON, f"line {number}: invalid JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"line {number}: invalid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_JSON, f"line {number}: nested too deeply") from None


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as its line.  Raises TypeError/ValueError if it is not JSON (a handler's
    result that is not), TooLarge if the line would be over MAX_MESSAGE."""
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_MESSAGE:
        raise TooLarge(f"message of {len(data)} bytes is over {MAX_MESSAGE}")
    return data + b"\n"


# --- messages -----------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_id(value: Any) -> RequestId | None:
    if _is_int(value) and -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        return value
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH:
        return value
    return None


def parse_request(doc: Any, number: int) -> Request:
    """A parsed line as a Request; ProtocolError(BAD_REQUEST) saying what is wrong, with the id
    when the line had a usable one (so the client can match the error)."""
    where = f"line {number}"
    if not isinstance(doc, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: a request is a JSON object")
    request_id = _valid_id(doc.get("id"))

    def bad(what: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: {what}", request_id)

    unknown = sorted(set(doc) - _REQUEST_KEYS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r} (a request has id, method, params)")
    if request_id is None:
        raise bad(
            f"'id' must be an integer within ±2**53 or a string of 1-{MAX_ID_LENGTH} characters"
        )
    method = doc.get("method")
    if not isinstance(method, str) or not _METHOD_RE.fullmatch(method):
        raise bad("'method' must be a name like 'status' (a-z, 0-9, '_', '.')")
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise bad("'params' must be an object")
    return Request(request_id, method, params)


def is_method_name(name: str) -> bool:
    return _METHOD_RE.fullmatch(name) is not None


def request_line(request: Request) -> bytes:
    return encode({"id": request.id, "method": request.method, "params": request.params})


def response_line(request_id: RequestId, result: Any) -> bytes:
    return encode({"id": request_id, "result": result})


def error_line(request_id: RequestId | None, code: str, message: str) -> bytes:
    return encode({"id": request_id, "error": {"code": str(code), "message": message}})


def hello_line(server_version: str) -> bytes:
    return encode({"hello": {"protocol": PROTOCOL_VERSION, "server": server_version}})


def event_line(event: Mapping[str, Any]) -> bytes:
    return encode({"event": dict(event)})


def parse_server_message(doc: Any, number: int) -> ServerMessage:
    """A parsed line from the server; ProtocolError(BAD_REQUEST) if it is none of the four."""
    where = f"line {number} from the gateway"
    if isinstance(doc, dict):
        keys = set(doc)
        if keys == {"hello"} and isinstance(doc["hello"], dict):
            hello = doc["hello"]
            if _is_int(hello.get("protocol")) and isinstance(hello.get("server"), str):
                return Hello(hello["protocol"], hello["server"])
        elif keys == {"event"} and isinstance(doc["event"], dict):
            return EventMessage(doc["event"])
        elif keys == {"id", "result"} and _valid_id(doc["id"]) is not None:
            return Response(doc["id"], doc["result"])
        elif keys == {"id", "error"} and (doc["id"] is None or _valid_id(doc["id"]) is not None):
            error = doc["error"]
            if (
                isinstance(error, dict)
                and isinstance(error.get("code"), str)
                and isinstance(error.get("message"), str)
            ):
                return ErrorResponse(doc["id"], error["code"], error["message"])
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: not a control message")


# --- params -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Param:
    """One parameter of a method: its JSON type(s) and whether it may be left out."""

    types: type | tuple[type, ...]
    required: bool = True


ParamSpec = Mapping[str, Param]

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object", type(None): "null"}  # fmt: skip


def _matches(value: Any, t: type) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return _is_int(value)
    if t is float:  # an integer is a number too; NaN and infinities never reach here
        return _is_int(value) or isinstance(value, float)
    return isinstance(value, t)


def validate_params(method: str, spec: ParamSpec, params: dict[str, Any]) -> dict[str, Any]:
    """params checked against spec: no unknown names, every required one present, each of
    its type (bool is not an integer); ProtocolError(BAD_PARAMS) naming the first problem."""
    for name in params:
        if name not in spec:
            known = ", ".join(sorted(spec)) or "none"
            raise ProtocolError(
                ErrorCode.BAD_PARAMS, f"{method}: unknown parameter {name!r} (takes: {known})"
            )
    for name, param in spec.items():
        types = param.types if isinstance(param.types, tuple) else (param.types,)
        if name not in params:
            if param.required:
                raise ProtocolError(ErrorCode.BAD_PARAMS, f"{method}: {name!r} is required")
            continue
        if not any(_matches(params[name], t) for t in types):
            expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise ProtocolError(ErrorCode.BAD_PARAMS, f"{method}: {name!r} must be {expected}")
    return dict(params)


# --- one server connection ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run this request's handler, then answer with `ServerSession.respond` / `.fail`."""

    request: Request


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection once what was sent before is written."""

    reason: str


Command = Dispatch | Send | Close


class ServerSession:
    """The server's side of one connection: bytes in, commands out; no IO, no clock.

    A request for a known method with valid params is dispatched; anything else gets an error
    response and the connection goes on (the line was whole and bounded, so the next one
    starts cleanly).  A line over the bound gets one error and Close (the whole lines before it
    were dispatched already).  More than max_in_flight unanswered requests: the excess get BUSY.
    """

    def __init__(
        self,
        server_version: str,
        *,
        methods: Mapping[str, ParamSpec],
        max_message: int = MAX_MESSAGE,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.server_version = server_version
        self.methods = methods  # the server's table, read at each request (it may grow)
        self.max_in_flight = max_in_flight
        self._decoder = LineDecoder(max_message)
        self._in_flight: set[RequestId] = set()
        self.closed = False

    def start(self) -> list[Command]:
        return [Send(hello_line(self.server_version))]

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def receive(self, data: bytes) -> list[Command]:
        if self.closed:
            return []
        commands = self._lines(self._decoder.feed(data))
        if self._decoder.overflow is not None:
            commands += self.close(ErrorCode.TOO_LARGE, f"{self._decoder.overflow}; closing")
        return commands

    def _lines(self, lines: list[bytes]) -> list[Command]:
        commands: list[Command] = []
        first = self._decoder.lines_seen - len(lines) + 1
        for number, line in enumerate(lines, start=first):
            if not line.strip():
                continue  # an empty line: harmless (a person typing into socat)
            try:
                request = self._request(line, number)
            except ProtocolError as exc:
                commands.append(Send(error_line(exc.request_id, exc.code, exc.message)))
                continue
            if request.id in self._in_flight:
                message = f"line {number}: id {request.id!r} is already in use by a request"
                commands.append(Send(error_line(None, ErrorCode.BAD_REQUEST, message)))
            elif len(self._in_flight) >= self.max_in_flight:
                message = f"more than {self.max_in_flight} requests unanswered; send fewer at once"
                commands.append(Send(error_line(request.id, ErrorCode.BUSY, message)))
            else:
                self._in_flight.add(request.id)
                commands.append(Dispatch(request))
        return commands

    def _request(self, line: bytes, number: int) -> Request:
        request = parse_request(parse_json_line(line, number), number)
        spec = self.methods.get(request.method)
        if spec is None:
            known = ", ".join(sorted(self.methods))
            raise ProtocolError(
                ErrorCode.UNKNOWN_METHOD,
                f"line {number}: unknown method {request.method!r} (known: {known})",
                request.id,
            )
        try:
            params = validate_params(request.method, spec, request.params)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, f"line {number}: {exc.message}", request.id) from None
        return Request(request.id, request.method, params)

    def respond(self, request_id: RequestId, result: Any) -> list[Command]:
        """The result of a dispatched request; an error instead if it is not JSON or too big."""
        try:
            line = response_line(request_id, result)
        except TooLarge as exc:
            return self.fail(request_id, ErrorCode.TOO_LARGE, f"the result is too large: {exc}")
        except (TypeError, ValueError) as exc:
            return self.fail(request_id, ErrorCode.INTERNAL, f"the result is not JSON: {exc}")
        return self._answer(request_id, line)

    def fail(self, request_id: RequestId, code: str, message: str) -> list[Command]:
        try:
            line = error_line(request_id, code, message)
        except TooLarge:
            line = error_line(request_id, code, message[:1024] + "…")
        return self._answer(request_id, line)

    def _answer(self, request_id: RequestId, line: bytes) -> list[Command]:
        if request_id not in self._in_flight:
            raise ValueError(f"no request {request_id!r} in flight")
        self._in_flight.discard(request_id)
        return [] if self.closed else [Send(line)]

    def close(self, code: ErrorCode, message: str) -> list[Command]:
        """Close from the server's side (idle, shutting down), telling the client why."""
        if self.closed:
            return []
        self.closed = True
        return [Send(error_line(None, code, message)), Close(message)]
