"""New TCP connections per second (1 KiB request, 1 KiB response, close), ours vs reference.

    python -m bench.conns                       # 3 rounds x 5 s per path (~1 min)
    python -m bench.conns --rounds 1 --seconds 2

A request/response server (`bench.clients rr-server`) runs on the test host; the client in the
client namespace runs `--concurrency` workers, each opening a new connection per request,
bound to the source address that selects the path.  Rounds alternate the paths; medians of the
rate and of each round's p50/p99 latency (connect start to the last response byte) are
reported with the ratio ours / reference, and our gateway's CPU per 1,000 connections.
"""

from __future__ import annotations

import argparse
import sys

from bench.common import (
    BenchEnv,
    Figure,
    bench_env,
    figures_table,
    fmt,
    machine_description,
    median,
    run_tool,
    save_figures,
    start_tool,
)
from tests.interop.harness import HOST_ADDR

PART = "conns"
RR_PORT = 7000


def measure(env: BenchEnv, rounds: int, seconds: float, concurrency: int) -> dict[str, list]:
    start_tool(env, env.setup.internet, "rr-server", "--port", str(RR_PORT))
    rows: dict[str, list] = {"ours": [], "reference": []}
    for round_no in range(rounds):
        order = env.paths if round_no % 2 == 0 else env.paths[::-1]
        for path in order:
            cpu0 = path.cpu()
            out = run_tool(
                env.setup.client_ns, "rr-client", HOST_ADDR, str(RR_PORT),
                "--bind", path.client_ip, "--seconds", str(seconds),
                "--concurrency", str(concurrency), timeout=seconds + 60,
            )  # fmt: skip
            out["cpu"] = path.cpu() - cpu0
            rows[path.name].append(out)
            if "error" in out:
                print(f"round {round_no + 1} {path.name:<9} error: {out['error']}", flush=True)
            else:
                print(
                    f"round {round_no + 1} {path.name:<9} {out['rate']:7.0f} conn/s  "
                    f"p50 {out['p50_ms']:.2f} ms  p99 {out['p99_ms']:.2f} ms  "
                    f"errors {out['errors']}",
                    flush=True,
                )
    return rows


def _stat(rows: list[dict], key: str) -> float | None:
    return median([r[key] for r in rows if "error" not in r and r.get(key) is not None])


def figures_from(rows: dict[str, list]) -> list[Figure]:
    ours, ref = rows["ours"], rows["reference"]
    rate = Figure(PART, "new TCP connections/s (1 KiB req/resp)", "conn/s",
                  _stat(ours, "rate"), _stat(ref, "rate"), target=">= 1.0x reference")  # fmt: skip
    if rate.ratio is not None:
        rate.met = rate.ratio >= 1.0

    def cpu_per_k(rows: list[dict]) -> float | None:
        return median(
            [1000 * r["cpu"] / r["conns"] for r in rows if "error" not in r and r["conns"]]
        )

    return [
        rate,
        Figure(PART, "connection latency p50", "ms", _stat(ours, "p50_ms"), _stat(ref, "p50_ms")),
        Figure(PART, "connection latency p99", "ms", _stat(ours, "p99_ms"), _stat(ref, "p99_ms")),
        Figure(PART, "gateway CPU per 1,000 connections", "s", cpu_per_k(ours), cpu_per_k(ref)),
    ]


def run(rounds: int = 3, seconds: float = 5, concurrency: int = 8) -> list[Figure]:
    with bench_env() as env:
        rows = measure(env, rounds, seconds, concurrency)
    figures = figures_from(rows)
    per_round = "\n".join(
        f"- {name}: "
        + ", ".join(r.get("error") or f"{r['rate']:.0f}/s p50 {fmt(r['p50_ms'], 2)} ms" for r in rs)
        for name, rs in rows.items()
    )
    report = (
        "# New TCP connections per second: unclaw-tui against wireguard-go + kernel forwarding\n\n"
        f"`python -m bench.conns --rounds {rounds} --seconds {seconds} --concurrency "
        f"{concurrency}` on {machine_description()}.\n\n"
        "Each request opens a new connection through the gateway to the test host, sends 1 KiB, "
        "reads 1 KiB and closes; medians over the rounds.\n\n"
        f"{figures_table(figures)}\n\nPer round:\n\n{per_round}\n"
    )
    save_figures(PART, figures, report)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.conns", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    run(args.rounds, args.seconds, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
