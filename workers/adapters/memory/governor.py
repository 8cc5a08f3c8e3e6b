"""The governor in memory: the Redis governor's twin, held to the same contract suite
(tests/integration/test_governor_contract.py).

It owns, per process, what RedisGovernor keeps in Redis for the fleet: each account's token
buckets (with the same 429 feedback), each lane's admission queue (priority, then producers in
turn, then arrival) and the lane's slots, and the admission's mark on the job's record (through
an :class:`InMemoryJobStore`, when one is given).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from workers.adapters.memory.store import InMemoryJobStore
from workers.adapters.redis.governor import MIN_FACTOR, RECOVERY_PER_SECOND
from workers.domain.job import Job
from workers.domain.states import FINAL_STATES, JobState

# A slot member whose job is in one of these states (or gone) no longer holds the slot: a full
# lane drops such members before admitting, as the Redis script does.
_GONE = FINAL_STATES | {JobState.COPYING}
HEAL_EVERY = 1.0  # seconds: a full lane looks for leaked slots at most this often


class _Bucket:
    """One token bucket: RedisGovernor's ``_BUCKET`` script, on the governor's clock."""

    __slots__ = ("factor", "tokens", "ts")

    def __init__(self, tokens: float, ts: float) -> None:
        self.tokens = tokens
        self.ts = ts
        self.factor = 1.0

    def run(self, now: float, rate: float, mode: str) -> float:
        """Refill to ``now``, then take a token or throttle; the seconds to wait (0: granted)."""
        cap = max(1.0, rate)
        elapsed = max(0.0, now - self.ts)
        self.factor = min(1.0, self.factor + elapsed * RECOVERY_PER_SECOND)
        eff = rate * self.factor
        self.tokens = min(cap, self.tokens + elapsed * eff)
        self.ts = now
        wait = 0.0
        if mode == "take":
            if self.tokens >= 1:
                self.tokens -= 1
            else:
                wait = (1 - self.tokens) / eff
        elif mode == "throttle":
            self.factor = max(MIN_FACTOR, self.factor / 2)
            self.tokens = min(self.tokens, 0.0)
        return wait


class InMemoryGovernor:
    """The ``Governor`` port in memory, with RedisGovernor's semantics: the same token buckets
    (rate, a burst of ``max(1, rate)``, a 429 halving the rate and emptying the bucket, linear
    recovery) on ``clock``; the same admission order; the same slots, healed of members whose job
    ended without a release. ``rates=None`` (the unit tests' default): tokens are unlimited.
    ``takes`` and ``throttles`` record the calls, for tests to look at."""

    def __init__(
        self,
        capacity: int = 2,
        store: InMemoryJobStore | None = None,
        *,
        rates: dict[str, float] | None = None,
        clock: Callable[[], float] | None = None,
        model: str = "animate-anyone-gen2",
    ) -> None:
        self.capacity = capacity
        self.model = model  # whose submits plain "submit" counts
        self.store = store  # admission marks the job on its record, as the Redis script does
        self.rates = rates
        self.clock: Callable[[], float] = clock or (lambda: 0.0)
        self.throttles: list[tuple[str, str]] = []
        self.takes: list[tuple[str, str]] = []
        self.buckets: dict[tuple[str, str], _Bucket] = {}
        # lane -> priority -> producer -> job ids; and each priority's producer turn order
        self.queues: dict[str, dict[int, dict[str, deque[str]]]] = {}
        self.turns: dict[str, dict[int, deque[str]]] = {}
        self.inflight_sets: dict[str, set[str]] = {}
        self.spend: dict[tuple[str, str], float] = {}  # (account, day) -> CNY billed
        self.spend_jobs: dict[tuple[str, str], set[str]] = {}  # the jobs counted in it
        self.spend_models: dict[str, dict[tuple[str, str], float]] = {}  # day -> by model
        self.healed_until: dict[str, float] = {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ buckets

    def rate(self, kind: str) -> float:
        """As RedisGovernor: a kind without its own rate (``template``, a model's
        ``submit:<model>``) has the submit rate."""
        rates = self.rates or {}
        return rates.get(kind) or rates.get("submit", 1.0)

    def _run_bucket(self, account: str, kind: str, mode: str) -> float:
        if self.rates is None:
            return 0.0
        rate = self.rate(kind)
        # As RedisGovernor's keys: plain "submit" is the default model's own submit bucket.
        kind = f"submit:{self.model}" if kind == "submit" else kind
        now = self.clock()
        bucket = self.buckets.get((account, kind))
        if bucket is None:
            bucket = self.buckets[(account, kind)] = _Bucket(max(1.0, rate), now)
        return bucket.run(now, rate, mode)

    def take(self, account: str, kind: str) -> float:
        """Take one token: 0 when granted, else the seconds until one is due."""
        with self.lock:
            self.takes.append((account, kind))
            return self._run_bucket(account, kind, "take")

    def throttled(self, account: str, kind: str) -> None:
        """DashScope answered 429 anyway: slow this bucket down and count it."""
        with self.lock:
            self.throttles.append((account, kind))
            self._run_bucket(account, kind, "throttle")

    # ------------------------------------------------------------------ the queue

    def _push(self, job: Job) -> None:
        """Append the job to its producer's line (the lock held)."""
        prio, producer = job.request.priority, job.request.producer
        lines = self.queues.setdefault(job.lane, {}).setdefault(prio, {})
        line = lines.setdefault(producer, deque())
        if not line:
            self.turns.setdefault(job.lane, {}).setdefault(prio, deque()).append(producer)
        line.append(job.job_id)

    def enqueue(self, job: Job) -> None:
        with self.lock:
            self._push(job)

    def ensure_queued(self, job: Job) -> bool:
        """Put the job in its line unless it is there (or holds a slot); True if it was not."""
        with self.lock:
            line = (
                self.queues.get(job.lane, {})
                .get(job.request.priority, {})
                .get(job.request.producer, deque())
            )
            if job.job_id in line or job.job_id in self.inflight_sets.get(job.lane, set()):
                return False
            self._push(job)
            return True

    def dequeue(self, job: Job) -> bool:
        """Take a queued job out of the queue (cancel); False if it was not there."""
        with self.lock:
            prio, producer = job.request.priority, job.request.producer
            line = self.queues.get(job.lane, {}).get(prio, {}).get(producer)
            if not line or job.job_id not in line:
                return False
            line.remove(job.job_id)
            if not line:
                self.turns[job.lane][prio].remove(producer)
            return True

    def admit(self, account: str) -> list[str]:
        """Job ids moved from the queue into the remote slot's reach, in order, each already
        marked admitted on its record (with a store): the caller sends the messages."""
        with self.lock:
            inflight = self.inflight_sets.setdefault(account, set())
            if len(inflight) >= self.capacity:
                self._heal(account, inflight)
            turns = self.turns.get(account, {})
            admitted: list[str] = []
            while len(inflight) < self.capacity:
                live = [p for p, order in turns.items() if order]
                if not live:
                    break
                prio = max(live)
                producer = turns[prio].popleft()
                line = self.queues[account][prio][producer]
                job_id = line.popleft()
                if line:
                    turns[prio].append(producer)
                if self.store is not None and not self._mark(job_id):
                    continue
                inflight.add(job_id)
                admitted.append(job_id)
            return admitted

    def _heal(self, lane: str, inflight: set[str]) -> None:
        """A full lane drops members whose job moved past the slot or vanished (a lost
        release), at most once every ``HEAL_EVERY`` seconds of the clock."""
        now = self.clock()
        if self.store is None or now < self.healed_until.get(lane, float("-inf")):
            return
        self.healed_until[lane] = now + HEAL_EVERY
        with self.store.lock:
            for job_id in list(inflight):
                job = self.store.jobs.get(job_id)
                if job is None or job.state in _GONE:
                    inflight.discard(job_id)

    def _mark(self, job_id: str) -> bool:
        """The record's side of an admission, in the same step (the store's lock held)."""
        assert self.store is not None
        with self.store.lock:
            job = self.store.jobs.get(job_id)
            if job is None or job.state != JobState.QUEUED:
                return False
            now = self.clock()
            self.store._apply(job, JobState.QUEUED, {"admitted_at": now, "updated_at": now,
                              "next_action_at": now, "wake": "sent", "resumes": None})  # fmt: skip
            return True

    def release(self, account: str, job_id: str) -> None:
        """The job no longer holds or waits for the remote slot."""
        with self.lock:
            self.inflight_sets.setdefault(account, set()).discard(job_id)

    def add_spend(
        self, account: str, day: str, amount: float, job_id: str, model: str = ""
    ) -> float:
        with self.lock:
            counted = self.spend_jobs.setdefault((account, day), set())
            if job_id not in counted:
                counted.add(job_id)
                self.spend[account, day] = self.spend.get((account, day), 0.0) + amount
                models = self.spend_models.setdefault(day, {})
                models[account, model] = models.get((account, model), 0.0) + amount
            return self.spend.get((account, day), 0.0)

    def spent_by_model(self, day: str) -> dict[tuple[str, str], float]:
        with self.lock:
            return dict(self.spend_models.get(day, {}))

    def spent(self, account: str, day: str) -> float:
        with self.lock:
            return self.spend.get((account, day), 0.0)

    def inflight(self, account: str) -> list[str]:
        with self.lock:
            return sorted(self.inflight_sets.get(account, set()))

    def queued(self, account: str = "default") -> int:
        return sum(len(line) for lines in self.queues.get(account, {}).values()
                   for line in lines.values())  # fmt: skip
