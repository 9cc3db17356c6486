"""WireGuard keys as base64 strings (the format `wg genkey` / `wg pubkey` use).

X25519 comes from PyNaCl; nothing here does crypto by hand.
"""

from __future__ import annotations

import base64
import binascii

import nacl.public
import nacl.utils

KEY_LEN = 32


def _b64(raw: bytes) -> str:
    return base64.standard_b64encode(raw).decode("ascii")


def validate_key(key_b64: str) -> bytes:
    """Decode a base64 WireGuard key; ValueError unless it is 32 bytes in canonical base64."""
    if not isinstance(key_b64, str) or len(key_b64) != 44:
        raise ValueError("a key must be 44 characters of base64")
    try:
        raw = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a key must be 44 characters of base64") from None
    # Non-canonical padding bits would decode to the same key but compare unequal as text.
    if len(raw) != KEY_LEN or _b64(raw) != key_b64:
        raise ValueError("a key must encode exactly 32 bytes")
    return raw


def generate_keypair() -> tuple[str, str]:
    """A fresh X25519 key pair as (private_b64, public_b64)."""
    private = nacl.public.PrivateKey.generate()
    return _b64(bytes(private)), _b64(bytes(private.public_key))


def public_from_private(private_b64: str) -> str:
    """The X25519 public key for a base64 private key (like `wg pubkey`)."""
    private = nacl.public.PrivateKey(validate_key(private_b64))
    return _b64(bytes(private.public_key))


def generate_preshared_key() -> str:
    """32 random bytes, base64 (like `wg genpsk`)."""
    return _b64(nacl.utils.random(KEY_LEN))
