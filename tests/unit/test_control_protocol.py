"""The control protocol without IO: framing, messages and one server connection, as
transcripts of bytes in and commands out, hostile input included."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unclaw_tui.control.protocol import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    Close,
    Command,
    Dispatch,
    ErrorResponse,
    EventMessage,
    Hello,
    LineDecoder,
    Param,
    ProtocolError,
    Request,
    Response,
    Send,
    ServerSession,
    TooLarge,
    encode,
    event_line,
    parse_json_line,
    parse_server_message,
    validate_params,
)

METHODS = {
    "ping": {},
    "status": {},
    "decide": {"id": Param(str), "verdict": Param(str), "for": Param(str, required=False)},
    "wait": {"seconds": Param(float)},
}


def session(**kwargs: Any) -> ServerSession:
    s = ServerSession("0.1.0", methods=METHODS, **kwargs)
    hello = {"hello": {"protocol": PROTOCOL_VERSION, "server": "0.1.0"}}
    assert shown(s.start()) == [("send", hello)]
    return s


def shown(commands: list[Command]) -> list[tuple[Any, ...]]:
    """Commands as readable tuples: a Send as its decoded message."""
    out: list[tuple[Any, ...]] = []
    for command in commands:
        if isinstance(command, Send):
            assert command.data.endswith(b"\n") and command.data.count(b"\n") == 1
            assert len(command.data) <= MAX_MESSAGE + 1
            out.append(("send", json.loads(command.data)))
        elif isinstance(command, Dispatch):
            r = command.request
            out.append(("dispatch", r.id, r.method, r.params))
        else:
            assert isinstance(command, Close)
            out.append(("close",))
    return out


def error(request_id: Any, code: str, message: str) -> tuple[str, dict[str, Any]]:
    return ("send", {"id": request_id, "error": {"code": code, "message": message}})


# --- the happy path -------------------------------------------------------------------------


def test_a_request_is_dispatched_and_its_result_sent() -> None:
    s = session()
    assert shown(s.receive(b'{"id": 1, "method": "status"}\n')) == [("dispatch", 1, "status", {})]
    assert s.in_flight == 1
    assert shown(s.respond(1, {"peers": 2})) == [("send", {"id": 1, "result": {"peers": 2}})]
    assert s.in_flight == 0


def test_requests_split_anywhere_and_batched_give_the_same_commands() -> None:
    data = (
        b'{"id":1,"method":"ping"}\n'
        b'{"id":"b","method":"decide","params":{"id":"7","verdict":"allow"}}\n'
    )
    expected = [
        ("dispatch", 1, "ping", {}),
        ("dispatch", "b", "decide", {"id": "7", "verdict": "allow"}),
    ]
    assert shown(session().receive(data)) == expected
    byte_by_byte = session()
    got: list[Command] = []
    for i in range(len(data)):
        got += byte_by_byte.receive(data[i : i + 1])
    assert shown(got) == expected


def test_blank_lines_and_crlf_are_tolerated() -> None:
    s = session()
    commands = s.receive(b'\n  \r\n{"id":1,"method":"ping"}\r\n')
    assert shown(commands) == [("dispatch", 1, "ping", {})]


def test_responses_may_come_in_any_order() -> None:
    s = session()
    s.receive(b'{"id":1,"method":"ping"}\n{"id":2,"method":"ping"}\n')
    assert shown(s.respond(2, "pong")) == [("send", {"id": 2, "result": "pong"})]
    assert shown(s.respond(1, "pong")) == [("send", {"id": 1, "result": "pong"})]
    with pytest.raises(ValueError, match="no request 1 in flight"):
        s.respond(1, "again")


NOT_SERIALIZABLE = "Object of type object is not JSON serializable"


def test_handler_errors_and_unencodable_or_huge_results_become_error_responses() -> None:
    s = session()
    s.receive(b'{"id":1,"method":"ping"}\n{"id":2,"method":"ping"}\n{"id":3,"method":"ping"}\n')
    assert shown(s.fail(1, "not_found", "no prompt 7")) == [error(1, "not_found", "no prompt 7")]
    assert shown(s.respond(2, {"x": object()})) == [
        error(2, "internal", "the result is not JSON: " + NOT_SERIALIZABLE)
    ]
    [(_, message)] = shown(s.respond(3, "x" * MAX_MESSAGE))
    assert message["error"]["code"] == "too_large"
    assert s.in_flight == 0


# --- hostile input: each line gets a precise error, and the next line is served --------------


BAD_ID = "line 1: 'id' must be an integer within ±2**53 or a string of 1-64 characters"
BAD_METHOD = "line 1: 'method' must be a name like 'status' (a-z, 0-9, '_', '.')"
BAD_OPEN = "line 1: invalid JSON: Expecting property name enclosed in double quotes at column 2"
KNOWN = "(known: decide, ping, status, wait)"


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        (b"{", (None, "bad_json", BAD_OPEN)),
        (b"\xff\xfe{}", (None, "bad_json", "line 1: not UTF-8 (byte 0)")),
        (
            b'{"id":1,"method":"ping","params":{"x":NaN}}',
            (None, "bad_json", "line 1: invalid JSON: NaN is not JSON"),
        ),
        (
            b'{"id":1,"id":2,"method":"ping"}',
            (None, "bad_json", "line 1: invalid JSON: duplicate key 'id'"),
        ),
        (b"[" * 30000 + b"]" * 30000, (None, "bad_json", "line 1: nested too deeply")),
        (b"[1,2]", (None, "bad_request", "line 1: a request is a JSON object")),
        (b'"ping"', (None, "bad_request", "line 1: a request is a JSON object")),
        (b'{"method":"ping"}', (None, "bad_request", BAD_ID)),
        (b'{"id":true,"method":"ping"}', (None, "bad_request", BAD_ID)),
        (b'{"id":1.5,"method":"ping"}', (None, "bad_request", BAD_ID)),
        (b'{"id":9007199254740993,"method":"ping"}', (None, "bad_request", BAD_ID)),
        (b'{"id":"' + b"x" * 65 + b'","method":"ping"}', (None, "bad_request", BAD_ID)),
        (b'{"id":1,"method":7}', (1, "bad_request", BAD_METHOD)),
        (b'{"id":1,"method":"Ping!"}', (1, "bad_request", BAD_METHOD)),
        (
            b'{"id":1,"method":"ping","params":[]}',
            (1, "bad_request", "line 1: 'params' must be an object"),
        ),
        (
            b'{"id":1,"method":"ping","jsonrpc":"2.0"}',
            (1, "bad_request", "line 1: unknown key 'jsonrpc' (a request has id, method, params)"),
        ),
        (
            b'{"id":1,"method":"shutdown"}',
            (1, "unknown_method", f"line 1: unknown method 'shutdown' {KNOWN}"),
        ),
        (
            b'{"id":1,"method":"status","params":{"verbose":true}}',
            (1, "bad_params", "line 1: status: unknown parameter 'verbose' (takes: none)"),
        ),
        (
            b'{"id":1,"method":"decide","params":{"id":"7"}}',
            (1, "bad_params", "line 1: decide: 'verdict' is required"),
        ),
        (
            b'{"id":1,"method":"decide","params":{"id":7,"verdict":"allow"}}',
            (1, "bad_params", "line 1: decide: 'id' must be a string"),
        ),
        (
            b'{"id":1,"method":"wait","params":{"seconds":true}}',
            (1, "bad_params", "line 1: wait: 'seconds' must be a number"),
        ),
    ],
)
def test_a_bad_line_gets_a_precise_error_and_the_connection_goes_on(
    line: bytes, answer: tuple[Any, str, str]
) -> None:
    s = session()
    assert shown(s.receive(line + b'\n{"id":99,"method":"ping"}\n')) == [
        error(*answer),
        ("dispatch", 99, "ping", {}),
    ]
    assert not s.closed


def test_errors_name_the_line_they_are_about() -> None:
    s = session()
    commands = shown(s.receive(b'{"id":1,"method":"ping"}\n\n{oops\n'))
    assert commands[1] == error(None, "bad_json", BAD_OPEN.replace("line 1", "line 3"))


def test_an_overlong_line_closes_the_connection_as_soon_as_it_is_seen() -> None:
    s = session()
    commands = s.receive(b'{"id":1,"method":"ping"}\n' + b"x" * (MAX_MESSAGE + 1))  # no newline yet
    message = f"line 2 is over {MAX_MESSAGE} bytes; closing"
    assert shown(commands) == [
        ("dispatch", 1, "ping", {}),
        error(None, "too_large", message),
        ("close",),
    ]
    assert s.closed
    assert s.receive(b'\n{"id":2,"method":"ping"}\n') == []
    assert s.respond(1, "pong") == []  # nothing more is sent on a closed connection


def test_a_line_of_exactly_the_bound_is_read() -> None:
    request = b'{"id":1,"method":"ping","params":{}}'
    line = request[:-1] + b" " * (MAX_MESSAGE - len(request)) + b"}"
    assert len(line) == MAX_MESSAGE
    s = session()
    assert shown(s.receive(line + b"\n")) == [("dispatch", 1, "ping", {})]


def test_a_flood_of_requests_is_answered_busy_past_the_in_flight_bound() -> None:
    s = session(max_in_flight=8)
    flood = b"".join(b'{"id":%d,"method":"ping"}\n' % i for i in range(100))
    commands = shown(s.receive(flood))
    assert commands[:8] == [("dispatch", i, "ping", {}) for i in range(8)]
    busy = "more than 8 requests unanswered; send fewer at once"
    assert commands[8:] == [error(i, "busy", busy) for i in range(8, 100)]
    s.respond(0, "pong")
    assert shown(s.receive(b'{"id":100,"method":"ping"}\n')) == [("dispatch", 100, "ping", {})]


def test_an_id_already_in_flight_is_refused() -> None:
    s = session()
    s.receive(b'{"id":"a","method":"ping"}\n')
    assert shown(s.receive(b'{"id":"a","method":"ping"}\n')) == [
        error(None, "bad_request", "line 2: id 'a' is already in use by a request")
    ]
    s.respond("a", "pong")
    assert shown(s.receive(b'{"id":"a","method":"ping"}\n')) == [("dispatch", "a", "ping", {})]


def test_the_server_closes_saying_why() -> None:
    s = session()
    s.receive(b'{"id":1,"method":"ping"}\n')
    assert shown(s.close("idle", "no request for 60 s; closing")) == [  # type: ignore[arg-type]
        error(None, "idle", "no request for 60 s; closing"),
        ("close",),
    ]
    assert s.close("idle", "again") == []  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_any_bytes_give_bounded_well_formed_commands(chunks: list[bytes]) -> None:
    s = ServerSession("0.1.0", methods=METHODS, max_message=256)
    for chunk in chunks:
        for command in s.receive(chunk):
            if isinstance(command, Send):
                message = json.loads(command.data)
                assert set(message) == {"id", "error"}
            elif isinstance(command, Dispatch):
                assert command.request.method in METHODS
                s.respond(command.request.id, None)
    assert s._decoder.pending <= 256


# --- framing and the client's side -----------------------------------------------------------


def test_the_decoder_never_holds_more_than_the_bound() -> None:
    decoder = LineDecoder(1024)
    assert decoder.feed(b"a" * 1000) == []
    assert decoder.pending == 1000
    assert decoder.feed(b"a" * 100) == []
    assert decoder.overflow == "line 1 is over 1024 bytes"
    assert decoder.pending == 0
    assert decoder.feed(b"\nmore\n") == []  # nothing after an overflow is trusted


def test_encode_refuses_what_is_not_json_or_too_large() -> None:
    assert encode({"id": 1, "result": "é"}) == b'{"id":1,"result":"\\u00e9"}\n'
    with pytest.raises(ValueError):
        encode({"x": float("nan")})
    with pytest.raises(TooLarge):
        encode({"x": "y" * MAX_MESSAGE})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"hello":{"protocol":1,"server":"0.1.0"}}', Hello(1, "0.1.0")),
        (b'{"id":3,"result":{"a":1}}', Response(3, {"a": 1})),
        (b'{"id":3,"result":null}', Response(3, None)),
        (b'{"id":null,"error":{"code":"idle","message":"x"}}', ErrorResponse(None, "idle", "x")),
        (event_line({"type": "prompt_opened"}).strip(), EventMessage({"type": "prompt_opened"})),
    ],
)
def test_server_messages_are_told_apart_by_their_keys(line: bytes, message: Any) -> None:
    assert parse_server_message(parse_json_line(line, 1), 1) == message


@pytest.mark.parametrize(
    "line",
    [
        b"[]",
        b'{"hello":1}',
        b'{"id":1}',
        b'{"id":1,"result":1,"extra":2}',
        b'{"id":true,"result":1}',
        b'{"id":1,"error":{"code":1,"message":"x"}}',
        b'{"event":[]}',
    ],
)
def test_anything_else_from_the_server_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="line 4 from the gateway: not a control message"):
        parse_server_message(parse_json_line(line, 4), 4)


def test_params_are_checked_strictly() -> None:
    spec = {"n": Param(int), "x": Param(float, required=False), "s": Param((str, type(None)))}
    assert validate_params("m", spec, {"n": 1, "x": 2, "s": None}) == {"n": 1, "x": 2, "s": None}
    with pytest.raises(ProtocolError, match="'n' must be an integer"):
        validate_params("m", spec, {"n": True, "s": "a"})
    with pytest.raises(ProtocolError, match="'s' must be a string or null"):
        validate_params("m", spec, {"n": 1, "s": 3})


def test_request_parsing_round_trips() -> None:
    from unclaw_tui.control.protocol import parse_request, request_line

    request = Request("abc", "rule.add", {"target": "*.example.com"})
    assert parse_request(parse_json_line(request_line(request).strip(), 1), 1) == request
