"""Scale: the gateway's RSS and CPU with 1,000 configured peers (some hundreds handshaking) and
with 10,000 idle TCP connections open, ours against the reference where it means something.

    python -m bench.scale                              # ~2 min
    python -m bench.scale --peers 200 --handshakes 50 --conns 1000

Peers: 999 peers are written to our state dir in this process (`StateDir.add_peer`, what
`unclaw-tui peer add` does) while the gateway runs (tunnel net widened to a /22 with
`--address`); it picks them up live.  The reference wireguard-go gets 999 peers too
(`wg addconf`).  Then `--handshakes` of them each send one initiation (built with the
project's `HandshakeCore`, from the client namespace, paced at 100/s) to each gateway; we count
responses and cookie replies, and read each gateway's RSS and CPU before, after adding the
peers, after the handshakes, and its idle CPU over a few seconds.

Idle connections: a test-host server accepts and holds connections without reading.  Our C
stack allows 4,096 connections per peer by default (no CLI flag changes that), so the
connections are spread over 3 peers, each with its own wireguard-go client chosen by source
address; the reference gets all of them from its one client.  RSS and CPU are read while they
are all held; RSS per connection is the whole gateway process's growth (C stack, relay task,
upstream socket and its kernel-side state are not in RSS), divided by the count.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    BenchEnv,
    Figure,
    GatewayPath,
    add_our_client,
    bench_env,
    bench_env_vars,
    figures_table,
    machine_description,
    save_figures,
    start_tool,
)
from tests.interop.harness import HOST_ADDR, REPO_ROOT, module_cmd
from unclaw_tui.state import StateDir

PART = "scale"
HOLD_PORT = 7001
PER_PEER_LIMIT = 4096  # the C stack's default connections per peer
IDLE_SECONDS = 5.0


def idle_cpu(path: GatewayPath, seconds: float = IDLE_SECONDS) -> float:
    """CPU seconds per second the gateway spends while nothing is sent."""
    c0, t0 = path.cpu(), time.monotonic()
    time.sleep(seconds)
    return (path.cpu() - c0) / (time.monotonic() - t0)


def _reference_ifname(env: BenchEnv) -> str:
    # Not `wg show interfaces`: wireguard-go's control sockets are shared by all namespaces.
    return env.reference.gateway_ifname


def add_peers(env: BenchEnv, count: int) -> dict[str, Any]:
    """`count` peers for each gateway; returns the keys the handshake tool needs."""
    import nacl.bindings

    from unclaw_tui.engine.noise import b64

    state = StateDir(env.setup.state_dir)
    network = ipaddress.IPv4Network("10.77.0.0/22")
    gateway_ip = ipaddress.IPv4Address("10.77.0.1")
    ours = []
    for i in range(count):
        record = state.add_peer(f"scale{i}", None, network, gateway_ip)
        ours.append({"private_key": record.private_key, "preshared_key": record.preshared_key})
    ref_peers = []
    lines = []
    for i in range(count):
        private = nacl.bindings.randombytes(32)
        public = nacl.bindings.crypto_scalarmult_base(private)
        ip = f"10.89.{i // 250}.{i % 250 + 1}/32"
        lines.append(f"[Peer]\nPublicKey = {b64(public)}\nAllowedIPs = {ip}\n")
        ref_peers.append({"private_key": b64(private), "preshared_key": b64(bytes(32))})
    conf = env.setup.topo.tmp / "reference-peers.conf"
    conf.write_text("\n".join(lines))
    ifname = _reference_ifname(env)
    env.setup.gateway_ns.run("wg", "addconf", ifname, str(conf), timeout=120)
    ref_key = env.setup.gateway_ns.run("wg", "show", ifname, "public-key").stdout.strip()
    return {
        "ours": {"gateway_public_key": state.identity().public_key, "peers": ours},
        "reference": {"gateway_public_key": ref_key, "peers": ref_peers},
    }


def wait_peers(env: BenchEnv, count: int, timeout: float = 120) -> float:
    """Until our gateway announced `count` more peers; returns the seconds it took."""
    t0 = time.monotonic()
    env.gateway.wait_event(
        lambda e: e["type"] == "peer_added" and e["name"] == f"scale{count - 1}",
        timeout,
        "the last scale peer",
    )
    return time.monotonic() - t0


def handshakes(env: BenchEnv, keys: dict[str, Any], port: int, count: int) -> dict[str, Any]:
    path = env.setup.topo.tmp / f"handshake-keys-{port}.json"
    path.write_text(json.dumps(keys))
    res = subprocess.run(
        env.setup.client_ns.cmd(
            *module_cmd(
                "bench.clients", "handshakes", env.setup.gateway_addr, str(port),
                "--peers", str(path), "--count", str(count), "--rate", "100",
                "--max-seconds", str(count / 100 + 20),
            )
        ),
        capture_output=True, text=True, timeout=count / 100 + 60, env=bench_env_vars(),
        cwd=str(REPO_ROOT),
    )  # fmt: skip
    if res.returncode != 0:
        return {"error": res.stderr[-300:], "responses": 0, "cookie_replies": 0}
    return json.loads(res.stdout.strip().splitlines()[-1])


def peers_scenario(env: BenchEnv, count: int, n_handshakes: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in env.paths:
        out[p.name] = {"rss_base": p.rss_kib(), "idle_cpu_base": idle_cpu(p)}
    t0 = time.monotonic()
    keys = add_peers(env, count)
    out["ours"]["add_seconds"] = time.monotonic() - t0 + wait_peers(env, count)
    for p in env.paths:
        out[p.name]["rss_peers"] = p.rss_kib()
        out[p.name]["idle_cpu_peers"] = idle_cpu(p)
    ports = {"ours": env.setup.port, "reference": 51821}
    for p in env.paths:
        c0 = p.cpu()
        result = handshakes(env, keys[p.name], ports[p.name], n_handshakes)
        out[p.name]["handshake"] = result
        out[p.name]["handshake_cpu"] = p.cpu() - c0
        out[p.name]["rss_handshaken"] = p.rss_kib()
        out[p.name]["idle_cpu_handshaken"] = idle_cpu(p)
        print(f"{p.name}: {n_handshakes} initiations -> {result}", flush=True)
    return out


def _hold(env: BenchEnv, bind: str, count: int) -> subprocess.Popen[str]:
    return env.setup.topo.spawn(
        env.setup.client_ns,
        *module_cmd(
            "bench.clients", "hold-client", HOST_ADDR, str(HOLD_PORT), "--bind", bind,
            "--count", str(count), "--hold", "300", "--concurrency", "100",
        ),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=bench_env_vars(), cwd=str(REPO_ROOT),
    )  # fmt: skip


def _opened(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    from tests.interop.harness import wait_ready

    try:
        line = wait_ready(proc, timeout, "hold-client")
    except AssertionError as exc:
        return {"opened": 0, "errors": {"not ready": str(exc)[:200]}}
    return json.loads(line.removeprefix("ready").strip())


def _release(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.stdin is not None:
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def conns_scenario(env: BenchEnv, count: int) -> dict[str, dict[str, Any]]:
    start_tool(env, env.setup.internet, "hold-server", "--port", str(HOLD_PORT))
    out: dict[str, dict[str, Any]] = {}
    # ours: spread over enough peers to stay under the C stack's per-peer limit
    n_peers = -(-count // PER_PEER_LIMIT)
    binds = [env.ours.client_ip]
    for i in range(1, n_peers):
        ip, _ = add_our_client(env, f"hold{i}", table=200 + i)
        binds.append(ip)
    for p in (env.ours, env.reference):
        p_binds = binds if p is env.ours else [p.client_ip]
        shares = [count // len(p_binds) + (1 if i < count % len(p_binds) else 0)
                  for i in range(len(p_binds))]  # fmt: skip
        rss0, cpu0, t0 = p.rss_kib(), p.cpu(), time.monotonic()
        procs = [_hold(env, b, n) for b, n in zip(p_binds, shares, strict=True)]
        opened = [_opened(proc, 240) for proc in procs]
        open_seconds = time.monotonic() - t0
        total = sum(o["opened"] for o in opened)
        time.sleep(2)  # the last relays settle
        row = {
            "opened": total,
            "errors": [o["errors"] for o in opened if o["errors"]],
            "open_seconds": open_seconds,
            "open_cpu": p.cpu() - cpu0,
            "rss_base": rss0,
            "rss_held": p.rss_kib(),
            "idle_cpu_held": idle_cpu(p),
        }
        _release(procs)
        time.sleep(3)  # closes drain before the next path
        out[p.name] = row
        print(f"{p.name}: {total} connections held: {row}", flush=True)
    return out


def figures_from(peers: dict[str, Any], conns: dict[str, Any], n_peers: int) -> list[Figure]:
    o, r = peers["ours"], peers["reference"]
    oc, rc = conns["ours"], conns["reference"]
    ohs, rhs = o["handshake"], r["handshake"]
    mib = 1 / 1024
    return [
        Figure(PART, f"gateway RSS with {n_peers + 1} peers configured", "MiB",
               o["rss_peers"] * mib, r["rss_peers"] * mib),
        Figure(PART, "gateway RSS growth per configured peer (whole process)", "KiB",
               (o["rss_peers"] - o["rss_base"]) / n_peers,
               (r["rss_peers"] - r["rss_base"]) / n_peers),
        Figure(PART, f"gateway idle CPU with {n_peers + 1} peers", "%",
               100 * o["idle_cpu_peers"], 100 * r["idle_cpu_peers"]),
        Figure(PART, f"handshakes answered of {ohs.get('sent', 0)} initiations", "",
               ohs.get("responses", 0) + ohs.get("cookie_replies", 0),
               rhs.get("responses", 0) + rhs.get("cookie_replies", 0),
               note=f"ours {ohs.get('cookie_replies', 0)} / reference "
                    f"{rhs.get('cookie_replies', 0)} cookie replies"),
        Figure(PART, "gateway CPU per handshake", "ms",
               1000 * o["handshake_cpu"] / max(1, ohs.get("sent", 1)),
               1000 * r["handshake_cpu"] / max(1, rhs.get("sent", 1))),
        Figure(PART, "gateway RSS after the handshakes", "MiB",
               o["rss_handshaken"] * mib, r["rss_handshaken"] * mib),
        Figure(PART, "gateway idle CPU after the handshakes", "%",
               100 * o["idle_cpu_handshaken"], 100 * r["idle_cpu_handshaken"]),
        Figure(PART, "idle TCP connections held", "", oc["opened"], rc["opened"]),
        Figure(PART, "gateway RSS with the connections held", "MiB",
               oc["rss_held"] * mib, rc["rss_held"] * mib),
        Figure(PART, "gateway RSS growth per held connection (whole process)", "KiB",
               (oc["rss_held"] - oc["rss_base"]) / max(1, oc["opened"]),
               (rc["rss_held"] - rc["rss_base"]) / max(1, rc["opened"])),
        Figure(PART, "gateway CPU to open them, per 1,000", "s",
               1000 * oc["open_cpu"] / max(1, oc["opened"]),
               1000 * rc["open_cpu"] / max(1, rc["opened"])),
        Figure(PART, "gateway idle CPU with the connections held", "%",
               100 * oc["idle_cpu_held"], 100 * rc["idle_cpu_held"]),
    ]  # fmt: skip


def run(peers: int = 999, n_handshakes: int = 300, conns: int = 10_000) -> list[Figure]:
    with bench_env("--address", "10.77.0.1/22", keep_events=True) as env:
        peer_rows = peers_scenario(env, peers, n_handshakes)
        conn_rows = conns_scenario(env, conns)
    figures = figures_from(peer_rows, conn_rows, peers)
    report = (
        "# Scale: many peers, many idle connections\n\n"
        f"`python -m bench.scale --peers {peers} --handshakes {n_handshakes} --conns {conns}` "
        f"on {machine_description()}.\n\n"
        "Ours is the whole unclaw-tui process (C core, Python handshakes and relay); the "
        "reference is the wireguard-go process (its kernel forwarding and the kernel's socket "
        "state are in neither figure).  Idle CPU is CPU seconds per second over "
        f"{IDLE_SECONDS:g} s.  The C core's own bytes per connection and per peer are in "
        "cmem.md.\n\n"
        f"{figures_table(figures)}\n\n"
        f"Raw rows:\n\n```\n{json.dumps({'peers': peer_rows, 'conns': conn_rows}, indent=1)}\n"
        "```\n"
    )
    save_figures(PART, figures, report)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--peers", type=int, default=999, help="added to the bench's one")
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--conns", type=int, default=10_000)
    args = parser.parse_args(argv)
    run(args.peers, args.handshakes, args.conns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
