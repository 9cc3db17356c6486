"""HTTP/2 through our gateway: intercepted vs passed through vs intercepted HTTP/1.1, and the
gateway's memory per open HTTP/2 stream.

    python -m bench.h2                   # 3 rounds x 5 s per case, then the memory run (~3 min)
    python -m bench.h2 --rounds 1 --seconds 2 --streams 20

Load: `h2load` in the client namespace, through wireguard-go and our gateway, to origins on
the test host, certificates from the test CA (tests.helpers.make_pki), which our gateway
trusts through SSL_CERT_FILE; it runs with `--passthrough auto.test`:

- h2 intercepted: https://example.test/1k, ALPN h2 both sides: our H2Relay carries it;
- h2 passthrough: https://auto.test/1k, the same origin (nghttpd), the TLS relayed untouched;
- h1 intercepted: h2load --h1 to https://example.test:8443/1k, an HTTP/1.1 keep-alive origin
  (`h1-server` below: nghttpd speaks no HTTP/1.1), and h1 passthrough to it for its scale.

h2load keeps `--clients` connections with `--streams` requests in flight on each (HTTP/1.1:
the same number in flight as connections, one each); requests/s from its summary, p99 from
its per-request log. Targets (issue 15): intercepted h2 >= 0.8x passthrough and >= 1.0x
intercepted HTTP/1.1 in requests/s.

Memory: `hold-client` opens 100 HTTP/2 connections with 100 streams each (GET, no body) to
`hold-server`, which never answers; once the origin sees all of them open, the gateway's RSS
growth over its RSS before, per open stream. No DATA moves, so no flow-control window is
filled: the figure is what an open stream costs beyond its windows. Target: <= 16 KiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BenchEnv,
    Figure,
    bench_env,
    bench_env_vars,
    figures_table,
    machine_description,
    median,
    raise_nofile,
    save_figures,
)
from tests.helpers import make_pki
from tests.interop.harness import HOST_ADDR, module_cmd, wait_ready

PART = "h2"
H2_PORT = 443
H1_PORT = 8443
INTERCEPT_HOST = "example.test"  # the test leaf's names (tests.helpers)
PASS_HOST = "auto.test"
BODY = b"x" * 1024
H1_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nContent-Type: text/plain\r\n\r\n" + BODY


# --- the tools (run in the namespaces as `python -m bench.h2 <tool>`) --------------------------


def _loop_policy() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _server_ctx(cert: str, key: str, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(alpn)
    return ctx


class _H1(asyncio.Protocol):
    """HTTP/1.1 keep-alive: 1 KiB per request head, in order."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 65536:
            self.transport.close()
            return
        out = []
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            self.buf = self.buf[end + 4 :]
            out.append(H1_RESPONSE)
        if out:
            self.transport.write(b"".join(out))


async def h1_server(port: int, cert: str, key: str) -> None:
    loop = asyncio.get_running_loop()
    ctx = _server_ctx(cert, key, ["http/1.1"])
    server = await loop.create_server(_H1, "0.0.0.0", port, ssl=ctx, backlog=1024)
    print("ready", flush=True)
    async with server:
        await asyncio.Future()


class _Hold(asyncio.Protocol):
    """HTTP/2 that takes every stream and never answers; counts the open ones."""

    open_streams = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.settings import SettingCodes

        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.conn = H2Connection(H2Configuration(client_side=False))
        self.conn.local_settings.update({SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        self.conn.initiate_connection()
        self.mine = 0
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events as h2e
        from h2.exceptions import H2Error

        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self.transport.close()
            return
        for event in events:
            if isinstance(event, h2e.RequestReceived):
                self.mine += 1
                _Hold.open_streams += 1
        self.transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        _Hold.open_streams -= self.mine


async def hold_server(port: int, cert: str, key: str, count_file: str) -> None:
    loop = asyncio.get_running_loop()
    ctx = _server_ctx(cert, key, ["h2"])
    server = await loop.create_server(_Hold, "0.0.0.0", port, ssl=ctx, backlog=1024)
    print("ready", flush=True)
    async with server:
        while True:
            Path(count_file).write_text(str(_Hold.open_streams))
            await asyncio.sleep(0.2)


def hold_client(addr: str, port: int, conns: int, streams: int) -> None:
    """`conns` HTTP/2 connections, `streams` GETs open on each; then held until killed."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a load tool: the gateway's certificate is not the point
    ctx.set_alpn_protocols(["h2"])
    held = []
    headers = [(":method", "GET"), (":scheme", "https"), (":authority", INTERCEPT_HOST),
               (":path", "/held")]  # fmt: skip
    for _ in range(conns):
        sock = ctx.wrap_socket(
            socket.create_connection((addr, port), timeout=20), server_hostname=INTERCEPT_HOST
        )
        conn = H2Connection(H2Configuration(client_side=True))
        conn.initiate_connection()
        for i in range(streams):
            conn.send_headers(1 + 2 * i, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        held.append((sock, conn))
    print("ready", flush=True)
    while True:  # answer the gateway's SETTINGS and PINGs, so it keeps the connections
        for sock, conn in held:
            sock.settimeout(0.05)
            with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
                data = sock.recv(65536)
                if data:
                    conn.receive_data(data)
                    if out := conn.data_to_send():
                        sock.sendall(out)
        time.sleep(0.5)


# --- the bench ---------------------------------------------------------------------------------


def _h2load(env: BenchEnv, url: str, seconds: float, clients: int, streams: int, h1: bool,
            log: Path) -> dict[str, Any]:  # fmt: skip
    port = url.rsplit(":", 1)[-1].split("/")[0] if url.count(":") > 1 else "443"
    args = [
        "h2load", "--connect-to", f"{HOST_ADDR}:{port}", "-D", str(max(1, round(seconds))),
        "--warm-up-time", "1", "-t", "1", f"--log-file={log}",
    ]  # fmt: skip
    if h1:  # as many requests in flight as h2's streams: a connection each
        args += ["--h1", "-c", str(clients * streams), "-m", "1"]
    else:
        args += ["-c", str(clients), "-m", str(streams)]
    try:
        res = env.setup.client_ns.run(*args, url, check=False, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        return {"error": "h2load did not finish"}
    out = res.stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored", out)  # fmt: skip
    if rate is None or counts is None:
        return {"error": f"h2load said: {(out + res.stderr).strip()[-300:]}"}
    latencies = []
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "200":
                latencies.append(int(parts[2]) / 1000)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None
    return {"rate": float(rate.group(1)), "succeeded": int(counts.group(3)),
            "failed": int(counts.group(4)) + int(counts.group(5)), "p99_ms": p99}  # fmt: skip


def measure(env: BenchEnv, rounds: int, seconds: float, clients: int, streams: int,
            tmp: Path) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    cases = {
        "h2 intercepted": (f"https://{INTERCEPT_HOST}/1k", False),
        "h2 passthrough": (f"https://{PASS_HOST}/1k", False),
        "h1 intercepted": (f"https://{INTERCEPT_HOST}:{H1_PORT}/1k", True),
        "h1 passthrough": (f"https://{PASS_HOST}:{H1_PORT}/1k", True),
    }
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for round_no in range(rounds):
        order = list(cases) if round_no % 2 == 0 else list(cases)[::-1]
        for name in order:
            url, h1 = cases[name]
            out = _h2load(env, url, seconds, clients, streams, h1, tmp / "h2load.log")
            rows[name].append(out)
            figure = out.get("error") or (
                f"{out['rate']:8.1f} req/s  p99 {out['p99_ms']} ms  failed {out['failed']}"
            )
            print(f"round {round_no + 1} {name:<15} {figure}", flush=True)
    return rows


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure_memory(env: BenchEnv, conns: int, streams: int, count_file: Path) -> dict[str, Any]:
    pid = env.ours.gateway_pid
    before = _rss_kib(pid)
    proc = env.setup.topo.spawn(
        env.setup.client_ns, *module_cmd("bench.h2", "hold-client", HOST_ADDR, str(H2_PORT),
                                         "--conns", str(conns), "--streams", str(streams)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bench_env_vars(),
    )  # fmt: skip
    try:
        wait_ready(proc, 120, "hold-client")
        want = conns * streams
        deadline = time.monotonic() + 60
        seen = 0
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                seen = int(count_file.read_text())
            if seen >= want:
                break
            time.sleep(0.2)
        time.sleep(1.0)  # the gateway's allocations settle (its own SETTINGS/acks)
        after = _rss_kib(pid)
    finally:
        proc.kill()
        proc.wait()
    return {"streams": seen, "rss_before_kib": before, "rss_after_kib": after,
            "per_stream_kib": (after - before) / seen if seen else None}  # fmt: skip


def run(rounds: int = 3, seconds: float = 5, clients: int = 4, streams: int = 10,
        mem_conns: int = 100, mem_streams: int = 100) -> list[Figure]:  # fmt: skip
    header = (
        "# HTTP/2 through our gateway: intercepted vs passed through vs HTTP/1.1\n\n"
        f"`python -m bench.h2 --rounds {rounds} --seconds {seconds} --clients {clients} "
        f"--streams {streams}` on {machine_description()}.\n\n"
    )
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix="unclaw-bench-h2-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)
        pki = make_pki(tmp / "pki")
        cert, key = (str(p) for p in pki.trusted)
        docroot = tmp / "htdocs"
        docroot.mkdir()
        (docroot / "1k").write_bytes(BODY)
        docroot.chmod(0o755)
        count_file = tmp / "held"
        with bench_env(
            "--passthrough", PASS_HOST, gateway_env={"SSL_CERT_FILE": str(pki.ca_file)}
        ) as env:
            topo, inet = env.setup.topo, env.setup.internet

            def tool(name: str, port: int, *extra: str) -> subprocess.Popen[str]:
                proc = topo.spawn(
                    inet, *module_cmd("bench.h2", name, "--port", str(port), "--cert", cert,
                                      "--key", key, *extra),
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                    env=bench_env_vars(),
                )  # fmt: skip
                wait_ready(proc, 30, name)
                return proc

            # Memory first, on 443 (a port the gateway intercepts), while the gateway is fresh.
            hold = tool("hold-server", H2_PORT, "--count-file", str(count_file))
            memory = measure_memory(env, mem_conns, mem_streams, count_file)
            print(f"memory: {memory}", flush=True)
            hold.kill()
            hold.wait()
            topo.spawn(inet, "nghttpd", "-d", str(docroot), str(H2_PORT), key, cert,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            tool("h1-server", H1_PORT)
            deadline = time.monotonic() + 10  # nghttpd prints no ready: wait for its socket
            while time.monotonic() < deadline:
                ss = inet.run("ss", "-ltnH", f"sport = :{H2_PORT}", check=False)
                if ss.stdout.strip():
                    break
                time.sleep(0.1)
            rows = measure(env, rounds, seconds, clients, streams, tmp)

    def m(name: str, k: str) -> float | None:
        return median([r[k] for r in rows[name] if "error" not in r and r.get(k) is not None])

    h2i, h2p, h1i = (
        m("h2 intercepted", "rate"),
        m("h2 passthrough", "rate"),
        m("h1 intercepted", "rate"),
    )
    per_stream = memory["per_stream_kib"]
    figures = [
        Figure(PART, "HTTP/2 requests/s, intercepted", "req/s", h2i, h2p,
               reference_label="passthrough", target=">= 0.8x",
               met=None if not (h2i and h2p) else h2i >= 0.8 * h2p),
        Figure(PART, "HTTP/2 requests/s, intercepted vs HTTP/1.1 intercepted", "req/s", h2i, h1i,
               reference_label="HTTP/1.1 intercepted", target=">= 1.0x",
               met=None if not (h2i and h1i) else h2i >= h1i),
        Figure(PART, "HTTP/2 p99, intercepted", "ms", m("h2 intercepted", "p99_ms"),
               m("h2 passthrough", "p99_ms"), reference_label="passthrough"),
        Figure(PART, "HTTP/1.1 requests/s, intercepted", "req/s", h1i,
               m("h1 passthrough", "rate"), reference_label="passthrough"),
        Figure(PART, "HTTP/1.1 p99, intercepted", "ms", m("h1 intercepted", "p99_ms"),
               m("h1 passthrough", "p99_ms"), reference_label="passthrough"),
        Figure(PART, f"gateway memory per open HTTP/2 stream ({memory['streams']} open)", "KiB",
               per_stream, target="<= 16 KiB",
               met=None if per_stream is None else per_stream <= 16),
    ]  # fmt: skip
    per_round = "\n".join(
        f"- {name}: " + ", ".join(
            r.get("error") or f"{r['rate']:.0f} req/s, p99 {r['p99_ms']} ms, failed {r['failed']}"
            for r in rs)
        for name, rs in rows.items()
    )  # fmt: skip
    report = (
        header + f"{clients} connections x {streams} streams in flight (HTTP/1.1: "
        f"{clients * streams} connections, one request each in flight), 1 KiB responses, "
        f"{seconds} s per case after 1 s of warm-up, medians over the rounds. The HTTP/2 origin "
        "is nghttpd; the HTTP/1.1 origin is a Python (uvloop) keep-alive server, as nghttpd "
        "speaks no HTTP/1.1: the HTTP/1.1 passthrough row shows its scale.\n\n"
        f"{figures_table(figures)}\n\nPer round:\n\n{per_round}\n\n"
        f"Memory: {memory['streams']} streams held open on {mem_conns} connections; gateway RSS "
        f"{memory['rss_before_kib']} KiB before, {memory['rss_after_kib']} KiB with them open.\n"
    )
    save_figures(PART, figures, report)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.h2", description=__doc__)
    sub = parser.add_subparsers(dest="tool")
    for name in ("h1-server", "hold-server"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        if name == "hold-server":
            p.add_argument("--count-file", required=True)
    c = sub.add_parser("hold-client")
    c.add_argument("addr")
    c.add_argument("port", type=int)
    c.add_argument("--conns", type=int, default=100)
    c.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=10)
    args = parser.parse_args(argv)
    if args.tool == "h1-server":
        _loop_policy()
        asyncio.run(h1_server(args.port, args.cert, args.key))
    elif args.tool == "hold-server":
        _loop_policy()
        asyncio.run(hold_server(args.port, args.cert, args.key, args.count_file))
    elif args.tool == "hold-client":
        hold_client(args.addr, args.port, args.conns, args.streams)
    else:
        run(args.rounds, args.seconds, args.clients, args.streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
