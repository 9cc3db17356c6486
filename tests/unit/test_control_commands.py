"""The policy's control methods (control/commands.py) on the real control server, over a real
Unix socket in a temp state dir, with the real blocking client, against a small fake gateway
that keeps its rules and prompts in memory as the real one does."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from unclaw_tui import keys
from unclaw_tui.control.client import ControlClient
from unclaw_tui.control.commands import METHODS, page, register_policy_commands
from unclaw_tui.control.protocol import MAX_MESSAGE, ControlError
from unclaw_tui.control.server import ControlServer
from unclaw_tui.gateway import GatewaySnapshot, PeerSnapshot
from unclaw_tui.policy import Access, Policy, Rule, builtin_rules, make_rule, parse_duration
from unclaw_tui.policy.durations import Lifetime
from unclaw_tui.policy.targets import parse_network
from unclaw_tui.policy.views import PromptView, RuleView
from unclaw_tui.state import StateDir

PHONE_KEY = keys.generate_keypair()[1]
LAPTOP_KEY = keys.generate_keypair()[1]


def peer(name: str, key: str, policy: str = "allow", fallback: str = "deny") -> PeerSnapshot:
    return PeerSnapshot(
        name=name, public_key=key, ip="10.77.0.2", created=0.0, endpoint=None,
        last_handshake=None, rx_bytes=0, tx_bytes=0, rx_packets=0, tx_packets=0,
        policy=policy, fallback=fallback,
    )  # fmt: skip


def prompt(prompt_id: str, hostname: str | None = "api.example.com") -> PromptView:
    now = time.time()
    return PromptView(
        id=prompt_id, peer="phone", peer_public_key=PHONE_KEY, hostname=hostname,
        dst_ip="10.78.0.9", dst_port=443, proto="tcp", route="tls", opened=now - 3,
        deadline=now + 27, waiting=2,
    )  # fmt: skip


class FakePolicyGateway:
    """The policy half of GatewayProtocol, in memory, recording what it was asked."""

    def __init__(
        self,
        peers: Iterable[PeerSnapshot] = (),
        rules: Iterable[Rule] = (),
        prompts: Iterable[PromptView] = (),
    ) -> None:
        self.peers = list(peers)
        self.views = {rule.id: RuleView(rule) for rule in rules}
        self.open_prompts = list(prompts)
        self.calls: list[tuple[Any, ...]] = []

    def snapshot(self) -> GatewaySnapshot:
        return GatewaySnapshot(
            listen_port=51820, public_key="gateway-key", endpoint="192.0.2.1:51820",
            address="10.77.0.1/24", started_at=0.0, peers=tuple(self.peers),
            prompts_open=len(self.open_prompts),
        )  # fmt: skip

    def rules(self) -> list[RuleView]:
        return sorted(
            self.views.values(), key=lambda v: (not v.rule.builtin, v.rule.created, v.rule.id)
        )

    def add_rule(self, rule: Rule, by: str = "console") -> RuleView:
        if rule.id in self.views:
            raise ValueError(f"a rule with id {rule.id!r} exists")
        self.calls.append(("add_rule", rule, by))
        view = self.views[rule.id] = RuleView(rule)
        return view

    def remove_rule(self, rule_id: str, by: str = "console") -> Rule:
        view = self.views.get(rule_id)
        if view is None:
            raise KeyError(f"no rule {rule_id!r}")
        if view.rule.builtin:
            raise ValueError(f"rule {rule_id} is built in")
        self.calls.append(("remove_rule", rule_id, by))
        del self.views[rule_id]
        return view.rule

    def prompts(self) -> list[PromptView]:
        return list(self.open_prompts)

    def answer_prompt(
        self,
        prompt_id: str,
        access: str,
        duration: str = "always",
        scope: str = "host",
        by: str = "console",
    ) -> str | None:
        for item in self.open_prompts:
            if item.id == prompt_id:
                break
        else:
            raise KeyError(f"no open prompt {prompt_id!r} (answered or timed out)")
        self.calls.append(("answer_prompt", prompt_id, access, duration, scope, by))
        self.open_prompts.remove(item)
        return None if duration == "once" else "ranswr"

    def set_peer_policy(
        self, name: str, policy: str | None = None, fallback: str | None = None
    ) -> PeerSnapshot:
        for i, item in enumerate(self.peers):
            if item.name == name:
                changed = dataclasses.replace(
                    item, policy=policy or item.policy, fallback=fallback or item.fallback
                )
                self.peers[i] = changed
                self.calls.append(("set_peer_policy", name, policy, fallback))
                return changed
        raise KeyError(f"unknown peer {name!r}")


def standard_gateway() -> FakePolicyGateway:
    now = time.time()
    builtins = builtin_rules(
        allow=[parse_network("192.168.1.0/24")], passthrough=["*.bank.example"]
    )
    return FakePolicyGateway(
        peers=[peer("phone", PHONE_KEY, "ask"), peer("laptop", LAPTOP_KEY)],
        rules=[
            *builtins,
            make_rule("deny", "ads.example.com", now=now, rule_id="rads"),
            make_rule(
                "allow", "*.example.com", now=now, who="phone", ports="443", rule_id="rphone"
            ),
            make_rule(
                "allow",
                "once.example.net",
                now=now,
                rule_id="ronce",
                duration=parse_duration("once"),
            ),
        ],
        prompts=[prompt("p1"), prompt("p2", hostname=None)],
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    StateDir(path)
    return path


@contextlib.asynccontextmanager
async def serving(state_dir: Path, gateway: FakePolicyGateway) -> AsyncIterator[ControlServer]:
    server = ControlServer(state_dir, "0.1.0")
    register_policy_commands(server, gateway)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def call(state_dir: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    """One request through the real blocking client, on a thread so the server can run."""

    def blocking() -> Any:
        with ControlClient.connect(state_dir) as client:
            return client.call(method, params)

    return await asyncio.to_thread(blocking)


async def error_of(state_dir: Path, method: str, params: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ControlError) as caught:
        await call(state_dir, method, params)
    return caught.value.code, caught.value.message


# --- registration and params ----------------------------------------------------------------


async def test_every_method_is_served_and_checks_its_params(state_dir: Path) -> None:
    gateway = standard_gateway()
    async with serving(state_dir, gateway):
        assert set(METHODS) == {"rules.list", "rule.add", "rule.remove", "rule.test",
                                "prompts.list", "prompt.answer", "peer.set"}  # fmt: skip
        code, message = await error_of(state_dir, "rule.add", {"action": "allow"})
        assert (code, message) == ("bad_params", "line 1: rule.add: 'target' is required")
        code, message = await error_of(state_dir, "rules.list", {"offset": "1"})
        assert code == "bad_params" and "'offset' must be an integer" in message
        code, _ = await error_of(state_dir, "peer.set", {"name": "phone", "colour": "red"})
        assert code == "bad_params"
    assert gateway.calls == []


# --- rules ------------------------------------------------------------------------------------


async def test_rules_list_shows_every_rule_with_hits_builtins_first(state_dir: Path) -> None:
    gateway = standard_gateway()
    gateway.views["rads"] = RuleView(gateway.views["rads"].rule, hits=7, last_hit=1234.5)
    async with serving(state_dir, gateway):
        result = await call(state_dir, "rules.list")
    assert result["total"] == 5 and result["next"] is None
    by_id = {doc["id"]: doc for doc in result["rules"]}
    assert [doc["id"] for doc in result["rules"]][:2] == ["b1", "b2"]
    assert by_id["b1"] | {"created": 0} == {
        "id": "b1", "action": "allow", "what": "192.168.1.0/24", "who": "*", "port": "any",
        "proto": "any", "lifetime": "always", "until": "always", "expires": None, "note": "flag",
        "created": 0, "builtin": True, "hits": 0, "last_hit": None,
    }  # fmt: skip
    assert (by_id["rads"]["hits"], by_id["rads"]["last_hit"]) == (7, 1234.5)
    assert (by_id["rphone"]["who"], by_id["rphone"]["port"]) == ("phone", "443")
    assert (by_id["ronce"]["lifetime"], by_id["ronce"]["until"]) == ("once", "once")


async def test_rules_list_pages_fit_one_message_and_cover_every_rule(state_dir: Path) -> None:
    now = time.time()
    rules = [
        make_rule("deny", f"host{i}.{'x' * 60}.example.com", now=now, note="n" * 200,
                  rule_id=f"r{i:05d}")
        for i in range(1500)
    ]  # fmt: skip
    gateway = FakePolicyGateway(rules=rules)
    seen: list[str] = []
    pages = 0
    async with serving(state_dir, gateway):
        offset: int | None = 0
        while offset is not None:
            result = await call(state_dir, "rules.list", {"offset": offset})
            line = json.dumps({"id": 1, "result": result}, separators=(",", ":"))
            assert len(line.encode()) < MAX_MESSAGE
            seen += [doc["id"] for doc in result["rules"]]
            assert result["total"] == 1500
            offset = result["next"]
            pages += 1
        negative = await error_of(state_dir, "rules.list", {"offset": -1})
    assert seen == [rule.id for rule in rules]
    assert pages > 5
    assert negative == ("invalid", "invalid offset -1: expected 0 or more")


def test_page_moves_on_even_past_the_budget() -> None:
    docs = [{"x": "y" * 100} for _ in range(3)]
    assert page(docs, 0, "items", budget=10) == {"items": [docs[0]], "total": 3, "next": 1}
    assert page(docs, 2, "items", budget=10)["next"] is None
    assert page(docs, 3, "items") == {"items": [], "total": 3, "next": None}
    with pytest.raises(ValueError):
        page(docs, -1, "items")


async def test_rule_add_makes_the_rule_the_gateway_adds(state_dir: Path) -> None:
    gateway = standard_gateway()
    async with serving(state_dir, gateway):
        doc = await call(state_dir, "rule.add", {
            "action": "deny", "target": "2001:db8::7", "peer": "laptop",
            "port": "8000-8100", "proto": "udp", "duration": "restart", "note": "lab",
            "by": "cli",
        })  # fmt: skip
        by_number = await call(
            state_dir, "rule.add", {"action": "allow", "target": "x.test", "port": 443}
        )
        by_key = await call(
            state_dir, "rule.add", {"action": "allow", "target": "y.test", "peer": PHONE_KEY}
        )
    rule = gateway.views[doc["id"]].rule
    assert (rule.action, rule.target.text, rule.who, str(rule.ports), rule.proto) == (
        "deny", "2001:db8::7", "laptop", "8000-8100", "udp",
    )  # fmt: skip
    assert (rule.lifetime, rule.note, rule.builtin) == (Lifetime.RESTART, "lab", False)
    assert gateway.calls[0] == ("add_rule", rule, "cli")
    assert (by_number["port"], by_number["who"], gateway.calls[1][2]) == ("443", "*", "control")
    assert by_key["who"] == PHONE_KEY
    assert doc == {**doc, "until": "restart", "expires": None, "hits": 0}


@pytest.mark.parametrize(
    ("params", "code", "reason"),
    [
        ({"action": "block", "target": "x.test"}, "invalid", "invalid action 'block'"),
        ({"action": "deny", "target": "x*.test"}, "invalid", "the only wildcard"),
        ({"action": "deny", "target": "x.test", "port": 0}, "invalid", "invalid port '0'"),
        ({"action": "deny", "target": "x.test", "proto": "icmp"}, "invalid", "invalid protocol"),
        ({"action": "deny", "target": "x.test", "duration": "5y"}, "invalid", "invalid duration"),
        ({"action": "deny", "target": "x.test", "note": "a\nb"}, "invalid", "invalid note"),
        ({"action": "deny", "target": "x.test", "peer": "tablet"}, "not_found", "unknown peer"),
        ({"action": "deny", "target": "x.test", "by": "Me!"}, "invalid", "invalid 'by'"),
        ({"action": "deny", "target": "x" * 500}, "invalid", "longer than 400"),
    ],
)
async def test_rule_add_refuses_bad_values(
    state_dir: Path, params: dict[str, Any], code: str, reason: str
) -> None:
    gateway = standard_gateway()
    async with serving(state_dir, gateway):
        got_code, message = await error_of(state_dir, "rule.add", params)
    assert got_code == code and reason in message
    assert gateway.calls == []


async def test_rule_remove(state_dir: Path) -> None:
    gateway = standard_gateway()
    async with serving(state_dir, gateway):
        removed = await call(state_dir, "rule.remove", {"id": "ronce", "by": "cli"})
        unknown = await error_of(state_dir, "rule.remove", {"id": "rnope"})
        builtin = await error_of(state_dir, "rule.remove", {"id": "b2"})
    assert (removed["id"], removed["lifetime"]) == ("ronce", "once")
    assert gateway.calls == [("remove_rule", "ronce", "cli")]
    assert unknown == ("not_found", "no rule 'rnope'")
    assert builtin == (
        "invalid", "rule b2 is built in: it comes from the flag --passthrough *.bank.example"
    )  # fmt: skip
    assert "b2" in gateway.views


# --- rule.test: the same verdict as Policy.decide ------------------------------------------------

FLOWS = [
    ("phone", "api.example.com", None, 443, "tcp"),
    ("phone", "api.example.com", None, 80, "tcp"),
    ("laptop", "api.example.com", None, 443, "tcp"),
    ("laptop", "ads.example.com", None, None, "udp"),
    ("phone", "once.example.net", None, 443, "tcp"),
    ("laptop", None, "192.168.1.20", 22, "tcp"),
    ("laptop", "www.bank.example", None, 443, "tcp"),
    ("phone", None, "203.0.113.9", 53, "udp"),
]


@pytest.mark.parametrize(("who", "hostname", "address", "port", "proto"), FLOWS)
async def test_rule_test_agrees_with_policy_decide(
    state_dir: Path, who: str, hostname: str | None, address: str | None, port: int | None,
    proto: str,
) -> None:  # fmt: skip
    gateway = standard_gateway()
    record = next(p for p in gateway.peers if p.name == who)
    params = {"peer": who, "hostname": hostname, "address": address, "port": port, "proto": proto}
    async with serving(state_dir, gateway):
        result = await call(state_dir, "rule.test", params)
        by_key = await call(state_dir, "rule.test", {**params, "peer": record.public_key})
    policy = Policy(view.rule for view in gateway.rules())
    verdict = policy.decide(
        who, record.public_key, hostname, address, port or 0, proto, time.time(),
        default_access=Access(record.policy),
    )  # fmt: skip
    assert (result["access"], result["access_rule"], result["mode"], result["mode_rule"]) == (
        verdict.access, verdict.access_rule, verdict.mode, verdict.mode_rule,
    )  # fmt: skip
    assert by_key == result
    assert result["policy"] == record.policy and result["tls"] == (port == 443)
    assert len(gateway.views) == 5  # a test uses up no once rule


async def test_rule_test_names_the_rule_and_the_default(state_dir: Path) -> None:
    gateway = standard_gateway()
    async with serving(state_dir, gateway):
        phone = await call(state_dir, "rule.test", {"peer": "phone", "hostname": "a.example.com",
                                                    "port": 443})  # fmt: skip
        ask = await call(state_dir, "rule.test", {"peer": "phone", "address": "198.51.100.1"})
        ads = await call(state_dir, "rule.test", {"peer": "laptop", "hostname": "ads.example.com",
                                                  "port": 443})  # fmt: skip
        bank = await call(
            state_dir, "rule.test", {"peer": "laptop", "hostname": "www.bank.example", "port": 443}
        )
        unknown = await error_of(state_dir, "rule.test", {"peer": "tablet", "hostname": "x.y"})
        nothing = await error_of(state_dir, "rule.test", {"peer": "phone"})
        bad_proto = await error_of(
            state_dir, "rule.test", {"peer": "phone", "hostname": "x.y", "proto": "icmp"}
        )
    assert (phone["access"], phone["access_rule"]) == ("allow", "rphone")
    assert (ask["access"], ask["access_rule"], ask["fallback"]) == ("ask", "default", "deny")
    assert (ads["access"], ads["access_rule"], ads["dns"], ads["dns_rule"]) == (
        "deny", "rads", "nxdomain", "rads",
    )  # fmt: skip
    assert (bank["access"], bank["mode"], bank["mode_rule"]) == ("allow", "passthrough", "b2")
    assert unknown == ("not_found", "unknown peer 'tablet'")
    assert nothing == ("invalid", "a flow needs a hostname or an address")
    assert bad_proto[0] == "invalid"


# --- prompts ------------------------------------------------------------------------------------


async def test_prompts_list_and_answer(state_dir: Path) -> None:
    gateway = standard_gateway()
    async with serving(state_dir, gateway):
        listed = await call(state_dir, "prompts.list")
        answered = await call(state_dir, "prompt.answer", {"id": "p1", "access": "allow"})
        once = await call(state_dir, "prompt.answer", {
            "id": "p2", "access": "deny", "duration": "once", "scope": "port", "by": "cli",
        })  # fmt: skip
        again = await error_of(state_dir, "prompt.answer", {"id": "p1", "access": "allow"})
        after = await call(state_dir, "prompts.list")
    assert [doc["id"] for doc in listed["prompts"]] == ["p1", "p2"]
    assert listed["prompts"][0] | {"opened": 0, "deadline": 0} == {
        "id": "p1", "peer": "phone", "peer_public_key": PHONE_KEY,
        "hostname": "api.example.com", "dst_ip": "10.78.0.9", "dst_port": 443, "proto": "tcp",
        "route": "tls", "opened": 0, "deadline": 0, "waiting": 2,
    }  # fmt: skip
    assert answered == {"id": "p1", "access": "allow", "duration": "always", "scope": "host",
                        "rule": "ranswr"}  # fmt: skip
    assert once["rule"] is None
    assert gateway.calls == [
        ("answer_prompt", "p1", "allow", "always", "host", "control"),
        ("answer_prompt", "p2", "deny", "once", "port", "cli"),
    ]
    assert again == ("not_found", "no open prompt 'p1' (answered or timed out)")
    assert after == {"prompts": [], "total": 0, "next": None}


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"id": "p1", "access": "maybe"}, "invalid answer 'maybe': expected allow or deny"),
        ({"id": "p1", "access": "allow", "scope": "world"}, "invalid scope 'world'"),
        ({"id": "p1", "access": "allow", "duration": "soon"}, "invalid duration 'soon'"),
        ({"id": "p 1", "access": "allow"}, "invalid prompt id 'p 1'"),
    ],
)
async def test_prompt_answer_refuses_bad_values_before_the_gateway(
    state_dir: Path, params: dict[str, Any], reason: str
) -> None:
    gateway = standard_gateway()
    async with serving(state_dir, gateway):
        code, message = await error_of(state_dir, "prompt.answer", params)
    assert code == "invalid" and message.startswith(reason)
    assert gateway.calls == [] and len(gateway.open_prompts) == 2


# --- peer.set -----------------------------------------------------------------------------------


async def test_peer_set(state_dir: Path) -> None:
    gateway = standard_gateway()
    async with serving(state_dir, gateway):
        doc = await call(state_dir, "peer.set", {"name": "laptop", "policy": "ask",
                                                 "fallback": "allow"})  # fmt: skip
        only_fallback = await call(state_dir, "peer.set", {"name": "phone", "fallback": "allow"})
        bad = await error_of(state_dir, "peer.set", {"name": "phone", "policy": "maybe"})
        bad_fallback = await error_of(state_dir, "peer.set", {"name": "phone", "fallback": "ask"})
        neither = await error_of(state_dir, "peer.set", {"name": "phone"})
        unknown = await error_of(state_dir, "peer.set", {"name": "tablet", "policy": "deny"})
    assert doc == {"name": "laptop", "public_key": LAPTOP_KEY, "ip": "10.77.0.2",
                   "policy": "ask", "fallback": "allow"}  # fmt: skip
    assert (only_fallback["policy"], only_fallback["fallback"]) == ("ask", "allow")
    assert bad == ("invalid", "invalid policy 'maybe': expected allow or deny or ask")
    assert bad_fallback[0] == "invalid"
    assert neither == ("invalid", "peer.set: give 'policy', 'fallback' or both")
    assert unknown == ("not_found", "unknown peer 'tablet'")
    assert gateway.calls == [
        ("set_peer_policy", "laptop", "ask", "allow"),
        ("set_peer_policy", "phone", None, "allow"),
    ]
