"""The order table of matcher.py's docstring, row by row: rules (in the CLI's words), a flow, the
verdict and the rule that decided it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pytest

from unclaw_tui.policy import Access, Mode, Policy, make_rule, parse_duration

PHONE_KEY = "A" * 43 + "="
LAPTOP_KEY = "B" * 43 + "="
NOW = 1_700_000_000.0


def rules_from(*lines: str) -> Policy:
    """`rule add` lines, ids r1, r2, ... in order, made at NOW."""
    policy = Policy()
    for i, line in enumerate(lines, 1):
        words = shlex.split(line)
        action, target, options = words[0], words[1], words[2:]
        opts = dict(zip(options[::2], options[1::2], strict=True))
        policy.add(
            make_rule(
                action,
                target,
                now=NOW,
                rule_id=f"r{i}",
                who=opts.get("--peer", "*"),
                ports=opts.get("--port"),
                proto=opts.get("--proto", "any"),
                duration=parse_duration(opts.get("--for", "always")),
            )
        )
    return policy


@dataclass(frozen=True)
class Flow:
    peer: str = "phone"
    host: str | None = None
    address: str | None = None
    port: int = 443
    proto: str = "tcp"
    later: float = 0.0  # seconds after NOW


DEFAULT = "default"
PEERS = {"phone": PHONE_KEY, "laptop": LAPTOP_KEY}

# (rules, flow, (access, access rule), (mode, mode rule)) -- the docstring's table
ORDER = [
    # who: the peer's own rule beats every peer's
    (["deny example.com", "allow example.com --peer phone"],
     Flow(host="example.com"), ("allow", "r2"), ("intercept", DEFAULT)),
    (["deny example.com", "allow example.com --peer phone"],
     Flow(peer="laptop", host="example.com"), ("deny", "r1"), ("intercept", DEFAULT)),
    # a rule may name the peer by its key
    (["deny example.com", f"allow example.com --peer {PHONE_KEY}"],
     Flow(host="example.com"), ("allow", "r2"), ("intercept", DEFAULT)),
    # who comes before what
    (["allow 10.0.0.0/8 --peer phone", "deny api.example.com"],
     Flow(host="api.example.com", address="10.1.1.1"), ("allow", "r1"), ("intercept", DEFAULT)),
    # exact host > glob
    (["deny *.example.com", "allow api.example.com"],
     Flow(host="api.example.com"), ("allow", "r2"), ("intercept", DEFAULT)),
    # longer glob > shorter
    (["deny *.example.com", "allow *.cdn.example.com"],
     Flow(host="img.cdn.example.com"), ("allow", "r2"), ("intercept", DEFAULT)),
    # a glob is the names below, not the name
    (["deny *.example.com"],
     Flow(host="example.com"), ("allow", DEFAULT), ("intercept", DEFAULT)),
    # a hostname rule > a CIDR
    (["allow 93.184.216.0/24", "deny *.example.com"],
     Flow(host="www.example.com", address="93.184.216.34"), ("deny", "r2"), ("intercept", DEFAULT)),
    # longer prefix > shorter
    (["deny 10.0.0.0/8", "allow 10.1.0.0/16"],
     Flow(address="10.1.2.3", port=22), ("allow", "r2"), ("intercept", DEFAULT)),
    # a CIDR judges the real (resolved) address, whatever the name
    (["deny 203.0.113.0/24"],
     Flow(host="app.test", address="203.0.113.5"), ("deny", "r1"), ("intercept", DEFAULT)),
    # IPv6 prefixes, and IPv4-mapped IPv6 judged as IPv4
    (["deny 2001:db8::/32", "allow 2001:db8:1::/48"],
     Flow(address="2001:db8:1::7"), ("allow", "r2"), ("intercept", DEFAULT)),
    (["deny 192.0.2.0/24"],
     Flow(address="::ffff:192.0.2.9"), ("deny", "r1"), ("intercept", DEFAULT)),
    # single port > range > any
    (["deny example.com", "allow example.com --port 8000-8100", "deny example.com --port 8080"],
     Flow(host="example.com", port=8080), ("deny", "r3"), ("intercept", DEFAULT)),
    (["deny example.com", "allow example.com --port 8000-8100", "deny example.com --port 8080"],
     Flow(host="example.com", port=8081), ("allow", "r2"), ("intercept", DEFAULT)),
    (["deny example.com", "allow example.com --port 8000-8100", "deny example.com --port 8080"],
     Flow(host="example.com", port=443), ("deny", "r1"), ("intercept", DEFAULT)),
    # a narrower range > a wider one
    (["deny example.com --port 1-65535", "allow example.com --port 440-450"],
     Flow(host="example.com"), ("allow", "r2"), ("intercept", DEFAULT)),
    # tcp/udp > any
    (["deny example.com --port 53", "allow example.com --port 53 --proto udp"],
     Flow(host="example.com", port=53, proto="udp"), ("allow", "r2"), ("intercept", DEFAULT)),
    (["deny example.com --port 53", "allow example.com --port 53 --proto udp"],
     Flow(host="example.com", port=53, proto="tcp"), ("deny", "r1"), ("intercept", DEFAULT)),
    # at a tie deny beats allow, whichever came first
    (["allow example.com", "deny example.com"],
     Flow(host="example.com"), ("deny", "r2"), ("intercept", DEFAULT)),
    (["deny example.com", "allow example.com"],
     Flow(host="example.com"), ("deny", "r1"), ("intercept", DEFAULT)),
    # an expired rule never matches; before its expiry it does
    (["allow example.com --for 1h", "deny *.example.com"],
     Flow(host="www.example.com", later=7200), ("deny", "r2"), ("intercept", DEFAULT)),
    (["allow www.example.com --for 1h", "deny *.example.com"],
     Flow(host="www.example.com", later=60), ("allow", "r1"), ("intercept", DEFAULT)),
    (["allow www.example.com --for 1h", "deny *.example.com"],
     Flow(host="www.example.com", later=3600), ("deny", "r2"), ("intercept", DEFAULT)),
    # each dimension by its own rules
    (["passthrough *.bank.example", "intercept login.bank.example", "deny ads.bank.example"],
     Flow(host="login.bank.example"), ("allow", DEFAULT), ("intercept", "r2")),
    (["passthrough *.bank.example", "intercept login.bank.example", "deny ads.bank.example"],
     Flow(host="ads.bank.example"), ("deny", "r3"), ("passthrough", "r1")),
    # names are compared without case and trailing dot
    (["deny Example.COM."],
     Flow(host="EXAMPLE.com."), ("deny", "r1"), ("intercept", DEFAULT)),
]  # fmt: skip


@pytest.mark.parametrize(("rules", "flow", "access", "mode"), ORDER)
def test_order(
    rules: list[str], flow: Flow, access: tuple[str, str], mode: tuple[str, str]
) -> None:
    policy = rules_from(*rules)
    verdict = policy.decide(
        flow.peer, PEERS[flow.peer], flow.host, flow.address, flow.port, flow.proto,
        NOW + flow.later,
    )  # fmt: skip
    assert (verdict.access, verdict.access_rule) == access
    assert (verdict.mode, verdict.mode_rule) == mode


def test_default_is_the_callers() -> None:
    policy = rules_from("allow example.com")
    verdict = policy.decide(
        "phone", PHONE_KEY, "other.example", None, 443, "tcp", NOW,
        default_access=Access.ASK, default_mode=Mode.PASSTHROUGH,
    )  # fmt: skip
    assert verdict == policy.decide(
        "phone", PHONE_KEY, "other.example", None, 443, "tcp", NOW,
        default_access=Access.ASK, default_mode=Mode.PASSTHROUGH,
    )  # fmt: skip
    assert (verdict.access, verdict.access_rule) == ("ask", "default")
    assert (verdict.mode, verdict.mode_rule) == ("passthrough", "default")


def test_key_as_bytes() -> None:
    import base64

    policy = rules_from(f"deny example.com --peer {PHONE_KEY}")
    raw = base64.b64decode(PHONE_KEY)
    assert policy.decide("phone", raw, "example.com", None, 443, "tcp", NOW).access == "deny"
    assert policy.decide("laptop", b"\1" * 32, "example.com", None, 443, "tcp", NOW).access == (
        "allow"
    )


# --- names denied as a whole (DNS NXDOMAIN) -------------------------------------------------------

NAMES = [
    (["deny ads.example.com"], "ads.example.com", "r1"),
    (["deny ads.example.com"], "x.ads.example.com", None),
    (["deny *.ads.example.com"], "x.ads.example.com", "r1"),
    # a port or a protocol makes it no whole-name rule
    (["deny ads.example.com --port 443"], "ads.example.com", None),
    (["deny ads.example.com --proto udp"], "ads.example.com", None),
    # an allow for some port of the name keeps it resolving
    (["deny ads.example.com", "allow ads.example.com --port 443"], "ads.example.com", None),
    (["deny *.example.com", "allow api.example.com --port 443"], "api.example.com", None),
    # an allow less specific than the deny does not
    (["allow *.example.com --port 443", "deny ads.example.com"], "ads.example.com", "r2"),
    # at a tie the deny wins
    (["allow ads.example.com", "deny ads.example.com"], "ads.example.com", "r2"),
    # a port deny on the host and a whole deny above: every port is denied
    (["deny *.example.com", "deny ads.example.com --port 443"], "ads.example.com", "r1"),
    # the peer's own allow beats every peer's deny
    (["deny *.example.com", "allow *.example.com --peer phone"], "ads.example.com", None),
    (["deny *.example.com --peer laptop"], "ads.example.com", None),
    (["deny *.example.com --peer phone"], "ads.example.com", "r1"),
    # CIDRs and once rules play no part; expired rules neither
    (["deny 0.0.0.0/0"], "ads.example.com", None),
    (["deny ads.example.com --for once"], "ads.example.com", None),
    (["deny ads.example.com --for 30s"], "ads.example.com", None),  # asked 60 s later
    # the mode dimension plays no part
    (["passthrough ads.example.com"], "ads.example.com", None),
]


@pytest.mark.parametrize(("rules", "name", "rule_id"), NAMES)
def test_denies_name(rules: list[str], name: str, rule_id: str | None) -> None:
    policy = rules_from(*rules)
    assert policy.denies_name("phone", PHONE_KEY, name, NOW + 60) == rule_id


def test_docstring_table_has_the_examples() -> None:
    from unclaw_tui.policy import matcher

    doc = matcher.__doc__ or ""
    assert "| rules | flow | verdict | why |" in doc
    assert doc.count("\n| ") >= 18
