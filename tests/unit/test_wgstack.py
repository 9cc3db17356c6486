"""The C data plane, sans-IO: datagrams and a fake clock in, datagrams and events out.

The "peer side" is built here by hand with PyNaCl: transport messages are encrypted with the
key the engine receives with, and what the engine sends is decrypted with its send key.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
)

from tests.helpers import wait_for
from tests.packets import icmp_echo, inet_checksum, ipv4
from unclaw_tui.engine import _ffi
from unclaw_tui.engine._ffi import Engine, EngineError, EngineEvent

T0 = 1000.0  # the fake clock starts here (0 means "never" in the stats)
GATEWAY_IP = "10.77.0.1"
PEER_IP = "10.77.0.2"
PEER_ENDPOINT = ("192.0.2.10", 51820)
PEER_ID = 0
LOCAL_INDEX = 0x11111111
REMOTE_INDEX = 0x22222222
KEY_GW_TO_PEER = bytes(range(32))  # the engine's send key, the peer's receive key
KEY_PEER_TO_GW = bytes(range(32, 64))  # the peer's send key, the engine's receive key
REPLAY_WINDOW = 8128


# ---- The peer side ------------------------------------------------------------------------


def nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + struct.pack("<Q", counter)


def transport(receiver: int, counter: int, plaintext: bytes, key: bytes = KEY_PEER_TO_GW) -> bytes:
    sealed = crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, None, nonce(counter), key)
    return struct.pack("<IIQ", 4, receiver, counter) + sealed


def open_transport(datagram: bytes, key: bytes = KEY_GW_TO_PEER) -> tuple[int, int, bytes]:
    """(receiver index, counter, plaintext) of a transport message the engine sent."""
    msg_type, receiver, counter = struct.unpack_from("<IIQ", datagram)
    assert msg_type == 4
    plaintext = crypto_aead_chacha20poly1305_ietf_decrypt(datagram[16:], None, nonce(counter), key)
    return receiver, counter, plaintext


def udp_packet(src: str = PEER_IP, dst: str = "10.0.0.9", payload: bytes = b"hello") -> bytes:
    # The checksum is left zero (allowed for UDP over IPv4).
    return ipv4(src, dst, 17, struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload)


def ipv6_packet(src: str, dst: str, payload: bytes = b"x" * 8, next_header: int = 59) -> bytes:
    """An IPv6 packet; next header 59 ("no next header") by default, which nothing answers."""
    return (
        struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + payload
    )


# ---- Fixtures and small helpers ------------------------------------------------------------


@pytest.fixture
def wg_engine() -> Iterator[Engine]:
    engine = Engine(GATEWAY_IP, 24)
    yield engine
    engine.close()


@pytest.fixture
def wg_peer(wg_engine: Engine) -> Engine:
    """An engine with one peer (10.77.0.2/32) and no keypair yet."""
    wg_engine.peer_add(PEER_ID)
    wg_engine.peer_add_allowed_ip(PEER_ID, f"{PEER_IP}/32")
    wg_engine.peer_set_endpoint(PEER_ID, PEER_ENDPOINT)
    return wg_engine


@pytest.fixture
def wg_session(wg_peer: Engine) -> Engine:
    """The peer with a confirmed responder keypair installed at T0 (the usual gateway case)."""
    wg_peer.install_keypair(
        PEER_ID, LOCAL_INDEX, REMOTE_INDEX, KEY_GW_TO_PEER, KEY_PEER_TO_GW, False, T0
    )
    wg_peer.input(transport(LOCAL_INDEX, 0, b""), PEER_ENDPOINT, T0)
    assert [e.type for e in wg_peer.events()] == [_ffi.EV_KEYPAIR_CONFIRMED]
    assert wg_peer.outputs() == []
    return wg_peer


def drops(engine: Engine) -> dict[str, int]:
    """Only the nonzero drop counters."""
    return {name: n for name, n in engine.drop_counts().items() if n}


def need_handshake_events(events: list[EngineEvent]) -> list[int]:
    return [e.arg for e in events if e.type == _ffi.EV_NEED_HANDSHAKE]


# ---- Messages and handshake packets ---------------------------------------------------------


def test_drop_reason_names_mirror_the_header() -> None:
    assert _ffi.DROP_REASONS[:4] == ("truncated", "bad_size", "bad_type", "unknown_index")
    assert len(_ffi.DROP_REASONS) == len(set(_ffi.DROP_REASONS))
    assert "spoofed_src" in _ffi.DROP_REASONS


@pytest.mark.parametrize(
    ("msg_type", "size"), [(1, 148), (2, 92), (3, 64)], ids=["initiation", "response", "cookie"]
)
def test_handshake_message_surfaces_as_event_with_exact_bytes(
    wg_engine: Engine, msg_type: int, size: int
) -> None:
    message = bytes([msg_type, 0, 0, 0]) + bytes((i * 7) & 0xFF for i in range(size - 4))
    wg_engine.input(message, ("2001:db8::5", 4242), T0)
    wg_engine.input(message, ("::ffff:198.51.100.7", 9), T0)
    events = wg_engine.events()
    assert events == [
        EngineEvent(_ffi.EV_HANDSHAKE_PACKET, -1, 0, ("2001:db8::5", 4242), message),
        EngineEvent(_ffi.EV_HANDSHAKE_PACKET, -1, 0, ("198.51.100.7", 9), message),
    ]
    assert drops(wg_engine) == {}


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "truncated"),
        (b"\x04\0\0", "truncated"),
        (b"\x04\0\0\0" + bytes(27), "truncated"),  # transport shorter than header + tag
        (b"\x01\0\0\0" + bytes(143), "bad_size"),
        (b"\x01\0\0\0" + bytes(145), "bad_size"),
        (b"\x02\0\0\0" + bytes(100), "bad_size"),
        (b"\x03\0\0\0" + bytes(59), "bad_size"),
        (b"\x05\0\0\0" + bytes(60), "bad_type"),
        (b"\x00\0\0\0" + bytes(60), "bad_type"),
        (b"\x01\0\x01\0" + bytes(144), "bad_type"),  # reserved bytes must be zero
        (b"\x04\x01\0\0" + bytes(60), "bad_type"),
    ],
)
def test_malformed_datagrams_are_counted_by_reason(
    wg_engine: Engine, datagram: bytes, reason: str
) -> None:
    wg_engine.input(datagram, PEER_ENDPOINT, T0)
    assert drops(wg_engine) == {reason: 1}
    assert wg_engine.events() == []
    assert wg_engine.stats()["rx_datagrams"] == 1


def test_unknown_receiver_index_is_dropped(wg_session: Engine) -> None:
    wg_session.input(transport(LOCAL_INDEX + 1, 1, b""), PEER_ENDPOINT, T0)
    assert drops(wg_session) == {"unknown_index": 1}


def test_wrong_key_fails_authentication_and_burns_no_counter(wg_session: Engine) -> None:
    wg_session.input(transport(LOCAL_INDEX, 7, b"", key=bytes(32)), PEER_ENDPOINT, T0)
    assert drops(wg_session) == {"decrypt": 1}
    wg_session.input(transport(LOCAL_INDEX, 7, b""), PEER_ENDPOINT, T0)
    assert drops(wg_session) == {"decrypt": 1}
    assert wg_session.peer_stats(PEER_ID).rx_packets == 2  # the confirming keepalive + this one


def test_tampered_ciphertext_is_rejected(wg_session: Engine) -> None:
    packet = bytearray(transport(LOCAL_INDEX, 1, udp_packet()))
    packet[20] ^= 1
    wg_session.input(bytes(packet), PEER_ENDPOINT, T0)
    assert drops(wg_session) == {"decrypt": 1}


# ---- Replay window --------------------------------------------------------------------------


def accepted(engine: Engine, counter: int) -> bool:
    before = engine.peer_stats(PEER_ID).rx_packets
    engine.input(transport(LOCAL_INDEX, counter, b""), PEER_ENDPOINT, T0 + 1)
    return engine.peer_stats(PEER_ID).rx_packets == before + 1


def test_replay_same_counter_twice(wg_session: Engine) -> None:
    assert accepted(wg_session, 1)
    assert not accepted(wg_session, 1)
    assert not accepted(wg_session, 0)  # the counter that confirmed the session
    assert drops(wg_session) == {"replay": 2}


def test_counter_at_reject_after_messages_is_refused(wg_session: Engine) -> None:
    reject_after_messages = 2**64 - 2**13 - 1
    assert not accepted(wg_session, reject_after_messages)
    assert drops(wg_session) == {"key_expired": 1}
    assert accepted(wg_session, reject_after_messages - 1)


def test_replay_out_of_order_within_window(wg_session: Engine) -> None:
    for counter in (5, 3, 4, 2, 1, 70, 6, 65):
        assert accepted(wg_session, counter), counter
    for counter in (1, 2, 3, 4, 5, 6, 65, 70):
        assert not accepted(wg_session, counter), counter


def test_replay_far_ahead_then_old_within_window_accepted_once(wg_session: Engine) -> None:
    ahead = 20000
    assert accepted(wg_session, ahead)
    oldest_in_window = ahead - REPLAY_WINDOW
    assert accepted(wg_session, oldest_in_window)
    assert not accepted(wg_session, oldest_in_window)
    assert not accepted(wg_session, oldest_in_window - 1)  # 8129 behind
    assert not accepted(wg_session, 1)
    assert accepted(wg_session, ahead - 1)
    assert drops(wg_session) == {"replay": 3}


def test_replay_window_slides_and_clears_reused_blocks(wg_session: Engine) -> None:
    assert accepted(wg_session, 100)
    # 128 blocks of 64 bits later the ring reuses the same bits: the jump must clear them.
    assert accepted(wg_session, 100 + 64 * 128)
    assert accepted(wg_session, 64 * 128)  # the bit counter 0 (the confirming keepalive) used
    assert not accepted(wg_session, 100)  # now behind the window


# ---- Inner packets -------------------------------------------------------------------------


def test_icmp_echo_request_to_gateway_gets_encrypted_reply(wg_session: Engine) -> None:
    data = bytes(range(56))
    request = ipv4(PEER_IP, GATEWAY_IP, 1, icmp_echo(0xBEEF, 7, data), ttl=3)
    wg_session.input(transport(LOCAL_INDEX, 1, request), PEER_ENDPOINT, T0 + 1)

    [(datagram, dst)] = wg_session.outputs()
    assert dst == PEER_ENDPOINT
    receiver, counter, plaintext = open_transport(datagram)
    assert (receiver, counter) == (REMOTE_INDEX, 0)
    assert len(plaintext) % 16 == 0  # padded
    total_len = struct.unpack_from("!H", plaintext, 2)[0]
    reply = plaintext[:total_len]
    assert plaintext[total_len:] == bytes(len(plaintext) - total_len)
    header, icmp = reply[:20], reply[20:]
    assert header[0] == 0x45 and header[8] == 64 and header[9] == 1
    assert header[12:16] == ipaddress.IPv4Address(GATEWAY_IP).packed
    assert header[16:20] == ipaddress.IPv4Address(PEER_IP).packed
    assert inet_checksum(header) == 0
    assert inet_checksum(icmp) == 0
    assert icmp[0] == 0 and icmp[1] == 0
    assert struct.unpack_from("!HH", icmp, 4) == (0xBEEF, 7)
    assert icmp[8:] == data
    assert wg_session.stats()["icmp_echo_replies"] == 1
    assert drops(wg_session) == {}


def test_icmp_with_bad_checksum_or_fragment_gets_no_reply(wg_session: Engine) -> None:
    echo = bytearray(icmp_echo(1, 1, b"abc"))
    echo[8] ^= 0xFF
    wg_session.input(
        transport(LOCAL_INDEX, 1, ipv4(PEER_IP, GATEWAY_IP, 1, bytes(echo))), PEER_ENDPOINT, T0
    )
    fragment = ipv4(PEER_IP, GATEWAY_IP, 1, icmp_echo(1, 2, b"abc"), frag=0x2000)
    wg_session.input(transport(LOCAL_INDEX, 2, fragment), PEER_ENDPOINT, T0)
    assert wg_session.outputs() == []
    assert drops(wg_session) == {"bad_ip": 1, "fragment": 1}


def test_echo_to_another_address_is_unhandled(wg_session: Engine) -> None:
    request = ipv4(PEER_IP, "10.77.0.9", 1, icmp_echo(1, 1, b"abc"))
    wg_session.input(transport(LOCAL_INDEX, 1, request), PEER_ENDPOINT, T0)
    assert wg_session.outputs() == []
    assert drops(wg_session) == {"unhandled": 1}


def test_keepalive_is_counted_but_not_dispatched(wg_session: Engine) -> None:
    before = wg_session.peer_stats(PEER_ID)
    wg_session.input(transport(LOCAL_INDEX, 1, b""), PEER_ENDPOINT, T0 + 2)
    after = wg_session.peer_stats(PEER_ID)
    assert after.rx_packets == before.rx_packets + 1
    assert after.rx_bytes == before.rx_bytes + 32
    assert after.last_rx == T0 + 2
    assert drops(wg_session) == {}
    assert wg_session.outputs() == []
    wg_session.tick(T0 + 100)
    assert wg_session.outputs() == []  # a keepalive does not ask for a keepalive back


def test_spoofed_inner_source_is_dropped(wg_session: Engine) -> None:
    request = ipv4("10.77.0.3", GATEWAY_IP, 1, icmp_echo(1, 1, b""))
    wg_session.input(transport(LOCAL_INDEX, 1, request), PEER_ENDPOINT, T0)
    v6 = ipv6_packet("fd00::2", "fd00::1")
    wg_session.input(transport(LOCAL_INDEX, 2, v6), PEER_ENDPOINT, T0)
    assert drops(wg_session) == {"spoofed_src": 2}
    assert wg_session.outputs() == []


def test_ipv6_from_allowed_source_is_parsed_then_unhandled(wg_session: Engine) -> None:
    wg_session.peer_add_allowed_ip(PEER_ID, "fd00::2/128")
    wg_session.input(
        transport(LOCAL_INDEX, 1, ipv6_packet("fd00::2", "fd00::1")), PEER_ENDPOINT, T0
    )
    assert drops(wg_session) == {"unhandled": 1}


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: p[:10] + bytes([p[10] ^ 0xFF]) + p[11:],  # header checksum
        lambda p: bytes([0x55]) + p[1:],  # version 5
        lambda p: bytes([0x44]) + p[1:],  # IHL 4
        lambda p: p[:2] + struct.pack("!H", len(p) + 1) + p[4:],  # longer than the plaintext
        lambda p: p[:12],  # shorter than a header
    ],
    ids=["checksum", "version", "ihl", "total-length", "short"],
)
def test_bad_inner_ipv4_is_dropped(wg_session: Engine, mangle: Callable[[bytes], bytes]) -> None:
    packet = mangle(ipv4(PEER_IP, GATEWAY_IP, 1, icmp_echo(1, 1, b"ping")))
    wg_session.input(transport(LOCAL_INDEX, 1, packet), PEER_ENDPOINT, T0)
    assert drops(wg_session) == {"bad_ip": 1}
    assert wg_session.outputs() == []


def test_inner_padding_is_trimmed_by_ip_total_length(wg_session: Engine) -> None:
    request = ipv4(PEER_IP, GATEWAY_IP, 1, icmp_echo(9, 9, b"abc"))
    padded = request + bytes(-len(request) % 16)
    wg_session.input(transport(LOCAL_INDEX, 1, padded), PEER_ENDPOINT, T0)
    [(datagram, _)] = wg_session.outputs()
    plaintext = open_transport(datagram)[2]
    assert plaintext[28:31] == b"abc"
    assert struct.unpack_from("!H", plaintext, 2)[0] == len(request)


# ---- Roaming and keypair rotation ----------------------------------------------------------


def test_endpoint_follows_authenticated_packets_only(wg_session: Engine) -> None:
    forged_src = ("203.0.113.66", 1111)
    wg_session.input(transport(LOCAL_INDEX, 1, b"", key=bytes(32)), forged_src, T0)
    assert wg_session.peer_stats(PEER_ID).endpoint == PEER_ENDPOINT
    assert wg_session.events() == []

    roamed = ("2001:db8::77", 5555)
    wg_session.input(transport(LOCAL_INDEX, 2, b""), roamed, T0)
    assert wg_session.events() == [EngineEvent(_ffi.EV_ENDPOINT_CHANGED, PEER_ID, 0, roamed, b"")]
    assert wg_session.peer_stats(PEER_ID).endpoint == roamed
    wg_session.input(transport(LOCAL_INDEX, 3, b""), roamed, T0)
    assert wg_session.events() == []  # same endpoint again: no event

    request = ipv4(PEER_IP, GATEWAY_IP, 1, icmp_echo(1, 1, b""))
    wg_session.input(transport(LOCAL_INDEX, 4, request), roamed, T0)
    [(_, dst)] = wg_session.outputs()
    assert dst == roamed


def test_responder_keypairs_rotate_on_confirmation(wg_session: Engine) -> None:
    first, second, third = LOCAL_INDEX, 0x33333333, 0x44444444
    keys = {second: (bytes([2]) * 32, bytes([3]) * 32), third: (bytes([4]) * 32, bytes([5]) * 32)}

    wg_session.install_keypair(PEER_ID, second, 0x55, *keys[second], False, T0 + 100)
    # Until the peer uses it, the engine keeps sending with the confirmed keypair.
    wg_session.send_inner(udp_packet(GATEWAY_IP, PEER_IP), T0 + 100)
    [(datagram, _)] = wg_session.outputs()
    assert open_transport(datagram)[0] == REMOTE_INDEX

    wg_session.input(transport(second, 0, b"", key=keys[second][1]), PEER_ENDPOINT, T0 + 101)
    assert wg_session.events() == [
        EngineEvent(_ffi.EV_KEYPAIR_CONFIRMED, PEER_ID, second, None, b"")
    ]
    assert wg_session.peer_stats(PEER_ID).current_created == T0 + 100
    # The previous keypair still receives (packets in flight during the rotation).
    assert accepted(wg_session, 1)

    wg_session.install_keypair(PEER_ID, third, 0x66, *keys[third], False, T0 + 200)
    assert wg_session.events() == [EngineEvent(_ffi.EV_KEYPAIR_FREED, PEER_ID, first, None, b"")]
    assert not wg_session.index_in_use(first)
    assert wg_session.index_in_use(second) and wg_session.index_in_use(third)
    wg_session.input(transport(first, 2, b""), PEER_ENDPOINT, T0 + 200)
    assert drops(wg_session) == {"unknown_index": 1}

    wg_session.input(transport(third, 0, b"", key=keys[third][1]), PEER_ENDPOINT, T0 + 201)
    assert [e.type for e in wg_session.events()] == [_ffi.EV_KEYPAIR_CONFIRMED]
    wg_session.send_inner(udp_packet(GATEWAY_IP, PEER_IP), T0 + 201)
    [(datagram, _)] = wg_session.outputs()
    assert open_transport(datagram, key=keys[third][0])[:2] == (0x66, 0)


def test_index_reuse_is_rejected(wg_session: Engine) -> None:
    wg_session.peer_add(1)
    with pytest.raises(EngineError) as err:
        wg_session.install_keypair(1, LOCAL_INDEX, 9, bytes(32), bytes(32), False, T0)
    assert err.value.code == _ffi.EINDEX
    assert wg_session.index_in_use(LOCAL_INDEX)
    assert not wg_session.index_in_use(LOCAL_INDEX + 1)


def test_argument_errors_raise_before_reaching_c(wg_peer: Engine) -> None:
    with pytest.raises(EngineError) as err:
        wg_peer.install_keypair(PEER_ID, 1, 2, bytes(31), bytes(32), True, T0)
    assert err.value.code == _ffi.EINVAL
    with pytest.raises(EngineError) as err:
        wg_peer.peer_stats(7)
    assert err.value.code == _ffi.ENOPEER
    with pytest.raises(EngineError) as err:
        wg_peer.peer_add(PEER_ID)
    assert err.value.code == _ffi.EEXIST
    with pytest.raises(EngineError):
        wg_peer.peer_add(10_000)  # beyond max_peers
    with pytest.raises(EngineError):
        wg_peer.send_inner(b"\x45" + bytes(10), T0)  # not an IP packet
    with pytest.raises(EngineError):
        wg_peer.send_inner(bytes(2000), T0)  # beyond the MTU
    with pytest.raises(EngineError):
        wg_peer.peer_set_endpoint(PEER_ID, ("not-an-ip", 1))


def test_close_is_idempotent(wg_engine: Engine) -> None:
    wg_engine.close()
    wg_engine.close()
    with pytest.raises(EngineError):
        wg_engine.tick(T0)


def test_peer_remove_frees_indices_and_routes(wg_session: Engine) -> None:
    wg_session.peer_remove(PEER_ID)
    assert not wg_session.index_in_use(LOCAL_INDEX)
    wg_session.send_inner(udp_packet(GATEWAY_IP, PEER_IP), T0)
    assert drops(wg_session) == {"no_route": 1}
    wg_session.peer_add(PEER_ID)  # the id can be reused
    assert wg_session.peer_stats(PEER_ID).rx_packets == 0


# ---- Sending, staging, routing -------------------------------------------------------------


def test_send_inner_pads_and_counts(wg_session: Engine) -> None:
    packet = udp_packet(GATEWAY_IP, PEER_IP, payload=b"x")  # 29 bytes
    wg_session.send_inner(packet, T0 + 1)
    wg_session.send_inner(packet, T0 + 1)
    outputs = wg_session.outputs()
    assert [open_transport(d)[1] for d, _ in outputs] == [0, 1]
    plaintext = open_transport(outputs[0][0])[2]
    assert plaintext == packet + bytes(3)
    assert len(outputs[0][0]) == 16 + 32 + 16
    stats = wg_session.peer_stats(PEER_ID)
    assert (stats.tx_packets, stats.tx_bytes, stats.last_tx) == (2, 128, T0 + 1)


def test_send_inner_routes_by_longest_prefix(wg_session: Engine) -> None:
    wg_session.peer_add(1)
    wg_session.peer_add_allowed_ip(1, "10.0.0.0/8")
    wg_session.peer_add(2)
    wg_session.peer_add_allowed_ip(2, "10.1.0.0/16")
    wg_session.peer_add_allowed_ip(PEER_ID, "10.1.2.0/24")
    wg_session.send_inner(udp_packet(GATEWAY_IP, "10.1.2.3"), T0)
    [(datagram, _)] = wg_session.outputs()  # peer 0: it has a keypair
    assert open_transport(datagram)[0] == REMOTE_INDEX
    wg_session.send_inner(udp_packet(GATEWAY_IP, "10.1.9.9"), T0)  # peer 2, no keypair: staged
    wg_session.send_inner(udp_packet(GATEWAY_IP, "10.200.0.1"), T0)  # peer 1
    assert wg_session.peer_stats(2).staged == 1
    assert wg_session.peer_stats(1).staged == 1
    wg_session.send_inner(udp_packet(GATEWAY_IP, "192.168.0.1"), T0)
    assert drops(wg_session) == {"no_route": 1}


def test_staged_until_initiator_keypair_then_flushed(wg_peer: Engine) -> None:
    first = udp_packet(GATEWAY_IP, PEER_IP, payload=b"first")
    second = udp_packet(GATEWAY_IP, PEER_IP, payload=b"second")
    wg_peer.send_inner(first, T0)
    wg_peer.send_inner(second, T0 + 1)
    assert wg_peer.outputs() == []
    assert need_handshake_events(wg_peer.events()) == [_ffi.NEED_NO_KEY]  # once: rate-limited
    assert wg_peer.peer_stats(PEER_ID).staged == 2
    assert wg_peer.peer_stats(PEER_ID).has_current is False

    wg_peer.install_keypair(
        PEER_ID, LOCAL_INDEX, REMOTE_INDEX, KEY_GW_TO_PEER, KEY_PEER_TO_GW, True, T0 + 2
    )
    plaintexts = [open_transport(d)[2] for d, _ in wg_peer.outputs()]
    assert plaintexts == [first + bytes(-len(first) % 16), second + bytes(-len(second) % 16)]
    assert wg_peer.peer_stats(PEER_ID).staged == 0
    assert wg_peer.peer_stats(PEER_ID).has_current is True


def test_initiator_keypair_without_staged_data_sends_keepalive(wg_peer: Engine) -> None:
    wg_peer.install_keypair(
        PEER_ID, LOCAL_INDEX, REMOTE_INDEX, KEY_GW_TO_PEER, KEY_PEER_TO_GW, True, T0
    )
    [(datagram, dst)] = wg_peer.outputs()
    assert dst == PEER_ENDPOINT and len(datagram) == 32
    assert open_transport(datagram) == (REMOTE_INDEX, 0, b"")


def test_staged_queue_is_bounded_and_droppable() -> None:
    engine = Engine(GATEWAY_IP, 24, staged_per_peer=2)
    try:
        engine.peer_add(0)
        engine.peer_add_allowed_ip(0, f"{PEER_IP}/32")
        for _ in range(3):
            engine.send_inner(udp_packet(GATEWAY_IP, PEER_IP), T0)
        assert drops(engine) == {"staged_full": 1}
        engine.peer_drop_staged(0)
        assert engine.peer_stats(0).staged == 0
    finally:
        engine.close()


def test_need_handshake_rate_limit_is_lifted_by_a_keypair(wg_peer: Engine) -> None:
    packet = udp_packet(GATEWAY_IP, PEER_IP)
    wg_peer.send_inner(packet, T0)
    wg_peer.send_inner(packet, T0 + 4.9)
    wg_peer.send_inner(packet, T0 + 5)
    assert need_handshake_events(wg_peer.events()) == [_ffi.NEED_NO_KEY, _ffi.NEED_NO_KEY]
    wg_peer.install_keypair(PEER_ID, 1, 2, KEY_GW_TO_PEER, KEY_PEER_TO_GW, False, T0 + 6)
    wg_peer.send_inner(packet, T0 + 6)  # responder keypair not confirmed yet: still staged
    assert need_handshake_events(wg_peer.events()) == [_ffi.NEED_NO_KEY]


def test_initiator_keypair_asks_for_rekey_after_120s(wg_peer: Engine) -> None:
    wg_peer.install_keypair(
        PEER_ID, LOCAL_INDEX, REMOTE_INDEX, KEY_GW_TO_PEER, KEY_PEER_TO_GW, True, T0
    )
    wg_peer.outputs()
    packet = udp_packet(GATEWAY_IP, PEER_IP)
    wg_peer.send_inner(packet, T0 + 119)
    assert need_handshake_events(wg_peer.events()) == []
    wg_peer.send_inner(packet, T0 + 121)
    assert len(wg_peer.outputs()) == 2  # still sent
    assert need_handshake_events(wg_peer.events()) == [_ffi.NEED_REKEY_TIME]


def test_responder_keypair_does_not_ask_for_rekey_on_send(wg_session: Engine) -> None:
    wg_session.input(transport(LOCAL_INDEX, 1, b""), PEER_ENDPOINT, T0 + 170)
    wg_session.send_inner(udp_packet(GATEWAY_IP, PEER_IP), T0 + 170)
    assert len(wg_session.outputs()) == 1
    assert need_handshake_events(wg_session.events()) == []


def test_receiving_on_old_initiator_keypair_asks_once(wg_peer: Engine) -> None:
    wg_peer.install_keypair(
        PEER_ID, LOCAL_INDEX, REMOTE_INDEX, KEY_GW_TO_PEER, KEY_PEER_TO_GW, True, T0
    )
    wg_peer.input(transport(LOCAL_INDEX, 0, b""), PEER_ENDPOINT, T0 + 164)
    assert need_handshake_events(wg_peer.events()) == []
    wg_peer.input(transport(LOCAL_INDEX, 1, b""), PEER_ENDPOINT, T0 + 166)
    wg_peer.input(transport(LOCAL_INDEX, 2, b""), PEER_ENDPOINT, T0 + 175)
    assert need_handshake_events(wg_peer.events()) == [_ffi.NEED_RECV_OLD]


def test_keys_expire_after_180s_and_are_zeroed_after_540s(wg_session: Engine) -> None:
    wg_session.input(transport(LOCAL_INDEX, 1, b""), PEER_ENDPOINT, T0 + 179.9)
    assert wg_session.peer_stats(PEER_ID).has_current is True
    wg_session.input(transport(LOCAL_INDEX, 2, b""), PEER_ENDPOINT, T0 + 180)
    assert drops(wg_session) == {"key_expired": 1}

    wg_session.send_inner(udp_packet(GATEWAY_IP, PEER_IP), T0 + 181)
    assert wg_session.outputs() == []
    assert wg_session.peer_stats(PEER_ID).staged == 1
    assert wg_session.peer_stats(PEER_ID).has_current is False
    assert need_handshake_events(wg_session.events()) == [_ffi.NEED_NO_KEY]

    wg_session.tick(T0 + 539)
    assert wg_session.events() == []
    assert wg_session.index_in_use(LOCAL_INDEX)
    wg_session.tick(T0 + 540)
    assert [(e.type, e.arg) for e in wg_session.events()] == [
        (_ffi.EV_KEYPAIR_FREED, LOCAL_INDEX),
        (_ffi.EV_KEYS_EXPIRED, 0),
    ]
    assert not wg_session.index_in_use(LOCAL_INDEX)
    stats = wg_session.peer_stats(PEER_ID)
    assert (stats.has_current, stats.current_created, stats.staged) == (False, None, 0)


# ---- Timers --------------------------------------------------------------------------------


def test_passive_keepalive_after_10s_of_silence(wg_session: Engine) -> None:
    assert wg_session.next_deadline() == T0 + 540  # only the key-zeroing timer
    wg_session.input(transport(LOCAL_INDEX, 1, udp_packet()), PEER_ENDPOINT, T0 + 1)
    assert len(wg_session.udp_datagrams()) == 1  # data the gateway does not answer by itself
    assert wg_session.next_deadline() == T0 + 11
    wg_session.tick(T0 + 10.9)
    assert wg_session.outputs() == []
    wg_session.tick(T0 + 11)
    [(datagram, _)] = wg_session.outputs()
    assert open_transport(datagram)[2] == b""
    wg_session.tick(T0 + 30)
    assert wg_session.outputs() == []  # one keepalive, not one every 10 s


def test_passive_keepalive_not_needed_when_we_answered(wg_session: Engine) -> None:
    request = ipv4(PEER_IP, GATEWAY_IP, 1, icmp_echo(1, 1, b""))
    wg_session.input(transport(LOCAL_INDEX, 1, request), PEER_ENDPOINT, T0 + 1)
    assert len(wg_session.outputs()) == 1  # the echo reply
    wg_session.tick(T0 + 11)
    assert wg_session.outputs() == []


def test_no_response_after_15s_asks_for_handshake(wg_session: Engine) -> None:
    wg_session.send_inner(udp_packet(GATEWAY_IP, PEER_IP), T0 + 1)
    wg_session.outputs()
    assert wg_session.next_deadline() == T0 + 16
    wg_session.tick(T0 + 15.9)
    assert wg_session.events() == []
    wg_session.tick(T0 + 16)
    assert need_handshake_events(wg_session.events()) == [_ffi.NEED_NO_RESPONSE]


def test_an_answer_cancels_the_no_response_timer(wg_session: Engine) -> None:
    wg_session.send_inner(udp_packet(GATEWAY_IP, PEER_IP), T0 + 1)
    wg_session.input(transport(LOCAL_INDEX, 1, b""), PEER_ENDPOINT, T0 + 5)
    wg_session.tick(T0 + 16)
    assert need_handshake_events(wg_session.events()) == []


def test_persistent_keepalive(wg_engine: Engine) -> None:
    wg_engine.peer_add(3, persistent_keepalive=25)
    wg_engine.peer_set_endpoint(3, PEER_ENDPOINT)
    wg_engine.install_keypair(3, 7, 8, KEY_GW_TO_PEER, KEY_PEER_TO_GW, True, T0)
    assert len(wg_engine.outputs()) == 1  # the confirming keepalive
    assert wg_engine.next_deadline() == T0 + 25
    wg_engine.tick(T0 + 25)
    [(datagram, _)] = wg_engine.outputs()
    assert open_transport(datagram) == (8, 1, b"")
    assert wg_engine.next_deadline() == T0 + 50


def test_nothing_armed_means_no_deadline(wg_peer: Engine) -> None:
    assert wg_peer.next_deadline() is None
    wg_peer.tick(T0)
    assert wg_peer.outputs() == [] and wg_peer.events() == []


# ---- Output queue --------------------------------------------------------------------------


def test_send_raw_and_output_overflow(wg_engine: Engine) -> None:
    message = b"\x01\0\0\0" + bytes(144)
    for _ in range(1025):
        wg_engine.send_raw(message, ("2001:db8::1", 51820))
    assert drops(wg_engine) == {"output_overflow": 1}
    outputs = wg_engine.outputs()
    assert len(outputs) == 1024
    assert outputs[0] == (message, ("2001:db8::1", 51820))


# ---- Robustness ----------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), first=st.sampled_from([None, 1, 2, 3, 4]))
def test_random_datagrams_never_crash(data: bytes, first: int | None) -> None:
    engine = Engine(GATEWAY_IP, 24)
    try:
        engine.peer_add(PEER_ID)
        engine.install_keypair(PEER_ID, 1, 2, bytes(32), bytes(32), False, T0)
        if first is not None:
            data = bytes([first, 0, 0, 0]) + struct.pack("<I", 1) + data
        engine.input(data, PEER_ENDPOINT, T0)
        assert sum(engine.drop_counts().values()) + len(engine.events()) == 1
    finally:
        engine.close()


@settings(max_examples=400, deadline=None)
@given(plaintext=st.binary(max_size=200), version=st.sampled_from([None, 4, 6]))
def test_random_authenticated_plaintexts_never_crash(plaintext: bytes, version: int | None) -> None:
    engine = Engine(GATEWAY_IP, 24)
    try:
        engine.peer_add(PEER_ID)
        engine.peer_add_allowed_ip(PEER_ID, "0.0.0.0/0")
        engine.peer_add_allowed_ip(PEER_ID, "::/0")
        engine.peer_set_endpoint(PEER_ID, PEER_ENDPOINT)
        engine.install_keypair(PEER_ID, 1, 2, KEY_GW_TO_PEER, KEY_PEER_TO_GW, False, T0)
        if version == 4 and plaintext:
            plaintext = bytes([0x45]) + plaintext[1:]
        elif version == 6 and plaintext:
            plaintext = bytes([0x60]) + plaintext[1:]
        engine.input(transport(1, 0, plaintext), PEER_ENDPOINT, T0)
        for datagram, _ in engine.outputs():
            open_transport(datagram)  # anything sent is well-formed and authentic
    finally:
        engine.close()


def test_random_inner_echo_requests_get_valid_replies(wg_session: Engine) -> None:
    for counter, size in enumerate((0, 1, 2, 3, 17, 1000, 1392), start=1):
        data = bytes((i * 13 + size) & 0xFF for i in range(size))
        request = ipv4(PEER_IP, GATEWAY_IP, 1, icmp_echo(size, counter, data))
        wg_session.input(transport(LOCAL_INDEX, counter, request), PEER_ENDPOINT, T0)
        [(datagram, _)] = wg_session.outputs()
        reply = open_transport(datagram)[2]
        assert inet_checksum(reply[:20]) == 0
        icmp = reply[20 : struct.unpack_from("!H", reply, 2)[0]]
        assert inet_checksum(icmp) == 0 and icmp[8:] == data
    assert drops(wg_session) == {}


# ---- Real sockets --------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "dual-stack-ipv6"])
def test_io_helper_over_loopback_udp(family: int) -> None:
    engine = Engine(GATEWAY_IP, 24)
    gateway = socket.socket(socket.AF_INET if family == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    if family == 6:
        gateway.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    gateway.bind(("127.0.0.1", 0) if family == 4 else ("::", 0))
    gateway.setblocking(False)
    port = gateway.getsockname()[1]
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(2)
    client_endpoint = client.getsockname()
    peers = [client]
    if family == 6:
        client6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        client6.bind(("::1", 0))
        client6.settimeout(2)
        peers.append(client6)
    try:
        engine.io_attach(gateway.fileno(), family)
        assert engine.io_recv(T0) == 0  # nothing waiting: EAGAIN is not an error
        for peer_id, sock in enumerate(peers):
            engine.peer_add(peer_id)
            src_ip = f"10.77.0.{peer_id + 2}"
            engine.peer_add_allowed_ip(peer_id, f"{src_ip}/32")
            engine.install_keypair(
                peer_id, 100 + peer_id, 200, KEY_GW_TO_PEER, KEY_PEER_TO_GW, False, T0
            )
            gateway_address = ("127.0.0.1", port) if sock is client else ("::1", port)
            for counter in range(3):
                request = ipv4(src_ip, GATEWAY_IP, 1, icmp_echo(peer_id, counter, b"ping"))
                sock.sendto(transport(100 + peer_id, counter, request), gateway_address)
            sock.sendto(b"\x01\0\0\0" + bytes(144), gateway_address)

        received = 0

        def all_in() -> bool:  # loopback delivery is fast but not synchronous
            nonlocal received
            received += engine.io_recv(T0 + 1)
            return received == 4 * len(peers)

        wait_for(all_in, "every peer's datagrams", timeout=2, interval=0.005)
        events = engine.events()
        handshake_sources = [e.src for e in events if e.type == _ffi.EV_HANDSHAKE_PACKET]
        assert handshake_sources[0] == client_endpoint  # dual-stack: IPv4 shows as family 4
        if family == 6:
            assert handshake_sources[1] == ("::1", peers[1].getsockname()[1])
        for sock in peers:
            for counter in range(3):
                datagram, _ = sock.recvfrom(2048)
                receiver, seq, reply = open_transport(datagram)
                assert receiver == 200 and seq == counter
                assert reply[20] == 0  # echo reply
        assert engine.stats()["icmp_echo_replies"] == 3 * len(peers)

        engine.send_raw(b"\x02\0\0\0" + bytes(88), client_endpoint)
        assert engine.io_flush() == 1
        assert client.recvfrom(2048)[0] == b"\x02\0\0\0" + bytes(88)
    finally:
        engine.close()
        gateway.close()
        for sock in peers:
            sock.close()


def test_many_peers_stats_and_all_drop_counters_in_one_call_each(wg_session: Engine) -> None:
    wg_session.input(transport(LOCAL_INDEX + 1, 1, b""), PEER_ENDPOINT, T0)  # one drop
    [one, unknown] = wg_session.peers_stats([PEER_ID, PEER_ID + 1])
    assert one == wg_session.peer_stats(PEER_ID) and one.rx_packets == 1
    assert (unknown.rx_packets, unknown.endpoint) == (0, None)
    counts = wg_session.drop_counts()
    assert counts["unknown_index"] == 1 and sum(counts.values()) == 1
    assert "tcp_bad_checksum" in counts and len(counts) == len(set(counts))
