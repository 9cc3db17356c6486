"""Load detection and the per-source token bucket, with a fake clock."""

from __future__ import annotations

from unclaw_tui.engine.constants import (
    RATELIMIT_MAX_ENTRIES,
    RATELIMIT_PACKETS_BURSTABLE,
    UNDER_LOAD_THRESHOLD,
)
from unclaw_tui.engine.ratelimit import LoadMonitor, SourceRateLimiter

IP = bytes([198, 51, 100, 1])


def test_not_under_load_at_or_below_the_threshold() -> None:
    monitor = LoadMonitor()
    for i in range(UNDER_LOAD_THRESHOLD):
        monitor.note(10.0 + i / UNDER_LOAD_THRESHOLD)
    assert not monitor.under_load(10.99)
    # The same number spread over more than a second never trips it either.
    for i in range(10 * UNDER_LOAD_THRESHOLD):
        monitor.note(20.0 + i * 1.01 / UNDER_LOAD_THRESHOLD)
        assert not monitor.under_load(20.0 + i * 1.01 / UNDER_LOAD_THRESHOLD)


def test_under_load_above_the_threshold_and_for_one_second_after() -> None:
    monitor = LoadMonitor()
    for i in range(UNDER_LOAD_THRESHOLD + 1):
        monitor.note(5.0 + i * 0.001)
    last = 5.0 + UNDER_LOAD_THRESHOLD * 0.001
    assert monitor.under_load(last)
    assert monitor.under_load(last + 0.99)
    assert not monitor.under_load(last + 1.01)
    # Each new crossing extends it.
    monitor.note(last + 0.5)
    assert monitor.under_load(last + 1.4)


def test_token_bucket_burst_then_twenty_per_second() -> None:
    limiter = SourceRateLimiter()
    allowed = [limiter.allow(IP, 0.0) for _ in range(10)]
    assert allowed == [True] * RATELIMIT_PACKETS_BURSTABLE + [False] * 5
    assert not limiter.allow(IP, 0.049)
    assert limiter.allow(IP, 0.05)  # one packet's worth of time later
    assert not limiter.allow(IP, 0.05)
    # Over ten seconds of steady offering, about 20 per second get through.
    passed = sum(limiter.allow(IP, 1.0 + i * 0.001) for i in range(10_000))
    assert 200 <= passed <= 200 + RATELIMIT_PACKETS_BURSTABLE


def test_sources_are_independent_and_ipv6_is_grouped_by_64() -> None:
    limiter = SourceRateLimiter()
    for _ in range(RATELIMIT_PACKETS_BURSTABLE):
        assert limiter.allow(IP, 0.0)
    assert not limiter.allow(IP, 0.0)
    assert limiter.allow(bytes([198, 51, 100, 2]), 0.0)
    prefix = bytes.fromhex("20010db8000000ab")
    for host in range(RATELIMIT_PACKETS_BURSTABLE):
        assert limiter.allow(prefix + host.to_bytes(8, "big"), 0.0)
    assert not limiter.allow(prefix + (999).to_bytes(8, "big"), 0.0)
    assert limiter.allow(bytes.fromhex("20010db8000000ac") + bytes(8), 0.0)


def test_idle_sources_are_forgotten_and_the_table_is_capped() -> None:
    limiter = SourceRateLimiter(max_entries=1000)
    for n in range(1000):
        assert limiter.allow(n.to_bytes(4, "big"), 0.0)
    assert len(limiter) == 1000
    assert not limiter.allow(b"\x0a\x00\x00\x01", 0.5)  # full: a new source is refused
    assert len(limiter) == 1000
    # A second later every idle entry is gone and new sources are welcome again.
    assert limiter.allow(b"\x0a\x00\x00\x01", 1.5)
    assert len(limiter) == 1


def test_a_flood_from_many_addresses_stays_bounded() -> None:
    limiter = SourceRateLimiter()
    for n in range(RATELIMIT_MAX_ENTRIES + 5000):
        limiter.allow(n.to_bytes(4, "big"), n * 1e-6)
    assert len(limiter) == RATELIMIT_MAX_ENTRIES
