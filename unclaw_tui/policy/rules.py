"""The Rule: who, what, which ports and protocol, an action, how long, a note.

A rule acts on one of two dimensions of a flow's verdict: access (`allow`, `deny`) or, for TLS,
mode (`intercept`, `passthrough`).  `precedence(rule)` is the total order the matcher uses (see
matcher.py for the table): smaller is more specific, and so wins.

On disk (store.py) a rule is one JSON object per line:

    {"id": "r7kq2m", "action": "allow", "what": "*.example.com", "who": "phone", "port": 443,
     "proto": "tcp", "until": "2025-06-01T12:00:00Z", "note": "", "created": "2025-05-31T12:00:00Z"}

`who` is a peer name, a peer's public key, or "*" (every peer); `port` a number, "N-M" or
"any"; `until` "always" or an absolute UTC time.  `once` and `restart` rules live only in the
running gateway's memory: neither would mean anything after a restart.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from unclaw_tui import keys
from unclaw_tui.policy.durations import Duration, Lifetime
from unclaw_tui.policy.targets import (
    IPNetwork,
    Ports,
    Target,
    TargetKind,
    parse_pattern,
    parse_ports,
    parse_target,
)
from unclaw_tui.state import validate_peer_name

EVERY_PEER = "*"
ANY = "any"
DEFAULT_RULE = "default"  # the rule id a verdict names when no rule matched
MAX_NOTE = 200
_ID_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_BUILTIN_ID_RE = re.compile(r"b[0-9]+")
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o, 1/l: ids are read aloud and typed


class Dimension(StrEnum):
    ACCESS = "access"
    MODE = "mode"


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    INTERCEPT = "intercept"
    PASSTHROUGH = "passthrough"

    @property
    def dimension(self) -> Dimension:
        if self in (Action.ALLOW, Action.DENY):
            return Dimension.ACCESS
        return Dimension.MODE


class Proto(StrEnum):
    TCP = "tcp"
    UDP = "udp"
    ANY = "any"


# At a tie on everything else, the stricter action wins: deny over allow, and passthrough (we
# see less) over intercept.
_ACTION_RANK = {Action.DENY: 1, Action.ALLOW: 0, Action.PASSTHROUGH: 1, Action.INTERCEPT: 0}
# The "what" of a rule, most specific first: exact host, globs by label count, built-in
# patterns, CIDRs by prefix length (the major rank; the minor orders within it).
_WHAT_MAJOR = {TargetKind.HOST: 3, TargetKind.GLOB: 2, TargetKind.PATTERN: 1, TargetKind.NET: 0}


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    action: Action
    target: Target
    who: str = EVERY_PEER  # a peer name, a peer's public key, or EVERY_PEER
    ports: Ports | None = None  # None: any port
    proto: Proto = Proto.ANY
    lifetime: Lifetime = Lifetime.ALWAYS
    expires: float | None = None  # absolute (TIMED only)
    note: str = ""
    created: float = 0.0
    builtin: bool = False  # from --allow/--deny/--passthrough: never written to the file
    order: tuple[Any, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "order", precedence(self))

    @property
    def dimension(self) -> Dimension:
        return self.action.dimension

    @property
    def persistent(self) -> bool:
        """Belongs in rules.json (always or timed, not built-in)."""
        return not self.builtin and self.lifetime in (Lifetime.ALWAYS, Lifetime.TIMED)

    @property
    def whole_name(self) -> bool:
        """No port and no protocol: a deny of this kind denies the name itself (NXDOMAIN)."""
        return self.ports is None and self.proto is Proto.ANY

    def live(self, now: float) -> bool:
        return self.expires is None or now < self.expires


def precedence(rule: Rule) -> tuple[Any, ...]:
    """The rule's place in the total order; smaller is more specific and wins.  The final id
    only makes the order total among rules that say the same thing."""
    target = rule.target
    if target.kind is TargetKind.GLOB:
        what_minor = target.suffix.count(".") + 1
    elif target.kind is TargetKind.NET:
        assert target.network is not None
        what_minor = target.network.prefixlen
    else:
        what_minor = 0
    if rule.ports is None:
        port_major, width = 0, 0
    elif rule.ports.single:
        port_major, width = 2, 0
    else:
        port_major, width = 1, rule.ports.high - rule.ports.low
    return (
        1 if rule.who == EVERY_PEER else 0,
        -_WHAT_MAJOR[target.kind],
        -what_minor,
        -port_major,
        width,
        0 if rule.proto is not Proto.ANY else 1,
        -_ACTION_RANK[rule.action],
        rule.id,
    )


def parse_who(text: str) -> str:
    """A peer name, a public key (44 characters of base64) or `*` for every peer."""
    who = text.strip()
    if who == EVERY_PEER:
        return who
    if len(who) == 44:
        try:
            keys.validate_key(who)
        except ValueError:
            pass
        else:
            return who
    try:
        return validate_peer_name(who)
    except ValueError:
        raise ValueError(
            f"invalid peer {text!r}: expected a peer name, a public key, or '*' for every peer"
        ) from None


def parse_action(text: str) -> Action:
    try:
        return Action(text.strip().lower())
    except ValueError:
        raise ValueError(
            f"invalid action {text!r}: expected allow, deny, intercept or passthrough"
        ) from None


def parse_proto(text: str) -> Proto:
    try:
        return Proto(text.strip().lower())
    except ValueError:
        raise ValueError(f"invalid protocol {text!r}: expected tcp, udp or any") from None


def parse_note(text: str) -> str:
    if len(text) > MAX_NOTE or any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"invalid note: at most {MAX_NOTE} characters, no control characters")
    return text


def validate_rule_id(text: str) -> str:
    if not _ID_RE.fullmatch(text) or text == DEFAULT_RULE:
        raise ValueError(
            f"invalid rule id {text!r}: 1-32 lower-case letters, digits, '-' or '_' (not 'default')"
        )
    if _BUILTIN_ID_RE.fullmatch(text):
        raise ValueError(f"invalid rule id {text!r}: b<number> names the built-in rules")
    return text


def new_rule_id(taken: Iterable[str] = ()) -> str:
    """A short random id ("r" and 5 characters), not one of taken: random rather than a counter
    so the CLI and the gateway can make rules at once without agreeing on a next number."""
    used = set(taken)
    while True:
        rule_id = "r" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(5))
        if rule_id not in used:
            return rule_id


def make_rule(
    action: str,
    target: str,
    *,
    now: float,
    who: str = EVERY_PEER,
    ports: str | None = None,
    proto: str = ANY,
    duration: Duration | None = None,
    note: str = "",
    rule_id: str | None = None,
    taken: Iterable[str] = (),
) -> Rule:
    """A new rule from the CLI's words (`rule add`, `decide`); ValueError with a reason."""
    duration = duration or Duration(Lifetime.ALWAYS)
    return Rule(
        id=validate_rule_id(rule_id) if rule_id is not None else new_rule_id(taken),
        action=parse_action(action),
        target=parse_target(target),
        who=parse_who(who),
        ports=None if ports is None or ports == ANY else parse_ports(ports),
        proto=parse_proto(proto),
        lifetime=duration.lifetime,
        expires=duration.expires(now),
        note=parse_note(note),
        created=now,
    )


def builtin_rules(
    allow: Iterable[IPNetwork] = (),
    deny: Iterable[IPNetwork] = (),
    passthrough: Iterable[str] = (),
) -> list[Rule]:
    """The flags of this run as rules for every peer: `--allow`/`--deny CIDR`, `--passthrough
    GLOB`, with ids b1, b2, ... in that order.  (The egress refusals stay under every rule, in
    the egress policy; `--allow` there is what opens them.)"""
    made: list[tuple[Action, Target]] = []
    for action, networks in ((Action.ALLOW, allow), (Action.DENY, deny)):
        for network in networks:
            made.append((action, parse_target(str(network))))
    made.extend((Action.PASSTHROUGH, parse_pattern(p)) for p in passthrough)
    return [
        Rule(id=f"b{i}", action=action, target=target, builtin=True, note="flag")
        for i, (action, target) in enumerate(made, 1)
    ]


# --- the file's form ----------------------------------------------------------------------------

_FIELDS = ("id", "action", "what", "who", "port", "proto", "until", "note", "created")


def format_time(when: float) -> str:
    stamp = dt.datetime.fromtimestamp(when, dt.UTC)
    return stamp.isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: Any, what: str) -> float:
    """An ISO 8601 time ("2025-06-01T12:00:00Z"; no zone means UTC) or a Unix time."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if not isinstance(value, str) or len(value) > 40:
        raise ValueError(f"{what} must be a time like 2025-06-01T12:00:00Z")
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a time like 2025-06-01T12:00:00Z") from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


def rule_to_doc(rule: Rule) -> dict[str, Any]:
    """The file's form of a persistent rule, keys in a fixed order."""
    if rule.ports is None:
        port: int | str = ANY
    else:
        port = rule.ports.low if rule.ports.single else str(rule.ports)
    until = format_time(rule.expires) if rule.expires is not None else Lifetime.ALWAYS.value
    return {
        "id": rule.id,
        "action": rule.action.value,
        "what": rule.target.text,
        "who": rule.who,
        "port": port,
        "proto": rule.proto.value,
        "until": until,
        "note": rule.note,
        "created": format_time(rule.created),
    }


def rule_from_doc(doc: Any) -> Rule:
    """A rule from the file; ValueError naming the field.  Only id, action and what are
    required; the rest default to every peer, any port, any protocol, always."""
    if not isinstance(doc, dict):
        raise ValueError("a rule must be a JSON object")
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)})")
    for key in ("id", "action", "what"):
        if not isinstance(doc.get(key), str):
            raise ValueError(f"'{key}' is missing or not a string")
    rule_id = validate_rule_id(doc["id"])
    for key in ("who", "proto", "note", "until"):
        if key in doc and not isinstance(doc[key], str):
            raise ValueError(f"'{key}' must be a string")
    port = doc.get("port", ANY)
    if isinstance(port, int) and not isinstance(port, bool):
        port = str(port)
    if not isinstance(port, str):
        raise ValueError('\'port\' must be a number, "N-M" or "any"')
    until = doc.get("until", Lifetime.ALWAYS.value)
    if until == Lifetime.ALWAYS:
        lifetime, expires = Lifetime.ALWAYS, None
    elif until in (Lifetime.ONCE, Lifetime.RESTART):
        raise ValueError(f"'until' {until!r} rules live only in a running gateway")
    else:
        lifetime, expires = Lifetime.TIMED, parse_time(until, "'until'")
    return Rule(
        id=rule_id,
        action=parse_action(doc["action"]),
        target=parse_target(doc["what"]),
        who=parse_who(doc.get("who", EVERY_PEER)),
        ports=None if port == ANY else parse_ports(port),
        proto=parse_proto(doc.get("proto", ANY)),
        lifetime=lifetime,
        expires=expires,
        note=parse_note(doc.get("note", "")),
        created=parse_time(doc.get("created", 0), "'created'"),
    )
