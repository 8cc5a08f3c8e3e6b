"""The job store in memory: the Redis store's twin, held to the same contract suite."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from workers.domain.job import Job
from workers.domain.states import FINAL_STATES, JobState
from workers.domain.templates import Detection, TemplateInfo, TemplateSource

START = 1_700_000_000.0  # the FakeClock's default "now" (2023-11-14, epoch seconds)


_FIELDS = {f.name: f for f in dataclasses.fields(Job)}


_FIXED = frozenset({"job_id", "state", "version"})


def field_default(name: str) -> Any:
    spec = _FIELDS[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    raise ValueError(f"Job.{name} has no default; it cannot be removed")


class InMemoryJobStore:
    """The :class:`workers.ports.JobStore` port in a dict, with RedisJobStore's semantics.

    A transition is a compare-and-set on the version; a change to None removes the field (it reads
    back as the field's default, as a deleted hash field does); the version goes up by one.
    ``note_duplicate`` counts without a version bump. TTLs are not modelled.
    """

    def __init__(self) -> None:
        self.templates: dict[str, TemplateInfo] = {}
        self.sources: dict[tuple[str, str], TemplateSource] = {}
        self.waiting: dict[str, set[str]] = {}
        self.detections: dict[tuple[str, str], Detection] = {}
        self.detect_claims: dict[tuple[str, str], str] = {}
        self.jobs: dict[str, Job] = {}
        self.remote_owner: dict[str, str] = {}  # DashScope task id -> the job that owns it
        self.submit_locks: dict[str, str] = {}  # lane -> the job whose submit is unresolved
        self.submit_waiters: dict[str, list[str]] = {}  # lane -> jobs waiting, oldest first
        self.lock = threading.Lock()

    def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new job, unless one with that id exists: (the stored job, created?)."""
        with self.lock:
            existing = self.jobs.get(job.job_id)
            if existing is not None:
                return existing, False
            self.jobs[job.job_id] = job
            return job, True

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def take(self, job_id: str, version: int) -> Job | None:
        """Load the job for a step sent at ``version``, marking the step taken (wake cleared)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is not None and job.version == version and job.wake is not None:
                job = self.jobs[job_id] = dataclasses.replace(job, wake=None)
            return job

    def transition(self, job: Job, state: JobState, **changes: Any) -> Job | None:
        """Move ``job`` (as loaded, at its version) to ``state``; None if it lost."""
        unknown = set(changes) - set(_FIELDS)
        if unknown or set(changes) & _FIXED:
            raise TypeError(f"transition cannot change {sorted(unknown | (set(changes) & _FIXED))}")
        with self.lock:
            return self._apply(job, state, changes)

    def _apply(self, job: Job, state: JobState, changes: dict[str, Any]) -> Job | None:
        """The compare-and-set itself (the caller holds the lock)."""
        values = {
            name: field_default(name) if value is None else value for name, value in changes.items()
        }
        stored = self.jobs.get(job.job_id)
        if stored is None or stored.version != job.version:
            return None
        updated = dataclasses.replace(stored, state=state, version=stored.version + 1, **values)
        self.jobs[job.job_id] = updated
        return updated

    def record_submission(self, job: Job, task_id: str, **changes: Any) -> Job | None:
        """``transition`` to SUBMITTED recording ``task_id`` with its owner in one step; None
        (nothing written) if another job owns the task."""
        with self.lock:
            owner = self.remote_owner.get(task_id)
            if owner is not None and owner != job.job_id:
                return None
            moved = self._apply(job, JobState.SUBMITTED, {**changes, "remote_task_id": task_id})
            if moved is not None:
                self.remote_owner[task_id] = job.job_id
            return moved

    def remote_owners(self, task_ids: list[str]) -> dict[str, str | None]:
        with self.lock:
            return {t: self.remote_owner.get(t) for t in task_ids}

    def lock_submit(self, lane: str, job_id: str) -> str | None:
        """Hold the lane's submit lock: None when held, else its holder (a job still
        SUBMITTING; any other holder is taken over), ``job_id`` then waiting in line."""
        with self.lock:
            holder = self.submit_locks.get(lane)
            if holder is not None and holder != job_id:
                held = self.jobs.get(holder)
                if held is not None and held.state == JobState.SUBMITTING:
                    line = self.submit_waiters.setdefault(lane, [])
                    if job_id not in line:
                        line.append(job_id)
                    waiting = self.jobs.get(job_id)
                    if waiting is not None:  # no message of its own: the unlock wakes it
                        self.jobs[job_id] = dataclasses.replace(waiting, wake="timer")
                    return holder
            self.submit_locks[lane] = job_id
            if job_id in self.submit_waiters.get(lane, []):
                self.submit_waiters[lane].remove(job_id)
            return None

    def unlock_submit(self, lane: str, job_id: str) -> tuple[str, int] | None:
        """Free the lock if ``job_id`` holds it; the longest waiter still submitting and its
        version, or None."""
        with self.lock:
            if self.submit_locks.get(lane) != job_id:
                return None
            del self.submit_locks[lane]
            line = self.submit_waiters.get(lane, [])
            while line:
                waiter = self.jobs.get(line.pop(0))
                if waiter is not None and waiter.state == JobState.SUBMITTING:
                    return waiter.job_id, waiter.version
            return None

    def delivered(self, job: Job) -> bool:
        """Mark a final job's deliveries done (no version bump); False if it moved."""
        with self.lock:
            stored = self.jobs.get(job.job_id)
            if stored is None or stored.version != job.version:
                return False
            self.jobs[job.job_id] = dataclasses.replace(
                stored, delivery=None, wake=None, published=True, next_action_at=None
            )
            return True

    def note_duplicate(self, job_id: str) -> None:
        """Count a repeated intake without touching the version (a missing job stays missing)."""
        with self.lock:
            stored = self.jobs.get(job_id)
            if stored is not None:
                self.jobs[job_id] = dataclasses.replace(stored, duplicates=stored.duplicates + 1)

    def request_cancel(self, job_id: str) -> None:
        with self.lock:
            job = self.jobs.get(job_id)
            if job is not None:
                self.jobs[job_id] = dataclasses.replace(job, cancel_requested=True)

    def template_owner(self, template_id: str) -> str | None:
        info = self.templates.get(template_id)
        return info.account if info else None

    def template_info(self, template_id: str) -> TemplateInfo | None:
        return self.templates.get(template_id)

    def register_template(
        self,
        template_id: str,
        account: str,
        *,
        source_sha256: str | None = None,
        source_url: str | None = None,
        job_id: str | None = None,
        video_seconds: float | None = None,
    ) -> None:
        with self.lock:
            self.templates[template_id] = TemplateInfo(
                template_id, account, source_sha256, source_url, job_id, 0.0, video_seconds
            )
            if source_sha256:
                key = (account, source_sha256)
                current = self.sources.get(key, TemplateSource())
                self.sources[key] = dataclasses.replace(current, template_id=template_id)

    def template_source(self, account: str, sha256: str) -> TemplateSource:
        with self.lock:
            return self.sources.get((account, sha256), TemplateSource())

    def claim_template_source(
        self, account: str, sha256: str, expected_job: str | None, job_id: str, generation: int
    ) -> bool:
        with self.lock:
            current = self.sources.get((account, sha256), TemplateSource())
            if current.job_id != expected_job:
                return False
            self.sources[(account, sha256)] = dataclasses.replace(
                current, job_id=job_id, generation=generation
            )
            return True

    def forget_template(self, account: str, sha256: str | None, template_id: str) -> None:
        with self.lock:
            key = (account, sha256 or "")
            current = self.sources.get(key)
            if current is not None and current.template_id == template_id:
                self.sources[key] = dataclasses.replace(current, template_id=None)
            info = self.templates.get(template_id)
            if info is not None:
                self.templates[template_id] = dataclasses.replace(info, revoked=True)

    def add_waiter(self, template_job_id: str, job_id: str) -> None:
        with self.lock:
            self.waiting.setdefault(template_job_id, set()).add(job_id)

    def waiters(self, template_job_id: str) -> list[str]:
        with self.lock:
            return sorted(self.waiting.get(template_job_id, set()))

    def detection(self, account: str, sha256: str) -> Detection | None:
        return self.detections.get((account, sha256))

    def save_detection(self, account: str, sha256: str, found: Detection, ttl: int) -> None:
        self.detections[(account, sha256)] = found

    def claim_detection(self, account: str, sha256: str, job_id: str, ttl: int) -> bool:
        with self.lock:
            return self.detect_claims.setdefault((account, sha256), job_id) == job_id

    def count_by_state(self) -> dict[str, int]:
        with self.lock:
            counts = dict.fromkeys((s.value for s in JobState), 0)
            for job in self.jobs.values():
                counts[job.state.value] += 1
            return counts

    def due(self, now: float, limit: int = 100) -> list[str]:
        """Job ids whose next wake-up was due by ``now``, earliest first (the deadline index)."""
        with self.lock:
            pending = [
                (job.next_action_at, job.job_id)
                for job in self.jobs.values()
                if job.next_action_at is not None
                and (job.state not in FINAL_STATES or job.delivery == "pending")
                and job.next_action_at <= now
            ]
        return [job_id for _, job_id in sorted(pending)[:limit]]
