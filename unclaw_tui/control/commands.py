"""The policy's control methods: what `unclaw-tui rule ...`, `decide`, `prompts` and `peer set`
ask a running gateway, the same GatewayProtocol calls the console makes.

    register_policy_commands(server, gateway)

| method | params | result |
|---|---|---|
| `rules.list` | `offset`? | `{"rules": [rule...], "total": N, "next": offset or null}` |
| `rule.add` | `action`, `target`, `peer`?, `port`?, `proto`?, `duration`?, `note`?, `by`? | rule |
| `rule.remove` | `id` | the removed rule |
| `rule.test` | `peer`, `hostname`?, `address`?, `port`?, `proto`? | verdict (verdict_for.py) |
| `prompts.list` | `offset`? | `{"prompts": [prompt...], "total": N, "next": offset or null}` |
| `prompt.answer` | `id`, `access`, `duration`?, `scope`?, `by`? | `{"id", ..., "rule"}` |
| `peer.set` | `name`, `policy`?, `fallback`? | the peer |

A rule is `{"id", "action", "what", "who", "port", "proto", "lifetime", "until", "expires",
"note", "created", "builtin", "hits", "last_hit"}`: `until` is "always", "restart", "once" or
the expiry as UTC text, `expires` and the times are Unix seconds (wall clock).  Lists come in
pages that fit one message (64 KiB): ask again with `offset` = `next` until it is null.  Pages
are cut from the list as it is at each call, so a rule added meanwhile may show twice or not
at all; the CLI reads them all within a moment.

Bad values are refused with `invalid` (a ValueError of the gateway's or of the parsing here),
unknown names, rules and prompts with `not_found`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from unclaw_tui.control.protocol import Param
from unclaw_tui.policy.durations import parse_duration
from unclaw_tui.policy.matcher import Policy
from unclaw_tui.policy.rules import (
    ANY,
    EVERY_PEER,
    Rule,
    format_time,
    make_rule,
    parse_who,
)
from unclaw_tui.policy.targets import parse_port
from unclaw_tui.policy.verdict_for import FlowQuery, verdict_for
from unclaw_tui.state import PEER_FALLBACKS, PEER_POLICIES

if TYPE_CHECKING:
    from unclaw_tui.control.server import ControlServer
    from unclaw_tui.gateway import GatewayProtocol, PeerSnapshot
    from unclaw_tui.policy.views import PromptView, RuleView

PAGE_BYTES = 48 * 1024  # a page's items, encoded; the rest of the 64 KiB is the envelope
ACCESSES = ("allow", "deny")
SCOPES = ("port", "host", "domain")
MAX_TEXT = 400  # bound on any string parameter before it is parsed
_BY_RE = re.compile(r"[a-z][a-z0-9_-]{0,15}")
_PROMPT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

OPTIONAL_STR = Param(str, required=False)
OPTIONAL_INT = Param(int, required=False)


# --- documents ------------------------------------------------------------------------------


def port_text(rule: Rule) -> str:
    return ANY if rule.ports is None else str(rule.ports)


def until_text(rule: Rule) -> str:
    if rule.expires is not None:
        return format_time(rule.expires)
    return rule.lifetime.value


def rule_doc(rule: Rule, hits: int = 0, last_hit: float | None = None) -> dict[str, Any]:
    return {
        "id": rule.id,
        "action": rule.action.value,
        "what": rule.target.text,
        "who": rule.who,
        "port": port_text(rule),
        "proto": rule.proto.value,
        "lifetime": rule.lifetime.value,
        "until": until_text(rule),
        "expires": rule.expires,
        "note": rule.note,
        "created": rule.created,
        "builtin": rule.builtin,
        "hits": hits,
        "last_hit": last_hit,
    }


def rule_view_doc(view: RuleView) -> dict[str, Any]:
    return rule_doc(view.rule, view.hits, view.last_hit)


def prompt_doc(prompt: PromptView) -> dict[str, Any]:
    return {
        "id": prompt.id,
        "peer": prompt.peer,
        "peer_public_key": prompt.peer_public_key,
        "hostname": prompt.hostname,
        "dst_ip": prompt.dst_ip,
        "dst_port": prompt.dst_port,
        "proto": prompt.proto,
        "route": prompt.route,
        "opened": prompt.opened,
        "deadline": prompt.deadline,
        "waiting": prompt.waiting,
    }


def peer_doc(peer: PeerSnapshot) -> dict[str, Any]:
    """Public facts only: never a private or preshared key."""
    return {
        "name": peer.name,
        "public_key": peer.public_key,
        "ip": peer.ip,
        "policy": peer.policy,
        "fallback": peer.fallback,
    }


def page(docs: Sequence[Any], offset: int, key: str, budget: int = PAGE_BYTES) -> dict[str, Any]:
    """docs[offset:] as far as they fit in budget bytes (at least one, so every page moves on;
    one item is far below the message bound), and where the next page starts."""
    if offset < 0:
        raise ValueError(f"invalid offset {offset}: expected 0 or more")
    items: list[Any] = []
    used = 0
    index = offset
    while index < len(docs):
        size = len(json.dumps(docs[index], separators=(",", ":"))) + 1
        if items and used + size > budget:
            break
        items.append(docs[index])
        used += size
        index += 1
    return {key: items, "total": len(docs), "next": index if index < len(docs) else None}


# --- parameter checks -------------------------------------------------------------------------


def _text(params: dict[str, Any], name: str, default: str | None = None) -> str | None:
    value = params.get(name, default)
    if value is not None and len(value) > MAX_TEXT:
        raise ValueError(f"{name!r} is longer than {MAX_TEXT} characters")
    return value


def _by(params: dict[str, Any]) -> str:
    by = _text(params, "by", "control")
    assert by is not None
    if not _BY_RE.fullmatch(by):
        raise ValueError(f"invalid 'by' {by!r}: a short lower-case name such as 'cli'")
    return by


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"invalid {what} {value!r}: expected {' or '.join(choices)}")
    return value


def _find_peer(gateway: GatewayProtocol, who: str) -> PeerSnapshot:
    """The peer named, or whose public key this is; KeyError if none."""
    for peer in gateway.snapshot().peers:
        if who in (peer.name, peer.public_key):
            return peer
    raise KeyError(f"unknown peer {who!r}")


# --- the methods ------------------------------------------------------------------------------


def rules_list(gateway: GatewayProtocol, params: dict[str, Any]) -> dict[str, Any]:
    views = gateway.rules()
    offset = params.get("offset", 0)
    # Only the page's documents are built: a big rule set costs one list, not one dict each.
    window = _Lazy(views, rule_view_doc)
    return page(window, offset, "rules")


def rule_add(gateway: GatewayProtocol, params: dict[str, Any]) -> dict[str, Any]:
    who = parse_who(_text(params, "peer", EVERY_PEER) or EVERY_PEER)
    if who != EVERY_PEER and len(who) != 44:  # a name must be a peer's; a key may come later
        _find_peer(gateway, who)
    port = params.get("port")
    duration = parse_duration(_text(params, "duration", "always") or "always")
    now = time.time()
    rule = make_rule(
        _text(params, "action") or "",
        _text(params, "target") or "",
        now=now,
        who=who,
        ports=None if port is None else str(port),
        proto=_text(params, "proto", ANY) or ANY,
        duration=duration,
        note=_text(params, "note", "") or "",
        taken=(view.rule.id for view in gateway.rules()),
    )
    return rule_view_doc(gateway.add_rule(rule, by=_by(params)))


def rule_remove(gateway: GatewayProtocol, params: dict[str, Any]) -> dict[str, Any]:
    rule_id = _text(params, "id") or ""
    for view in gateway.rules():
        if view.rule.id == rule_id and view.rule.builtin:
            raise ValueError(f"rule {rule_id} is built in: it comes from {builtin_flag(view.rule)}")
    return rule_doc(gateway.remove_rule(rule_id, by=_by(params)))


async def rule_test(gateway: GatewayProtocol, params: dict[str, Any]) -> dict[str, Any]:
    peer = _find_peer(gateway, _text(params, "peer") or "")
    port = params.get("port")
    if port is not None:
        port = parse_port(str(port))
    query = FlowQuery(
        hostname=_text(params, "hostname"),
        address=_text(params, "address"),
        port=port,
        proto=_text(params, "proto", "tcp") or "tcp",
    )
    # The gateway's own rule set (file, this run's once/restart rules, the flags'), judged by
    # the same Policy.decide, on a Policy built for the question: 0.2 s for 10,000 rules, so
    # in a thread, where the event loop gets the GIL back every few milliseconds.
    rules = [view.rule for view in gateway.rules()]
    return await asyncio.to_thread(_judge, rules, peer, query, time.time())


def _judge(rules: list[Rule], peer: PeerSnapshot, query: FlowQuery, now: float) -> dict[str, Any]:
    return verdict_for(Policy(rules), peer, query, now)


def prompts_list(gateway: GatewayProtocol, params: dict[str, Any]) -> dict[str, Any]:
    return page(_Lazy(gateway.prompts(), prompt_doc), params.get("offset", 0), "prompts")


def prompt_answer(gateway: GatewayProtocol, params: dict[str, Any]) -> dict[str, Any]:
    prompt_id = _text(params, "id") or ""
    if not _PROMPT_ID_RE.fullmatch(prompt_id):
        raise ValueError(f"invalid prompt id {prompt_id!r}")
    access = _choice(_text(params, "access") or "", ACCESSES, "answer")
    duration = _text(params, "duration", "always") or "always"
    parse_duration(duration)  # the reason, in the CLI's words, before the gateway sees it
    scope = _choice(_text(params, "scope", "host") or "host", SCOPES, "scope")
    rule_id = gateway.answer_prompt(prompt_id, access, duration, scope, by=_by(params))
    return {"id": prompt_id, "access": access, "duration": duration, "scope": scope,
            "rule": rule_id}  # fmt: skip


def peer_set(gateway: GatewayProtocol, params: dict[str, Any]) -> dict[str, Any]:
    name = _text(params, "name") or ""
    policy = _text(params, "policy")
    fallback = _text(params, "fallback")
    if policy is None and fallback is None:
        raise ValueError("peer.set: give 'policy', 'fallback' or both")
    if policy is not None:
        _choice(policy, PEER_POLICIES, "policy")
    if fallback is not None:
        _choice(fallback, PEER_FALLBACKS, "fallback")
    return peer_doc(gateway.set_peer_policy(name, policy, fallback))


def builtin_flag(rule: Rule) -> str:
    """The flag of this run a built-in rule comes from, as typed."""
    return f"the flag --{rule.action.value} {rule.target.text}"


class _Lazy(Sequence[Any]):
    """A list whose items are made from another's when read."""

    def __init__(self, items: Sequence[Any], make: Callable[[Any], Any]) -> None:
        self._items = items
        self._make = make

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._make(item) for item in self._items[index]]
        return self._make(self._items[index])


METHODS: dict[str, tuple[Callable[[GatewayProtocol, dict[str, Any]], Any], dict[str, Param]]] = {
    "rules.list": (rules_list, {"offset": OPTIONAL_INT}),
    "rule.add": (rule_add, {
        "action": Param(str), "target": Param(str), "peer": OPTIONAL_STR,
        "port": Param((int, str), required=False), "proto": OPTIONAL_STR,
        "duration": OPTIONAL_STR, "note": OPTIONAL_STR, "by": OPTIONAL_STR,
    }),
    "rule.remove": (rule_remove, {"id": Param(str), "by": OPTIONAL_STR}),
    "rule.test": (rule_test, {
        "peer": Param(str), "hostname": Param((str, type(None)), required=False),
        "address": Param((str, type(None)), required=False),
        "port": Param((int, type(None)), required=False), "proto": OPTIONAL_STR,
    }),
    "prompts.list": (prompts_list, {"offset": OPTIONAL_INT}),
    "prompt.answer": (prompt_answer, {
        "id": Param(str), "access": Param(str), "duration": OPTIONAL_STR,
        "scope": OPTIONAL_STR, "by": OPTIONAL_STR,
    }),
    "peer.set": (peer_set, {"name": Param(str), "policy": OPTIONAL_STR,
                            "fallback": OPTIONAL_STR}),
}  # fmt: skip


def register_policy_commands(server: ControlServer, gateway: GatewayProtocol) -> None:
    """Register the methods above on the gateway's control server."""
    for method, (handler, spec) in METHODS.items():
        server.register(method, _bound(handler, gateway), spec)


def _bound(
    handler: Callable[[GatewayProtocol, dict[str, Any]], Any], gateway: GatewayProtocol
) -> Callable[[dict[str, Any]], Any]:
    return lambda params: handler(gateway, params)
