"""Handshake load detection and per-source rate limiting, sans-IO (time is a parameter).

The receive path for handshake messages, as in wireguard-go's receive.go:
  every handshake message -> `LoadMonitor.note(now)`;
  if `under_load(now)`: a message without a valid mac2 gets a cookie reply instead of an
  answer, and a message with one is answered only if `SourceRateLimiter.allow(src_ip, now)`.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from unclaw_tui.engine.constants import (
    RATELIMIT_GC_TIME,
    RATELIMIT_MAX_ENTRIES,
    RATELIMIT_PACKETS_BURSTABLE,
    RATELIMIT_PACKETS_PER_SECOND,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_THRESHOLD,
)


class LoadMonitor:
    """Under load while more than `threshold` handshake messages arrived within one second,
    and for `hold` seconds after that was last seen (see UNDER_LOAD_THRESHOLD: the arrival rate
    stands in for wireguard-go's queue depth).  Memory: `threshold + 1` timestamps.
    """

    __slots__ = ("_arrivals", "_hold", "_threshold", "_under_load_until")

    def __init__(
        self, threshold: int = UNDER_LOAD_THRESHOLD, hold: float = UNDER_LOAD_AFTER_TIME
    ) -> None:
        self._threshold = threshold
        self._hold = hold
        # The latest threshold+1 arrivals: if the oldest is within a second, the rate is over.
        self._arrivals: deque[float] = deque(maxlen=threshold + 1)
        self._under_load_until = -1.0

    def note(self, now: float) -> None:
        """One handshake message arrived."""
        self._arrivals.append(now)
        if len(self._arrivals) > self._threshold and now - self._arrivals[0] < 1.0:
            self._under_load_until = now + self._hold

    def under_load(self, now: float) -> bool:
        return now < self._under_load_until


class SourceRateLimiter:
    """A token bucket per source address: `rate` packets per second, bursts of `burst`.

    IPv6 sources are grouped by /64, since one host usually holds a whole /64 (the Linux
    implementation does the same).  Sources idle for RATELIMIT_GC_TIME are forgotten, and at
    most `max_entries` are tracked (see RATELIMIT_MAX_ENTRIES).
    """

    __slots__ = ("_burst_tokens", "_cost", "_entries", "_max_entries")

    def __init__(
        self,
        rate: int = RATELIMIT_PACKETS_PER_SECOND,
        burst: int = RATELIMIT_PACKETS_BURSTABLE,
        max_entries: int = RATELIMIT_MAX_ENTRIES,
    ) -> None:
        self._cost = 1.0 / rate  # tokens are seconds of credit, as in wireguard-go (ns there)
        self._burst_tokens = self._cost * burst
        self._max_entries = max_entries
        # key -> [last time, tokens]; least recently used first, so expiry pops from the front.
        self._entries: OrderedDict[bytes, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def allow(self, src_ip: bytes, now: float) -> bool:
        key = src_ip[:8] if len(src_ip) == 16 else src_ip
        self._expire(now)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._max_entries:
                return False
            self._entries[key] = [now, self._burst_tokens - self._cost]
            return True
        self._entries.move_to_end(key)
        last, tokens = entry
        tokens = min(self._burst_tokens, tokens + max(0.0, now - last))
        entry[0] = max(last, now)
        # A tiny epsilon keeps float rounding from refusing a packet that is exactly on time.
        if tokens >= self._cost - 1e-9:
            entry[1] = tokens - self._cost
            return True
        entry[1] = tokens
        return False

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, (last, _tokens) = next(iter(entries.items()))
            if now - last <= RATELIMIT_GC_TIME:
                break
            del entries[key]
