"""When each running engine's next health check is due.

Every engine is checked once per interval, each at its own time: engines added together are
spread evenly over the next interval (one per slice, at a random point in it), and each next
check is one interval later, give or take JITTER, so checks never bunch up into one tick.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

JITTER = 0.1  # each interval is 90-110% of the setting


class HealthSchedule:
    def __init__(self, interval: float, rng: random.Random | None = None):
        self.interval = interval
        self._next: dict[int, float] = {}  # engine id -> when its next check is due
        self._random = rng or random.Random()

    def __contains__(self, engine_id: object) -> bool:
        return engine_id in self._next

    def __len__(self) -> int:
        return len(self._next)

    def add(self, engine_ids: Iterable[int], now: float) -> None:
        """Schedule engines not scheduled yet, spread evenly over the next interval."""
        new = [i for i in engine_ids if i not in self._next]
        for n, engine_id in enumerate(new):
            self._next[engine_id] = now + self.interval * (n + self._random.random()) / len(new)

    def replace(self, engine_ids: set[int], now: float) -> None:
        """The running engines are exactly these: drop the others, add the new ones."""
        for engine_id in [i for i in self._next if i not in engine_ids]:
            del self._next[engine_id]
        self.add(sorted(engine_ids), now)

    def due(self, now: float) -> list[int]:
        """Engines whose check is due; each is scheduled again one interval on."""
        due = [i for i, at in self._next.items() if at <= now]
        for engine_id in due:
            step = self.interval * self._random.uniform(1 - JITTER, 1 + JITTER)
            at = self._next[engine_id] + step
            # Keep each engine's phase; after a stall, start over from now.
            self._next[engine_id] = at if at > now else now + step
        return due

    def soon(self, engine_id: int, at: float) -> None:
        """Check this engine again by `at` (an unhealthy one, within its grace period)."""
        self._next[engine_id] = min(self._next.get(engine_id, at), at)

    def keep_only_among(self, asked: Iterable[int], found: set[int]) -> None:
        """Of the engines `asked` for, those not `found` running any more are dropped."""
        for engine_id in asked:
            if engine_id not in found:
                self._next.pop(engine_id, None)
