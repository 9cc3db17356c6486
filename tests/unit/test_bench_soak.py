"""The soak's verdict: RSS and descriptor flatness after the warm-up, and error classification."""

from __future__ import annotations

import subprocess

import pytest

from bench.soak import (
    FD_TOLERANCE,
    RSS_DRIFT_BOUND_KIB,
    Sample,
    classify_errors,
    error_key,
    flatness,
    linear_slope,
    names_state_kib,
    tcp_counters,
)


def curve(rss: list[int], fds: list[int] | None = None, step: float = 5.0) -> list[Sample]:
    """Load samples every `step` seconds from t=0, with the given RSS (KiB) and descriptors."""
    fds = fds or [20] * len(rss)
    return [
        Sample(i * step, "load", r, f, 6, 0.0, 0, 0, 0, 0.0)
        for i, (r, f) in enumerate(zip(rss, fds, strict=True))
    ]


def test_slope_of_a_line_and_of_too_few_points() -> None:
    assert linear_slope([0, 1, 2, 3], [5, 7, 9, 11]) == pytest.approx(2.0)
    assert linear_slope([1], [3]) == 0.0
    assert linear_slope([2, 2], [1, 9]) == 0.0


def test_a_big_warm_up_then_a_plateau_is_flat() -> None:
    # +40 MiB in the first 20 % (ignored), then noise of ±512 KiB around a plateau.
    rss = [50_000 + 40_000 * min(i, 4) // 4 for i in range(21)]
    rss = [r + (512 if i % 2 else -512) * (i > 4) for i, r in enumerate(rss)]
    f = flatness(curve(rss), 100.0, fd_baseline=14, fd_final=15)
    assert f.flat, f.reasons
    assert f.rss_start_kib == rss[4]
    assert abs(f.rss_drift_kib) < 1024


def test_a_steady_climb_past_the_bound_is_not_flat() -> None:
    # 100 KiB/s over the 80 s after the warm-up: 8,000 KiB (> 5 MiB).
    rss = [60_000 + 500 * i for i in range(21)]  # 500 KiB per 5 s sample = 100 KiB/s
    f = flatness(curve(rss), 100.0, fd_baseline=14, fd_final=14)
    assert not f.rss_flat
    assert f.fds_flat
    assert f.rss_slope_kib_s == pytest.approx(100.0)
    assert f.rss_drift_kib == pytest.approx(8000.0)
    assert any("RSS drifts" in reason for reason in f.reasons)


def test_a_climb_just_under_the_bound_passes() -> None:
    per_sample = (RSS_DRIFT_BOUND_KIB - 100) / 16  # 16 sample steps after the warm-up
    rss = [60_000 + int(per_sample * i) for i in range(21)]
    assert flatness(curve(rss), 100.0, fd_baseline=14, fd_final=14).rss_flat


def test_descriptors_not_back_after_the_load_or_climbing_under_it_fail() -> None:
    rss = [50_000] * 21
    leaked = flatness(curve(rss), 100.0, fd_baseline=14, fd_final=14 + FD_TOLERANCE + 1)
    assert leaked.rss_flat and not leaked.fds_flat
    assert flatness(curve(rss), 100.0, 14, 14 + FD_TOLERANCE).fds_flat
    climbing = flatness(curve(rss, fds=[20 + 2 * i for i in range(21)]), 100.0, 14, 14)
    assert not climbing.fds_flat  # +2 per sample: +32 over the steady part
    assert any("drift" in reason for reason in climbing.reasons)


def test_samples_outside_the_load_and_too_few_samples() -> None:
    rss = [50_000, 50_000, 50_000, 200_000]
    samples = curve(rss)
    samples[-1].phase = "settle"  # a settle sample is not part of the steady load
    f = flatness(samples, 15.0, 14, 14)
    assert not f.flat
    assert "cannot tell" in f.reasons[0]


def test_error_keys() -> None:
    assert error_key({"type": "tcp_closed", "route": "relay", "dst_port": 80}) is None
    closed = {"type": "tcp_closed", "route": "tls", "dst_port": 443, "error": "upstream: reset"}
    assert error_key(closed) == "tcp_closed [tls:443]: upstream: reset"
    assert error_key({"type": "tls_host", "mode": "intercepted", "ok": False}) == (
        "tls_host [intercepted]: not ok"
    )
    assert error_key({"type": "http_request", "status": 200}) is None
    assert error_key({"type": "http_request", "status": None}) == "http_request: status None"
    assert error_key({"type": "dns_query", "rcode": "SERVFAIL"}) == "dns_query: SERVFAIL"
    assert error_key({"type": "limit_hit", "limit": "tcp_conns_per_peer"}) == (
        "limit_hit tcp_conns_per_peer"
    )
    assert error_key({"type": "under_load", "active": False}) is None
    assert error_key({"type": "peer_handshake", "name": "a"}) is None
    assert error_key({"type": "events_dropped", "count": 3}) == "events_dropped (output too slow)"


def test_classification_by_pattern_most_frequent_first() -> None:
    rows = classify_errors(
        {"tcp_closed [relay:5201]: peer: connection reset": 2, "dns_query: SERVFAIL": 5},
        expected=((r"relay:5201\]: peer: connection reset", "iperf3 resets at its end"),),
    )
    assert [(r.key, r.count, r.expected) for r in rows] == [
        ("dns_query: SERVFAIL", 5, False),
        ("tcp_closed [relay:5201]: peer: connection reset", 2, True),
    ]
    assert rows[1].why == "iperf3 resets at its end"
    assert rows[0].why == "not expected in a clean run"


class FakeNamespace:
    """Stands in for a namespace: `cat /proc/net/snmp /proc/net/netstat` gives this text."""

    TEXT = (
        "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
        "Tcp: RtoAlgorithm ActiveOpens EstabResets OutRsts\nTcp: 1 10 3 7\n"
        "TcpExt: SyncookiesSent TCPAbortOnData TCPAbortOnClose\nTcpExt: 0 4 2\n"
    )

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert args == ("cat", "/proc/net/snmp", "/proc/net/netstat")
        return subprocess.CompletedProcess(args, 0, self.TEXT, "")


def test_tcp_counters_pick_the_named_counters() -> None:
    assert tcp_counters(FakeNamespace()) == {  # type: ignore[arg-type]
        "Tcp:EstabResets": 3,
        "Tcp:OutRsts": 7,
        "TcpExt:TCPAbortOnData": 4,
        "TcpExt:TCPAbortOnClose": 2,
    }


def test_names_state_grows_with_the_names() -> None:
    small = names_state_kib([f"a{i}.soak.test" for i in range(100)])
    large = names_state_kib([f"a{i}.soak.test" for i in range(1000)])
    assert 0 < small < large
    assert 5 < large / small < 15  # about linear
