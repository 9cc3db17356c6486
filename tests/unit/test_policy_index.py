"""The index against a plain linear reference: the same verdict for random rule sets and flows
(hypothesis), plus the rule set's life: add, remove, reload, once, expiry."""

from __future__ import annotations

import fnmatch
import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unclaw_tui.policy import (
    Action,
    Duration,
    Lifetime,
    Policy,
    Ports,
    Proto,
    Rule,
    builtin_rules,
    make_rule,
)
from unclaw_tui.policy.rules import EVERY_PEER
from unclaw_tui.policy.targets import TargetKind, parse_target

NOW = 1_000_000.0
PEERS = {"phone": "A" * 43 + "=", "laptop": "B" * 43 + "="}


# --- the reference: every rule looked at, matching done the slow, obvious way ------------------


def ref_matches(
    rule: Rule, name: str, key: str, host: str | None, address: str | None, port: int, proto: str
) -> bool:
    if rule.who not in (EVERY_PEER, name, key):
        return False
    if rule.ports is not None and not rule.ports.low <= port <= rule.ports.high:
        return False
    if rule.proto is not Proto.ANY and rule.proto.value != proto:
        return False
    target = rule.target
    if target.kind is TargetKind.NET:
        if address is None:
            return False
        addr = ipaddress.ip_address(address)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        assert target.network is not None
        return addr.version == target.network.version and addr in target.network
    if host is None:
        return False
    return fnmatch.fnmatchcase(host, target.text)  # HOST: no wildcard; GLOB and PATTERN: as is


def ref_best(rules: list[Rule], dimension: str, *flow: object, now: float) -> Rule | None:
    found = [
        r for r in rules
        if r.dimension == dimension and r.live(now) and ref_matches(r, *flow)  # type: ignore[arg-type]
    ]  # fmt: skip
    return min(found, key=lambda r: r.order, default=None)


# --- random rule sets over a small world, so that rules and flows collide often ------------------

HOSTS = ["example.com", "a.example.com", "b.a.example.com", "cdn.net", "x.cdn.net", "test"]
ADDRESSES = ["10.0.0.1", "10.1.2.3", "10.1.2.200", "192.0.2.9", "::ffff:10.1.2.3",
             "2001:db8::1", "2001:db8:1::1", "fe80::1"]  # fmt: skip
NETS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "0.0.0.0/0", "192.0.2.0/24",
        "2001:db8::/32", "2001:db8:1::/48", "::/0", "2001:db8::1"]  # fmt: skip
TARGETS = [*HOSTS, *("*." + h for h in HOSTS), *NETS]
PORTS = [None, "443", "80", "1-1024", "400-500", "443-443"]


@st.composite
def rules_st(draw: st.DrawFn) -> list[Rule]:
    count = draw(st.integers(0, 25))
    rules = []
    for i in range(count):
        lifetime = draw(st.sampled_from([Lifetime.ALWAYS, Lifetime.TIMED, Lifetime.ONCE]))
        seconds = draw(st.integers(1, 100)) if lifetime is Lifetime.TIMED else None
        rules.append(
            make_rule(
                draw(st.sampled_from(list(Action))),
                draw(st.sampled_from(TARGETS)),
                now=NOW,
                rule_id=f"r{i}",
                who=draw(
                    st.sampled_from([EVERY_PEER, EVERY_PEER, "phone", PEERS["phone"], "laptop"])
                ),
                ports=draw(st.sampled_from(PORTS)),
                proto=draw(st.sampled_from(["tcp", "udp", "any"])),
                duration=Duration(lifetime, seconds),
            )
        )
    if draw(st.booleans()):
        rules.extend(builtin_rules(passthrough=["*bank*", "*.cdn.net"]))
    return rules


flows_st = st.tuples(
    st.sampled_from(["phone", "laptop"]),
    st.one_of(st.none(), st.sampled_from([*HOSTS, "z.b.a.example.com", "mybank.test"])),
    st.one_of(st.none(), st.sampled_from(ADDRESSES)),
    st.sampled_from([80, 443, 444, 1024, 8080]),
    st.sampled_from(["tcp", "udp"]),
    st.integers(0, 120),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rules_st(), flows=st.lists(flows_st, min_size=1, max_size=8))
def test_index_agrees_with_linear_reference(
    rules: list[Rule], flows: list[tuple[str, str | None, str | None, int, str, int]]
) -> None:
    policy = Policy(rules)
    for peer, host, address, port, proto, later in flows:
        now = NOW + later
        key = PEERS[peer]
        verdict = policy.decide(peer, key, host, address, port, proto, now)
        flow = (peer, key, host, address, port, proto)
        access = ref_best(rules, "access", *flow, now=now)
        mode = ref_best(rules, "mode", *flow, now=now)
        assert verdict.access_rule == (access.id if access else "default")
        assert verdict.mode_rule == (mode.id if mode else "default")
        if access is not None:
            assert verdict.access.value == access.action.value


@settings(max_examples=100, deadline=None)
@given(rules=rules_st(), removed=st.sets(st.integers(0, 25)))
def test_removing_rules_leaves_the_index_as_if_never_added(
    rules: list[Rule], removed: set[int]
) -> None:
    policy = Policy(rules)
    for i in removed:
        policy.remove(f"r{i}")
    kept = [r for r in rules if r.builtin or int(r.id[1:]) not in removed]
    fresh = Policy(kept)
    for host in [*HOSTS, None]:
        for address in [*ADDRESSES, None]:
            for port in (80, 443):
                a = policy.decide("phone", PEERS["phone"], host, address, port, "tcp", NOW)
                b = fresh.decide("phone", PEERS["phone"], host, address, port, "tcp", NOW)
                assert a == b


# --- the rule set's life ----------------------------------------------------------------------


def rule(action: str, target: str, rule_id: str, **kw: object) -> Rule:
    return make_rule(action, target, now=NOW, rule_id=rule_id, **kw)  # type: ignore[arg-type]


def test_once_rule_decides_one_flow_then_is_consumed() -> None:
    once = Duration(Lifetime.ONCE)
    policy = Policy([rule("deny", "*.example.com", "r1"),
                     rule("allow", "a.example.com", "r2", duration=once)])  # fmt: skip
    first = policy.decide("phone", "k", "a.example.com", None, 443, "tcp", NOW)
    assert (first.access, first.access_rule, first.once, first.cacheable) == (
        "allow", "r2", ("r2",), False
    )  # fmt: skip
    assert [r.id for r in policy.consume(first)] == ["r2"]
    second = policy.decide("phone", "k", "a.example.com", None, 443, "tcp", NOW)
    assert (second.access, second.access_rule, second.cacheable) == ("deny", "r1", True)
    assert policy.consume(second) == []


def test_expiry_valid_until_and_expire() -> None:
    policy = Policy([rule("allow", "a.example.com", "r1", duration=Duration(Lifetime.TIMED, 60)),
                     rule("passthrough", "*.example.com", "r2",
                          duration=Duration(Lifetime.TIMED, 30))])  # fmt: skip
    verdict = policy.decide("phone", "k", "a.example.com", None, 443, "tcp", NOW)
    assert verdict.valid_until == NOW + 30
    assert policy.next_expiry() == NOW + 30
    assert policy.expire(NOW + 29) == []
    generation = policy.generation
    assert [r.id for r in policy.expire(NOW + 30)] == ["r2"]
    assert policy.generation > generation
    assert policy.next_expiry() == NOW + 60
    policy.remove("r1")
    assert policy.next_expiry() is None
    assert policy.expire(NOW + 100) == []


def test_replace_persistent_keeps_this_runs_rules_and_builtins() -> None:
    builtins = builtin_rules(deny=[ipaddress.ip_network("192.0.2.0/24")])
    restart = rule("deny", "x.test", "r9", duration=Duration(Lifetime.RESTART))
    old = [rule("allow", "a.test", "r1"), rule("allow", "b.test", "r2")]
    policy = Policy([*old, restart], builtins)
    changed = rule("deny", "b.test", "r2")
    added, removed = policy.replace_persistent([old[0], changed, rule("deny", "c.test", "r3")])
    assert sorted(r.id for r in added) == ["r2", "r3"]
    assert [r.id for r in removed] == ["r2"]
    assert sorted(r.id for r in policy.rules()) == ["b1", "r1", "r2", "r3", "r9"]
    assert policy.rules()[0].builtin
    assert policy.decide("p", "k", "b.test", None, 1, "udp", NOW).access == "deny"
    try:
        policy.replace_persistent([rule("allow", "d.test", "r9")])
    except ValueError as exc:
        assert "r9" in str(exc)
    else:
        raise AssertionError("a file rule took a run rule's id")


def test_builtin_rules_from_flags() -> None:
    rules = builtin_rules(
        allow=[ipaddress.ip_network("127.0.0.0/8")],
        deny=[ipaddress.ip_network("2001:db8::/32")],
        passthrough=["*.bank.example", "*bank*"],
    )
    assert [(r.id, r.action, r.target.text, r.target.kind, r.builtin) for r in rules] == [
        ("b1", Action.ALLOW, "127.0.0.0/8", TargetKind.NET, True),
        ("b2", Action.DENY, "2001:db8::/32", TargetKind.NET, True),
        ("b3", Action.PASSTHROUGH, "*.bank.example", TargetKind.GLOB, True),
        ("b4", Action.PASSTHROUGH, "*bank*", TargetKind.PATTERN, True),
    ]
    assert not any(r.persistent for r in rules)
    policy = Policy(builtins=rules)
    verdict = policy.decide("p", "k", "www.mybank.test", "127.0.0.1", 443, "tcp", NOW)
    assert (verdict.access_rule, verdict.mode, verdict.mode_rule) == ("b1", "passthrough", "b4")
    # a plain glob is more specific than a pattern
    verdict = policy.decide("p", "k", "www.bank.example", None, 443, "tcp", NOW)
    assert verdict.mode_rule == "b3"


def test_duplicate_id_refused() -> None:
    policy = Policy([rule("allow", "a.test", "r1")])
    try:
        policy.add(rule("deny", "b.test", "r1"))
    except ValueError:
        pass
    else:
        raise AssertionError("duplicate id accepted")
    assert len(policy) == 1 and "r1" in policy
    assert policy.get("r1") == rule("allow", "a.test", "r1")


def test_ports_and_target_helpers() -> None:
    assert 443 in Ports(400, 500) and 501 not in Ports(400, 500)
    assert parse_target("*.Example.com.").matches_host("a.example.com")
    assert not parse_target("*.example.com").matches_host("example.com")
