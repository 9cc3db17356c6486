"""The prompt book as transcripts: each step is a call (flows meeting the book, the operator
answering, time passing) and the line it comes back as.  Times are seconds after T0."""

from __future__ import annotations

import pytest

from unclaw_tui.policy import (
    Access,
    Answered,
    Asked,
    Lifetime,
    Policy,
    Prompt,
    PromptBook,
    PromptKey,
    PromptNotOpen,
    Rule,
    parse_duration,
)
from unclaw_tui.policy.prompts import CLOSED_MEMORY, RECENT_ONCE_MEMORY

PHONE = "P" * 43 + "="
LAPTOP = "L" * 43 + "="
NAMES = {PHONE: "phone", LAPTOP: "laptop"}
T0 = 1_700_000_000.0
TIMEOUT = 30.0


def key(
    host: str | None = "api.example.com",
    ip: str = "93.184.216.34",
    port: int = 443,
    proto: str = "tcp",
    peer: str = PHONE,
) -> PromptKey:
    return PromptKey(peer, host, ip, port, proto)


def show_prompt(p: Prompt) -> str:
    held = " ".join(str(t) for t in p.held)
    return f"{p.id} {NAMES[p.key.peer_key]}->{p.key.target}:{p.key.dst_port}/{p.key.proto} [{held}]"


def show_rule(r: Rule) -> str:
    port = "any" if r.ports is None else str(r.ports)
    until = r.lifetime.value if r.expires is None else f"+{r.expires - T0:g}"
    return f"{r.action} {r.target} who={r.who} port={port}/{r.proto} {until} '{r.note}'"


class Transcript:
    """A book driven in the words of the tests: every call returns one line."""

    def __init__(self, **bounds: int) -> None:
        self.book = PromptBook(TIMEOUT, **bounds)

    def ask(self, k: PromptKey, at: float = 0, hold: object = None, route: str = "tls") -> str:
        asked = self.book.ask(k, NAMES[k.peer_key], route, T0 + at, hold=hold)
        assert isinstance(asked, Asked)
        if asked.refused is not None:
            where = f" (on {asked.prompt.id})" if asked.prompt else ""
            return f"refused{where}: {asked.refused}"
        assert asked.prompt is not None
        return ("opened " if asked.new else "joined ") + show_prompt(asked.prompt)

    def answer(
        self, pid: str, access: str, duration: str, scope: str = "host", at: float = 0
    ) -> list[str]:
        answered = self.book.answer(pid, access, parse_duration(duration), scope, T0 + at)
        assert isinstance(answered, Answered)
        head = f"{answered.access} {answered.duration} {answered.scope}"
        lines = [f"{head}: {show_prompt(answered.prompt)}"]
        lines += [show_rule(r) for r in answered.rules]
        if answered.notice:
            lines.append(f"notice: {answered.notice}")
        return lines

    def expire(self, at: float) -> list[str]:
        return [show_prompt(p) for p in self.book.expire(T0 + at)]

    def queue(self) -> list[str]:
        return [
            f"{v.id} {v.peer} {v.hostname or v.dst_ip}:{v.dst_port} waiting={v.waiting}"
            for v in self.book.pending()
        ]


# --- keys: who joins whom ---------------------------------------------------------------------


def test_a_first_contact_opens_a_prompt_and_later_flows_to_the_same_key_join_it() -> None:
    t = Transcript()
    assert t.ask(key(), hold="c1") == "opened p1 phone->api.example.com:443/tcp [c1]"
    # the same name at another of its addresses, a second later: the same question
    assert t.ask(key(ip="93.184.216.35"), at=1, hold="c2") == (
        "joined p1 phone->api.example.com:443/tcp [c1 c2]"
    )
    # the SYN of c1 retransmitted: held once
    assert t.ask(key(), at=2, hold="c1") == "joined p1 phone->api.example.com:443/tcp [c1 c2]"
    # another port, another protocol, another peer, another name: each its own prompt
    assert t.ask(key(port=8443), hold="c3") == "opened p2 phone->api.example.com:8443/tcp [c3]"
    assert t.ask(key(proto="udp"), hold="c4") == "opened p3 phone->api.example.com:443/udp [c4]"
    assert t.ask(key(peer=LAPTOP), hold="c5") == "opened p4 laptop->api.example.com:443/tcp [c5]"
    assert t.ask(key(host="cdn.example.com"), hold="c6") == (
        "opened p5 phone->cdn.example.com:443/tcp [c6]"
    )
    # no hostname: by address, and the same address joins
    assert t.ask(key(host=None, ip="192.0.2.7", port=22), hold="c7") == (
        "opened p6 phone->192.0.2.7:22/tcp [c7]"
    )
    assert t.ask(key(host=None, ip="192.0.2.7", port=22), hold="c8") == (
        "joined p6 phone->192.0.2.7:22/tcp [c7 c8]"
    )
    # a UDP datagram (dropped, not held) joins without holding anything
    assert t.ask(key(proto="udp")) == "joined p3 phone->api.example.com:443/udp [c4]"
    assert t.queue() == [
        "p1 phone api.example.com:443 waiting=2",
        "p2 phone api.example.com:8443 waiting=1",
        "p3 phone api.example.com:443 waiting=1",
        "p4 laptop api.example.com:443 waiting=1",
        "p5 phone cdn.example.com:443 waiting=1",
        "p6 phone 192.0.2.7:22 waiting=2",
    ]
    p3 = t.book.get("p3")
    assert p3 is not None and p3.asks == 2 and p3.held == ("c4",)
    view = t.book.pending()[0]
    assert (view.peer_public_key, view.dst_ip, view.proto, view.route) == (
        PHONE,
        "93.184.216.34",
        "tcp",
        "tls",
    )
    assert (view.opened, view.deadline) == (T0, T0 + TIMEOUT)  # a join does not move it
    assert len(t.book) == 6


def test_keys_are_normalized_and_a_name_no_rule_could_hold_is_dropped() -> None:
    assert key(host="API.Example.COM.").hostname == "api.example.com"
    assert key(ip="::ffff:192.0.2.7").dst_ip == "192.0.2.7"
    assert key(proto="TCP").proto == "tcp"
    assert key(host="").hostname is None
    assert key(host="192.0.2.7").hostname is None  # an IP literal as SNI: by address
    assert key(host="bad name!").hostname is None
    t = Transcript()
    assert t.ask(key(host="bad name!", ip="192.0.2.7"), hold=1) == (
        "opened p1 phone->192.0.2.7:443/tcp [1]"
    )
    assert t.ask(key(host=None, ip="192.0.2.7"), hold=2) == (
        "joined p1 phone->192.0.2.7:443/tcp [1 2]"
    )
    for bad in (
        {"ip": "not-an-ip"},
        {"port": 70000},
        {"port": -1},
        {"proto": "icmp"},
        {"peer": ""},
    ):
        with pytest.raises(ValueError):
            key(**bad)  # type: ignore[arg-type]


# --- answers ------------------------------------------------------------------------------------


def test_allow_host_always_releases_the_held_flows_and_makes_one_rule_for_the_peer() -> None:
    t = Transcript()
    t.ask(key(), hold="c1")
    t.ask(key(), at=3, hold="c2")
    assert t.answer("p1", "allow", "always", "host", at=5) == [
        "allow always host: p1 phone->api.example.com:443/tcp [c1 c2]",
        "allow api.example.com who=phone port=any/any always 'prompt p1'",
    ]
    assert t.queue() == []
    assert t.book.next_deadline() is None
    # answered twice: a KeyError whose message says what happened
    with pytest.raises(KeyError) as info:
        t.answer("p1", "deny", "always")
    assert str(info.value) == "prompt p1 is not open: answered already (allow always, host scope)"
    # the key is free again: a new flow (had no rule been added) asks anew
    assert t.ask(key(), at=6, hold="c3") == "opened p2 phone->api.example.com:443/tcp [c3]"


def test_scopes_port_host_domain_and_their_fallbacks() -> None:
    t = Transcript()
    t.ask(key(host="api.example.co.uk", port=8443, proto="udp"), hold=1)
    assert t.answer("p1", "allow", "15m", "port") == [
        "allow 15m port: p1 phone->api.example.co.uk:8443/udp [1]",
        "allow api.example.co.uk who=phone port=8443/udp +900 'prompt p1'",
    ]
    t.ask(key(host="api.example.co.uk"), hold=2)
    assert t.answer("p2", "deny", "1h", "domain", at=10) == [
        "deny 1h domain: p2 phone->api.example.co.uk:443/tcp [2]",
        "deny example.co.uk who=phone port=any/any +3610 'prompt p2'",
        "deny *.example.co.uk who=phone port=any/any +3610 'prompt p2'",
    ]
    # the list's private section counts: one GitHub Pages site, not all of them
    t.ask(key(host="www.someone.github.io"), hold=3)
    assert t.answer("p3", "allow", "restart", "domain")[1:] == [
        "allow someone.github.io who=phone port=any/any restart 'prompt p3'",
        "allow *.someone.github.io who=phone port=any/any restart 'prompt p3'",
    ]
    # no hostname: the domain scope falls back to this address, and says so
    t.ask(key(host=None, ip="2001:db8::7"), hold=4)
    assert t.answer("p4", "allow", "always", "domain") == [
        "allow always host: p4 phone->2001:db8::7:443/tcp [4]",
        "allow 2001:db8::7 who=phone port=any/any always 'prompt p4'",
        "notice: no hostname for 2001:db8::7, so no domain: the answer covers this address",
    ]
    # a single label (or a public suffix) has no registrable domain: this host only
    t.ask(key(host="printer"), hold=5)
    assert t.answer("p5", "deny", "always", "domain")[1:] == [
        "deny printer who=phone port=any/any always 'prompt p5'",
        "notice: printer has no registrable domain (a public suffix or a single label): "
        "the answer covers this host only",
    ]
    t.ask(key(host="co.uk"), hold=6)
    assert t.answer("p6", "deny", "always", "domain")[1] == (
        "deny co.uk who=phone port=any/any always 'prompt p6'"
    )
    # port 0 cannot be a rule's port: host scope
    t.ask(key(host=None, ip="192.0.2.9", port=0, proto="udp"))
    assert t.answer("p7", "deny", "always", "port")[1:] == [
        "deny 192.0.2.9 who=phone port=any/any always 'prompt p7'",
        "notice: port 0 cannot be named by a rule: host scope",
    ]


def test_the_rules_an_answer_makes_decide_the_next_flows_in_the_policy() -> None:
    book = PromptBook(TIMEOUT)
    policy = Policy()
    book.ask(key(host="api.example.com"), "phone", "tls", T0, hold="c1")
    answered = book.answer("p1", "allow", "1h", "domain", T0, taken=["r1"])
    for rule in answered.rules:
        policy.add(rule)
    assert answered.rule_id == answered.rules[0].id
    assert len({r.id for r in answered.rules}) == 2 and "r1" not in {r.id for r in answered.rules}

    def access(peer: str, host: str, later: float = 60) -> str:
        name = NAMES[peer]
        verdict = policy.decide(
            name, peer, host, "93.184.216.34", 443, "tcp", T0 + later, default_access=Access.ASK
        )
        return str(verdict.access)

    assert access(PHONE, "example.com") == "allow"
    assert access(PHONE, "img.cdn.example.com") == "allow"
    assert access(PHONE, "example.org") == "ask"  # another domain still asks
    assert access(LAPTOP, "example.com") == "ask"  # the rule is the phone's
    assert access(PHONE, "example.com", later=3601) == "ask"  # the hour is over


def test_once_makes_no_rule_and_stands_for_one_retry_within_the_timeout() -> None:
    t = Transcript()
    t.ask(key(), hold="c1")
    assert t.answer("p1", "allow", "once", "domain", at=20) == [
        "allow once domain: p1 phone->api.example.com:443/tcp [c1]",
    ]
    book = t.book
    # the client gave up meanwhile; its retry gets the answer, once
    assert book.recent_once(key(), T0 + 45) == "allow"
    assert book.recent_once(key(), T0 + 46) is None  # used up
    # deny once, and a retry that comes too late asks again
    t.ask(key(port=80), at=50, hold="c2")
    t.answer("p2", "deny", "once", "port", at=51)
    assert book.recent_once(key(port=8080), T0 + 52) is None  # another key
    assert book.recent_once(key(port=80), T0 + 51 + TIMEOUT) is None
    # an answer given while the retry is due, for a name at another address
    t.ask(key(port=25), at=60)
    t.answer("p3", "deny", "once", at=61)
    assert book.recent_once(key(ip="198.51.100.1", port=25), T0 + 62) == "deny"


def test_bad_answers_leave_the_prompt_open_and_unknown_ids_say_so() -> None:
    t = Transcript()
    t.ask(key(), hold="c1")
    book = t.book
    with pytest.raises(ValueError, match="expected allow or deny"):
        book.answer("p1", "ask", parse_duration("always"), "host", T0)
    with pytest.raises(ValueError, match="expected port, host or domain"):
        book.answer("p1", "allow", parse_duration("always"), "planet", T0)
    with pytest.raises(ValueError, match="invalid duration"):
        book.answer("p1", "allow", "forever", "host", T0)
    assert t.queue() == ["p1 phone api.example.com:443 waiting=1"]
    # a DURATION as text is read as the CLI reads it
    assert book.answer("p1", "Deny", "15m", "HOST", T0).rules[0].expires == T0 + 900
    for unknown, message in (
        ("p9", "no prompt 'p9' (ids are like p1; see the open prompts)"),
        ("x" * 300, f"no prompt {'x' * 40!r} (ids are like p1; see the open prompts)"),
        ("p0", "no prompt 'p0' (ids are like p1; see the open prompts)"),
    ):
        with pytest.raises(PromptNotOpen) as info:
            book.answer(unknown, "allow", "always", "host", T0)
        assert isinstance(info.value, KeyError)
        assert str(info.value) == message


# --- bounds ---------------------------------------------------------------------------------------


def test_a_peer_past_its_open_prompts_is_refused_and_others_are_not() -> None:
    t = Transcript(per_peer_prompts=2)
    assert t.ask(key(port=1), hold=1).startswith("opened p1")
    assert t.ask(key(port=2), hold=2).startswith("opened p2")
    assert t.ask(key(port=3), hold=3) == (
        "refused: phone already has 2 prompts open, the most per peer: "
        "refused until one is answered or times out"
    )
    assert t.ask(key(port=1), hold=4).startswith("joined p1")  # joining takes no new prompt
    assert t.ask(key(port=3, peer=LAPTOP), hold=5).startswith("opened p3")
    t.answer("p1", "allow", "always")
    assert t.ask(key(port=3), hold=6).startswith("opened p4")
    assert "\n" not in t.ask(key(port=9))


def test_a_peer_past_its_held_flows_is_refused_but_unheld_asks_still_join() -> None:
    t = Transcript(per_peer_held=3)
    t.ask(key(port=1), hold="a")
    t.ask(key(port=1), hold="b")
    t.ask(key(port=2), hold="c")
    assert t.ask(key(port=1), hold="d") == (
        "refused (on p1): phone already has 3 flows held on prompts, the most per peer: "
        "refused until a prompt is answered or times out"
    )
    assert t.ask(key(port=3), hold="e").startswith("refused: phone already has 3 flows held")
    assert t.book.get("p3") is None  # a refused flow opened nothing
    assert t.ask(key(port=1)) == "joined p1 phone->api.example.com:1/tcp [a b]"
    assert t.ask(key(port=1, peer=LAPTOP), hold="f").startswith("opened p3")
    # a held flow that went away frees its place
    assert t.book.unhold("b") == "p1"
    assert t.book.unhold("b") is None
    assert t.ask(key(port=1), hold="d") == "joined p1 phone->api.example.com:1/tcp [a d]"


def test_everything_is_bounded_in_all_too() -> None:
    t = Transcript(max_prompts=2, max_held=3)
    t.ask(key(port=1), hold=1)
    t.ask(key(port=2, peer=LAPTOP), hold=2)
    assert t.ask(key(port=3), hold=3) == (
        "refused: 2 prompts open in all, the most the gateway keeps: refused"
    )
    t.ask(key(port=1), hold=4)
    assert t.ask(key(port=2, peer=LAPTOP), hold=5) == (
        "refused (on p2): 3 flows held on prompts in all, the most: refused"
    )
    # closed prompts and once answers are remembered within bounds
    book = PromptBook(TIMEOUT)
    for i in range(CLOSED_MEMORY + RECENT_ONCE_MEMORY + 10):
        book.ask(key(port=i % 65535 + 1), "phone", "relay", T0)
        book.answer(f"p{i + 1}", "deny", "once", "port", T0)
    assert len(book._closed) == CLOSED_MEMORY
    assert len(book._recent) == RECENT_ONCE_MEMORY
    with pytest.raises(PromptNotOpen, match="not open any more"):
        book.answer("p1", "allow", "always", "host", T0)


def test_bad_bounds_and_timeouts_are_refused() -> None:
    for args, kwargs in (((0,), {}), ((-1,), {}), ((86401,), {}), ((30, 0), {}), ((30, 1, 0), {})):
        with pytest.raises(ValueError):
            PromptBook(*args, **kwargs)
    with pytest.raises(ValueError, match="max_held"):
        PromptBook(30, max_held=0)


# --- time and peers -------------------------------------------------------------------------------


def test_unanswered_prompts_time_out_with_their_held_flows_oldest_first() -> None:
    t = Transcript()
    t.ask(key(port=1), at=0, hold="a")
    t.ask(key(port=2), at=10, hold="b")
    t.ask(key(port=1), at=25, hold="c")  # joining does not extend p1's deadline
    assert t.book.next_deadline() == T0 + 30
    assert t.expire(at=29.9) == []
    assert t.expire(at=30) == ["p1 phone->api.example.com:1/tcp [a c]"]
    assert t.book.next_deadline() == T0 + 40
    with pytest.raises(KeyError) as info:
        t.answer("p1", "allow", "always", at=31)
    assert str(info.value) == "prompt p1 is not open: timed out (the peer's fallback applied)"
    t.ask(key(port=3), at=35, hold="d")
    assert t.expire(at=100) == [
        "p2 phone->api.example.com:2/tcp [b]",
        "p3 phone->api.example.com:3/tcp [d]",
    ]
    assert t.book.next_deadline() is None
    # the tokens are free: the same connection may be held again
    assert t.ask(key(port=1), at=101, hold="a") == "opened p4 phone->api.example.com:1/tcp [a]"


def test_removing_a_peer_closes_its_prompts_and_forgets_its_once_answers() -> None:
    t = Transcript(per_peer_prompts=2)
    t.ask(key(port=1), hold="a")
    t.ask(key(port=2, peer=LAPTOP), hold="b")
    t.ask(key(port=3), hold="c")
    t.answer("p3", "allow", "once", "port")
    dropped = t.book.drop_peer(PHONE)
    assert [show_prompt(p) for p in dropped] == ["p1 phone->api.example.com:1/tcp [a]"]
    assert t.queue() == ["p2 laptop api.example.com:2 waiting=1"]
    assert t.book.recent_once(key(port=3), T0 + 1) is None
    with pytest.raises(KeyError, match="its peer was removed"):
        t.answer("p1", "allow", "always")
    # the phone's share is free again
    assert t.ask(key(port=4), hold="a").startswith("opened p4")
    assert t.ask(key(port=5), hold="d").startswith("opened p5")
    assert t.book.drop_peer("no such peer") == []


def test_a_prompt_withdrawn_returns_its_held_flows_to_the_caller() -> None:
    t = Transcript()
    t.ask(key(), hold="a")
    t.ask(key(), hold="b")
    withdrawn = t.book.withdraw("p1", "rule r7 decides it")
    assert withdrawn.held == ("a", "b") and withdrawn.id == "p1"
    with pytest.raises(KeyError, match=r"withdrawn \(rule r7 decides it\)"):
        t.book.withdraw("p1", "again")
    assert t.book.pending() == []


def test_rules_from_answers_live_for_their_duration() -> None:
    t = Transcript()
    for i, duration in enumerate(("15m", "1h", "7d", "restart", "always"), 1):
        t.ask(key(port=i), hold=i)
        rule = t.book.answer(f"p{i}", "allow", duration, "port", T0 + 5).rules[0]
        seconds = parse_duration(duration).seconds
        assert rule.expires == (None if seconds is None else T0 + 5 + seconds)
        assert rule.lifetime is parse_duration(duration).lifetime
        assert rule.persistent is (rule.lifetime in (Lifetime.ALWAYS, Lifetime.TIMED))
        assert rule.created == T0 + 5


def test_a_retransmitted_syn_takes_no_second_place_in_the_share() -> None:
    t = Transcript(per_peer_held=2)
    assert t.ask(key(), hold="a") == "opened p1 phone->api.example.com:443/tcp [a]"
    for _ in range(5):
        assert t.ask(key(), hold="a") == "joined p1 phone->api.example.com:443/tcp [a]"
    assert t.ask(key(), hold="b") == "joined p1 phone->api.example.com:443/tcp [a b]"
    assert t.ask(key(), hold="b") == "joined p1 phone->api.example.com:443/tcp [a b]"
    assert t.ask(key(), hold="c").startswith("refused (on p1)")


def test_the_two_rules_of_a_domain_answer_never_share_an_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The random ids come out as raaaaa, raaaaa, rbbbbb: the second rule must skip the first's.
    letters = iter("aaaaa" + "aaaaa" + "bbbbb")
    monkeypatch.setattr("unclaw_tui.policy.rules.secrets.choice", lambda _: next(letters))
    book = PromptBook(TIMEOUT)
    book.ask(key(), "phone", "tls", T0)
    answered = book.answer("p1", "allow", "always", "domain", T0)
    assert [r.id for r in answered.rules] == ["raaaaa", "rbbbbb"]
