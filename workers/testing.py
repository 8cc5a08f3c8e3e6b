"""Fakes of the pipeline's ports for tests: an in-memory job store; a scripted API, copier, probe.

Nothing here imports celery, httpx, boto3 or redis. Build a whole :class:`Services` with
:func:`make_services` and override what a test cares about.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from workers.errors import DashScopeUncertain, TransientError
from workers.jobs import (
    FINAL_STATES,
    Detection,
    ImageFacts,
    Job,
    JobRequest,
    JobState,
    RemoteSnapshot,
    TemplateInfo,
    TemplateSource,
    VideoFacts,
)
from workers.pipeline import Next, Services, StoredCopy

T = TypeVar("T")

START = 1_700_000_000.0  # the FakeClock's default "now" (2023-11-14, epoch seconds)

_FIELDS = {f.name: f for f in dataclasses.fields(Job)}
_FIXED = frozenset({"job_id", "state", "version"})


def _default(name: str) -> Any:
    spec = _FIELDS[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    raise ValueError(f"Job.{name} has no default; it cannot be removed")


class InMemoryJobStore:
    """The :class:`workers.pipeline.JobStore` port in a dict, with RedisJobStore's semantics.

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
            name: _default(name) if value is None else value for name, value in changes.items()
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


def ambiguous(exc: TransientError) -> TransientError:
    """Mark a transient error as sent-but-unanswered: :class:`FakeVideoApi` calls it ambiguous."""
    exc.ambiguous = True  # type: ignore[attr-defined]
    return exc


def _next(script: deque[T | BaseException], what: str) -> T:
    if not script:
        raise AssertionError(f"unexpected {what}: nothing scripted")
    item = script.popleft()
    if isinstance(item, BaseException):
        raise item
    return item


class FakeVideoApi:
    """The ``VideoApi`` port, scripted: each call takes the next queued answer or raises it.

    A call with nothing scripted fails the test (an unexpected submit must never pass silently).
    ``submit_is_ambiguous`` is true for an error marked with :func:`ambiguous`. ``on_submit`` runs
    after the call is recorded and before the answer (the POST is in flight), ``on_recent_tasks``
    once before the list is read, so a test can interleave another worker or a crash there.
    """

    def __init__(
        self,
        *,
        submit: Iterable[str | BaseException] = (),
        poll: Iterable[RemoteSnapshot | BaseException] = (),
        recent: Iterable[str] = (),
        cancel: Iterable[BaseException | None] = (),
        detect: Iterable[Detection | BaseException] = (),
    ) -> None:
        self.detect_script: deque[Detection | BaseException] = deque(detect)
        self.detects: list[str] = []
        self.template_submits: list[str] = []
        self.submit_script: deque[str | BaseException] = deque(submit)
        self.poll_script: deque[RemoteSnapshot | BaseException] = deque(poll)
        self.cancel_script: deque[BaseException | None] = deque(cancel)
        self.recent: list[str] = list(recent)
        self.recent_error: BaseException | None = None
        self.submits: list[JobRequest] = []
        self.accounts_used: list[str] = []
        self.polls: list[str] = []
        self.cancels: list[str] = []
        self.recent_calls: list[tuple[float, float]] = []
        self.on_submit: Callable[[JobRequest], None] | None = None
        self.on_recent_tasks: Callable[[], None] | None = None
        self.lock = threading.Lock()

    def submit(self, account: str, request: JobRequest) -> str:
        with self.lock:
            self.submits.append(request)
            self.accounts_used.append(account)
        if self.on_submit is not None:
            self.on_submit(request)
        with self.lock:
            return _next(self.submit_script, "submit")

    def submit_template(self, account: str, video_url: str) -> str:
        with self.lock:
            self.template_submits.append(video_url)
            self.accounts_used.append(account)
            return _next(self.submit_script, "template submit")

    def detect(self, account: str, image_url: str) -> Detection:
        with self.lock:
            self.detects.append(image_url)
            return _next(self.detect_script, "detect")

    def submit_is_ambiguous(self, exc: TransientError) -> bool:
        return isinstance(exc, DashScopeUncertain) or getattr(exc, "ambiguous", False) is True

    def poll(self, account: str, task_id: str) -> RemoteSnapshot:
        with self.lock:
            self.polls.append(task_id)
            return _next(self.poll_script, "poll")

    def cancel(self, account: str, task_id: str) -> None:
        with self.lock:
            self.cancels.append(task_id)
            error = self.cancel_script.popleft() if self.cancel_script else None
        if error is not None:
            raise error

    def recent_tasks(
        self, account: str, since: float, until: float, kind: str = "video"
    ) -> list[str]:
        hook, self.on_recent_tasks = self.on_recent_tasks, None  # one shot: no recursion
        if hook is not None:
            hook()
        with self.lock:
            self.recent_calls.append((since, until))
            if self.recent_error is not None:
                raise self.recent_error
            return list(self.recent)


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


def stored_copy(key: str, *, bucket: str = "videos-bucket", size: int = 1234) -> StoredCopy:
    """A plausible successful copy of ``key``."""
    return StoredCopy(bucket, key, size, "ab" * 32)


class FakeCopier:
    """The ``Copier`` port, scripted: each copy takes the next queued answer or raises it.

    ``calls`` records ``(url, key, metadata)``; a successful copy is kept for ``find``.
    ``on_copy`` runs while the copy is under way (after the call is recorded).
    """

    def __init__(self, results: Iterable[StoredCopy | BaseException] = ()) -> None:
        self.heartbeats: list[Callable[..., None] | None] = []
        self.script: deque[StoredCopy | BaseException] = deque(results)
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.objects: dict[str, StoredCopy] = {}
        self.aborted: list[tuple[str, str]] = []
        self.resumes: list[str | None] = []  # the checkpoint each copy was given
        self.on_copy: Callable[[], None] | None = None

    def copy(
        self,
        url: str,
        key: str,
        metadata: dict[str, str],
        heartbeat: Callable[..., None] | None = None,
        resume: str | None = None,
        budget: float | None = None,
    ) -> StoredCopy:
        self.heartbeats.append(heartbeat)
        self.resumes.append(resume)
        self.calls.append((url, key, dict(metadata)))
        if self.on_copy is not None:
            self.on_copy()
        stored = _next(self.script, "copy")
        self.objects[stored.key] = stored
        return stored

    def find(self, key: str) -> StoredCopy | None:
        return self.objects.get(key)

    def abort(self, key: str, checkpoint: str) -> None:
        self.aborted.append((key, checkpoint))


VALID_IMAGE = ImageFacts("PNG", 200_000, 768, 1024)


class FakeImageProbe:
    """The ``ImageProbe`` port: returns ``facts``, or raises it when it is an exception."""

    def __init__(self, facts: ImageFacts | BaseException = VALID_IMAGE) -> None:
        self.facts = facts
        self.probes: list[str] = []

    def probe(self, url: str, *, trusted: bool = False) -> ImageFacts:
        self.probes.append(url)
        if isinstance(self.facts, BaseException):
            raise self.facts
        return self.facts


VALID_VIDEO = VideoFacts("mp4", "h264", 2_000_000, 720, 1280, 24.0, 5.0, "cd" * 32)


class FakeVideoProbe:
    """The ``VideoProbe`` port: the next scripted facts (or error), else ``VALID_VIDEO``."""

    def __init__(self, *results: VideoFacts | BaseException) -> None:
        self.script: deque[VideoFacts | BaseException] = deque(results)
        self.probes: list[tuple[str, bool]] = []

    def probe(self, url: str, *, trusted: bool = False) -> VideoFacts:
        self.probes.append((url, trusted))
        item = self.script.popleft() if self.script else VALID_VIDEO
        if isinstance(item, BaseException):
            raise item
        return item


class FakeClock:
    """A clock that moves only when told: call it for "now"."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def make_services(**overrides: Any) -> Services:
    """Services over fresh fakes, a :class:`FakeClock` and rand fixed at 0.5; override by name."""
    woken: list[Next] = []
    values: dict[str, Any] = {
        "store": InMemoryJobStore(),
        "api": FakeVideoApi(),
        "governor": InMemoryGovernor(),
        "wake": woken.append,
        "copier": FakeCopier(),
        "images": FakeImageProbe(),
        "videos": FakeVideoProbe(),
        "s3_prefix": "videos",
        "clock": FakeClock(),
        "rand": lambda: 0.5,
    }
    values.update(overrides)
    governor, store = values["governor"], values["store"]
    if isinstance(governor, InMemoryGovernor) and governor.store is None:
        if isinstance(store, InMemoryJobStore):
            governor.store = store
        governor.clock = values["clock"]
    svc = Services(**values)
    svc.woken = woken  # type: ignore[attr-defined]  # what the use cases asked to schedule
    return svc


class FakeQueueWatch:
    """The ``QueueWatch`` port: per queue (live consumers, seconds its oldest message waited)."""

    def __init__(self, states: dict[str, tuple[int, float]] | None = None) -> None:
        self.states = dict(states or {})

    def waiting(self) -> dict[str, tuple[int, float]]:
        return dict(self.states)
