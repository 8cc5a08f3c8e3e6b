"""The durable timer: a wait longer than ``COUNTDOWN_MAX_SECONDS`` is parked in Redis, not a worker.

Celery on Redis has no delayed delivery. A countdown message is fetched at once and held in the
worker's memory, unacknowledged, until it is due. For a few seconds that is fine. For longer waits,
or for tens of thousands of jobs in flight, it is not (../shared/docs/celery-pitfalls.md 1.1-1.3):
a held message outliving ``visibility_timeout`` runs twice, a SIGKILLed worker strands what it
held until that timeout, and ``worker_eta_task_limit`` caps what a worker holds, so due messages
queue behind ones that are not due yet (``bench/inflight.py`` measured 94 s of lateness at 6k
jobs).

So the task layer sends a step due within ``COUNTDOWN_MAX_SECONDS`` as a Celery countdown, and
parks a later one here:

* ``P:timers``  a sorted set: a JSON ``[step, job_id, version, producer]`` -> when it is due

Every worker runs a :class:`Dispatcher` thread in its main process. Each tick it pops the due
members with one Lua script (``ZRANGEBYSCORE`` and ``ZREM`` in one step, so two dispatchers never
both take one) and sends each as an ordinary message without a countdown. Nothing waits anywhere
but in Redis: no worker memory, no visibility timeout, nothing a SIGKILL can strand. A member
that was popped and not sent (the process died in between) is not lost either: the job's own
deadline stays in ``P:deadlines``, and the watchdog resumes it after its grace. The message
carries the job version it was parked at, so a stale one does nothing, as with a countdown.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis

from workers.errors import StoreUnavailable

log = logging.getLogger(__name__)

# ARGV: now, limit. Returns the members popped and their scores (member, score, ...), oldest first.
_POP_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
local members = {}
for i = 1, #due, 2 do members[#members + 1] = due[i] end
if #members > 0 then redis.call('ZREM', KEYS[1], unpack(members)) end
return due
"""


@dataclass(frozen=True)
class Parked:
    """One parked wake-up: ``step`` of ``job_id`` at ``version``, due at ``due`` (epoch seconds)."""

    step: str
    job_id: str
    version: int
    producer: str
    due: float

    def member(self) -> str:
        return json.dumps([self.step, self.job_id, self.version, self.producer])

    @classmethod
    def from_member(cls, raw: str | bytes, due: float = 0.0) -> Parked:
        step, job_id, version, producer = json.loads(raw)
        return cls(str(step), str(job_id), int(version), str(producer), due)


class RedisTimers:
    """``P:timers`` on one Redis: park, pop what is due, count."""

    def __init__(self, client: redis.Redis, *, prefix: str) -> None:
        self.redis = client
        self.key = f"{prefix}:timers"
        self._pop = client.register_script(_POP_DUE)

    def park(self, parked: Parked) -> None:
        try:
            self.redis.zadd(self.key, {parked.member(): parked.due})
        except redis.RedisError as exc:
            raise StoreUnavailable(f"cannot park {parked.step} of {parked.job_id}: {exc}") from exc

    def pop_due(self, now: float, limit: int) -> list[Parked]:
        """Take up to ``limit`` members due by ``now``; no other caller gets the same ones."""
        try:
            raw = self._pop(keys=[self.key], args=[repr(now), limit])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"cannot read the timers: {exc}") from exc
        popped = []
        for member, score in zip(raw[::2], raw[1::2], strict=True):
            try:
                popped.append(Parked.from_member(member, float(score)))
            except (ValueError, TypeError) as exc:  # not ours: drop it, loudly
                log.error("dropping an unreadable timer entry %r: %s", member, exc)
        return popped

    def count(self) -> int:
        return int(self.redis.zcard(self.key))

    def overdue(self, now: float) -> int:
        """Members due by ``now`` that no dispatcher has taken yet."""
        return int(self.redis.zcount(self.key, "-inf", repr(now)))


class Timers(Protocol):
    """What the dispatcher needs of the timer store (``RedisTimers``, or a fake in unit tests)."""

    def pop_due(self, now: float, limit: int) -> list[Parked]: ...
    def park(self, parked: Parked) -> None: ...


class Dispatcher:
    """Sends parked wake-ups once due: ``run_once`` is one tick, ``start`` runs ticks in a thread.

    ``send`` publishes one message with no countdown. If it fails, the wake-ups not yet sent go
    back into the timer (with their due time) and the tick ends; the next tick tries again.
    """

    def __init__(
        self,
        timers: Timers,
        send: Callable[[Parked], None],
        *,
        tick: float = 0.5,
        batch: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timers = timers
        self.send = send
        self.tick = tick
        self.batch = batch
        self.clock = clock
        self.sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Send everything due now (batch after batch); the number sent."""
        sent = 0
        while True:
            due = self.timers.pop_due(self.clock(), self.batch)
            for i, parked in enumerate(due):
                try:
                    self.send(parked)
                except Exception:
                    for back in due[i:]:
                        self.timers.park(back)
                    raise
                sent += 1
            self.sent += len(due)
            if len(due) < self.batch or self._stop.is_set():
                return sent

    def start(self, name: str = "animate-timers") -> None:
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = self.clock()
            try:
                self.run_once()
            except Exception as exc:  # Redis or the broker is down: keep ticking, say so
                log.warning("timer dispatch failed (will retry): %s", exc)
            self._stop.wait(max(0.0, self.tick - (self.clock() - started)))
