"""The durable timer in memory: RedisTimers' twin, held to the same contract suite
(tests/integration/test_timers_contract.py).

It owns, in one process, what ``P:timers`` holds in Redis: the parked wake-ups and when each is
due, taken on a lease (so two takers never both get one, and one that never confirms loses
nothing), confirmed, or given back. Times come from ``clock`` (``time.time`` unless a test gives
its own), which plays the part of Redis's ``TIME``. The :class:`Parked` and :class:`Taken` values
are RedisTimers', so a :class:`~workers.adapters.redis.timers.Dispatcher` runs on either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from workers.ports import LEASE_SECONDS, Parked, Taken

log = logging.getLogger(__name__)


class InMemoryTimers:
    """The timer store in a dict (member -> due time), with RedisTimers' semantics: one entry
    per wake-up (parking it again moves its due time), taken oldest first (ties in member
    order), re-timed to the lease's end while taken, confirmed only on that same lease."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.entries: dict[str, float] = {}  # a JSON member (Parked.member) -> when it is due
        self.lock = threading.Lock()

    def park(self, parked: Parked, delay: float) -> None:
        """Due ``delay`` seconds from now (the clock)."""
        with self.lock:
            self.entries[parked.member()] = self.clock() + delay

    def take(self, limit: int, lease: float = LEASE_SECONDS) -> Taken:
        """Up to ``limit`` due wake-ups, oldest first, leased for ``lease`` seconds: no other
        taker gets them meanwhile; unconfirmed, they are due again when the lease ends."""
        with self.lock:
            now = self.clock()
            due = sorted((at, member) for member, at in self.entries.items() if at <= now)
            if limit >= 0:  # as ZRANGEBYSCORE's LIMIT: a negative count means all
                due = due[:limit]
            if not due:
                return Taken("", [], 0)
            until = now + lease
            wakes = []
            for at, member in due:
                try:
                    wakes.append(Parked.from_member(member, at))
                except (ValueError, TypeError) as exc:  # not ours: drop it, loudly
                    log.error("dropping an unreadable timer entry %r: %s", member, exc)
                    del self.entries[member]
                    continue
                self.entries[member] = until
            return Taken(repr(until), wakes, len(due))

    def done(self, taken: Taken, wakes: list[Parked]) -> int:
        """Confirm ``wakes`` (of ``taken``) sent: they leave the timer, unless parked again
        since (a new due time) or taken again after their lease ended."""
        with self.lock:
            removed = 0
            for member in {w.member() for w in wakes}:
                at = self.entries.get(member)
                if at is not None and repr(at) == taken.lease:
                    del self.entries[member]
                    removed += 1
            return removed

    def release(self, wakes: list[Parked]) -> None:
        """Give back taken, unsent wake-ups at their own due time (not the lease's end)."""
        with self.lock:
            for w in wakes:
                member = w.member()
                if member in self.entries:
                    self.entries[member] = w.due

    def count(self) -> int:
        with self.lock:
            return len(self.entries)

    def overdue(self) -> int:
        """Members due now that no taker has taken."""
        with self.lock:
            now = self.clock()
            return sum(1 for at in self.entries.values() if at <= now)
