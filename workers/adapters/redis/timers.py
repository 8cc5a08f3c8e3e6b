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

Every worker runs a :class:`Dispatcher` thread in its main process. Each tick it takes the due
members on a lease with one Lua script (read and re-score to "now + 60 s" in one step, so two
dispatchers never both take one), sends each as an ordinary message without a countdown, and
then confirms them (removes them). Nothing waits anywhere but in Redis: no worker memory, no
visibility timeout, nothing a SIGKILL can strand. A member taken and not confirmed (its process
died mid-batch) comes due again when the lease ends, and is sent again: the message carries the
job version it was parked at, so a second copy does nothing, as with a redelivered countdown.
All times are Redis's own (``TIME``), so hosts whose clocks differ agree on when a wait is due.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import redis

from workers.adapters.redis.replication import protected
from workers.errors import StoreUnavailable
from workers.ports import LEASE_SECONDS, Parked, Taken

if TYPE_CHECKING:
    from workers.adapters.redis.replication import Replication

__all__ = ["LEASE_SECONDS", "Dispatcher", "Parked", "RedisTimers", "Taken"]

log = logging.getLogger(__name__)

# Every time is Redis's (TIME), so hosts with skewed clocks still agree on when a wait is due.
# ARGV: delay (seconds), member.
_PARK = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], t[1] + t[2] / 1000000 + tonumber(ARGV[1]), ARGV[2])
return 1
"""

# Take up to ARGV[1] due members on a lease of ARGV[2] seconds: each is re-scored to now + lease,
# so a taker that dies before sending lets it come due again. Returns the lease score as Redis
# formats it, then member, original score, ... oldest first.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, ARGV[1])
if #due == 0 then return {''} end
local until_ = now + tonumber(ARGV[2])
for i = 1, #due, 2 do redis.call('ZADD', KEYS[1], until_, due[i]) end
local out = {redis.call('ZSCORE', KEYS[1], due[1])}
for i = 1, #due do out[#out + 1] = due[i] end
return out
"""

# Sent: remove each member still on the lease ARGV[1] (one parked again since, with a new due
# time, stays).
_DONE = """
local n = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[1] then
    n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return n
"""


class RedisTimers:
    """``P:timers`` on one Redis: park, take what is due on a lease, confirm, count."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, replication: Replication | None = None
    ) -> None:
        """``replication``: parking is a protected write (None: as on one server)."""
        self.redis = client
        self.key = f"{prefix}:timers"
        self.replication = replication
        self._park = client.register_script(_PARK)
        self._take = client.register_script(_TAKE)
        self._done = client.register_script(_DONE)

    def park(self, parked: Parked, delay: float) -> None:
        """Due ``delay`` seconds from now (Redis's clock)."""
        try:
            protected(self.replication, self._park, [self.key], [repr(delay), parked.member()])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"cannot park {parked.step} of {parked.job_id}: {exc}") from exc

    def take(self, limit: int, lease: float = LEASE_SECONDS) -> Taken:
        """Up to ``limit`` due wake-ups, oldest first, leased for ``lease`` seconds: no other
        taker gets them meanwhile; unconfirmed, they are due again when the lease ends."""
        try:
            raw = self._take(keys=[self.key], args=[limit, repr(lease)])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"cannot read the timers: {exc}") from exc
        lease_score, *pairs = raw
        members = pairs[::2]
        wakes = []
        for member, score in zip(members, pairs[1::2], strict=True):
            try:
                wakes.append(Parked.from_member(member, float(score)))
            except (ValueError, TypeError) as exc:  # not ours: drop it, loudly
                log.error("dropping an unreadable timer entry %r: %s", member, exc)
                self.redis.zrem(self.key, member)
        return Taken(_text(lease_score), wakes, len(members))

    def done(self, taken: Taken, wakes: list[Parked]) -> int:
        """Confirm ``wakes`` (of ``taken``) sent: they leave the timer."""
        if not wakes:
            return 0
        members = [w.member() for w in wakes]
        try:
            return int(self._done(keys=[self.key], args=[taken.lease, *members]))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"cannot confirm timers: {exc}") from exc

    def release(self, wakes: list[Parked]) -> None:
        """Give back taken, unsent wake-ups at their own due time (not the lease's end)."""
        if wakes:
            self.redis.zadd(self.key, {w.member(): w.due for w in wakes}, xx=True)

    def count(self) -> int:
        return int(self.redis.zcard(self.key))

    def overdue(self) -> int:
        """Members due now that no dispatcher has taken."""
        secs, micros = self.redis.time()
        return int(self.redis.zcount(self.key, "-inf", secs + micros / 1e6))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Timers(Protocol):
    """What the dispatcher needs of the timer store (``RedisTimers``, or a fake in unit tests)."""

    def take(self, limit: int, lease: float = LEASE_SECONDS) -> Taken: ...
    def done(self, taken: Taken, wakes: list[Parked]) -> int: ...
    def release(self, wakes: list[Parked]) -> None: ...


class Dispatcher:
    """Sends parked wake-ups once due: ``run_once`` is one tick, ``start`` runs ticks in a thread.

    Each batch is taken on a lease, sent (``send`` publishes one message with no countdown), then
    confirmed. If a send fails, the unsent ones go back at their own due time and the tick ends;
    if the process dies mid-batch, the unconfirmed ones come due again when the lease ends. A
    wake-up sent twice that way is harmless: its message carries the job version, and only one
    message per version can move the job.
    """

    def __init__(
        self,
        timers: Timers,
        send: Callable[[Parked], None],
        *,
        tick: float = 0.5,
        batch: int = 500,
        lease: float = LEASE_SECONDS,
    ) -> None:
        self.timers = timers
        self.send = send
        self.tick = tick
        self.batch = batch
        self.lease = lease
        self.sent = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Send everything due now (batch after batch); the number sent."""
        sent_now = 0
        while True:
            taken = self.timers.take(self.batch, self.lease)
            sent: list[Parked] = []
            try:
                for parked in taken.wakes:
                    self.send(parked)
                    sent.append(parked)
            except Exception:
                self.timers.done(taken, sent)
                self.timers.release(taken.wakes[len(sent) :])
                raise
            finally:
                self.sent += len(sent)
                sent_now += len(sent)
            self.timers.done(taken, sent)
            if taken.count < self.batch or self._stop.is_set():
                return sent_now

    def start(self, name: str = "animate-timers") -> None:
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.run_once()
            except Exception as exc:  # Redis or the broker is down: keep ticking, say so
                log.warning("timer dispatch failed (will retry): %s", exc)
            self._stop.wait(max(0.0, self.tick - (time.monotonic() - started)))
