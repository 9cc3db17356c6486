"""The whole benchmark suite in one command, then the summary (Markdown + PNG).

    python -m bench                     # every part with the suite's settings (~10-15 min)
    python -m bench --only conns,dns    # some parts, the summary rebuilt from all results
    python -m bench --summary-only      # rebuild summary.md / summary.png from the results
    python -m bench --only soak         # the 10-minute soak (never in the default run)
    python -m bench --only isolation    # the isolation bench, ~5 min (not in the default run)

Parts (each also runs alone: `python -m bench.<part> --help`):

    throughput  TCP bulk, up/down, 1 and 4 streams; CPU per GiB; peak RSS   (bench.throughput)
    conns       new TCP connections/s with 1 KiB request/response, p50/p99  (bench.conns)
    dns         DNS latency through the tunnel, cached and cold             (bench.dns)
    tls         intercepted HTTPS vs passthrough: requests/s, handshake     (bench.tls)
    h2          intercepted HTTP/2 vs passthrough vs HTTP/1.1; memory/stream (bench.h2)
    cmem        C core bytes per idle connection and per idle peer          (bench.cmem)
    scale       1,000 peers (300 handshaking) and 10,000 idle connections   (bench.scale)
    tui         throughput with the TUI running vs --no-ui                  (bench.tui)
    soak        10 min of mixed load from 3 peers: RSS, descriptors, errors (bench.soak)
    isolation   one peer's abuse vs another peer's handshakes, DNS, connects (bench.isolation)
    policy      rule decision cost with 10 and 10,000 rules, in-process     (bench.policy)

Needs root (network namespaces), wireguard-go, wg, iperf3.  Traffic stays inside namespaces
the bench creates; every namespace and process is removed afterwards.  Each part writes
bench/results/<part>.md and <part>.json; the summary puts every figure next to its target
from issue 6.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable

from bench import cmem, conns, dns, h2, isolation, policy, scale, soak, throughput, tls, tui
from bench.common import (
    RESULTS_DIR,
    Figure,
    figures_table,
    fmt,
    load_figures,
    machine_description,
    save_figures,
)

# The suite's settings: every figure of issue 6 within the time budget.
PARTS: dict[str, tuple[str, Callable[[], list[Figure]]]] = {
    "throughput": ("TCP bulk throughput, CPU per GiB, peak RSS",
                   lambda: throughput.run(rounds=3, seconds=5, streams_text="1,4")),
    "conns": ("New TCP connections per second", lambda: conns.run(rounds=3, seconds=5)),
    "dns": ("DNS latency through the tunnel", lambda: dns.run(rounds=3, count=300)),
    "tls": ("TLS: intercepted vs passthrough", lambda: tls.run(rounds=3, seconds=4)),
    "h2": ("HTTP/2: intercepted vs passthrough vs HTTP/1.1; memory per open stream",
           lambda: h2.run(rounds=3, seconds=5)),
    "cmem": ("C core memory per idle connection and peer",
             lambda: cmem.run(conns=10_000, peers=1_000)),
    "scale": ("Scale: 1,000 peers, 10,000 idle connections",
              lambda: scale.run(peers=999, n_handshakes=300, conns=10_000)),
    "tui": ("The TUI's cost", lambda: tui.run(rounds=4, seconds=4, streams_text="1,4")),
    "policy": ("Policy: decision cost with 10,000 rules", lambda: policy.run(rules=10_000)),
}  # fmt: skip
# Selectable with --only, never in the default run: each takes minutes on its own.
EXTRA_PARTS: dict[str, tuple[str, Callable[[], list[Figure]]]] = {
    "soak": ("Soak: 10 minutes of mixed load from 3 peers", lambda: soak.run(seconds=600)),
    "isolation": ("Isolation: one peer's abuse against another peer's figures",
                  lambda: isolation.run(seconds=15)),
}  # fmt: skip


LOWER_IS_BETTER = {"ms", "s", "s/GiB", "MiB", "KiB", "B", "%"}


def write_summary(failures: dict[str, str]) -> None:
    sections = []
    all_figures: list[Figure] = []
    extras = {p: v for p, v in EXTRA_PARTS.items() if p in failures or load_figures(p)}
    for part, (title, _) in {**PARTS, **extras}.items():
        figures = load_figures(part)
        all_figures += figures
        body = figures_table(figures) if figures else "_not run yet_"
        if part in failures:
            body += f"\n\nThis run failed: `{failures[part]}`"
        sections.append(f"## {title} (`python -m bench.{part}`, [details]({part}.md))\n\n{body}")
    targets = [f for f in all_figures if f.target]
    met = sum(1 for f in targets if f.met)
    missed = [f for f in targets if f.met is False]
    unknown = [f for f in targets if f.met is None]
    lines = [
        "# unclaw-tui benchmark summary",
        "",
        f"`python -m bench` on {machine_description()}.",
        "",
        "The reference gateway is wireguard-go with kernel IP forwarding in the same namespace "
        "topology, measured in the same run, alternating, medians over rounds.  Targets are "
        "issue 6's.",
        "",
        f"Targets: **{met} met, {len(missed)} missed**"
        + (f", {len(unknown)} not measured" if unknown else "")
        + ".",
        "",
        *(
            f"- missed: {f.name}: ours {fmt(f.ours, 2)} {f.unit}, {f.reference_label} "
            f"{fmt(f.reference, 2)} {f.unit}"
            + (f" ({f.note})" if f.note else "")
            + f"; target {f.target}"
            for f in missed
        ),
        *(f"- not measured: {f.name} {f.note}" for f in unknown),
        "",
        "![summary](summary.png)",
        "",
        "\n\n".join(sections),
        "",
    ]
    (RESULTS_DIR / "summary.md").write_text("\n".join(lines))
    plot(all_figures)


def plot(figures: list[Figure]) -> None:
    """Ratios ours / reference as horizontal bars (Pillow only): green met, red missed, grey
    no target; a line at 1.0x."""
    from PIL import Image, ImageDraw, ImageFont

    rows = [f for f in figures if f.ratio is not None]
    label_w, bar_w, row_h, top = 520, 560, 22, 50
    width, height = label_w + bar_w + 80, top + row_h * max(1, len(rows)) + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 10), "unclaw-tui / reference (or baseline): ratio per figure", fill="black",
              font=font)  # fmt: skip
    max_ratio = max([2.0, *(min(f.ratio or 0, 12.0) for f in rows)])
    scale_x = bar_w / max_ratio

    def x_of(r: float) -> int:
        return label_w + int(min(r, max_ratio) * scale_x)

    for i, f in enumerate(rows):
        y = top + i * row_h
        colour = {True: (46, 160, 67), False: (207, 34, 46), None: (150, 150, 150)}[f.met]
        lower = f.unit in LOWER_IS_BETTER and f.reference_label != "target"
        label = f"[{f.part}] {f.name}" + (" (lower is better)" if lower else "")
        draw.text((10, y + 4), label[:80], fill="black", font=font)
        draw.rectangle([label_w, y + 3, x_of(f.ratio or 0), y + row_h - 3], fill=colour)
        draw.text((x_of(f.ratio or 0) + 4, y + 4), f"{f.ratio:.2f}x", fill="black", font=font)
    one = x_of(1.0)
    draw.line([one, top - 6, one, height - 30], fill="black", width=1)
    draw.text((one - 10, height - 26), "1.0x", fill="black", font=font)
    draw.text((10, height - 26), "green: target met   red: missed   grey: no target",
              fill="black", font=font)  # fmt: skip
    img.save(RESULTS_DIR / "summary.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", default="", help="comma-separated parts (default: all)")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    chosen = [p for p in args.only.split(",") if p] or list(PARTS)
    unknown = [p for p in chosen if p not in PARTS and p not in EXTRA_PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS) + list(EXTRA_PARTS)}")
    failures: dict[str, str] = {}
    if not args.summary_only:
        for part in chosen:
            title, run = {**PARTS, **EXTRA_PARTS}[part]
            print(f"\n=== {part}: {title} ===", flush=True)
            t0 = time.monotonic()
            try:
                run()
            except Exception as exc:  # one broken part must not lose the others' figures
                traceback.print_exc()
                failures[part] = f"{type(exc).__name__}: {exc}"[:300]
                save_figures(part, [], f"# {title}\n\nFailed: `{failures[part]}`\n")
            print(f"=== {part} took {time.monotonic() - t0:.0f} s ===", flush=True)
    write_summary(failures)
    print(f"\nsummary: {RESULTS_DIR / 'summary.md'}")
    print((RESULTS_DIR / "summary.md").read_text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
