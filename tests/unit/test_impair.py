"""The UDP impairment relay of the lossy interop tests: its core, and its sockets on loopback."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.interop.impair import Impairment, ImpairParams, ImpairRelay

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(imp: Impairment[int], items: int, step: float = 0.001) -> list[int]:
    """Offer items 0..n-1 one `step` apart, then drain; returns the delivery order."""
    out: list[int] = []
    now = 100.0
    for i in range(items):
        imp.offer(now, i)
        out.extend(imp.due(now))
        now += step
    out.extend(imp.due(now + 10))
    return out


def test_no_impairment_delivers_everything_in_order_at_once() -> None:
    imp: Impairment[int] = Impairment(ImpairParams(), random.Random(1))
    imp.offer(5.0, 1)
    imp.offer(5.0, 2)
    assert imp.due(5.0) == [1, 2]
    assert imp.stats.delivered == 2 and len(imp) == 0


def test_loss_rate_follows_the_parameter() -> None:
    imp: Impairment[int] = Impairment(ImpairParams(loss=0.1), random.Random(7))
    out = _run(imp, 20_000)
    assert 1700 < imp.stats.dropped < 2300
    assert len(out) == 20_000 - imp.stats.dropped
    assert out == sorted(out), "loss alone must not reorder"


def test_duplicates_follow_their_original() -> None:
    imp: Impairment[int] = Impairment(ImpairParams(duplicate=0.05), random.Random(3))
    out = _run(imp, 10_000)
    assert 350 < imp.stats.duplicated < 650
    assert len(out) == 10_000 + imp.stats.duplicated
    assert out == sorted(out)
    assert len(set(out)) == 10_000


def test_reordered_items_are_overtaken() -> None:
    params = ImpairParams(reorder=0.05, reorder_ms=10)
    imp: Impairment[int] = Impairment(params, random.Random(11))
    out = _run(imp, 5_000, step=0.001)
    assert sorted(out) == list(range(5_000)), "reordering loses or duplicates nothing"
    assert 150 < imp.stats.reordered < 350
    overtaken = sum(1 for a, b in itertools.pairwise(out) if a > b)
    assert overtaken >= imp.stats.reordered * 0.9


def test_jitter_delays_but_keeps_order() -> None:
    params = ImpairParams(delay_ms=2, jitter_ms=5)
    imp: Impairment[int] = Impairment(params, random.Random(5))
    imp.offer(0.0, 0)
    assert imp.due(0.0019) == [], "held at least delay_ms"
    assert imp.due(0.0071) == [0], "released within delay_ms + jitter_ms"
    out = _run(imp, 3_000, step=0.0005)
    assert out == list(range(3_000))


def test_queue_is_bounded() -> None:
    imp: Impairment[int] = Impairment(ImpairParams(delay_ms=1000, max_queue=100), random.Random(1))
    for i in range(1_000):
        imp.offer(0.0, i)
    assert len(imp) == 100
    assert imp.stats.overflow == 900
    assert imp.due(1.0) == list(range(100))


def test_same_seed_same_decisions() -> None:
    params = ImpairParams(loss=0.05, reorder=0.05, duplicate=0.05, jitter_ms=3)
    runs = [_run(Impairment(params, random.Random(42)), 2_000) for _ in range(2)]
    assert runs[0] == runs[1]
    other = _run(Impairment(params, random.Random(43)), 2_000)
    assert other != runs[0]


@pytest.mark.parametrize(
    "kwargs", [{"loss": 1.5}, {"reorder": -0.1}, {"jitter_ms": -1}, {"max_queue": 0}]
)
def test_invalid_parameters_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ImpairParams(**kwargs)  # type: ignore[arg-type]


# --- the relay's sockets, over loopback --------------------------------------------------------


class _EchoServer:
    """A UDP echo server on loopback in a thread, bounded by a stop flag."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.seen_from: set[tuple[str, int]] = set()
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.received += 1
            self.seen_from.add(addr)
            self.sock.sendto(data, addr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[_EchoServer]:
    server = _EchoServer()
    yield server
    server.close()


def _exchange(target: tuple[str, int], count: int, size: int = 200) -> list[int]:
    """Send `count` numbered datagrams in small batches, reading the echoes as they come (a
    socket buffer holds only a few hundred); return the numbers echoed back, in order."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got: list[int] = []

    def read_for(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data, _ = sock.recvfrom(65535)
            except TimeoutError:
                return
            got.append(int.from_bytes(data[:4], "big"))

    try:
        for i in range(count):
            sock.sendto(i.to_bytes(4, "big") + bytes(size - 4), target)
            if i % 20 == 19:
                read_for(0.003)
        read_for(1.0)
    finally:
        sock.close()
    return got


def test_relay_passes_both_directions_untouched(echo: _EchoServer) -> None:
    relay = ImpairRelay(("127.0.0.1", 0), echo.address, ImpairParams()).start()
    try:
        got = _exchange(relay.address, 500)
    finally:
        relay.stop()
    assert got == list(range(500))
    stats = relay.stats()
    assert stats["up"]["delivered"] == 500 and stats["down"]["delivered"] == 500  # type: ignore[index]


def test_relay_impairs_both_directions(echo: _EchoServer) -> None:
    params = ImpairParams(loss=0.1, duplicate=0.05, reorder=0.05, jitter_ms=2)
    relay = ImpairRelay(("127.0.0.1", 0), echo.address, params, seed=9).start()
    try:
        got = _exchange(relay.address, 2_000)
    finally:
        relay.stop()
    stats = relay.stats()
    up, down = stats["up"], stats["down"]  # type: ignore[index]
    assert up["dropped"] > 100 and down["dropped"] > 100, stats
    assert up["duplicated"] > 30 and down["duplicated"] > 30, stats
    # Roughly 0.9 * 0.9 of the numbers come back, some twice, some out of order.
    assert 0.7 * 2_000 < len(set(got)) < 0.9 * 2_000
    assert len(got) > len(set(got)), "duplicates reach the client"
    assert any(a > b for a, b in itertools.pairwise(got)), "reordering reaches the client"
    assert echo.received == up["delivered"]


def test_each_client_gets_its_own_upstream_socket_and_answers(echo: _EchoServer) -> None:
    relay = ImpairRelay(("127.0.0.1", 0), echo.address, ImpairParams()).start()
    try:
        results = [_exchange(relay.address, 50) for _ in range(3)]
    finally:
        relay.stop()
    assert all(r == list(range(50)) for r in results)
    assert len(echo.seen_from) == 3
    assert relay.stats()["clients"] == 3


def test_relay_command_line_runs_and_reports_on_sigterm(echo: _EchoServer) -> None:
    host, port = echo.address
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.interop.impair",
            "--listen",
            "127.0.0.1:0",
            "--to",
            f"{host}:{port}",
            "--loss",
            "0.5",
            "--seed",
            "3",
            "--max-seconds",
            "60",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready"
        got = _exchange(("127.0.0.1", int(ready[1])), 400)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    stats = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == 0
    assert stats["up"]["received"] == 400
    assert 120 < stats["up"]["dropped"] < 280
    # About a quarter make it there and back.
    assert 50 < len(got) < 160
    assert len(got) == stats["down"]["delivered"]


def test_relay_command_line_rejects_bad_arguments() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tests.interop.impair", "--listen", "x", "--to", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert res.returncode == 2
    assert "HOST:PORT" in res.stderr
