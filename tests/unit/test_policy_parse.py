"""The CLI's TARGET, PORT, DURATION and peer forms, the file form of a rule, and the domain
scope: each accepted form and each refusal with its one-line reason."""

from __future__ import annotations

import ipaddress

import pytest

from unclaw_tui.policy import (
    Duration,
    Lifetime,
    domain_scope,
    make_rule,
    parse_duration,
    parse_target,
    parse_target_port,
    registrable_domain,
)
from unclaw_tui.policy.rules import parse_who, rule_from_doc, rule_to_doc
from unclaw_tui.policy.targets import TargetKind, parse_pattern, parse_ports

KEY = "A" * 43 + "="


@pytest.mark.parametrize(
    ("text", "kind", "canonical"),
    [
        ("example.com", TargetKind.HOST, "example.com"),
        ("Example.COM.", TargetKind.HOST, "example.com"),
        ("_dmarc.example.com", TargetKind.HOST, "_dmarc.example.com"),
        ("localhost", TargetKind.HOST, "localhost"),
        ("*.example.com", TargetKind.GLOB, "*.example.com"),
        ("*.co.uk", TargetKind.GLOB, "*.co.uk"),
        ("192.0.2.7", TargetKind.NET, "192.0.2.7"),
        ("10.0.0.0/8", TargetKind.NET, "10.0.0.0/8"),
        ("2001:db8::1", TargetKind.NET, "2001:db8::1"),
        ("2001:DB8::/32", TargetKind.NET, "2001:db8::/32"),
        ("::ffff:192.0.2.0/120", TargetKind.NET, "192.0.2.0/24"),
        ("::ffff:192.0.2.7", TargetKind.NET, "192.0.2.7"),
    ],
)
def test_target(text: str, kind: TargetKind, canonical: str) -> None:
    target = parse_target(text)
    assert (target.kind, target.text) == (kind, canonical)
    if kind is TargetKind.NET:
        assert target.network == ipaddress.ip_network(canonical)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("*example.com", "the only wildcard is a leading '*.'"),
        ("a.*.example.com", "the only wildcard"),
        ("ex ample.com", "each label"),
        ("-bad.example", "each label"),
        ("a..b", "each label"),
        ("x" * 64 + ".com", "each label"),
        ("10.0.0.1/8", "has host bits set"),
        ("10.0.0.256", "invalid IP or CIDR"),
        ("1.2.3", "invalid IP or CIDR"),
        ("x" * 400, "longer than"),
    ],
)
def test_target_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=r"invalid target|invalid hostname|invalid IP") as exc:
        parse_target(text)
    assert reason in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("text", "canonical", "port"),
    [
        ("example.com", "example.com", None),
        ("example.com:443", "example.com", 443),
        ("192.0.2.7:53", "192.0.2.7", 53),
        ("[2001:db8::1]:443", "2001:db8::1", 443),
        ("[2001:db8::1]", "2001:db8::1", None),
        ("2001:db8::1", "2001:db8::1", None),
    ],
)
def test_target_port(text: str, canonical: str, port: int | None) -> None:
    target, got = parse_target_port(text)
    assert (target.text, got) == (canonical, port)


@pytest.mark.parametrize(
    "text", ["example.com:", "example.com:0", "example.com:70000", "[example.com]:443",
             "[2001:db8::1]443", "example.com:1-2"],
)  # fmt: skip
def test_target_port_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_target_port(text)


def test_ports() -> None:
    assert str(parse_ports("443")) == "443"
    assert str(parse_ports("8000-8100")) == "8000-8100"
    for bad in ("0", "65536", "100-99", "a", "1-", "-5", "1-2-3"):
        with pytest.raises(ValueError, match="invalid port"):
            parse_ports(bad)


@pytest.mark.parametrize(
    ("text", "lifetime", "seconds"),
    [("once", Lifetime.ONCE, None), ("restart", Lifetime.RESTART, None),
     ("ALWAYS", Lifetime.ALWAYS, None), ("30s", Lifetime.TIMED, 30),
     ("15m", Lifetime.TIMED, 900), ("1h", Lifetime.TIMED, 3600), ("7d", Lifetime.TIMED, 604800)],
)  # fmt: skip
def test_duration(text: str, lifetime: Lifetime, seconds: int | None) -> None:
    duration = parse_duration(text)
    assert duration == Duration(lifetime, seconds)
    assert duration.expires(100.0) == (None if seconds is None else 100.0 + seconds)
    assert str(duration) == text.lower()


@pytest.mark.parametrize("text", ["", "0s", "1w", "1.5h", "-1h", "h", "3651d", "forever", "1 h"])
def test_duration_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration") as exc:
        parse_duration(text)
    assert "\n" not in str(exc.value)


def test_who() -> None:
    assert parse_who("*") == "*"
    assert parse_who("phone") == "phone"
    assert parse_who(KEY) == KEY
    for bad in ("", "two words", "a/b", "x" * 33):
        with pytest.raises(ValueError, match="invalid peer"):
            parse_who(bad)


def test_pattern_for_passthrough_flag() -> None:
    assert parse_pattern("*.bank.example").kind is TargetKind.GLOB
    assert parse_pattern("*Bank*").text == "*bank*"
    assert parse_pattern("*Bank*").kind is TargetKind.PATTERN
    assert parse_pattern("*bank*").matches_host("mybank.test")


def test_make_rule_refusals() -> None:
    with pytest.raises(ValueError, match="invalid action"):
        make_rule("permit", "example.com", now=0)
    with pytest.raises(ValueError, match="invalid protocol"):
        make_rule("allow", "example.com", now=0, proto="icmp")
    with pytest.raises(ValueError, match="invalid note"):
        make_rule("allow", "example.com", now=0, note="a\nb")
    with pytest.raises(ValueError, match="invalid rule id"):
        make_rule("allow", "example.com", now=0, rule_id="default")
    with pytest.raises(ValueError, match="built-in"):
        make_rule("allow", "example.com", now=0, rule_id="b3")


def test_new_ids_are_short_and_distinct() -> None:
    ids = {make_rule("allow", "example.com", now=0).id for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 6 and i.startswith("r") for i in ids)


def test_file_form_round_trip() -> None:
    rule = make_rule(
        "allow", "*.example.com", now=1_700_000_000, who="phone", ports="8000-8100",
        proto="tcp", duration=parse_duration("1h"), note="from a prompt", rule_id="r7",
    )  # fmt: skip
    doc = rule_to_doc(rule)
    assert doc == {
        "id": "r7", "action": "allow", "what": "*.example.com", "who": "phone",
        "port": "8000-8100", "proto": "tcp", "until": "2023-11-14T23:13:20Z",
        "note": "from a prompt", "created": "2023-11-14T22:13:20Z",
    }  # fmt: skip
    assert rule_from_doc(doc) == rule
    always = make_rule("deny", "10.0.0.0/8", now=5, rule_id="r8", ports="22")
    assert rule_to_doc(always)["until"] == "always" and rule_to_doc(always)["port"] == 22
    assert rule_from_doc(rule_to_doc(always)) == always


def test_file_form_defaults_and_refusals() -> None:
    rule = rule_from_doc({"id": "r1", "action": "deny", "what": "ads.example"})
    assert (rule.who, rule.ports, rule.proto, rule.lifetime) == ("*", None, "any", "always")
    for doc, reason in [
        ([], "JSON object"),
        ({"id": "r1", "action": "deny"}, "'what' is missing"),
        ({"id": "r1", "action": "deny", "what": "a.b", "colour": "red"}, "unknown field"),
        ({"id": "r1", "action": "deny", "what": "a.b", "until": "once"}, "running gateway"),
        ({"id": "r1", "action": "deny", "what": "a.b", "until": "tomorrow"}, "not a time"),
        ({"id": "r1", "action": "deny", "what": "a.b", "port": True}, "'port' must be"),
        ({"id": "r1", "action": "deny", "what": "a.b", "who": 3}, "'who' must be"),
    ]:
        with pytest.raises(ValueError, match=reason):
            rule_from_doc(doc)


@pytest.mark.parametrize(
    ("host", "domain", "scope"),
    [
        ("api.example.com", "example.com", ("example.com", "*.example.com")),
        ("a.b.example.co.uk", "example.co.uk", ("example.co.uk", "*.example.co.uk")),
        ("example.com", "example.com", ("example.com", "*.example.com")),
        ("site.user.github.io", "user.github.io", ("user.github.io", "*.user.github.io")),
        ("co.uk", None, ("co.uk",)),
        ("localhost", None, ("localhost",)),
    ],
)
def test_domain_scope(host: str, domain: str | None, scope: tuple[str, ...]) -> None:
    assert registrable_domain(host) == domain
    assert domain_scope(host) == scope
    for target in scope:
        parse_target(target)  # each is a valid rule target
