"""The WireGuard handshake, sans-IO: Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s plus WireGuard framing.

Two layers, as in wireguard-go's noise-protocol.go:

* `SymmetricState` and `IKpsk2` are the Noise IKpsk2 pattern with a parametric protocol name,
  prologue, ephemeral keys and payloads, so they can be checked against the Cacophony vectors:
      <- s
      ...
      -> e, es, s, ss
      <- e, ee, se, psk
  Every cipher key of this pattern encrypts exactly one message, always with nonce 0, so a
  key is returned by each MixKey and used at once instead of being kept in a CipherState.
* `HandshakeCore` frames those messages as WireGuard's handshake initiation (148 bytes) and
  response (92 bytes), with prologue = IDENTIFIER, a TAI64N timestamp as the initiation payload,
  an empty response payload, an all-zero PSK when none is configured, and mac1/mac2 and cookie
  replies from `cookie.py`.  It keeps per-peer handshake state; the caller supplies indices,
  time and IO, and installs the resulting `Keypair`s in the data plane.

All crypto is PyNaCl (X25519, ChaCha20-Poly1305, XChaCha20-Poly1305) and hashlib.blake2s.
Python cannot wipe immutable bytes, so secret intermediate state is dropped (references
cleared) as soon as it is no longer needed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey

from unclaw_tui.engine.constants import (
    AEAD_TAG_SIZE,
    CONSTRUCTION,
    HANDSHAKE_INITIATION_RATE,
    HASH_SIZE,
    IDENTIFIER,
    KEY_SIZE,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_INITIATION_TYPE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_RESPONSE_TYPE,
    TAI64_BASE,
    TIMESTAMP_SIZE,
    TIMESTAMP_WHITENER_MASK,
)
from unclaw_tui.engine.cookie import CookieChecker, CookieGenerator

_ZERO_KEY = bytes(KEY_SIZE)


class HandshakeError(Exception):
    """A handshake message was refused; `reason` is a stable lowercase id for counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- Primitives -------------------------------------------------------------------------


def hash_(*parts: bytes) -> bytes:
    """HASH(a || b || ...): BLAKE2s-256."""
    state = hashlib.blake2s(digest_size=HASH_SIZE)
    for part in parts:
        state.update(part)
    return state.digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (BLOCKLEN 64), the HMAC of Noise's HKDF."""
    return hmac.new(key, data, hashlib.blake2s).digest()


def hkdf(chaining_key: bytes, input_key_material: bytes, outputs: int) -> tuple[bytes, ...]:
    """Noise HKDF (= WireGuard KDF1/KDF2/KDF3): `outputs` 32-byte keys."""
    prk = hmac_blake2s(chaining_key, input_key_material)
    out: list[bytes] = []
    previous = b""
    for counter in range(1, outputs + 1):
        previous = hmac_blake2s(prk, previous + bytes((counter,)))
        out.append(previous)
    return tuple(out)


def dh(private_key: bytes, public_key: bytes) -> bytes:
    """X25519; a low-order public key (all-zero result) is refused."""
    try:
        shared = crypto_scalarmult(private_key, public_key)
    except CryptoError:  # libsodium refuses an all-zero result itself
        raise HandshakeError("low_order") from None
    if hmac.compare_digest(shared, _ZERO_KEY):
        raise HandshakeError("low_order")
    return shared


def _nonce(counter: int) -> bytes:
    # Noise ChaChaPoly: 32 zero bits then the 64-bit little-endian counter (as WireGuard's data).
    return b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, associated_data: bytes) -> bytes:
    return crypto_aead_chacha20poly1305_ietf_encrypt(
        plaintext, associated_data, _nonce(counter), key
    )


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, associated_data: bytes) -> bytes:
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(
            ciphertext, associated_data, _nonce(counter), key
        )
    except CryptoError:
        raise HandshakeError("decrypt") from None


# --- Keys -------------------------------------------------------------------------------


def generate_private_key() -> bytes:
    return bytes(PrivateKey.generate())


def public_key_of(private_key: bytes) -> bytes:
    return bytes(PrivateKey(private_key).public_key)


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def unb64(text: str) -> bytes:
    """A 32-byte key from its base64 form (as in wg(8) configs); ValueError if it is not one.

    Surrounding whitespace is ignored; non-canonical base64 (other padding bits) is refused,
    so one key has one text form.
    """
    text = text.strip()
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a base64 key") from None
    if len(key) != KEY_SIZE or b64(key) != text:
        raise ValueError(f"a key is {KEY_SIZE} bytes in canonical base64")
    return key


def tai64n(wall_time: float) -> bytes:
    """TAI64N label of a Unix time, nanoseconds whitened (see TIMESTAMP_WHITENER_MASK)."""
    seconds = math.floor(wall_time)
    nanoseconds = min(int((wall_time - seconds) * 1e9), 999_999_999) & ~TIMESTAMP_WHITENER_MASK
    return struct.pack(">QI", TAI64_BASE + seconds, nanoseconds)


# --- Noise IKpsk2 -----------------------------------------------------------------------


class SymmetricState:
    """Noise's chaining key and handshake hash."""

    __slots__ = ("chaining_key", "hash")

    def __init__(self, chaining_key: bytes, handshake_hash: bytes) -> None:
        self.chaining_key = chaining_key
        self.hash = handshake_hash

    @classmethod
    def initialize(cls, protocol_name: bytes, prologue: bytes) -> SymmetricState:
        if len(protocol_name) <= HASH_SIZE:
            start = protocol_name.ljust(HASH_SIZE, b"\x00")
        else:
            start = hash_(protocol_name)
        state = cls(start, start)
        state.mix_hash(prologue)
        return state

    def copy(self) -> SymmetricState:
        return SymmetricState(self.chaining_key, self.hash)

    def mix_hash(self, data: bytes) -> None:
        self.hash = hash_(self.hash, data)

    def mix_key(self, input_key_material: bytes) -> bytes:
        """Mix into the chaining key; returns the new cipher key."""
        self.chaining_key, key = hkdf(self.chaining_key, input_key_material, 2)
        return key

    def mix_key_and_hash(self, input_key_material: bytes) -> bytes:
        self.chaining_key, hash_input, key = hkdf(self.chaining_key, input_key_material, 3)
        self.mix_hash(hash_input)
        return key

    def encrypt_and_hash(self, key: bytes, plaintext: bytes) -> bytes:
        ciphertext = aead_encrypt(key, 0, plaintext, self.hash)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, key: bytes, ciphertext: bytes) -> bytes:
        plaintext = aead_decrypt(key, 0, ciphertext, self.hash)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        """(initiator-to-responder key, responder-to-initiator key)."""
        first, second = hkdf(self.chaining_key, b"", 2)
        return first, second

    def clear(self) -> None:
        self.chaining_key = self.hash = b""


PskLookup = Callable[[bytes], bytes]
"""Responder: given the initiator's static public key, its PSK (or raise HandshakeError)."""

_MESSAGE1_MIN = KEY_SIZE + (KEY_SIZE + AEAD_TAG_SIZE) + AEAD_TAG_SIZE
_MESSAGE2_MIN = KEY_SIZE + AEAD_TAG_SIZE


class IKpsk2:
    """One side of one IKpsk2 handshake.

    Initiator: `write_message1`, `read_message2`, `split`.
    Responder: `read_message1`, `write_message2`, `split`.
    A read that fails leaves the state as it was, so a forged message cannot kill a handshake.
    """

    __slots__ = (
        "_ephemeral_private",
        "_psk",
        "_static_private",
        "_static_public",
        "_sym",
        "initiator",
        "remote_ephemeral",
        "remote_static",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        static_private: bytes,
        remote_static: bytes | None = None,
        psk: bytes = _ZERO_KEY,
        protocol_name: bytes = CONSTRUCTION,
        prologue: bytes = IDENTIFIER,
        ephemeral_private: bytes | None = None,
    ) -> None:
        self.initiator = initiator
        self._static_private = static_private
        self._static_public = crypto_scalarmult_base(static_private)
        responder_static = self._static_public
        if initiator:
            if remote_static is None:
                raise ValueError("the initiator of IK knows the responder's static key")
            responder_static = remote_static
        self._ephemeral_private = ephemeral_private or os.urandom(KEY_SIZE)
        self._psk = psk
        self.remote_static = remote_static
        self.remote_ephemeral: bytes | None = None
        self._sym = SymmetricState.initialize(protocol_name, prologue)
        self._sym.mix_hash(responder_static)  # pre-message "<- s"

    @property
    def handshake_hash(self) -> bytes:
        return self._sym.hash

    def _ephemeral(self, sym: SymmetricState) -> bytes:
        # "e" token of a PSK handshake: the public key is hashed and mixed into the key.
        public = crypto_scalarmult_base(self._ephemeral_private)
        sym.mix_hash(public)
        sym.mix_key(public)
        return public

    @staticmethod
    def _remote_ephemeral(sym: SymmetricState, public: bytes) -> None:
        sym.mix_hash(public)
        sym.mix_key(public)

    def write_message1(self, payload: bytes) -> bytes:
        """-> e, es, s, ss: ephemeral (32) || sealed static (48) || sealed payload (n + 16)."""
        assert self.initiator and self.remote_static is not None
        sym = self._sym
        ephemeral = self._ephemeral(sym)
        key = sym.mix_key(dh(self._ephemeral_private, self.remote_static))
        sealed_static = sym.encrypt_and_hash(key, self._static_public)
        key = sym.mix_key(dh(self._static_private, self.remote_static))
        sealed_payload = sym.encrypt_and_hash(key, payload)
        return ephemeral + sealed_static + sealed_payload

    def read_message1(self, message: bytes, psk_for: PskLookup) -> bytes:
        """Responder: the payload; `remote_static` is set.  `psk_for` may refuse the sender."""
        assert not self.initiator
        if len(message) < _MESSAGE1_MIN:
            raise HandshakeError("bad_size")
        sym = self._sym.copy()
        remote_ephemeral = message[:KEY_SIZE]
        self._remote_ephemeral(sym, remote_ephemeral)
        key = sym.mix_key(dh(self._static_private, remote_ephemeral))
        static_end = KEY_SIZE + KEY_SIZE + AEAD_TAG_SIZE
        remote_static = sym.decrypt_and_hash(key, message[KEY_SIZE:static_end])
        psk = psk_for(remote_static)
        key = sym.mix_key(dh(self._static_private, remote_static))
        payload = sym.decrypt_and_hash(key, message[static_end:])
        self._sym = sym
        self.remote_ephemeral = remote_ephemeral
        self.remote_static = remote_static
        self._psk = psk
        return payload

    def write_message2(self, payload: bytes) -> bytes:
        """<- e, ee, se, psk: ephemeral (32) || sealed payload (n + 16)."""
        assert not self.initiator and self.remote_ephemeral is not None
        assert self.remote_static is not None
        sym = self._sym
        ephemeral = self._ephemeral(sym)
        sym.mix_key(dh(self._ephemeral_private, self.remote_ephemeral))
        sym.mix_key(dh(self._ephemeral_private, self.remote_static))
        key = sym.mix_key_and_hash(self._psk)
        return ephemeral + sym.encrypt_and_hash(key, payload)

    def read_message2(self, message: bytes) -> bytes:
        """Initiator: the payload of the response."""
        assert self.initiator
        if len(message) < _MESSAGE2_MIN:
            raise HandshakeError("bad_size")
        sym = self._sym.copy()
        remote_ephemeral = message[:KEY_SIZE]
        self._remote_ephemeral(sym, remote_ephemeral)
        sym.mix_key(dh(self._ephemeral_private, remote_ephemeral))
        sym.mix_key(dh(self._static_private, remote_ephemeral))
        key = sym.mix_key_and_hash(self._psk)
        payload = sym.decrypt_and_hash(key, message[KEY_SIZE:])
        self._sym = sym
        self.remote_ephemeral = remote_ephemeral
        return payload

    def split(self) -> tuple[bytes, bytes]:
        """(initiator-to-responder, responder-to-initiator) keys.  Drops the secret state."""
        keys = self._sym.split()
        self.clear()
        return keys

    def clear(self) -> None:
        self._sym.clear()
        self._ephemeral_private = self._static_private = self._psk = b""


# --- WireGuard messages -----------------------------------------------------------------

_INITIATION_HEADER = struct.Struct("<II")  # type (3 reserved zero bytes above it), sender
_RESPONSE_HEADER = struct.Struct("<III")  # type, sender, receiver
_INDEX = struct.Struct("<I")
_TYPE_INITIATION = _INDEX.pack(MESSAGE_INITIATION_TYPE)
_TYPE_RESPONSE = _INDEX.pack(MESSAGE_RESPONSE_TYPE)
_TYPE_COOKIE_REPLY = _INDEX.pack(MESSAGE_COOKIE_REPLY_TYPE)
_MACS_SIZE = 2 * MAC_SIZE


def _is_handshake_message(msg: bytes) -> bool:
    head = msg[:4]
    return (head == _TYPE_INITIATION and len(msg) == MESSAGE_INITIATION_SIZE) or (
        head == _TYPE_RESPONSE and len(msg) == MESSAGE_RESPONSE_SIZE
    )


def _check_framing(msg: bytes, type_bytes: bytes, size: int) -> None:
    if len(msg) != size:
        raise HandshakeError("bad_size")
    if msg[:4] != type_bytes:
        raise HandshakeError("bad_type")


@dataclass(frozen=True, slots=True)
class Keypair:
    """Session keys of a completed handshake, to install in the data plane."""

    local_index: int
    remote_index: int
    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    is_initiator: bool


@dataclass(frozen=True, slots=True)
class ConsumedInitiation:
    peer_public_key: bytes
    sender_index: int  # the initiator's index: the receiver index of our response


class _Peer:
    """What we know of one peer: keys, cookie state, replay/flood marks, handshakes in flight."""

    __slots__ = (
        "cookies",
        "greatest_timestamp",
        "initiation",
        "initiation_index",
        "last_initiation_consumed",
        "last_mac1_index",
        "preshared_key",
        "public_key",
        "responder",
    )

    def __init__(self, public_key: bytes, preshared_key: bytes) -> None:
        self.public_key = public_key
        self.preshared_key = preshared_key
        self.cookies = CookieGenerator(public_key)
        self.greatest_timestamp = bytes(TIMESTAMP_SIZE)
        self.last_initiation_consumed = -math.inf
        self.initiation: IKpsk2 | None = None  # ours, waiting for a response
        self.initiation_index = 0
        self.responder: tuple[IKpsk2, int] | None = None  # theirs, consumed, not yet answered
        self.last_mac1_index: int | None = None  # sender index of our latest message to them

    def __repr__(self) -> str:
        return f"<peer {b64(self.public_key)}>"


class HandshakeCore:
    """Our WireGuard identity and the handshake state with each configured peer.

    The caller owns IO, time and indices: it passes each received handshake message to
    `check_mac1` / `check_mac2` / `consume_*`, sends what `create_*` returns, and installs the
    returned `Keypair`s.  `now` is monotonic seconds (cookie ages, initiation flood); the TAI64N
    timestamp comes from `wall_clock`.
    """

    def __init__(self, private_key: bytes, *, wall_clock: Callable[[], float] = time.time) -> None:
        if len(private_key) != KEY_SIZE:
            raise ValueError(f"a private key has {KEY_SIZE} bytes")
        self._private_key = private_key
        self.public_key: bytes = public_key_of(private_key)
        self._wall_clock = wall_clock
        self._checker = CookieChecker(self.public_key)
        self._peers: dict[bytes, _Peer] = {}
        self._pending: dict[int, _Peer] = {}  # our initiation sender index -> peer
        self._mac1_senders: dict[int, _Peer] = {}  # index a cookie reply may name -> peer

    def __repr__(self) -> str:
        return f"<HandshakeCore {b64(self.public_key)} peers={len(self._peers)}>"

    # --- peers ---

    def add_peer(self, public_key: bytes, preshared_key: bytes | None = None) -> None:
        """Add (or re-key the PSK of) a peer; ValueError for a malformed or low-order key."""
        if len(public_key) != KEY_SIZE:
            raise ValueError(f"a public key has {KEY_SIZE} bytes")
        if preshared_key is not None and len(preshared_key) != KEY_SIZE:
            raise ValueError(f"a preshared key has {KEY_SIZE} bytes")
        try:
            dh(self._private_key, public_key)
        except HandshakeError:
            raise ValueError("low-order public key") from None
        psk = preshared_key if preshared_key is not None else _ZERO_KEY
        peer = self._peers.get(public_key)
        if peer is None:
            self._peers[public_key] = _Peer(public_key, psk)
        else:
            peer.preshared_key = psk

    def remove_peer(self, public_key: bytes) -> None:
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        self._drop_initiation(peer)
        if peer.responder is not None:
            peer.responder[0].clear()
            peer.responder = None
        self._forget_mac1_index(peer)

    def has_peer(self, public_key: bytes) -> bool:
        return public_key in self._peers

    def pending_indices(self) -> set[int]:
        return set(self._pending)

    def _peer(self, public_key: bytes) -> _Peer:
        peer = self._peers.get(public_key)
        if peer is None:
            raise HandshakeError("unknown_peer")
        return peer

    def _drop_initiation(self, peer: _Peer) -> None:
        if peer.initiation is not None:
            peer.initiation.clear()
            peer.initiation = None
            self._pending.pop(peer.initiation_index, None)

    def _forget_mac1_index(self, peer: _Peer) -> None:
        index = peer.last_mac1_index
        if index is not None and self._mac1_senders.get(index) is peer:
            del self._mac1_senders[index]
        peer.last_mac1_index = None

    def _add_macs(self, peer: _Peer, body: bytes, sender_index: int, now: float) -> bytes:
        """body + mac1 + mac2; a cookie reply naming sender_index will be taken for peer."""
        self._forget_mac1_index(peer)
        peer.last_mac1_index = sender_index
        self._mac1_senders[sender_index] = peer
        return peer.cookies.add_macs(body, now)

    # --- MACs and cookies ---

    def check_mac1(self, msg: bytes) -> bool:
        return _is_handshake_message(msg) and self._checker.check_mac1(msg)

    def check_mac2(self, msg: bytes, src: bytes, now: float | None = None) -> bool:
        """`src`: source address bytes + port; with `now`, a secret past 120 s fails too."""
        return _is_handshake_message(msg) and self._checker.check_mac2(msg, src, now)

    def create_cookie_reply(self, msg: bytes, src: bytes, now: float) -> bytes:
        if not _is_handshake_message(msg):
            raise HandshakeError("bad_size")
        (sender_index,) = _INDEX.unpack_from(msg, 4)
        return self._checker.create_reply(msg, sender_index, src, now)

    def consume_cookie_reply(self, msg: bytes, now: float) -> bytes:
        _check_framing(msg, _TYPE_COOKIE_REPLY, MESSAGE_COOKIE_REPLY_SIZE)
        (receiver_index,) = _INDEX.unpack_from(msg, 4)
        peer = self._mac1_senders.get(receiver_index)
        if peer is None:
            raise HandshakeError("unknown_index")
        if not peer.cookies.consume_reply(msg, now):
            raise HandshakeError("bad_cookie")
        return peer.public_key

    # --- initiation ---

    def create_initiation(self, peer_public_key: bytes, sender_index: int, now: float) -> bytes:
        """A 148-byte initiation.  It replaces the peer's earlier one still in flight (as in
        wireguard-go), whose index leaves `pending_indices()`."""
        peer = self._peer(peer_public_key)
        owner = self._pending.get(sender_index)
        if owner is not None and owner is not peer:
            raise ValueError(f"index {sender_index} is pending for another peer")
        self._drop_initiation(peer)
        handshake = IKpsk2(
            initiator=True,
            static_private=self._private_key,
            remote_static=peer.public_key,
            psk=peer.preshared_key,
        )
        body = _INITIATION_HEADER.pack(MESSAGE_INITIATION_TYPE, sender_index)
        body += handshake.write_message1(tai64n(self._wall_clock()))
        msg = self._add_macs(peer, body, sender_index, now)
        assert len(msg) == MESSAGE_INITIATION_SIZE
        peer.initiation = handshake
        peer.initiation_index = sender_index
        self._pending[sender_index] = peer
        return msg

    def consume_initiation(self, msg: bytes, now: float) -> ConsumedInitiation:
        _check_framing(msg, _TYPE_INITIATION, MESSAGE_INITIATION_SIZE)
        if not self._checker.check_mac1(msg):
            raise HandshakeError("bad_mac1")
        (sender_index,) = _INDEX.unpack_from(msg, 4)
        handshake = IKpsk2(initiator=False, static_private=self._private_key)

        def psk_for(remote_static: bytes) -> bytes:
            return self._peer(remote_static).preshared_key

        timestamp = handshake.read_message1(msg[_INITIATION_HEADER.size : -_MACS_SIZE], psk_for)
        assert handshake.remote_static is not None
        peer = self._peers[handshake.remote_static]
        # Only now is the sender authenticated, so only now may it move the replay/flood marks.
        if len(timestamp) != TIMESTAMP_SIZE or timestamp <= peer.greatest_timestamp:
            handshake.clear()
            raise HandshakeError("replayed_timestamp")
        if now - peer.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE:
            handshake.clear()
            raise HandshakeError("flood")
        peer.greatest_timestamp = timestamp
        peer.last_initiation_consumed = now
        if peer.responder is not None:
            peer.responder[0].clear()
        peer.responder = (handshake, sender_index)
        return ConsumedInitiation(peer.public_key, sender_index)

    # --- response ---

    def create_response(
        self, peer_public_key: bytes, sender_index: int, now: float
    ) -> tuple[bytes, Keypair]:
        """The 92-byte response to the initiation last consumed from this peer, and the keys."""
        peer = self._peer(peer_public_key)
        if peer.responder is None:
            raise HandshakeError("no_initiation")
        handshake, receiver_index = peer.responder
        peer.responder = None
        body = _RESPONSE_HEADER.pack(MESSAGE_RESPONSE_TYPE, sender_index, receiver_index)
        body += handshake.write_message2(b"")
        msg = self._add_macs(peer, body, sender_index, now)
        assert len(msg) == MESSAGE_RESPONSE_SIZE
        initiator_to_responder, responder_to_initiator = handshake.split()
        keypair = Keypair(
            local_index=sender_index,
            remote_index=receiver_index,
            send_key=responder_to_initiator,
            recv_key=initiator_to_responder,
            is_initiator=False,
        )
        return msg, keypair

    def consume_response(self, msg: bytes, now: float) -> tuple[bytes, Keypair]:
        _check_framing(msg, _TYPE_RESPONSE, MESSAGE_RESPONSE_SIZE)
        if not self._checker.check_mac1(msg):
            raise HandshakeError("bad_mac1")
        sender_index, receiver_index = struct.unpack_from("<II", msg, 4)
        peer = self._pending.get(receiver_index)
        if peer is None or peer.initiation is None:
            raise HandshakeError("unknown_index")
        handshake = peer.initiation
        handshake.read_message2(msg[_RESPONSE_HEADER.size : -_MACS_SIZE])  # empty payload
        self._pending.pop(receiver_index)
        peer.initiation = None
        initiator_to_responder, responder_to_initiator = handshake.split()
        keypair = Keypair(
            local_index=receiver_index,
            remote_index=sender_index,
            send_key=initiator_to_responder,
            recv_key=responder_to_initiator,
            is_initiator=True,
        )
        return peer.public_key, keypair
