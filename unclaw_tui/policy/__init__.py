"""Rules per peer and per host (issue 14), sans-IO except store.py.

targets.py    what a rule names (host, *.glob, IP/CIDR), ports; the CLI's TARGET forms
durations.py  once / restart / always / 30s 15m 1h 7d
rules.py      the Rule, its file form, precedence, built-in rules from the flags
index.py      the matching index (hosts by suffix, CIDRs by prefix length)
matcher.py    Policy.decide -> Verdict, denies_name; the order, as a table
domains.py    the registrable domain (packaged Public Suffix List) for a `domain` scope
prompts.py    the prompt book: first contacts of `ask` peers, held until answered or timed out
hits.py       hit counts, written apart from the rules
store.py      rules.json and rule-hits.json in the state dir
"""

from unclaw_tui.policy.domains import domain_scope, registrable_domain
from unclaw_tui.policy.durations import Duration, Lifetime, parse_duration
from unclaw_tui.policy.hits import HitLog
from unclaw_tui.policy.matcher import Access, Mode, Policy, Verdict
from unclaw_tui.policy.prompts import (
    Answered,
    Asked,
    Prompt,
    PromptBook,
    PromptKey,
    PromptNotOpen,
    Scope,
)
from unclaw_tui.policy.rules import (
    DEFAULT_RULE,
    EVERY_PEER,
    Action,
    Dimension,
    Proto,
    Rule,
    builtin_rules,
    make_rule,
)
from unclaw_tui.policy.store import Reload, RulesFileError, RuleStore
from unclaw_tui.policy.targets import Ports, Target, TargetKind, parse_target, parse_target_port

__all__ = [
    "DEFAULT_RULE",
    "EVERY_PEER",
    "Access",
    "Action",
    "Answered",
    "Asked",
    "Dimension",
    "Duration",
    "HitLog",
    "Lifetime",
    "Mode",
    "Policy",
    "Ports",
    "Prompt",
    "PromptBook",
    "PromptKey",
    "PromptNotOpen",
    "Proto",
    "Reload",
    "Rule",
    "RuleStore",
    "RulesFileError",
    "Scope",
    "Target",
    "TargetKind",
    "Verdict",
    "builtin_rules",
    "domain_scope",
    "make_rule",
    "parse_duration",
    "parse_target",
    "parse_target_port",
    "registrable_domain",
]
