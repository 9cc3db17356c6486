"""MAC1/MAC2 and cookie replies (whitepaper 5.4.4 and 5.4.7), sans-IO.

Every handshake message ends in mac1 || mac2, each a keyed BLAKE2s-128:
  mac1 = MAC(HASH("mac1----" || Spub_receiver), msg[:-32])  -- proves the sender knows our key
  mac2 = MAC(cookie, msg[:-16])                              -- proves it can receive at its address
  cookie = MAC(secret, src)   with a random secret the responder rotates every 120 s.
A responder under load answers a message without a valid mac2 with a cookie reply: the cookie,
encrypted with XChaCha20-Poly1305 under HASH("cookie--" || Spub_responder), with the message's
mac1 as associated data so only the real sender can use it.

`CookieChecker` is the receiving side (keyed by our own public key); `CookieGenerator` is the
sending side, one per peer (keyed by that peer's public key).  Time is always a parameter.
Errors are reported as booleans; the handshake layer turns them into `HandshakeError`s.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from unclaw_tui.engine.constants import (
    COOKIE_NONCE_SIZE,
    COOKIE_REFRESH_TIME,
    COOKIE_VALID_TIME,
    HASH_SIZE,
    LABEL_COOKIE,
    LABEL_MAC1,
    MAC_SIZE,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY_TYPE,
)

_COOKIE_REPLY_HEADER = struct.Struct("<II")  # type (with 3 reserved zero bytes), receiver index


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s-128, the MAC of the whitepaper."""
    return hashlib.blake2s(data, digest_size=MAC_SIZE, key=key).digest()


def labelled_key(label: bytes, public_key: bytes) -> bytes:
    """HASH(label || public key): the mac1 key or the cookie encryption key of that key's owner."""
    return hashlib.blake2s(label + public_key, digest_size=HASH_SIZE).digest()


class CookieChecker:
    """Checks the MACs of handshake messages sent to us and makes cookie replies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_secret", "_secret_birth")

    def __init__(self, our_public_key: bytes) -> None:
        self._mac1_key = labelled_key(LABEL_MAC1, our_public_key)
        self._cookie_key = labelled_key(LABEL_COOKIE, our_public_key)
        self._secret = b""
        self._secret_birth: float | None = None  # no secret until the first cookie reply

    def check_mac1(self, msg: bytes) -> bool:
        end = len(msg) - 2 * MAC_SIZE
        if end < 0:
            return False
        return hmac.compare_digest(mac(self._mac1_key, msg[:end]), msg[end : end + MAC_SIZE])

    def check_mac2(self, msg: bytes, src: bytes, now: float | None = None) -> bool:
        """True if msg carries the mac2 of a cookie we gave to src with the current secret.

        With `now`, a secret older than COOKIE_REFRESH_TIME no longer counts (it is only
        replaced when the next cookie reply is made).
        """
        if self._secret_birth is None or len(msg) < 2 * MAC_SIZE:
            return False
        if now is not None and now - self._secret_birth > COOKIE_REFRESH_TIME:
            return False
        cookie = mac(self._secret, src)
        end = len(msg) - MAC_SIZE
        return hmac.compare_digest(mac(cookie, msg[:end]), msg[end:])

    def create_reply(self, msg: bytes, receiver_index: int, src: bytes, now: float) -> bytes:
        """The 64-byte cookie reply to msg (a handshake message with its MACs) from src."""
        if self._secret_birth is None or now - self._secret_birth > COOKIE_REFRESH_TIME:
            self._secret = os.urandom(HASH_SIZE)
            self._secret_birth = now
        cookie = mac(self._secret, src)
        mac1_start = len(msg) - 2 * MAC_SIZE
        mac1 = msg[mac1_start : mac1_start + MAC_SIZE]
        nonce = os.urandom(COOKIE_NONCE_SIZE)
        sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(cookie, mac1, nonce, self._cookie_key)
        reply = (
            _COOKIE_REPLY_HEADER.pack(MESSAGE_COOKIE_REPLY_TYPE, receiver_index) + nonce + sealed
        )
        assert len(reply) == MESSAGE_COOKIE_REPLY_SIZE
        return reply


class CookieGenerator:
    """Writes mac1/mac2 on the handshake messages we send to one peer; takes its cookies."""

    __slots__ = ("_cookie", "_cookie_birth", "_cookie_key", "_last_mac1", "_mac1_key")

    def __init__(self, peer_public_key: bytes) -> None:
        self._mac1_key = labelled_key(LABEL_MAC1, peer_public_key)
        self._cookie_key = labelled_key(LABEL_COOKIE, peer_public_key)
        self._cookie = b""
        self._cookie_birth: float | None = None
        self._last_mac1: bytes | None = None  # mac1 of our latest message: the reply's AD

    def add_macs(self, body: bytes, now: float) -> bytes:
        """body + mac1 + mac2, mac2 zero unless we hold a cookie younger than COOKIE_VALID_TIME."""
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        with_mac1 = body + mac1
        if self._cookie_birth is not None and now - self._cookie_birth < COOKIE_VALID_TIME:
            return with_mac1 + mac(self._cookie, with_mac1)
        return with_mac1 + bytes(MAC_SIZE)

    def consume_reply(self, reply: bytes, now: float) -> bool:
        """Take the cookie of a 64-byte cookie reply; False if it does not decrypt.

        Each message we sent is answered by at most one cookie reply: a second one (a replay)
        finds no mac1 to check against.
        """
        if self._last_mac1 is None or len(reply) != MESSAGE_COOKIE_REPLY_SIZE:
            return False
        nonce_start = _COOKIE_REPLY_HEADER.size
        nonce = reply[nonce_start : nonce_start + COOKIE_NONCE_SIZE]
        sealed = reply[nonce_start + COOKIE_NONCE_SIZE :]
        try:
            cookie = crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed, self._last_mac1, nonce, self._cookie_key
            )
        except CryptoError:
            return False
        self._cookie = cookie
        self._cookie_birth = now
        self._last_mac1 = None
        return True
