"""What every step is handed (:class:`Services`), what it returns (:class:`Next`), and the
helpers each step uses to load a job and to schedule its next wake-up."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from workers import logfields, models
from workers.domain.job import Job
from workers.domain.policies import (
    CopyPolicy,
    DetectPolicy,
    PollPolicy,
    PreparePolicy,
    SubmitPolicy,
    WebhookPolicy,
)
from workers.domain.request import (
    s3_ref,
)
from workers.domain.states import JobState
from workers.errors import (
    InvalidJobRequest,
    WorkerError,
)
from workers.models import ModelProfile
from workers.ports import (
    Copier,
    Governor,
    ImageProbe,
    Inputs,
    JobStore,
    Metrics,
    QueueWatch,
    Results,
    UrlGuard,
    VideoApi,
    VideoProbe,
    Webhooks,
)

log = logging.getLogger(__name__)


class NoResults:
    def publish(self, job: Job) -> None:
        pass


class NoMetricsRecorded:
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        pass

    def observe(self, name: str, value: float, **labels: str) -> None:
        pass


class UrlInputs:
    """Inputs that are all http(s) URLs already (s3:// refs need a bucket: see the adapters)."""

    def for_us(self, ref: str) -> tuple[str, bool]:
        self._http_only(ref)
        return ref, False

    def for_dashscope(self, ref: str, account: str, model: str) -> str:
        self._http_only(ref)
        return ref

    @staticmethod
    def _http_only(ref: str) -> None:
        if s3_ref(ref) is not None:
            raise InvalidJobRequest("s3:// inputs need S3_BUCKET", code="InvalidRequest.BadUrl")


@dataclass(frozen=True)
class Tuning:
    """Every value a step is tuned by. bootstrap builds it from settings, where each tunable has
    its one default; tests build it the same way (tests/fakes.py), so they run on production
    values."""

    s3_prefix: str
    input_bucket: str | None  # s3:// inputs must be in this bucket...
    input_prefix: str  # ...under this prefix (never another job's output)
    accounts: frozenset[str]
    default_account: str
    video_hosts: tuple[str, ...]  # hosts a result video may be downloaded from
    profile: ModelProfile  # the model of a job that names none (DASHSCOPE_MODEL)
    profiles: Mapping[str, ModelProfile]  # the models a job may name (DASHSCOPE_MODELS)
    account_regions: Mapping[str, str]  # account -> its region (an API key works in one)
    max_throttled: int  # 429s one job may collect before it fails
    daily_budget: Mapping[str, float]  # account ("*": any other) -> CNY a UTC day
    copy_after_late_cancel: bool  # a cancel that came too late: still store the video?
    intake_seconds: float  # checking a new job's inputs takes at most this long
    queued_recheck: float  # a job waiting in our queue is looked at this often
    delivery_seconds: float  # a final job's results are delivered within this, or again
    detect: DetectPolicy
    prepare: PreparePolicy
    poll: PollPolicy
    submit: SubmitPolicy
    copy: CopyPolicy
    webhook: WebhookPolicy


@dataclass(frozen=True)
class Services(Tuning):
    """What every step is handed: the tuning and the ports. Built once per process (bootstrap)
    and never changed; a test that needs another value builds another (``dataclasses.replace``)."""

    store: JobStore
    api: VideoApi
    copier: Copier
    images: ImageProbe
    governor: Governor
    videos: VideoProbe | None = None
    inputs: Inputs = field(default_factory=UrlInputs)
    wake: Callable[[Next], None] = field(default_factory=lambda: _unscheduled)
    results: Results = field(default_factory=NoResults)
    metrics: Metrics = field(default_factory=NoMetricsRecorded)
    webhooks: Webhooks | None = None
    guard: UrlGuard | None = None  # where our own requests may go (webhooks)
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    queues: QueueWatch | None = None  # the broker's queues (None: unknown, e.g. in unit tests)

    @classmethod
    def of(cls, tuning: Tuning, **ports: Any) -> Services:
        """Services from ``tuning`` and the ports, by name (a tuned value named again wins)."""
        values: dict[str, Any] = {f.name: getattr(tuning, f.name) for f in fields(Tuning)}
        values.update(ports)
        return cls(**values)


Step = Literal["validate", "detect", "prepare", "submit", "poll", "copy", "deliver", "webhook"]


@dataclass(frozen=True)
class Next:
    """Wake ``step`` for ``job_id`` after ``countdown`` seconds, carrying ``version``."""

    step: Step
    job_id: str
    version: int
    countdown: float
    producer: str = field(default="", compare=False)  # shown beside the job id in Flower

    @classmethod
    def of(cls, step: Step, job: Job, countdown: float) -> Next:
        return cls(step, job.job_id, job.version, countdown, job.request.producer)


def profile_of(svc: Services, job: Job) -> ModelProfile:
    """The profile of the model the job runs on (recorded at intake)."""
    found = svc.profiles.get(job.model)
    return found if found is not None else models.profile(job.model)


def _unscheduled(step: Next) -> None:
    raise RuntimeError(f"no scheduler for {step}")  # the task layer always injects one


WAKE_SENT = "sent"  # a message for this version is queued, parked or held: no worker has it yet


WAKE_TIMER = "timer"  # no message: the deadline itself wakes the job (the watchdog sends it)


def then(
    svc: Services,
    job: Job,
    step: Step,
    delay: float,
    state: JobState | None = None,
    **changes: Any,
) -> Next | None:
    """The job moves on (to ``state``; default: it stays) and ``step`` is due in ``delay`` s.

    One compare-and-set records the move, the deadline and that a message is outstanding
    (``wake``), then the message is returned for the task layer to send. A step that ends here
    finished cleanly: the job's count of steps that died with their worker starts again.
    """
    fields = {**next_fields(svc, job, delay), **changes}
    moved = svc.store.transition(job, state or job.state, **fields)
    return Next.of(step, moved, delay) if moved else None


def begin_attempt(
    svc: Services, job: Job, state: JobState, counter: str, seconds: float
) -> Job | None:
    """One more attempt of a step that calls out (its ``counter`` + 1), due to end within
    ``seconds``: after that the watchdog may presume it dead. None: another worker moved it."""
    now = svc.clock()
    return svc.store.transition(job, state, updated_at=now, next_action_at=now + seconds,
                                **{counter: getattr(job, counter) + 1})  # fmt: skip


def next_fields(svc: Services, job: Job, delay: float) -> dict[str, Any]:
    """The record's side of "the next step is due in ``delay`` s and its message is sent"."""
    now = svc.clock()
    fields: dict[str, Any] = {"updated_at": now, "next_action_at": now + delay, "wake": WAKE_SENT}
    if job.resumes:
        fields["resumes"] = None
    return fields


def retry_later(
    svc: Services,
    job: Job,
    step: Step,
    delay: float,
    *,
    error: WorkerError | None = None,
    throttled: bool = False,
    token_wait: bool = False,
) -> Next | None:
    """The same step again after ``delay``, in the same state, recording why."""
    changes: dict[str, Any] = {}
    if error is not None:
        changes.update(error_code=error.code, error_message=error.message)
    if throttled:
        changes["throttled"] = job.throttled + 1
    if token_wait:
        changes["token_waits"] = job.token_waits + 1
    return then(svc, job, step, delay, **changes)


def source_ref(job: Job) -> str:
    """The dance video of a job: as requested, or as recorded for a template made again."""
    ref = job.request.video_url or job.source_url
    assert ref is not None, f"job {job.job_id} has no dance video"
    return ref


DELIVERY_PENDING = "pending"


def load(svc: Services, job_id: str, version: int) -> Job | None:
    """The job for a step sent at ``version``, the step marked taken; None if stale or gone."""
    job = svc.store.take(job_id, version)
    if job is None:
        log.warning("job %s: no record (expired or never created)", job_id)
        return None
    if job.version != version:
        log.info("job %s: stale message (version %d, job at %d); ignored", job_id, version,
                 job.version)  # fmt: skip
        return None
    logfields.bind(job_id=job_id, version=version, state=job.state.value)
    return job
