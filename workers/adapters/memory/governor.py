"""The governor in memory: the Redis governor's twin, held to the same contract suite."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from workers.adapters.memory.store import InMemoryJobStore
from workers.domain.job import Job
from workers.domain.states import JobState


class InMemoryGovernor:
    """The ``Governor`` port in memory, with RedisGovernor's order: priority, then producers in
    turn, then arrival. Tokens are unlimited unless ``waits`` scripts a wait for a kind."""

    def __init__(self, capacity: int = 2, store: InMemoryJobStore | None = None) -> None:
        self.capacity = capacity
        self.store = store  # admission marks the job on its record, as the Redis script does
        self.clock: Callable[[], float] = lambda: 0.0
        self.waits: dict[str, deque[float]] = {}
        self.throttles: list[tuple[str, str]] = []
        self.takes: list[tuple[str, str]] = []
        # account -> priority -> producer -> job ids; and each priority's producer turn order
        self.queues: dict[str, dict[int, dict[str, deque[str]]]] = {}
        self.turns: dict[str, dict[int, deque[str]]] = {}
        self.inflight_sets: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    def take(self, account: str, kind: str) -> float:
        with self.lock:
            self.takes.append((account, kind))
            script = self.waits.get(kind)
            return script.popleft() if script else 0.0

    def throttled(self, account: str, kind: str) -> None:
        with self.lock:
            self.throttles.append((account, kind))

    def enqueue(self, job: Job) -> None:
        with self.lock:
            prio, producer = job.request.priority, job.request.producer
            lines = self.queues.setdefault(job.lane, {}).setdefault(prio, {})
            line = lines.setdefault(producer, deque())
            if not line:
                self.turns.setdefault(job.lane, {}).setdefault(prio, deque()).append(producer)
            line.append(job.job_id)

    def ensure_queued(self, job: Job) -> bool:
        with self.lock:
            line = (
                self.queues.get(job.lane, {})
                .get(job.request.priority, {})
                .get(job.request.producer, deque())
            )
            if job.job_id in line or job.job_id in self.inflight_sets.get(job.lane, set()):
                return False
        self.enqueue(job)
        return True

    def dequeue(self, job: Job) -> bool:
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
        with self.lock:
            inflight = self.inflight_sets.setdefault(account, set())
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
        with self.lock:
            self.inflight_sets.setdefault(account, set()).discard(job_id)

    def inflight(self, account: str) -> list[str]:
        with self.lock:
            return sorted(self.inflight_sets.get(account, set()))

    def queued(self, account: str = "default") -> int:
        return sum(len(line) for lines in self.queues.get(account, {}).values()
                   for line in lines.values())  # fmt: skip
