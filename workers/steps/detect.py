"""Detect: DashScope's check of the person image, cached per image and account."""

from __future__ import annotations

import logging

from workers.domain.decisions import (
    Finish,
    judge_detection,
)
from workers.domain.job import Job
from workers.domain.states import JobState
from workers.errors import (
    DashScopeRejected,
    DashScopeThrottled,
    PermanentError,
    TransientError,
)
from workers.steps.admission import enqueue, wait_for_token
from workers.steps.context import Next, Services, begin_attempt, load, retry_later, then
from workers.steps.finish import finish

# DashScope's 4xx codes on detect that mean the image (not our request or key) is at fault.
log = logging.getLogger(__name__)


_IMAGE_FAULTS = ("InvalidFile", "InvalidURL", "InvalidParameter")


def detect(svc: Services, job_id: str, version: int) -> Next | None:
    """The image check (animate-anyone-detect-gen2), once per image and account: the answer is
    cached by the image's content hash, and only one job checks a given image at a time."""
    job = load(svc, job_id, version)
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
            return retry_later(svc, job, "detect", 1.0 + svc.rand(), token_wait=True)
        waiting = wait_for_token(svc, job, "detect", "detect")
        if waiting is not None:
            return waiting
        attempt = begin_attempt(svc, job, JobState.DETECTING, "detect_attempts",
                                svc.detect.attempt_seconds)  # fmt: skip
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
        return then(svc, job, "prepare", 0, JobState.PREPARING, warning=verdict, **seen)
    enqueue(svc, job, warning=verdict, **seen)
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
    return retry_later(svc, job, "detect", delay, error=exc, throttled=not count)
