"""Network-namespace topologies with real wireguard-go clients, for interop tests and benches.

Every namespace, veth and process made here is recorded and removed in `close()`, processes
by PID.  Names carry a per-run tag so parallel runs and leftovers cannot collide; wireguard-go
control sockets live in /var/run/wireguard/ shared by all namespaces, so interface names are
unique too.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED_TOOLS = ("ip", "wireguard-go", "wg", "ping")


def missing_requirements() -> list[str]:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    if not Path("/dev/net/tun").exists():
        missing.append("/dev/net/tun")
    return missing


def sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class Namespace:
    name: str

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return sh(*self.cmd(*args), check=check, timeout=timeout)


class Topology:
    """Namespaces joined by veth pairs; `close()` undoes everything."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid() % 100000:05d}{int(time.time() * 1000) % 1000:03d}"
        self.namespaces: list[Namespace] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self.wg_interfaces: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="unclaw-interop-"))
        os.chmod(self.tmp, 0o755)
        self._counter = 0

    def namespace(self, role: str) -> Namespace:
        ns = Namespace(f"uc{role}{self.tag}")
        sh("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def link(self, a: Namespace, a_addr: str, b: Namespace, b_addr: str) -> None:
        """A veth pair a<->b with the given CIDR addresses."""
        self._counter += 1
        va, vb = f"va{self.tag}{self._counter}", f"vb{self.tag}{self._counter}"
        sh("ip", "link", "add", va[:15], "type", "veth", "peer", "name", vb[:15])
        sh("ip", "link", "set", va[:15], "netns", a.name)
        sh("ip", "link", "set", vb[:15], "netns", b.name)
        for ns, dev, addr in ((a, va[:15], a_addr), (b, vb[:15], b_addr)):
            ns.run("ip", "addr", "add", addr, "dev", dev)
            ns.run("ip", "link", "set", dev, "up")

    def spawn(self, ns: Namespace | None, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        cmd = ns.cmd(*args) if ns else list(args)
        proc = subprocess.Popen(cmd, **kw)
        self.processes.append(proc)
        return proc

    def wg_client(
        self,
        ns: Namespace,
        config_text: str,
        address: str,
        routes: tuple[str, ...] = ("10.77.0.0/24",),
    ) -> WgClient:
        """A wireguard-go interface in `ns`, configured from a wg-quick config."""
        self._counter += 1
        ifname = f"ucw{self.tag}{self._counter}"[:15]
        proc = self.spawn(
            ns,
            "wireguard-go",
            "-f",
            ifname,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LOG_LEVEL": "error"},
        )
        self.wg_interfaces.append(ifname)
        sock = Path("/var/run/wireguard") / f"{ifname}.sock"
        wait_for(lambda: sock.exists(), f"wireguard-go socket {sock}", 10)
        client = WgClient(self, ns, ifname, proc)
        client.setconf(config_text)
        ns.run("ip", "addr", "add", address, "dev", ifname)
        ns.run("ip", "link", "set", ifname, "up")
        for route in routes:
            ns.run("ip", "route", "add", route, "dev", ifname)
        return client

    def close(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for ifname in self.wg_interfaces:
            with contextlib.suppress(FileNotFoundError):
                (Path("/var/run/wireguard") / f"{ifname}.sock").unlink()
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns.name, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


def strip_config(text: str) -> str:
    """What `wg-quick strip` does: drop the keys `wg setconf` does not know."""
    keep = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip().lower()
        if key in (
            "address",
            "dns",
            "mtu",
            "table",
            "preup",
            "postup",
            "predown",
            "postdown",
            "saveconfig",
        ):
            continue
        keep.append(line)
    return "\n".join(keep) + "\n"


@dataclass
class WgClient:
    topo: Topology
    ns: Namespace
    ifname: str
    proc: subprocess.Popen[Any]

    def setconf(self, config_text: str) -> None:
        path = self.topo.tmp / f"{self.ifname}.conf"
        path.write_text(strip_config(config_text))
        self.ns.run("wg", "setconf", self.ifname, str(path))

    def latest_handshake(self) -> int:
        out = self.ns.run("wg", "show", self.ifname, "latest-handshakes").stdout.split()
        return int(out[1]) if len(out) >= 2 else 0

    def transfer(self) -> tuple[int, int]:
        out = self.ns.run("wg", "show", self.ifname, "transfer").stdout.split()
        return int(out[1]), int(out[2])

    def ping(
        self, dst: str, count: int = 1, timeout: float = 2, interval: float = 0.2
    ) -> subprocess.CompletedProcess[str]:
        return self.ns.run(
            "ping",
            "-n",
            "-c",
            str(count),
            "-i",
            str(interval),
            "-W",
            str(max(1, int(timeout))),
            dst,
            check=False,
            timeout=count * interval + timeout + 10,
        )


class GatewayProcess:
    """`unclaw-tui --no-ui --json` in a namespace, its events collected from stdout."""

    def __init__(
        self,
        topo: Topology,
        ns: Namespace,
        state_dir: Path,
        *args: str,
        drop_caps: bool = False,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "unclaw_tui",
            "--state-dir",
            str(state_dir),
            "--no-ui",
            "--json",
            *args,
        ]
        if drop_caps:
            # No capability at all (no CAP_NET_ADMIN, NET_RAW, NET_BIND_SERVICE, DAC_OVERRIDE):
            # what an unprivileged user has, while the files stay readable.
            cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", *cmd]
        if nofile is not None:  # soft and hard descriptor limit: the gateway cannot raise it
            cmd = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *cmd]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = topo.spawn(
            ns,
            *cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO_ROOT),
        )
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stderr_lines: list[str] = []
        # False: lines are still read (the gateway's output never backs up) but not parsed
        # or kept, for benchmarks that use no events and must not charge their parsing to
        # the machine they measure on.
        self.keep_events = True
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not self.keep_events:
                continue
            with contextlib.suppress(ValueError):
                self._queue.put(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def wait_event(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str = "event"
    ) -> dict[str, Any]:
        for ev in self.events:
            if pred(ev):
                return ev
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {what} within {timeout}s; events: {self.events[-20:]}; "
                    f"stderr: {''.join(self.stderr_lines[-20:])}"
                )
            try:
                ev = self._queue.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"gateway exited {self.proc.returncode}: {''.join(self.stderr_lines)}"
                    ) from None
                continue
            self.events.append(ev)
            if pred(ev):
                return ev

    def drain(self) -> list[dict[str, Any]]:
        while True:
            try:
                self.events.append(self._queue.get_nowait())
            except queue.Empty:
                return self.events

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=10)


def cli(state_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "unclaw_tui", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        check=check,
        env=env,
        timeout=60,
        cwd=str(REPO_ROOT),
    )


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        yield topo
    finally:
        topo.close()


@dataclass
class GatewaySetup:
    """Client namespace --veth-- gateway namespace, the gateway's state dir prepared."""

    topo: Topology
    client_ns: Namespace
    gateway_ns: Namespace
    state_dir: Path
    gateway_addr: str = "192.168.77.1"
    port: int = 51820
    gateways: list[GatewayProcess] = field(default_factory=list)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(self.state_dir, *args, check=check)

    def add_peer(self, name: str) -> str:
        return self.cli(
            "--endpoint",
            f"{self.gateway_addr}:{self.port}",
            "--listen-port",
            str(self.port),
            "peer",
            "add",
            name,
        ).stdout

    def start_gateway(
        self,
        *args: str,
        drop_caps: bool = False,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> GatewayProcess:
        gw = GatewayProcess(
            self.topo,
            self.gateway_ns,
            self.state_dir,
            "--listen-port",
            str(self.port),
            *args,
            drop_caps=drop_caps,
            env=env,
            nofile=nofile,
        )
        gw.wait_event(lambda e: e["type"] == "gateway_started", 20, "gateway_started")
        self.gateways.append(gw)
        return gw


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def thread_in_namespace(name: str) -> Iterator[None]:
    """Move the calling thread into a named network namespace, and back afterwards.

    Sockets the thread creates meanwhile stay in that namespace: an in-process gateway (and
    the Textual app around it) can run inside a namespace the test made.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
        yield
    finally:
        libc.setns(home, CLONE_NEWNET)
        os.close(home)
        os.close(target)


# --- three namespaces for flow tests and benches: client -> gateway -> 'internet' --------------

INTERNET_NET = "198.18.0.0/24"  # RFC 2544 benchmarking range: exists only in our namespaces
GATEWAY_INET_ADDR = "198.18.0.1"  # the gateway host's own address on the internet side
HOST_ADDR = "198.18.0.2"  # the test host running the servers
METADATA_ADDR = "169.254.169.254"  # a stand-in cloud metadata address, also on the test host
TUNNEL_NET = "10.77.0.0/24"


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def replace_endpoint(config_text: str, endpoint: str) -> str:
    """A client config whose [Peer] Endpoint is `endpoint` (to put a relay on the path)."""
    lines = [
        f"Endpoint = {endpoint}" if line.split("=", 1)[0].strip().lower() == "endpoint" else line
        for line in config_text.splitlines()
    ]
    return "\n".join(lines) + "\n"


def wait_ready(proc: subprocess.Popen[str], timeout: float, what: str) -> str:
    """Wait for a child's first stdout line starting with 'ready'; returns that line."""
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"{what} not ready within {timeout}s") from None
    if not line.startswith("ready"):
        proc.poll()
        raise AssertionError(f"{what} failed to start (exit {proc.returncode}): {line!r}")
    return line.strip()


def module_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class FlowsSetup(GatewaySetup):
    """GatewaySetup plus an 'internet' namespace behind the gateway with test servers.

    client ns 192.168.77.2 --veth-- 192.168.77.1 gateway ns 198.18.0.1 --veth-- 198.18.0.2
    internet ns (also 169.254.169.254).  The gateway namespace routes to the internet over its
    veth; the internet namespace routes the tunnel net back through the gateway namespace (only
    a kernel-forwarding reference gateway needs that).  Clients made by `client()` route the
    internet net (and the metadata address) through their WireGuard interface.
    """

    internet_ns: Namespace | None = None

    @property
    def internet(self) -> Namespace:
        assert self.internet_ns is not None
        return self.internet_ns

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}

    def start_host(self, kind: str, port: int, *args: str) -> subprocess.Popen[str]:
        """A tests.interop.hosts server on the test host, running once it said 'ready'."""
        return self.start_server_in(self.internet, kind, port, *args)

    def start_server_in(
        self, ns: Namespace, kind: str, port: int, *args: str
    ) -> subprocess.Popen[str]:
        """The same servers in another namespace (e.g. on the gateway host's loopback)."""
        return self.start_module_in(
            ns, "tests.interop.hosts", kind, "--port", str(port), *args,
            what=f"{kind} server in {ns.name}",
        )  # fmt: skip

    def start_dns_host(self) -> subprocess.Popen[str]:
        """The authoritative test zone (tests.interop.dns_host) on the test host, port 53."""
        return self.start_module_in(
            self.internet, "tests.interop.dns_host", "--port", "53", "--a", HOST_ADDR,
            what="dns host",
        )  # fmt: skip

    def start_module_in(
        self, ns: Namespace, module: str, *args: str, what: str
    ) -> subprocess.Popen[str]:
        """`python -m module args` in a namespace, once it printed 'ready'."""
        proc = self.topo.spawn(
            ns,
            *module_cmd(module, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env(),
            cwd=str(REPO_ROOT),
        )
        wait_ready(proc, 20, what)
        return proc

    def client(
        self,
        config_text: str,
        address: str = "10.77.0.2/32",
        endpoint: str | None = None,
        extra_routes: tuple[str, ...] = (),
    ) -> WgClient:
        """A wireguard-go client routing the tunnel net, the internet net and the metadata
        address through the tunnel; `endpoint` overrides the config's (e.g. a relay)."""
        if endpoint is not None:
            config_text = replace_endpoint(config_text, endpoint)
        return self.topo.wg_client(
            self.client_ns,
            config_text,
            address,
            routes=(TUNNEL_NET, INTERNET_NET, f"{METADATA_ADDR}/32", *extra_routes),
        )

    def start_impair(self, *args: str, listen_port: int = 51999) -> subprocess.Popen[str]:
        """The UDP impairment relay in the client namespace, in front of the gateway.
        Point a client at `127.0.0.1:<listen_port>`."""
        proc = self.topo.spawn(
            self.client_ns,
            *module_cmd(
                "tests.interop.impair",
                "--listen",
                f"127.0.0.1:{listen_port}",
                "--to",
                f"{self.gateway_addr}:{self.port}",
                "--max-seconds",
                "900",
                *args,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env(),
            cwd=str(REPO_ROOT),
        )
        wait_ready(proc, 20, "impairment relay")
        return proc

    def run_client(self, kind: str, *args: str, timeout: float = 60) -> dict[str, Any]:
        """A tests.interop.hosts client in the client namespace; its JSON result."""
        try:
            res = subprocess.run(
                self.client_ns.cmd(*module_cmd("tests.interop.hosts", kind, *args)),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env(),
                cwd=str(REPO_ROOT),
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"client {kind} {args} still running after {timeout}s") from None
        if res.returncode != 0:
            raise AssertionError(f"client {kind} exited {res.returncode}: {res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def curl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """curl in the client namespace (never follows redirects, never retries)."""
        return self.client_ns.run(
            "curl", "--silent", "--show-error", "--noproxy", "*", *args,
            check=False, timeout=timeout,
        )  # fmt: skip


def make_flows_setup(topo: Topology) -> FlowsSetup:
    """Build the three namespaces and their links and routes."""
    client_ns = topo.namespace("c")
    gateway_ns = topo.namespace("g")
    internet_ns = topo.namespace("i")
    topo.link(client_ns, "192.168.77.2/24", gateway_ns, "192.168.77.1/24")
    topo.link(gateway_ns, f"{GATEWAY_INET_ADDR}/24", internet_ns, f"{HOST_ADDR}/24")
    inet_dev = f"vb{topo.tag}{topo._counter}"[:15]
    internet_ns.run("ip", "addr", "add", f"{METADATA_ADDR}/32", "dev", inet_dev)
    gateway_ns.run("ip", "route", "add", f"{METADATA_ADDR}/32", "via", HOST_ADDR)
    internet_ns.run("ip", "route", "add", TUNNEL_NET, "via", GATEWAY_INET_ADDR)
    return FlowsSetup(topo, client_ns, gateway_ns, topo.tmp / "state", internet_ns=internet_ns)


def sockets_to(pid: int, ip: str, port: int, protocol: str = "udp") -> int:
    """Sockets in the network namespace of `pid` whose remote end is ip:port, from
    /proc/<pid>/net/{udp,tcp} (IPv4; a connected UDP socket counts once it has a peer)."""
    packed = socket.inet_aton(ip)
    # The kernel prints the address as the native-endian u32 of its network-order bytes.
    want = f"{int.from_bytes(packed, sys.byteorder):08X}:{port:04X}"
    lines = Path(f"/proc/{pid}/net/{protocol}").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[2] == want)


def run_json(s: FlowsSetup, ns: Namespace, module: str, *args: str, timeout: float = 90) -> Any:
    """Run a test module's command in a namespace; its last stdout line, parsed as JSON."""
    res = subprocess.run(
        ns.cmd(*module_cmd(module, *args)),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=s.env(),
        cwd=str(REPO_ROOT),
    )
    assert res.returncode == 0, f"{module} {args} exited {res.returncode}: {res.stderr[-2000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])
