"""WireGuard constants in one table, named after wireguard-go's device/constants.go.

The first block is the protocol as the whitepaper fixes it (sections 5.4 and 6); a reviewer can
compare it line by line with the paper.  The second block holds numbers this implementation
chose: they shape behaviour under attack but are not part of the wire protocol.
"""

from __future__ import annotations

from typing import Final

# --- Protocol: Noise construction and identifiers (whitepaper 5.4) ---------------------------

CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

# --- Protocol: sizes ----------------------------------------------------------------------

KEY_SIZE: Final = 32  # X25519 keys, symmetric keys
HASH_SIZE: Final = 32  # BLAKE2s-256 (HASHLEN)
BLAKE2S_BLOCK_SIZE: Final = 64  # BLOCKLEN of HMAC-BLAKE2s
MAC_SIZE: Final = 16  # mac1, mac2 and the cookie: keyed BLAKE2s-128
AEAD_TAG_SIZE: Final = 16  # Poly1305
TIMESTAMP_SIZE: Final = 12  # TAI64N
COOKIE_NONCE_SIZE: Final = 24  # XChaCha20-Poly1305

# --- Protocol: message types and sizes (whitepaper 5.4.2 - 5.4.7) ------------------------

MESSAGE_INITIATION_TYPE: Final = 1
MESSAGE_RESPONSE_TYPE: Final = 2
MESSAGE_COOKIE_REPLY_TYPE: Final = 3
MESSAGE_TRANSPORT_TYPE: Final = 4

MESSAGE_INITIATION_SIZE: Final = 148
MESSAGE_RESPONSE_SIZE: Final = 92
MESSAGE_COOKIE_REPLY_SIZE: Final = 64
MESSAGE_TRANSPORT_HEADER_SIZE: Final = 16
MESSAGE_TRANSPORT_SIZE_MIN: Final = MESSAGE_TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE  # keepalive: 32
MESSAGE_KEEPALIVE_SIZE: Final = MESSAGE_TRANSPORT_SIZE_MIN

# --- Protocol: limits and timers (whitepaper 6.1 - 6.5) ----------------------------------

REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0  # seconds
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
REKEY_TIMEOUT_JITTER_MAX: Final = 0.333  # up to this much added to each retransmission timeout
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME: Final = 120.0  # cookie secret lifetime
HANDSHAKE_INITIATION_RATE: Final = 1 / 50  # at most 50 initiations per second per peer
# All keys are zeroed once no new handshake happened for three times REJECT_AFTER_TIME.
KEYS_ZEROED_AFTER_TIME: Final = 3 * REJECT_AFTER_TIME

# --- Implementation choices (not part of the wire protocol) ------------------------------

# A received cookie is used for mac2 a little less than the responder keeps its secret, so a
# cookie in flight does not expire on the way (the Linux implementation subtracts 5 s too).
COOKIE_SECRET_LATENCY: Final = 5.0
COOKIE_VALID_TIME: Final = COOKIE_REFRESH_TIME - COOKIE_SECRET_LATENCY

# TAI64N timestamps only carry the nanoseconds above these low bits (about 16.8 ms steps), as
# wireguard-go does, so an initiation does not reveal the sender's precise clock.
TIMESTAMP_WHITENER_MASK: Final = (1 << 24) - 1
TAI64_BASE: Final = (1 << 62) + 10

# "Under load": wireguard-go switches to cookie replies when its handshake queue holds more
# than 1/8 of its 1024 slots.  We count handshake messages per second instead of queue depth:
# more than this many in the last second means under load ...
UNDER_LOAD_THRESHOLD: Final = 128
# ... and the state lasts this long after the threshold was last crossed.
UNDER_LOAD_AFTER_TIME: Final = 1.0

# Per-source token bucket for handshake messages under load (wireguard-go ratelimiter).
RATELIMIT_PACKETS_PER_SECOND: Final = 20
RATELIMIT_PACKETS_BURSTABLE: Final = 5
RATELIMIT_GC_TIME: Final = 1.0  # an idle source is forgotten after this long
# At most this many sources are tracked; a new source beyond it is refused (as the Linux
# implementation does), so a flood from many addresses cannot grow memory without bound.
RATELIMIT_MAX_ENTRIES: Final = 65536
