"""Remote task state: the per-(account, model) FIFO lanes and each task's life, computed lazily from a clock.

Nothing here runs in the background. Every read first calls :meth:`TaskBook.advance` with the current
time, which starts queued tasks in FIFO order as running slots free up, exactly when they would have
started. A task's status is then a pure function of its scheduled time and the phase durations.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

PENDING = "PENDING"
PRE_PROCESSING = "PRE-PROCESSING"
RUNNING = "RUNNING"
POST_PROCESSING = "POST-PROCESSING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELED = "CANCELED"
UNKNOWN = "UNKNOWN"

FINAL = frozenset({SUCCEEDED, FAILED, CANCELED})


@dataclass
class Task:
    """One async task as the service keeps it."""

    task_id: str
    request_id: str
    account: str
    model: str
    endpoint: str
    submit_time: float
    # (status, seconds) in order; the task ends when the last phase ends.
    phases: tuple[tuple[str, float], ...]
    failure: tuple[str, str] | None = None  # (code, message) when it is to end FAILED
    inputs: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)  # output fields on success
    usage: dict[str, Any] = field(default_factory=dict)
    scheduled_time: float | None = None
    canceled_time: float | None = None

    @property
    def run_seconds(self) -> float:
        return sum(seconds for _, seconds in self.phases)

    @property
    def end_time(self) -> float | None:
        if self.canceled_time is not None:
            return self.canceled_time
        if self.scheduled_time is None:
            return None
        return self.scheduled_time + self.run_seconds

    def status_at(self, now: float) -> str:
        if self.canceled_time is not None:
            return CANCELED
        if self.scheduled_time is None or now < self.scheduled_time:
            return PENDING
        elapsed = now - self.scheduled_time
        for status, seconds in self.phases:
            if elapsed < seconds:
                return status
            elapsed -= seconds
        return FAILED if self.failure else SUCCEEDED


@dataclass
class Lane:
    """The FIFO queue and running slots of one (account, model)."""

    slots: list[float]  # when each running slot becomes free
    queue: deque[str] = field(default_factory=deque)


class TaskBook:
    """All tasks, their lanes, and retention."""

    def __init__(self, concurrency: int, retention_seconds: float) -> None:
        self.concurrency = concurrency
        self.retention_seconds = retention_seconds
        self.tasks: dict[str, Task] = {}
        self.lanes: dict[tuple[str, str], Lane] = {}

    def _lane(self, account: str, model: str) -> Lane:
        key = (account, model)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = Lane(slots=[0.0] * max(1, self.concurrency))
        return lane

    def add(
        self,
        *,
        account: str,
        model: str,
        endpoint: str,
        now: float,
        phases: tuple[tuple[str, float], ...],
        inputs: dict[str, Any],
        failure: tuple[str, str] | None = None,
        result: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
    ) -> Task:
        self.advance(now)
        task = Task(
            task_id=str(uuid.uuid4()),
            request_id=str(uuid.uuid4()),
            account=account,
            model=model,
            endpoint=endpoint,
            submit_time=now,
            phases=phases,
            failure=failure,
            inputs=inputs,
            result=result or {},
            usage=usage or {},
        )
        self.tasks[task.task_id] = task
        self._lane(account, model).queue.append(task.task_id)
        self.advance(now)
        return task

    def advance(self, now: float) -> None:
        """Start every queued task whose turn has come by ``now``, at the moment it came."""
        for lane in self.lanes.values():
            while lane.queue:
                head = self.tasks[lane.queue[0]]
                if head.canceled_time is not None:
                    lane.queue.popleft()
                    continue
                slot = min(range(len(lane.slots)), key=lane.slots.__getitem__)
                start = max(lane.slots[slot], head.submit_time)
                if start > now:
                    break
                head.scheduled_time = start
                lane.slots[slot] = start + head.run_seconds
                lane.queue.popleft()

    def get(self, task_id: str, now: float) -> Task | None:
        """The task, or None when it never existed or its retention has passed."""
        self.advance(now)
        task = self.tasks.get(task_id)
        if task is None or self.expired(task, now):
            return None
        return task

    def expired(self, task: Task, now: float) -> bool:
        end = task.end_time
        return end is not None and end <= now and now - end >= self.retention_seconds

    def cancel(self, task: Task, now: float) -> bool:
        """Cancel a PENDING task; False when it is past PENDING."""
        self.advance(now)
        if task.status_at(now) != PENDING:
            return False
        task.canceled_time = now
        return True

    def queue_position(self, task: Task) -> int | None:
        lane = self.lanes.get((task.account, task.model))
        if lane is None or task.task_id not in lane.queue:
            return None
        return list(lane.queue).index(task.task_id)

    def visible(self, now: float) -> list[Task]:
        self.advance(now)
        return [t for t in self.tasks.values() if not self.expired(t, now)]

    def purge(self, now: float) -> int:
        """Forget expired tasks (memory only; reads already treat them as gone)."""
        gone = [tid for tid, t in self.tasks.items() if self.expired(t, now)]
        for tid in gone:
            del self.tasks[tid]
        return len(gone)
