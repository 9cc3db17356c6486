"""TCP bulk throughput through our gateway and through the reference gateway (iperf3).

    python -m bench.throughput            # 3 rounds x 10 s, up/down, 1 and 4 streams (~5 min)
    python -m bench.throughput --rounds 1 --seconds 3      # a quick look

Needs root, wireguard-go, wg and iperf3.  A one-off iperf3 server per run on the test host;
the client in the client namespace binds the source address that selects the path (see
bench.common).  Rounds alternate ours and the reference (the order flips every round), and
the medians, the ratio ours / reference, the gateways' CPU seconds per GiB moved and their
peak RSS (VmHWM) are printed and written to bench/results/throughput.md.
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
    Figure,
    GatewayPath,
    Sample,
    Summary,
    bench_env,
    figures_table,
    machine_description,
    markdown_table,
    save_figures,
    summarise,
)
from tests.interop.harness import HOST_ADDR

PART = "throughput"
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
    for attempt in range(3):
        # A fresh one-off server per run: a server left busy by an earlier test (seen under
        # load) cannot block the runs after it.
        server = env.setup.topo.spawn(
            env.setup.internet, "iperf3", "--server", "--one-off", "--port", str(IPERF_PORT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.3)
        cpu_before = path.cpu()
        try:
            res = subprocess.run(
                env.setup.client_ns.cmd(*cmd), capture_output=True, text=True, timeout=seconds + 30
            )
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
            return Sample(scenario, path.name, 0.0, error="iperf3 timed out")
        cpu = path.cpu() - cpu_before
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
        try:
            report = json.loads(res.stdout)
        except json.JSONDecodeError:
            return Sample(scenario, path.name, 0.0, error=f"iperf3: {res.stderr.strip()[:200]}")
        # The server may still be closing the previous test: wait and try again (bounded).
        if "busy" in str(report.get("error", "")) and attempt < 2:
            time.sleep(1.0)
            continue
        break
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


def measure(env: BenchEnv, rounds: int, seconds: int, streams: list[int]) -> list[Sample]:
    samples: list[Sample] = []
    for round_no in range(rounds):
        order = env.paths if round_no % 2 == 0 else env.paths[::-1]
        for reverse in (False, True):
            for n in streams:
                for path in order:
                    sample = run_iperf(env, path, seconds, n, reverse)
                    samples.append(sample)
                    figure = sample.error or f"{sample.value:8.1f} Mbit/s"
                    print(
                        f"round {round_no + 1}/{rounds} {sample.scenario:<20} "
                        f"{path.name:<9} {figure}",
                        flush=True,
                    )
    return samples


def figures_from(summaries: list[Summary], peak_rss: dict[str, int]) -> list[Figure]:
    figures: list[Figure] = []
    for s in summaries:
        f = Figure(PART, f"throughput {s.scenario}", "Mbit/s", s.ours, s.reference,
                   target=">= 1.0x reference")  # fmt: skip
        f.met = None if f.ratio is None else f.ratio >= 1.0
        figures.append(f)
    for s in summaries:
        f = Figure(PART, f"gateway CPU per GiB, {s.scenario}", "s/GiB", s.ours_cpu_per_gib,
                   s.reference_cpu_per_gib, target="<= reference")  # fmt: skip
        if f.ours is not None and f.reference is not None:
            f.met = f.ours <= f.reference
        figures.append(f)
    figures.append(
        Figure(
            PART,
            "gateway peak RSS (VmHWM) after the bulk runs",
            "MiB",
            peak_rss["ours"] / 1024,
            peak_rss["reference"] / 1024,
        )
    )
    return figures


def run(rounds: int = 3, seconds: int = 10, streams_text: str = "1,4") -> list[Figure]:
    streams = [int(n) for n in streams_text.split(",")]
    with bench_env() as env:
        samples = measure(env, rounds, seconds, streams)
        peak_rss = {p.name: p.peak_rss_kib() for p in env.paths}
    summaries = summarise(samples, "Mbit/s")
    table = markdown_table(summaries)
    figures = figures_from(summaries, peak_rss)
    rounds_text = "\n".join(
        f"- {s.scenario}: ours {[round(v) for v in s.ours_values]}, "
        f"reference {[round(v) for v in s.reference_values]}"
        + (f"; errors: {s.errors}" if s.errors else "")
        for s in summaries
    )
    report = (
        "# TCP throughput: unclaw-tui against wireguard-go with kernel forwarding\n\n"
        f"`python -m bench.throughput --rounds {rounds} --seconds {seconds} "
        f"--streams {streams_text}` on {machine_description()}.\n\n"
        "Medians over the rounds (iperf3 receiver figures); CPU is the gateway process's "
        "user + system time per GiB moved (the reference's kernel forwarding runs in softirq "
        "and is not in its figure).\n\n"
        f"{table}\n\nPer round (Mbit/s):\n\n{rounds_text}\n\n"
        f"Peak RSS (VmHWM): ours {peak_rss['ours'] // 1024} MiB, reference wireguard-go "
        f"{peak_rss['reference'] // 1024} MiB.\n\n"
        f"{figures_table(figures)}\n"
    )
    save_figures(PART, figures, report)
    print()
    print(table)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="per iperf3 run")
    parser.add_argument("--streams", default="1,4", help="comma-separated stream counts")
    args = parser.parse_args(argv)
    run(args.rounds, args.seconds, args.streams)
    print(f"\nwritten to {RESULTS_DIR / (PART + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
