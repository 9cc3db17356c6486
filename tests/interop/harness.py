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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        wait_for(lambda: sock.exists(), 10, f"wireguard-go socket {sock}")
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
        self, topo: Topology, ns: Namespace, state_dir: Path, *args: str, drop_caps: bool = False
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
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
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
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
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


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


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

    def start_gateway(self, *args: str, drop_caps: bool = False) -> GatewayProcess:
        gw = GatewayProcess(
            self.topo,
            self.gateway_ns,
            self.state_dir,
            "--listen-port",
            str(self.port),
            *args,
            drop_caps=drop_caps,
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
