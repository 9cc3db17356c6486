"""mac1/mac2 and cookie replies between two handshake cores."""

from __future__ import annotations

import struct

import pytest

from unclaw_tui.engine.constants import (
    COOKIE_REFRESH_TIME,
    COOKIE_VALID_TIME,
    LABEL_COOKIE,
    LABEL_MAC1,
    MESSAGE_COOKIE_REPLY_SIZE,
)
from unclaw_tui.engine.cookie import CookieChecker, CookieGenerator, labelled_key, mac
from unclaw_tui.engine.noise import HandshakeCore, HandshakeError, generate_private_key

SRC = bytes([192, 0, 2, 7]) + (51820).to_bytes(2, "big")
OTHER_SRC = bytes([192, 0, 2, 8]) + (51820).to_bytes(2, "big")


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0  # every initiation gets a newer timestamp
        return self.now


def make_pair() -> tuple[HandshakeCore, HandshakeCore]:
    initiator = HandshakeCore(generate_private_key(), wall_clock=Clock())
    responder = HandshakeCore(generate_private_key(), wall_clock=Clock())
    initiator.add_peer(responder.public_key)
    responder.add_peer(initiator.public_key)
    return initiator, responder


def test_cookie_round_trip_gives_a_mac2_bound_to_the_source() -> None:
    initiator, responder = make_pair()
    first = initiator.create_initiation(responder.public_key, 41, now=100.0)
    assert responder.check_mac1(first)
    assert not responder.check_mac2(first, SRC)  # no cookie issued yet

    # Under load, the responder answers with a cookie instead of a response.
    reply = responder.create_cookie_reply(first, SRC, now=100.0)
    assert len(reply) == MESSAGE_COOKIE_REPLY_SIZE
    assert reply[:8] == b"\x03\x00\x00\x00" + struct.pack("<I", 41)
    assert initiator.consume_cookie_reply(reply, now=100.1) == responder.public_key

    second = initiator.create_initiation(responder.public_key, 42, now=101.0)
    assert second[-16:] != bytes(16)
    assert responder.check_mac2(second, SRC)
    assert responder.check_mac2(second, SRC, now=101.0)
    assert not responder.check_mac2(second, OTHER_SRC)
    # mac2 covers mac1 and the whole message.
    tampered = bytearray(second)
    tampered[20] ^= 1
    assert not responder.check_mac2(bytes(tampered), SRC)
    # And the initiation itself is still a good one.
    assert responder.consume_initiation(second, 101.0).sender_index == 42


def test_cookie_on_a_response_is_used_by_the_next_response() -> None:
    initiator, responder = make_pair()
    consumed = responder.consume_initiation(
        initiator.create_initiation(responder.public_key, 1, 0.0), 0.0
    )
    response, _ = responder.create_response(consumed.peer_public_key, 2, 0.0)
    # The initiator is under load: its cookie reply names the response's sender index.
    reply = initiator.create_cookie_reply(response, SRC, now=0.0)
    assert responder.consume_cookie_reply(reply, now=0.0) == initiator.public_key
    consumed = responder.consume_initiation(
        initiator.create_initiation(responder.public_key, 3, 1.0), 1.0
    )
    next_response, _ = responder.create_response(consumed.peer_public_key, 4, 1.0)
    assert initiator.check_mac2(next_response, SRC)


def test_cookie_secret_rotates_after_120_seconds() -> None:
    initiator, responder = make_pair()
    reply = responder.create_cookie_reply(
        initiator.create_initiation(responder.public_key, 1, 0.0), SRC, now=0.0
    )
    initiator.consume_cookie_reply(reply, now=0.0)
    with_cookie = initiator.create_initiation(responder.public_key, 2, 1.0)
    assert responder.check_mac2(with_cookie, SRC, now=COOKIE_REFRESH_TIME)
    # Past 120 s the old secret is no good even before anything replaces it ...
    assert not responder.check_mac2(with_cookie, SRC, now=COOKIE_REFRESH_TIME + 0.5)
    # ... and the next cookie reply draws a new secret: the old cookie's mac2 fails for good.
    responder.create_cookie_reply(with_cookie, SRC, now=COOKIE_REFRESH_TIME + 1)
    assert not responder.check_mac2(with_cookie, SRC)
    # Within 120 s the secret stays, so cookies from two replies agree.
    msg = initiator.create_initiation(responder.public_key, 3, 2.0)
    checker = CookieChecker(responder.public_key)
    checker.create_reply(msg, 3, SRC, now=0.0)
    secret = checker._secret
    checker.create_reply(msg, 3, SRC, now=COOKIE_REFRESH_TIME)
    assert checker._secret == secret
    checker.create_reply(msg, 3, SRC, now=COOKIE_REFRESH_TIME + 0.1)
    assert checker._secret != secret


def test_initiator_stops_using_a_cookie_before_the_secret_expires() -> None:
    initiator, responder = make_pair()
    reply = responder.create_cookie_reply(
        initiator.create_initiation(responder.public_key, 1, 0.0), SRC, now=0.0
    )
    initiator.consume_cookie_reply(reply, now=10.0)
    assert initiator.create_initiation(responder.public_key, 2, 10 + COOKIE_VALID_TIME - 1)[
        -16:
    ] != bytes(16)
    assert initiator.create_initiation(responder.public_key, 3, 10 + COOKIE_VALID_TIME)[
        -16:
    ] == bytes(16)
    assert COOKIE_VALID_TIME < COOKIE_REFRESH_TIME


def test_cookie_reply_is_taken_once_and_only_for_our_last_message() -> None:
    initiator, responder = make_pair()
    first = initiator.create_initiation(responder.public_key, 1, 0.0)
    reply = responder.create_cookie_reply(first, SRC, now=0.0)
    initiator.consume_cookie_reply(reply, 0.0)
    with pytest.raises(HandshakeError) as error:
        initiator.consume_cookie_reply(reply, 0.0)  # replayed
    assert error.value.reason == "bad_cookie"

    # A reply to an older message of ours: its mac1 is no longer the one we wait on.
    old = initiator.create_initiation(responder.public_key, 2, 1.0)
    old_reply = responder.create_cookie_reply(old, SRC, now=1.0)
    initiator.create_initiation(responder.public_key, 2, 2.0)
    with pytest.raises(HandshakeError) as error:
        initiator.consume_cookie_reply(old_reply, 2.0)
    assert error.value.reason == "bad_cookie"


def test_cookie_reply_errors() -> None:
    initiator, responder = make_pair()
    msg = initiator.create_initiation(responder.public_key, 5, 0.0)
    reply = responder.create_cookie_reply(msg, SRC, now=0.0)
    cases = {
        "bad_size": reply[:-1],
        "bad_type": b"\x04" + reply[1:],
        "unknown_index": reply[:4] + struct.pack("<I", 6) + reply[8:],
        "bad_cookie": reply[:-1] + bytes([reply[-1] ^ 1]),
    }
    for reason, forged in cases.items():
        with pytest.raises(HandshakeError) as error:
            initiator.consume_cookie_reply(forged, 0.0)
        assert error.value.reason == reason
    # A reply made by someone else (a different responder key) does not decrypt.
    _, stranger = make_pair()
    with pytest.raises(HandshakeError) as error:
        initiator.consume_cookie_reply(stranger.create_cookie_reply(msg, SRC, 0.0), 0.0)
    assert error.value.reason == "bad_cookie"
    with pytest.raises(HandshakeError) as error:
        responder.create_cookie_reply(b"\x01" + bytes(100), SRC, 0.0)
    assert error.value.reason == "bad_size"


def test_macs_match_the_whitepaper_formulas() -> None:
    # mac1 = MAC(HASH("mac1----" || Spub_r), msg[:-32]); mac2 = MAC(cookie, msg[:-16]).
    initiator, responder = make_pair()
    msg = initiator.create_initiation(responder.public_key, 1, 0.0)
    expected = mac(labelled_key(LABEL_MAC1, responder.public_key), msg[:-32])
    assert msg[-32:-16] == expected
    assert labelled_key(LABEL_MAC1, b"k" * 32) != labelled_key(LABEL_COOKIE, b"k" * 32)
    generator = CookieGenerator(responder.public_key)
    assert generator.add_macs(msg[:-32], 0.0) == msg[:-16] + bytes(16)
