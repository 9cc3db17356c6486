"""The ClientHello parser on real ClientHellos (made by `ssl` over memory BIOs) and on anything
hypothesis can think of."""

from __future__ import annotations

import ssl
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unclaw_tui.services.clienthello import (
    DEFAULT_MAX_SIZE,
    ClientHello,
    HelloParser,
    NeedMore,
    NotTls,
    parse,
)


def real_client_hello(
    server_hostname: str | None = "example.test",
    alpn: list[str] | None = None,
    *,
    maximum: ssl.TLSVersion | None = None,
) -> bytes:
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, size: int) -> bytes:
    """The same handshake message, re-cut into TLS records of at most `size` bytes."""
    assert hello[0] == 22
    length = int.from_bytes(hello[3:5], "big")
    message = hello[5 : 5 + length]
    out = bytearray()
    for i in range(0, len(message), size):
        piece = message[i : i + size]
        out += bytes([22, 3, 1]) + len(piece).to_bytes(2, "big") + piece
    return bytes(out)


def test_sni_and_alpn_from_a_real_hello() -> None:
    hello = real_client_hello("Example.Test", ["h2", "http/1.1"])
    result = parse(hello)
    assert result == ClientHello(sni="example.test", alpn=("h2", "http/1.1"), size=len(hello))


def test_tls12_only_client() -> None:
    hello = real_client_hello("a.example", ["http/1.1"], maximum=ssl.TLSVersion.TLSv1_2)
    result = parse(hello)
    assert isinstance(result, ClientHello)
    assert (result.sni, result.alpn) == ("a.example", ("http/1.1",))


def test_no_sni_no_alpn() -> None:
    hello = real_client_hello(None)
    assert parse(hello) == ClientHello(sni=None, alpn=(), size=len(hello))


def test_ip_literal_is_not_sent_as_sni() -> None:
    result = parse(real_client_hello("198.18.0.2"))
    assert isinstance(result, ClientHello) and result.sni is None


def test_every_prefix_needs_more() -> None:
    hello = real_client_hello("example.test", ["http/1.1"])
    for cut in range(len(hello)):
        assert parse(hello[:cut]) == NeedMore(), cut


def test_hello_across_records_and_trailing_data() -> None:
    hello = real_client_hello("split.example", ["h2"])
    split = refragment(hello, 37)
    assert split.count(b"\x16\x03\x01") >= 3
    result = parse(split + b"\x17\x03\x03 later data")
    assert result == ClientHello(sni="split.example", alpn=("h2",), size=len(split))
    for cut in range(len(split)):
        assert parse(split[:cut]) == NeedMore(), cut


def test_size_bound() -> None:
    hello = real_client_hello("example.test")
    assert isinstance(parse(hello, max_size=len(hello) - 1), NotTls)
    assert isinstance(parse(hello, max_size=len(hello)), ClientHello)
    # A hello announcing more than the bound fails at once, without waiting for the bytes.
    big = bytes([22, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00])
    assert isinstance(parse(big, max_size=16 * 1024), NotTls)
    # Many small records adding up past the bound: refused once the bound is reached.
    small = refragment(real_client_hello("x" * 60 + ".example"), 1)
    assert isinstance(parse(small, max_size=1024), NotTls)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"\x00" * 64,
        b"SSH-2.0-OpenSSH_9.6\r\n",
        bytes([22, 2, 1, 0, 5, 1, 0, 0, 1, 0]),  # record version 2.x
        bytes([22, 3, 1, 0, 0]),  # empty record
        bytes([22, 3, 1, 0, 4, 2, 0, 0, 0]),  # a ServerHello
        bytes([22, 3, 1, 0, 8, 1, 0, 0, 4, 3, 3, 0, 0]),  # body too short for random
    ],
)
def test_not_tls(data: bytes) -> None:
    assert isinstance(parse(data), NotTls)


def test_garbage_fails_at_first_byte() -> None:
    assert isinstance(parse(b"G"), NotTls)
    assert isinstance(parse(b"\x16\x09"), NotTls)
    assert parse(b"\x16\x03") == NeedMore()


def test_corrupted_length_inside_is_malformed_not_a_crash() -> None:
    hello = bytearray(real_client_hello("example.test", ["http/1.1"]))
    # session_id length (after 5 record + 4 handshake + 2 version + 32 random) set past the end.
    hello[43] = 0xFF
    result = parse(bytes(hello))
    assert isinstance(result, NotTls) and "malformed" in result.reason


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_give_a_result(data: bytes) -> None:
    result = parse(data, max_size=512)
    assert isinstance(result, NeedMore | NotTls | ClientHello)
    if isinstance(result, ClientHello):
        assert 0 < result.size <= len(data)


_HELLO = real_client_hello("fuzz.example", ["h2", "http/1.1"])


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(_HELLO) - 1), st.integers(0, 255), st.binary(max_size=40))
def test_mutated_real_hello_gives_a_result(index: int, value: int, tail: bytes) -> None:
    data = bytearray(_HELLO)
    data[index] = value
    result = parse(bytes(data) + tail)
    assert isinstance(result, NeedMore | NotTls | ClientHello)
    if isinstance(result, ClientHello) and result.sni is not None:
        assert result.sni == result.sni.lower()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300))
def test_any_fragmentation_parses_the_same(size: int) -> None:
    split = refragment(_HELLO, size)
    assert parse(split) == ClientHello(sni="fuzz.example", alpn=("h2", "http/1.1"), size=len(split))


# --- HelloParser: the same answers, fed piece by piece, in linear time --------------------------


def feed_in_pieces(data: bytes, cuts: list[int], max_size: int) -> None:
    """Every answer while feeding equals parse() of what was fed so far, until it is final;
    after that it stays final whatever follows."""
    parser = HelloParser(max_size)
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {len(data)})
    start = 0
    final = None
    for end in bounds:
        result = parser.feed(data[start:end])
        if final is not None:
            assert result == final
        else:
            assert result == parse(data[:end], max_size), (start, end)
            if not isinstance(result, NeedMore):
                final = result
        start = end


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=20))
def test_feeding_pieces_answers_as_parse_does(data: bytes, cuts: list[int]) -> None:
    feed_in_pieces(data, cuts, max_size=512)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 64),
    st.lists(st.integers(0, 4000), max_size=30),
    st.binary(max_size=40),
)
def test_feeding_a_fragmented_real_hello_answers_as_parse_does(
    size: int, cuts: list[int], tail: bytes
) -> None:
    feed_in_pieces(refragment(_HELLO, size) + tail, cuts, max_size=DEFAULT_MAX_SIZE)


def test_one_byte_records_fed_one_byte_at_a_time_parse() -> None:
    split = refragment(_HELLO, 1)
    parser = HelloParser()
    results = [parser.feed(split[i : i + 1]) for i in range(len(split))]
    assert all(r == NeedMore() for r in results[:-1])
    assert results[-1] == ClientHello(sni="fuzz.example", alpn=("h2", "http/1.1"), size=len(split))
    assert bytes(parser.data) == split


def test_feeding_is_linear_in_the_bytes_fed() -> None:
    """Slow-loris on CPU: a hello announced within the bound but carried one byte per record,
    each record in its own read, up to the byte bound. Re-parsing everything on each read took
    seconds here (quadratic); walking each record once takes milliseconds."""
    body = bytes([1]) + (DEFAULT_MAX_SIZE // 2).to_bytes(3, "big") + bytes(DEFAULT_MAX_SIZE)
    stream = b"".join(bytes([22, 3, 1, 0, 1, b]) for b in body)
    parser = HelloParser()
    started = time.perf_counter()
    result: object = NeedMore()
    for i in range(0, len(stream), 6):
        result = parser.feed(stream[i : i + 6])
        if not isinstance(result, NeedMore):
            break
    took = time.perf_counter() - started
    assert result == NotTls(f"ClientHello larger than {DEFAULT_MAX_SIZE} bytes")
    assert len(parser.data) <= DEFAULT_MAX_SIZE + 6
    assert took < 0.5, took
