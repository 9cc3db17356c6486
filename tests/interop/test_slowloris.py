"""Slow-loris against the real gateway process: TLS on port 443 and DNS over TCP on port 53,
each bounded in time and bytes before a ClientHello or a query is in.

client ns (wireguard-go; the slow clients run in a thread of this process moved into that
namespace) -> gateway ns (`unclaw-tui --no-ui --json`) -> internet ns (an HTTPS test host and an
authoritative DNS server at 198.18.0.2).

TLS and DNS over TCP answer port 443 / 53 at any address, so each kind of slow client talks to
its own destination address on the (routed) test net: its `tcp_closed` event is told apart by
`dst_ip`. The bounds come from the services' own constants, so the tests check what is shipped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from dnslib import DNSRecord

from tests.helpers import HOSTNAME, make_pki
from tests.interop.harness import (
    HOST_ADDR,
    FlowsSetup,
    GatewayProcess,
    Namespace,
    rss_kib,
    thread_in_namespace,
)
from tests.interop.test_floods import second_client
from tests.interop.test_tls import (
    TRUSTED_PORT,
    bring_up_tls,
    curl_https,
    https_args,
    start_tls_host,
)
from tests.interop.tls_host import _client_hello
from unclaw_tui.services.dns import TCP_QUERY_TIMEOUT
from unclaw_tui.services.tls import MAX_HELLO

# The time bounds, set through their flags (shorter than the 10 s defaults, so the flags are
# seen to work and the tests run faster).
HELLO_TIMEOUT = 6.0
TCP_IDLE_TIMEOUT = 7.0
HELLO_FLAGS = ("--hello-timeout", f"{HELLO_TIMEOUT:g}")
DNS_FLAGS = ("--dns-tcp-idle-timeout", f"{TCP_IDLE_TIMEOUT:g}")

pytestmark = pytest.mark.interop

T = TypeVar("T")
MiB_KIB = 1024
LATE = 5.0  # how much later than its bound a close may come (a loaded CI runner)
EARLY = 0.5  # the gateway's clock starts a little after the client's connect returns
RSS_BOUND_KIB = 64 * MiB_KIB  # as in test_floods: generous, but far below unbounded growth
IDLE_CROWD = 80


def addr(n: int) -> str:
    """A destination on the test net that no host answers: only the services see it."""
    return f"198.18.0.{n}"


# --- slow clients, run in the client namespace --------------------------------------------------


@dataclass(frozen=True)
class Ending:
    how: str  # "eof" or "reset" (the gateway ended it), "open" (still open when we gave up)
    seconds: float  # from the connect to the end
    sent: int  # bytes the gateway's stack accepted before the end


async def slow_client(
    host: str,
    port: int,
    chunks: Sequence[bytes],
    interval: float,
    give_up: float,
    connected: Callable[[], None] = lambda: None,
) -> Ending:
    """Connect, send `chunks` one every `interval` seconds (then nothing), and time how long
    the gateway lets the connection live."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    started = time.monotonic()
    connected()
    sent = 0

    async def send() -> None:
        nonlocal sent
        with contextlib.suppress(OSError):
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                if interval:
                    await asyncio.sleep(interval)  # the behaviour: a slow client's pace

    sender = asyncio.ensure_future(send())
    how = "open"
    try:
        while True:
            left = give_up - (time.monotonic() - started)
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            except OSError:
                how = "reset"
                break
            if not data:
                how = "eof"
                break
    finally:
        seconds = time.monotonic() - started
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.transport.abort()
    return Ending(how, round(seconds, 2), sent)


def in_namespace(
    ns: Namespace, make: Callable[[], Coroutine[Any, Any, T]]
) -> concurrent.futures.Future[T]:
    """Run a coroutine on its own event loop in a thread moved into `ns` (its sockets live
    there); the future holds its result."""

    def run() -> T:
        with thread_in_namespace(ns.name):
            return asyncio.run(make())

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


async def gather_dict(jobs: dict[str, Coroutine[Any, Any, T]]) -> dict[str, T]:
    results = await asyncio.gather(*jobs.values())
    return dict(zip(jobs, results, strict=True))


def closed_events(gw: GatewayProcess, route: str, dst_ip: str) -> list[dict[str, Any]]:
    return [
        e
        for e in gw.drain()
        if e["type"] == "tcp_closed" and e["route"] == route and e["dst_ip"] == dst_ip
    ]


def wait_closed_events(
    gw: GatewayProcess, route: str, dst_ip: str, count: int, timeout: float = 10
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while len(found := closed_events(gw, route, dst_ip)) < count:
        assert time.monotonic() < deadline, f"{len(found)}/{count} closes to {dst_ip}: {found}"
        time.sleep(0.1)
    return found


def wait_for_opened(
    gw: GatewayProcess, route: str, dst_ip: str, count: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        opened = [
            e
            for e in gw.drain()
            if e["type"] == "tcp_opened" and e["route"] == route and e["dst_ip"] == dst_ip
        ]
        if len(opened) >= count:
            return
        assert time.monotonic() < deadline, f"{len(opened)}/{count} opened to {dst_ip}"
        time.sleep(0.1)


def assert_cut_at(ending: Ending, bound: float, what: str) -> None:
    """Ended by the gateway, not before its bound and not much after it."""
    assert ending.how in ("eof", "reset"), (what, ending)
    assert bound - EARLY <= ending.seconds <= bound + LATE, (what, bound, ending)


def assert_open_flows_balanced(gw: GatewayProcess, route: str) -> None:
    events = gw.drain()
    opened = {e["conn_id"] for e in events if e["type"] == "tcp_opened" and e["route"] == route}
    closed = {e["conn_id"] for e in events if e["type"] == "tcp_closed" and e["route"] == route}
    assert opened and opened == closed, (len(opened), len(closed), opened ^ closed)


# --- TLS ----------------------------------------------------------------------------------------


def tiny_records(total: int) -> bytes:
    """A ClientHello handshake header announcing a hello within the byte bound, carried one
    byte per TLS record (legal, RFC 8446 5.1): six bytes on the wire per byte of hello, so the
    records pass the bound long before the hello completes."""
    body = bytes([1]) + (MAX_HELLO // 2).to_bytes(3, "big") + bytes(MAX_HELLO)
    stream = b"".join(bytes([22, 3, 1, 0, 1, b]) for b in body)
    assert len(stream) >= total
    return stream[:total]


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def tls_bring_up(s: FlowsSetup) -> tuple[GatewayProcess, Path]:
    pki = make_pki(s.topo.tmp / "pki")
    return bring_up_tls(s, pki, *HELLO_FLAGS)


def test_tls_hello_time_and_byte_bounds(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    gw, our_ca = tls_bring_up(s)
    hello = _client_hello()
    under_bound = tiny_records(MAX_HELLO - 600)  # most of the bound, then silence
    over_bound = tiny_records(4 * MAX_HELLO)
    give_up = HELLO_TIMEOUT + LATE + 5

    def clients() -> Coroutine[Any, Any, dict[str, Ending]]:
        return gather_dict(
            {
                # (a) connects and sends nothing
                "idle": slow_client(addr(10), 443, [], 0, give_up),
                # (b) a real ClientHello, one byte every 100 ms: would take a minute or more
                "trickle": slow_client(addr(11), 443, chunked(hello, 1), 0.1, give_up),
                # (c) past the byte bound, at full speed, without ever completing a hello
                "over": slow_client(addr(12), 443, chunked(over_bound, 1024), 0, give_up),
                # control for (c): just under the byte bound is held until the time bound
                "under": slow_client(addr(13), 443, chunked(under_bound, 1024), 0, give_up),
            }
        )

    endings = in_namespace(s.client_ns, clients).result(timeout=give_up + 20)
    print(f"\nTLS slow clients: {endings}")

    assert_cut_at(endings["idle"], HELLO_TIMEOUT, "idle")
    assert endings["idle"].sent == 0
    assert_cut_at(endings["trickle"], HELLO_TIMEOUT, "trickle")
    assert 0 < endings["trickle"].sent < len(hello)
    assert_cut_at(endings["under"], HELLO_TIMEOUT, "under the byte bound")
    assert endings["under"].sent == len(under_bound)
    over = endings["over"]
    assert over.how in ("eof", "reset") and over.seconds < HELLO_TIMEOUT / 2, over

    for dst, reason in (
        (addr(10), f"none within {HELLO_TIMEOUT:g} s"),
        (addr(11), f"incomplete within {HELLO_TIMEOUT:g} s"),
        (addr(12), f"ClientHello larger than {MAX_HELLO} bytes"),
        (addr(13), f"incomplete within {HELLO_TIMEOUT:g} s"),
    ):
        (closed,) = wait_closed_events(gw, "tls", dst, 1)
        assert closed["error"] == f"not a TLS ClientHello: {reason}", closed
        assert closed["peer"] == "phone" and closed["bytes_up"] == 0, closed
    rejected = [e for e in gw.drain() if e["type"] == "tls_host" and e["mode"] == "rejected"]
    assert len(rejected) == 4 and all(not e["ok"] for e in rejected), rejected
    assert_open_flows_balanced(gw, "tls")

    # The gateway still intercepts as usual.
    res = curl_https(s, our_ca, "/after")
    assert res.returncode == 0 and res.stdout == "hello from /after\n\n200", res.stderr


def test_tls_idle_crowd_is_closed_and_others_are_served(flows_setup: FlowsSetup) -> None:
    """(d) Many idle connections at once from one peer: another peer's HTTPS request still
    completes meanwhile, memory stays bounded, and every idle one is closed at the bound."""
    s = flows_setup
    pki = make_pki(s.topo.tmp / "pki")
    start_tls_host(s, TRUSTED_PORT, pki.trusted)
    phone_config = s.add_peer("phone")
    laptop_config = s.add_peer("laptop")
    our_ca = Path(s.cli("ca", "--path").stdout.strip())
    gw = s.start_gateway(*HELLO_FLAGS, env={"SSL_CERT_FILE": str(pki.ca_file)})
    phone = s.client(phone_config)
    laptop_ns, laptop = second_client(s, laptop_config)
    for client in (phone, laptop):
        assert client.ping("10.77.0.1", count=3, interval=0.2).returncode == 0
    rss_before = rss_kib(gw.proc.pid)
    give_up = HELLO_TIMEOUT + LATE + 5

    # The TLS service publishes tcp_opened only once the hello is in (or failed), so the
    # clients say when they are all connected.
    count = [0]
    lock = threading.Lock()
    all_connected = threading.Event()

    def connected() -> None:
        with lock:
            count[0] += 1
            if count[0] == IDLE_CROWD:
                all_connected.set()

    def crowd() -> Coroutine[Any, Any, dict[str, Ending]]:
        return gather_dict(
            {
                str(i): slow_client(addr(20), 443, [], 0, give_up, connected)
                for i in range(IDLE_CROWD)
            }
        )

    held = in_namespace(s.client_ns, crowd)
    assert all_connected.wait(10), count
    peak_rss = rss_kib(gw.proc.pid)

    # The other peer, while all of the phone's idle connections are held.
    t0 = time.monotonic()
    res = laptop_ns.run(
        "curl", "--silent", "--show-error", "--noproxy", "*", *https_args(our_ca, "/meanwhile"),
        check=False, timeout=30,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert res.returncode == 0 and res.stdout == "hello from /meanwhile\n\n200", res.stderr
    assert took < HELLO_TIMEOUT / 2, took  # served at once, not after the crowd is gone
    early = closed_events(gw, "tls", addr(20))
    assert early == [], early  # the crowd was still there
    # ... and the same peer too.
    res = curl_https(s, our_ca, "/same-peer")
    assert res.returncode == 0 and res.stdout.endswith("200"), res.stderr
    peak_rss = max(peak_rss, rss_kib(gw.proc.pid))

    endings = held.result(timeout=give_up + 20)
    spans = sorted(e.seconds for e in endings.values())
    print(f"\nidle crowd closed after {spans[0]}..{spans[-1]} s; RSS {rss_before}->{peak_rss} KiB")
    for key, ending in endings.items():
        assert_cut_at(ending, HELLO_TIMEOUT, f"idle #{key}")
    closes = wait_closed_events(gw, "tls", addr(20), IDLE_CROWD)
    assert {e["error"] for e in closes} == {
        f"not a TLS ClientHello: none within {HELLO_TIMEOUT:g} s"
    }
    assert peak_rss - rss_before < RSS_BOUND_KIB, (rss_before, peak_rss)
    assert_open_flows_balanced(gw, "tls")
    assert gw.proc.poll() is None


# --- DNS over TCP -------------------------------------------------------------------------------


def dns_query(name: str) -> bytes:
    return DNSRecord.question(name, "A").pack()


def test_dns_over_tcp_time_and_byte_bounds(flows_setup: FlowsSetup) -> None:
    s = flows_setup
    s.start_dns_host()
    config = s.add_peer("phone")
    gw = s.start_gateway("--upstream-dns", HOST_ADDR, *DNS_FLAGS)
    client = s.client(config)
    assert client.ping("10.77.0.1", count=2).returncode == 0
    rss_before = rss_kib(gw.proc.pid)
    query = dns_query(HOSTNAME)
    framed = struct.pack("!H", len(query)) + query
    give_up = TCP_IDLE_TIMEOUT + LATE + 5

    def clients() -> Coroutine[Any, Any, dict[str, Ending]]:
        jobs = {
            # connects and sends nothing
            "idle": slow_client(addr(30), 53, [], 0, give_up),
            # one byte of the length prefix, then nothing
            "half prefix": slow_client(addr(31), 53, [framed[:1]], 0, give_up),
            # a real query, one byte every 300 ms: the prefix is in at once, the rest too slow
            "trickle": slow_client(addr(32), 53, chunked(framed, 1), 0.3, give_up),
            # a prefix announcing the largest message there is, and only a little of it: refused
            # at once, unread (a query is at most 512 bytes)
            "huge": slow_client(addr(33), 53, [b"\xff\xff" + bytes(1000)], 0, give_up),
            # the largest message delivered whole (garbage), and twice as much behind it: refused
            # at its prefix too
            "overlong": slow_client(
                addr(34), 53, chunked(b"\xff" * (2 + 3 * 65535), 4096), 0, give_up
            ),
        }
        for i in range(IDLE_CROWD // 2):
            jobs[f"crowd {i}"] = slow_client(addr(35), 53, [], 0, give_up)
        return gather_dict(jobs)

    held = in_namespace(s.client_ns, clients)
    wait_for_opened(gw, "dns", addr(35), IDLE_CROWD // 2, timeout=10)
    # A normal query over TCP answers meanwhile, at once.
    t0 = time.monotonic()
    res = s.client_ns.run(
        "dig", "@10.77.0.1", "+tcp", "+time=3", "+tries=1", "+short", HOSTNAME, "A",
        check=False, timeout=20,
    )  # fmt: skip
    took = time.monotonic() - t0
    answer = res.stdout.strip()
    assert res.returncode == 0 and answer.startswith("10.78."), (res.stdout, res.stderr)
    assert took < TCP_QUERY_TIMEOUT, took
    peak_rss = rss_kib(gw.proc.pid)

    endings = held.result(timeout=give_up + 20)
    print(f"\nDNS slow clients: { {k: v for k, v in endings.items() if 'crowd' not in k} }")
    assert_cut_at(endings["idle"], TCP_IDLE_TIMEOUT, "idle")
    assert_cut_at(endings["half prefix"], TCP_IDLE_TIMEOUT, "half prefix")
    assert_cut_at(endings["trickle"], TCP_QUERY_TIMEOUT, "trickle")
    assert endings["trickle"].sent < len(framed)
    for key in ("huge", "overlong"):
        ending = endings[key]
        assert ending.how in ("eof", "reset") and ending.seconds < TCP_QUERY_TIMEOUT, (key, ending)
    for key in (k for k in endings if k.startswith("crowd")):
        assert_cut_at(endings[key], TCP_IDLE_TIMEOUT, key)

    for dst, error in (
        (addr(30), f"idle for {TCP_IDLE_TIMEOUT:g} s"),
        (addr(31), f"idle for {TCP_IDLE_TIMEOUT:g} s"),
        (addr(32), "query cut short"),
        (addr(33), "query of 65535 bytes (at most 512)"),
        (addr(34), "query of 65535 bytes (at most 512)"),
    ):
        (closed,) = wait_closed_events(gw, "dns", dst, 1)
        assert closed["error"] == error and closed["bytes_down"] == 0, closed
    crowd = wait_closed_events(gw, "dns", addr(35), IDLE_CROWD // 2)
    assert {e["error"] for e in crowd} == {f"idle for {TCP_IDLE_TIMEOUT:g} s"}
    peak_rss = max(peak_rss, rss_kib(gw.proc.pid))
    print(f"RSS {rss_before} -> {peak_rss} KiB")
    assert peak_rss - rss_before < RSS_BOUND_KIB, (rss_before, peak_rss)
    assert_open_flows_balanced(gw, "dns")
    # Still answering afterwards.
    res = s.client_ns.run(
        "dig", "@10.77.0.1", "+tcp", "+time=3", "+tries=1", "+short", HOSTNAME, "A",
        check=False, timeout=20,
    )  # fmt: skip
    assert res.stdout.strip() == answer, (res.stdout, res.stderr)
