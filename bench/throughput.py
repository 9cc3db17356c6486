"""TCP bulk throughput through our gateway and through the reference gateway (iperf3).

    python -m bench.throughput            # 3 rounds x 10 s, up/down, 1 and 4 streams (~5 min)
    python -m bench.throughput --rounds 1 --seconds 3      # a quick look

Needs root, wireguard-go, wg and iperf3.  The iperf3 server runs in the test-host namespace;
the client in the client namespace binds the source address that selects the path (see
bench.common).  Rounds alternate ours and the reference (the order flips every round), and
the medians, the ratio ours / reference and the gateways' CPU seconds per GiB moved are
printed and written to bench/results/throughput.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import (
    RESULTS_DIR,
    BenchEnv,
    GatewayPath,
    Sample,
    bench_env,
    machine_description,
    markdown_table,
    summarise,
)
from tests.interop.harness import HOST_ADDR

IPERF_PORT = 5201


def scenario_name(reverse: bool, streams: int) -> str:
    direction = "download" if reverse else "upload"
    return f"{direction}, {streams} stream{'s' if streams > 1 else ''}"


def run_iperf(
    env: BenchEnv, path: GatewayPath, seconds: int, streams: int, reverse: bool
) -> Sample:
    scenario = scenario_name(reverse, streams)
    cmd = [
        "iperf3", "--client", HOST_ADDR, "--port", str(IPERF_PORT), "--bind", path.client_ip,
        "--time", str(seconds), "--parallel", str(streams), "--json", "--connect-timeout", "5000",
        *(["--reverse"] if reverse else []),
    ]  # fmt: skip
    cpu_before = path.cpu()
    try:
        res = subprocess.run(
            env.setup.client_ns.cmd(*cmd), capture_output=True, text=True, timeout=seconds + 30
        )
    except subprocess.TimeoutExpired:
        return Sample(scenario, path.name, 0.0, error="iperf3 timed out")
    cpu = path.cpu() - cpu_before
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        return Sample(scenario, path.name, 0.0, error=f"iperf3: {res.stderr.strip()[:200]}")
    if "error" in report:
        return Sample(scenario, path.name, 0.0, error=str(report["error"])[:200])
    received = report["end"]["sum_received"]
    return Sample(
        scenario,
        path.name,
        received["bits_per_second"] / 1e6,
        bytes_moved=int(received["bytes"]),
        cpu_seconds=cpu,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="per iperf3 run")
    parser.add_argument("--streams", default="1,4", help="comma-separated stream counts")
    parser.add_argument(
        "--output", default=str(RESULTS_DIR / "throughput.md"), help="Markdown result file"
    )
    args = parser.parse_args(argv)
    streams = [int(n) for n in args.streams.split(",")]
    samples: list[Sample] = []
    with bench_env() as env:
        server = env.setup.topo.spawn(
            env.setup.internet,
            "iperf3", "--server", "--port", str(IPERF_PORT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        if server.poll() is not None:
            raise SystemExit("iperf3 server did not start")
        for round_no in range(args.rounds):
            order = env.paths if round_no % 2 == 0 else env.paths[::-1]
            for reverse in (False, True):
                for n in streams:
                    for path in order:
                        sample = run_iperf(env, path, args.seconds, n, reverse)
                        samples.append(sample)
                        figure = sample.error or f"{sample.value:8.1f} Mbit/s"
                        print(
                            f"round {round_no + 1}/{args.rounds} {sample.scenario:<20} "
                            f"{path.name:<9} {figure}",
                            flush=True,
                        )
        peak_rss = env.ours.rss_kib()
    summaries = summarise(samples, "Mbit/s")
    table = markdown_table(summaries)
    rounds = "\n".join(
        f"- {s.scenario}: ours {[round(v) for v in s.ours_values]}, "
        f"reference {[round(v) for v in s.reference_values]}"
        + (f"; errors: {s.errors}" if s.errors else "")
        for s in summaries
    )
    report = (
        "# TCP throughput: unclaw-tui against wireguard-go with kernel forwarding\n\n"
        f"`python -m bench.throughput --rounds {args.rounds} --seconds {args.seconds} "
        f"--streams {args.streams}` on {machine_description()}.\n\n"
        "Medians over the rounds (iperf3 receiver figures); CPU is the gateway process's "
        "user + system time per GiB moved (the reference's kernel forwarding runs in softirq "
        "and is not in its figure).\n\n"
        f"{table}\n\nPer round (Mbit/s):\n\n{rounds}\n\n"
        f"Our gateway's RSS at the end: {peak_rss // 1024} MiB.\n"
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as out:
        out.write(report)
    print()
    print(table)
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
