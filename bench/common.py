"""What every benchmark shares: the topology with both gateways up, CPU accounting, the report.

One client namespace reaches the test host (198.18.0.2) through two gateways in the same
gateway namespace, chosen by the client's source address:

    ours       10.77.0.2 -> wireguard-go client A -> unclaw-tui (userspace TCP + relay)
    reference  10.88.0.2 -> wireguard-go client B -> wireguard-go + kernel IP forwarding

Both stay up for the whole run, so measurements can alternate without rebuilding anything; a
policy rule (`from 10.88.0.2 lookup 188`) sends the reference path's traffic into client B.
Future benchmarks (connections per second, DNS, TLS, scale) add scenarios on the same
`BenchEnv`; results are rows of `Sample`s summarised by `summarise`/`markdown_table`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.interop.harness import (
    GATEWAY_INET_ADDR,
    INTERNET_NET,
    REPO_ROOT,
    FlowsSetup,
    GatewayProcess,
    Namespace,
    WgClient,
    cpu_seconds,
    make_flows_setup,
    missing_requirements,
    module_cmd,
    rss_kib,
    sh,
    topology,
    wait_ready,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCE_NET = "10.88.0.0/24"
REFERENCE_GATEWAY_IP = "10.88.0.1"
REFERENCE_CLIENT_IP = "10.88.0.2"
REFERENCE_PORT = 51821
REFERENCE_TABLE = "188"
OURS_CLIENT_IP = "10.77.0.2"


@dataclass
class GatewayPath:
    """One way through a gateway: the client's source address and the gateway's process."""

    name: str
    client_ip: str
    gateway_pid: int
    client: WgClient
    config: str = ""  # the client's wg-quick config (ours only), to re-apply after a restart
    gateway_ifname: str = ""  # the reference gateway's wireguard-go interface

    def cpu(self) -> float:
        return cpu_seconds(self.gateway_pid)

    def rss_kib(self) -> int:
        return rss_kib(self.gateway_pid)

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.gateway_pid)


@dataclass
class BenchEnv:
    setup: FlowsSetup
    ours: GatewayPath
    reference: GatewayPath
    gateway: GatewayProcess

    @property
    def paths(self) -> tuple[GatewayPath, GatewayPath]:
        return (self.ours, self.reference)


def _keypair() -> tuple[str, str]:
    private = sh("wg", "genkey").stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


def _start_reference(s: FlowsSetup) -> GatewayPath:
    """wireguard-go in the gateway namespace with kernel forwarding, and its own client."""
    gw_priv, gw_pub = _keypair()
    cl_priv, cl_pub = _keypair()
    gateway_conf = (
        f"[Interface]\nPrivateKey = {gw_priv}\nListenPort = {REFERENCE_PORT}\n\n"
        f"[Peer]\nPublicKey = {cl_pub}\nAllowedIPs = {REFERENCE_CLIENT_IP}/32\n"
    )
    gateway_wg = s.topo.wg_client(s.gateway_ns, gateway_conf, f"{REFERENCE_GATEWAY_IP}/24", ())
    # Forwarding in the gateway namespace only (sysctls under /proc/sys/net are per namespace).
    s.gateway_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    s.internet.run("ip", "route", "add", REFERENCE_NET, "via", GATEWAY_INET_ADDR)
    client_conf = (
        f"[Interface]\nPrivateKey = {cl_priv}\n\n"
        f"[Peer]\nPublicKey = {gw_pub}\nEndpoint = {s.gateway_addr}:{REFERENCE_PORT}\n"
        "AllowedIPs = 0.0.0.0/0\nPersistentKeepalive = 25\n"
    )
    client = s.topo.wg_client(s.client_ns, client_conf, f"{REFERENCE_CLIENT_IP}/32", ())
    s.client_ns.run(
        "ip", "rule", "add", "from", REFERENCE_CLIENT_IP, "lookup", REFERENCE_TABLE
    )  # fmt: skip
    for net in (INTERNET_NET, REFERENCE_NET):
        s.client_ns.run(
            "ip", "route", "add", net, "dev", client.ifname, "table", REFERENCE_TABLE
        )  # fmt: skip
    ping = s.client_ns.run(
        "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-I", REFERENCE_CLIENT_IP,
        REFERENCE_GATEWAY_IP, check=False, timeout=20,
    )  # fmt: skip
    if ping.returncode != 0:
        raise RuntimeError(f"reference gateway unreachable: {ping.stdout}{ping.stderr}")
    return GatewayPath(
        "reference", REFERENCE_CLIENT_IP, gateway_wg.proc.pid, client,
        gateway_ifname=gateway_wg.ifname,
    )  # fmt: skip


def _start_ours(
    s: FlowsSetup,
    *gateway_args: str,
    env: dict[str, str] | None = None,
    nofile: int | None = None,
) -> tuple[GatewayPath, GatewayProcess]:
    config = s.add_peer("bench")
    gw = s.start_gateway(*gateway_args, env=env, nofile=nofile)
    client = s.client(config, f"{OURS_CLIENT_IP}/32")
    ping = client.ping("10.77.0.1", count=3)
    if ping.returncode != 0:
        raise RuntimeError(f"our gateway unreachable: {ping.stdout}{ping.stderr}")
    return GatewayPath("ours", OURS_CLIENT_IP, gw.proc.pid, client, config), gw


def nofile_of(pid: int) -> tuple[int, int]:
    """A process's open-file limit (soft, hard), from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit for pid {pid}")


def open_fds(pid: int) -> int:
    """Descriptors a process has open (/proc/<pid>/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def bench_env(
    *gateway_args: str,
    gateway_env: dict[str, str] | None = None,
    keep_events: bool = False,
    gateway_nofile: int | None = None,
) -> Iterator[BenchEnv]:
    """Both gateways up in one topology; everything removed afterwards (processes by PID).

    `gateway_env` adds environment variables for our gateway (e.g. SSL_CERT_FILE).  Our
    gateway prints every event as JSON, as `--no-ui --json` does for a user; the bench reads
    them all but parses and keeps them only with `keep_events`: at thousands of connections
    a second, parsing two JSON events per connection in this process took CPU from the same
    two cores the gateways and the load share, a cost the reference never pays.
    `gateway_nofile` starts our gateway under that open-file limit, soft and hard (a process
    may raise its soft limit to the hard one, never past it), through prlimit."""
    missing = missing_requirements()
    if missing:
        raise SystemExit("bench needs: " + ", ".join(missing))
    raise_nofile()
    with topology() as topo:
        s = make_flows_setup(topo)
        reference = _start_reference(s)
        ours, gw = _start_ours(s, *gateway_args, env=gateway_env, nofile=gateway_nofile)
        gw.keep_events = keep_events
        yield BenchEnv(s, ours, reference, gw)


@dataclass
class Sample:
    """One measurement of one scenario through one path."""

    scenario: str
    path: str
    value: float  # the scenario's figure (e.g. Mbit/s)
    bytes_moved: int = 0
    cpu_seconds: float = 0.0
    error: str | None = None

    @property
    def cpu_per_gib(self) -> float | None:
        if self.bytes_moved <= 0:
            return None
        return self.cpu_seconds / (self.bytes_moved / (1 << 30))


@dataclass
class Summary:
    scenario: str
    unit: str
    ours: float | None
    reference: float | None
    ours_cpu_per_gib: float | None
    reference_cpu_per_gib: float | None
    ours_values: list[float] = field(default_factory=list)
    reference_values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(samples: list[Sample], unit: str) -> list[Summary]:
    out: list[Summary] = []
    for scenario in dict.fromkeys(s.scenario for s in samples):
        rows = [s for s in samples if s.scenario == scenario]
        by_path = {
            p: [s for s in rows if s.path == p and s.error is None] for p in ("ours", "reference")
        }
        cpu = {
            p: _median([c for s in by_path[p] if (c := s.cpu_per_gib) is not None]) for p in by_path
        }
        out.append(
            Summary(
                scenario=scenario,
                unit=unit,
                ours=_median([s.value for s in by_path["ours"]]),
                reference=_median([s.value for s in by_path["reference"]]),
                ours_cpu_per_gib=cpu["ours"],
                reference_cpu_per_gib=cpu["reference"],
                ours_values=[s.value for s in by_path["ours"]],
                reference_values=[s.value for s in by_path["reference"]],
                errors=[f"{s.path}: {s.error}" for s in rows if s.error],
            )
        )
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(summaries: list[Summary]) -> str:
    unit = summaries[0].unit if summaries else ""
    lines = [
        f"| scenario | ours ({unit}) | reference ({unit}) | ours / reference "
        "| ours CPU s/GiB | reference CPU s/GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| {s.scenario} | {_fmt(s.ours)} | {_fmt(s.reference)} | "
            f"{_fmt(s.ratio, 2)}{'x' if s.ratio is not None else ''} | "
            f"{_fmt(s.ours_cpu_per_gib, 2)} | "
            f"{_fmt(s.reference_cpu_per_gib, 2)} |"
        )
    return "\n".join(lines)


def machine_description() -> str:
    """What the figures were measured on (no paths, no host names)."""
    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT
    ).stdout.strip()
    dirty = subprocess.run(  # the results a run is writing do not count
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
        capture_output=True, text=True, cwd=REPO_ROOT,
    ).stdout.strip()  # fmt: skip
    # Other work on the machine (tests, a fuzzer) moves every figure: say how busy it was.
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}, "
        f"commit {rev or 'unknown'}{' + uncommitted changes' if dirty else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {load:.2f} "
        "at the end"
    )


# --- shared by the newer parts (connections, DNS, TLS, scale, TUI) --------------------------------


def raise_nofile() -> None:
    """Soft open-file limit up to the hard one: children (gateway, clients, servers) inherit it,
    and 10,000 held connections need that many descriptors on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def peak_rss_kib(pid: int) -> int:
    """Peak resident set size of a process (VmHWM from /proc/<pid>/status), KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: list[float]) -> float | None:
    return _median(values)


def bench_env_vars() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}


def start_tool(env: BenchEnv, ns: Namespace, kind: str, *args: str) -> subprocess.Popen[str]:
    """A `bench.clients` server in a namespace, running once it printed `ready`."""
    proc = env.setup.topo.spawn(
        ns,
        *module_cmd("bench.clients", kind, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=bench_env_vars(),
        cwd=str(REPO_ROOT),
    )
    wait_ready(proc, 30, f"bench tool {kind}")
    return proc


def run_tool(ns: Namespace, kind: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """A `bench.clients` client in a namespace; its JSON result (an `error` key on failure)."""
    try:
        res = subprocess.run(
            ns.cmd(*module_cmd("bench.clients", kind, *args)),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=bench_env_vars(),
            cwd=str(REPO_ROOT),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"{kind} still running after {timeout}s"}
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        return {"error": f"{kind} exited {res.returncode}: {res.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


@dataclass
class Figure:
    """One figure of the summary: ours, the reference (or a baseline), and the target if any."""

    part: str
    name: str
    unit: str
    ours: float | None
    reference: float | None = None
    reference_label: str = "reference"
    target: str = ""
    met: bool | None = None  # None: no target, or not measured
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference


def save_figures(part: str, figures: list[Figure], markdown: str) -> Path:
    """bench/results/<part>.md (the part's own report) and <part>.json (for the summary)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{part}.md").write_text(markdown)
    path = RESULTS_DIR / f"{part}.json"
    path.write_text(json.dumps([asdict(f) for f in figures], indent=1) + "\n")
    return path


def load_figures(part: str) -> list[Figure]:
    path = RESULTS_DIR / f"{part}.json"
    if not path.exists():
        return []
    return [Figure(**row) for row in json.loads(path.read_text())]


def fmt(value: float | None, digits: int = 1) -> str:
    return _fmt(value, digits)


def figures_table(figures: list[Figure]) -> str:
    lines = [
        "| figure | ours | reference / baseline | ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    for f in figures:
        digits = 2 if f.ours is not None and abs(f.ours) < 10 else 1
        if f.unit in ("", "x") and f.ours is not None and float(f.ours).is_integer():
            digits = 0  # counts
        ref = (
            ""
            if f.reference is None
            else f"{fmt(f.reference, digits)} {f.unit} ({f.reference_label})"
        )
        ours = "n/a" if f.ours is None else f"{fmt(f.ours, digits)} {f.unit}"
        met = {True: "met", False: "**missed**", None: ""}[f.met]
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}x"
        note = f" ({f.note})" if f.note else ""
        lines.append(f"| {f.name}{note} | {ours} | {ref} | {ratio} | {f.target} | {met} |")
    return "\n".join(lines)


def add_our_client(env: BenchEnv, name: str, table: int) -> tuple[str, WgClient]:
    """Another peer of our gateway (added by the CLI, live) with its own wireguard-go client in
    the client namespace, chosen by source address through a policy rule like the reference's.
    Returns its tunnel IP and the client."""
    s = env.setup
    config = s.add_peer(name)
    ip = next(
        line.split("=", 1)[1].strip().split("/")[0]
        for line in config.splitlines()
        if line.split("=", 1)[0].strip().lower() == "address"
    )
    client = s.topo.wg_client(s.client_ns, config, f"{ip}/32", ())
    s.client_ns.run("ip", "rule", "add", "from", ip, "lookup", str(table))
    for net in (INTERNET_NET, "10.77.0.0/24"):
        s.client_ns.run("ip", "route", "add", net, "dev", client.ifname, "table", str(table))
    # The gateway picks CLI-added peers up within a poll interval; ping until it answers.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ping = s.client_ns.run(
            "ping", "-n", "-c", "1", "-W", "1", "-I", ip, "10.77.0.1", check=False, timeout=10
        )  # fmt: skip
        if ping.returncode == 0:
            return ip, client
    raise RuntimeError(f"peer {name} ({ip}) never reached our gateway")


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]
