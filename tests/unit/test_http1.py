"""The HTTP/1.x observer as transcripts: bytes in each way, exchanges out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from unclaw_tui.services.http1 import Exchange, Http1Observer


def feed_all(
    obs: Http1Observer, steps: list[tuple[str, bytes]], now: float = 1.0
) -> list[Exchange]:
    out: list[Exchange] = []
    for direction, data in steps:
        if direction == ">":
            out += obs.request_data(data, now)
        else:
            out += obs.response_data(data, now + 0.5)
    return out


def test_transcript_each_exchange_comes_out_when_its_response_ends() -> None:
    """One connection step by step: what each call returns, at the step it returns it. The
    time is from the request head's end to the response's; a cut body is told at close."""
    obs = Http1Observer(default_host="example.test")
    calls = {
        ">": obs.request_data,
        "<": obs.response_data,
        "eof": lambda _data, now: obs.response_eof(now),
        "close": lambda _data, now: obs.close(now),
    }
    transcript: list[tuple[str, bytes, float, list[Exchange]]] = [
        (">", b"GET /a HTTP/1.1\r\nHost: example.test\r\n", 1.0, []),  # head not ended
        (">", b"\r\nGET /b HTTP/1.1\r\n\r\n", 1.1, []),  # /a ends, /b pipelined
        ("<", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", 1.2, []),
        ("<", b"lo", 1.3, [Exchange("GET", "example.test", "/a", 200, 5, 200.0)]),
        (
            "<",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            1.5,
            [Exchange("GET", "example.test", "/b", 404, 0, 400.0)],  # no Host: the default
        ),
        (">", b"POST /c HTTP/1.1\r\nHost: c.test\r\nContent-Length: 3\r\n\r\nab", 2.0, []),
        ("<", b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nxy", 2.1, []),
        ("eof", b"", 2.2, []),  # a Content-Length body is not ended by the server's close
        (">", b"c", 2.3, []),
        ("close", b"", 2.4, [Exchange("POST", "c.test", "/c", 500, 2, 400.0)]),
    ]
    for step, (call, data, now, expected) in enumerate(transcript):
        assert calls[call](data, now) == expected, (step, call, data)
    assert obs.close(3.0) == []


def test_content_length_response() -> None:
    obs = Http1Observer(default_host="example.test")
    done = feed_all(
        obs,
        [
            (">", b"GET /index.html HTTP/1.1\r\nHost: example.test\r\n\r\n"),
            ("<", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"),
            ("<", b"lo"),
        ],
    )
    assert done == [Exchange("GET", "example.test", "/index.html", 200, 5, 500.0)]
    assert obs.close(3.0) == []


def test_chunked_both_ways_and_keepalive() -> None:
    obs = Http1Observer()
    post = (
        b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nabcd\r\n0\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    response = (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n"
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    )
    # Byte by byte, to cross every boundary.
    steps = [(">", post[i : i + 1]) for i in range(len(post))]
    steps += [("<", response[i : i + 1]) for i in range(len(response))]
    done = feed_all(obs, steps)
    assert [(x.method, x.path, x.status, x.bytes) for x in done] == [
        ("POST", "/up", 201, 19),
        ("GET", "/second", 404, 0),
    ]


def test_head_interim_and_no_body_statuses() -> None:
    obs = Http1Observer()
    done = feed_all(
        obs,
        [
            (">", b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"),
            (
                ">",
                b"PUT /c HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            ),
            ("<", b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"),  # HEAD: no body
            ("<", b"HTTP/1.1 304 Not Modified\r\n\r\n"),
            ("<", b"HTTP/1.1 100 Continue\r\n\r\n"),
            (">", b"ok"),
            ("<", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ],
    )
    assert [(x.method, x.status, x.bytes) for x in done] == [
        ("HEAD", 200, 0),
        ("GET", 304, 0),
        ("PUT", 204, 0),
    ]


def test_body_until_close_and_unanswered_requests() -> None:
    obs = Http1Observer()
    done = feed_all(
        obs,
        [
            (">", b"GET /old HTTP/1.0\r\n\r\n"),
            ("<", b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 1000),
        ],
    )
    assert done == []
    done = obs.response_eof(2.0)
    assert [(x.host, x.path, x.status, x.bytes) for x in done] == [(None, "/old", 200, 1000)]
    obs.request_data(b"GET /never HTTP/1.1\r\nHost: h\r\n\r\n", 3.0)
    assert [(x.path, x.status) for x in obs.close(4.0)] == [("/never", None)]


def test_upgrade_goes_quiet() -> None:
    obs = Http1Observer()
    done = feed_all(
        obs,
        [
            (">", b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"),
            ("<", b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x05hello"),
            (">", b"\x81\x85anything at all"),
        ],
    )
    assert [(x.path, x.status) for x in done] == [("/ws", 101)]
    assert not obs.active
    assert obs.close(9.0) == []


def test_not_http_stops_observing() -> None:
    obs = Http1Observer()
    assert obs.request_data(b"\x00\x01binary protocol\r\n\r\n", 1.0) == []
    assert not obs.active
    assert obs.response_data(b"HTTP/1.1 200 OK\r\n\r\n", 1.0) == []


def test_head_size_is_bounded() -> None:
    obs = Http1Observer(max_head=1024)
    obs.request_data(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000, 1.0)
    assert not obs.active and obs.stopped_reason is not None


def test_large_body_is_counted_not_kept() -> None:
    obs = Http1Observer()
    obs.request_data(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n", 0.0)
    obs.response_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n", 0.1)
    chunk = b"z" * 65536
    done: list[Exchange] = []
    sent = 0
    while sent < 10_000_000:
        piece = chunk[: 10_000_000 - sent]
        done += obs.response_data(piece, 0.2)
        sent += len(piece)
        assert len(obs._responses.buf) == 0  # nothing of the body is buffered
    assert [(x.status, x.bytes) for x in done] == [(200, 10_000_000)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("<>"), st.binary(max_size=200)), max_size=20))
def test_any_bytes_never_raise(steps: list[tuple[str, bytes]]) -> None:
    obs = Http1Observer(max_head=512)
    feed_all(obs, steps)
    obs.close(5.0)


def test_exchange_details_for_the_request_record() -> None:
    obs = Http1Observer(default_host="example.test", capture_bodies=3)
    assert (
        obs.request_data(
            b"POST /up HTTP/1.1\r\nHost: a.test\r\nAuthorization: Bearer x\r\nContent-Length: 5\r\n"
            b"\r\nhello",
            1.0,
        )
        == []
    )
    assert obs.response_data(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nab", 1.25) == []
    (x,) = obs.response_data(b"cd", 1.5)
    assert (x.status, x.request_bytes, x.bytes, x.sent_ms, x.first_byte_ms, x.ms) == (
        201, 5, 4, 0.0, 250.0, 500.0,
    )  # fmt: skip
    assert x.request_headers == (
        ("host", "a.test"), ("authorization", "Bearer x"), ("content-length", "5"),
    )  # fmt: skip
    assert x.response_headers == (("content-length", "4"),)
    assert (x.request_body, x.response_body) == (b"hel", b"abc")
