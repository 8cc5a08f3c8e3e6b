"""The ports: every interface the steps call, as Protocols. Adapters implement them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from workers.domain.decisions import (
    RemoteSnapshot,
)
from workers.domain.job import Job
from workers.domain.media import ImageFacts, VideoFacts
from workers.domain.request import (
    JobKind,
    JobRequest,
)
from workers.domain.states import JobState
from workers.domain.templates import (
    Detection,
    TemplateInfo,
    TemplateSource,
)
from workers.errors import (
    TransientError,
)


class UrlGuard(Protocol):
    """Where our own requests may go: raises ``InvalidJobRequest`` naming ``field`` otherwise."""

    def check(self, url: str, field: str = "image_url") -> None: ...


class JobStore(Protocol):
    def create(self, job: Job) -> tuple[Job, bool]: ...
    def get(self, job_id: str) -> Job | None: ...
    def take(self, job_id: str, version: int) -> Job | None:
        """``get`` for a step sent at ``version``: also marks that step taken (``wake`` cleared
        when the job is still at that version)."""

    def transition(self, job: Job, state: JobState, **changes: Any) -> Job | None: ...
    def record_submission(self, job: Job, task_id: str, **changes: Any) -> Job | None:
        """Move to SUBMITTED recording ``task_id`` as the job's and as owned by it, in one
        step; None if the job moved on or another job owns the task (nothing written then)."""

    def remote_owners(self, task_ids: list[str]) -> dict[str, str | None]:
        """The job owning each DashScope task id (None: none of ours)."""

    def lock_submit(self, lane: str, job_id: str) -> str | None:
        """Hold the lane's submit lock (one POST in flight or unresolved per lane): None when
        ``job_id`` holds it, else the job that does (``job_id`` then waits in line)."""

    def unlock_submit(self, lane: str, job_id: str) -> tuple[str, int] | None:
        """Free the lock if ``job_id`` holds it; the job that waited longest (and its
        version), to be woken."""

    def delivered(self, job: Job) -> bool:
        """Mark a final job's deliveries done, without a version bump; False if it moved."""

    def note_duplicate(self, job_id: str) -> None: ...
    def request_cancel(self, job_id: str) -> None: ...
    def template_owner(self, template_id: str) -> str | None: ...
    def due(self, now: float, limit: int = 100) -> list[str]:
        """Ids of jobs whose next wake-up was due by ``now``."""

    # The workflow's records: templates by account and source video, waiters, detections.
    def template_info(self, template_id: str) -> TemplateInfo | None: ...
    def register_template(
        self,
        template_id: str,
        account: str,
        *,
        source_sha256: str | None = None,
        source_url: str | None = None,
        job_id: str | None = None,
        video_seconds: float | None = None,
    ) -> None: ...
    def template_source(self, account: str, sha256: str) -> TemplateSource: ...
    def claim_template_source(
        self, account: str, sha256: str, expected_job: str | None, job_id: str, generation: int
    ) -> bool: ...
    def forget_template(self, account: str, sha256: str | None, template_id: str) -> None: ...
    def add_waiter(self, template_job_id: str, job_id: str) -> None: ...
    def waiters(self, template_job_id: str) -> list[str]: ...
    def detection(self, account: str, sha256: str) -> Detection | None: ...
    def save_detection(self, account: str, sha256: str, found: Detection, ttl: int) -> None: ...
    def claim_detection(self, account: str, sha256: str, job_id: str, ttl: int) -> bool: ...


class VideoApi(Protocol):
    """DashScope, one API key per account."""

    def submit(self, account: str, request: JobRequest) -> str:
        """Create the remote video task (inputs already resolved); its id. Raises
        Transient/Permanent errors."""

    def submit_template(self, account: str, video_url: str) -> str:
        """Create the remote action-template task; its id."""

    def detect(self, account: str, image_url: str) -> Detection:
        """The synchronous image check."""

    def submit_is_ambiguous(self, exc: TransientError) -> bool:
        """Whether a failed submit may still have created a task (the request was sent)."""

    def poll(self, account: str, task_id: str) -> RemoteSnapshot: ...
    def cancel(self, account: str, task_id: str) -> None: ...
    def recent_tasks(
        self,
        account: str,
        since: float,
        until: float,
        kind: str = JobKind.VIDEO,
        model: str | None = None,
    ) -> list[str]:
        """Ids of the account's tasks for the kind's model (a video job's own ``model``)
        created in [since, until]."""


class Results(Protocol):
    def publish(self, job: Job) -> None:
        """Announce a final job (the result backend, callbacks)."""


class Webhooks(Protocol):
    def send(self, url: str, msg_id: str, payload: dict[str, Any]) -> None:
        """POST the signed payload; Transient/Permanent errors."""


class Metrics(Protocol):
    """Counters and histograms, best effort: a write the backend cannot take is dropped, a bad
    value (negative, NaN) dropped with a warning; only a programming error (an unknown name, the
    wrong labels) raises ValueError. Twins: RedisMetrics, InMemoryMetrics (one contract suite)."""

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None: ...
    def observe(self, name: str, value: float, **labels: str) -> None: ...


class QueueWatch(Protocol):
    """The broker's queues, as the watchdog needs them."""

    def waiting(self) -> Mapping[str, tuple[int, float]]:
        """Per queue: (live consumers, seconds its oldest message has waited; 0 when empty)."""


class Governor(Protocol):
    """Fleet-wide quota buckets and the admission queue of each account."""

    def take(self, account: str, kind: str) -> float:
        """Take a ``submit``/``query``/``detect`` token: 0 when granted, else seconds to wait."""

    def throttled(self, account: str, kind: str) -> None:
        """A 429 arrived anyway: slow that bucket down."""

    def enqueue(self, job: Job) -> None: ...
    def ensure_queued(self, job: Job) -> bool:
        """Put a QUEUED job in its lane's queue unless it is there; True if it was missing."""

    def dequeue(self, job: Job) -> bool: ...
    def admit(self, account: str) -> list[str]:
        """Queued job ids that may now go to DashScope, in order, each marked admitted on its
        record in the same step (admitted_at; due now; its submit message outstanding)."""

    def release(self, account: str, job_id: str) -> None:
        """The job no longer holds or waits for the remote slot."""

    def inflight(self, account: str) -> list[str]:
        """Admitted jobs that hold or wait for the remote slot."""

    def add_spend(
        self, account: str, day: str, amount: float, job_id: str, model: str = ""
    ) -> float:
        """Add a job's bill (CNY) to the account's spend on ``day`` (UTC, YYYY-MM-DD) and to its
        model's, once per job however often it is told; the account's day total."""

    def spent(self, account: str, day: str) -> float:
        """The account's billed spend (CNY) on ``day``."""

    def spent_by_model(self, day: str) -> dict[tuple[str, str], float]:
        """The day's billed spend (CNY) by (account, model)."""


@dataclass(frozen=True)
class StoredCopy:
    bucket: str
    key: str
    size: int
    sha256: str


class CopyProgress(Protocol):
    def __call__(self, copied: int, checkpoint: str | None = None, /) -> None: ...


class Copier(Protocol):
    def copy(
        self,
        url: str,
        key: str,
        metadata: dict[str, str],
        heartbeat: CopyProgress | None = None,
        resume: str | None = None,
        budget: float | None = None,
    ) -> StoredCopy:
        """Stream ``url`` into ``key``; ``heartbeat(bytes, checkpoint)`` is called now and then
        while bytes flow (whatever it raises aborts the copy), with a checkpoint (opaque JSON)
        when there is one. ``resume``: a checkpoint of an earlier attempt to go on from. After
        ``budget`` seconds a copy may stop with :class:`CopyPaused` (and its checkpoint)."""

    def find(self, key: str) -> StoredCopy | None: ...
    def abort(self, key: str, checkpoint: str) -> None:
        """Give up an unfinished copy's upload (the job will not copy again)."""


class ImageProbe(Protocol):
    def probe(self, url: str, *, trusted: bool = False) -> ImageFacts: ...


class VideoProbe(Protocol):
    def probe(self, url: str, *, trusted: bool = False) -> VideoFacts:
        """Download (capped at 200 MB), hash and probe a dance video."""


class Inputs(Protocol):
    """Input references (``http(s)://`` or ``s3://<our bucket>/key``) turned into URLs."""

    def for_us(self, ref: str) -> tuple[str, bool]:
        """Where our own probes fetch ``ref``, and whether that URL is trusted (our bucket)."""

    def for_dashscope(self, ref: str, account: str, model: str) -> str:
        """Where DashScope fetches ``ref`` for ``model`` (``detect``, ``template`` or ``video``):
        http(s) as is; ``s3://`` presigned, or uploaded to its temporary storage."""


# --- Timers: parked wake-ups (RedisTimers, InMemoryTimers)

LEASE_SECONDS = 60.0  # a taken wake-up not confirmed sent by then is due again


@dataclass(frozen=True)
class Parked:
    """One parked wake-up: ``step`` of ``job_id`` at ``version``; ``due``: when (Redis's clock)."""

    step: str
    job_id: str
    version: int
    producer: str
    due: float = 0.0

    def member(self) -> str:
        return json.dumps([self.step, self.job_id, self.version, self.producer])

    @classmethod
    def from_member(cls, raw: str | bytes, due: float = 0.0) -> Parked:
        step, job_id, version, producer = json.loads(raw)
        return cls(str(step), str(job_id), int(version), str(producer), due)


@dataclass(frozen=True)
class Taken:
    """Wake-ups taken on one lease: send them, then confirm with :meth:`done` of the timers that took them."""

    lease: str  # the lease's score, as Redis formats it
    wakes: list[Parked]
    count: int  # members taken, unreadable ones (dropped) included
