"""The prompt book: first contacts of `ask` peers waiting for the operator (sans-IO).

Why a book apart from the gateway: a prompt outlives the flow that opened it (the client may
retry, more flows join it, the operator answers from the console or `decide`), and every part of
it is a resource a peer can make us spend, so its rules (joining, bounds, ids, timeouts, what an
answer makes) live here where a transcript test can drive them with no sockets, no clock and no
flows.  Time is a parameter (the caller's wall clock: `opened` and `deadline` are shown); a held
flow is an opaque hashable token (a connection id) the caller passes in and gets back.

    book = PromptBook(timeout=30.0)
    asked = book.ask(PromptKey(peer_key, "api.example.com", "93.184.216.34", 443, "tcp"),
                     "phone", "tls", now, hold=conn_id)
    asked.new -> publish PromptOpened; asked.refused -> refuse the flow with that reason
    answered = book.answer("p1", "allow", parse_duration("1h"), "domain", now)
    answered.rules -> add them; answered.held -> release (allow) or refuse (deny) these flows
    book.expire(now) -> timed-out prompts: apply the peer's fallback to their held flows
    book.next_deadline() -> when to call expire next

**Keys.** A prompt is for (peer, hostname or else the IP, port, protocol): a flow to the same
hostname and port (at any of its addresses), or to the same IP with no hostname, joins the open
prompt instead of opening another; its token is held with the others.  A hostname that is no
valid rule target (`PromptKey` checks it with the rule parser) is dropped: the prompt is by IP.

**Bounds.**  Per peer: open prompts (`per_peer_prompts`) and held flows (`per_peer_held`); in
all: open prompts (`max_prompts`) and held flows (`max_held`).  Past one, `ask` opens nothing and
holds nothing and says why in one line (`Asked.refused`); the caller refuses the flow.  An ask
without a token (a UDP datagram, dropped while the prompt is open) joins without holding.
The memory of closed prompts (for KeyError messages) and of `once` answers is bounded too.

**Ids** are "p1", "p2", ... in opening order, never reused within a run (the book's life): short
to type in `unclaw-tui decide p3 allow`.  `pending()` is the queue, oldest first.

**Answers.**  access `allow`/`deny` x a `Duration` (or its text: once, 15m, 1h, restart, always,
any timed) x scope:

| scope    | rule(s) for the peer (who = its name), note "prompt pN"                        |
|----------|--------------------------------------------------------------------------------|
| `port`   | this hostname (or IP), this port, this protocol                                 |
| `host`   | this hostname (or IP), any port, any protocol                                   |
| `domain` | two rules: the registrable domain itself and `*.` it (a glob is only the names  |
|          | below), any port, any protocol; registrable per the packaged Public Suffix List |

`domain` for a prompt with no hostname, or a hostname with no registrable domain (a public
suffix, a single label), falls back to `host` and `Answered.notice` says so; `port` for port 0
(no rule can name it) falls back to `host` the same way.  A deny at `host` or `domain` scope has
no port and no protocol, so our DNS answers NXDOMAIN for the name (matcher.py).

`once` makes no rule: the held flows get the answer, and `recent_once(key, now)` lets it stand
for one retry of the same key within `timeout` after the answer (a client that gave up while
the prompt was open tries again; that retry must not open a second prompt).  The caller asks
`recent_once` before `ask`; the first call that gets the answer uses it up, so `once` lets
through at most the held flows and one more.

Answering a prompt that is not open raises `PromptNotOpen` (a KeyError whose str is the plain
message: answered, timed out, withdrawn, its peer removed, or no such prompt).  A bad access,
duration or scope raises ValueError and leaves the prompt open.

Beyond the interface of the issue's plan: `get`, `withdraw` (a rule added meanwhile decides the
prompt's flows), `unhold` (a held flow went away before the answer), `Answered.rule_id`.
Not thread-safe: one owner (the gateway's loop) calls it.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from unclaw_tui.policy.domains import domain_scope
from unclaw_tui.policy.durations import Duration, Lifetime, parse_duration
from unclaw_tui.policy.rules import Rule, make_rule
from unclaw_tui.policy.targets import TargetKind, normalize_address, parse_target
from unclaw_tui.policy.views import PromptView

MAX_TIMEOUT = 86400.0  # a prompt nobody answers for a day is not a prompt any more
CLOSED_MEMORY = 256  # closed prompts remembered for KeyError messages
RECENT_ONCE_MEMORY = 1024  # once answers waiting for their client's retry
_ID_RE = re.compile(r"p([1-9][0-9]{0,17})")

Token = Hashable


class Scope(StrEnum):
    PORT = "port"
    HOST = "host"
    DOMAIN = "domain"


_ANSWERS = ("allow", "deny")
_PROTOS = ("tcp", "udp")


class PromptNotOpen(KeyError):
    """No open prompt of that id; str() is the message itself (KeyError's would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "prompt not open"


@dataclass(frozen=True, slots=True)
class PromptKey:
    """What a prompt asks about; normalized on construction (ValueError for a bad IP, port or
    protocol: those come from a parsed packet, so a bad one is the caller's bug)."""

    peer_key: str  # the peer's public key (base64)
    hostname: str | None  # the VIP's name or the TLS SNI; None: by address
    dst_ip: str
    dst_port: int
    proto: str  # tcp / udp

    def __post_init__(self) -> None:
        if not self.peer_key:
            raise ValueError("prompt key: empty peer key")
        address = normalize_address(ipaddress.ip_address(self.dst_ip))
        object.__setattr__(self, "dst_ip", str(address))
        object.__setattr__(self, "hostname", _rule_hostname(self.hostname))
        if not isinstance(self.dst_port, int) or not 0 <= self.dst_port <= 65535:
            raise ValueError(f"prompt key: invalid port {self.dst_port!r}")
        proto = self.proto.lower()
        if proto not in _PROTOS:
            raise ValueError(f"prompt key: invalid protocol {self.proto!r}: expected tcp or udp")
        object.__setattr__(self, "proto", proto)

    @property
    def target(self) -> str:
        """What the prompt's rules name at `port`/`host` scope: the hostname, else the IP."""
        return self.hostname if self.hostname is not None else self.dst_ip

    @property
    def ident(self) -> tuple[str, str, int, str]:
        """Flows with the same ident share a prompt."""
        return (self.peer_key, self.target, self.dst_port, self.proto)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A snapshot of a prompt (open or just closed)."""

    id: str
    key: PromptKey
    peer: str  # the peer's name: rules made from the answer are for it
    route: str  # tls / relay / vip
    opened: float
    deadline: float  # the peer's fallback applies then
    held: tuple[Token, ...] = ()  # flows waiting on it, oldest first
    asks: int = 1  # flows that met it (the first and every join), held or not

    def view(self) -> PromptView:
        return PromptView(
            id=self.id,
            peer=self.peer,
            peer_public_key=self.key.peer_key,
            hostname=self.key.hostname,
            dst_ip=self.key.dst_ip,
            dst_port=self.key.dst_port,
            proto=self.key.proto,
            route=self.route,
            opened=self.opened,
            deadline=self.deadline,
            waiting=max(1, len(self.held)),
        )


@dataclass(frozen=True, slots=True)
class Asked:
    """`ask`'s result.  prompt: the prompt opened or joined (None if refused before one was
    opened); new: a prompt was opened (publish PromptOpened); refused: past a bound, the flow
    is not held (refuse it with this one-line reason)."""

    prompt: Prompt | None
    new: bool = False
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class Answered:
    """`answer`'s result: the prompt (closed), what was decided, the rules to add (none for
    once), and in `prompt.held` the flows to release (allow) or refuse (deny)."""

    prompt: Prompt
    access: str  # allow / deny
    duration: Duration
    scope: Scope  # as applied: a domain or port scope may have fallen back to host
    rules: tuple[Rule, ...] = ()
    notice: str | None = None  # why the scope is not the one asked for

    @property
    def held(self) -> tuple[Token, ...]:
        return self.prompt.held

    @property
    def rule_id(self) -> str | None:
        """The rule to name (GatewayProtocol.answer_prompt's result): the first one made."""
        return self.rules[0].id if self.rules else None


@dataclass(slots=True)
class _Open:
    id: str
    key: PromptKey
    peer: str
    route: str
    opened: float
    deadline: float
    held: dict[Token, None] = field(default_factory=dict)  # ordered set
    asks: int = 1

    def snapshot(self) -> Prompt:
        return Prompt(
            self.id,
            self.key,
            self.peer,
            self.route,
            self.opened,
            self.deadline,
            tuple(self.held),
            self.asks,
        )


class PromptBook:
    def __init__(
        self,
        timeout: float,
        per_peer_prompts: int = 16,
        per_peer_held: int = 64,
        *,
        max_prompts: int = 1024,
        max_held: int = 4096,
    ) -> None:
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"prompt timeout must be more than 0 and at most {MAX_TIMEOUT:g} s")
        for name, bound in (
            ("per_peer_prompts", per_peer_prompts),
            ("per_peer_held", per_peer_held),
            ("max_prompts", max_prompts),
            ("max_held", max_held),
        ):
            if bound < 1:
                raise ValueError(f"{name} must be at least 1")
        self.timeout = float(timeout)
        self.per_peer_prompts = per_peer_prompts
        self.per_peer_held = per_peer_held
        self.max_prompts = max_prompts
        self.max_held = max_held
        self._open: dict[str, _Open] = {}  # insertion order is the queue: oldest first
        self._by_ident: dict[tuple[str, str, int, str], str] = {}
        self._token_at: dict[Token, str] = {}  # held token -> its prompt's id
        self._peer_prompts: Counter[str] = Counter()
        self._peer_held: Counter[str] = Counter()
        self._closed: OrderedDict[str, str] = OrderedDict()  # id -> how it closed
        self._recent: OrderedDict[tuple[str, str, int, str], tuple[str, float]] = OrderedDict()
        self._next = 1

    # --- looking -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._open)

    def get(self, prompt_id: str) -> Prompt | None:
        found = self._open.get(prompt_id)
        return None if found is None else found.snapshot()

    def pending(self) -> list[PromptView]:
        """The open prompts, oldest first."""
        return [p.snapshot().view() for p in self._open.values()]

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._open.values()), default=None)

    # --- a flow meets the book -----------------------------------------------------------------

    def ask(
        self, key: PromptKey, peer_name: str, route: str, now: float, hold: Token | None = None
    ) -> Asked:
        """An undecided flow of an `ask` peer: open a prompt for its key or join the open one,
        holding `hold` (a token for the flow) until the answer or the timeout.  The same token
        asked again (a SYN retransmitted) is held once."""
        found = self._by_ident.get(key.ident)
        if found is not None:
            return self._join(self._open[found], peer_name, hold)
        refused = self._prompt_refusal(key.peer_key, peer_name)
        if refused is None and hold is not None and hold not in self._token_at:
            refused = self._held_refusal(key.peer_key, peer_name)
        if refused is not None:
            return Asked(None, refused=refused)
        prompt = _Open(f"p{self._next}", key, peer_name, route, now, now + self.timeout)
        self._next += 1
        self._open[prompt.id] = prompt
        self._by_ident[key.ident] = prompt.id
        self._peer_prompts[key.peer_key] += 1
        if hold is not None:
            self._hold(prompt, hold)
        return Asked(prompt.snapshot(), new=True)

    def _join(self, prompt: _Open, peer_name: str, hold: Token | None) -> Asked:
        if hold is not None and hold not in self._token_at:
            refused = self._held_refusal(prompt.key.peer_key, peer_name)
            if refused is not None:
                return Asked(prompt.snapshot(), refused=refused)
            self._hold(prompt, hold)
        prompt.asks += 1
        return Asked(prompt.snapshot())

    def _prompt_refusal(self, peer_key: str, peer_name: str) -> str | None:
        count = self._peer_prompts[peer_key]
        if count >= self.per_peer_prompts:
            return (
                f"{peer_name} already has {count} prompts open, the most per peer: "
                "refused until one is answered or times out"
            )
        if len(self._open) >= self.max_prompts:
            return f"{len(self._open)} prompts open in all, the most the gateway keeps: refused"
        return None

    def _held_refusal(self, peer_key: str, peer_name: str) -> str | None:
        count = self._peer_held[peer_key]
        if count >= self.per_peer_held:
            return (
                f"{peer_name} already has {count} flows held on prompts, the most per peer: "
                "refused until a prompt is answered or times out"
            )
        if len(self._token_at) >= self.max_held:
            return f"{len(self._token_at)} flows held on prompts in all, the most: refused"
        return None

    def _hold(self, prompt: _Open, token: Token) -> None:
        prompt.held[token] = None
        self._token_at[token] = prompt.id
        self._peer_held[prompt.key.peer_key] += 1

    def unhold(self, token: Token) -> str | None:
        """A held flow went away before the answer (its client reset it): stop holding it.
        Returns the id of the prompt it waited on (which stays open), or None."""
        prompt_id = self._token_at.pop(token, None)
        if prompt_id is None:
            return None
        prompt = self._open[prompt_id]
        del prompt.held[token]
        self._peer_held[prompt.key.peer_key] -= 1
        return prompt_id

    def recent_once(self, key: PromptKey, now: float) -> str | None:
        """The access ("allow"/"deny") of an unused `once` answer for this key given within
        `timeout` before now: the caller applies it to this flow, and it is used up.  None
        otherwise: decide as usual (ask when nothing else decides)."""
        self._forget_recent(now)
        found = self._recent.pop(key.ident, None)
        return None if found is None else found[0]

    # --- the operator answers ------------------------------------------------------------------

    def answer(
        self,
        prompt_id: str,
        access: str,
        duration: Duration | str,
        scope: str,
        now: float,
        *,
        taken: Iterable[str] = (),
    ) -> Answered:
        """Close the prompt with access (allow/deny), duration and scope (port/host/domain),
        making its rules (ids not in `taken`).  PromptNotOpen (a KeyError) if it is not open;
        ValueError for a bad value (the prompt stays open)."""
        prompt = self._open_prompt(prompt_id)
        word = access.strip().lower() if isinstance(access, str) else access
        if word not in _ANSWERS:
            raise ValueError(f"invalid answer {access!r}: expected allow or deny")
        if isinstance(duration, str):
            duration = parse_duration(duration)
        asked_scope = _parse_scope(scope)
        applied, targets, notice = _scope_targets(prompt.key, asked_scope)
        rules: list[Rule] = []
        if duration.lifetime is not Lifetime.ONCE:
            used = set(taken)
            for target in targets:
                rule = make_rule(
                    word,
                    target,
                    now=now,
                    who=prompt.peer,
                    ports=str(prompt.key.dst_port) if applied is Scope.PORT else None,
                    proto=prompt.key.proto if applied is Scope.PORT else "any",
                    duration=duration,
                    note=f"prompt {prompt.id}",
                    taken=used,
                )
                used.add(rule.id)
                rules.append(rule)
        closed = self._close(prompt, f"answered already ({word} {duration}, {applied} scope)")
        if duration.lifetime is Lifetime.ONCE:
            self._remember_once(prompt.key, word, now)
        return Answered(closed, word, duration, applied, tuple(rules), notice)

    def withdraw(self, prompt_id: str, reason: str) -> Prompt:
        """Close a prompt without an answer (a rule added meanwhile decides its flows, the
        peer's policy changed): the caller decides the returned held flows.  PromptNotOpen if
        it is not open."""
        return self._close(self._open_prompt(prompt_id), f"withdrawn ({reason[:100]})")

    # --- time and peers ------------------------------------------------------------------------

    def expire(self, now: float) -> list[Prompt]:
        """Close and return the prompts whose deadline has come, oldest first: the caller
        applies each peer's fallback to their held flows."""
        self._forget_recent(now)
        due = [p for p in self._open.values() if p.deadline <= now]
        return [self._close(p, "timed out (the peer's fallback applied)") for p in due]

    def drop_peer(self, peer_key: str) -> list[Prompt]:
        """The peer was removed: close and return its prompts (their held flows go with it),
        and forget its `once` answers."""
        mine = [p for p in self._open.values() if p.key.peer_key == peer_key]
        for ident in [i for i in self._recent if i[0] == peer_key]:
            del self._recent[ident]
        return [self._close(p, "its peer was removed") for p in mine]

    # --- inside --------------------------------------------------------------------------------

    def _open_prompt(self, prompt_id: str) -> _Open:
        found = self._open.get(prompt_id) if isinstance(prompt_id, str) else None
        if found is not None:
            return found
        how = self._closed.get(prompt_id) if isinstance(prompt_id, str) else None
        if how is not None:
            raise PromptNotOpen(f"prompt {prompt_id} is not open: {how}")
        match = _ID_RE.fullmatch(prompt_id) if isinstance(prompt_id, str) else None
        if match is not None and int(match[1]) < self._next:
            raise PromptNotOpen(
                f"prompt {prompt_id} is not open any more (answered, timed out or withdrawn)"
            )
        shown = prompt_id[:40] if isinstance(prompt_id, str) else prompt_id
        raise PromptNotOpen(f"no prompt {shown!r} (ids are like p1; see the open prompts)")

    def _close(self, prompt: _Open, how: str) -> Prompt:
        snapshot = prompt.snapshot()
        del self._open[prompt.id]
        del self._by_ident[prompt.key.ident]
        self._peer_prompts[prompt.key.peer_key] -= 1
        if not self._peer_prompts[prompt.key.peer_key]:
            del self._peer_prompts[prompt.key.peer_key]
        for token in prompt.held:
            del self._token_at[token]
        self._peer_held[prompt.key.peer_key] -= len(prompt.held)
        if not self._peer_held[prompt.key.peer_key]:
            del self._peer_held[prompt.key.peer_key]
        self._closed[prompt.id] = how
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)
        return snapshot

    def _remember_once(self, key: PromptKey, access: str, now: float) -> None:
        self._recent.pop(key.ident, None)
        self._recent[key.ident] = (access, now + self.timeout)
        while len(self._recent) > RECENT_ONCE_MEMORY:
            self._recent.popitem(last=False)

    def _forget_recent(self, now: float) -> None:
        # Entries go in answer order and live equally long, so the stale ones are in front.
        while self._recent:
            ident, (_, until) = next(iter(self._recent.items()))
            if until > now:
                break
            del self._recent[ident]


def _rule_hostname(hostname: str | None) -> str | None:
    """The hostname as a rule would name it, or None if no rule could (then the prompt is by
    address): an empty name, an IP literal, a malformed name."""
    if not hostname:
        return None
    try:
        target = parse_target(hostname)
    except ValueError:
        return None
    return target.text if target.kind is TargetKind.HOST else None


def _parse_scope(text: str) -> Scope:
    try:
        return Scope(text.strip().lower())
    except (ValueError, AttributeError):
        raise ValueError(f"invalid scope {text!r}: expected port, host or domain") from None


def _scope_targets(key: PromptKey, scope: Scope) -> tuple[Scope, tuple[str, ...], str | None]:
    """The scope as applied, the rule targets, and a notice if it fell back to host."""
    if scope is Scope.PORT:
        if key.dst_port == 0:
            return Scope.HOST, (key.target,), "port 0 cannot be named by a rule: host scope"
        return scope, (key.target,), None
    if scope is Scope.HOST:
        return scope, (key.target,), None
    if key.hostname is None:
        return (
            Scope.HOST,
            (key.dst_ip,),
            f"no hostname for {key.dst_ip}, so no domain: the answer covers this address",
        )
    targets = domain_scope(key.hostname)
    if len(targets) == 1:
        return (
            Scope.HOST,
            targets,
            f"{key.hostname} has no registrable domain (a public suffix or a single label): "
            "the answer covers this host only",
        )
    return scope, targets, None
