"""Isolation: one peer abuses the gateway, another peer's figures must stay within 2x of a run
where the first sends the same volume of ordinary traffic (issue 13, "How it is proven").

    python -m bench.isolation                       # 5 kinds x 2 rounds x 2 phases of 15 s (~8 min)
    python -m bench.isolation --seconds 5 --kinds crafted-udp,idle-conns
    python -m bench --only isolation                # the same, through the suite

Topology: the bench's usual one (bench.common) with our gateway started under an open-file
limit of 1,024 (soft and hard, `--nofile`) and its upstream DNS on the test host
(`bench.clients dns-server`: an A record for any name, so every domain is a wildcard domain;
names under `noanswer.bench.test` never get an answer).  Two real wireguard-go peers of our
gateway sit in the client namespace, chosen by source address: the victim (the bench's own
client, 10.77.0.2) and the abuser (added live with the CLI).  The idle reference gateway of
bench.common is up but unused.

For each kind of abuse, `--rounds` pairs of phases of `--seconds`, the ordinary one first (the
phases alternate, so a drift of the machine during a kind touches both): the abuser starts
(ordinary traffic, or the abuse at the same volume), and once it is in its steady state the
victim is measured for `--seconds` by three probes running side by side, each paced and
bounded in count and time:

- handshake time: a fresh WireGuard handshake every 0.1 s from a third peer's key (the
  gateway's own Noise code as initiator, from the client namespace), initiation to response;
- DNS: an A query for a new name every 0.05 s (each goes to the upstream), sent to port 53
  through the victim's tunnel; works when an A record comes back;
- connect: a new TCP connection every 0.05 s to the test host through the victim's tunnel,
  connect time, then 1 KiB each way.

A probe without a usable answer in 3 s counts as 3 s (it did not work; a percentile over the
successes alone would hide that), and the failures are listed.  Between phases the bench waits
until the gateway is idle and its descriptors are back near where they started.

The kinds (the abuser's traffic in the ordinary phase -> in the abuse phase; rates are flags):

- crafted-udp: A queries for 4 names padded (EDNS Padding) to 1,392 B, 5/s -> crafted queries
  of up to 1,392 B (compression-pointer chains, every question announced), 5/s (1,392 B: the
  largest query that crosses the tunnel unfragmented);
- crafted-tcp: the same over DNS-over-TCP at 9,000 B, one every 5 s, a connection each;
- unanswered: A queries for 1,000 names in turn that the upstream answers with TTL 0 (so each
  goes upstream, and the VIP map does not grow), 600/s -> A queries for new names under the
  never-answering suffix, 600/s (past the upstream timeout of 2 s, ~1,200 in flight);
- wildcard: A queries for the same 4 names of one domain, 1,000/s -> a new name of that domain
  each time, 1,000/s;
- idle-conns: 3,000 TCP connections opened (200 at a time), 1 KiB each way, closed -> 3,000
  TCP connections opened (200 at a time) and held idle.

The kinds run in that order, the wildcard flood last (the names it leaves in the VIP map stay).

Figures: per kind the victim's handshake p50/p99, DNS p99 and connect p50/p99 over the probes
of every round of a phase pooled (a p99 of one 15 s phase rests on its 3 worst probes), the
abuse phase as "ours" and the ordinary phase as the baseline, so the ratio column is abuse /
ordinary; the target is <= 2x.  Writes bench/results/isolation.md and isolation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.common import (
    BenchEnv,
    Figure,
    add_our_client,
    bench_env,
    bench_env_vars,
    figures_table,
    fmt,
    machine_description,
    nofile_of,
    open_fds,
    run_tool,
    save_figures,
    start_tool,
)
from bench.dns import dns_available
from tests.interop.harness import HOST_ADDR, REPO_ROOT, cpu_seconds, module_cmd, wait_ready

PART = "isolation"
RR_PORT = 7000
HOLD_PORT = 7001
DNS_PORT = 53
SILENT_SUFFIX = "noanswer.bench.test"
UNCACHED_SUFFIX = "uncached.bench.test"  # = bench.clients.UNCACHED_DOMAIN
NOFILE = 1024
ABUSER_TABLE = 201
TARGET_RATIO = 2.0
HANDSHAKE_INTERVAL = 0.1  # under the gateway's 50 initiations/s per peer bound, with room
ROUNDS = 2  # ordinary/abuse pairs per kind: the probes of each phase are pooled over rounds
PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 3.0
SETTLE_SECONDS = 60.0  # the most the bench waits for the gateway to calm down between phases
SETTLE_FDS = 32  # descriptors above the count at the start that still count as "back"
IDLE_CPU = 0.15  # CPU seconds per second under which the gateway counts as idle
# The largest UDP query that crosses the tunnel unfragmented (wireguard-go's MTU 1,420 less the
# IP and UDP headers): the gateway's stack does not reassemble fragments, so a larger query
# would never reach its parser, crafted or not.
UDP_QUERY_SIZE = 1392
TCP_QUERY_SIZE = 9000
# The wildcard flood last: the names it leaves in the VIP map stay (they are persisted), and every
# later change saves the whole map, so a kind after it would start from a slower gateway.
KINDS = ("crafted-udp", "crafted-tcp", "idle-conns", "unanswered", "wildcard")


@dataclass(frozen=True)
class Rates:
    crafted_udp: float = 5.0  # per second
    crafted_tcp: float = 0.2
    unanswered: float = 600.0
    wildcard: float = 1000.0
    conns: int = 3000
    conn_concurrency: int = 200  # under the per-peer half-open bound (256)


@dataclass(frozen=True)
class Phase:
    kind: str
    phase: str  # "ordinary" or "abuse"
    tool: str  # a bench.clients mode, run in the client namespace as the abuser
    args: tuple[str, ...]  # after the tool (the bind address is added)
    what: str  # the abuser's traffic, for the report
    ready_timeout: float


def phases(kind: str, r: Rates, seconds: float) -> tuple[Phase, Phase]:
    """The ordinary phase and the abuse phase of one kind: the same volume, one of them hostile."""
    hold = str(seconds + 120)  # the bench ends it earlier by closing stdin

    def flood(pattern: str, rate: float, *extra: str, warmup: float = 1.0) -> tuple[str, ...]:
        return (
            HOST_ADDR, "--pattern", pattern, "--rate", f"{rate:g}",
            "--seconds", str(seconds + 60), "--warmup", f"{warmup:g}",
            "--silent-suffix", SILENT_SUFFIX, *extra,
        )  # fmt: skip

    if kind == "crafted-udp":
        size = ("--size", str(UDP_QUERY_SIZE))
        return (
            Phase(kind, "ordinary", "dns-flood", flood("padded", r.crafted_udp, *size),
                  f"padded A queries of {UDP_QUERY_SIZE:,} B, {r.crafted_udp:g}/s", 30),
            Phase(kind, "abuse", "dns-flood", flood("crafted", r.crafted_udp, *size),
                  f"crafted queries of <= {UDP_QUERY_SIZE:,} B, {r.crafted_udp:g}/s", 30),
        )  # fmt: skip
    if kind == "crafted-tcp":
        size = ("--size", str(TCP_QUERY_SIZE))
        return (
            Phase(kind, "ordinary", "dns-flood", flood("padded-tcp", r.crafted_tcp, *size),
                  f"padded A queries of {TCP_QUERY_SIZE:,} B over TCP, {r.crafted_tcp:g}/s",
                  30),
            Phase(kind, "abuse", "dns-flood", flood("crafted-tcp", r.crafted_tcp, *size),
                  f"crafted queries of <= {TCP_QUERY_SIZE:,} B over TCP, {r.crafted_tcp:g}/s",
                  30),
        )  # fmt: skip
    if kind == "unanswered":
        # Past the upstream timeout (2 s), so the queries in flight have piled up.
        return (
            Phase(kind, "ordinary", "dns-flood", flood("answered", r.unanswered, warmup=2.5),
                  f"A queries for 1,000 answered names in turn, TTL 0, {r.unanswered:g}/s", 30),
            Phase(kind, "abuse", "dns-flood", flood("silent", r.unanswered, warmup=2.5),
                  f"A queries for new never-answered names, {r.unanswered:g}/s", 30),
        )  # fmt: skip
    if kind == "wildcard":
        return (
            Phase(kind, "ordinary", "dns-flood", flood("same", r.wildcard),
                  f"A queries for the same 4 names, {r.wildcard:g}/s", 30),
            Phase(kind, "abuse", "dns-flood", flood("wildcard", r.wildcard),
                  f"A queries for a new name of one domain each, {r.wildcard:g}/s", 30),
        )  # fmt: skip
    if kind == "idle-conns":
        conns = (
            "--count", str(r.conns), "--concurrency", str(r.conn_concurrency),
            "--hold", hold, "--timeout", "3",
        )  # fmt: skip
        # Every connection may wait its timeout, a batch at a time.
        ready = 30 + 3 * r.conns / r.conn_concurrency
        return (
            Phase(kind, "ordinary", "churn-client", (HOST_ADDR, str(RR_PORT), *conns),
                  f"{r.conns:,} connections opened, 1 KiB each way, closed", ready),
            Phase(kind, "abuse", "hold-client", (HOST_ADDR, str(HOLD_PORT), *conns),
                  f"{r.conns:,} connections opened and held idle", ready),
        )  # fmt: skip
    raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


# --- the victim's probes ------------------------------------------------------------------------


@dataclass
class HandshakeKey:
    private_key: str
    preshared_key: str
    gateway_key: str


def add_probe_peer(env: BenchEnv, name: str) -> HandshakeKey:
    """A peer for the handshake probe (no wireguard-go: the probe speaks for it)."""
    from unclaw_tui.wgquick import parse_config

    config = parse_config(env.setup.add_peer(name))
    return HandshakeKey(
        config["Interface"]["PrivateKey"],
        config["Peer"].get("PresharedKey", ""),
        config["Peer"]["PublicKey"],
    )


def handshake_args(env: BenchEnv, key: HandshakeKey, seconds: float) -> tuple[str, ...]:
    s = env.setup
    return (
        s.gateway_addr, str(s.port), "--key", key.private_key, "--psk", key.preshared_key,
        "--gateway-key", key.gateway_key, "--seconds", f"{seconds:g}",
        "--interval", f"{HANDSHAKE_INTERVAL:g}", "--timeout", f"{PROBE_TIMEOUT:g}",
    )  # fmt: skip


def wait_probe_peer(env: BenchEnv, key: HandshakeKey, timeout: float = 30) -> None:
    """The gateway picks CLI-added peers up within a poll interval: probe until it answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run_tool(
            env.setup.client_ns, "handshake-probe", *handshake_args(env, key, 1), timeout=30
        )
        if out.get("ok"):
            return
    raise RuntimeError("the handshake probe's peer never got a response from our gateway")


def probe_victim(env: BenchEnv, key: HandshakeKey, seconds: float) -> dict[str, dict[str, Any]]:
    """The three probes side by side for `seconds`; their JSON results."""
    ns, bind = env.setup.client_ns, env.ours.client_ip
    pace = ("--seconds", f"{seconds:g}", "--interval", f"{PROBE_INTERVAL:g}",
            "--timeout", f"{PROBE_TIMEOUT:g}")  # fmt: skip
    bound = seconds + 4 * PROBE_TIMEOUT + 60
    jobs = {
        "handshake": ("handshake-probe", handshake_args(env, key, seconds)),
        "dns": ("dns-probe", (HOST_ADDR, str(DNS_PORT), "--bind", bind, *pace)),
        "connect": ("connect-probe", (HOST_ADDR, str(RR_PORT), "--bind", bind, *pace)),
    }
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {
            name: pool.submit(run_tool, ns, tool, *args, timeout=bound)
            for name, (tool, args) in jobs.items()
        }
        return {name: f.result() for name, f in futures.items()}


# --- one phase ----------------------------------------------------------------------------------


class GatewayWatch:
    """Samples the gateway's open descriptors every 0.5 s while a phase runs (the most seen)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.max_fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_fds = max(self.max_fds, open_fds(self.pid))
            except OSError:
                return  # the gateway is gone; the phase reports it
            self._stop.wait(0.5)

    def __enter__(self) -> GatewayWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def start_abuser(env: BenchEnv, phase: Phase, bind: str) -> tuple[subprocess.Popen[str], str]:
    """The abuser's tool in the client namespace, once it printed `ready` (its steady state)."""
    proc = env.setup.topo.spawn(
        env.setup.client_ns,
        *module_cmd("bench.clients", phase.tool, *phase.args, "--bind", bind),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=bench_env_vars(),
        cwd=str(REPO_ROOT),
    )
    line = wait_ready(proc, phase.ready_timeout, f"abuser {phase.tool}")
    return proc, line


def stop_abuser(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Close its stdin (it stops and prints its counts); killed by PID if it does not."""
    try:
        out, err = proc.communicate(input="", timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return {"error": "abuser did not stop within 30 s; killed"}
    lines = [line for line in out.strip().splitlines() if not line.startswith("ready")]
    if proc.returncode != 0 or not lines:
        return {"error": f"abuser exited {proc.returncode}: {err.strip()[-300:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def settle(env: BenchEnv, fd_base: int) -> dict[str, float]:
    """Until the gateway is idle (CPU under IDLE_CPU over 0.5 s) and its descriptors are back
    within SETTLE_FDS of the count at the start, or SETTLE_SECONDS pass."""
    pid = env.ours.gateway_pid
    t0 = time.monotonic()
    fds = open_fds(pid)
    while time.monotonic() - t0 < SETTLE_SECONDS:
        cpu0 = cpu_seconds(pid)
        time.sleep(0.5)
        busy = (cpu_seconds(pid) - cpu0) / 0.5
        fds = open_fds(pid)
        if busy < IDLE_CPU and fds <= fd_base + SETTLE_FDS:
            break
    return {"settle_s": time.monotonic() - t0, "fds_after": fds}


def run_phase(
    env: BenchEnv, phase: Phase, abuser_ip: str, key: HandshakeKey, seconds: float, fd_base: int
) -> dict[str, Any]:
    s = env.setup
    pid = env.ours.gateway_pid
    row: dict[str, Any] = {"kind": phase.kind, "phase": phase.phase, "abuser_traffic": phase.what}
    hold_server = None
    if phase.tool == "hold-client":
        # A hold server of its own: killing it afterwards closes every held connection, so the
        # gateway's relays end (it never closes them itself, by design).
        hold_server = start_tool(env, s.internet, "hold-server", "--port", str(HOLD_PORT),
                                 "--max-seconds", str(seconds + 300))  # fmt: skip
    t0 = time.monotonic()
    try:
        proc, ready = start_abuser(env, phase, abuser_ip)
    except AssertionError as exc:
        row["error"] = str(exc)
        if hold_server is not None:
            hold_server.kill()
            hold_server.wait(timeout=10)
        return row
    row["abuser_ready"] = json.loads(ready.removeprefix("ready").strip() or "{}")
    row["ramp_s"] = time.monotonic() - t0
    cpu0 = cpu_seconds(pid)
    with GatewayWatch(pid) as watch:
        row["fds_at_start"] = open_fds(pid)
        row["victim"] = probe_victim(env, key, seconds)
    row["gateway_cpu_s"] = cpu_seconds(pid) - cpu0
    row["gateway_max_fds"] = watch.max_fds
    row["abuser"] = stop_abuser(proc)
    if hold_server is not None:
        hold_server.kill()
        hold_server.wait(timeout=10)
    if env.gateway.proc.poll() is not None:
        row["error"] = f"our gateway exited ({env.gateway.proc.returncode})"
        return row
    row.update(settle(env, fd_base))
    return row


def _line(row: dict[str, Any]) -> str:
    if "error" in row and "victim" not in row:
        return row["error"]
    v = row["victim"]
    parts = []
    for name, key in (("handshake", "p99_ms"), ("dns", "p99_ms"), ("connect", "p99_ms")):
        out = v[name]
        if "error" in out:
            parts.append(f"{name} {out['error']}")
            continue
        bad = sum(out["failures"].values())
        parts.append(f"{name} p99 {fmt(out[key], 2)} ms ({bad}/{out['probes']} failed)")
    return "; ".join(parts) + f"; gateway max fds {row['gateway_max_fds']}"


# --- figures and the report ---------------------------------------------------------------------

FIGURES = (
    ("handshake", "p50_ms", "handshake time p50"),
    ("handshake", "p99_ms", "handshake time p99"),
    ("dns", "p99_ms", "DNS p99"),
    ("connect", "p50_ms", "connect time p50"),
    ("connect", "p99_ms", "connect time p99"),
)


def _pooled(rows: list[dict[str, Any]], probe: str) -> dict[str, Any] | None:
    """One phase's probes of `probe` over its rounds: percentiles of the pooled samples, and
    the failures summed.  None when no round measured it."""
    samples: list[float] = []
    failures: dict[str, int] = {}
    for row in rows:
        out = row.get("victim", {}).get(probe, {})
        samples.extend(out.get("samples_ms", ()))
        for why, n in out.get("failures", {}).items():
            failures[why] = failures.get(why, 0) + n
    if not samples:
        return None
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "probes": len(ordered), "failures": failures}


def figures_from(rows: list[dict[str, Any]], kinds: list[str]) -> list[Figure]:
    figures = []
    for kind in kinds:
        ordinary = [r for r in rows if r["kind"] == kind and r["phase"] == "ordinary"]
        abuse = [r for r in rows if r["kind"] == kind and r["phase"] == "abuse"]
        for probe, key, label in FIGURES:
            pooled_abuse, pooled_base = _pooled(abuse, probe), _pooled(ordinary, probe)
            ours = None if pooled_abuse is None else pooled_abuse[key]
            base = None if pooled_base is None else pooled_base[key]
            failed = None if pooled_abuse is None else pooled_abuse["failures"]
            note = ""
            if failed:
                note = "failed in the abuse phase: " + ", ".join(
                    f"{n} {why}" for why, n in sorted(failed.items())
                )
            f = Figure(
                PART,
                f"{kind}: victim's {label}",
                "ms",
                ours,
                base,
                reference_label="ordinary",
                target=f"<= {TARGET_RATIO:g}x",
                note=note,
            )
            f.met = None if f.ratio is None else f.ratio <= TARGET_RATIO
            figures.append(f)
    return figures


def detail_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| kind | phase | abuser's traffic | handshake p50 / p99 (ms) | DNS p50 / p99 (ms) "
        "| connect p50 / p99 (ms) | victim failures | gateway CPU s | gateway max fds |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if "victim" not in r:
            lines.append(f"| {r['kind']} | {r['phase']} | {r.get('error', '')} | | | | | | |")
            continue
        v = r["victim"]
        cells = []
        failures = []
        for probe in ("handshake", "dns", "connect"):
            out = v[probe]
            if "error" in out:
                cells.append("n/a")
                failures.append(f"{probe}: {out['error']}")
                continue
            cells.append(f"{fmt(out['p50_ms'], 2)} / {fmt(out['p99_ms'], 2)}")
            if out["failures"]:
                failures.append(
                    f"{probe}: "
                    + ", ".join(f"{n} {why}" for why, n in sorted(out["failures"].items()))
                    + f" of {out['probes']}"
                )
        lines.append(
            f"| {r['kind']} | {r['phase']} | {r['abuser_traffic']} | {' | '.join(cells)} "
            f"| {'; '.join(failures) or 'none'} | {r['gateway_cpu_s']:.1f} "
            f"| {r['gateway_max_fds']} |"
        )
    return "\n".join(lines)


def ratio_table(figures: list[Figure]) -> str:
    """The ratios alone, one line per kind (what the issue asks the bench to print)."""
    kinds = dict.fromkeys(f.name.split(":", 1)[0] for f in figures)
    lines = [
        "| kind | " + " | ".join(label for _, _, label in FIGURES) + " |",
        "|---|" + "---:|" * len(FIGURES),
    ]
    for kind in kinds:
        cells = []
        for f in (g for g in figures if g.name.startswith(f"{kind}:")):
            mark = "" if f.met is None else (" ok" if f.met else " **over**")
            cells.append("n/a" if f.ratio is None else f"{f.ratio:.2f}x{mark}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(
    seconds: float = 15.0,
    kinds: list[str] | None = None,
    rates: Rates | None = None,
    nofile: int = NOFILE,
    rounds: int = ROUNDS,
) -> list[Figure]:
    kinds = kinds or list(KINDS)
    rates = rates or Rates()
    plan = [phases(kind, rates, seconds) for kind in kinds]  # unknown kinds fail before setup
    rows: list[dict[str, Any]] = []
    upstream = f"{HOST_ADDR}:{DNS_PORT}"
    with bench_env("--upstream-dns", upstream, gateway_nofile=nofile) as env:
        s = env.setup
        start_tool(
            env, s.internet, "dns-server", "--port", str(DNS_PORT),
            "--silent-suffix", SILENT_SUFFIX, "--uncached-suffix", UNCACHED_SUFFIX,
        )  # fmt: skip
        start_tool(env, s.internet, "rr-server", "--port", str(RR_PORT))
        missing = dns_available(env)
        if missing is not None:
            raise RuntimeError(f"our gateway's DNS service is not available: {missing}")
        abuser_ip, _ = add_our_client(env, "abuser", ABUSER_TABLE)
        key = add_probe_peer(env, "victim-handshakes")
        wait_probe_peer(env, key)
        pid = env.ours.gateway_pid
        limits = nofile_of(pid)
        fd_base = open_fds(pid)
        print(f"gateway pid {pid}: open-file limit {limits}, {fd_base} descriptors open",
              flush=True)  # fmt: skip
        for pair in plan:
            for phase in pair * rounds:
                t0 = time.monotonic()
                row = run_phase(env, phase, abuser_ip, key, seconds, fd_base)
                rows.append(row)
                print(f"{phase.kind:<12} {phase.phase:<9} {_line(row)} "
                      f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
                if env.gateway.proc.poll() is not None:
                    break
            if env.gateway.proc.poll() is not None:
                print("our gateway exited: the remaining kinds are not measured", flush=True)
                break
        limits_end = nofile_of(pid) if env.gateway.proc.poll() is None else None
    figures = figures_from(rows, kinds)
    command = f"python -m bench.isolation --seconds {seconds:g} --kinds {','.join(kinds)}"
    if nofile != NOFILE:
        command += f" --nofile {nofile}"
    if rounds != ROUNDS:
        command += f" --rounds {rounds}"
    for flag, value, default in (
        ("--crafted-udp-rate", rates.crafted_udp, Rates.crafted_udp),
        ("--crafted-tcp-rate", rates.crafted_tcp, Rates.crafted_tcp),
        ("--unanswered-rate", rates.unanswered, Rates.unanswered),
        ("--wildcard-rate", rates.wildcard, Rates.wildcard),
        ("--conns", rates.conns, Rates.conns),
    ):
        if value != default:
            command += f" {flag} {value:g}"
    report = (
        "# Isolation: one peer's abuse against another peer's figures\n\n"
        f"`{command}` on {machine_description()}.\n\n"
        f"Our gateway ran under an open-file limit of {nofile:,} (soft, hard) = {limits} at "
        f"the start, {limits_end} at the end.  Each kind: an ordinary phase, then an abuse "
        f"phase of the same volume from the abuser peer, {seconds:g} s of victim probes each, "
        f"{rounds} such pairs in turn, each phase's probes pooled over its rounds "
        "(see the module's docstring, `python -m bench.isolation --help`).  Ratio = the "
        f"victim's figure in the abuse phase / in the ordinary phase; target <= "
        f"{TARGET_RATIO:g}x.  A probe without a usable answer in {PROBE_TIMEOUT:g} s counts as "
        f"{PROBE_TIMEOUT:g} s.\n\n"
        "## Ratios (abuse / ordinary)\n\n"
        f"{ratio_table(figures)}\n\n"
        "## Figures\n\n"
        f"{figures_table(figures)}\n\n"
        "## Per phase\n\n"
        f"{detail_table(rows)}\n\n"
        "Raw rows (without the samples):\n\n"
        f"```\n{json.dumps(_without_samples(rows), indent=1)}\n```\n"
    )
    save_figures(PART, figures, report)
    print(f"\nRatios (abuse / ordinary), target <= {TARGET_RATIO:g}x:\n\n{ratio_table(figures)}")
    return figures


def _without_samples(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = json.loads(json.dumps(rows))
    for row in out:
        for probe in row.get("victim", {}).values():
            probe.pop("samples_ms", None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.isolation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Rates()
    parser.add_argument("--seconds", type=float, default=15.0, help="probing time per phase")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, in order")
    parser.add_argument("--nofile", type=int, default=NOFILE, help="our gateway's fd limit")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="phase pairs per kind")
    parser.add_argument("--crafted-udp-rate", type=float, default=d.crafted_udp)
    parser.add_argument("--crafted-tcp-rate", type=float, default=d.crafted_tcp)
    parser.add_argument("--unanswered-rate", type=float, default=d.unanswered)
    parser.add_argument("--wildcard-rate", type=float, default=d.wildcard)
    parser.add_argument("--conns", type=int, default=d.conns, help="idle connections held")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    rates = Rates(
        crafted_udp=args.crafted_udp_rate,
        crafted_tcp=args.crafted_tcp_rate,
        unanswered=args.unanswered_rate,
        wildcard=args.wildcard_rate,
        conns=args.conns,
    )
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    run(args.seconds, [k for k in args.kinds.split(",") if k], rates, args.nofile, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
