"""The use cases: intake, detect, prepare, submit, poll, copy. Each loads a job, decides, applies with
compare-and-set.

A video job runs detect (the image check) -> prepare (its dance video's template: reused, or made
by a template job) -> submit -> poll -> copy; a template job runs prepare -> submit -> poll.

Adapters sit behind the small ports below; this module imports none of celery, httpx, boto3 or
redis. A use case returns the next wake-up (:class:`Next`) for the task layer to schedule. Every
message carries the job version it was scheduled at; a message whose version is stale does nothing,
which makes redeliveries and duplicate chains harmless.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from workers.errors import (
    CopyMismatch,
    CopyPaused,
    DashScopeRejected,
    DashScopeThrottled,
    InvalidJobRequest,
    PermanentError,
    StaleStep,
    TransientError,
    WorkerError,
)
from workers.guard import AddressGuard, host_allowed
from workers.jobs import (
    JOB_ID_RE,
    CopyPolicy,
    Detection,
    DetectPolicy,
    Finish,
    ImageFacts,
    Job,
    JobKind,
    JobRequest,
    JobState,
    PollPolicy,
    PreparePolicy,
    RemoteSnapshot,
    RetryCopy,
    StartCopy,
    SubmitPolicy,
    TemplateInfo,
    TemplateReady,
    TemplateSource,
    VideoFacts,
    Wait,
    WebhookPolicy,
    callback_queue_ok,
    callback_task_ok,
    can_move,
    check_image,
    check_template_video,
    copy_expired,
    decide_copy_error,
    decide_poll,
    decide_poll_error,
    judge_detection,
    parse_request,
    parse_template_request,
    result_object,
    s3_key,
    s3_ref,
    template_failed_for_good,
    template_job_id,
    template_lane,
)
from workers.routes import queue_for

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- ports


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
        self, account: str, since: float, until: float, kind: str = JobKind.VIDEO
    ) -> list[str]:
        """Ids of the account's tasks for the kind's model created in [since, until]."""


class Results(Protocol):
    def publish(self, job: Job) -> None:
        """Announce a final job (the result backend, callbacks)."""


class Webhooks(Protocol):
    def send(self, url: str, msg_id: str, payload: dict[str, Any]) -> None:
        """POST the signed payload; Transient/Permanent errors."""


class _NoResults:
    def publish(self, job: Job) -> None:
        pass


class Metrics(Protocol):
    """Counters and histograms (best effort: never raises)."""

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None: ...
    def observe(self, name: str, value: float, **labels: str) -> None: ...


class _NoMetrics:
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        pass

    def observe(self, name: str, value: float, **labels: str) -> None:
        pass


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


@dataclass
class Services:
    store: JobStore
    api: VideoApi
    copier: Copier
    images: ImageProbe
    s3_prefix: str
    governor: Governor
    videos: VideoProbe | None = None
    inputs: Inputs = field(default_factory=UrlInputs)
    input_bucket: str | None = None  # s3:// inputs must be in this bucket...
    input_prefix: str = "inputs/"  # ...under this prefix (never another job's output)
    detect: DetectPolicy = field(default_factory=DetectPolicy)
    prepare: PreparePolicy = field(default_factory=PreparePolicy)
    accounts: frozenset[str] = frozenset({"default"})
    default_account: str = "default"
    wake: Callable[[Next], None] = field(default_factory=lambda: _unscheduled)
    max_throttled: int = 50  # 429s one job may collect before it fails
    video_hosts: tuple[str, ...] = ("*",)  # hosts a result video may be downloaded from
    results: Results = field(default_factory=_NoResults)
    metrics: Metrics = field(default_factory=_NoMetrics)
    webhooks: Webhooks | None = None
    guard: AddressGuard | None = None  # where our own requests may go (webhooks)
    webhook: WebhookPolicy = field(default_factory=WebhookPolicy)
    copy_after_late_cancel: bool = True  # a cancel that came too late: still store the video?
    poll: PollPolicy = field(default_factory=PollPolicy)
    submit: SubmitPolicy = field(default_factory=SubmitPolicy)
    copy: CopyPolicy = field(default_factory=CopyPolicy)
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    queues: QueueWatch | None = None  # the broker's queues (None: unknown, e.g. in unit tests)
    intake_seconds: float = 60.0  # checking a new job's inputs takes at most this long
    queued_recheck: float = 3600.0  # a job waiting in our queue is looked at this often
    delivery_seconds: float = 60.0  # a final job's results are delivered within this, or again


# ----------------------------------------------------------------------------- results

Step = Literal["validate", "detect", "prepare", "submit", "poll", "copy", "deliver"]


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


def _unscheduled(step: Next) -> None:
    raise RuntimeError(f"no scheduler for {step}")  # the task layer always injects one


@dataclass(frozen=True)
class IntakeResult:
    job_id: str
    state: JobState
    created: bool
    next: Next | None = None


# ----------------------------------------------------------------------------- intake


def intake(
    svc: Services,
    kwargs: Mapping[str, Any],
    args: tuple[Any, ...],
    message_id: str,
    kind: JobKind = JobKind.VIDEO,
) -> IntakeResult:
    """Validate a producer's request, create the job (or find it), check the image.

    Bad input still creates a record, in REJECTED with the reason, so the producer can see why.
    """
    now = svc.clock()
    raw_id = kwargs.get("job_id") if isinstance(kwargs, Mapping) else None
    try:
        request = (parse_template_request if kind == JobKind.TEMPLATE else parse_request)(
            kwargs, args
        )
    except InvalidJobRequest as exc:
        job_id = raw_id if isinstance(raw_id, str) and _usable_id(raw_id) else message_id
        # The request is refused, but its callback (if that part is sound) still hears why.
        task, queue = kwargs.get("callback_task"), kwargs.get("callback_queue")
        callback_ok = callback_task_ok(task) and callback_queue_ok(queue)
        placeholder = JobRequest(
            job_id=job_id,
            callback_task=task if callback_ok else None,
            callback_queue=queue if callback_ok else None,
        )
        job = Job(
            job_id=job_id,
            state=JobState.REJECTED,
            version=1,
            request=placeholder,
            created_at=now,
            updated_at=now,
            kind=kind.value,
            intake_message_id=message_id,
            finished_at=now,
            error_code=exc.code,
            error_message=exc.message,
            # A job_id that cannot name a job: the record goes under the message id, and the
            # refusal is also published under the id the producer asked for (its AsyncResult).
            requested_id=raw_id if job_id != raw_id and _echoable_id(raw_id) else None,
            **_final_fields(svc, now),
        )
        stored, created = svc.store.create(job)
        log.info("job %s rejected at intake: %s", stored.job_id, exc)
        if created:
            _ended(svc, stored)
        return IntakeResult(stored.job_id, stored.state, created)

    job_id = request.job_id or message_id
    account, _ = _account_for(svc, request)
    job = Job(
        job_id=job_id,
        state=JobState.RECEIVED,
        version=1,
        request=request,
        created_at=now,
        updated_at=now,
        account=account,
        kind=kind.value,
        intake_message_id=message_id,
        # From its first write the job has a deadline: a worker that dies while checking the
        # inputs leaves a job the watchdog finds, and checks again (animate.validate).
        next_action_at=now + svc.intake_seconds,
    )
    stored, created = svc.store.create(job)
    if not created and stored.intake_message_id != message_id:
        # Same job_id from another message: the idempotency key did its job.
        log.info("job %s already exists (state %s); duplicate intake ignored", job_id, stored.state)
        svc.store.note_duplicate(job_id)  # no version bump: in-flight messages stay valid
        return IntakeResult(job_id, stored.state, False)
    if stored.state != JobState.RECEIVED:
        return IntakeResult(job_id, stored.state, created)  # a redelivered intake, already past
    return IntakeResult(job_id, _validate(svc, stored), created)


def validate(svc: Services, job_id: str, version: int) -> Next | None:
    """Check a received job's inputs again: its intake's worker died while checking them."""
    job = _load(svc, job_id, version)
    if job is not None and job.state == JobState.RECEIVED:
        _validate(svc, job)
    return None


def _validate(svc: Services, job: Job) -> JobState:
    """Check a received job's inputs (nothing is sent before this passes), then move it on:
    into the image check, the dance video's preparation, or our queue. The state it is in."""
    request = job.request
    try:
        _, refusal = _account_for(svc, request)
        if refusal is not None:
            raise refusal
        if request.webhook_url and svc.guard is not None:
            svc.guard.check(request.webhook_url, "webhook_url")
        for ref in (request.image_url, request.video_url):
            _check_input_ref(svc, ref)
        facts = _probe_image(svc, request) if not job.is_template else None
    except InvalidJobRequest as exc:
        done = finish(svc, job, Finish(JobState.REJECTED, exc.code, exc.message))
        return done.state if done else job.state
    sha = facts.sha256 if facts else None
    if request.detect and not job.is_template:
        woken = _then(svc, job, "detect", 0, JobState.DETECTING, image_sha256=sha)
    elif request.video_url is not None:
        woken = _then(svc, job, "prepare", 0, JobState.PREPARING, image_sha256=sha)
    else:
        _enqueue(svc, job, image_sha256=sha)
        return JobState.QUEUED
    if woken is not None:
        svc.wake(woken)
    return JobState.DETECTING if request.detect and not job.is_template else JobState.PREPARING


def _enqueue(svc: Services, job: Job, **changes: Any) -> Job | None:
    """Into our own queue: nothing is sent until the lane has room (admission control). A
    queued job is looked at again after ``queued_recheck`` (the watchdog makes sure it is in
    its lane's queue), so even a queued job always has a deadline."""
    now = svc.clock()
    moved = svc.store.transition(job, JobState.QUEUED, updated_at=now, wake=WAKE_TIMER,
                                 next_action_at=now + svc.queued_recheck,
                                 **changes)  # fmt: skip
    if moved is not None:
        svc.governor.enqueue(moved)
        admit(svc, moved.lane)
    return moved


def _check_input_ref(svc: Services, ref: str | None) -> None:
    where = s3_ref(ref) if ref else None
    if where is None:
        return
    if svc.input_bucket is None or where[0] != svc.input_bucket:
        raise InvalidJobRequest(
            f"{ref} is not in this service's input bucket "
            f"({svc.input_bucket or 'none is configured'}); use an http(s) URL",
            code="InvalidRequest.BadUrl",
        )
    prefix = svc.input_prefix.lstrip("/")
    key = where[1]
    if not key.startswith(prefix) or ".." in key.split("/") or key == prefix:
        # Only what producers upload is theirs to name: never another job's stored video.
        raise InvalidJobRequest(
            f"s3:// inputs must be under {prefix!r} in the input bucket (where the client and "
            "CLI upload local files); use an http(s) URL for anything else",
            code="InvalidRequest.BadUrl",
        )


def _probe_image(svc: Services, request: JobRequest) -> ImageFacts:
    """Look at the image before anything is paid for: DashScope's documented limits."""
    url, trusted = svc.inputs.for_us(request.image_url)
    try:
        facts = svc.images.probe(url, trusted=trusted)
    except TransientError as exc:
        # The image could not be fetched right now. Without a look at it we may not spend money,
        # so the job is refused with the reason; the producer may enqueue it again.
        raise InvalidJobRequest(exc.message, code="InvalidImage.Unreachable") from exc
    check_image(facts)
    return facts


def _account_for(svc: Services, request: JobRequest) -> tuple[str, InvalidJobRequest | None]:
    """The account a job runs under: the one it names, else its template's owner, else the
    default. A template only works under the account that made it."""
    owner = svc.store.template_owner(request.template_id)
    account = request.account or owner or svc.default_account
    if account not in svc.accounts:
        return svc.default_account, InvalidJobRequest(
            f"account {account!r} is not configured (configured: {', '.join(sorted(svc.accounts))})",
            code="InvalidRequest.Account",
        )
    if owner is not None and owner != account:
        return account, InvalidJobRequest(
            f"template {request.template_id} belongs to account {owner!r}, not {account!r}",
            code="InvalidRequest.TemplateAccount",
        )
    return account, None


def admit(svc: Services, lane: str) -> None:
    """Let queued jobs go to DashScope while the lane (an account and model) has room; wake
    their submit steps. The governor takes the slot and marks the job admitted in one step, so
    a crash here only loses the message, which the watchdog sends again."""
    for job_id in svc.governor.admit(lane):
        job = svc.store.get(job_id)
        if job is not None and job.state == JobState.QUEUED and job.admitted_at is not None:
            svc.wake(Next.of("submit", job, 0))


# Beyond this many jobs holding or awaiting an account's slots (a dedicated deployment with many
# concurrent tasks), looking for the task that just started costs more than its next poll saves.
FREE_SLOT_SCAN_LIMIT = 8


def _free_slot(svc: Services, job: Job) -> None:
    """The job has left DashScope's slot (or never reached it): let the next one in.

    The task queued longest behind it at DashScope has most likely just started, and its poll
    chain is on the slow remote-PENDING schedule: ask about it now, so its end is noticed
    promptly. (The slow message it already has becomes stale and does nothing.) One slot freed
    starts one task: only that one is woken.
    """
    svc.governor.release(job.lane, job.job_id)
    others = svc.governor.inflight(job.lane)
    if len(others) <= FREE_SLOT_SCAN_LIMIT:
        waiting = [
            other
            for other in (svc.store.get(other_id) for other_id in others)
            if other is not None
            and other.state == JobState.SUBMITTED
            and other.remote_status in (None, "PENDING")
        ]
        if waiting:
            first = min(waiting, key=lambda o: (o.submitted_at or o.created_at, o.job_id))
            svc.wake(Next.of("poll", first, 0))
    admit(svc, job.lane)


def _wait_for_token(svc: Services, job: Job, kind: str, step: Step) -> Next | None:
    """None when a ``kind`` token was granted; else the same step later, at the same state.

    Waiting for the quota is not a failure: it uses no attempt and no Celery retry.
    """
    wait = svc.governor.take(job.account, kind)
    if wait <= 0:
        return None
    delay = wait + svc.rand() * 0.05  # spread the waiters a little
    return _then(svc, job, step, delay, token_waits=job.token_waits + 1)


WAKE_SENT = "sent"  # a message for this version is queued, parked or held: no worker has it yet
WAKE_TIMER = "timer"  # no message: the deadline itself wakes the job (the watchdog sends it)


def _then(
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
    fields = {**_next_fields(svc, job, delay), **changes}
    moved = svc.store.transition(job, state or job.state, **fields)
    return Next.of(step, moved, delay) if moved else None


def _next_fields(svc: Services, job: Job, delay: float) -> dict[str, Any]:
    """The record's side of "the next step is due in ``delay`` s and its message is sent"."""
    now = svc.clock()
    fields: dict[str, Any] = {"updated_at": now, "next_action_at": now + delay, "wake": WAKE_SENT}
    if job.resumes:
        fields["resumes"] = None
    return fields


def _usable_id(value: str) -> bool:
    return bool(JOB_ID_RE.match(value))


def _echoable_id(value: Any) -> bool:
    """A producer's unusable job_id that can still key its result (a short string)."""
    return isinstance(value, str) and 0 < len(value) <= 256


# ----------------------------------------------------------------------------- detect

TEMPLATE_REFUSED = "InvalidFile.Template.Content"  # DashScope: no such template for this account
# DashScope's 4xx codes on detect that mean the image (not our request or key) is at fault.
_IMAGE_FAULTS = ("InvalidFile", "InvalidURL", "InvalidParameter")


def detect(svc: Services, job_id: str, version: int) -> Next | None:
    """The image check (animate-anyone-detect-gen2), once per image and account: the answer is
    cached by the image's content hash, and only one job checks a given image at a time."""
    job = _load(svc, job_id, version)
    if job is None or job.state != JobState.DETECTING:
        return None
    sha = job.image_sha256
    found = svc.store.detection(job.account, sha) if sha else None
    cached = found is not None
    if found is None:
        if sha and not svc.store.claim_detection(
            job.account, sha, job_id, int(svc.detect.attempt_seconds)
        ):
            # Another job is checking the same image right now: wait for its cached answer.
            return _retry_later(svc, job, "detect", 1.0 + svc.rand(), token_wait=True)
        waiting = _wait_for_token(svc, job, "detect", "detect")
        if waiting is not None:
            return waiting
        now = svc.clock()
        attempt = svc.store.transition(
            job,
            JobState.DETECTING,
            detect_attempts=job.detect_attempts + 1,
            updated_at=now,
            next_action_at=now + svc.detect.attempt_seconds,
        )
        if attempt is None:
            return None
        job = attempt
        try:
            url = svc.inputs.for_dashscope(job.request.image_url, job.account, "detect")
            found = svc.api.detect(job.account, url)
        except DashScopeThrottled as exc:
            svc.governor.throttled(job.account, "detect")
            return _detect_failed(svc, job, exc, count=False)
        except DashScopeRejected as exc:
            state = JobState.REJECTED if exc.code.startswith(_IMAGE_FAULTS) else JobState.FAILED
            finish(svc, job, Finish(state, exc.code, exc.message))
            return None
        except PermanentError as exc:
            finish(svc, job, Finish(JobState.FAILED, exc.code, exc.message))
            return None
        except TransientError as exc:
            return _detect_failed(svc, job, exc, count=True)
        if sha:
            svc.store.save_detection(job.account, sha, found, svc.detect.cache_seconds)
    verdict = judge_detection(job.request, found, svc.detect.half_body)
    seen = {"bodystyle": found.bodystyle or None, "detect_cached": cached}
    if isinstance(verdict, Finish):
        finish(svc, job, verdict, **seen)
        return None
    if verdict is not None:
        log.warning("job %s: %s", job_id, verdict)
    if job.request.video_url is not None:
        return _then(svc, job, "prepare", 0, JobState.PREPARING, warning=verdict, **seen)
    _enqueue(svc, job, warning=verdict, **seen)
    return None


def _detect_failed(svc: Services, job: Job, exc: TransientError, *, count: bool) -> Next | None:
    if count and job.detect_attempts >= svc.detect.max_attempts:
        finish(
            svc,
            job,
            Finish(
                JobState.FAILED,
                "DetectRetriesExhausted",
                f"{job.detect_attempts} image-check attempts failed; last: {exc}",
            ),
        )
        return None
    delay = svc.detect.backoff.delay(max(1, job.detect_attempts), svc.rand)
    log.warning("job %s: image check failed (%s); again in %.1fs", job.job_id, exc, delay)
    return _retry_later(svc, job, "detect", delay, error=exc, throttled=not count)


def _retry_later(
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
    return _then(svc, job, step, delay, **changes)


# ----------------------------------------------------------------------------- prepare


def _source_ref(job: Job) -> str:
    """The dance video of a job: as requested, or as recorded for a template made again."""
    ref = job.request.video_url or job.source_url
    assert ref is not None, f"job {job.job_id} has no dance video"
    return ref


def prepare(svc: Services, job_id: str, version: int) -> Next | None:
    """Find the template for a job's dance video: check the video (once), then reuse the
    account's template for it, wait for the template job making it, or start that job."""
    job = _load(svc, job_id, version)
    if job is None or job.state != JobState.PREPARING:
        return None
    if job.source_sha256 is None:
        if svc.videos is None:
            finish(svc, job, Finish(JobState.FAILED, "NoVideoProbe", "no video probe configured"))
            return None
        now = svc.clock()
        attempt = svc.store.transition(
            job,
            JobState.PREPARING,
            prepare_attempts=job.prepare_attempts + 1,
            updated_at=now,
            next_action_at=now + svc.prepare.attempt_seconds,
        )
        if attempt is None:
            return None
        job = attempt
        try:
            url, trusted = svc.inputs.for_us(_source_ref(job))
            facts = svc.videos.probe(url, trusted=trusted)
            check_template_video(facts)
        except InvalidJobRequest as exc:
            finish(svc, job, Finish(JobState.REJECTED, exc.code, exc.message))
            return None
        except TransientError as exc:
            if job.prepare_attempts >= svc.prepare.max_attempts:
                finish(svc, job, Finish(JobState.FAILED, exc.code,
                                        f"{job.prepare_attempts} attempts to fetch the dance "
                                        f"video failed; last: {exc.message}"))  # fmt: skip
                return None
            delay = svc.prepare.backoff.delay(job.prepare_attempts, svc.rand)
            return _retry_later(svc, job, "prepare", delay, error=exc)
        checked = svc.store.transition(
            job,
            JobState.PREPARING,
            source_sha256=facts.sha256,
            source_seconds=round(facts.seconds, 3),
            error_code=None,
            error_message=None,
            updated_at=svc.clock(),
        )
        if checked is None:
            return None
        job = checked
    for _ in range(3):  # compare-and-set on the source record: go again if another job moved it
        outcome = _resolve_template(svc, job)
        if outcome is not _AGAIN:
            return outcome if isinstance(outcome, Next) else None
        reloaded = svc.store.get(job_id)
        if reloaded is None or reloaded.version != job.version:
            return None
    return _retry_later(svc, job, "prepare", 1.0 + svc.rand())


_AGAIN = object()


def _resolve_template(svc: Services, job: Job) -> Next | object | None:
    assert job.source_sha256 is not None
    account, sha = job.account, job.source_sha256
    source = svc.store.template_source(account, sha)
    if source.template_id and source.template_id != job.rejected_template:
        return _template_found(svc, job, source.template_id, reused=True)
    maker = svc.store.get(source.job_id) if source.job_id else None
    if maker is not None and maker.job_id == job.job_id:
        return _queue_self(svc, job)  # a template job that claimed its video earlier
    if maker is not None and not maker.final:
        return _wait_for_maker(svc, job, maker)
    if maker is not None:
        if (
            maker.state == JobState.READY
            and maker.template_id
            and maker.template_id != job.rejected_template
        ):
            return _template_found(svc, job, maker.template_id, reused=True)
        if maker.job_id == job.template_job_id or template_failed_for_good(maker):
            # The template job this job waited for failed, or failed on content DashScope will
            # refuse again: no new paid attempt; the job ends with the reason.
            finish(
                svc,
                job,
                Finish(
                    JobState.FAILED,
                    "TemplateFailed",
                    f"making the action template failed (job {maker.job_id}): "
                    f"{maker.error_code}: {maker.error_message}",
                ),
            )
            return None
    generation = source.generation + 1
    maker_id = job.job_id if job.is_template else template_job_id(account, sha, generation)
    if not svc.store.claim_template_source(account, sha, source.job_id, maker_id, generation):
        return _AGAIN
    if job.is_template:
        return _queue_self(svc, job)
    maker = _start_template_job(svc, job, maker_id)
    return _wait_for_maker(svc, job, maker)


def _template_found(svc: Services, job: Job, template_id: str, *, reused: bool) -> Next | None:
    if job.is_template:
        finish(svc, job, Finish(JobState.READY), template_id=template_id, template_reused=reused)
        return None
    moved = _enqueue(
        svc,
        job,
        template_id=template_id,
        template_reused=reused and job.template_job_id is None,
        error_code=None,
        error_message=None,
        resumes=None,
    )
    if moved is not None:
        log.info("job %s: template %s ready; queued", job.job_id, template_id)
    return None


def _queue_self(svc: Services, job: Job) -> Next | None:
    """A template job goes to its account's template lane."""
    _enqueue(svc, job)
    return None


def _start_template_job(svc: Services, job: Job, maker_id: str) -> Job:
    """The template job for a video job's dance video (shared by every job that names it)."""
    now = svc.clock()
    maker = Job(
        job_id=maker_id,
        state=JobState.QUEUED,
        version=1,
        request=JobRequest(
            video_url=_source_ref(job),
            account=job.account,
            priority=job.request.priority,
            producer=job.request.producer,
            detect=False,
            metadata={"for_job": job.job_id},
        ),
        created_at=now,
        updated_at=now,
        account=job.account,
        kind=JobKind.TEMPLATE.value,
        source_sha256=job.source_sha256,
        source_seconds=job.source_seconds,
        next_action_at=now + svc.queued_recheck,
        wake=WAKE_TIMER,
    )
    stored, created = svc.store.create(maker)
    if created:
        log.info("job %s: template job %s started for its dance video", job.job_id, maker_id)
        svc.governor.enqueue(stored)
        admit(svc, stored.lane)
    return stored


def _wait_for_maker(svc: Services, job: Job, maker: Job) -> Next | None:
    """Wait for the template job: it wakes its waiters when it ends. The deadline is the safety
    net for a lost wake-up (the watchdog re-checks then)."""
    svc.store.add_waiter(maker.job_id, job.job_id)
    waiting = _note_maker(svc, job, maker.job_id)
    if waiting is None:
        return None
    latest = svc.store.get(maker.job_id)
    if latest is not None and latest.final:
        # It ended between our look and our registration: its wake-up may have missed us.
        return Next.of("prepare", waiting, 0)
    return None


def _note_maker(svc: Services, job: Job, maker_id: str) -> Job | None:
    now = svc.clock()
    return svc.store.transition(
        job,
        JobState.PREPARING,
        template_job_id=maker_id,
        resumes=None,  # waiting is healthy: the watchdog's re-checks are not crashes
        updated_at=now,
        next_action_at=now + svc.prepare.recheck_seconds,
        wake=WAKE_TIMER,  # no message: the recheck is the watchdog's
    )


def _wake_waiters(svc: Services, maker: Job) -> None:
    """A template job ended: the jobs waiting for it go on (or fail with its reason)."""
    for waiter_id in svc.store.waiters(maker.job_id):
        waiter = svc.store.get(waiter_id)
        if waiter is not None and waiter.state == JobState.PREPARING:
            svc.wake(Next.of("prepare", waiter, 0))


def _template_refused(svc: Services, job: Job, exc: DashScopeRejected) -> Next | None:
    """DashScope no longer accepts the job's template. If we know the video it was made from,
    forget it and make it again, once; the job goes on with the new one."""
    bad = job.template
    info = svc.store.template_info(bad)
    sha = job.source_sha256 or (info.source_sha256 if info else None)
    url = job.request.video_url or job.source_url or (info.source_url if info else None)
    if job.template_recreated or sha is None or url is None:
        why = (
            "even after it was made again"
            if job.template_recreated
            else "and the video it was made from is unknown, so it cannot be made again"
        )
        finish(svc, job, Finish(JobState.FAILED, exc.code, f"{exc.message} ({why})"))
        return None
    svc.store.forget_template(job.account, sha, bad)
    moved = _then(
        svc,
        job,
        "prepare",
        0,
        JobState.PREPARING,
        template_recreated=True,
        rejected_template=bad,
        template_id=None,
        template_job_id=None,
        template_reused=False,
        source_sha256=sha,
        source_url=None if job.request.video_url else url,
        submit_ambiguous=False,  # a 400: DashScope created nothing
        admitted_at=None,
        error_code=exc.code,
        error_message=f"template {bad} refused by DashScope; making it again",
    )
    if moved is None:
        return None
    log.warning("job %s: template %s refused (%s); making it again", job.job_id, bad, exc.code)
    _free_slot(svc, job)
    return moved


# ----------------------------------------------------------------------------- submit


def submit(svc: Services, job_id: str, version: int) -> Next | None:
    """Submit the job once. It claims SUBMITTING, then the lane's submit lock (one POST in flight
    or unresolved per account and model, so an uncertain POST's task can be told from another
    job's); an earlier uncertain attempt is reconciled from the task list before anything is
    sent again; the task id that comes back is recorded with its ownership in one step."""
    job = _load(svc, job_id, version)
    if job is None or job.state not in (JobState.QUEUED, JobState.SUBMITTING):
        return None
    if job.state == JobState.QUEUED and job.admitted_at is None:
        return None  # not admitted: it waits in our queue
    waiting = _wait_for_token(svc, job, "template" if job.is_template else "submit", "submit")
    if waiting is not None:
        return waiting
    now = svc.clock()
    if job.state == JobState.QUEUED:
        claimed = svc.store.transition(
            job,
            JobState.SUBMITTING,
            updated_at=now,
            next_action_at=now + svc.submit.attempt_seconds,
        )
        if claimed is None:
            return None
        job = claimed
    if svc.store.lock_submit(job.lane, job.job_id) is not None:
        # Another job's POST in this lane is in flight or unresolved: wait in line (not an
        # attempt, no message: the unlock wakes us; the record's deadline is the fallback).
        return None

    if job.submit_ambiguous:
        try:
            outcome = _reconcile(svc, job)
        except TransientError as exc:
            return _submit_failed(svc, job, exc, count_attempt=True)
        if outcome is not _NOTHING_CREATED:
            return outcome if isinstance(outcome, Next) else None
        # Nothing was created: carry on with the job as loaded. Its version is still our fencing
        # token, so if another worker moved the job meanwhile (claimed the next attempt, or
        # adopted a task), the compare-and-set below fails instead of submitting a second time.

    try:
        inputs = _remote_inputs(svc, job)
    except TransientError as exc:
        return _submit_failed(svc, job, exc, count_attempt=True)
    except PermanentError as exc:
        finish(svc, job, Finish(JobState.FAILED, exc.code, exc.message))
        return None
    started = svc.clock()
    attempting = svc.store.transition(
        job,
        JobState.SUBMITTING,
        submit_attempts=job.submit_attempts + 1,
        submit_started_at=started,
        # Until its answer is recorded the POST may have created a task: a worker that dies in
        # between leaves the job marked, so whoever resumes it reconciles instead of resubmitting.
        submit_ambiguous=True,
        submit_uncertain_since=started,
        submit_ended_at=None,
        updated_at=started,
        next_action_at=started + svc.submit.attempt_seconds,
    )
    if attempting is None:
        return None
    job = attempting
    try:
        if isinstance(inputs, str):
            task_id = svc.api.submit_template(job.account, inputs)
        else:
            task_id = svc.api.submit(job.account, inputs)
    except DashScopeThrottled as exc:
        return _submit_throttled(svc, job, exc)
    except DashScopeRejected as exc:  # a 4xx: DashScope created nothing
        _free_lane(svc, job)
        if exc.code == TEMPLATE_REFUSED and not job.is_template:
            return _template_refused(svc, job, exc)
        finish(svc, job, Finish(JobState.FAILED, exc.code, exc.message))
        return None
    except PermanentError as exc:
        finish(svc, job, Finish(JobState.FAILED, exc.code, exc.message))
        return None
    except TransientError as exc:
        return _submit_failed(svc, job, exc)
    return _submitted(svc, job, task_id)


def _remote_inputs(svc: Services, job: Job) -> JobRequest | str:
    """What DashScope is sent: a template job's video URL, or a video job's request with its
    inputs as URLs DashScope can fetch and its resolved template."""
    if job.is_template:
        return svc.inputs.for_dashscope(_source_ref(job), job.account, "template")
    return dataclasses.replace(
        job.request,
        image_url=svc.inputs.for_dashscope(job.request.image_url, job.account, "video"),
        template_id=job.template,
    )


def _submitted(svc: Services, job: Job, task_id: str) -> Next | None:
    """Record the task as the job's and as owned by it, in one step (and free the lane)."""
    now = svc.clock()
    done = svc.store.record_submission(
        job,
        task_id,
        remote_status="PENDING",
        submitted_at=now,
        submit_ambiguous=None,
        submit_uncertain_since=None,
        submit_ended_at=None,
        **{**_next_fields(svc, job, svc.poll.first_delay), "updated_at": now},
    )
    if done is None:
        log.error("job %s: task %s could not be recorded (the job moved on, or another job owns "
                  "it)", job.job_id, task_id)  # fmt: skip
        return None
    _free_lane(svc, job)
    log.info("job %s submitted as DashScope task %s", job.job_id, task_id)
    return Next.of("poll", done, svc.poll.first_delay)


def _free_lane(svc: Services, job: Job) -> None:
    """Free the lane's submit lock (if the job holds it) and wake the job waiting longest."""
    waiter = svc.store.unlock_submit(job.lane, job.job_id)
    if waiter is not None:
        svc.wake(Next("submit", waiter[0], waiter[1], 0))


def _submit_throttled(svc: Services, job: Job, exc: DashScopeThrottled) -> Next | None:
    """429: DashScope did nothing. Slow the account's bucket; the attempt does not count."""
    _free_lane(svc, job)
    svc.governor.throttled(job.account, "submit")
    if job.throttled + 1 >= svc.max_throttled:
        finish(svc, job, Finish(JobState.FAILED, exc.code, f"{job.throttled + 1} 429s: {exc}"))
        return None
    delay = max(svc.governor.take(job.account, "submit"), 0.5) + svc.rand() * 0.5
    return _then(
        svc,
        job,
        "submit",
        delay,
        submit_attempts=job.submit_attempts - 1,
        submit_ambiguous=None,
        submit_uncertain_since=None,
        throttled=job.throttled + 1,
        error_code=exc.code,
        error_message=exc.message,
    )


def _submit_failed(
    svc: Services, job: Job, exc: TransientError, *, count_attempt: bool = False
) -> Next | None:
    """A submit attempt failed transiently. ``count_attempt``: the failure happened outside a
    POST (reading the task list, preparing the inputs): the job stays as uncertain as it was.
    Otherwise the POST's error says whether a task may exist (a 5xx, a timeout after sending, an
    unreadable 200): then the lane stays locked until reconciliation resolves it."""
    ambiguous = job.submit_ambiguous if count_attempt else svc.api.submit_is_ambiguous(exc)
    attempts = job.submit_attempts + count_attempt
    if attempts >= svc.submit.max_attempts:
        code = "SubmitAmbiguous" if ambiguous else "SubmitRetriesExhausted"
        finish(
            svc,
            job,
            Finish(JobState.FAILED, code, f"{attempts} submit attempts: {exc}"),
        )
        return None
    if not ambiguous:
        _free_lane(svc, job)
    delay = svc.submit.backoff.delay(attempts, svc.rand)
    changes: dict[str, Any] = {
        "submit_attempts": attempts,
        "submit_ambiguous": ambiguous or None,
        "error_code": exc.code,
        "error_message": exc.message,
    }
    if not ambiguous:
        changes["submit_uncertain_since"] = None
    elif not count_attempt:
        changes["submit_ended_at"] = svc.clock()  # the POST's window ends here
    waiting = _then(svc, job, "submit", delay, **changes)
    if waiting is not None:
        log.warning("job %s: submit attempt %d failed (%s%s); again in %.1fs", job.job_id,
                    job.submit_attempts, exc, ", a task may exist" if ambiguous else "",
                    delay)  # fmt: skip
    return waiting


_NOTHING_CREATED = object()


def _reconcile(svc: Services, job: Job) -> Next | object | None:
    """An earlier POST may have created a task. Look before submitting again.

    The lane's submit lock has been held since that POST began, so no other job of ours
    submitted to this account and model in its window: an unowned task created then (every page
    of DashScope's list is read) is this job's. Exactly one is adopted. More than one means
    someone else submitted with the same key meanwhile (by hand, another deployment): none is
    adopted, they are reported, and the job fails rather than pay again or take a stranger's
    video. None listed: the list may lag, so it is read again until ``list_lag`` after the POST
    ended; only then is "nothing was created" concluded (``_NOTHING_CREATED``).
    """
    now = svc.clock()
    started = job.submit_uncertain_since or job.submit_started_at or job.created_at
    ended = job.submit_ended_at or started + svc.submit.attempt_seconds
    skew = svc.submit.clock_skew
    listed = svc.api.recent_tasks(job.account, started - skew, ended + skew, JobKind(job.kind))
    owners = svc.store.remote_owners(listed)
    free = [t for t in dict.fromkeys(listed) if owners.get(t) in (None, job.job_id)]
    if len(free) == 1:
        log.warning("job %s: adopting task %s from an uncertain submit", job.job_id, free[0])
        return _submitted(svc, job, free[0])
    if len(free) > 1:
        svc.metrics.inc("remote_tasks_unclaimed_total", len(free), account=job.account)
        log.error("job %s: %d unclaimed tasks in its submit window, none provably its own: %s",
                  job.job_id, len(free), ", ".join(free))  # fmt: skip
        finish(
            svc,
            job,
            Finish(
                JobState.FAILED,
                "SubmitAmbiguous",
                f"an uncertain submit, and {len(free)} unclaimed tasks of this account and model "
                f"in its window ({', '.join(free)}): none is provably this job's, so none was "
                "adopted and nothing was submitted again (reported for an operator)",
            ),
        )
        return None
    settled = ended + svc.submit.list_lag
    if now < settled:  # the list may not show the task yet: look again (not an attempt)
        return _then(svc, job, "submit", min(10.0, max(1.0, settled - now)))
    return _NOTHING_CREATED


# ----------------------------------------------------------------------------- poll


def poll(svc: Services, job_id: str, version: int) -> Next | None:
    job = _load(svc, job_id, version)
    if job is None or job.state != JobState.SUBMITTED or not job.remote_task_id:
        return None
    waiting = _wait_for_token(svc, job, "query", "poll")
    if waiting is not None:
        return waiting
    if job.cancel_requested and job.remote_status in (None, "PENDING"):
        return _cancel_remote(svc, job)
    now = svc.clock()
    try:
        remote = svc.api.poll(job.account, job.remote_task_id)
    except WorkerError as exc:
        if isinstance(exc, DashScopeThrottled):
            svc.governor.throttled(job.account, "query")
        # Whatever the query's error (network, 5xx, a garbled body, even a 4xx after a key
        # rotation), the task itself may be running and paid for: keep asking, with backoff, until
        # the deadline, and show the error on the job meanwhile.
        retry = decide_poll_error(job, now, svc.poll, svc.rand)
        if isinstance(retry, Finish):
            finish(svc, job, retry)
            return None
        log.warning("job %s: poll failed (%s); again in %.1fs", job_id, exc, retry.seconds)
        return _then(
            svc,
            job,
            "poll",
            retry.seconds,
            poll_errors=job.poll_errors + 1,
            throttled=job.throttled + isinstance(exc, DashScopeThrottled),
            error_code=exc.code,
            error_message=exc.message,
        )

    decision = decide_poll(job, remote, now, svc.poll)
    common: dict[str, Any] = {
        "remote_status": remote.raw_status,
        "polls": job.polls + 1,
        "poll_errors": 0,
        "updated_at": now,
    }
    if job.poll_errors:
        common.update(error_code=None, error_message=None)
    if remote.status.value in ("PRE-PROCESSING", "RUNNING", "POST-PROCESSING"):
        common["remote_started_at"] = job.remote_started_at or now
    if isinstance(decision, Wait):
        return _then(
            svc,
            job,
            "poll",
            decision.seconds,
            pending_polls=job.pending_polls + (decision.reason == "pending"),
            unknown_polls=job.unknown_polls + (decision.reason == "unknown"),
            **common,
        )
    if isinstance(decision, (TemplateReady, StartCopy)) and decision.video_duration:
        # DashScope bills usage.video_duration once the task SUCCEEDED, whatever happens next.
        svc.metrics.inc("video_seconds_total", decision.video_duration, account=job.account,
                        producer=job.request.producer, kind=job.kind)  # fmt: skip
    if isinstance(decision, TemplateReady):
        svc.store.register_template(
            decision.template_id,
            job.account,
            source_sha256=job.source_sha256,
            source_url=_source_ref(job),
            job_id=job.job_id,
            video_seconds=decision.video_duration,
        )
        finish(
            svc,
            job,
            Finish(JobState.READY),
            template_id=decision.template_id,
            video_duration=decision.video_duration,
            remote_ended_at=remote.end_time or now,
            **common,
        )
        return None
    if isinstance(decision, StartCopy) and job.cancel_requested and not svc.copy_after_late_cancel:
        _free_slot(svc, job)
        moved = svc.store.transition(job, job.state, **common)
        finish(
            svc,
            moved or job,
            Finish(
                JobState.CANCELED,
                "CancelTooLate",
                "cancelled after DashScope started it: the video was paid for and not copied "
                "(CANCEL_TOO_LATE_COPY=false)",
            ),
        )
        return None
    if isinstance(decision, StartCopy):
        _free_slot(svc, job)
        return _then(
            svc,
            job,
            "copy",
            0,
            JobState.COPYING,
            video_url=decision.video_url,
            video_expires_at=decision.expires_at,
            video_duration=decision.video_duration,
            remote_ended_at=remote.end_time or now,
            **common,
        )
    if decision.cancel_remote:
        try:
            svc.api.cancel(job.account, job.remote_task_id)
        except WorkerError as exc:
            log.warning("job %s: could not cancel remote task: %s", job_id, exc)
    moved = svc.store.transition(job, job.state, **common)
    finish(svc, moved or job, decision)
    return None


# ----------------------------------------------------------------------------- copy


def copy(svc: Services, job_id: str, version: int) -> Next | None:
    job = _load(svc, job_id, version)
    if job is None or job.state != JobState.COPYING or not job.video_url:
        return None
    now = svc.clock()
    if not host_allowed(job.video_url, svc.video_hosts):
        finish(
            svc,
            job,
            Finish(
                JobState.FAILED,
                "UnexpectedVideoHost",
                "DashScope returned a video_url on a host outside VIDEO_URL_HOSTS; not fetched",
            ),
        )
        return None
    if copy_expired(job, now):
        finish(
            svc,
            job,
            Finish(JobState.EXPIRED, "VideoUrlExpired", "the video URL expired before the copy"),
        )
        return None
    attempt = svc.store.transition(
        job,
        JobState.COPYING,
        copy_attempts=job.copy_attempts + 1,
        copy_started_at=job.copy_started_at or now,
        updated_at=now,
        next_action_at=now + svc.copy.lease_seconds,
    )
    if attempt is None:
        return None
    job = attempt
    key = s3_key(svc.s3_prefix, job.job_id)
    metadata = {"job-id": job.job_id}
    if job.remote_task_id:
        metadata["dashscope-task-id"] = job.remote_task_id
    lease = _Lease(svc, job)
    try:
        # An earlier attempt may have stored and verified the object, then lost its worker
        # before recording it: the verified object (it carries its SHA-256) is taken as is.
        # The first attempt has no earlier one (keys are per job): it skips that HEAD.
        earlier = svc.copier.find(key) if job.copy_attempts > 1 else None
        stored = earlier or svc.copier.copy(
            job.video_url or "",
            key,
            metadata,
            heartbeat=lease.renew,
            resume=job.copy_checkpoint,
            budget=svc.copy.attempt_seconds,
        )
    except StaleStep:
        log.warning("job %s: copy abandoned, another worker took the job over", job_id)
        return None
    except CopyPaused as exc:
        log.info("job %s: %s", job_id, exc.message)
        return _then(svc, lease.job, "copy", 0, copy_checkpoint=exc.checkpoint)
    except (TransientError, CopyMismatch) as exc:
        return _copy_failed(svc, lease.job, exc, transient=True)
    except PermanentError as exc:
        return _copy_failed(svc, lease.job, exc, transient=False)
    job = lease.job
    done = svc.clock()
    final = svc.store.transition(
        job,
        JobState.STORED,
        s3_bucket=stored.bucket,
        s3_key=stored.key,
        bytes=stored.size,
        sha256=stored.sha256,
        finished_at=done,
        updated_at=done,
        error_code=None,
        error_message=None,
        copy_checkpoint=None,
        wake=None,
        **_final_fields(svc, done),
    )
    if final is None:
        log.warning("job %s: copy finished but the job moved on (stale copy)", job_id)
    else:
        log.info("job %s stored at %s (%d bytes)", job_id, final.s3_uri, stored.size)
        _copy_metrics(svc, final, stored, done - now)
        _ended(svc, final)
    return None


def copy_interrupted(svc: Services, job_id: str) -> Next | None:
    """The copy's task hit its soft time limit mid-step (a part upload or read that hung): send
    the copy again at once. It resumes from the job's last checkpoint; the stuck attempt's
    renewals now fail its fence, so it stops writing to the job."""
    job = svc.store.get(job_id)
    if job is None or job.state != JobState.COPYING:
        return None
    log.warning("job %s: copy attempt %d hit its time limit; going on from its checkpoint",
                job_id, job.copy_attempts)  # fmt: skip
    return _then(svc, job, "copy", 0)


def _copy_metrics(svc: Services, job: Job, stored: StoredCopy, seconds: float) -> None:
    svc.metrics.inc("copy_bytes_total", stored.size, account=job.account)
    if seconds > 0:
        svc.metrics.observe("copy_throughput_mb_s", stored.size / 1e6 / seconds)
    if job.remote_ended_at is not None and job.finished_at is not None:
        svc.metrics.observe("copy_delay_seconds", job.finished_at - job.remote_ended_at)
    if job.video_expires_at is not None and job.finished_at is not None:
        # How close we came to losing the video: time left on its 24-hour URL.
        svc.metrics.observe("expiry_margin_seconds", job.video_expires_at - job.finished_at)


class _Lease:
    """A copy's hold on its job: renewed while bytes flow, so the watchdog leaves a live copy
    alone and resumes a dead one within ``lease_seconds``. Each renewal is a compare-and-set;
    once another worker has taken the job over, renewing raises :class:`StaleStep` and the
    stale copy stops (its upload is aborted; it could only have written the same bytes)."""

    def __init__(self, svc: Services, job: Job) -> None:
        self.svc = svc
        self.job = job

    def renew(self, copied: int = 0, checkpoint: str | None = None) -> None:
        now = self.svc.clock()
        renewed = self.svc.store.transition(
            self.job,
            JobState.COPYING,
            copy_bytes=copied,
            updated_at=now,
            next_action_at=now + self.svc.copy.lease_seconds,
            **({"copy_checkpoint": checkpoint} if checkpoint else {}),
        )
        if renewed is None:
            raise StaleStep(f"job {self.job.job_id} was taken over during its copy")
        self.job = renewed


def _copy_failed(svc: Services, job: Job, exc: WorkerError, *, transient: bool) -> Next | None:
    now = svc.clock()
    decision = decide_copy_error(job, exc.code, exc.message, transient, now, svc.copy, svc.rand)
    if isinstance(decision, Finish):
        if job.copy_checkpoint:  # the open multipart upload will not be finished: free it
            svc.copier.abort(s3_key(svc.s3_prefix, job.job_id), job.copy_checkpoint)
        finish(svc, job, decision, copy_checkpoint=None)
        return None
    assert isinstance(decision, RetryCopy)
    log.warning("job %s: copy failed (%s); again in %.1fs", job.job_id, exc, decision.seconds)
    return _then(svc, job, "copy", decision.seconds, error_code=exc.code, error_message=exc.message)


# ----------------------------------------------------------------------------- watchdog


@dataclass(frozen=True)
class WatchdogReport:
    resumed: list[str]  # sent their step again (a lost message, or a worker that died)
    poisoned: list[str]  # failed: their step killed its worker max_resumes times in a row
    admitted_accounts: int
    waiting: list[str] = field(default_factory=list)  # overdue, but their message is in a backlog


RESUMABLE: Mapping[JobState, Step] = {
    JobState.RECEIVED: "validate",  # its intake died while checking the inputs
    JobState.DETECTING: "detect",
    JobState.PREPARING: "prepare",  # fetching its video, or waiting for its template job
    JobState.QUEUED: "submit",  # admitted, but its submit message never ran
    JobState.SUBMITTING: "submit",  # reconciles first: the job is marked ambiguous
    JobState.SUBMITTED: "poll",
    JobState.COPYING: "copy",
}


def watchdog(
    svc: Services, *, grace: float, max_resumes: int, accounts: list[str], limit: int = 500
) -> WatchdogReport:
    """Look at every job whose next wake-up is overdue by more than ``grace``, and tell apart:

    * **a message waiting in a backlog** (``wake`` "sent", and the step's queue has no consumer
      or an oldest message at least as old as this job's wait): left alone. Sending another
      would only lengthen the queue, and nothing has failed.
    * **a lost message** (``wake`` "sent", but the queue flows: a SIGKILLed worker held it, or
      a Redis failover dropped it) and **a deadline that is itself the wake-up** (``wake``
      "timer"): sent again. Not a death.
    * **a step a worker took and never finished** (no ``wake``): the worker died in it. The
      count of such deaths in a row (reset by any step that finishes) decides: a job that has
      taken ``max_resumes`` workers down before anything was paid is failed (``PoisonJob``); a
      job with a paid task (submitted, polling, copying, or a submit that may have created a
      task) never is: it is resumed with a growing delay until its own deadline (the poll
      deadline, the video URL's expiry) ends it.

    Each resend bumps the version, so a late original message is stale and does nothing. Then
    every account gets an admission pass.
    """
    now = svc.clock()
    queues = svc.queues.waiting() if svc.queues is not None else None
    resumed: list[str] = []
    poisoned: list[str] = []
    waiting: list[str] = []
    for job_id in svc.store.due(now - grace, limit):
        job = svc.store.get(job_id)
        if job is None:
            continue
        if job.final:
            if job.delivery != DELIVERY_PENDING:
                continue
            step: Step = "deliver"
        elif job.state not in RESUMABLE:
            continue
        elif job.state == JobState.QUEUED and job.admitted_at is None:
            _recheck_queued(svc, job)
            continue
        else:
            step = RESUMABLE[job.state]
        overdue = now - (job.next_action_at if job.next_action_at is not None else now)
        if job.wake == WAKE_SENT and _in_backlog(queues, step, overdue, grace):
            waiting.append(job_id)
            continue
        if job.wake in (WAKE_SENT, WAKE_TIMER):
            reason, deaths, delay = ("lost" if job.wake == WAKE_SENT else "timer"), job.resumes, 0.0
        else:
            reason, deaths = "died", job.resumes + 1
            if deaths > max_resumes and not _paid(job):
                finish(
                    svc,
                    job,
                    Finish(
                        JobState.FAILED,
                        "PoisonJob",
                        f"its {step} step was taken {deaths} times in a row in {job.state} and "
                        "its worker died each time; stopped before anything was paid, so it "
                        "cannot take more workers down",
                    ),
                )
                poisoned.append(job_id)
                continue
            delay = svc.copy.backoff.delay(deaths, svc.rand) if deaths > 1 else 0.0
        moved = svc.store.transition(
            job,
            job.state,
            resumes=deaths or None,
            updated_at=now,
            next_action_at=now + delay,
            wake=WAKE_SENT,
        )
        if moved is None:
            continue  # it moved on by itself in the meantime
        log.warning("job %s: resumed, overdue %.0f s in %s (%s): %s sent again in %.0f s",
                    job_id, overdue, job.state, reason, step, delay)  # fmt: skip
        svc.metrics.inc("watchdog_resumes_total", reason=reason, step=step)
        svc.wake(Next.of(step, moved, delay))
        resumed.append(job_id)
    for account in accounts:
        admit(svc, account)
        admit(svc, template_lane(account))
    return WatchdogReport(resumed, poisoned, len(accounts), waiting)


def _recheck_queued(svc: Services, job: Job) -> None:
    """A job long in our queue: make sure it is in its lane's queue (it is put back if a crash
    left it out), and look again later."""
    if svc.governor.ensure_queued(job):
        log.warning("job %s: QUEUED but not in its lane's queue; put back", job.job_id)
    now = svc.clock()
    svc.store.transition(job, JobState.QUEUED, updated_at=now, wake=WAKE_TIMER,
                         next_action_at=now + svc.queued_recheck)  # fmt: skip
    admit(svc, job.lane)


def _in_backlog(
    queues: Mapping[str, tuple[int, float]] | None, step: Step, overdue: float, grace: float
) -> bool:
    """Whether the job's message is plausibly still waiting in its queue: nobody consumes the
    queue, or its oldest message has waited about as long as this job (queues are FIFO, so a
    queue whose oldest message is younger no longer holds this job's). Unknown queues: no."""
    if queues is None:
        return False
    consumers, oldest = queues.get(queue_for(f"animate.{step}"), (0, 0.0))
    return consumers == 0 or oldest + grace >= overdue


def _paid(job: Job) -> bool:
    """A remote task exists, or may: its video must not be given up for a crash count."""
    return job.state in (JobState.SUBMITTED, JobState.COPYING) or (
        job.state == JobState.SUBMITTING and job.submit_ambiguous
    )


# ----------------------------------------------------------------------------- cancel


@dataclass(frozen=True)
class CancelResult:
    job_id: str
    state: JobState | None
    outcome: Literal["canceled", "requested", "too_late", "final", "not_found"]
    message: str


def cancel(svc: Services, job_id: str) -> CancelResult:
    """Cancel a job: free while it waits in our queue, DashScope's cancel while remote PENDING.

    A job that DashScope already runs cannot be cancelled there: that is recorded, and the paid
    video is still copied.
    """
    for _ in range(5):  # compare-and-set: retry if the job moved under us
        job = svc.store.get(job_id)
        if job is None:
            return CancelResult(job_id, None, "not_found", "no such job")
        if job.final:
            return CancelResult(job_id, job.state, "final", f"the job already ended {job.state}")
        if job.state in (JobState.RECEIVED, JobState.DETECTING, JobState.PREPARING):
            # Nothing paid for this job's video yet. A template job it waits for goes on: the
            # template is the account's, and other jobs may want it.
            done = finish(
                svc,
                job,
                Finish(JobState.CANCELED, "Canceled", "cancelled before submission; nothing paid"),
            )
            if done is not None:
                return CancelResult(job_id, done.state, "canceled", "nothing was sent")
            continue
        if job.state == JobState.QUEUED:
            svc.governor.dequeue(job)
            done = finish(
                svc,
                job,
                Finish(JobState.CANCELED, "Canceled", "cancelled before submission; nothing paid"),
            )
            if done is not None:
                return CancelResult(job_id, done.state, "canceled", "nothing was sent")
            continue
        if job.state in (JobState.SUBMITTING, JobState.SUBMITTED):
            svc.store.request_cancel(job_id)  # no version bump: the poll chain stays valid
            marked = dataclasses.replace(job, cancel_requested=True)
            if job.state == JobState.SUBMITTED and job.remote_status in (None, "PENDING"):
                step = _cancel_remote(svc, marked)
                if step is not None:
                    svc.wake(step)
                latest = svc.store.get(job_id) or marked
                if latest.state == JobState.CANCELED:
                    return CancelResult(job_id, latest.state, "canceled", "cancelled at DashScope")
                return _too_late(job_id, latest)
            if job.state == JobState.SUBMITTING:
                return CancelResult(
                    job_id, marked.state, "requested", "cancelled at DashScope once submitted"
                )
            return _too_late(job_id, marked)
        svc.store.request_cancel(job_id)  # COPYING: the copy keeps its lease
        return _too_late(job_id, dataclasses.replace(job, cancel_requested=True))
    return CancelResult(job_id, None, "not_found", "the job kept changing; try again")


def _too_late(job_id: str, job: Job) -> CancelResult:
    return CancelResult(
        job_id,
        job.state,
        "too_late",
        "DashScope is already generating the video (it cannot cancel a running task); "
        "it is paid for and will be copied",
    )


def _cancel_remote(svc: Services, job: Job) -> Next | None:
    """DashScope's cancel for a remote-PENDING task; if it has started, carry on polling."""
    assert job.remote_task_id is not None
    try:
        svc.api.cancel(job.account, job.remote_task_id)
    except DashScopeRejected:
        # UnsupportedOperation: it left PENDING in the meantime. Keep it (and poll it).
        return _then(
            svc,
            job,
            "poll",
            svc.poll.running_interval,
            remote_status="RUNNING",
            error_code="CancelTooLate",
            error_message="cancel asked after DashScope started the task; the video is copied",
        )
    except TransientError as exc:
        log.warning("job %s: remote cancel failed (%s); will try again on the next poll",
                    job.job_id, exc)  # fmt: skip
        return _then(svc, job, "poll", 1.0)
    finish(svc, job, Finish(JobState.CANCELED, "Canceled", "cancelled while queued at DashScope"))
    return None


# ----------------------------------------------------------------------------- shared


def finish(svc: Services, job: Job, decision: Finish, **changes: Any) -> Job | None:
    """Move a job to a final state with its reason (compare-and-set like every move)."""
    if not can_move(job.state, decision.state):
        log.error("job %s: refusing %s -> %s", job.job_id, job.state, decision.state)
        return None
    now = svc.clock()
    fields: dict[str, Any] = {
        "error_code": decision.code,
        "error_message": decision.message,
        "finished_at": now,
        "updated_at": now,
        "wake": None,
        **_final_fields(svc, now),
    }
    fields.update(changes)
    done = svc.store.transition(job, decision.state, **fields)
    if done is not None:
        log.info("job %s %s: %s %s", job.job_id, decision.state, decision.code, decision.message)
        if job.state == JobState.SUBMITTING:
            _free_lane(svc, job)
        if job.state in (JobState.QUEUED, JobState.SUBMITTING, JobState.SUBMITTED):
            _free_slot(svc, done)
        _ended(svc, done)
    return done


DELIVERY_PENDING = "pending"


def _final_fields(svc: Services, now: float) -> dict[str, Any]:
    """What every move to a final state also records: its results, callback and webhook are
    still to be delivered, by this deadline (a worker that dies before they are leaves a final
    job the watchdog delivers: at least once, never never)."""
    return {"delivery": DELIVERY_PENDING, "next_action_at": now + svc.delivery_seconds}


def _ended(svc: Services, job: Job) -> None:
    """The job is final: count it, then deliver its outcome (at once; again if need be)."""
    svc.metrics.inc("jobs_finished_total", state=job.state.value, account=job.account,
                    kind=job.kind)  # fmt: skip
    later = _deliver(svc, job)
    if later is not None:
        svc.wake(later)


def deliver(svc: Services, job_id: str, version: int) -> Next | None:
    """The deliveries of a final job not yet made (its worker died, or the webhook is retried)."""
    job = _load(svc, job_id, version)
    return _deliver(svc, job) if job is not None else None


def deliver_webhook(svc: Services, job_id: str, version: int) -> Next | None:
    """``animate.webhook`` messages sent before deliveries were one step."""
    return deliver(svc, job_id, version)


def _deliver(svc: Services, job: Job) -> Next | None:
    """Publish the result object (the result backend, and the producer's callback), wake the
    jobs waiting for a template, POST the webhook: each at least once, keyed by the job id
    (the callback's message id ``<job_id>.callback``, the webhook's ``msg_<job_id>``), then mark
    the job delivered. A webhook that fails transiently is tried again with backoff, for
    ``WEBHOOK_GIVE_UP_SECONDS``; the watchdog stands behind every retry."""
    legacy_webhook = job.delivery is None and job.webhook_state == "pending"
    if not job.final or (job.delivery != DELIVERY_PENDING and not legacy_webhook):
        return None
    changes: dict[str, Any] = {}
    if not job.published and not legacy_webhook:
        try:
            svc.results.publish(job)
        except Exception as exc:  # the broker or result backend: try again shortly
            log.exception("job %s: its final result could not be published", job.job_id)
            delay = svc.webhook.backoff.delay(1, svc.rand)
            return _then(svc, job, "deliver", delay, webhook_error=f"publish: {exc}"[:200])
        changes["published"] = True
        if job.is_template:
            _wake_waiters(svc, job)
    if job.request.webhook_url and job.webhook_state not in ("delivered", "failed"):
        outcome = _post_webhook(svc, job)
        if isinstance(outcome, float):  # again later: the delivery stays pending
            return _then(svc, job, "deliver", outcome, webhook_state="pending",
                         webhook_attempts=job.webhook_attempts + 1, **changes)  # fmt: skip
        changes.update(outcome)
    if changes.keys() - {"published"}:  # the webhook's outcome to record as well
        done = svc.store.transition(job, job.state, delivery=None, next_action_at=None,
                                    wake=None, **changes) is not None  # fmt: skip
    else:
        done = svc.store.delivered(job)
    if not done:
        log.info("job %s: delivered, but the record moved on meanwhile", job.job_id)
    return None


def _post_webhook(svc: Services, job: Job) -> dict[str, Any] | float:
    """POST the signed final result: the fields to record, or the delay before trying again."""
    now = svc.clock()
    payload = {
        "type": "job.finished",
        "timestamp": job.finished_at or now,
        "data": result_object(job),
    }
    attempts = job.webhook_attempts + 1
    try:
        if svc.webhooks is None:
            raise PermanentError("no webhook sender configured", code="WebhookUnavailable")
        assert job.request.webhook_url is not None
        svc.webhooks.send(job.request.webhook_url, f"msg_{job.job_id}", payload)
    except (WorkerError, InvalidJobRequest) as exc:
        ended = job.finished_at or job.updated_at
        error = f"{exc.code}: {exc.message}"
        if isinstance(exc, TransientError) and now - ended < svc.webhook.give_up_after:
            log.info("job %s: webhook attempt %d failed (%s)", job.job_id, attempts, exc)
            return svc.webhook.backoff.delay(attempts, svc.rand)
        log.warning("job %s: webhook given up after %d attempts: %s", job.job_id, attempts, exc)
        return {"webhook_state": "failed", "webhook_attempts": attempts, "webhook_error": error}
    return {
        "webhook_state": "delivered",
        "webhook_attempts": attempts,
        "webhook_delivered_at": svc.clock(),
        "webhook_error": None,
    }


def _load(svc: Services, job_id: str, version: int) -> Job | None:
    """The job for a step sent at ``version``, the step marked taken; None if stale or gone."""
    job = svc.store.take(job_id, version)
    if job is None:
        log.warning("job %s: no record (expired or never created)", job_id)
        return None
    if job.version != version:
        log.info("job %s: stale message (version %d, job at %d); ignored", job_id, version,
                 job.version)  # fmt: skip
        return None
    return job
