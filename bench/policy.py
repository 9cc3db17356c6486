"""The policy's decision cost with many rules against few, measured in-process.

    python -m bench.policy                    # 10 vs 10,000 rules (~15 s)
    python -m bench.policy --rules 100000 --decisions 20000

No namespaces, no gateway: `Policy.decide` called as the gateway would call it, per flow, with a
peer, a hostname (3-4 labels), a resolved address (IPv4 or IPv6), a port and a protocol.  Both
rule sets are drawn the same way (exact hosts, globs, IPv4 and IPv6 CIDRs of many prefix
lengths, ports and ranges, a fifth of them naming one of 50 peers) and each is asked the same
kind of flows, half of them to names and addresses the set has rules for.  Each decision is timed
on its own (`perf_counter_ns`, whose own cost is in every figure alike); the two sets alternate
in rounds and the percentiles are over all rounds.  The figure compared with the target is the
ratio of the large set's p50 and p99 to a set of 1,000's: with the index it is flat (the cost
follows the name's labels and the distinct prefix lengths in use, which 1,000 rules already
have, not the count).  The ratio to 10 rules is printed beside it: 10 rules use few prefix
lengths and seldom match, so each decision probes less.

For scale, a linear scan (every rule looked at, as the index test's reference does) is timed
on the large set for a few hundred decisions.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import sys
import time
from typing import Any

from bench.common import Figure, figures_table, machine_description, percentile, save_figures
from unclaw_tui.policy import Duration, Lifetime, Policy, Rule, make_rule
from unclaw_tui.policy.rules import EVERY_PEER, Proto
from unclaw_tui.policy.targets import TargetKind

PART = "policy"
SMALL = 10
MIDDLE = 1_000
# From 1,000 rules up the cost is flat: it depends on the labels of the name and the distinct
# prefix lengths in use, which a set of 1,000 already has as many of as one of 10,000.
PLATEAU_TARGET = 1.25
WORDS = ["api", "cdn", "img", "static", "login", "auth", "www", "mail", "edge", "data"]
TLDS = ["com", "net", "org", "io", "co.uk", "de"]
PEERS = [f"peer{i}" for i in range(50)]
Flow = tuple[str, str, str, str, int, str]


def _domain(rng: random.Random) -> str:
    return f"site{rng.randrange(5000)}.{rng.choice(TLDS)}"


def _host(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}.{_domain(rng)}"


def _v4(rng: random.Random) -> str:
    return str(ipaddress.IPv4Address(rng.randrange(1 << 24) << 8 | rng.randrange(256)))


def _v6(rng: random.Random) -> str:
    return str(ipaddress.IPv6Address(0x2001_0DB8 << 96 | rng.getrandbits(64) << 32))


def _target(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return _host(rng)
    if kind < 0.6:
        return "*." + (_domain(rng) if rng.random() < 0.7 else _host(rng))
    if kind < 0.85:
        plen = rng.choice([8, 12, 16, 20, 24, 28, 32])
        return str(ipaddress.ip_network(f"{_v4(rng)}/{plen}", strict=False))
    plen = rng.choice([32, 48, 56, 64, 96, 128])
    return str(ipaddress.ip_network(f"{_v6(rng)}/{plen}", strict=False))


def make_rules(count: int, rng: random.Random, now: float) -> list[Rule]:
    rules = []
    for i in range(count):
        ports = rng.choice([None, None, "443", "80", "8000-8100", "1-1024"])
        rules.append(
            make_rule(
                rng.choice(["allow", "deny", "allow", "passthrough", "intercept"]),
                _target(rng),
                now=now,
                rule_id=f"r{i}",
                who=rng.choice(PEERS) if rng.random() < 0.2 else EVERY_PEER,
                ports=ports,
                proto=rng.choice(["any", "any", "tcp", "udp"]),
                duration=Duration(Lifetime.TIMED, 86400) if rng.random() < 0.1 else None,
            )
        )
    return rules


def make_flows(count: int, rules: list[Rule], rng: random.Random) -> list[Flow]:
    """Half the flows go where some rule points (a host below a glob, an address in a CIDR)."""
    flows: list[Flow] = []
    for _ in range(count):
        host, address = _host(rng), _v4(rng) if rng.random() < 0.7 else _v6(rng)
        if rng.random() < 0.5:
            rule = rng.choice(rules)
            target = rule.target
            if target.kind is TargetKind.HOST:
                host = target.text
            elif target.kind is TargetKind.GLOB:
                host = f"{rng.choice(WORDS)}.{target.suffix}"
            elif target.network is not None:
                address = str(target.network[rng.randrange(target.network.num_addresses)])
        port = rng.choice([443, 443, 80, 8080, 53])
        proto = "udp" if port == 53 else "tcp"
        peer = rng.choice(PEERS)
        flows.append((peer, "K" * 43 + "=", host, address, port, proto))
    return flows


def time_decisions(policy: Policy, flows: list[Flow], now: float) -> list[float]:
    """Nanoseconds per decision."""
    decide = policy.decide
    clock = time.perf_counter_ns
    out = []
    for peer, key, host, address, port, proto in flows:
        start = clock()
        decide(peer, key, host, address, port, proto, now)
        out.append(float(clock() - start))
    return out


def linear_decide(rules: list[Rule], flow: Flow, now: float) -> Rule | None:
    """Every rule looked at: the cost the index avoids."""
    peer, key, host, address, port, proto = flow
    addr = ipaddress.ip_address(address)
    best: Rule | None = None
    for rule in rules:
        if rule.who not in (EVERY_PEER, peer, key) or not rule.live(now):
            continue
        if rule.ports is not None and port not in rule.ports:
            continue
        if rule.proto is not Proto.ANY and rule.proto.value != proto:
            continue
        if rule.target.network is not None:
            if rule.target.network.version != addr.version or addr not in rule.target.network:
                continue
        elif not rule.target.matches_host(host):
            continue
        if best is None or rule.order < best.order:
            best = rule
    return best


def run(rules: int = 10_000, decisions: int = 20_000, rounds: int = 5) -> list[Figure]:
    rng = random.Random(14)
    now = time.time()
    large_rules = make_rules(rules, rng, now)
    small_rules = make_rules(SMALL, rng, now)
    middle_rules = make_rules(MIDDLE, rng, now)
    # Each set is asked flows aimed at its own rules the same way (same seed), so that as many
    # flows match a rule whatever the set's size.
    flow_sets = {
        name: make_flows(decisions, rule_set, random.Random(15))
        for name, rule_set in (
            ("small", small_rules),
            ("middle", middle_rules),
            ("large", large_rules),
        )
    }
    flows = flow_sets["large"]
    built = time.perf_counter()
    large = Policy(large_rules)
    build_ms = (time.perf_counter() - built) * 1000
    small = Policy(small_rules)
    middle = Policy(middle_rules)
    per_round = max(1, decisions // rounds)
    samples: dict[str, list[float]] = {"small": [], "middle": [], "large": []}
    gc.disable()  # a collection in the middle of one decision is noise, not the policy's cost
    try:
        order = [("small", small), ("middle", middle), ("large", large)]
        for name, policy in order:
            time_decisions(policy, flow_sets[name][:1000], now)  # warm-up
        for r in range(rounds):
            for name, policy in order if r % 2 == 0 else order[::-1]:
                chunk = flow_sets[name][r * per_round : (r + 1) * per_round]
                samples[name] += time_decisions(policy, chunk, now)
        linear: list[float] = []
        for flow in flows[:300]:
            start = time.perf_counter_ns()
            linear_decide(large_rules, flow, now)
            linear.append(float(time.perf_counter_ns() - start))
    finally:
        gc.enable()
    us = {
        (name, q): (percentile(values, q) or 0.0) / 1000
        for name, values in samples.items()
        for q in (50, 99)
    }
    figures = []
    for q in (50, 99):
        figures.append(
            Figure(
                part=PART,
                name=f"decision p{q}, {rules:,} rules",
                unit="µs",
                ours=round(us["large", q], 2),
                reference=round(us["small", q], 2),
                reference_label=f"{SMALL} rules",
            )
        )
    for q in (50, 99):
        ratio = us["large", q] / us["middle", q]
        figures.append(
            Figure(
                part=PART,
                name=f"decision p{q}, {rules:,} rules vs {MIDDLE:,} (flat)",
                unit="µs",
                ours=round(us["large", q], 2),
                reference=round(us["middle", q], 2),
                reference_label=f"{MIDDLE:,} rules",
                target=f"≤ {PLATEAU_TARGET}x",
                met=ratio <= PLATEAU_TARGET,
            )
        )
    linear_p50 = (percentile(linear, 50) or 0.0) / 1000
    figures.append(
        Figure(
            part=PART,
            name=f"linear scan p50, {rules:,} rules (what the index avoids)",
            unit="µs",
            ours=round(linear_p50, 1),
            reference=round(us["large", 50], 2),
            reference_label="indexed",
        )
    )
    matched = sum(large.decide(*flow, now).access_rule != "default" for flow in flows[:2000]) / min(
        2000, len(flows)
    )
    report(figures, rules, decisions, rounds, build_ms, matched)
    return figures


def report(
    figures: list[Figure], rules: int, decisions: int, rounds: int, build_ms: float, matched: float
) -> None:
    details: dict[str, Any] = {
        "decisions per set": decisions,
        "rounds (alternating)": rounds,
        f"index build, {rules:,} rules": f"{build_ms:.0f} ms",
        "flows decided by a rule (large set)": f"{matched:.0%}",
    }
    lines = [
        f"# Policy decision cost: {SMALL} vs {rules:,} rules",
        "",
        "`python -m bench.policy --rules N` — in-process, `Policy.decide` per flow "
        "(see the module docstring for how rules and flows are drawn).",
        "",
        figures_table(figures),
        "",
        *(f"- {k}: {v}" for k, v in details.items()),
        "",
        f"Machine: {machine_description()}",
        "",
    ]
    markdown = "\n".join(lines)
    save_figures(PART, figures, markdown)
    print(markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__)
    parser.add_argument("--rules", type=int, default=10_000, help="the large set's size")
    parser.add_argument("--decisions", type=int, default=20_000, help="flows asked of each set")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.rules, args.decisions, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
