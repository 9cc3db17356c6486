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
import os
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
        from tests.helpers import FakeClock
        from tests.tui.fake_gateway import demo_gateway

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
    """Real wireguard-go peers in namespaces: one browses (DNS, HTTP, HTTPS through the
    interception CA) a test host behind the gateway, one pings; the real gateway's console
    is shot meanwhile."""
    from tests.interop.harness import HOST_ADDR, make_flows_setup, thread_in_namespace, topology
    from tests.interop.test_tls import TRUSTED_PORT, start_tls_host
    from tests.interop.tls_host import make_pki
    from unclaw_tui.gateway import Gateway

    with topology() as topo:
        s = make_flows_setup(topo)
        s.start_host("http", 80)
        s.start_dns_host()
        pki = make_pki(topo.tmp / "pki")
        start_tls_host(s, TRUSTED_PORT, pki.trusted)
        s.client(s.add_peer("phone"), extra_routes=("10.78.0.0/16",))
        other = topo.namespace("d")
        topo.link(other, "192.168.78.2/24", s.gateway_ns, "192.168.78.1/24")
        other.run("ip", "route", "add", "default", "via", "192.168.78.1")
        topo.wg_client(other, s.add_peer("laptop"), "10.77.0.3/32")
        ca_path = s.cli("ca", "--path").stdout.strip()
        browse = (
            f"end=$((SECONDS+{int(wait) + 20})); while [ $SECONDS -lt $end ]; do "
            "for name in example.test www.example.test; do "
            "vip=$(dig +short +time=2 +tries=1 @10.77.0.1 $name A | head -1); "
            '[ -n "$vip" ] || continue; '
            "curl -s -o /dev/null --max-time 5 --resolve $name:80:$vip http://$name/hello; "
            f"curl -s -o /dev/null --max-time 5 --cacert {ca_path} "
            "--resolve $name:443:$vip https://$name/; done; sleep 0.5; done"
        )
        with thread_in_namespace(s.gateway_ns.name):
            os.environ["SSL_CERT_FILE"] = str(pki.ca_file)  # trust the test origin upstream
            settings = config.Settings(
                state_dir=s.state_dir,
                endpoint=f"{s.gateway_addr}:{s.port}",
                upstream_dns=[(HOST_ADDR, 53)],
            )
            app = UnclawApp(Gateway(settings), state_dir=s.state_dir)
            procs = [
                await asyncio.create_subprocess_exec(
                    *s.client_ns.cmd("bash", "-c", browse),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                ),
                await asyncio.create_subprocess_exec(
                    *other.cmd("ping", "-n", "-q", "-i", "0.2", "-s", "1100",
                               "-w", str(int(wait) + 15), "10.77.0.1"),
                    stdout=asyncio.subprocess.DEVNULL,
                ),
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
