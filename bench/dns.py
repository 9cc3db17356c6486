"""DNS query latency through the tunnel: our DNS service (cached and cold) vs the upstream asked
through the reference gateway.

    python -m bench.dns                  # 3 rounds x 300 queries per case (~1 min)
    python -m bench.dns --rounds 1 --count 50

An upstream resolver (`bench.clients dns-server`: an A record for any name, TTL 300) runs on
the test host; our gateway is started with `--upstream-dns` pointing at it.  The client sends
sequential A queries to the test host's port 53:

- ours, cached: one name again and again (answered from our upstream cache with its VIP);
- ours, cold: a new name every query (one upstream exchange and a new VIP each);
- reference: the same queries through wireguard-go + kernel forwarding, answered by the
  upstream itself -- "querying the upstream directly" through a tunnel;
- gateway host: the upstream asked from the gateway namespace, no tunnel (for scale).

If our gateway has no DNS service (the query goes to the relay or gets no VIP), the part says
so and records no figure.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench.common import (
    BenchEnv,
    Figure,
    bench_env,
    figures_table,
    machine_description,
    median,
    run_tool,
    save_figures,
    start_tool,
)
from tests.interop.harness import GATEWAY_INET_ADDR, HOST_ADDR

PART = "dns"
DNS_PORT = 53
VIP_PREFIX = "10.78."
TARGET_MS = 1.0


def _query(env: BenchEnv, ns_bind: tuple[Any, str], mode: str, count: int) -> dict[str, Any]:
    ns, bind = ns_bind
    return run_tool(
        ns,
        "dns-client",
        HOST_ADDR,
        "--bind",
        bind,
        "--count",
        str(count),
        "--mode",
        mode,
        timeout=count * 3 + 30,
    )


def dns_available(env: BenchEnv) -> str | None:
    """None when our gateway answers DNS itself (a VIP comes back), else why not."""
    out = _query(env, (env.setup.client_ns, env.ours.client_ip), "cold", 3)
    if "error" in out:
        return f"probe failed: {out['error']}"
    if not out["queries"]:
        return "no answer through our gateway (no DNS service: port 53 goes to the relay)"
    if not any(a.startswith(VIP_PREFIX) for a in out["answers"]):
        return f"answers without a VIP ({out['answers']}): no DNS service, the relay answered"
    return None


def measure(env: BenchEnv, rounds: int, count: int) -> dict[str, list[dict[str, Any]]]:
    s = env.setup
    cases = {
        "ours, cached": ((s.client_ns, env.ours.client_ip), "cached"),
        "ours, cold": ((s.client_ns, env.ours.client_ip), "cold"),
        "reference": ((s.client_ns, env.reference.client_ip), "cold"),
        "gateway host, no tunnel": ((s.gateway_ns, GATEWAY_INET_ADDR), "cold"),
    }
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for round_no in range(rounds):
        order = list(cases) if round_no % 2 == 0 else list(cases)[::-1]
        for name in order:
            where, mode = cases[name]
            out = _query(env, where, mode, count)
            rows[name].append(out)
            figure = out.get("error") or (
                f"p50 {out['p50_ms']:.3f} ms  p99 {out['p99_ms']:.3f} ms  "
                f"({out['queries']} answered, {out['lost']} lost)"
            )
            print(f"round {round_no + 1} {name:<24} {figure}", flush=True)
    return rows


def _p(rows: list[dict[str, Any]], key: str) -> float | None:
    return median([r[key] for r in rows if "error" not in r and r.get(key) is not None])


def figures_from(rows: dict[str, list[dict[str, Any]]]) -> list[Figure]:
    ref50 = _p(rows["reference"], "p50_ms")
    figures = []
    for case in ("ours, cached", "ours, cold"):
        ours50 = _p(rows[case], "p50_ms")
        added = None if ours50 is None or ref50 is None else ours50 - ref50
        f = Figure(
            PART,
            f"DNS p50, {case.removeprefix('ours, ')}",
            "ms",
            ours50,
            ref50,
            target=f"adds <= {TARGET_MS:g} ms over the reference",
            note="" if added is None else f"adds {added:+.3f} ms",
        )
        f.met = None if added is None else added <= TARGET_MS
        figures.append(f)
        figures.append(
            Figure(
                PART,
                f"DNS p99, {case.removeprefix('ours, ')}",
                "ms",
                _p(rows[case], "p99_ms"),
                _p(rows["reference"], "p99_ms"),
            )
        )
    figures.append(
        Figure(
            PART,
            "DNS p50, upstream from the gateway host (no tunnel)",
            "ms",
            _p(rows["gateway host, no tunnel"], "p50_ms"),
        )
    )
    return figures


def run(rounds: int = 3, count: int = 300) -> list[Figure]:
    upstream = f"{HOST_ADDR}:{DNS_PORT}"
    with bench_env("--upstream-dns", upstream) as env:
        start_tool(env, env.setup.internet, "dns-server", "--port", str(DNS_PORT))
        missing = dns_available(env)
        rows = measure(env, rounds, count) if missing is None else {}
    header = (
        "# DNS latency through the tunnel\n\n"
        f"`python -m bench.dns --rounds {rounds} --count {count}` on {machine_description()}.\n\n"
    )
    if missing is not None:
        report = header + f"**DNS is not available in this build**: {missing}.\n"
        figures = [
            Figure(
                PART,
                "DNS p50 (not available)",
                "ms",
                None,
                target=f"adds <= {TARGET_MS:g} ms",
                note="DNS service not available",
            )
        ]
        save_figures(PART, figures, report)
        print(report)
        return figures
    figures = figures_from(rows)
    per_round = "\n".join(
        f"- {name}: " + ", ".join(r.get("error") or f"p50 {r['p50_ms']:.3f} ms" for r in rs)
        for name, rs in rows.items()
    )
    report = (
        header
        + "Sequential A queries to the test host's port 53 (our DNS service takes every query "
        "to port 53; the reference path reaches the upstream itself).  Medians over the rounds "
        "of each round's percentiles.\n\n"
        f"{figures_table(figures)}\n\nPer round:\n\n{per_round}\n"
    )
    save_figures(PART, figures, report)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dns", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=300)
    args = parser.parse_args(argv)
    run(args.rounds, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
