"""The decisions: what to do after a poll, a failed poll, a failed copy, a detection."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from workers.domain.job import Job
from workers.domain.policies import CopyPolicy, PollPolicy
from workers.domain.request import JobRequest
from workers.domain.states import ACTIVE_REMOTE, URL_TTL_SECONDS, JobState, RemoteStatus
from workers.domain.templates import HALF_BODY_WARNING, Detection, HalfBodyPolicy


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
