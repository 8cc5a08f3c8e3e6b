"""The functional core: job states and transitions, request validation, poll, copy and deadline decisions.

Nothing here does I/O or imports celery, httpx, boto3 or redis. Tasks load a :class:`Job`, call one
decision function with the remote answer and the time, and apply what it returns.
"""

from __future__ import annotations

import dataclasses
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
from workers.routes import QUEUES

URL_TTL_SECONDS = 24 * 3600  # DashScope keeps video_url valid 24 h after the task ends


class JobState(StrEnum):
    RECEIVED = "RECEIVED"  # recorded; its inputs are being checked (nothing sent; free to cancel)
    DETECTING = "DETECTING"  # the image check (animate-anyone-detect-gen2) is due (free to cancel)
    PREPARING = "PREPARING"  # the template video is checked, or its template is being made
    QUEUED = "QUEUED"  # accepted and validated; nothing sent yet (free to cancel)
    SUBMITTING = "SUBMITTING"  # a worker holds the right to submit; the POST may be in flight
    SUBMITTED = "SUBMITTED"  # DashScope has the task; remote_status says where it is
    COPYING = "COPYING"  # the video is being streamed into S3
    STORED = "STORED"  # final: the video is in S3 and verified
    FAILED = "FAILED"  # final: DashScope failed it, refused it, or we gave up
    REJECTED = "REJECTED"  # final: bad input; no remote call was made
    CANCELED = "CANCELED"  # final
    EXPIRED = "EXPIRED"  # final: the video URL ran out before the copy finished
    READY = "READY"  # final (template jobs): the action template exists; template_id says which


FINAL_STATES = frozenset(
    {
        JobState.STORED,
        JobState.FAILED,
        JobState.REJECTED,
        JobState.CANCELED,
        JobState.EXPIRED,
        JobState.READY,
    }
)
SUCCESS_STATES = frozenset({JobState.STORED, JobState.READY})

# Every allowed move. A self-move records progress (a poll, a retry) and bumps the version, which
# is the fencing token: a message carrying an older version is stale and does nothing.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset(
        {
            JobState.RECEIVED,
            JobState.DETECTING,
            JobState.PREPARING,
            JobState.QUEUED,
            JobState.REJECTED,
            JobState.FAILED,
            JobState.CANCELED,
        }
    ),
    JobState.DETECTING: frozenset(
        {
            JobState.DETECTING,
            JobState.PREPARING,
            JobState.QUEUED,
            JobState.REJECTED,
            JobState.FAILED,
            JobState.CANCELED,
        }
    ),
    JobState.PREPARING: frozenset(
        {
            JobState.PREPARING,
            JobState.QUEUED,
            JobState.READY,  # a template job whose template already existed
            JobState.REJECTED,
            JobState.FAILED,
            JobState.CANCELED,
        }
    ),
    JobState.QUEUED: frozenset(
        {JobState.QUEUED, JobState.SUBMITTING, JobState.REJECTED, JobState.CANCELED}
    ),
    JobState.SUBMITTING: frozenset(
        {
            JobState.SUBMITTING,
            JobState.SUBMITTED,
            JobState.FAILED,
            JobState.CANCELED,
            JobState.PREPARING,  # DashScope no longer accepts the template: make it again
        }
    ),
    JobState.SUBMITTED: frozenset(
        {
            JobState.SUBMITTED,
            JobState.COPYING,
            JobState.FAILED,
            JobState.CANCELED,
            JobState.EXPIRED,
            JobState.READY,
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
# Fields every kind of job takes.
COMMON_FIELDS = frozenset(
    {
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
REQUEST_FIELDS = COMMON_FIELDS | {
    "image_url",
    "template_id",
    "video_url",
    "detect",
    "use_ref_img_bg",
    "video_ratio",
}
TEMPLATE_FIELDS = COMMON_FIELDS | {"video_url"}
CALLBACK_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}\Z")


class JobKind(StrEnum):
    VIDEO = "video"  # animate.generate: ends STORED with a video in S3
    TEMPLATE = "template"  # animate.template: ends READY with an action template id


def callback_task_ok(value: Any) -> bool:
    """A Celery task name of the producer's own (never one of ours)."""
    return (
        isinstance(value, str)
        and bool(CALLBACK_RE.match(value))
        and not value.startswith("animate.")
    )


def callback_queue_ok(value: Any) -> bool:
    """A queue of the producer's own (never one our workers consume)."""
    return name_ok(value) and value not in QUEUES


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
MAX_ECHOED_NAMES = 5  # unknown field names quoted back in an error, at most...
MAX_ECHOED_NAME = 40  # ...and this many characters of each
MAX_METADATA_BYTES = 4096


@dataclass(frozen=True)
class JobRequest:
    """A producer's request after validation.

    Inputs are URLs: ``http(s)://...``, or ``s3://<our bucket>/<key>`` for files a producer put
    in our bucket (the CLI and the Python API upload local files there). A video job names its
    motion either as ``template_id`` or as ``video_url`` (the dance video: its account's template
    for that video is reused, or made first). A template job has only ``video_url``.
    """

    image_url: str = ""
    template_id: str = ""
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
    video_url: str | None = None  # the dance video to make (or reuse) a template from
    detect: bool = True  # check the image with DashScope's detector first (video jobs)


def reject(code: str, message: str) -> InvalidJobRequest:
    return InvalidJobRequest(message, code=code)


def check_url(value: Any, name: str, *, allow_s3: bool = False) -> str:
    if not isinstance(value, str) or not value:
        raise reject("InvalidRequest.MissingField", f"{name} is required (a string URL)")
    if len(value) > MAX_URL_LENGTH:
        raise reject("InvalidRequest.BadUrl", f"{name} is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise reject("InvalidRequest.BadUrl", f"{name} is not a URL") from None
    schemes = ("http", "https", "s3") if allow_s3 else ("http", "https")
    if parts.scheme not in schemes:
        allowed = "an http, https or s3 URL" if allow_s3 else "an http or https URL"
        raise reject(
            "InvalidRequest.BadUrl",
            f"{name} must be {allowed}, not {parts.scheme or 'a bare path'!r}",
        )
    if not parts.hostname:
        raise reject("InvalidRequest.BadUrl", f"{name} has no host")
    if parts.scheme == "s3" and (
        len(parts.path) < 2 or parts.query or parts.fragment or "\\" in value
    ):
        raise reject("InvalidRequest.BadUrl", f"{name} must look like s3://bucket/key")
    return value


def s3_ref(value: str) -> tuple[str, str] | None:
    """(bucket, key) of an ``s3://bucket/key`` input, else None."""
    parts = urlsplit(value)
    if parts.scheme != "s3" or not parts.hostname:
        return None
    return parts.netloc, parts.path.lstrip("/")


def _check_args(
    kind: str, kwargs: Mapping[str, Any], args: tuple[Any, ...], allowed: frozenset[str]
) -> None:
    if args:
        raise reject(
            "InvalidRequest.PositionalArgs",
            f"{kind} takes keyword arguments only (kwargs=...), got positional ones",
        )
    unknown = sorted(str(k) for k in set(kwargs) - allowed)
    if unknown:
        # Names chosen by a producer go into the job's error and the logs: bounded, and shown
        # as text (repr) whatever they hold.
        shown = [repr(name[:MAX_ECHOED_NAME]) + ("..." if len(name) > MAX_ECHOED_NAME else "")
                 for name in unknown[:MAX_ECHOED_NAMES]]  # fmt: skip
        more = (
            f" and {len(unknown) - MAX_ECHOED_NAMES} more"
            if len(unknown) > MAX_ECHOED_NAMES
            else ""
        )
        raise reject(
            "InvalidRequest.UnknownField",
            f"unknown field(s) {', '.join(shown)}{more}; allowed: {', '.join(sorted(allowed))}",
        )


def parse_request(kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> JobRequest:
    """Validate the ``animate.generate`` kwargs; raise :class:`InvalidJobRequest` with the reason."""
    _check_args("animate.generate", kwargs, args, REQUEST_FIELDS)
    common = _common(kwargs)
    image_url = check_url(kwargs.get("image_url"), "image_url", allow_s3=True)
    template_id = kwargs.get("template_id")
    video_url = kwargs.get("video_url")
    if template_id is not None and video_url is not None:
        raise reject(
            "InvalidRequest.TemplateOrVideo",
            "give template_id or video_url, not both (video_url makes or reuses a template)",
        )
    if video_url is not None:
        check_url(video_url, "video_url", allow_s3=True)
        template_id = ""
    elif not isinstance(template_id, str) or not template_id:
        raise reject(
            "InvalidRequest.MissingField",
            "template_id (an action template id) or video_url (a dance video) is required",
        )
    elif not TEMPLATE_ID_RE.match(template_id):
        raise reject(
            "InvalidRequest.TemplateId",
            "template_id must look like 'AACT.<...>' (an id from action-template generation)",
        )
    detect = kwargs.get("detect", True)
    if not isinstance(detect, bool):
        raise reject("InvalidRequest.BadType", "detect must be true or false")
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
    return dataclasses.replace(
        common,
        image_url=image_url,
        template_id=template_id,
        use_ref_img_bg=use_bg,
        video_ratio=ratio,
        video_url=video_url,
        detect=detect,
    )


def parse_template_request(kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> JobRequest:
    """Validate the ``animate.template`` kwargs (a template job: a dance video in, a template out)."""
    _check_args("animate.template", kwargs, args, TEMPLATE_FIELDS)
    common = _common(kwargs)
    video_url = check_url(kwargs.get("video_url"), "video_url", allow_s3=True)
    return dataclasses.replace(common, video_url=video_url, detect=False)


def _common(kwargs: Mapping[str, Any]) -> JobRequest:
    """The fields every job takes."""
    job_id = kwargs.get("job_id")
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID_RE.match(job_id)):
        raise reject(
            "InvalidRequest.JobId",
            "job_id must be 1-128 characters of letters, digits and . _ : - "
            "(starting with a letter or digit)",
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
    if callback_task is not None and callback_queue is None:
        raise reject(
            "InvalidRequest.Callback",
            "callback_task needs a callback_queue that your own workers consume (our workers "
            "consume the default queue and would discard your task as unregistered)",
        )
    if callback_queue in QUEUES:
        raise reject(
            "InvalidRequest.Callback",
            f"callback_queue {callback_queue!r} is one of this service's queues; our workers "
            "would discard your task there: use a queue of your own",
        )
    webhook_url = kwargs.get("webhook_url")
    if webhook_url is not None:
        check_url(webhook_url, "webhook_url")
    return JobRequest(
        job_id=job_id,
        metadata=metadata,
        account=account,
        priority=priority,
        producer=producer,
        callback_task=callback_task,
        callback_queue=callback_queue,
        webhook_url=webhook_url,
    )


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
    sha256: str | None = None  # of the whole file, when it was read whole


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
    state_since: float | None = None  # entered its current state (None: at creation)
    kind: str = JobKind.VIDEO.value
    image_sha256: str | None = None  # the image's content hash (the detection cache's key)
    bodystyle: str | None = None  # the detector's answer: full | half
    detect_cached: bool = False  # the answer came from the cache (nothing billed)
    detect_attempts: int = 0
    warning: str | None = None  # went on despite something a person should know
    source_sha256: str | None = None  # the dance video's content hash (template reuse key)
    source_seconds: float | None = None
    source_url: str | None = None  # where to fetch the dance video when it is not in the request
    prepare_attempts: int = 0
    template_id: str | None = None  # the template used (video jobs) or made (template jobs)
    template_job_id: str | None = None  # the template job this job waits for
    template_reused: bool = False  # an existing template of the account's was used
    template_recreated: bool = False  # DashScope refused the template once; it was made again
    rejected_template: str | None = None  # the template DashScope refused
    intake_message_id: str | None = None
    requested_id: str | None = None  # a job_id that could not be used (REJECTED under msg id)
    admitted_at: float | None = None  # left our queue for the remote one
    token_waits: int = 0  # times a step waited for the account's quota
    throttled: int = 0  # 429s DashScope answered this job with
    cancel_requested: bool = False
    # The watchdog's view of the next wake-up (next_action_at): "sent", a message for this
    # version is queued, parked or held and no worker has taken it yet; "timer", no message:
    # the deadline itself is the wake-up; absent, a worker took the step (or nothing is due).
    wake: str | None = None
    resumes: int = 0  # steps taken in a row that never finished (worker deaths); 0 on progress
    resume_state: str | None = None  # (older records)
    delivery: str | None = None  # "pending": a final job's results, callback, webhook not all out
    published: bool = False  # its result and callback went out (at least once)
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
    submit_uncertain_since: float | None = None  # that POST began (its reconcile window)
    submit_ended_at: float | None = None  # ...and ended without an answer we could read
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
    copy_checkpoint: str | None = None  # an unfinished multipart copy's resume point (JSON)
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
    def is_template(self) -> bool:
        return self.kind == JobKind.TEMPLATE

    @property
    def template(self) -> str:
        """The template a video job generates with: the one resolved, else the one requested."""
        return self.template_id or self.request.template_id

    @property
    def lane(self) -> str:
        """Where the job waits for DashScope's slot: each model has its own per account."""
        return template_lane(self.account) if self.is_template else self.account

    @property
    def s3_uri(self) -> str | None:
        return f"s3://{self.s3_bucket}/{self.s3_key}" if self.s3_bucket and self.s3_key else None


def job_view(job: Job) -> dict[str, Any]:
    """A job as producers see it: JSON-safe, no signed URL, with the time each step took."""

    def span(start: float | None, end: float | None) -> float | None:
        return round(end - start, 3) if start is not None and end is not None else None

    return {
        "job_id": job.job_id,
        "kind": job.kind,
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
            "image_url": job.request.image_url or None,
            "template_id": job.request.template_id or None,
            "video_url": job.request.video_url,
            "detect": job.request.detect,
            "use_ref_img_bg": job.request.use_ref_img_bg,
            "video_ratio": job.request.video_ratio,
        },
        "template_id": job.template_id or job.request.template_id or None,
        "template_job_id": job.template_job_id,
        "template_reused": job.template_reused,
        "template_recreated": job.template_recreated,
        "detection": {
            "bodystyle": job.bodystyle,
            "cached": job.detect_cached,
            "attempts": job.detect_attempts,
            "image_sha256": job.image_sha256,
        },
        "source_video": {"sha256": job.source_sha256, "seconds": job.source_seconds},
        "warning": job.warning,
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
        "kind": job.kind,
        "state": job.state.value,
        "template_id": job.template_id or job.request.template_id or None,
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
class TemplateReady:
    template_id: str
    video_duration: float | None  # the billed seconds of template generation


@dataclass(frozen=True)
class Finish:
    state: JobState
    code: str | None = None
    message: str | None = None
    cancel_remote: bool = False  # still PENDING remotely: cancel it (free) on the way out


PollDecision = Wait | StartCopy | TemplateReady | Finish


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
    template_id: str | None = None  # template tasks


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
    if status == RemoteStatus.SUCCEEDED and job.is_template:
        if not remote.template_id:
            return Finish(
                JobState.FAILED,
                "DashScopeBadResponse",
                "the template task SUCCEEDED without a template_id",
            )
        return TemplateReady(remote.template_id, remote.video_duration)
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
    """A copy is retried while its video URL lives, not a fixed number of times: S3 outages
    can outlast any count of backoffs, and a paid video is lost only when its URL dies."""

    lease_seconds: float = 60.0  # a copy that stops renewing this long is resumed elsewhere
    backoff: Backoff = Backoff(base=5.0, cap=180.0)
    expiry_margin: float = 300.0  # the last retry starts this long before the URL's expiry
    attempt_seconds: float | None = None  # one attempt's budget; then it pauses and goes on


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
    """After a failed copy attempt: retry until the URL is about to die, or end the job saying
    why. The last retry is scheduled at the margin before the URL's expiry; a failure after that
    ends the job EXPIRED with the last error."""
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
    last_try = expires - policy.expiry_margin
    if now >= last_try:
        return Finish(
            JobState.EXPIRED,
            "VideoUrlExpired",
            f"{attempts} copy attempts failed until {expires - now:.0f} s before the video "
            f"URL's expiry; last: {code}: {message}",
        )
    delay = policy.backoff.delay(attempts, rand)
    return RetryCopy(min(delay, last_try - now))


def copy_expired(job: Job, now: float) -> bool:
    return job.video_expires_at is not None and now >= job.video_expires_at


@dataclass(frozen=True)
class DetectPolicy:
    max_attempts: int = 6
    attempt_seconds: float = 45.0  # a detect call's timeouts plus a margin
    cache_seconds: int = 30 * 24 * 3600
    half_body: str = "reject"  # HALF_BODY_WITHOUT_REF_BG: reject | warn
    backoff: Backoff = Backoff(base=2.0, cap=60.0)


@dataclass(frozen=True)
class PreparePolicy:
    max_attempts: int = 6
    attempt_seconds: float = 180.0  # one download and probe of a dance video, at most
    recheck_seconds: float = 600.0  # the watchdog looks at a job waiting for its template
    backoff: Backoff = Backoff(base=2.0, cap=60.0)


@dataclass(frozen=True)
class WebhookPolicy:
    give_up_after: float = 3600.0  # seconds after the job ended
    backoff: Backoff = Backoff(base=2.0, cap=60.0)


@dataclass(frozen=True)
class SubmitPolicy:
    max_attempts: int = 8
    attempt_seconds: float = 45.0  # the longest a POST may take (its timeouts) plus a margin
    backoff: Backoff = Backoff(base=2.0, cap=120.0)
    list_lag: float = 30.0  # an uncertain POST's task may take this long to show in the list
    clock_skew: float = 10.0  # ours against DashScope's, around a POST's window


def s3_key(prefix: str, job_id: str) -> str:
    """Deterministic, so a repeated copy overwrites the same object."""
    prefix = prefix.strip("/")
    return f"{prefix}/{job_id}.mp4" if prefix else f"{job_id}.mp4"


# ----------------------------------------------------------------------------- the workflow

TEMPLATE_LANE_SUFFIX = ":template"  # ":" never appears in an account name


def template_lane(account: str) -> str:
    return account + TEMPLATE_LANE_SUFFIX


def template_job_id(account: str, source_sha256: str, generation: int) -> str:
    """The id of the template job the workers start for a dance video: one per account, video
    and generation, so two jobs asking at once share one paid template."""
    return f"tpl.{source_sha256[:40]}.{account}.{generation}"


@dataclass(frozen=True)
class Detection:
    """The detector's answer (animate-anyone-detect-gen2)."""

    check_pass: bool
    bodystyle: str | None = None  # full | half ("" when the check fails)
    reason: str | None = None


HalfBodyPolicy = str  # "reject" | "warn"
HALF_BODY_WARNING = (
    "the image shows half a body and use_ref_img_bg is false: DashScope invents the legs "
    "(its docs advise against it)"
)


def judge_detection(
    request: JobRequest, found: Detection, half_body: HalfBodyPolicy
) -> Finish | str | None:
    """After the image check: a Finish (REJECTED) to stop, a warning to go on with, or None."""
    if not found.check_pass:
        return Finish(
            JobState.REJECTED,
            "InvalidImage.DetectFailed",
            found.reason or "DashScope's image check did not pass the image (no reason given)",
        )
    if found.bodystyle == "half" and request.use_ref_img_bg is not True:
        if half_body == "reject":
            return Finish(
                JobState.REJECTED,
                "InvalidImage.HalfBody",
                HALF_BODY_WARNING + "; set use_ref_img_bg=true, use a full-body image, or "
                "run with HALF_BODY_WITHOUT_REF_BG=warn",
            )
        return HALF_BODY_WARNING
    return None


def template_failed_for_good(job: Job) -> bool:
    """A failed template job whose video would fail again: DashScope refused its content."""
    code = job.error_code or ""
    return job.state == JobState.REJECTED or (
        job.state == JobState.FAILED and code.startswith(("InvalidFile", "InvalidVideo"))
    )


@dataclass(frozen=True)
class TemplateInfo:
    """A known action template: its owner, and the dance video it was made from (if ours)."""

    template_id: str
    account: str
    source_sha256: str | None = None
    source_url: str | None = None
    job_id: str | None = None
    created_at: float | None = None
    video_seconds: float | None = None
    revoked: bool = False  # DashScope stopped accepting it

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields.pop("template_id")
        return json.dumps(fields, separators=(",", ":"))


@dataclass(frozen=True)
class TemplateSource:
    """One account's template for one dance video, and the job making (or that made) it."""

    template_id: str | None = None
    job_id: str | None = None
    generation: int = 0
