"""The Noise IKpsk2 core against known answers, and the WireGuard handshake between two cores."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import FakeClock
from unclaw_tui.engine.constants import (
    CONSTRUCTION,
    IDENTIFIER,
    LABEL_MAC1,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE_SIZE,
    TAI64_BASE,
)
from unclaw_tui.engine.cookie import labelled_key, mac
from unclaw_tui.engine.noise import (
    ConsumedInitiation,
    HandshakeCore,
    HandshakeError,
    IKpsk2,
    Keypair,
    aead_decrypt,
    aead_encrypt,
    b64,
    generate_private_key,
    hash_,
    hkdf,
    public_key_of,
    tai64n,
    unb64,
)

# shared/ sits beside the repository root, in a checkout as in CI.
VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"

WALL_START = 1_700_000_000.0  # the cores' wall clocks (TAI64N timestamps) start here

# A point of order 8 on Curve25519 (RFC 7748 section 5 / libsodium's blocklist).
LOW_ORDER_POINT = bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")


# --- known answers ----------------------------------------------------------------------


def load_vector() -> dict[str, object]:
    data = json.loads((VECTORS / "noise-ikpsk2-25519-chachapoly-blake2s.json").read_text())
    (vector,) = [v for v in data["vectors"] if v["protocol_name"] == CONSTRUCTION.decode()]
    return vector


def test_cacophony_ikpsk2_vector() -> None:
    v = load_vector()
    h = bytes.fromhex
    name = str(v["protocol_name"]).encode()
    initiator = IKpsk2(
        initiator=True,
        static_private=h(v["init_static"]),
        remote_static=h(v["init_remote_static"]),
        psk=h(v["init_psks"][0]),
        protocol_name=name,
        prologue=h(v["init_prologue"]),
        ephemeral_private=h(v["init_ephemeral"]),
    )
    responder = IKpsk2(
        initiator=False,
        static_private=h(v["resp_static"]),
        protocol_name=name,
        prologue=h(v["resp_prologue"]),
        ephemeral_private=h(v["resp_ephemeral"]),
    )
    messages = v["messages"]

    message1 = initiator.write_message1(h(messages[0]["payload"]))
    assert message1.hex() == messages[0]["ciphertext"]
    seen_static: list[bytes] = []

    def psk_for(remote_static: bytes) -> bytes:
        seen_static.append(remote_static)
        return h(v["resp_psks"][0])

    assert responder.read_message1(message1, psk_for) == h(messages[0]["payload"])
    assert seen_static == [public_key_of(h(v["init_static"]))]

    message2 = responder.write_message2(h(messages[1]["payload"]))
    assert message2.hex() == messages[1]["ciphertext"]
    assert initiator.read_message2(message2) == h(messages[1]["payload"])

    assert initiator.handshake_hash.hex() == v["handshake_hash"]
    assert responder.handshake_hash.hex() == v["handshake_hash"]

    # Transport: initiator and responder alternate, each direction counting its own nonces.
    i_send, i_recv = initiator.split()
    r_recv, r_send = responder.split()
    assert (i_send, i_recv) == (r_recv, r_send)
    counters = {"initiator": 0, "responder": 0}
    for number, message in enumerate(messages[2:]):
        sender = "initiator" if number % 2 == 0 else "responder"
        key = i_send if sender == "initiator" else r_send
        payload = h(message["payload"])
        ciphertext = aead_encrypt(key, counters[sender], payload, b"")
        assert ciphertext.hex() == message["ciphertext"]
        assert aead_decrypt(key, counters[sender], ciphertext, b"") == payload
        counters[sender] += 1


# From wireguard-go device/kdf_test.go: (key, input) -> KDF3 outputs t0, t1, t2.
KDF_VECTORS = [
    (
        "746573742d6b6579",
        "746573742d696e707574",
        "6f0e5ad38daba1bea8a0d213688736f19763239305e0f58aba697f9ffc41c633",
        "df1194df20802a4fe594cde27e92991c8cae66c366e8106aaa937a55fa371e8a",
        "fac6e2745a325f5dc5d11a5b165aad08b0ada28e7b4e666b7c077934a4d76c24",
    ),
    (
        "776972656775617264",
        "776972656775617264",
        "491d43bbfdaa8750aaf535e334ecbfe5129967cd64635101c566d4caefda96e8",
        "1e71a379baefd8a79aa4662212fcafe19a23e2b609a3db7d6bcba8f560e3d25f",
        "31e1ae48bddfbe5de38f295e5452b1909a1b4e38e183926af3780b0c1e1f0160",
    ),
    (
        "",
        "",
        "8387b46bf43eccfcf349552a095d8315c4055beb90208fb1be23b894bc2ed5d0",
        "58a0e5f6faefccf4807bff1f05fa8a9217945762040bcec2f4b4a62bdfe0e86e",
        "0ce6ea98ec548f8e281e93e32db65621c45eb18dc6f0a7ad94178610a2f7338e",
    ),
]


@pytest.mark.parametrize(("key", "data", "t0", "t1", "t2"), KDF_VECTORS)
def test_hkdf_known_answers(key: str, data: str, t0: str, t1: str, t2: str) -> None:
    k, d = bytes.fromhex(key), bytes.fromhex(data)
    assert [x.hex() for x in hkdf(k, d, 3)] == [t0, t1, t2]
    assert [x.hex() for x in hkdf(k, d, 2)] == [t0, t1]
    assert [x.hex() for x in hkdf(k, d, 1)] == [t0]


def test_hash_is_blake2s_256() -> None:
    # RFC 7693 appendix B: BLAKE2s-256("abc").
    expected = "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    assert hash_(b"a", b"bc").hex() == expected


def test_tai64n_format_and_whitening() -> None:
    stamp = tai64n(1_700_000_000.123456789)
    seconds, nanoseconds = struct.unpack(">QI", stamp)
    assert len(stamp) == 12
    assert seconds == TAI64_BASE + 1_700_000_000 == (1 << 62) + 10 + 1_700_000_000
    assert nanoseconds & 0xFFFFFF == 0  # whitened: the low 24 bits never leave
    assert 123_456_789 - (1 << 24) < nanoseconds <= 123_456_789
    assert tai64n(1_700_000_001.0) > stamp > tai64n(1_700_000_000.0)


# --- WireGuard handshake between two cores ----------------------------------------------


class Pair:
    """An initiator core and a responder core that know each other."""

    def __init__(self, psk_i: bytes | None = None, psk_r: bytes | None = None) -> None:
        self.clock_i, self.clock_r = FakeClock(WALL_START), FakeClock(WALL_START)
        self.initiator = HandshakeCore(generate_private_key(), wall_clock=self.clock_i)
        self.responder = HandshakeCore(generate_private_key(), wall_clock=self.clock_r)
        self.initiator.add_peer(self.responder.public_key, psk_i)
        self.responder.add_peer(self.initiator.public_key, psk_r)

    def initiation(self, index: int = 7, now: float = 0.0, wall_step: float = 1.0) -> bytes:
        self.clock_i.now += wall_step
        return self.initiator.create_initiation(self.responder.public_key, index, now)


def remac(msg: bytes, receiver_public_key: bytes) -> bytes:
    """msg with its mac1 recomputed: anyone who knows the receiver's public key can do this."""
    body = msg[:-32]
    return body + mac(labelled_key(LABEL_MAC1, receiver_public_key), body) + bytes(16)


def test_full_handshake_gives_matching_keypairs_and_a_working_transport() -> None:
    pair = Pair()
    init = pair.initiation(index=0x11223344)
    assert len(init) == MESSAGE_INITIATION_SIZE
    assert init[:8] == b"\x01\x00\x00\x00" + struct.pack("<I", 0x11223344)
    assert init[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    assert pair.initiator.pending_indices() == {0x11223344}
    assert pair.responder.check_mac1(init)
    assert not pair.initiator.check_mac1(init)  # mac1 is keyed to the receiver

    consumed = pair.responder.consume_initiation(init, now=0.0)
    assert consumed == ConsumedInitiation(pair.initiator.public_key, 0x11223344)

    response, responder_keys = pair.responder.create_response(consumed.peer_public_key, 99, 0.0)
    assert len(response) == MESSAGE_RESPONSE_SIZE
    assert response[:12] == b"\x02\x00\x00\x00" + struct.pack("<II", 99, 0x11223344)
    assert pair.initiator.check_mac1(response)

    peer, initiator_keys = pair.initiator.consume_response(response, now=0.0)
    assert peer == pair.responder.public_key
    assert pair.initiator.pending_indices() == set()

    assert initiator_keys.is_initiator and not responder_keys.is_initiator
    assert (initiator_keys.local_index, initiator_keys.remote_index) == (0x11223344, 99)
    assert (responder_keys.local_index, responder_keys.remote_index) == (99, 0x11223344)
    assert initiator_keys.send_key == responder_keys.recv_key
    assert initiator_keys.recv_key == responder_keys.send_key
    assert initiator_keys.send_key != initiator_keys.recv_key

    packet = aead_encrypt(initiator_keys.send_key, 0, b"hello through the tunnel", b"")
    assert aead_decrypt(responder_keys.recv_key, 0, packet, b"") == b"hello through the tunnel"
    back = aead_encrypt(responder_keys.send_key, 0, b"and back", b"")
    assert aead_decrypt(initiator_keys.recv_key, 0, back, b"") == b"and back"
    with pytest.raises(HandshakeError):
        aead_decrypt(initiator_keys.send_key, 0, back, b"")


def test_handshake_with_matching_psk() -> None:
    psk = bytes(range(32))
    pair = Pair(psk_i=psk, psk_r=psk)
    consumed = pair.responder.consume_initiation(pair.initiation(), 0.0)
    response, r_keys = pair.responder.create_response(consumed.peer_public_key, 5, 0.0)
    _, i_keys = pair.initiator.consume_response(response, 0.0)
    assert i_keys.send_key == r_keys.recv_key


@pytest.mark.parametrize("psks", [(bytes(range(32)), None), (None, bytes(range(32)))])
def test_psk_mismatch_fails_the_response(psks: tuple[bytes | None, bytes | None]) -> None:
    pair = Pair(*psks)
    # The PSK only enters at the response: the initiation itself is accepted.
    consumed = pair.responder.consume_initiation(pair.initiation(), 0.0)
    response, _ = pair.responder.create_response(consumed.peer_public_key, 5, 0.0)
    with pytest.raises(HandshakeError) as error:
        pair.initiator.consume_response(response, 0.0)
    assert error.value.reason == "decrypt"
    assert pair.initiator.pending_indices() == {7}  # a bad response does not end the wait


def test_replayed_initiation_is_refused() -> None:
    pair = Pair()
    init = pair.initiation()
    pair.responder.consume_initiation(init, now=0.0)
    with pytest.raises(HandshakeError) as error:
        pair.responder.consume_initiation(init, now=5.0)
    assert error.value.reason == "replayed_timestamp"


def test_initiation_with_an_older_timestamp_is_refused() -> None:
    pair = Pair()
    older = pair.initiation(index=1)
    newer = pair.initiation(index=2)
    pair.responder.consume_initiation(newer, now=0.0)
    with pytest.raises(HandshakeError) as error:
        pair.responder.consume_initiation(older, now=5.0)
    assert error.value.reason == "replayed_timestamp"


def test_initiation_flood_is_refused_then_accepted_after_the_interval() -> None:
    pair = Pair()
    pair.responder.consume_initiation(pair.initiation(index=1), now=10.0)
    with pytest.raises(HandshakeError) as error:
        pair.responder.consume_initiation(pair.initiation(index=2), now=10.019)
    assert error.value.reason == "flood"
    # The refused one moved no mark: the next one 21 ms after the first is fine.
    assert pair.responder.consume_initiation(pair.initiation(index=3), now=10.021).sender_index == 3


def test_wrong_mac1_is_refused_before_any_crypto() -> None:
    pair = Pair()
    init = bytearray(pair.initiation())
    init[-17] ^= 1  # last byte of mac1
    assert not pair.responder.check_mac1(bytes(init))
    with pytest.raises(HandshakeError) as error:
        pair.responder.consume_initiation(bytes(init), 0.0)
    assert error.value.reason == "bad_mac1"


def test_initiation_from_an_unknown_peer_is_refused() -> None:
    pair = Pair()
    stranger = HandshakeCore(generate_private_key())
    stranger.add_peer(pair.responder.public_key)
    init = stranger.create_initiation(pair.responder.public_key, 1, 0.0)
    assert pair.responder.check_mac1(init)  # it knows our public key, which is enough for mac1
    with pytest.raises(HandshakeError) as error:
        pair.responder.consume_initiation(init, 0.0)
    assert error.value.reason == "unknown_peer"


@pytest.mark.parametrize("offset", [8, 40, 100, 115])  # ephemeral, static, static tag, timestamp
def test_modified_initiation_fails_to_decrypt(offset: int) -> None:
    pair = Pair()
    init = bytearray(pair.initiation())
    init[offset] ^= 0x40
    with pytest.raises(HandshakeError) as error:
        pair.responder.consume_initiation(remac(bytes(init), pair.responder.public_key), 0.0)
    assert error.value.reason == "decrypt"


def test_modified_response_fails_and_the_real_one_still_works() -> None:
    pair = Pair()
    consumed = pair.responder.consume_initiation(pair.initiation(), 0.0)
    response, _ = pair.responder.create_response(consumed.peer_public_key, 5, 0.0)
    forged = bytearray(response)
    forged[50] ^= 1
    with pytest.raises(HandshakeError) as error:
        pair.initiator.consume_response(remac(bytes(forged), pair.initiator.public_key), 0.0)
    assert error.value.reason == "decrypt"
    pair.initiator.consume_response(response, 0.0)


def test_response_to_an_unknown_index_is_refused() -> None:
    pair = Pair()
    consumed = pair.responder.consume_initiation(pair.initiation(index=7), 0.0)
    response, _ = pair.responder.create_response(consumed.peer_public_key, 5, 0.0)
    pair.initiation(index=8)  # a retransmission replaces initiation 7
    assert pair.initiator.pending_indices() == {8}
    with pytest.raises(HandshakeError) as error:
        pair.initiator.consume_response(response, 0.0)
    assert error.value.reason == "unknown_index"


def test_a_pending_initiation_is_answered_once() -> None:
    pair = Pair()
    consumed = pair.responder.consume_initiation(pair.initiation(), 0.0)
    response, _ = pair.responder.create_response(consumed.peer_public_key, 5, 0.0)
    pair.initiator.consume_response(response, 0.0)
    with pytest.raises(HandshakeError) as error:
        pair.initiator.consume_response(response, 0.0)
    assert error.value.reason == "unknown_index"


def test_response_needs_a_consumed_initiation_and_answers_it_once() -> None:
    pair = Pair()
    with pytest.raises(HandshakeError) as error:
        pair.responder.create_response(pair.initiator.public_key, 5, 0.0)
    assert error.value.reason == "no_initiation"
    consumed = pair.responder.consume_initiation(pair.initiation(), 0.0)
    pair.responder.create_response(consumed.peer_public_key, 5, 0.0)
    with pytest.raises(HandshakeError):
        pair.responder.create_response(consumed.peer_public_key, 6, 0.0)


def test_low_order_ephemeral_is_refused() -> None:
    pair = Pair()
    init = pair.initiation()
    for point in (LOW_ORDER_POINT, bytes(32)):
        forged = init[:8] + point + init[40:]
        with pytest.raises(HandshakeError) as error:
            pair.responder.consume_initiation(remac(forged, pair.responder.public_key), 0.0)
        assert error.value.reason == "low_order"


def test_low_order_peer_key_is_refused() -> None:
    core = HandshakeCore(generate_private_key())
    with pytest.raises(ValueError):
        core.add_peer(LOW_ORDER_POINT)
    with pytest.raises(ValueError):
        core.add_peer(bytes(31))
    assert not core.has_peer(LOW_ORDER_POINT)


def test_remove_peer_forgets_its_handshakes() -> None:
    pair = Pair()
    init = pair.initiation(index=3)
    pair.responder.consume_initiation(init, 0.0)
    pair.initiator.remove_peer(pair.responder.public_key)
    assert pair.initiator.pending_indices() == set()
    assert not pair.initiator.has_peer(pair.responder.public_key)
    pair.responder.remove_peer(pair.initiator.public_key)
    with pytest.raises(HandshakeError) as error:
        pair.responder.create_response(pair.initiator.public_key, 5, 0.0)
    assert error.value.reason == "unknown_peer"
    with pytest.raises(HandshakeError) as error:
        pair.initiator.create_initiation(pair.responder.public_key, 4, 0.0)
    assert error.value.reason == "unknown_peer"


def test_simultaneous_initiations_both_complete() -> None:
    pair = Pair()
    a, b = pair.initiator, pair.responder
    init_a = a.create_initiation(b.public_key, 1, 0.0)
    init_b = b.create_initiation(a.public_key, 2, 0.0)
    b.consume_initiation(init_a, 0.0)
    a.consume_initiation(init_b, 0.0)
    response_b, keys_b_resp = b.create_response(a.public_key, 3, 0.0)
    response_a, keys_a_resp = a.create_response(b.public_key, 4, 0.0)
    _, keys_a_init = a.consume_response(response_b, 0.0)
    _, keys_b_init = b.consume_response(response_a, 0.0)
    assert keys_a_init.send_key == keys_b_resp.recv_key
    assert keys_b_init.send_key == keys_a_resp.recv_key


def test_secrets_stay_out_of_reprs() -> None:
    private = generate_private_key()
    core = HandshakeCore(private)
    core.add_peer(public_key_of(generate_private_key()), bytes(range(32)))
    keys = Keypair(1, 2, b"s" * 32, b"r" * 32, True)
    for text in (repr(core), str(core), repr(keys), repr(core._peers)):
        assert private.hex() not in text and repr(private) not in text
        assert b64(private) not in text
    assert "sss" not in repr(keys) and "rrr" not in repr(keys)


def test_base64_keys() -> None:
    key = generate_private_key()
    assert unb64(b64(key)) == key
    assert unb64(" " + b64(key) + "\n") == key
    non_canonical = b64(bytes(32))[:42] + "B="  # same 32 bytes, other padding bits
    for bad in ("", "not base64!", b64(key[:31]), b64(key) + "AAAA", non_canonical):
        with pytest.raises(ValueError):
            unb64(bad)


def test_wireguard_initial_state() -> None:
    # Whitepaper 5.4.2: Ci = HASH(Construction), Hi = HASH(HASH(Ci || Identifier) || Spub_r).
    private = generate_private_key()
    handshake = IKpsk2(initiator=False, static_private=private)
    chaining_key = hash_(CONSTRUCTION)
    assert handshake._sym.chaining_key == chaining_key
    expected = hash_(hash_(chaining_key, IDENTIFIER), public_key_of(private))
    assert handshake.handshake_hash == expected


# --- never an unexpected exception on hostile input --------------------------------------

_CORE = Pair()
_PENDING_INDEX = 7
_CORE.initiation(index=_PENDING_INDEX)  # a response to it reaches the Noise code


def _with_valid_mac1(head: bytes, body: bytes, size: int, receiver: bytes) -> bytes:
    msg = (head + body).ljust(size - 32, b"\x00")[: size - 32]
    return msg + mac(labelled_key(LABEL_MAC1, receiver), msg) + bytes(16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(data: bytes) -> None:
    core = _CORE.responder
    for consume in (core.consume_initiation, core.consume_response, core.consume_cookie_reply):
        with pytest.raises(HandshakeError):
            consume(data, 0.0)
    assert core.check_mac1(data) is False
    assert core.check_mac2(data, b"\x7f\x00\x00\x01\x00\x01") is False


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=148))
def test_random_bodies_with_valid_mac1_fail_cleanly(body: bytes) -> None:
    # Past the mac1 gate the Noise code itself meets the garbage.
    responder, initiator = _CORE.responder, _CORE.initiator
    head = struct.pack("<II", 1, 1)
    init = _with_valid_mac1(head, body, MESSAGE_INITIATION_SIZE, responder.public_key)
    with pytest.raises(HandshakeError) as error:
        responder.consume_initiation(init, 0.0)
    assert error.value.reason in {"decrypt", "low_order"}

    head = struct.pack("<III", 2, 1, _PENDING_INDEX)
    response = _with_valid_mac1(head, body, MESSAGE_RESPONSE_SIZE, initiator.public_key)
    with pytest.raises(HandshakeError) as error:
        initiator.consume_response(response, 0.0)
    assert error.value.reason in {"decrypt", "low_order"}
    assert initiator.pending_indices() == {_PENDING_INDEX}


def test_cookie_reply_index_belongs_to_the_latest_sender_only() -> None:
    # Our response to A used index 5; the integrator later reuses 5 for an initiation to C.
    # A cookie reply naming 5 is then C's, even after a new message to A moves A's index on.
    pair = Pair()
    a, us = pair.initiator, pair.responder
    c = HandshakeCore(generate_private_key())
    us.add_peer(c.public_key)
    c.add_peer(us.public_key)
    consumed = us.consume_initiation(pair.initiation(index=1), 0.0)
    us.create_response(consumed.peer_public_key, 5, 0.0)
    to_c = us.create_initiation(c.public_key, 5, 0.0)
    us.create_initiation(a.public_key, 6, 0.0)
    reply = c.create_cookie_reply(to_c, b"\x7f\x00\x00\x01\x00\x01", 0.0)
    assert us.consume_cookie_reply(reply, 0.0) == c.public_key
