"""The functional core: job states and transitions, request validation, poll, copy and deadline decisions.

Nothing here does I/O or imports celery, httpx, boto3 or redis. Tasks load a :class:`Job`, call one
decision function with the remote answer and the time, and apply what it returns.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qs, urlsplit

from workers.errors import InvalidJobRequest

URL_TTL_SECONDS = 24 * 3600  # DashScope keeps video_url valid 24 h after the task ends


class JobState(StrEnum):
    QUEUED = "QUEUED"  # accepted and validated; nothing sent yet (free to cancel)
    SUBMITTING = "SUBMITTING"  # a worker holds the right to submit; the POST may be in flight
    SUBMITTED = "SUBMITTED"  # DashScope has the task; remote_status says where it is
    COPYING = "COPYING"  # the video is being streamed into S3
    STORED = "STORED"  # final: the video is in S3 and verified
    FAILED = "FAILED"  # final: DashScope failed it, refused it, or we gave up
    REJECTED = "REJECTED"  # final: bad input; no remote call was made
    CANCELED = "CANCELED"  # final
    EXPIRED = "EXPIRED"  # final: the video URL ran out before the copy finished


FINAL_STATES = frozenset(
    {JobState.STORED, JobState.FAILED, JobState.REJECTED, JobState.CANCELED, JobState.EXPIRED}
)

# Every allowed move. A self-move records progress (a poll, a retry) and bumps the version, which
# is the fencing token: a message carrying an older version is stale and does nothing.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.SUBMITTING, JobState.REJECTED, JobState.CANCELED}),
    JobState.SUBMITTING: frozenset(
        {JobState.SUBMITTING, JobState.SUBMITTED, JobState.FAILED, JobState.CANCELED}
    ),
    JobState.SUBMITTED: frozenset(
        {
            JobState.SUBMITTED,
            JobState.COPYING,
            JobState.FAILED,
            JobState.CANCELED,
            JobState.EXPIRED,
        }
    ),
    JobState.COPYING: frozenset(
        {JobState.COPYING, JobState.STORED, JobState.FAILED, JobState.EXPIRED}
    ),
}


def can_move(source: JobState, target: JobState) -> bool:
    return target in TRANSITIONS.get(source, frozenset())


class RemoteStatus(StrEnum):
    """DashScope's ``output.task_status`` values.

    A string DashScope sends that is not listed here (the SDK knows ``SUSPENDED``) parses as
    ``UNKNOWN``; the string itself is kept alongside as the raw status.
    """

    PENDING = "PENDING"
    PRE_PROCESSING = "PRE-PROCESSING"
    RUNNING = "RUNNING"
    POST_PROCESSING = "POST-PROCESSING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, raw: str) -> RemoteStatus:
        """The member for ``raw``, or ``UNKNOWN`` for a string this module does not know."""
        try:
            return cls(raw)
        except ValueError:
            return cls.UNKNOWN


ACTIVE_REMOTE = frozenset(
    {RemoteStatus.PRE_PROCESSING, RemoteStatus.RUNNING, RemoteStatus.POST_PROCESSING}
)


# ----------------------------------------------------------------------------- requests

VIDEO_RATIOS = ("9:16", "3:4")
REQUEST_FIELDS = frozenset(
    {
        "image_url",
        "template_id",
        "use_ref_img_bg",
        "video_ratio",
        "job_id",
        "metadata",
        "account",
        "priority",
        "producer",
        "callback_task",
        "callback_queue",
        "webhook_url",
    }
)
CALLBACK_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}\Z")


def callback_task_ok(value: Any) -> bool:
    """A Celery task name of the producer's own (never one of ours)."""
    return (
        isinstance(value, str)
        and bool(CALLBACK_RE.match(value))
        and not value.startswith("animate.")
    )


def name_ok(value: Any) -> bool:
    """An account, producer or queue name."""
    return isinstance(value, str) and bool(NAME_RE.match(value))


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # accounts and producers
PRIORITY_RANGE = (-100, 100)
DEFAULT_PRODUCER = "default"
# \Z, not $: "$" also matches before a trailing newline, which would let "id\n" through.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
TEMPLATE_ID_RE = re.compile(r"^AACT\.[A-Za-z0-9][A-Za-z0-9._-]{1,254}\Z")
MAX_URL_LENGTH = 2048
MAX_METADATA_BYTES = 4096


@dataclass(frozen=True)
class JobRequest:
    """A producer's request after validation."""

    image_url: str
    template_id: str
    use_ref_img_bg: bool | None = None
    video_ratio: str | None = None
    job_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    account: str | None = None  # None: the template's owner, else the default account
    priority: int = 0  # higher first, among this account's queued jobs
    producer: str = DEFAULT_PRODUCER  # fair round-robin between producers of one priority
    callback_task: str | None = None  # sent the result object when the job ends
    callback_queue: str | None = None
    webhook_url: str | None = None  # POSTed the signed result object when the job ends

    def remote_fields(self) -> dict[str, Any]:
        return {
            "image_url": self.image_url,
            "template_id": self.template_id,
            "use_ref_img_bg": self.use_ref_img_bg,
            "video_ratio": self.video_ratio,
        }


def reject(code: str, message: str) -> InvalidJobRequest:
    return InvalidJobRequest(message, code=code)


def check_url(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise reject("InvalidRequest.MissingField", f"{name} is required (a string URL)")
    if len(value) > MAX_URL_LENGTH:
        raise reject("InvalidRequest.BadUrl", f"{name} is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise reject("InvalidRequest.BadUrl", f"{name} is not a URL") from None
    if parts.scheme not in ("http", "https"):
        raise reject(
            "InvalidRequest.BadUrl",
            f"{name} must be an http or https URL, not {parts.scheme or 'a bare path'!r}",
        )
    if not parts.hostname:
        raise reject("InvalidRequest.BadUrl", f"{name} has no host")
    return value


def parse_request(kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> JobRequest:
    """Validate the ``animate.generate`` kwargs; raise :class:`InvalidJobRequest` with the reason."""
    if args:
        raise reject(
            "InvalidRequest.PositionalArgs",
            "animate.generate takes keyword arguments only (kwargs=...), got positional ones",
        )
    unknown = sorted(set(kwargs) - REQUEST_FIELDS)
    if unknown:
        raise reject(
            "InvalidRequest.UnknownField",
            f"unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(REQUEST_FIELDS))}",
        )
    job_id = kwargs.get("job_id")
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID_RE.match(job_id)):
        raise reject(
            "InvalidRequest.JobId",
            "job_id must be 1-128 characters of letters, digits and . _ : - "
            "(starting with a letter or digit)",
        )
    image_url = check_url(kwargs.get("image_url"), "image_url")
    template_id = kwargs.get("template_id")
    if not isinstance(template_id, str) or not template_id:
        raise reject("InvalidRequest.MissingField", "template_id is required (a string)")
    if not TEMPLATE_ID_RE.match(template_id):
        raise reject(
            "InvalidRequest.TemplateId",
            "template_id must look like 'AACT.<...>' (an id from action-template generation)",
        )
    use_bg = kwargs.get("use_ref_img_bg")
    if use_bg is not None and not isinstance(use_bg, bool):
        raise reject("InvalidRequest.BadType", "use_ref_img_bg must be true or false")
    ratio = kwargs.get("video_ratio")
    if ratio is not None:
        if ratio not in VIDEO_RATIOS:
            raise reject("InvalidRequest.VideoRatio", "video_ratio must be '9:16' or '3:4'")
        if use_bg is not True:
            raise reject(
                "InvalidRequest.VideoRatioWithoutRefBg",
                "video_ratio only applies with use_ref_img_bg=true (otherwise the template's "
                "ratio is used); drop it or set use_ref_img_bg",
            )
    metadata = kwargs.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise reject("InvalidRequest.Metadata", "metadata must be a JSON object")
    try:
        size = len(json.dumps(metadata, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError):
        raise reject("InvalidRequest.Metadata", "metadata must be plain JSON") from None
    if size > MAX_METADATA_BYTES:
        raise reject(
            "InvalidRequest.Metadata", f"metadata is {size} bytes; at most {MAX_METADATA_BYTES}"
        )
    account = kwargs.get("account")
    if account is not None and not (isinstance(account, str) and NAME_RE.match(account)):
        raise reject("InvalidRequest.Account", "account must be a configured account's name")
    priority = kwargs.get("priority", 0)
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]
    ):
        raise reject(
            "InvalidRequest.Priority",
            f"priority must be an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}",
        )
    producer = kwargs.get("producer", DEFAULT_PRODUCER)
    if not isinstance(producer, str) or not NAME_RE.match(producer):
        raise reject(
            "InvalidRequest.Producer",
            "producer must be 1-64 characters of letters, digits and . _ -",
        )
    callback_task = kwargs.get("callback_task")
    if callback_task is not None and not callback_task_ok(callback_task):
        raise reject(
            "InvalidRequest.Callback",
            "callback_task must be a Celery task name of yours (not animate.*)",
        )
    callback_queue = kwargs.get("callback_queue")
    if callback_queue is not None and not name_ok(callback_queue):
        raise reject("InvalidRequest.Callback", "callback_queue must be a queue name")
    if callback_queue is not None and callback_task is None:
        raise reject("InvalidRequest.Callback", "callback_queue needs a callback_task")
    webhook_url = kwargs.get("webhook_url")
    if webhook_url is not None:
        check_url(webhook_url, "webhook_url")
    return JobRequest(
        image_url, template_id, use_bg, ratio, job_id, metadata, account, priority, producer,
        callback_task, callback_queue, webhook_url,
    )  # fmt: skip


# DashScope's documented image limits for animate-anyone-gen2.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP")
IMAGE_MAX_BYTES = 5 * 1024 * 1024  # "smaller than 5 MB"
IMAGE_MAX_ASPECT = 2.0
IMAGE_MAX_SIDE = 4096


@dataclass(frozen=True)
class ImageFacts:
    format: str | None
    byte_size: int | None  # None when the server did not say
    width: int
    height: int


def check_image(facts: ImageFacts) -> None:
    """Refuse an image DashScope would refuse, before any paid call."""
    if facts.format not in IMAGE_FORMATS:
        raise reject(
            "InvalidImage.Format",
            f"image format {facts.format or 'unknown'} is not one of JPEG, PNG, BMP",
        )
    if facts.byte_size is not None and facts.byte_size >= IMAGE_MAX_BYTES:
        raise reject(
            "InvalidImage.Size", f"image is {facts.byte_size} bytes; it must be under 5 MB"
        )
    if min(facts.width, facts.height) <= 0:
        raise reject("InvalidImage.Dimensions", "image has no pixels")
    if max(facts.width, facts.height) > IMAGE_MAX_SIDE:
        raise reject(
            "InvalidImage.LongestSide",
            f"image is {facts.width}x{facts.height}; the longest side must be at most 4096",
        )
    aspect = max(facts.width, facts.height) / min(facts.width, facts.height)
    if aspect > IMAGE_MAX_ASPECT:
        raise reject(
            "InvalidImage.AspectRatio",
            f"image is {facts.width}x{facts.height} (aspect {aspect:.2f}); at most 2",
        )


# DashScope's documented limits for template (dance) videos (animate-anyone-template-gen2, §3).
VIDEO_FORMATS = ("mp4", "mov", "avi")  # containers
VIDEO_CODECS = ("h264", "hevc")  # H.264 / H.265
VIDEO_MAX_BYTES = 200 * 1024 * 1024
VIDEO_SIDES = (200, 2048)
VIDEO_MIN_FPS = 23.9  # documented as >= 24; slack for 23.976 (NTSC film) clips
VIDEO_SECONDS = (2.0, 60.0)
VIDEO_MAX_ASPECT = 3.0  # between 1:3 and 3:1


@dataclass(frozen=True)
class VideoFacts:
    """What a probe (PyAV) learned about a template video, and its content hash."""

    format: str | None  # "mp4" | "mov" | "avi" | another container name | None (unreadable)
    codec: str | None  # "h264" | "hevc" | ...
    byte_size: int
    width: int
    height: int
    fps: float
    seconds: float
    sha256: str


def check_template_video(facts: VideoFacts) -> None:
    """Refuse a template video DashScope would refuse (its documented limits), before paying."""
    if facts.format not in VIDEO_FORMATS:
        raise reject(
            "InvalidVideo.Format",
            f"video container is {facts.format or 'unreadable'}; it must be MP4, MOV or AVI",
        )
    if facts.codec not in VIDEO_CODECS:
        raise reject(
            "InvalidVideo.Codec",
            f"video codec is {facts.codec or 'unknown'}; it must be H.264 or H.265",
        )
    if facts.byte_size > VIDEO_MAX_BYTES:
        raise reject(
            "InvalidVideo.Size",
            f"video is {facts.byte_size} bytes; at most 200 MB ({VIDEO_MAX_BYTES} bytes)",
        )
    low, high = VIDEO_SIDES
    if not (low <= facts.width <= high and low <= facts.height <= high):
        raise reject(
            "InvalidVideo.Resolution",
            f"video is {facts.width}x{facts.height}; each side must be {low}-{high} px",
        )
    if facts.fps < VIDEO_MIN_FPS:
        raise reject("InvalidVideo.FPS", f"video is {facts.fps:.2f} fps; at least 24 fps")
    shortest, longest = VIDEO_SECONDS
    if not shortest <= facts.seconds <= longest:
        raise reject(
            "InvalidVideo.Duration",
            f"video lasts {facts.seconds:.2f} s; it must last {shortest:.0f}-{longest:.0f} s",
        )
    aspect = max(facts.width, facts.height) / min(facts.width, facts.height)
    if aspect > VIDEO_MAX_ASPECT:
        raise reject(
            "InvalidVideo.AspectRatio",
            f"video is {facts.width}x{facts.height} (aspect {aspect:.2f}); "
            "it must be between 1:3 and 3:1",
        )


# ----------------------------------------------------------------------------- the job record


@dataclass(frozen=True)
class Job:
    """A job as the store holds it. Times are epoch seconds."""

    job_id: str
    state: JobState
    version: int
    request: JobRequest
    created_at: float
    updated_at: float
    account: str = "default"  # the DashScope account (API key) the job runs under
    intake_message_id: str | None = None
    admitted_at: float | None = None  # left our queue for the remote one
    token_waits: int = 0  # times a step waited for the account's quota
    throttled: int = 0  # 429s DashScope answered this job with
    cancel_requested: bool = False
    resumes: int = 0  # times the watchdog woke the job in resume_state
    resume_state: str | None = None
    webhook_state: str | None = None  # pending | delivered | failed
    webhook_attempts: int = 0
    webhook_delivered_at: float | None = None
    webhook_error: str | None = None
    remote_task_id: str | None = None
    remote_status: str | None = None
    remote_request_id: str | None = None
    submit_attempts: int = 0
    submit_started_at: float | None = None  # the last POST attempt began (for reconciliation)
    submit_ambiguous: bool = False  # a POST may have created a task we never heard about
    submitted_at: float | None = None
    remote_started_at: float | None = None
    remote_ended_at: float | None = None
    polls: int = 0
    poll_errors: int = 0  # consecutive
    unknown_polls: int = 0
    pending_polls: int = 0
    next_action_at: float | None = None  # when the next message should wake the job
    video_url: str | None = None
    video_expires_at: float | None = None
    video_duration: float | None = None
    copy_attempts: int = 0
    copy_started_at: float | None = None
    copy_bytes: int | None = None  # progress of the copy under way (lease renewals report it)
    s3_bucket: str | None = None
    s3_key: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    finished_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    duplicates: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def s3_uri(self) -> str | None:
        return f"s3://{self.s3_bucket}/{self.s3_key}" if self.s3_bucket and self.s3_key else None


def job_view(job: Job) -> dict[str, Any]:
    """A job as producers see it: JSON-safe, no signed URL, with the time each step took."""

    def span(start: float | None, end: float | None) -> float | None:
        return round(end - start, 3) if start is not None and end is not None else None

    return {
        "job_id": job.job_id,
        "state": job.state.value,
        "final": job.final,
        "account": job.account,
        "priority": job.request.priority,
        "producer": job.request.producer,
        "token_waits": job.token_waits,
        "throttled_429": job.throttled,
        "cancel_requested": job.cancel_requested,
        "remote_task_id": job.remote_task_id,
        "remote_status": job.remote_status,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "s3_bucket": job.s3_bucket,
        "s3_key": job.s3_key,
        "s3_uri": job.s3_uri,
        "bytes": job.bytes,
        "sha256": job.sha256,
        "video_duration": job.video_duration,
        "video_url_expires_at": job.video_expires_at,
        "request": {
            "image_url": job.request.image_url,
            "template_id": job.request.template_id,
            "use_ref_img_bg": job.request.use_ref_img_bg,
            "video_ratio": job.request.video_ratio,
        },
        "metadata": job.request.metadata,
        "attempts": {
            "submit": job.submit_attempts,
            "polls": job.polls,
            "copy": job.copy_attempts,
        },
        "copy_bytes": job.copy_bytes,
        "webhook": {
            "state": job.webhook_state,
            "attempts": job.webhook_attempts,
            "delivered_at": job.webhook_delivered_at,
            "error": job.webhook_error,
        },
        "duplicates": job.duplicates,
        "created_at": job.created_at,
        "admitted_at": job.admitted_at,
        "submitted_at": job.submitted_at,
        "remote_started_at": job.remote_started_at,
        "remote_ended_at": job.remote_ended_at,
        "copy_started_at": job.copy_started_at,
        "finished_at": job.finished_at,
        "updated_at": job.updated_at,
        "seconds": {
            "queued": span(job.created_at, job.submitted_at),
            "remote": span(job.submitted_at, job.remote_ended_at),
            "copy": span(job.remote_ended_at, job.finished_at if job.s3_key else None),
            "total": span(job.created_at, job.finished_at),
        },
    }


RESULT_CONTRACT_VERSION = "1"


def result_object(job: Job) -> dict[str, Any]:
    """The final result object of the public contract (docs/contract.md, version 1)."""
    return {
        "contract_version": RESULT_CONTRACT_VERSION,
        "job_id": job.job_id,
        "state": job.state.value,
        "s3_bucket": job.s3_bucket,
        "s3_key": job.s3_key,
        "s3_uri": job.s3_uri,
        "bytes": job.bytes,
        "sha256": job.sha256,
        "video_seconds": job.video_duration,
        "remote_task_id": job.remote_task_id,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "cancel_requested": job.cancel_requested,
        "account": job.account,
        "metadata": job.request.metadata,
        "created_at": job.created_at,
        "submitted_at": job.submitted_at,
        "finished_at": job.finished_at,
    }


# ----------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: a delay drawn from [base*2^n / 2, base*2^n], capped."""

    base: float = 2.0
    cap: float = 300.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        try:
            grown = self.base * 2.0 ** max(0, attempt - 1)
        except OverflowError:  # a long run of attempts (poll errors under a long deadline)
            grown = math.inf
        ceiling = min(self.cap, grown)
        return ceiling / 2 + rand() * ceiling / 2


@dataclass(frozen=True)
class PollPolicy:
    """How often to ask about a remote task, and for how long."""

    first_delay: float = 2.0  # after the submit
    running_interval: float = 3.0  # PRE-PROCESSING, RUNNING, POST-PROCESSING
    pending_interval: float = 5.0  # first interval while queued remotely...
    pending_max: float = 30.0  # ...growing by half each time up to this
    deadline: float = 6 * 3600.0  # from submission; DashScope itself gives up after 3 h
    unknown_grace: int = 3  # UNKNOWN answers in a row that end the job
    error_backoff: Backoff = Backoff(base=2.0, cap=60.0)


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str


@dataclass(frozen=True)
class StartCopy:
    video_url: str
    expires_at: float
    video_duration: float | None


@dataclass(frozen=True)
class Finish:
    state: JobState
    code: str | None = None
    message: str | None = None
    cancel_remote: bool = False  # still PENDING remotely: cancel it (free) on the way out


PollDecision = Wait | StartCopy | Finish


@dataclass(frozen=True)
class RemoteSnapshot:
    """What one poll learned, in the core's terms."""

    status: RemoteStatus
    raw_status: str
    video_url: str | None = None
    video_duration: float | None = None
    end_time: float | None = None
    code: str | None = None
    message: str | None = None


def url_expiry(video_url: str, end_time: float | None, now: float) -> float:
    """When a signed video URL dies: its ``Expires`` epoch, else end time + 24 h, else now + 24 h."""
    try:
        values = parse_qs(urlsplit(video_url).query).get("Expires")
        if values:
            return float(int(values[0]))
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        pass
    return (end_time if end_time is not None else now) + URL_TTL_SECONDS


def decide_poll(job: Job, remote: RemoteSnapshot, now: float, policy: PollPolicy) -> PollDecision:
    """What to do after a successful poll."""
    status = remote.status
    if status == RemoteStatus.SUCCEEDED:
        if not remote.video_url:
            return Finish(
                JobState.FAILED,
                "DashScopeBadResponse",
                "the task SUCCEEDED without a video_url",
            )
        return StartCopy(
            remote.video_url,
            url_expiry(remote.video_url, remote.end_time, now),
            remote.video_duration,
        )
    if status == RemoteStatus.FAILED:
        return Finish(
            JobState.FAILED,
            remote.code or "RemoteFailed",
            remote.message or "DashScope reported the task FAILED without a message",
        )
    if status == RemoteStatus.CANCELED:
        return Finish(JobState.CANCELED, "RemoteCanceled", "the task was cancelled at DashScope")
    if status == RemoteStatus.UNKNOWN and remote.raw_status == RemoteStatus.UNKNOWN:
        if job.unknown_polls + 1 >= policy.unknown_grace:
            return Finish(
                JobState.FAILED,
                "RemoteTaskUnknown",
                "DashScope no longer knows the task (expired after 24 h, or never existed)",
            )
        return Wait(policy.running_interval, "unknown")
    submitted = job.submitted_at if job.submitted_at is not None else job.created_at
    if now - submitted >= policy.deadline:
        return Finish(
            JobState.FAILED,
            "PollDeadlineExceeded",
            f"no result {policy.deadline:.0f} s after submission (last status {remote.raw_status})",
            cancel_remote=status == RemoteStatus.PENDING,
        )
    if status == RemoteStatus.PENDING:
        interval = policy.pending_interval * 1.5 ** min(job.pending_polls, 20)
        return Wait(min(policy.pending_max, interval), "pending")
    if status in ACTIVE_REMOTE:
        return Wait(policy.running_interval, "running")
    # A status this code does not know yet (DashScope documents SUSPENDED nowhere): keep asking.
    return Wait(policy.pending_max, f"unrecognised status {remote.raw_status}")


def decide_poll_error(
    job: Job, now: float, policy: PollPolicy, rand: Callable[[], float]
) -> Wait | Finish:
    """A poll failed transiently: ask again later, unless the deadline has passed."""
    submitted = job.submitted_at if job.submitted_at is not None else job.created_at
    if now - submitted >= policy.deadline:
        return Finish(
            JobState.FAILED,
            "PollDeadlineExceeded",
            f"no answer {policy.deadline:.0f} s after submission (polls kept failing)",
        )
    return Wait(policy.error_backoff.delay(job.poll_errors + 1, rand), "poll error")


@dataclass(frozen=True)
class CopyPolicy:
    max_attempts: int = 20
    lease_seconds: float = 60.0  # a copy that stops renewing this long is resumed elsewhere
    backoff: Backoff = Backoff(base=5.0, cap=300.0)


@dataclass(frozen=True)
class RetryCopy:
    seconds: float


CopyDecision = RetryCopy | Finish


def decide_copy_error(
    job: Job,
    code: str,
    message: str,
    transient: bool,
    now: float,
    policy: CopyPolicy,
    rand: Callable[[], float] = random.random,
) -> CopyDecision:
    """After a failed copy attempt: retry before the URL dies, or end the job saying why."""
    expires = job.video_expires_at if job.video_expires_at is not None else math.inf
    if code == "VideoUrlExpired" or now >= expires:
        return Finish(
            JobState.EXPIRED,
            "VideoUrlExpired",
            f"the video URL expired before the copy finished ({message})",
        )
    if not transient:
        return Finish(JobState.FAILED, code, message)
    attempts = job.copy_attempts  # attempts made so far, this one included
    if attempts >= policy.max_attempts:
        return Finish(
            JobState.FAILED,
            "CopyRetriesExhausted",
            f"{attempts} copy attempts failed; last: {code}: {message}",
        )
    delay = policy.backoff.delay(attempts, rand)
    if now + delay >= expires:
        delay = max(0.0, (expires - now) / 2)
    return RetryCopy(delay)


def copy_expired(job: Job, now: float) -> bool:
    return job.video_expires_at is not None and now >= job.video_expires_at


@dataclass(frozen=True)
class WebhookPolicy:
    give_up_after: float = 3600.0  # seconds after the job ended
    backoff: Backoff = Backoff(base=2.0, cap=60.0)


@dataclass(frozen=True)
class SubmitPolicy:
    max_attempts: int = 8
    attempt_seconds: float = 45.0  # the longest a POST may take (its timeouts) plus a margin
    backoff: Backoff = Backoff(base=2.0, cap=120.0)


def s3_key(prefix: str, job_id: str) -> str:
    """Deterministic, so a repeated copy overwrites the same object."""
    prefix = prefix.strip("/")
    return f"{prefix}/{job_id}.mp4" if prefix else f"{job_id}.mp4"
