"""The console's cost: bulk throughput through our gateway with the TUI running against
`--no-ui`, same load, same run.

    python -m bench.tui                       # 4 rounds, up/down x 1 and 4 streams, 5 s each
    python -m bench.tui --rounds 1 --seconds 3 --streams 1

The TUI runs as a user runs it (`python -m unclaw_tui --state-dir ... --listen-port ...`, no
`--no-ui`) on a pseudo-terminal of 120x40 whose output this process drains (a headless
terminal: the app renders every frame as it would on screen). Both modes start the same way, in
this process's session: a session of its own would put the TUI in a scheduler autogroup of its
own (Linux `sched_autogroup`), which alone changed its download throughput by 20-30 %. Each
round runs one mode, then the other (the order flips every round): the gateway is stopped and
the other mode started with the same state dir and port; the wireguard-go client's peer is
removed and set again so it handshakes at once with the new process. The iperf3 runs are
bench.throughput's.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any

from bench.common import (
    BenchEnv,
    Figure,
    Sample,
    bench_env,
    bench_env_vars,
    figures_table,
    machine_description,
    markdown_table,
    median,
    save_figures,
    summarise,
)
from bench.throughput import run_iperf
from tests.interop.harness import REPO_ROOT

PART = "tui"
COLUMNS, ROWS = 120, 40
TARGET = 0.9


class TuiGateway:
    """unclaw-tui with its console on a pty in the gateway namespace."""

    def __init__(self, env: BenchEnv, *gateway_args: str) -> None:
        s = env.setup
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.master = master
        self.proc = s.topo.spawn(
            s.gateway_ns,
            sys.executable, "-m", "unclaw_tui", "--state-dir", str(s.state_dir),
            "--listen-port", str(s.port), *gateway_args,
            stdin=slave, stdout=slave, stderr=slave,
            env={**bench_env_vars(), "TERM": "xterm-256color", "COLUMNS": str(COLUMNS),
                 "LINES": str(ROWS)},
            cwd=str(REPO_ROOT),
        )  # fmt: skip
        os.close(slave)
        self.screen_bytes = 0
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        # A terminal that is never read blocks the app once the pty buffer fills.
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.screen_bytes += len(data)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            os.close(self.master)


def rehandshake(env: BenchEnv, timeout: float = 30) -> None:
    """Make the client handshake with the gateway process now running, and wait for it."""
    client = env.ours.client
    gateway_key = next(
        line.split("=", 1)[1].strip()
        for line in env.ours.config.splitlines()
        if line.split("=", 1)[0].strip().lower() == "publickey"
    )
    client.ns.run("wg", "set", client.ifname, "peer", gateway_key, "remove")
    client.setconf(env.ours.config)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.ping("10.77.0.1", count=1, timeout=1).returncode == 0:
            return
    raise RuntimeError("the client never reached the restarted gateway")


def switch(env: BenchEnv, current: Any, mode: str, *gateway_args: str) -> Any:
    """Stop whatever runs now and start `mode` ('no-ui' or 'tui'); returns its handle."""
    if isinstance(current, TuiGateway):
        current.stop()
    else:
        current.terminate()
    if mode == "tui":
        handle: Any = TuiGateway(env, *gateway_args)
        pid = handle.proc.pid
    else:
        handle = env.setup.start_gateway(*gateway_args)
        pid = handle.proc.pid
    env.ours.gateway_pid = pid
    rehandshake(env)
    time.sleep(1.0)  # let the console finish its first layout
    return handle


def paired_ratios(samples: list[Sample]) -> dict[str, list[float]]:
    """TUI / no-UI per scenario and round (samples come in rounds of both modes)."""
    out: dict[str, list[float]] = {}
    rounds: dict[tuple[str, int], dict[str, float]] = {}
    seen: dict[tuple[str, str], int] = {}
    for s in samples:
        if s.error:
            continue
        n = seen.get((s.scenario, s.path), 0)
        seen[(s.scenario, s.path)] = n + 1
        rounds.setdefault((s.scenario, n), {})[s.path] = s.value
    for (scenario, _), pair in rounds.items():
        if pair.get("reference"):
            out.setdefault(scenario, []).append(pair.get("ours", 0.0) / pair["reference"])
    return out


def run(
    rounds: int = 4, seconds: int = 5, streams_text: str = "1,4", gateway_args: str = ""
) -> list[Figure]:
    extra = gateway_args.split()
    streams = [int(n) for n in streams_text.split(",")]
    samples: list[Sample] = []
    screen = 0
    with bench_env(*extra) as env:
        handle: Any = env.gateway
        mode = "no-ui"
        for round_no in range(rounds):
            order = ("no-ui", "tui") if round_no % 2 == 0 else ("tui", "no-ui")
            for wanted in order:
                if wanted != mode:
                    handle = switch(env, handle, wanted, *extra)
                    mode = wanted
                for reverse in (False, True):
                    for n in streams:
                        s = run_iperf(env, env.ours, seconds, n, reverse)
                        # summarise() compares "ours" with "reference": TUI vs no-UI here
                        s.path = "ours" if mode == "tui" else "reference"
                        samples.append(s)
                        figure = s.error or f"{s.value:8.1f} Mbit/s"
                        print(f"round {round_no + 1} {s.scenario:<20} {mode:<6} {figure}",
                              flush=True)  # fmt: skip
        if isinstance(handle, TuiGateway):
            screen = handle.screen_bytes
            handle.stop()
    summaries = summarise(samples, "Mbit/s")
    figures = []
    for s in summaries:
        figures.append(
            Figure(
                PART,
                f"throughput with the TUI, {s.scenario}",
                "Mbit/s",
                s.ours,
                s.reference,
                reference_label="--no-ui",
            )
        )
    # The judged figure: TUI / no-UI within each round, median over rounds.  The machine's
    # speed drifts (other work on 2 cores); a ratio inside one round cancels most of that.
    paired = paired_ratios(samples)
    for scenario, ratios in paired.items():
        ratio = median(ratios)
        figures.append(
            Figure(
                PART,
                f"TUI / no-UI throughput, {scenario} (paired per round)",
                "x",
                ratio,
                1.0,
                reference_label="--no-ui = 1",
                target=f">= {TARGET}x --no-ui",
                met=None if ratio is None else ratio >= TARGET,
                note="rounds " + ", ".join(f"{r:.2f}" for r in ratios),
            )
        )
    table = markdown_table(summaries).replace("ours", "TUI").replace("reference", "--no-ui")
    report = (
        "# The console's cost: throughput with the TUI running vs --no-ui\n\n"
        f"`python -m bench.tui --rounds {rounds} --seconds {seconds} --streams {streams_text}"
        + (f" --gateway-args='{gateway_args}'" if gateway_args else "")
        + "` "
        f"on {machine_description()}.\n\n"
        f"The TUI on a {COLUMNS}x{ROWS} pseudo-terminal (drained by the bench"
        + (f"; {screen // 1024} KiB of screen output in its last run" if screen else "")
        + "); medians over the rounds, CPU is the gateway process's per GiB.\n\n"
        f"{table}\n\n{figures_table(figures)}\n"
    )
    save_figures(PART, figures, report)
    print(report)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tui", description=__doc__)
    parser.add_argument("--rounds", type=int, default=4, help="even: ABBA against drift")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--streams", default="1,4")
    parser.add_argument(
        "--gateway-args",
        default="",
        help="extra flags for both modes, e.g. --gateway-args=--no-engine-thread",
    )
    args = parser.parse_args(argv)
    run(args.rounds, args.seconds, args.streams, args.gateway_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
