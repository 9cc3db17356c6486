"""rules.json and rule-hits.json: the file an operator edits (one rule per line, errors at
their line, the last good set kept), atomic 0600 writes only on change, hits kept apart."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from unclaw_tui.policy import HitLog, Policy, RulesFileError, RuleStore, make_rule
from unclaw_tui.policy.durations import Duration, Lifetime
from unclaw_tui.policy.store import HITS_FILE, RULES_FILE, format_rules, parse_rules_text
from unclaw_tui.state import StateDir

NOW = 1_700_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> RuleStore:
    return RuleStore(StateDir(tmp_path / "state"))


def two_rules() -> list:
    return [
        make_rule("deny", "ads.example.com", now=NOW, rule_id="r1"),
        make_rule("allow", "*.example.com", now=NOW, rule_id="r2", who="phone", ports="443",
                  proto="tcp", duration=Duration(Lifetime.TIMED, 3600), note="from a prompt"),
    ]  # fmt: skip


def test_no_file_is_no_rules(store: RuleStore) -> None:
    assert store.load() == []
    assert store.signature() == (0, 0, 0)


def test_written_one_rule_per_line_0600(store: RuleStore) -> None:
    for rule in two_rules():
        store.add(rule)
    text = store.path.read_text()
    assert text == (
        '{\n  "version": 1,\n  "rules": [\n'
        '    {"id": "r1", "action": "deny", "what": "ads.example.com", "who": "*", "port": "any",'
        ' "proto": "any", "until": "always", "note": "", "created": "2023-11-14T22:13:20Z"},\n'
        '    {"id": "r2", "action": "allow", "what": "*.example.com", "who": "phone", "port": 443,'
        ' "proto": "tcp", "until": "2023-11-14T23:13:20Z", "note": "from a prompt",'
        ' "created": "2023-11-14T22:13:20Z"}\n'
        "  ]\n}\n"
    )
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert json.loads(text)["version"] == 1
    assert store.load() == two_rules()
    assert format_rules([]) == '{\n  "version": 1,\n  "rules": []\n}\n'


def test_add_remove_and_refusals(store: RuleStore) -> None:
    first, second = two_rules()
    store.add(first)
    with pytest.raises(ValueError, match="exists"):
        store.add(first)
    with pytest.raises(ValueError, match="not kept"):
        store.add(make_rule("allow", "x.test", now=NOW, duration=Duration(Lifetime.ONCE)))
    store.add(second)
    assert store.remove("r1") == first
    with pytest.raises(KeyError):
        store.remove("r1")
    assert store.load() == [second]
    assert not [p for p in store.state.path.iterdir() if p.name.endswith(".tmp")]


def test_expired_rules_removed_and_file_untouched_otherwise(store: RuleStore) -> None:
    for rule in two_rules():
        store.add(rule)
    before = store.signature()
    assert store.remove_expired(NOW + 10) == []
    assert store.signature() == before  # not rewritten
    assert [r.id for r in store.remove_expired(NOW + 3600)] == ["r2"]
    assert [r.id for r in store.load()] == ["r1"]


def test_hand_edit_reloaded_and_bad_line_named(store: RuleStore) -> None:
    """The transcript of an operator's session: edit, break a line, fix it."""
    policy = Policy()
    for rule in two_rules():
        store.add(rule)
    reload = store.poll()
    assert reload is not None and reload.error is None and reload.rules is not None
    policy.replace_persistent(reload.rules)
    assert store.poll() is None  # nothing changed

    # the operator breaks rule r2 on line 5
    text = store.path.read_text().replace('"what": "*.example.com"', '"what": "*.exa mple.com"')
    store.path.write_text(text)
    reload = store.poll()
    assert reload is not None and reload.rules is None
    assert reload.error == (
        f"{store.path}:5: rule 'r2': invalid hostname 'exa mple.com': each label is 1-63 "
        "letters, digits, '-' or '_'"
    )
    assert store.poll() is None  # reported once per change
    # the last good set stays in force
    assert policy.decide("phone", "k", "www.example.com", None, 443, "tcp", NOW).access_rule == "r2"
    # and a write does not overwrite the operator's half-done edit
    with pytest.raises(RulesFileError, match=":5:"):
        store.add(make_rule("deny", "x.test", now=NOW))
    assert store.path.read_text() == text

    # fixed, with a rule added by hand
    fixed = text.replace("*.exa mple.com", "*.example.com").replace(
        "  ]\n", '    ,{"id": "mine", "action": "deny", "what": "10.0.0.0/8"}\n  ]\n'
    )
    store.path.write_text(fixed)
    reload = store.poll()
    assert reload is not None and reload.rules is not None
    added, removed = policy.replace_persistent(reload.rules)
    assert ([r.id for r in added], removed) == (["mine"], [])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "rules.json:1: expected '{', found the end"),
        ("{", "rules.json:1: Expecting value"),
        ('{"version": 1}', "rules.json:1: no 'rules' list"),
        ('{"version": 2, "rules": []}', "rules.json: unsupported version 2"),
        ('{"version": 1, "rules": [], "x": 1}', "rules.json:1: unknown key 'x'"),
        ('{"version": 1, "rules": []} []', "rules.json:1: text after the closing '}'"),
        ('{"version": 1,\n "rules": [\n {"id": "a", "action": "deny", "what": "x.test"},\n'
         ' {"id": "b", "action": "deny", "what": "x.test",}\n]}',
         "rules.json:4: Expecting property name enclosed in double quotes"),
        ('{"version": 1,\n "rules": [\n {"id": "a", "action": "deny", "what": "x.test"},\n'
         ' {"id": "a", "action": "allow", "what": "y.test"}\n]}',
         "rules.json:4: rule 'a': the id is used twice (also rule #1)"),
        ('{"version": 1, "rules": [\n\n  "deny x.test"]}',
         "rules.json:3: a rule: a rule must be a JSON object"),
        ('{"version": 1, "rules": [{"id": "a", "action": "deny", "what": "x.test"} {}]}',
         "rules.json:1: expected ',' or ']', found '{'"),
    ],
)  # fmt: skip
def test_parse_errors_name_the_line(text: str, error: str) -> None:
    with pytest.raises(RulesFileError) as exc:
        parse_rules_text(text, RULES_FILE)
    assert str(exc.value).startswith(error)


def test_bounded(store: RuleStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from unclaw_tui.policy import store as store_module

    store.path.write_text(format_rules(two_rules()))
    monkeypatch.setattr(store_module, "MAX_RULES_BYTES", 100)
    with pytest.raises(RulesFileError, match="larger than 100 bytes"):
        store.load()
    monkeypatch.setattr(store_module, "MAX_RULES_BYTES", 1 << 20)
    monkeypatch.setattr(store_module, "MAX_RULES", 1)
    with pytest.raises(RulesFileError, match=":5: more than 1 rules"):
        store.load()
    store.path.write_bytes(b'{"version": 1,\n "rules": ["\xff"]}')
    with pytest.raises(RulesFileError, match=":2: not UTF-8"):
        store.load()


def test_hits_kept_apart_and_written_at_most_every_interval(store: RuleStore) -> None:
    store.add(two_rules()[0])
    rules_signature = store.signature()
    hits = store.load_hits()
    assert hits.hits == {} and not hits.due(NOW)
    hits.record("r1", NOW)
    hits.record("default", NOW)  # not a rule
    assert hits.due(NOW)
    store.save_hits(hits, NOW)
    hits.record("r1", NOW + 1)
    assert not hits.due(NOW + 1)  # written a second ago
    assert hits.due(NOW + 5)
    store.save_hits(hits, NOW + 5)
    assert not hits.due(NOW + 100)  # nothing new
    assert store.signature() == rules_signature  # a hit never rewrites rules.json
    assert stat.S_IMODE(os.stat(store.state.path / HITS_FILE).st_mode) == 0o600
    loaded = store.load_hits()
    assert (loaded.hits["r1"].count, loaded.hits["r1"].last) == (2, NOW + 1)
    loaded.forget("r1")
    assert loaded.hits == {}
    (store.state.path / HITS_FILE).write_text("{broken")
    assert store.load_hits().hits == {}
    assert HitLog.from_doc({"r1": {"count": -1}, "r2": [], "r3": {"count": 2}}).to_doc() == {
        "r3": {"count": 2, "last": None}
    }
