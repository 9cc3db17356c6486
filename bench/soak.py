"""Soak: ten minutes of mixed load from 3 peers; the gateway's RSS and open descriptors must stay
flat after a warm-up, and no error event may appear that should not.

    python -m bench.soak                    # 600 s of load (~11 min with setup and settle)
    python -m bench.soak --seconds 60       # a quick look
    python -m bench --only soak             # the same, through the suite (not in its default run)

Topology: the bench's usual one (bench.common): our gateway (`--no-ui --json`, a separate
process) plus three wireguard-go peers, all in the one client namespace and chosen by source
address (the first is the bench's own client, the other two are added live with the CLI and
reached through policy rules).  The idle reference gateway of bench.common is up but unused.

Load, four threads, each a loop of bounded runs (count and time) that rotates over the peers:

- bulk: iperf3, one stream capped at `--bulk-mbit`, runs of 30 s alternating upload and
  download, a one-off server per run;
- conns: `bench.clients rr-client` runs of 10 s, 4 at a time, at most 1,500 connections a run
  (1 KiB request, 1 KiB response, close);
- dns: `bench.clients dns-client` 200 queries of one name (the cache) then 5 new names (the
  upstream, a new VIP each), to our DNS service;
- tls: `bench.clients tls-client` runs of 10 s, 2 at a time, intercepted HTTPS (the client
  trusts our CA) to one of four hostnames, so the minted leaves stay cached.

Every `--interval` seconds the gateway's VmRSS, open descriptors (/proc/PID/fd), threads and
CPU time are read and its JSON events counted by type, error events by their error string.
After the load, the gateway is watched for up to 30 s until its descriptors are back where they
were before the load.  Flat: the least-squares slope of RSS over the samples after the warm-up
(the first `--warmup` of the run) times the time they span stays under 5 MiB, and the
descriptors end within 4 of their count before the load.  Writes bench/results/soak.md (the
verdict and a table of the curve), soak.json (the figures, for the summary), soak.samples.json
(every sample) and soak.png (RSS, descriptors and CPU over time).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import (
    RESULTS_DIR,
    BenchEnv,
    Figure,
    add_our_client,
    bench_env,
    bench_env_vars,
    figures_table,
    machine_description,
    peak_rss_kib,
    save_figures,
    start_tool,
)
from tests.interop.harness import HOST_ADDR, REPO_ROOT, Namespace, cpu_seconds, module_cmd, rss_kib

PART = "soak"
RR_PORT = 7000
IPERF_PORT = 5201
TLS_PORT = 443
DNS_PORT = 53
TLS_HOSTS = tuple(f"s{i}.soak.test" for i in range(1, 5))
WARMUP_FRACTION = 0.2
RSS_DRIFT_BOUND_KIB = 5 * 1024
FD_TOLERANCE = 4
FD_DRIFT_BOUND = 16.0  # in-flight connections move the count by a dozen or so under load
SETTLE_SECONDS = 30.0

# Error events a clean run may show, each with the reason it is not a fault.  Keys are matched
# against error_key()'s output with re.search.
EXPECTED_ERRORS: tuple[tuple[str, str], ...] = (
    (
        r"^tcp_closed \[relay:5201\]: destination: connection reset$",
        "iperf3's server ends an upload test by closing its data connection without reading "
        "what is still in flight; our relay had already acknowledged those bytes to the client "
        "and was still delivering them, so the test host's kernel resets the connection "
        "(counted there as TCPAbortOnClose, see the test host's counters below).  A "
        "terminating relay holds more in flight than kernel forwarding, so the window is wider.",
    ),
    (
        r"^tcp_closed \[relay:5201\]: peer: connection reset$",
        "The mirror case: iperf3's client ends a download test by closing its data connection "
        "with bytes still unread, so the client's kernel resets it (counted in the client "
        "namespace as TCPAbortOnClose, see the clients' counters below) and the relay passes "
        "the reset on to the test host.",
    ),
)
# The test host's TCP counters read before and after the load (/proc/net/snmp and netstat in its
# namespace): they show which side of a reset event sent the reset, and why.
TCP_COUNTERS = ("Tcp:OutRsts", "Tcp:EstabResets", "TcpExt:TCPAbortOnClose", "TcpExt:TCPAbortOnData")


# --- the verdict (pure, unit-tested) --------------------------------------------------------------


@dataclass
class Sample:
    """One reading of the gateway.  `t` is seconds since the load started (negative before)."""

    t: float
    phase: str  # "before" (idle, before the load), "load", "settle" (after the load)
    rss_kib: int
    fds: int
    threads: int
    cpu_s: float
    events: int  # events printed so far
    error_events: int  # error events so far
    open_tcp: int  # tcp_opened minus tcp_closed so far
    load1: float
    hostnames: int = 0  # distinct DNS names asked so far


def linear_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 for fewer than two distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


@dataclass
class Flatness:
    steady_samples: int
    rss_start_kib: int  # first sample after the warm-up
    rss_end_kib: int  # last sample under load
    rss_slope_kib_s: float
    rss_drift_kib: float  # slope x the time the steady samples span
    rss_flat: bool
    fd_baseline: int  # before the load
    fd_final: int  # after the load and the settle
    fd_min: int  # under load, after the warm-up
    fd_max: int
    fd_drift: float
    fds_flat: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def flat(self) -> bool:
        return self.rss_flat and self.fds_flat


def flatness(
    samples: list[Sample],
    duration: float,
    fd_baseline: int,
    fd_final: int,
    *,
    warmup_fraction: float = WARMUP_FRACTION,
    rss_bound_kib: float = RSS_DRIFT_BOUND_KIB,
    fd_tolerance: int = FD_TOLERANCE,
    fd_drift_bound: float = FD_DRIFT_BOUND,
) -> Flatness:
    """Whether RSS and descriptors stayed flat over the load samples after the warm-up.

    RSS: |slope x span| < rss_bound_kib (a one-off step inside the bound passes; a steady
    climb that would exceed it over the run fails).  Descriptors: back within fd_tolerance of
    the count before the load once it is over, and no drift beyond fd_drift_bound under load.
    Fewer than 3 steady samples decide nothing: not flat."""
    steady = [s for s in samples if s.phase == "load" and s.t >= warmup_fraction * duration]
    reasons: list[str] = []
    if len(steady) < 3:
        return Flatness(
            len(steady), 0, 0, 0.0, 0.0, False, fd_baseline, fd_final, 0, 0, 0.0, False,
            [f"only {len(steady)} samples after the warm-up: cannot tell"],
        )  # fmt: skip
    ts = [s.t for s in steady]
    span = ts[-1] - ts[0]
    rss_slope = linear_slope(ts, [float(s.rss_kib) for s in steady])
    fd_slope = linear_slope(ts, [float(s.fds) for s in steady])
    rss_drift, fd_drift = rss_slope * span, fd_slope * span
    rss_flat = abs(rss_drift) < rss_bound_kib
    if not rss_flat:
        reasons.append(
            f"RSS drifts {rss_drift / 1024:+.1f} MiB over {span:.0f} s after the warm-up "
            f"(bound {rss_bound_kib / 1024:g} MiB)"
        )
    fds_back = abs(fd_final - fd_baseline) <= fd_tolerance
    if not fds_back:
        reasons.append(
            f"{fd_final} descriptors open after the load against {fd_baseline} before it "
            f"(tolerance {fd_tolerance})"
        )
    fd_steady = abs(fd_drift) <= fd_drift_bound
    if not fd_steady:
        reasons.append(f"descriptors drift {fd_drift:+.1f} under load (bound {fd_drift_bound:g})")
    return Flatness(
        steady_samples=len(steady),
        rss_start_kib=steady[0].rss_kib,
        rss_end_kib=steady[-1].rss_kib,
        rss_slope_kib_s=rss_slope,
        rss_drift_kib=rss_drift,
        rss_flat=rss_flat,
        fd_baseline=fd_baseline,
        fd_final=fd_final,
        fd_min=min(s.fds for s in steady),
        fd_max=max(s.fds for s in steady),
        fd_drift=fd_drift,
        fds_flat=fds_back and fd_steady,
        reasons=reasons,
    )


def first_steady(samples: list[Sample], duration: float) -> Sample | None:
    """The first load sample after the warm-up."""
    return next(
        (s for s in samples if s.phase == "load" and s.t >= WARMUP_FRACTION * duration), None
    )


def error_key(event: dict[str, Any]) -> str | None:
    """A short description of what went wrong if the event reports an error, else None."""
    kind = event.get("type", "?")
    if kind in ("tcp_closed", "udp_flow_closed") and event.get("error"):
        return f"{kind} [{event.get('route', '?')}:{event.get('dst_port', '?')}]: {event['error']}"
    if kind == "tls_host" and (event.get("error") or not event.get("ok", True)):
        return f"tls_host [{event.get('mode', '?')}]: {event.get('error') or 'not ok'}"
    if kind == "http_request" and (event.get("status") is None or event["status"] >= 500):
        return f"http_request: status {event.get('status')}"
    if kind == "dns_query" and event.get("rcode", "NOERROR") != "NOERROR":
        return f"dns_query: {event['rcode']}"
    if kind in ("peer_handshake_failed", "limit_hit", "gateway_stopped"):
        return kind + (f" {event['limit']}" if kind == "limit_hit" else "")
    if kind == "under_load" and event.get("active"):
        return "under_load"
    if kind == "events_dropped":  # our reader fell behind: the counts above are short
        return "events_dropped (output too slow)"
    return None


@dataclass
class ErrorRow:
    key: str
    count: int
    expected: bool
    why: str


def classify_errors(
    counts: dict[str, int], expected: tuple[tuple[str, str], ...] = EXPECTED_ERRORS
) -> list[ErrorRow]:
    """Each distinct error with its count, expected or not (the first matching pattern's reason),
    most frequent first."""
    rows = []
    for key, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        why = next((reason for pattern, reason in expected if re.search(pattern, key)), None)
        rows.append(ErrorRow(key, count, why is not None, why or "not expected in a clean run"))
    return rows


# --- reading the gateway ------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tcp_counters(ns: Namespace) -> dict[str, int]:
    """The TCP_COUNTERS of a namespace's kernel (pairs of header and value lines)."""
    text = ns.run("cat", "/proc/net/snmp", "/proc/net/netstat").stdout.splitlines()
    values: dict[str, int] = {}
    for header, row in itertools.pairwise(text):
        names, numbers = header.split(), row.split()
        if names[0] != numbers[0] or not names[0].endswith(":") or names[1:2] == numbers[1:2]:
            continue
        for name, number in zip(names[1:], numbers[1:], strict=False):
            key = f"{names[0]}{name}"
            if key in TCP_COUNTERS:
                values[key] = int(number)
    return values


def names_state_kib(hostnames: list[str]) -> float:
    """What the gateway holds for these DNS names once asked: a VIP map entry each, and an
    upstream cache entry each (expired entries stay until the cache's entry cap, they are only
    dropped when asked again).  Built in this process with the gateway's own classes and
    measured with tracemalloc: an estimate of the RSS the cold names legitimately add."""
    import tracemalloc

    from dnslib import QTYPE, RR, A, DNSRecord

    from unclaw_tui.services.upstream import DnsCache
    from unclaw_tui.services.vips import VipAllocator

    now = time.time()
    replies = []
    for name in hostnames:
        reply = DNSRecord.question(name, "A").reply()
        reply.add_answer(RR(name, QTYPE.A, ttl=300, rdata=A(HOST_ADDR)))
        replies.append(reply)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        vips, cache = VipAllocator(), DnsCache()
        for name, reply in zip(hostnames, replies, strict=True):
            vips.allocate(name, now, lambda _ip: False)
            cache.put((name, QTYPE.A, 1, False), reply, now)
        return (tracemalloc.get_traced_memory()[0] - before) / 1024
    finally:
        tracemalloc.stop()


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


class EventTally:
    """Counts the gateway's events as they are printed (the events themselves are not kept:
    ten minutes of short connections print hundreds of thousands)."""

    def __init__(self) -> None:
        self.by_type: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        # DNS names asked, in order: each holds a VIP (by design) and a cache entry.
        self.hostnames: dict[str, None] = {}
        self.examples: dict[str, list[dict[str, Any]]] = {}  # the first few of each error
        self.total = 0

    def consume(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self.total += 1
            self.by_type[event.get("type", "?")] += 1
            key = error_key(event)
            if key is not None:
                self.errors[key[:200]] += 1
                examples = self.examples.setdefault(key[:200], [])
                if len(examples) < 3:
                    examples.append(event)
            if event.get("type") == "dns_query":
                self.hostnames.setdefault(str(event.get("qname", "")))

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def open_tcp(self) -> int:
        return self.by_type["tcp_opened"] - self.by_type["tcp_closed"]


# --- the load ---------------------------------------------------------------------------------


@dataclass
class LoadStats:
    """What one load thread did: runs, units moved (bytes, connections, queries, requests),
    and the errors its clients reported."""

    kind: str
    unit: str
    runs: int = 0
    units: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class Load:
    """The four load threads.  Every client process is spawned through the topology (so it is
    killed by PID on the way out) and refused once `close()` was called."""

    def __init__(
        self, env: BenchEnv, peers: list[str], our_ca: Path, deadline: float, bulk_mbit: int
    ) -> None:
        self.env = env
        self.peers = peers
        self.our_ca = our_ca
        self.deadline = deadline
        self.bulk_mbit = bulk_mbit
        self.stop = threading.Event()
        self.runs: list[tuple[str, str, float, float]] = []  # kind, peer, wall start, wall end
        self._lock = threading.Lock()
        self._closed = False
        self.stats = {
            "bulk": LoadStats("bulk", "bytes"),
            "conns": LoadStats("conns", "connections"),
            "dns": LoadStats("dns", "queries"),
            "tls": LoadStats("tls", "requests"),
        }
        self.threads = [
            threading.Thread(target=self._loop, args=(kind, run, pause), daemon=True)
            for kind, run, pause in (
                ("bulk", self._bulk, 2.0),
                ("conns", self._conns, 1.0),
                ("dns", self._dns, 1.0),
                ("tls", self._tls, 2.0),
            )
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def close(self, join_timeout: float) -> None:
        """Stop starting runs; wait for the current ones (each bounded) to end."""
        self.stop.set()
        end = time.monotonic() + join_timeout
        for thread in self.threads:
            thread.join(max(0.1, end - time.monotonic()))
        with self._lock:
            self._closed = True

    def _spawn(self, ns: Namespace, argv: list[str], **kw: Any) -> subprocess.Popen[str] | None:
        with self._lock:
            if self._closed or self.stop.is_set():
                return None
            return self.env.setup.topo.spawn(
                ns, *argv, text=True, env=bench_env_vars(), cwd=str(REPO_ROOT), **kw
            )

    def _run(self, ns: Namespace, argv: list[str], timeout: float) -> tuple[int, str, str] | None:
        proc = self._spawn(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc is None:
            return None
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return -9, out, f"still running after {timeout:.0f} s"
        return proc.returncode, out, err

    def _tool(self, stats: LoadStats, kind: str, *args: str, timeout: float) -> dict[str, Any]:
        res = self._run(self.env.setup.client_ns, module_cmd("bench.clients", kind, *args), timeout)
        if res is None:
            return {}
        code, out, err = res
        lines = out.strip().splitlines()
        if code != 0 or not lines:
            stats.errors[f"{kind} exited {code}: {err.strip()[-160:]}"] += 1
            return {}
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def _loop(self, kind: str, run: Callable[[str, float], None], pause: float) -> None:
        stats = self.stats[kind]
        i = 0
        while not self.stop.is_set():
            left = self.deadline - time.monotonic()
            if left < 1.0:
                return
            peer = self.peers[i % len(self.peers)]
            started = time.time()
            try:
                run(peer, left)
            except Exception as exc:  # a broken run is a finding, not the end of the soak
                stats.errors[f"{kind} run raised {type(exc).__name__}: {exc}"[:200]] += 1
            label = kind + (" download" if kind == "bulk" and stats.runs % 2 else "")
            self.runs.append((label, peer, started, time.time()))
            stats.runs += 1
            i += 1
            self.stop.wait(pause)

    def _bulk(self, peer: str, left: float) -> None:
        stats = self.stats["bulk"]
        seconds = max(1, int(min(30.0, left)))
        reverse = stats.runs % 2 == 1
        server = self._spawn(
            self.env.setup.internet,
            ["iperf3", "--server", "--one-off", "--port", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if server is None:
            return
        try:
            time.sleep(0.3)
            res = self._run(
                self.env.setup.client_ns,
                [
                    "iperf3", "--client", HOST_ADDR, "--port", str(IPERF_PORT), "--bind", peer,
                    "--time", str(seconds), "--bitrate", f"{self.bulk_mbit}M", "--json",
                    "--connect-timeout", "5000", *(["--reverse"] if reverse else []),
                ],
                seconds + 30,
            )  # fmt: skip
        finally:
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=5)
        if res is None:
            return
        try:
            report = json.loads(res[1])
        except json.JSONDecodeError:
            stats.errors[f"iperf3 exited {res[0]}: {res[2].strip()[-160:]}"] += 1
            return
        if "error" in report:
            stats.errors[f"iperf3: {str(report['error'])[:160]}"] += 1
            return
        stats.units += int(report["end"]["sum_received"]["bytes"])

    def _conns(self, peer: str, left: float) -> None:
        stats = self.stats["conns"]
        seconds = min(10.0, left)
        out = self._tool(
            stats, "rr-client", HOST_ADDR, str(RR_PORT), "--bind", peer,
            "--seconds", f"{seconds:.1f}", "--concurrency", "4", "--max-conns", "1500",
            timeout=seconds + 60,
        )  # fmt: skip
        stats.units += int(out.get("conns", 0))
        for name, n in out.get("errors", {}).items():
            stats.errors[f"rr-client {name}"] += int(n)

    def _dns(self, peer: str, left: float) -> None:
        stats = self.stats["dns"]
        for mode, count in (("cached", 200), ("cold", 5)):
            out = self._tool(
                stats, "dns-client", HOST_ADDR, "--port", str(DNS_PORT), "--bind", peer,
                "--count", str(count), "--mode", mode, timeout=min(left, 60) + 30,
            )  # fmt: skip
            if not out:
                continue
            stats.units += int(out["queries"])
            if out["queries"] < count:
                stats.errors[f"dns-client {mode}: unanswered after 3 tries"] += (
                    count - out["queries"]
                )
            if out["lost"]:
                # A lost datagram that a retry recovered: counted, but UDP may lose.
                stats.errors[f"dns-client {mode}: a try lost (retried)"] += int(out["lost"])

    def _tls(self, peer: str, left: float) -> None:
        stats = self.stats["tls"]
        seconds = min(10.0, left)
        sni = TLS_HOSTS[stats.runs % len(TLS_HOSTS)]
        out = self._tool(
            stats, "tls-client", HOST_ADDR, str(TLS_PORT), "--bind", peer, "--sni", sni,
            "--cafile", str(self.our_ca), "--seconds", f"{seconds:.1f}", "--concurrency", "2",
            timeout=seconds + 60,
        )  # fmt: skip
        stats.units += int(out.get("requests", 0))
        for name, n in out.get("errors", {}).items():
            stats.errors[f"tls-client {name}"] += int(n)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class SoakResult:
    seconds: float
    samples: list[Sample]
    flat: Flatness
    errors: list[ErrorRow]
    load: dict[str, LoadStats]
    events_by_type: dict[str, int]
    hostnames: int
    peak_rss_kib: int
    gateway_alive: bool
    stderr_tail: list[str]
    interval: float
    bulk_mbit: int
    load_start: float  # wall clock
    examples: dict[str, list[dict[str, Any]]]
    runs: list[tuple[str, str, float, float]]
    host_tcp: dict[str, int]  # the test host's TCP_COUNTERS: after the load minus before
    client_tcp: dict[str, int]  # the same for the clients' namespace
    names_kib: float  # names_state_kib() of the hostnames asked after the warm-up

    @property
    def unexpected_errors(self) -> int:
        return sum(r.count for r in self.errors if not r.expected)

    @property
    def client_errors(self) -> int:
        # A lost-and-retried DNS datagram is not a failure: the query was answered.
        return sum(
            n for s in self.load.values() for k, n in s.errors.items() if "(retried)" not in k
        )

    @property
    def ok(self) -> bool:
        return (
            self.gateway_alive
            and self.flat.flat
            and self.unexpected_errors == 0
            and self.client_errors == 0
        )


def _sample(pid: int, t: float, phase: str, tally: EventTally) -> Sample:
    return Sample(
        t=round(t, 2),
        phase=phase,
        rss_kib=rss_kib(pid),
        fds=open_fds(pid),
        threads=thread_count(pid),
        cpu_s=round(cpu_seconds(pid), 2),
        events=tally.total,
        error_events=tally.error_total,
        open_tcp=tally.open_tcp,
        load1=round(os.getloadavg()[0], 2),
        hostnames=len(tally.hostnames),
    )


def _probe(load: Load) -> None:
    """One short run of each kind before the baseline, so what the gateway opens once (the DNS
    upstream socket, the TLS context, the first leaves) is in the count before the load."""
    stats = LoadStats("probe", "")
    peer = load.peers[0]
    load._tool(stats, "rr-client", HOST_ADDR, str(RR_PORT), "--bind", peer, "--seconds", "1",
               "--concurrency", "2", "--max-conns", "20", timeout=30)  # fmt: skip
    load._tool(stats, "dns-client", HOST_ADDR, "--bind", peer, "--count", "3", "--mode", "cold",
               timeout=30)  # fmt: skip
    for sni in TLS_HOSTS:
        load._tool(stats, "tls-client", HOST_ADDR, str(TLS_PORT), "--bind", peer, "--sni", sni,
                   "--cafile", str(load.our_ca), "--seconds", "0.5", "--concurrency", "1",
                   timeout=30)  # fmt: skip
    if stats.errors:
        raise RuntimeError(f"the probe before the soak failed: {dict(stats.errors)}")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C does (namespaces, processes by PID)."""

    def handler(_signo: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def soak(seconds: float, interval: float, bulk_mbit: int) -> SoakResult:
    from bench.tls import make_upstream_ca

    tally = EventTally()
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="unclaw-soak-ca-") as tmp:
        upstream_ca = make_upstream_ca(Path(tmp) / "upstream-ca")
        Path(tmp).chmod(0o755)
        with bench_env(
            "--upstream-dns", f"{HOST_ADDR}:{DNS_PORT}",
            gateway_env={"SSL_CERT_FILE": str(upstream_ca)}, keep_events=True,
        ) as env:  # fmt: skip
            gw, pid = env.gateway, env.ours.gateway_pid
            inet = env.setup.internet
            start_tool(env, inet, "rr-server", "--port", str(RR_PORT))
            start_tool(env, inet, "dns-server", "--port", str(DNS_PORT))
            start_tool(env, inet, "tls-server", "--port", str(TLS_PORT),
                       "--ca-dir", str(upstream_ca.parent))  # fmt: skip
            peers = [env.ours.client_ip]
            for n, table in ((2, 201), (3, 202)):
                ip, _ = add_our_client(env, f"soak{n}", table)
                peers.append(ip)
            print(f"peers {peers}, gateway pid {pid}", flush=True)
            load = Load(env, peers, env.setup.state_dir / "ca.pem", 0.0, bulk_mbit)
            try:
                _probe(load)
                time.sleep(3)  # let the probe's flows close
                tally.consume(gw.drain())
                gw.events.clear()
                fd_baseline = open_fds(pid)
                host_tcp_before = tcp_counters(inet)
                client_tcp_before = tcp_counters(env.setup.client_ns)
                samples.append(_sample(pid, 0.0, "before", tally))
                t0, t0_wall = time.monotonic(), time.time()
                load.deadline = t0 + seconds
                load.start()
                alive = True
                next_at = t0
                while (now := time.monotonic()) < t0 + seconds:
                    if gw.proc.poll() is not None:
                        alive = False
                        print(f"the gateway exited {gw.proc.returncode}", flush=True)
                        break
                    tally.consume(gw.drain())
                    gw.events.clear()
                    s = _sample(pid, now - t0, "load", tally)
                    samples.append(s)
                    print(
                        f"{s.t:6.0f} s  RSS {s.rss_kib / 1024:7.1f} MiB  fds {s.fds:4d}  "
                        f"threads {s.threads:3d}  CPU {s.cpu_s:7.1f} s  events {s.events:8d}  "
                        f"errors {s.error_events:5d}  open tcp {s.open_tcp:4d}  "
                        f"load {s.load1:.2f}",
                        flush=True,
                    )
                    next_at += interval
                    time.sleep(max(0.0, min(next_at, t0 + seconds) - time.monotonic()))
                load.close(join_timeout=90)
                # Settle: the last flows close; descriptors should come back to the baseline.
                settle_end = time.monotonic() + SETTLE_SECONDS
                while alive and time.monotonic() < settle_end:
                    time.sleep(1.0)
                    if gw.proc.poll() is not None:
                        alive = False
                        break
                    tally.consume(gw.drain())
                    gw.events.clear()
                    s = _sample(pid, time.monotonic() - t0, "settle", tally)
                    samples.append(s)
                    if abs(s.fds - fd_baseline) <= FD_TOLERANCE and s.open_tcp <= 0:
                        break
                peak = peak_rss_kib(pid) if alive else 0
                host_tcp_after = tcp_counters(inet)
                client_tcp_after = tcp_counters(env.setup.client_ns)
                stderr_tail = gw.stderr_lines[-20:]
            except BaseException:
                load.close(join_timeout=5)
                raise
    last = samples[-1]
    # The names first asked after the warm-up: the state the steady part's RSS had to absorb.
    warm = next(
        (s for s in samples if s.phase == "load" and s.t >= WARMUP_FRACTION * seconds), last
    )
    late_names = list(tally.hostnames)[warm.hostnames :]
    result = SoakResult(
        seconds=seconds,
        samples=samples,
        flat=flatness(samples, seconds, fd_baseline, last.fds),
        errors=classify_errors(dict(tally.errors)),
        load=load.stats,
        events_by_type=dict(tally.by_type.most_common()),
        hostnames=len(tally.hostnames),
        peak_rss_kib=peak,
        gateway_alive=alive,
        stderr_tail=[line.rstrip() for line in stderr_tail],
        interval=interval,
        bulk_mbit=bulk_mbit,
        load_start=t0_wall,
        examples=tally.examples,
        runs=load.runs,
        host_tcp={k: host_tcp_after.get(k, 0) - v for k, v in host_tcp_before.items()},
        client_tcp={k: client_tcp_after.get(k, 0) - v for k, v in client_tcp_before.items()},
        names_kib=names_state_kib(late_names),
    )
    if not alive:
        result.flat.reasons.append("the gateway exited during the soak")
    return result


# --- the report -------------------------------------------------------------------------------


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def figures_from(r: SoakResult) -> list[Figure]:
    f = r.flat
    drift = Figure(PART, "RSS drift after the warm-up (slope x span)", "MiB",
                   f.rss_drift_kib / 1024, target=f"< {RSS_DRIFT_BOUND_KIB // 1024} MiB",
                   met=f.rss_flat)  # fmt: skip
    fds = Figure(PART, "open descriptors after the load", "", float(f.fd_final),
                 float(f.fd_baseline), reference_label="before the load",
                 target=f"before ± {FD_TOLERANCE}", met=f.fds_flat)  # fmt: skip
    errors = Figure(PART, "unexpected error events", "", float(r.unexpected_errors),
                    target="0", met=r.unexpected_errors == 0)  # fmt: skip
    clients = Figure(PART, "load clients' errors", "", float(r.client_errors), target="0",
                     met=r.client_errors == 0)  # fmt: skip
    return [
        drift,
        Figure(PART, "RSS after the warm-up", "MiB", f.rss_start_kib / 1024),
        Figure(PART, "RSS at the end of the load", "MiB", f.rss_end_kib / 1024),
        Figure(PART, "peak RSS (VmHWM)", "MiB", r.peak_rss_kib / 1024),
        fds,
        errors,
        clients,
    ]


def _cpu_percent(samples: list[Sample]) -> list[float]:
    """CPU use between consecutive samples, % of one core (the first sample: 0)."""
    out = [0.0]
    for a, b in itertools.pairwise(samples):
        dt = b.t - a.t
        out.append(100 * (b.cpu_s - a.cpu_s) / dt if dt > 0 else 0.0)
    return out


CURVE_HEADER = (
    "| t (s) | phase | RSS (MiB) | fds | threads | CPU (% of a core) | events | error events "
    "| open TCP | load avg |"
)


def _examples_text(r: SoakResult) -> str:
    """The first few events of each error, with the load runs that were going on then."""
    if not r.examples:
        return ""
    lines = ["", "First events of each error (t: seconds since the load started; the load "
             "runs going on at that moment):", ""]  # fmt: skip
    for key, events in r.examples.items():
        lines.append(f"- `{key}`:")
        for event in events:
            ts = float(event.get("ts", 0))
            busy = sorted(
                {f"{kind} from {peer}" for kind, peer, a, b in r.runs if a - 1 <= ts <= b + 1}
            )
            shown = {k: v for k, v in event.items() if k not in ("ts", "peer_public_key")}
            lines.append(
                f"  - t {ts - r.load_start:.1f} s: `{json.dumps(shown)}`; running: "
                + (", ".join(busy) or "no load run")
            )
    return "\n".join(lines)


def report_markdown(r: SoakResult, command: str, machine: str) -> str:
    f = r.flat
    load_samples = [s for s in r.samples if s.phase == "load"]
    verdict = "**PASS**" if r.ok else "**FAIL**"
    why = "".join(f"\n- {reason}" for reason in f.reasons)
    if r.unexpected_errors:
        why += f"\n- {r.unexpected_errors} unexpected error events (below)"
    if r.client_errors:
        why += f"\n- {r.client_errors} errors reported by the load clients (below)"
    loads = [s.load1 for s in r.samples]
    load_rows = "\n".join(
        f"| {s.kind} | {s.runs} | "
        + (f"{s.units / (1 << 30):.2f} GiB" if s.unit == "bytes" else f"{s.units:,} {s.unit}")
        + f" | {sum(s.errors.values())} | "
        + ("; ".join(f"{k} x{n}" for k, n in s.errors.most_common(5)) or "")
        + " |"
        for s in r.load.values()
    )
    error_rows = (
        "\n".join(
            f"| `{e.key}` | {e.count} | {'expected' if e.expected else '**unexpected**'} "
            f"| {e.why} |"
            for e in r.errors
        )
        or "| (none) | 0 | | |"
    )
    # The curve every ~30 s (every sample is in soak.samples.json).
    step = max(1, round(30 / r.interval))
    shown = r.samples[:1] + load_samples[::step] + r.samples[-1:]
    cpu = dict(zip((id(s) for s in r.samples), _cpu_percent(r.samples), strict=True))
    curve = "\n".join(
        f"| {s.t:.0f} | {s.phase} | {_mib(s.rss_kib)} | {s.fds} | {s.threads} | "
        f"{cpu[id(s)]:.0f} | {s.events:,} | {s.error_events} | {s.open_tcp} | {s.load1:.2f} |"
        for s in shown
    )
    warm = first_steady(r.samples, r.seconds) or r.samples[-1]
    late_names = r.hostnames - warm.hostnames
    bullets = "\n".join(
        [
            f"- RSS after the warm-up (the first {WARMUP_FRACTION:.0%}; {f.steady_samples} "
            f"samples after it): {_mib(f.rss_start_kib)} MiB, {_mib(f.rss_end_kib)} MiB at the "
            f"end of the load; least-squares slope {f.rss_slope_kib_s:+.2f} KiB/s, "
            f"{f.rss_drift_kib / 1024:+.2f} MiB over the steady part (bound "
            f"{RSS_DRIFT_BOUND_KIB // 1024} MiB); peak (VmHWM) {_mib(r.peak_rss_kib)} MiB; "
            f"{_mib(r.samples[0].rss_kib)} MiB before the load.",
            f"- Open descriptors: {f.fd_baseline} before the load, {f.fd_min}-{f.fd_max} under "
            f"load after the warm-up (drift {f.fd_drift:+.1f}), {f.fd_final} once the load was "
            f"over (tolerance ±{FD_TOLERANCE}).  Threads: "
            f"{min(s.threads for s in r.samples)}-{max(s.threads for s in r.samples)}.",
            f"- Error events: {sum(e.count for e in r.errors)} in all, {r.unexpected_errors} "
            "unexpected.",
            f"- Load average (1 min) during the run: {min(loads):.2f}-{max(loads):.2f} (2 cores, "
            "shared with the load tools, wireguard-go and other work on the machine).",
            f"- DNS: {r.hostnames:,} distinct hostnames asked; each keeps a VIP in the map by "
            "design (up to the 10.78/16 pool) and an upstream cache entry (expired entries are "
            "dropped only when asked again or past the cache's 10,000-entry cap).  The "
            f"{late_names:,} names first asked after the warm-up hold an estimated "
            f"{r.names_kib / 1024:.2f} MiB (the same names built with the gateway's classes in "
            "this process, tracemalloc): bounded state, not a leak; the RSS drift net of it is "
            f"{(f.rss_drift_kib - r.names_kib) / 1024:+.2f} MiB.",
        ]
    )
    events = ", ".join(f"{k} {n:,}" for k, n in r.events_by_type.items())
    examples = _examples_text(r)
    host_tcp = ", ".join(f"{k} {v:,}" for k, v in r.host_tcp.items()) or "not read"
    client_tcp = ", ".join(f"{k} {v:,}" for k, v in r.client_tcp.items()) or "not read"
    stderr = "\n".join(r.stderr_tail) or "(nothing)"
    return f"""# Soak: {r.seconds:.0f} s of mixed load from 3 peers

`{command}` on {machine}.

Verdict: {verdict}{why}

{bullets}

![RSS, descriptors and CPU over time](soak.png)

{figures_table(figures_from(r))}

## Load

Three peers (wireguard-go, one client namespace, picked by source address), four threads of
bounded runs rotating over the peers: bulk iperf3 ({r.bulk_mbit} Mbit/s cap, 30 s runs,
alternating upload/download); short TCP connections (rr-client, 10 s runs, 4 at a time, at
most 1,500 a run); DNS (200 cached queries, then 5 new names, per run); intercepted HTTPS
(tls-client, 10 s runs, 2 at a time, four hostnames).

| load | runs | moved | client errors | which |
|---|---:|---:|---:|---|
{load_rows}

## Error events

| error | count | | why |
|---|---:|---|---|
{error_rows}

Events by type: {events}.
{examples}

The test host's TCP counters over the load (its kernel's view: resets it sent, connections
reset under it, closes with unread data): {host_tcp}.  The clients' namespace's, the same
way: {client_tcp}.

## The curve (one row every ~30 s; every sample in soak.samples.json)

{CURVE_HEADER}
|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|
{curve}

Gateway stderr (last lines):

```
{stderr}
```
"""


def plot(r: SoakResult, path: Path) -> None:
    """RSS, open descriptors and CPU over time, three panels (Pillow only, as summary.png):
    the warm-up shaded, the RSS regression line over the steady part in red."""
    from PIL import Image, ImageDraw, ImageFont

    samples = r.samples
    cpu = _cpu_percent(samples)
    panels: list[tuple[str, list[float]]] = [
        ("RSS (MiB)", [s.rss_kib / 1024 for s in samples]),
        ("open descriptors", [float(s.fds) for s in samples]),
        ("CPU (% of one core)", cpu),
    ]
    width, panel_h, left, right, top = 960, 210, 70, 20, 40
    img = Image.new("RGB", (width, top + panel_h * len(panels) + 30), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 10), f"unclaw-tui soak: {r.seconds:.0f} s of mixed load, 3 peers "
              f"({'PASS' if r.ok else 'FAIL'})", fill="black", font=font)  # fmt: skip
    t_min, t_max = min(s.t for s in samples), max(s.t for s in samples)
    t_span = max(1e-9, t_max - t_min)

    def x_of(t: float) -> float:
        return left + (t - t_min) / t_span * (width - left - right)

    for i, (title, ys) in enumerate(panels):
        y0 = top + i * panel_h + 16
        y1 = y0 + panel_h - 40
        lo, hi = min(ys), max(ys)
        if hi - lo < 1e-9:
            lo, hi = lo - 1, hi + 1
        pad = (hi - lo) * 0.1
        lo, hi = lo - pad, hi + pad

        def y_of(v: float, lo: float = lo, hi: float = hi, y0: int = y0, y1: int = y1) -> float:
            return y1 - (v - lo) / (hi - lo) * (y1 - y0)

        warm_end = x_of(WARMUP_FRACTION * r.seconds)
        draw.rectangle([x_of(max(0.0, t_min)), y0, warm_end, y1], fill=(235, 235, 235))
        if t_max > r.seconds:  # the settle after the load
            draw.rectangle([x_of(r.seconds), y0, x_of(t_max), y1], fill=(225, 235, 250))
        draw.rectangle([left, y0, width - right, y1], outline="black")
        draw.text((left, y0 - 14), title, fill="black", font=font)
        for v in (lo + pad, hi - pad):
            draw.text((5, y_of(v) - 5), f"{v:.1f}", fill="black", font=font)
        points = [(x_of(s.t), y_of(v)) for s, v in zip(samples, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=(31, 119, 180), width=2)
        if i == 0 and r.flat.steady_samples >= 3:
            steady = [
                s for s in samples if s.phase == "load" and s.t >= WARMUP_FRACTION * r.seconds
            ]
            a, b = steady[0], steady[-1]
            mean_t = sum(s.t for s in steady) / len(steady)
            mean_v = sum(s.rss_kib for s in steady) / len(steady) / 1024
            slope = r.flat.rss_slope_kib_s / 1024
            draw.line(
                [
                    (x_of(a.t), y_of(mean_v + slope * (a.t - mean_t))),
                    (x_of(b.t), y_of(mean_v + slope * (b.t - mean_t))),
                ],
                fill=(207, 34, 46),
                width=2,
            )
        draw.text((left, y1 + 4), f"{t_min:.0f} s", fill="black", font=font)
        draw.text((width - right - 40, y1 + 4), f"{t_max:.0f} s", fill="black", font=font)
    draw.text(
        (10, img.height - 18),
        "grey: warm-up   blue: after the load (settle)   red: RSS least-squares line after "
        "the warm-up",
        fill="black",
        font=font,
    )
    img.save(path)


def save(r: SoakResult, command: str) -> str:
    machine = machine_description()
    markdown = report_markdown(r, command, machine)
    save_figures(PART, figures_from(r), markdown)
    (RESULTS_DIR / f"{PART}.samples.json").write_text(
        json.dumps(
            {
                "command": command,
                "machine": machine,
                "seconds": r.seconds,
                "ok": r.ok,
                "flatness": asdict(r.flat),
                "errors": [asdict(e) for e in r.errors],
                "load": {k: {**asdict(s), "errors": dict(s.errors)} for k, s in r.load.items()},
                "events_by_type": r.events_by_type,
                "error_examples": r.examples,
                "test_host_tcp_counters": r.host_tcp,
                "client_tcp_counters": r.client_tcp,
                "load_start": r.load_start,
                "runs": [
                    {"kind": k, "peer": p, "t_start": a - r.load_start, "t_end": b - r.load_start}
                    for k, p, a, b in r.runs
                ],
                "samples": [asdict(s) for s in r.samples],
            },
            indent=1,
        )
        + "\n"
    )
    plot(r, RESULTS_DIR / f"{PART}.png")
    return markdown


def run(seconds: float = 600, interval: float = 5.0, bulk_mbit: int = 100) -> list[Figure]:
    command = f"python -m bench.soak --seconds {seconds:g}"
    if interval != 5.0 or bulk_mbit != 100:
        command += f" --interval {interval:g} --bulk-mbit {bulk_mbit}"
    with _sigterm_as_interrupt():
        result = soak(seconds, interval, bulk_mbit)
    print(save(result, command))
    return figures_from(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=600, help="load duration")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--bulk-mbit", type=int, default=100, help="iperf3 bitrate cap")
    args = parser.parse_args(argv)
    try:
        figures = run(args.seconds, args.interval, args.bulk_mbit)
    except KeyboardInterrupt:
        print("interrupted: namespaces and processes removed, no results written", flush=True)
        return 130
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
