"""How long a rule lives: the DURATION form of the CLI (`once`, `restart`, `always`, or a
number with `s`, `m`, `h` or `d`), parsed into a `Duration`.

A timed duration becomes an absolute expiry when a rule is made (`Duration.expires(now)`), so a
rule read back from the file, or after a restart, ends when it was meant to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SECONDS = 3650 * 86400  # ten years; beyond that, `always` says what is meant
_TIMED_RE = re.compile(r"([0-9]{1,10})([smhd])")


class Lifetime(StrEnum):
    ONCE = "once"  # decides one flow, then the caller consumes it
    RESTART = "restart"  # until the gateway stops (never written to the rules file)
    ALWAYS = "always"
    TIMED = "timed"  # until an absolute expiry


@dataclass(frozen=True, slots=True)
class Duration:
    lifetime: Lifetime
    seconds: int | None = None  # set for TIMED only

    def expires(self, now: float) -> float | None:
        """The absolute expiry of a rule made now with this duration (None: no expiry)."""
        return None if self.seconds is None else now + self.seconds

    def __str__(self) -> str:
        if self.seconds is None:
            return self.lifetime.value
        return format_seconds(self.seconds)


def parse_duration(text: str) -> Duration:
    """`once` | `restart` | `always` | N{s,m,h,d}; ValueError with a one-line reason."""
    word = text.strip().lower()
    if word in (Lifetime.ONCE, Lifetime.RESTART, Lifetime.ALWAYS):
        return Duration(Lifetime(word))
    match = _TIMED_RE.fullmatch(word)
    if match is None:
        raise ValueError(
            f"invalid duration {text!r}: expected once, restart, always, "
            "or a number with s, m, h or d (30s, 15m, 1h, 7d)"
        )
    seconds = int(match[1]) * UNITS[match[2]]
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"invalid duration {text!r}: must be more than 0 and at most 3650d")
    return Duration(Lifetime.TIMED, seconds)


def format_seconds(seconds: float) -> str:
    """The largest whole unit that fits: 90 -> '90s', 3600 -> '1h', 86400*7 -> '7d'."""
    whole = int(seconds)
    for unit in ("d", "h", "m"):
        if whole >= UNITS[unit] and whole % UNITS[unit] == 0:
            return f"{whole // UNITS[unit]}{unit}"
    return f"{whole}s"
