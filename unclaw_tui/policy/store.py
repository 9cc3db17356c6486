"""rules.json and rule-hits.json in the state dir.

rules.json is for people as much as for the program: one rule per line inside a list, so an
error can name "rules.json:7" and an operator can fix that line.

    {
      "version": 1,
      "rules": [
        {"id": "r7kq2m", "action": "deny", "what": "ads.example.com", "who": "*", ...},
        {"id": "r3xb9w", "action": "allow", "what": "*.example.com", "who": "phone", ...}
      ]
    }

It is written atomically, mode 0600, under the state dir's lock, and only when the rules change
(add, remove, expiry).  A running gateway polls `RuleStore.poll()` (a stat, like
`StateDir.peers_signature`): a changed file is parsed whole; a bad rule is reported once with the
file and line, and the last good set stays in force.  A write refuses to replace a file that does
not parse, so an operator's half-done edit is never lost.

rule-hits.json holds the hit counts (hits.py), written at most every few seconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from unclaw_tui.policy.hits import HitLog
from unclaw_tui.policy.rules import Rule, rule_from_doc, rule_to_doc
from unclaw_tui.state import StateDir, StateError

RULES_FILE = "rules.json"
HITS_FILE = "rule-hits.json"
RULES_VERSION = 1
MAX_RULES_BYTES = 16 * 1024 * 1024
MAX_RULES = 100_000
_WHITESPACE = " \t\n\r"


class RulesFileError(StateError):
    """rules.json cannot be used; the message names the file and line."""


Signature = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Reload:
    """What a poll found: the file's rules, or why they cannot be used (then keep the last good
    set)."""

    rules: list[Rule] | None = None
    error: str | None = None


# --- the text: parsed with each rule's line -------------------------------------------------------


def format_rules(rules: Iterable[Rule]) -> str:
    lines = [json.dumps(rule_to_doc(r), ensure_ascii=False) for r in rules]
    body = ",\n".join("    " + line for line in lines)
    inner = f"[\n{body}\n  ]" if lines else "[]"
    return f'{{\n  "version": {RULES_VERSION},\n  "rules": {inner}\n}}\n'


class _Scanner:
    """Walks the top-level object with json's raw_decode, noting where each rule starts, so a
    bad rule is reported at its own line whatever the file's layout."""

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.pos = 0
        self._decode = json.JSONDecoder().raw_decode

    def fail(self, what: str, pos: int | None = None) -> RulesFileError:
        at = self.pos if pos is None else pos
        return RulesFileError(f"{self.where}:{self.text.count(chr(10), 0, at) + 1}: {what}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
            self.pos += 1

    def expect(self, chars: str) -> str:
        self.skip()
        if self.pos >= len(self.text) or self.text[self.pos] not in chars:
            found = "the end" if self.pos >= len(self.text) else repr(self.text[self.pos])
            raise self.fail(f"expected {' or '.join(repr(c) for c in chars)}, found {found}")
        self.pos += 1
        return self.text[self.pos - 1]

    def value(self) -> Any:
        self.skip()
        try:
            value, self.pos = self._decode(self.text, self.pos)
        except json.JSONDecodeError as exc:
            raise RulesFileError(f"{self.where}:{exc.lineno}: {exc.msg}") from None
        return value

    def rules(self) -> list[tuple[int, Any]]:
        """The rules list's items with their start offsets; the caller is at its '['."""
        items: list[tuple[int, Any]] = []
        self.skip()
        if self.text.startswith("]", self.pos):
            self.pos += 1
            return items
        while True:
            self.skip()
            start = self.pos
            items.append((start, self.value()))
            if len(items) > MAX_RULES:
                raise self.fail(f"more than {MAX_RULES} rules", start)
            if self.expect(",]") == "]":
                return items

    def document(self) -> tuple[Any, list[tuple[int, Any]]]:
        """(version, [(offset, rule doc)])."""
        self.expect("{")
        version: Any = None
        rules: list[tuple[int, Any]] | None = None
        self.skip()
        if self.text.startswith("}", self.pos):
            raise self.fail("no 'version' and 'rules'")
        while True:
            key = self.value()
            self.expect(":")
            if key == "rules":
                self.expect("[")
                rules = self.rules()
            elif key == "version":
                version = self.value()
            else:
                raise self.fail(f"unknown key {key!r} (expected 'version' and 'rules')")
            if self.expect(",}") == "}":
                break
        self.skip()
        if self.pos != len(self.text):
            raise self.fail("text after the closing '}'")
        if rules is None:
            raise self.fail("no 'rules' list")
        return version, rules


def parse_rules_text(text: str, where: str = RULES_FILE) -> list[Rule]:
    """Every rule of a rules file, or RulesFileError naming `where:line` and the rule."""
    scanner = _Scanner(text, where)
    version, items = scanner.document()
    if version != RULES_VERSION:
        raise RulesFileError(f"{where}: unsupported version {version!r} (expected 1)")
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for start, doc in items:
        label = f"rule {doc['id']!r}" if isinstance(doc, dict) and "id" in doc else "a rule"
        try:
            rule = rule_from_doc(doc)
        except ValueError as exc:
            raise scanner.fail(f"{label}: {exc}", start) from None
        if rule.id in seen:
            raise scanner.fail(f"{label}: the id is used twice (also rule #{seen[rule.id]})", start)
        seen[rule.id] = len(rules) + 1
        rules.append(rule)
    return rules


# --- the files ---------------------------------------------------------------------------------


class RuleStore:
    """The rules files of one state dir.  IO only: the policy itself is matcher.Policy."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.path = state.path / RULES_FILE
        self._seen: Signature | None = None

    def signature(self) -> Signature:
        """A cheap change marker for polling; (0, 0, 0) if the file is missing."""
        try:
            st = os.stat(self.path)
        except OSError:
            return (0, 0, 0)
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def load(self) -> list[Rule]:
        """The file's rules ([] if there is no file); RulesFileError naming file and line."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_RULES_BYTES + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise RulesFileError(f"cannot read {self.path}: {exc.strerror}") from None
        if len(data) > MAX_RULES_BYTES:
            raise RulesFileError(f"{self.path}: larger than {MAX_RULES_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise RulesFileError(f"{self.path}:{line}: not UTF-8 text") from None
        return parse_rules_text(text, str(self.path))

    def poll(self) -> Reload | None:
        """None if the file is as last seen; else its rules, or the error (reported once per
        change of the file; keep the last good set meanwhile)."""
        signature = self.signature()
        if signature == self._seen:
            return None
        self._seen = signature
        try:
            return Reload(rules=self.load())
        except RulesFileError as exc:
            return Reload(error=str(exc))

    def _change(self, change: Callable[[list[Rule]], list[Rule]]) -> None:
        """Read, change and write the file under the lock; a file that does not parse is left
        as it is (RulesFileError)."""
        with self.state.locked():
            rules = self.load()
            self.state.write_bytes(RULES_FILE, format_rules(change(rules)).encode())

    def add(self, rule: Rule) -> None:
        """Append a rule (ValueError if its id is taken or it does not belong in the file)."""
        if not rule.persistent:
            raise ValueError(f"rule {rule.id!r} is not kept in {RULES_FILE} ({rule.lifetime})")

        def append(rules: list[Rule]) -> list[Rule]:
            if any(r.id == rule.id for r in rules):
                raise ValueError(f"a rule with id {rule.id!r} exists")
            return [*rules, rule]

        self._change(append)

    def remove(self, rule_id: str) -> Rule:
        """Remove a rule by id (KeyError if there is none)."""
        removed: list[Rule] = []

        def drop(rules: list[Rule]) -> list[Rule]:
            removed.extend(r for r in rules if r.id == rule_id)
            if not removed:
                raise KeyError(f"no rule {rule_id!r}")
            return [r for r in rules if r.id != rule_id]

        self._change(drop)
        return removed[0]

    def remove_expired(self, now: float) -> list[Rule]:
        """Drop the rules whose expiry has come; the file is rewritten only if any did."""
        with self.state.locked():
            rules = self.load()
            gone = [r for r in rules if not r.live(now)]
            if gone:
                kept = [r for r in rules if r.live(now)]
                self.state.write_bytes(RULES_FILE, format_rules(kept).encode())
            return gone

    def load_hits(self) -> HitLog:
        try:
            doc = self.state.read_json(HITS_FILE)
        except StateError:
            doc = None  # statistics only: a damaged file starts the counts over
        return HitLog.from_doc(doc)

    def save_hits(self, hits: HitLog, now: float) -> None:
        with self.state.locked():
            self.state.write_json(HITS_FILE, hits.to_doc())
        hits.written(now)
