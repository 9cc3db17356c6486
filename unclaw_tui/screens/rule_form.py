"""The add/edit rule form: the CLI's `rule add` words, checked field by field as it does.

Each field is parsed by the policy's own parser (`parse_target`, `parse_duration`, ...), and a
bad one is named under the field; only a rule that parses is handed to the gateway, whose own
refusal (an id taken, a built-in rule) is shown under the form.  Prefilled from a row of the
Connections, DNS or TLS hosts panes ("rule from this row") or from the rule being edited.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select

from unclaw_tui.policy import Rule, make_rule, parse_duration, parse_target
from unclaw_tui.policy.durations import format_seconds
from unclaw_tui.policy.rules import EVERY_PEER, parse_note, parse_who
from unclaw_tui.policy.targets import parse_ports
from unclaw_tui.policy.views import RuleView
from unclaw_tui.widgets.model import ConnectionRow, DnsRow, PeerRow, TlsHostRow

ACTIONS = ("allow", "deny", "intercept", "passthrough")
PROTOS = ("any", "tcp", "udp")
# (field id, label, placeholder)
TEXT_FIELDS = (
    ("target", "Target", "example.com, *.example.com, 192.0.2.7 or 10.0.0.0/8"),
    ("who", "Peer", "a peer name, or * for every peer"),
    ("port", "Port", "any, 443 or 8000-8100"),
    ("duration", "For", "always, restart, once, or 30s 15m 1h 7d"),
    ("note", "Note", "why (optional)"),
)


@dataclass(frozen=True, slots=True)
class RuleDraft:
    """What the form starts with, in the CLI's words."""

    action: str = "deny"
    target: str = ""
    who: str = EVERY_PEER
    port: str = "any"
    proto: str = "any"
    duration: str = "always"
    note: str = ""


def draft_from_rule(view: RuleView, now: float) -> RuleDraft:
    rule = view.rule
    if rule.expires is not None:
        left = max(60.0, rule.expires - now)
        duration = format_seconds(round(left / 60) * 60)
    else:
        duration = rule.lifetime.value
    return RuleDraft(
        action=rule.action.value,
        target=rule.target.text,
        who=rule.who,
        port="any" if rule.ports is None else str(rule.ports),
        proto=rule.proto.value,
        duration=duration,
        note=rule.note,
    )


def draft_from_row(row: object) -> RuleDraft | None:
    """ "Rule from this row": the peer, hostname (else the IP), port and protocol of a row of
    the Connections, DNS, TLS hosts or Peers pane.  The action starts as the opposite of what
    the flow got (a rule agreeing with it would change nothing), `deny` elsewhere."""
    match row:
        case ConnectionRow():
            return RuleDraft(
                action="allow" if row.verdict == "deny" else "deny",
                target=row.hostname or row.dst_ip,
                who=row.peer,
                port=str(row.dst_port),
                proto=row.proto.lower(),
            )
        case DnsRow():  # a name: any port, any protocol (a deny of it answers NXDOMAIN)
            return RuleDraft(target=row.qname, who=row.peer)
        case TlsHostRow():
            who = next(iter(row.peers)) if len(row.peers) == 1 else EVERY_PEER
            return RuleDraft(target=row.hostname, who=who, port="443", proto="tcp")
        case PeerRow():
            return RuleDraft(who=row.name)
    return None


class RuleFormScreen(ModalScreen[RuleView | None]):
    """Dismisses with the gateway's view of the rule made, or None when cancelled."""

    CSS_PATH: ClassVar[list[str | Path]] = ["modals.tcss", "policy.tcss"]
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "submit", "Save", show=False),
    ]

    def __init__(
        self,
        title: str,
        draft: RuleDraft,
        submit: Callable[[Rule], RuleView],
        clock: Callable[[], float],
        *,
        editing: RuleView | None = None,
        taken: frozenset[str] = frozenset(),
    ) -> None:
        """`submit` hands the parsed rule to the gateway (ValueError/KeyError: shown);
        `editing`: the rule replaced, whose id and, with `For` unchanged, expiry are kept."""
        super().__init__()
        self.form_title = title
        self.draft = draft
        self._submit = submit
        self._clock = clock
        self.editing = editing
        self._taken = taken

    def compose(self) -> ComposeResult:
        d = self.draft
        with Vertical(id="dialog", classes="rule-form"):
            yield Label(self.form_title, id="dialog-title")
            with Horizontal(classes="field"):
                yield Label("Action", classes="field-label")
                yield Select(
                    [(a, a) for a in ACTIONS],
                    value=d.action,
                    allow_blank=False,
                    compact=True,
                    id="action",
                )
            for field_id, label, placeholder in TEXT_FIELDS:
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    yield Input(
                        getattr(d, field_id), placeholder=placeholder, compact=True, id=field_id
                    )
                yield Label("", id=f"{field_id}-error", classes="field-error")
                if field_id == "port":
                    with Horizontal(classes="field"):
                        yield Label("Proto", classes="field-label")
                        yield Select(
                            [(p, p) for p in PROTOS],
                            value=d.proto,
                            allow_blank=False,
                            compact=True,
                            id="proto",
                        )
            yield Label("", id="error")
            with Horizontal(id="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")
            yield Label("enter saves · escape cancels · tab next field", classes="hint")

    def on_mount(self) -> None:
        # Straight to the first field the operator most likely types in.
        first = "target" if not self.draft.target else "duration"
        self.query_one(f"#{first}", Input).focus()

    def value(self, field_id: str) -> str:
        return self.query_one(f"#{field_id}", Input).value

    def _check(self, field_id: str, parse: Callable[[str], object]) -> bool:
        label = self.query_one(f"#{field_id}-error", Label)
        try:
            parse(self.value(field_id))
        except ValueError as exc:
            label.update(str(exc))
            label.add_class("-shown")
            return False
        label.update("")
        label.remove_class("-shown")
        return True

    def field_errors(self) -> dict[str, str]:
        """The fields' errors now on screen, by field id (for tests)."""
        return {
            field_id: str(label.render())
            for field_id, *_ in TEXT_FIELDS
            if (label := self.query_one(f"#{field_id}-error", Label)).has_class("-shown")
        }

    def build(self) -> Rule | None:
        """The rule the fields say, or None with each bad field's reason under it."""
        checks = [
            self._check("target", parse_target),
            self._check("who", parse_who),
            self._check("port", lambda t: None if t.strip() == "any" else parse_ports(t)),
            self._check("duration", parse_duration),
            self._check("note", parse_note),
        ]
        if not all(checks):
            return None
        now = self._clock()
        duration_text = self.value("duration")
        port = self.value("port").strip()
        rule = make_rule(
            str(self.query_one("#action", Select).value),
            self.value("target"),
            now=now,
            who=self.value("who"),
            ports=None if port == "any" else port,
            proto=str(self.query_one("#proto", Select).value),
            duration=parse_duration(duration_text),
            note=self.value("note"),
            rule_id=self.editing.rule.id if self.editing is not None else None,
            taken=self._taken,
        )
        old = self.editing.rule if self.editing is not None else None
        if old is not None and duration_text.strip() == self.draft.duration:
            # `For` untouched: the rule keeps the expiry it had, not one counted from now.
            rule = dataclasses.replace(rule, lifetime=old.lifetime, expires=old.expires)
        if old is not None:
            rule = dataclasses.replace(rule, created=old.created)
        return rule

    @on(Input.Submitted)
    @on(Button.Pressed, "#save")
    def action_submit(self) -> None:
        rule = self.build()
        if rule is None:
            return
        error = self.query_one("#error", Label)
        try:
            view = self._submit(rule)
        except (ValueError, KeyError) as exc:
            error.update(str(exc.args[0]) if exc.args else str(exc))
            return
        self.dismiss(view)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
