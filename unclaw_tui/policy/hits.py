"""Hit counts and last-hit times per rule, kept apart from rules.json so that a hit never
rewrites the file an operator may be editing.  Sans-IO: the owner records hits, asks `due(now)`
and, when due, saves `to_doc()` (store.py), at most every WRITE_INTERVAL seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

WRITE_INTERVAL = 5.0  # seconds between writes of the hits file, at most


@dataclass(slots=True)
class RuleHits:
    count: int = 0
    last: float | None = None


class HitLog:
    def __init__(self, interval: float = WRITE_INTERVAL) -> None:
        self.interval = interval
        self.hits: dict[str, RuleHits] = {}
        self._dirty = False
        self._last_write = -math.inf

    def record(self, rule_id: str, now: float) -> None:
        """A flow was decided by rule_id ("default" is not recorded)."""
        if rule_id == "default":
            return
        hits = self.hits.get(rule_id)
        if hits is None:
            hits = self.hits[rule_id] = RuleHits()
        hits.count += 1
        hits.last = now
        self._dirty = True

    def forget(self, rule_id: str) -> None:
        if self.hits.pop(rule_id, None) is not None:
            self._dirty = True

    def due(self, now: float) -> bool:
        return self._dirty and now - self._last_write >= self.interval

    def written(self, now: float) -> None:
        self._dirty = False
        self._last_write = now

    def to_doc(self) -> dict[str, Any]:
        return {rule_id: {"count": h.count, "last": h.last} for rule_id, h in self.hits.items()}

    @classmethod
    def from_doc(cls, doc: Any, interval: float = WRITE_INTERVAL) -> HitLog:
        """Counts saved earlier; anything malformed is dropped (they are only statistics)."""
        log = cls(interval)
        if not isinstance(doc, dict):
            return log
        for rule_id, item in doc.items():
            if not isinstance(item, dict):
                continue
            count, last = item.get("count"), item.get("last")
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                ok_last = isinstance(last, int | float) and not isinstance(last, bool)
                log.hits[str(rule_id)] = RuleHits(count, float(last) if ok_last else None)
        return log
