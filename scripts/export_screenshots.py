"""Write SVG screenshots of the console into screenshots/ (main, add-peer, QR, help).

    python scripts/export_screenshots.py --live                        # real peers (root)
    python scripts/export_screenshots.py --state-dir DIR [--wait 20]   # a real gateway
    python scripts/export_screenshots.py --demo                        # simulated traffic

With --live (needs root, wireguard-go and wg) the script builds network namespaces, connects
two real wireguard-go clients that keep pinging the gateway, and shoots the real gateway's
console with that live traffic; everything it made is removed afterwards.
With --state-dir the real gateway runs (same settings as `unclaw-tui`); connect a client and
make some traffic during the --wait seconds, and the screenshots show it. --demo runs the
test suite's FakeGateway with generated live traffic instead. Screens are taken headless at
120x40 (dark and light themes for the main screen), modelled on Harlequin's script.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the package and tests/ import from here

from unclaw_tui import config  # noqa: E402
from unclaw_tui import events as ev  # noqa: E402
from unclaw_tui.app import UnclawApp  # noqa: E402

SIZE = (120, 40)


async def demo_traffic(gateway: Any, stop: asyncio.Event) -> None:
    """Grow the demo peers' counters and publish flows and DNS queries, like live use."""
    rng = random.Random(7)
    hosts = ["api.example.com", "cdn.example.net", "mail.example.org", "git.internal"]
    conn_id = 100
    while not stop.is_set():
        now = time.time()
        for name, scale in (("phone", 40_000), ("laptop", 300_000)):
            peer = gateway.peers.get(name)
            if peer is None:
                continue
            gateway.set_peer(
                name,
                rx_bytes=peer.rx_bytes + rng.randint(0, scale) // 4,
                tx_bytes=peer.tx_bytes + rng.randint(0, scale),
                last_handshake=now - rng.randint(1, 20),
            )
            peer = gateway.peers[name]
            host = rng.choice(hosts)
            conn_id += 1
            who = {"peer": name, "peer_public_key": peer.public_key, "peer_ip": peer.ip}
            gateway.publish(
                ev.DnsQuery(peer=name, peer_ip=peer.ip, qname=host + ".", qtype="A",
                            answers=[f"10.78.0.{hosts.index(host) + 2}"],
                            upstream_ms=round(rng.uniform(4, 40), 1), cached=rng.random() < 0.3)
            )  # fmt: skip
            gateway.publish(
                ev.TcpOpened(conn_id=conn_id, **who, dst_ip=f"10.78.0.{hosts.index(host) + 2}",
                             dst_port=443, hostname=host, route="tls")
            )  # fmt: skip
            gateway.publish(ev.TlsHost(peer=name, sni=host, alpn="h2"))
            if conn_id % 3 == 0:
                gateway.publish(
                    ev.TcpClosed(conn_id=conn_id - 2, **who, dst_ip="10.78.0.2", dst_port=443,
                                 hostname=host, route="tls", bytes_up=rng.randint(300, 9000),
                                 bytes_down=rng.randint(2000, 900_000),
                                 duration=rng.uniform(0.5, 9))
                )  # fmt: skip
        await asyncio.sleep(0.4)


async def shoot(app: UnclawApp, out: Path, wait: float, stop: asyncio.Event) -> list[Path]:
    written: list[Path] = []

    def save(name: str) -> None:
        written.append(Path(app.save_screenshot(f"{name}.svg", str(out))))

    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(wait)
        save("main-dark")
        app.theme = "textual-light"
        await pilot.pause(0.5)
        save("main-light")
        app.theme = "textual-dark"
        await pilot.press("question_mark")
        await pilot.pause(0.3)
        save("help")
        await pilot.press("escape", "a", *"new-phone")
        await pilot.pause(0.3)
        save("add-peer")
        await pilot.press("escape")
        if app.dashboard.peers.row_count:
            await pilot.press("enter")  # the first peer's QR screen
            await pilot.pause(0.3)
            save("peer-qr")
            await pilot.press("escape")
        stop.set()
    return written


async def main_async(args: argparse.Namespace) -> list[Path]:
    stop = asyncio.Event()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.demo:
        from tests.tui.fake_gateway import FakeClock, demo_gateway

        class WallClock(FakeClock):
            def __call__(self) -> float:
                return time.time()

        gateway: Any = demo_gateway(WallClock())
        app = UnclawApp(gateway, title_suffix=" (demo)")
        traffic = asyncio.create_task(demo_traffic(gateway, stop))
        try:
            return await shoot(app, out, args.wait, stop)
        finally:
            stop.set()
            await traffic
    from unclaw_tui.gateway import Gateway

    if args.live:
        return await live(out, args.wait, stop)
    settings = config.Settings(state_dir=Path(args.state_dir), listen_port=args.port)
    app = UnclawApp(Gateway(settings), state_dir=settings.state_dir)
    return await shoot(app, out, args.wait, stop)


async def live(out: Path, wait: float, stop: asyncio.Event) -> list[Path]:
    """Two real wireguard-go peers in namespaces, pinging the real gateway while we shoot."""
    from tests.interop.harness import cli, thread_in_namespace, topology
    from unclaw_tui.gateway import Gateway

    with topology() as topo:
        gw_ns = topo.namespace("g")
        state = topo.tmp / "state"
        pingers = []
        for i, name in enumerate(("phone", "laptop")):
            ns = topo.namespace("c" if i == 0 else "d")
            topo.link(ns, f"192.168.{77 + i}.2/24", gw_ns, f"192.168.{77 + i}.1/24")
            ns.run("ip", "route", "add", "default", "via", f"192.168.{77 + i}.1")
            conf = cli(state, "--endpoint", "192.168.77.1:51820", "peer", "add", name).stdout
            topo.wg_client(ns, conf, f"10.77.0.{2 + i}/32")
            pingers.append((ns, i))
        with thread_in_namespace(gw_ns.name):
            settings = config.Settings(state_dir=state, endpoint="192.168.77.1:51820")
            app = UnclawApp(Gateway(settings), state_dir=state)
            procs = [
                await asyncio.create_subprocess_exec(
                    *ns.cmd("ping", "-n", "-q", "-i", "0.2", "-s", str(200 + 900 * i),
                            "-w", str(int(wait) + 15), "10.77.0.1"),
                    stdout=asyncio.subprocess.DEVNULL,
                )
                for ns, i in pingers
            ]  # fmt: skip
            try:
                return await shoot(app, out, wait, stop)
            finally:
                for proc in procs:
                    if proc.returncode is None:
                        proc.kill()
                    await proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--state-dir", help="run the real gateway on this state dir")
    source.add_argument("--demo", action="store_true", help="simulated peers and traffic")
    source.add_argument("--live", action="store_true", help="namespaces + real wireguard-go")
    parser.add_argument("--port", type=int, default=config.DEFAULT_LISTEN_PORT)
    parser.add_argument("--wait", type=float, default=3.0, help="seconds of traffic first")
    parser.add_argument("--out", default=str(ROOT / "screenshots"))
    args = parser.parse_args()
    for path in asyncio.run(main_async(args)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
