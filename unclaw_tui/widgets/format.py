"""Plain-text formatting shared by the panes: sizes, rates, ages, mini sparklines.

Pure functions of their arguments (time is passed in), so snapshots stay deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

SPARK_CHARS = "▁▂▃▄▅▆▇█"


def fmt_bytes(n: float) -> str:
    """1023 B, 1.0 KiB, 12.3 MiB, ..."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def fmt_rate(bytes_per_s: float) -> str:
    if bytes_per_s <= 0:
        return "-"
    return fmt_bytes(bytes_per_s) + "/s"


def fmt_duration(seconds: float) -> str:
    """Compact: 45 s, 12 min, 3 h 05, 2 d 04 h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d}"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def fmt_uptime(seconds: float) -> str:
    s = max(0, int(seconds))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    return f"{d}d {h:02d}:{m:02d}:{sec:02d}" if d else f"{h:02d}:{m:02d}:{sec:02d}"


def fmt_ago(then: float | None, now: float) -> str:
    """'12 s ago' style; 'never' for None."""
    if then is None:
        return "never"
    return fmt_duration(now - then) + " ago"


def fmt_clock(ts: float) -> str:
    """Local wall-clock time of day, HH:MM:SS."""
    return time.strftime("%H:%M:%S", time.localtime(ts))


def sparkline(values: Iterable[float], width: int) -> str:
    """The last `width` values as block characters, scaled to their own maximum."""
    tail = list(values)[-width:]
    if not tail:
        return " " * width
    top = max(tail)
    if top <= 0:
        chars = SPARK_CHARS[0] * len(tail)
    else:
        last = len(SPARK_CHARS) - 1
        chars = "".join(SPARK_CHARS[min(last, int(v / top * last + 0.5))] for v in tail)
    return chars.rjust(width)


def short_key(public_key: str, length: int = 8) -> str:
    """An abbreviated base64 public key for narrow places."""
    return public_key if len(public_key) <= length else public_key[:length] + "…"
