"""The policy's commands: `peer add/set --policy/--fallback`, `rule add/list/remove/test`,
`decide`, `prompts`.  Offline against a real state dir; online against the real control server
(a real socket in the temp state dir) with the policy methods registered on a fake gateway,
the CLI running in a thread as it would in its own process."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_cli import ERROR_PREFIX, dir_snapshot, run, run_subprocess
from tests.unit.test_control_commands import (
    FakePolicyGateway,
    peer,
    prompt,
    serving,
    standard_gateway,
)
from unclaw_tui import cli, keys
from unclaw_tui.policy import Access, Lifetime, Policy, make_rule
from unclaw_tui.policy.hits import HitLog
from unclaw_tui.policy.store import RULES_FILE, RuleStore
from unclaw_tui.state import StateDir

NO_GATEWAY = "no gateway is running on {} (start it with `unclaw-tui` or `unclaw-tui --no-ui`)"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def peers_dir(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A state dir with two peers: phone (ask, else deny) and laptop (allow)."""
    assert (
        run(capsys, "--state-dir", str(state_dir), "peer", "add", "phone", "--policy", "ask")[0]
        == 0
    )
    assert run(capsys, "--state-dir", str(state_dir), "peer", "add", "laptop")[0] == 0
    return state_dir


def cmd(capsys: pytest.CaptureFixture[str], state_dir: Path, *argv: str) -> tuple[int, str, str]:
    return run(capsys, "--state-dir", str(state_dir), *argv)


async def acmd(
    capsys: pytest.CaptureFixture[str], state_dir: Path, *argv: str
) -> tuple[int, str, str]:
    """The CLI in a thread, so the control server on this loop can answer it."""
    rc = await asyncio.to_thread(cli.main, ["--state-dir", str(state_dir), *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def file_rules(state_dir: Path) -> list[Any]:
    return RuleStore(StateDir(state_dir, create=False)).load()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_refused(
    capsys: pytest.CaptureFixture[str], state_dir: Path, argv: tuple[str, ...], reason: str,
    status: int = 2,
) -> None:  # fmt: skip
    """The command exits `status` with one line naming `reason`, and writes nothing."""
    before = dir_snapshot(state_dir)
    rc, out, err = cmd(capsys, state_dir, *argv)
    assert (rc, out) == (status, ""), err
    assert err.startswith(ERROR_PREFIX) and err.count("\n") == 1 and reason in err, err
    assert dir_snapshot(state_dir) == before


# --- peers: policy and fallback ---------------------------------------------------------------


def test_peer_add_with_a_policy_and_peer_set(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    rc, _, err = cmd(capsys, state_dir, "peer", "add", "phone", "--policy", "ask",
                     "--fallback", "allow")  # fmt: skip
    assert (rc, err) == (0, "")
    rc, _, _ = cmd(capsys, state_dir, "peer", "add", "laptop")
    sd = StateDir(state_dir, create=False)
    assert (sd.peer("phone").policy, sd.peer("phone").fallback) == ("ask", "allow")
    assert (sd.peer("laptop").policy, sd.peer("laptop").fallback) == ("allow", "deny")
    assert mode_of(state_dir / "peers.json") == 0o600

    rc, out, _ = cmd(capsys, state_dir, "peer", "set", "laptop", "--policy", "deny")
    assert (rc, out) == (0, "peer laptop: policy deny, fallback deny\n")
    rc, out, _ = cmd(capsys, state_dir, "peer", "set", "phone", "--fallback", "deny")
    assert (rc, out) == (0, "peer phone: policy ask, fallback deny\n")
    sd = StateDir(state_dir, create=False)
    assert [(p.name, p.policy, p.fallback) for p in sd.peers()] == [
        ("phone", "ask", "deny"), ("laptop", "deny", "deny"),
    ]  # fmt: skip
    assert mode_of(state_dir / "peers.json") == 0o600

    rc, listing, _ = cmd(capsys, state_dir, "peer", "list")
    header, phone_line, laptop_line = listing.splitlines()
    assert header.split()[:5] == ["NAME", "IP", "PUBLIC", "KEY", "POLICY"]
    assert "ask (else deny)" in phone_line and laptop_line.split()[3] == "deny"
    rc, listing, _ = cmd(capsys, state_dir, "peer", "list", "--json")
    assert [(r["name"], r["policy"], r["fallback"]) for r in json.loads(listing)] == [
        ("phone", "ask", "deny"), ("laptop", "deny", "deny"),
    ]  # fmt: skip


def test_peer_set_without_a_change_writes_nothing(
    capsys: pytest.CaptureFixture[str], peers_dir: Path
) -> None:
    before = dir_snapshot(peers_dir)
    rc, out, _ = cmd(capsys, peers_dir, "peer", "set", "laptop", "--policy", "allow")
    assert (rc, out) == (0, "peer laptop: policy allow, fallback deny\n")
    assert dir_snapshot(peers_dir) == before


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("peer", "set", "phone"), "peer set: give --policy, --fallback or both"),
        (("peer", "set", "phone", "--policy", "maybe"), "argument --policy: invalid choice: "
         "'maybe' (choose from 'allow', 'deny', 'ask')"),
        (("peer", "set", "phone", "--fallback", "ask"), "argument --fallback: invalid choice"),
        (("peer", "set", "tablet", "--policy", "deny"), "unknown peer 'tablet'"),
        (("peer", "add", "tablet", "--policy", "sometimes"), "argument --policy: invalid"),
        (("peer", "add", "tablet", "--fallback", "ask"), "argument --fallback: invalid"),
    ],
)  # fmt: skip
def test_bad_peer_policy_exits_2_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, argv: tuple[str, ...], reason: str
) -> None:
    assert_refused(capsys, peers_dir, argv, reason)


def test_peer_add_with_a_bad_policy_creates_no_state_dir(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    rc, _, _ = cmd(capsys, state_dir, "peer", "add", "phone", "--policy", "nope")
    assert rc == 2 and not state_dir.exists()


# --- rule add, offline --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "stored"),
    [
        ("Example.COM.", "example.com"),
        ("*.example.com", "*.example.com"),
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("2001:db8::/32", "2001:db8::/32"),
    ],
)
def test_rule_add_writes_the_rule_and_prints_its_id(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, target: str, stored: str
) -> None:
    rc, out, err = cmd(capsys, peers_dir, "rule", "add", "deny", target)
    assert (rc, err) == (0, "")
    (rule,) = file_rules(peers_dir)
    assert out == f"{rule.id}\n"
    assert (rule.action, rule.target.text, rule.who, rule.ports, rule.proto) == (
        "deny", stored, "*", None, "any",
    )  # fmt: skip
    assert (rule.lifetime, rule.expires) == (Lifetime.ALWAYS, None)
    assert mode_of(peers_dir / RULES_FILE) == 0o600


def test_rule_add_with_every_option(capsys: pytest.CaptureFixture[str], peers_dir: Path) -> None:
    phone_key = StateDir(peers_dir, create=False).peer("phone").public_key
    before = time.time()
    rc, out, _ = cmd(capsys, peers_dir, "rule", "add", "allow", "*.example.com", "--peer",
                     "phone", "--port", "8000-8100", "--proto", "tcp", "--for", "90m",
                     "--note", "while testing")  # fmt: skip
    rc2, out2, _ = cmd(capsys, peers_dir, "rule", "add", "passthrough", "bank.example",
                       "--peer", phone_key, "--port", "443")  # fmt: skip
    assert (rc, rc2) == (0, 0)
    first, second = file_rules(peers_dir)
    assert (out, out2) == (f"{first.id}\n", f"{second.id}\n")
    assert (first.who, str(first.ports), first.proto, first.note) == (
        "phone", "8000-8100", "tcp", "while testing",
    )  # fmt: skip
    assert first.lifetime is Lifetime.TIMED
    assert first.expires is not None and before + 5400 - 2 <= first.expires <= time.time() + 5400
    assert (second.action, second.who, str(second.ports)) == ("passthrough", phone_key, "443")


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("block", "x.test"), "invalid choice: 'block' (choose from 'allow', 'deny', "),
        (("deny", "x*.test"), "the only wildcard is a leading '*.'"),
        (("deny", "10.0.0.1/8"), "has host bits set"),
        (("deny", "x..test"), "invalid hostname"),
        (("deny", "x.test", "--port", "0"), "invalid port '0'"),
        (("deny", "x.test", "--port", "90-80"), "invalid port '90-80'"),
        (("deny", "x.test", "--port", "https"), "invalid port 'https'"),
        (("deny", "x.test", "--proto", "icmp"), "argument --proto: invalid choice"),
        (("deny", "x.test", "--for", "5y"), "invalid duration '5y'"),
        (("deny", "x.test", "--for", "0s"), "must be more than 0"),
        (("deny", "x.test", "--note", "a\x07b"), "invalid note"),
        (("deny", "x.test", "--peer", "tablet"), "unknown peer 'tablet'"),
        (("deny", "x.test", "--peer", "bad name!"), "invalid peer 'bad name!'"),
        (("deny",), "the following arguments are required: TARGET"),
    ],
)
def test_bad_rule_add_exits_2_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, argv: tuple[str, ...], reason: str
) -> None:
    assert_refused(capsys, peers_dir, ("rule", "add", *argv), reason)


@pytest.mark.parametrize("duration", ["once", "restart"])
def test_rule_add_for_once_or_restart_needs_a_gateway(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, duration: str
) -> None:
    assert_refused(
        capsys, peers_dir, ("rule", "add", "allow", "x.test", "--for", duration),
        f"a {duration} rule lives in a running gateway's memory: "
        + NO_GATEWAY.format(peers_dir), status=3,
    )  # fmt: skip


def test_rule_add_on_a_broken_rules_file_leaves_it_alone(
    capsys: pytest.CaptureFixture[str], peers_dir: Path
) -> None:
    (peers_dir / RULES_FILE).write_text('{"version": 1, "rules": [\n  {"id": "r1"\n')
    assert_refused(capsys, peers_dir, ("rule", "add", "deny", "x.test"), f"{RULES_FILE}:")


# --- rule list and remove, offline --------------------------------------------------------------


def test_rule_list_shows_the_files_rules_with_hits(
    capsys: pytest.CaptureFixture[str], peers_dir: Path
) -> None:
    _, deny_id, _ = cmd(capsys, peers_dir, "rule", "add", "deny", "ads.example.com", "--note",
                        "no ads")  # fmt: skip
    _, allow_id, _ = cmd(capsys, peers_dir, "rule", "add", "allow", "*.example.com", "--peer",
                         "phone", "--port", "443", "--for", "2h")  # fmt: skip
    deny_id, allow_id = deny_id.strip(), allow_id.strip()
    hits = HitLog()
    for _ in range(3):
        hits.record(deny_id, time.time() - 120)
    sd = StateDir(peers_dir, create=False)
    RuleStore(sd).save_hits(hits, time.time())

    rc, out, err = cmd(capsys, peers_dir, "rule", "list")
    assert rc == 0 and "no gateway runs on" in err
    header, first, second = out.splitlines()
    assert header.split() == ["ID", "ACTION", "TARGET", "PEER", "PORT", "PROTO", "UNTIL",
                              "HITS", "LAST", "HIT", "NOTE"]  # fmt: skip
    assert first.split() == [deny_id, "deny", "ads.example.com", "all", "any", "any", "always",
                             "3", "2m", "ago", "no", "ads"]  # fmt: skip
    assert second.split()[:7] == [allow_id, "allow", "*.example.com", "phone", "443", "any", "in"]
    assert second.split()[9:] == ["0", "never"]

    rc, out, _ = cmd(capsys, peers_dir, "rule", "list", "--json")
    doc = json.loads(out)
    assert doc["gateway"] is False
    assert [(r["id"], r["hits"], r["builtin"]) for r in doc["rules"]] == [
        (deny_id, 3, False), (allow_id, 0, False),
    ]  # fmt: skip
    assert doc["rules"][1]["lifetime"] == "timed" and doc["rules"][1]["until"].endswith("Z")


def test_rule_list_without_a_state_dir_is_empty_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    rc, out, _ = cmd(capsys, state_dir, "rule", "list", "--json")
    assert (rc, json.loads(out)) == (0, {"gateway": False, "rules": []})
    assert not state_dir.exists()


def test_rule_remove_from_the_file(capsys: pytest.CaptureFixture[str], peers_dir: Path) -> None:
    _, kept, _ = cmd(capsys, peers_dir, "rule", "add", "deny", "kept.test")
    _, gone, _ = cmd(capsys, peers_dir, "rule", "add", "deny", "gone.test")
    rc, out, _ = cmd(capsys, peers_dir, "rule", "remove", gone.strip())
    assert (rc, out) == (0, f"removed rule {gone.strip()} (deny gone.test)\n")
    assert [r.id for r in file_rules(peers_dir)] == [kept.strip()]
    assert mode_of(peers_dir / RULES_FILE) == 0o600


@pytest.mark.parametrize(
    ("rule_id", "reason", "status"),
    [
        ("rnope9", "no rule rnope9 in", 1),
        ("b1", "b1, b2, ... are the built-in rules of a running gateway's --allow, --deny and "
         "--passthrough flags", 1),
        ("default", "'default' is no rule but each peer's policy", 2),
        ("Bad Id!", "invalid rule id", 2),
    ],
)  # fmt: skip
def test_rule_remove_refusals_write_nothing(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, rule_id: str, reason: str, status: int
) -> None:
    cmd(capsys, peers_dir, "rule", "add", "deny", "kept.test")
    assert_refused(capsys, peers_dir, ("rule", "remove", rule_id), reason, status)


# --- rule test, offline: the same verdict as Policy.decide on the same files ---------------------

TESTS = [
    ("phone", "ads.example.com:443", "tcp"),
    ("laptop", "ads.example.com:443", "tcp"),
    ("laptop", "ads.example.com", "udp"),
    ("phone", "www.example.com:443", "tcp"),
    ("phone", "www.example.com:80", "tcp"),
    ("laptop", "www.example.com:8443", "tcp"),
    ("laptop", "10.1.2.3:22", "tcp"),
    ("laptop", "10.2.0.1:22", "tcp"),
    ("phone", "[2001:db8::5]:53", "udp"),
    ("phone", "2001:db8::5", "tcp"),
    ("laptop", "login.bank.example:443", "tcp"),
    ("phone", "elsewhere.test:443", "tcp"),
]


@pytest.fixture
def rules_dir(capsys: pytest.CaptureFixture[str], peers_dir: Path) -> Path:
    for argv in (
        ("deny", "ads.example.com"),
        ("allow", "*.example.com", "--peer", "phone", "--port", "443"),
        ("deny", "*.example.com", "--port", "8000-9000"),
        ("deny", "10.0.0.0/8"),
        ("allow", "10.1.0.0/16", "--port", "22", "--proto", "tcp"),
        ("deny", "2001:db8::/32", "--peer", "phone", "--proto", "udp"),
        ("passthrough", "*.bank.example"),
        ("intercept", "login.bank.example", "--for", "1h"),
    ):
        assert cmd(capsys, peers_dir, "rule", "add", *argv)[0] == 0
    return peers_dir


@pytest.mark.parametrize(("who", "target", "proto"), TESTS)
def test_rule_test_agrees_with_policy_decide(
    capsys: pytest.CaptureFixture[str], rules_dir: Path, who: str, target: str, proto: str
) -> None:
    rc, out, _ = cmd(capsys, rules_dir, "rule", "test", who, target, "--proto", proto, "--json")
    assert rc == 0
    result = json.loads(out)
    sd = StateDir(rules_dir, create=False)
    record = sd.peer(who)
    policy = Policy(RuleStore(sd).load())
    host, port = target.rsplit(":", 1) if target.count(":") == 1 else (target, None)
    if target.startswith("["):
        host, port = target[1:].split("]:")
    is_ip = host.replace(".", "").isdigit() or ":" in host
    verdict = policy.decide(
        who, record.public_key, None if is_ip else host, host if is_ip else None,
        int(port) if port else 0, proto, time.time(), default_access=Access(record.policy),
    )  # fmt: skip
    assert (result["access"], result["access_rule"], result["mode"], result["mode_rule"]) == (
        verdict.access, verdict.access_rule, verdict.mode, verdict.mode_rule,
    )  # fmt: skip
    assert result["gateway"] is False


def test_rule_test_says_the_verdict_and_the_rule(
    capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    by_what = {r.target.text: r.id for r in file_rules(rules_dir)}
    rc, out, err = cmd(capsys, rules_dir, "rule", "test", "laptop", "ads.example.com:443")
    assert rc == 0 and "judged by rules.json alone" in err
    assert out.splitlines() == [
        "laptop -> ads.example.com:443/tcp",
        f"access  deny         rule {by_what['ads.example.com']}",
        "mode    intercept    default",
        f"dns     nxdomain     rule {by_what['ads.example.com']}",
        "(no address: CIDR rules judge the resolved address; test an IP for them)",
    ]
    _, out, _ = cmd(capsys, rules_dir, "rule", "test", "phone", "198.51.100.7:80")
    assert out.splitlines() == [
        "phone -> 198.51.100.7:80/tcp",
        "access  ask          default (peer phone's policy: ask; unanswered: deny)",
    ]
    _, out, _ = cmd(capsys, rules_dir, "rule", "test", "laptop", "login.bank.example:443")
    assert out.splitlines()[1:3] == [
        "access  allow        default (peer laptop's policy: allow)",
        f"mode    intercept    rule {by_what['login.bank.example']}",
    ]
    _, out, _ = cmd(capsys, rules_dir, "rule", "test", "laptop", "10.9.9.9")
    assert out.splitlines()[:2] == [
        "laptop -> 10.9.9.9, any port, tcp",
        f"access  deny         rule {by_what['10.0.0.0/8']}",
    ]


def test_rule_test_a_vip_judges_its_hostname(
    capsys: pytest.CaptureFixture[str], rules_dir: Path
) -> None:
    doc = {"version": 2, "network": "10.78.0.0/16", "peers": [],
           "vips": [{"hostname": "ads.example.com", "ip": "10.78.3.4", "last_used": 0.0,
                     "given": []}]}  # fmt: skip
    (rules_dir / "vips.json").write_text(json.dumps(doc))
    rc, out, _ = cmd(capsys, rules_dir, "rule", "test", "laptop", "10.78.3.4:443", "--json")
    result = json.loads(out)
    assert (rc, result["hostname"], result["address"], result["vip"]) == (
        0, "ads.example.com", None, "10.78.3.4",
    )  # fmt: skip
    assert result["access"] == "deny"
    _, out, _ = cmd(capsys, rules_dir, "rule", "test", "laptop", "10.78.3.4:443")
    assert out.splitlines()[0] == "laptop -> ads.example.com:443/tcp  (VIP 10.78.3.4)"


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("tablet", "x.test:443"), "unknown peer 'tablet'"),
        (("phone", "*.example.com:443"), "*.example.com is a glob: test one name"),
        (("phone", "10.0.0.0/8"), "10.0.0.0/8 is a network: test one address of it"),
        (("phone", "x.test:0"), "invalid port '0'"),
        (("phone", "x.test:443", "--proto", "any"), "argument --proto: invalid choice"),
        (("phone", "[x.test]:443"), "invalid"),
    ],
)
def test_bad_rule_test_exits_2(
    capsys: pytest.CaptureFixture[str], rules_dir: Path, argv: tuple[str, ...], reason: str
) -> None:
    assert_refused(capsys, rules_dir, ("rule", "test", *argv), reason)


# --- decide and prompts without a gateway ---------------------------------------------------------


@pytest.mark.parametrize("argv", [("decide", "p1", "allow"), ("prompts",), ("prompts", "--json")])
def test_decide_and_prompts_need_a_gateway(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, argv: tuple[str, ...]
) -> None:
    assert_refused(capsys, peers_dir, argv, NO_GATEWAY.format(peers_dir), status=3)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("decide", "p1", "maybe"), "argument allow|deny: invalid choice: 'maybe'"),
        (("decide", "p1", "allow", "--scope", "world"), "argument --scope: invalid choice"),
        (("decide", "p1", "allow", "--for", "soon"), "invalid duration 'soon'"),
        (("decide", "p 1", "allow"), "invalid prompt id 'p 1'"),
        (("decide", "p1"), "the following arguments are required: allow|deny"),
    ],
)
def test_bad_decide_exits_2_before_asking(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, argv: tuple[str, ...], reason: str
) -> None:
    assert_refused(capsys, peers_dir, argv, reason)


# --- with a running gateway -----------------------------------------------------------------------


@pytest.fixture
async def gateway(peers_dir: Path) -> AsyncIterator[FakePolicyGateway]:
    """A gateway on peers_dir: the control socket serving the policy methods."""
    fake = standard_gateway()
    sd = StateDir(peers_dir, create=False)
    fake.peers = [peer(p.name, p.public_key, p.policy, p.fallback) for p in sd.peers()]
    async with serving(peers_dir, fake):
        yield fake


async def test_rule_add_once_goes_to_the_gateway(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, gateway: FakePolicyGateway
) -> None:
    rc, out, err = await acmd(capsys, peers_dir, "rule", "add", "allow", "x.test", "--for",
                              "once", "--peer", "phone", "--port", "443")  # fmt: skip
    assert (rc, err) == (0, "")
    added = gateway.calls[-1]
    assert added[0] == "add_rule" and added[2] == "cli"
    rule = added[1]
    assert out == f"{rule.id}\n"
    assert (rule.lifetime, rule.who, str(rule.ports), rule.target.text) == (
        Lifetime.ONCE, "phone", "443", "x.test",
    )  # fmt: skip
    assert not (peers_dir / RULES_FILE).exists()
    # An always rule still goes to the file, gateway or not: the gateway reloads it.
    rc, out, _ = await acmd(capsys, peers_dir, "rule", "add", "deny", "y.test")
    assert rc == 0 and [r.id for r in file_rules(peers_dir)] == [out.strip()]
    assert len(gateway.calls) == 1


async def test_rule_list_from_the_gateway_shows_builtin_and_once_rules(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, gateway: FakePolicyGateway
) -> None:
    rc, out, err = await acmd(capsys, peers_dir, "rule", "list", "--json")
    doc = json.loads(out)
    assert (rc, err, doc["gateway"]) == (0, "", True)
    assert [r["id"] for r in doc["rules"]] == ["b1", "b2", "rads", "ronce", "rphone"]
    rc, out, _ = await acmd(capsys, peers_dir, "rule", "list")
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["b1", "allow", "192.168.1.0/24", "all"]
    assert lines[4].split()[:7] == ["ronce", "allow", "once.example.net", "all", "any", "any",
                                    "once"]  # fmt: skip


async def test_rule_list_reads_every_page(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, gateway: FakePolicyGateway
) -> None:
    now = time.time()
    for i in range(800):
        rule = make_rule("deny", f"h{i}.example.org", now=now, note="x" * 150,
                         rule_id=f"rmany{i:04d}")  # fmt: skip
        gateway.add_rule(rule)
    rc, out, _ = await acmd(capsys, peers_dir, "rule", "list", "--json")
    ids = [r["id"] for r in json.loads(out)["rules"]]
    assert rc == 0 and len(ids) == 805 and len(set(ids)) == 805


async def test_rule_remove_through_the_gateway(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, gateway: FakePolicyGateway
) -> None:
    rc, out, _ = await acmd(capsys, peers_dir, "rule", "remove", "ronce")
    assert (rc, out) == (0, "removed rule ronce (allow once.example.net)\n")
    assert ("remove_rule", "ronce", "cli") in gateway.calls
    rc, out, err = await acmd(capsys, peers_dir, "rule", "remove", "rnope9")
    assert (rc, out, err) == (1, "", f"{ERROR_PREFIX}the gateway answered: no rule 'rnope9'\n")
    rc, _, err = await acmd(capsys, peers_dir, "rule", "remove", "b2")
    assert (rc, err) == (
        1,
        f"{ERROR_PREFIX}rule b2 is built in: it comes from the gateway's "
        "flag --passthrough *.bank.example; restart the gateway without it\n",
    )
    rc, _, err = await acmd(capsys, peers_dir, "rule", "remove", "b7")
    assert rc == 1 and "b1, b2, ... are the built-in rules" in err
    assert "b2" in gateway.views


async def test_rule_test_asks_the_gateway_and_agrees_with_offline(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, gateway: FakePolicyGateway
) -> None:
    # The same file rules in both: the gateway's view is the file plus its own rules.
    for rule in (make_rule("deny", "*.example.com", now=time.time(), rule_id="rfile"),):
        RuleStore(StateDir(peers_dir, create=False)).add(rule)
        gateway.add_rule(rule)
    rc, out, _ = await acmd(capsys, peers_dir, "rule", "test", "laptop", "www.example.com:443",
                            "--json")  # fmt: skip
    online = json.loads(out)
    assert (rc, online["gateway"], online["access"], online["access_rule"]) == (
        0, True, "deny", "rfile",
    )  # fmt: skip
    # A once rule only the gateway knows decides there.
    rc, out, _ = await acmd(capsys, peers_dir, "rule", "test", "laptop", "once.example.net:443",
                            "--json")  # fmt: skip
    assert (json.loads(out)["access_rule"], json.loads(out)["once"]) == ("ronce", ["ronce"])
    rc, _, err = await acmd(capsys, peers_dir, "rule", "test", "tablet", "x.test")
    assert (rc, err) == (1, f"{ERROR_PREFIX}the gateway answered: unknown peer 'tablet'\n")


async def test_decide_answers_the_gateways_prompt(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, gateway: FakePolicyGateway
) -> None:
    rc, out, _ = await acmd(capsys, peers_dir, "prompts")
    header, first, second = out.splitlines()
    assert header.split() == ["ID", "PEER", "DESTINATION", "PROTO", "ROUTE", "WAITING",
                              "OPENED", "FALLBACK", "IN"]  # fmt: skip
    assert first.split()[:8] == ["p1", "phone", "api.example.com", "(10.78.0.9):443", "tcp",
                                 "tls", "2", "3s"]  # fmt: skip
    assert second.split()[:3] == ["p2", "phone", "10.78.0.9:443"]
    rc, out, _ = await acmd(capsys, peers_dir, "prompts", "--json")
    assert [p["id"] for p in json.loads(out)["prompts"]] == ["p1", "p2"]

    rc, out, err = await acmd(capsys, peers_dir, "decide", "p1", "allow")
    assert (rc, out, err) == (0, "prompt p1: allow, rule ranswr (always, host)\n", "")
    rc, out, _ = await acmd(capsys, peers_dir, "decide", "p2", "deny", "--for", "once",
                            "--scope", "port")  # fmt: skip
    assert (rc, out) == (0, "prompt p2: deny once\n")
    assert gateway.calls == [
        ("answer_prompt", "p1", "allow", "always", "host", "cli"),
        ("answer_prompt", "p2", "deny", "once", "port", "cli"),
    ]
    rc, out, err = await acmd(capsys, peers_dir, "decide", "p1", "deny")
    assert (rc, out) == (1, "")
    assert err == (
        f"{ERROR_PREFIX}the gateway answered: no open prompt 'p1' (answered or timed out)\n"
    )
    rc, out, _ = await acmd(capsys, peers_dir, "prompts")
    assert (rc, out) == (0, "no open prompts\n")


async def test_decide_for_a_duration_and_domain(
    capsys: pytest.CaptureFixture[str], peers_dir: Path, gateway: FakePolicyGateway
) -> None:
    gateway.open_prompts.append(prompt("p9"))
    rc, out, _ = await acmd(capsys, peers_dir, "decide", "p9", "ALLOW", "--for", "1h",
                            "--scope", "domain")  # fmt: skip
    assert (rc, out) == (0, "prompt p9: allow, rule ranswr (1h, domain)\n")
    assert gateway.calls[-1] == ("answer_prompt", "p9", "allow", "1h", "domain", "cli")


# --- as a process ---------------------------------------------------------------------------------


def test_rule_commands_as_a_process(tmp_path: Path) -> None:
    base = ("--state-dir", str(tmp_path / "state"))
    added = run_subprocess(*base, "peer", "add", "phone", "--policy", "deny")
    assert added.returncode == 0
    rule = run_subprocess(*base, "rule", "add", "allow", "example.com", "--peer", "phone")
    assert rule.returncode == 0 and rule.stdout.strip().startswith("r")
    tested = run_subprocess(*base, "rule", "test", "phone", "example.com:443", "--json")
    assert json.loads(tested.stdout)["access_rule"] == rule.stdout.strip()
    other = run_subprocess(*base, "rule", "test", "phone", "example.org:443", "--json")
    assert (json.loads(other.stdout)["access"], json.loads(other.stdout)["access_rule"]) == (
        "deny", "default",
    )  # fmt: skip
    bad = run_subprocess(*base, "rule", "add", "deny", "bad target")
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.count("\n") == 1
    nogw = run_subprocess(*base, "decide", "p1", "allow")
    assert nogw.returncode == 3


def test_public_keys_are_accepted_where_peers_are_named(
    capsys: pytest.CaptureFixture[str], peers_dir: Path
) -> None:
    stranger = keys.generate_keypair()[1]
    rc, out, _ = cmd(capsys, peers_dir, "rule", "add", "deny", "x.test", "--peer", stranger)
    assert rc == 0 and file_rules(peers_dir)[0].who == stranger
    phone = StateDir(peers_dir, create=False).peer("phone")
    rc, out, _ = cmd(capsys, peers_dir, "rule", "test", phone.public_key, "x.test:1", "--json")
    assert (rc, json.loads(out)["peer"]) == (0, "phone")


def test_set_peer_policy_refuses_bad_values_and_unknown_peers(peers_dir: Path) -> None:
    sd = StateDir(peers_dir, create=False)
    before = dir_snapshot(peers_dir)
    with pytest.raises(ValueError, match="invalid policy 'maybe'"):
        sd.set_peer_policy("phone", "maybe")
    with pytest.raises(ValueError, match="invalid fallback 'ask'"):
        sd.set_peer_policy("phone", fallback="ask")
    with pytest.raises(KeyError, match="unknown peer 'tablet'"):
        sd.set_peer_policy("tablet", "deny")
    with pytest.raises(ValueError, match="invalid policy"):
        sd.add_peer("tablet", None, *_net(), policy="sometimes")
    assert dir_snapshot(peers_dir) == before
    changed = sd.set_peer_policy("laptop", "ask", "allow")
    assert (changed.policy, changed.fallback) == ("ask", "allow")
    assert sd.peer("laptop") == changed


def _net() -> tuple[Any, Any]:
    iface = ipaddress.IPv4Interface("10.77.0.1/24")
    return iface.network, iface.ip
