"""The isolation bench pools each phase's probes over its rounds before taking percentiles."""

from __future__ import annotations

from typing import Any

from bench.isolation import figures_from


def _row(phase: str, samples: list[float], failures: dict[str, int] | None = None) -> dict:
    probe: dict[str, Any] = {"samples_ms": samples, "failures": failures or {}}
    return {
        "kind": "k",
        "phase": phase,
        "victim": {"handshake": probe, "dns": probe, "connect": probe},
    }


def test_percentiles_come_from_every_round_of_a_phase_together() -> None:
    # Round one's abuse has one slow probe of 100; alone it is that round's p99 (1 of 100
    # probes), pooled with a clean second round it is 1 of 200 and p99 falls on a 2.
    ordinary = [_row("ordinary", [1.0] * 100), _row("ordinary", [1.0] * 100)]
    abuse = [_row("abuse", [2.0] * 99 + [100.0]), _row("abuse", [2.0] * 100, {"timeout": 1})]
    figures = {f.name: f for f in figures_from([*ordinary, *abuse], ["k"])}
    p99 = figures["k: victim's handshake time p99"]
    assert (p99.ours, p99.reference) == (2.0, 1.0)
    assert p99.ratio == 2.0 and p99.met
    assert "1 timeout" in p99.note  # the failures of every round are summed
    one_round = {f.name: f for f in figures_from([ordinary[0], abuse[0]], ["k"])}
    assert one_round["k: victim's handshake time p99"].ours == 100.0
