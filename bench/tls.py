"""TLS through our gateway: intercepted HTTPS vs the same TLS passed through untouched.

    python -m bench.tls                  # 3 rounds x 5 s per case (~1.5 min)
    python -m bench.tls --rounds 1 --seconds 2

The test host serves HTTPS on port 443 (`bench.clients tls-server`) with certificates from a
CA the bench makes; our gateway trusts it through SSL_CERT_FILE and is started with
`--passthrough pass.bench.test`.  Each request is a new connection: TCP connect, TLS
handshake, GET, a 1 KiB response, close.

- intercepted: SNI bench.test, the client trusts our gateway's CA (`ca.pem` in its state dir):
  the gateway terminates TLS with a minted leaf and opens its own TLS to the test host;
- passthrough: SNI pass.bench.test, the client trusts the test host's CA: the gateway relays
  the encrypted bytes (the baseline the issue asks for: the reference cannot intercept);
- reference: the same plain TLS through wireguard-go + kernel forwarding (for scale).

If our gateway has no TLS service (the intercepted client sees the test host's certificate),
the part says so and records no figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
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
from tests.interop.harness import HOST_ADDR

PART = "tls"
TLS_PORT = 443
INTERCEPT_HOST = "bench.test"
PASS_HOST = "pass.bench.test"


def make_upstream_ca(directory: Path) -> Path:
    """The test host's CA (reusing the project's CA code); returns its certificate file."""
    from unclaw_tui.services.ca import CA_CERT_FILE, CertificateAuthority

    directory.mkdir(parents=True, exist_ok=True)
    CertificateAuthority.load_or_create(directory)
    return directory / CA_CERT_FILE


def _client(
    env: BenchEnv, bind: str, sni: str, cafile: Path, seconds: float, concurrency: int
) -> dict[str, Any]:
    return run_tool(
        env.setup.client_ns, "tls-client", HOST_ADDR, str(TLS_PORT), "--bind", bind,
        "--sni", sni, "--cafile", str(cafile), "--seconds", str(seconds),
        "--concurrency", str(concurrency), timeout=seconds + 60,
    )  # fmt: skip


def tls_available(env: BenchEnv, our_ca: Path) -> str | None:
    if not our_ca.exists():
        return "our gateway wrote no CA certificate (no TLS service)"
    out = _client(env, env.ours.client_ip, INTERCEPT_HOST, our_ca, 1, 1)
    if "error" in out:
        return f"probe failed: {out['error']}"
    if not out["requests"]:
        return f"no intercepted request succeeded (errors {out['errors']}): no TLS service"
    return None


def measure(
    env: BenchEnv, our_ca: Path, upstream_ca: Path, rounds: int, seconds: float, concurrency: int
) -> dict[str, list[dict[str, Any]]]:
    cases = {
        "intercepted": (env.ours.client_ip, INTERCEPT_HOST, our_ca),
        "passthrough": (env.ours.client_ip, PASS_HOST, upstream_ca),
        "reference": (env.reference.client_ip, INTERCEPT_HOST, upstream_ca),
    }
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for round_no in range(rounds):
        order = list(cases) if round_no % 2 == 0 else list(cases)[::-1]
        for name in order:
            bind, sni, cafile = cases[name]
            out = _client(env, bind, sni, cafile, seconds, concurrency)
            rows[name].append(out)
            figure = out.get("error") or (
                f"{out['rate']:7.1f} req/s  handshake p50 {out['handshake_p50_ms']:.2f} ms  "
                f"errors {out['errors']}"
            )
            print(f"round {round_no + 1} {name:<12} {figure}", flush=True)
    return rows


def _m(rows: list[dict[str, Any]], key: str) -> float | None:
    return median([r[key] for r in rows if "error" not in r and r.get(key) is not None])


def figures_from(rows: dict[str, list[dict[str, Any]]]) -> list[Figure]:
    i, p, r = rows["intercepted"], rows["passthrough"], rows["reference"]
    return [
        Figure(PART, "HTTPS requests/s, intercepted", "req/s", _m(i, "rate"), _m(p, "rate"),
               reference_label="passthrough"),
        Figure(PART, "TLS handshake p50, intercepted", "ms", _m(i, "handshake_p50_ms"),
               _m(p, "handshake_p50_ms"), reference_label="passthrough"),
        Figure(PART, "HTTPS requests/s, passthrough", "req/s", _m(p, "rate"), _m(r, "rate")),
        Figure(PART, "TLS handshake p50, passthrough", "ms", _m(p, "handshake_p50_ms"),
               _m(r, "handshake_p50_ms")),
    ]  # fmt: skip


def run(rounds: int = 3, seconds: float = 5, concurrency: int = 4) -> list[Figure]:
    header = (
        "# TLS through our gateway: intercepted vs passed through\n\n"
        f"`python -m bench.tls --rounds {rounds} --seconds {seconds} --concurrency "
        f"{concurrency}` on {machine_description()}.\n\n"
    )
    from bench.common import raise_nofile

    raise_nofile()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="unclaw-bench-ca-") as tmp:
        upstream_ca = make_upstream_ca(Path(tmp) / "upstream-ca")
        Path(tmp).chmod(0o755)
        with bench_env(
            "--passthrough", PASS_HOST, gateway_env={"SSL_CERT_FILE": str(upstream_ca)}
        ) as env:
            start_tool(
                env,
                env.setup.internet,
                "tls-server",
                "--port",
                str(TLS_PORT),
                "--ca-dir",
                str(upstream_ca.parent),
            )
            our_ca = env.setup.state_dir / "ca.pem"
            missing = tls_available(env, our_ca)
            rows = (
                measure(env, our_ca, upstream_ca, rounds, seconds, concurrency)
                if missing is None
                else {}
            )
    if missing is not None:
        report = header + f"**TLS interception is not available in this build**: {missing}.\n"
        figures = [
            Figure(
                PART,
                "HTTPS requests/s, intercepted (not available)",
                "req/s",
                None,
                note="TLS service not available",
            )
        ]
        save_figures(PART, figures, report)
        print(report)
        return figures
    figures = figures_from(rows)
    per_round = "\n".join(
        f"- {name}: "
        + ", ".join(
            r.get("error") or f"{r['rate']:.1f} req/s, p50 {r['handshake_p50_ms']:.2f} ms"
            for r in rs
        )
        for name, rs in rows.items()
    )
    report = (
        header + "A new connection per request (TCP + TLS handshake + GET + 1 KiB + close), "
        f"{concurrency} at a time; handshake latency is connect start to handshake done. "
        "Medians over the rounds.  The issue sets no target here: intercepting costs a "
        "second TLS handshake (upstream) and a minted certificate per new hostname.\n\n"
        f"{figures_table(figures)}\n\nPer round:\n\n{per_round}\n"
    )
    save_figures(PART, figures, report)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)
    run(args.rounds, args.seconds, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
