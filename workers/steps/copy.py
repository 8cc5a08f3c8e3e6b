"""Copy: the finished video into S3 while its URL lives, resumable across attempts."""

from __future__ import annotations

import logging

from workers.domain.decisions import (
    Finish,
    RetryCopy,
    copy_expired,
    decide_copy_error,
)
from workers.domain.job import Job, s3_key
from workers.domain.request import host_allowed
from workers.domain.states import JobState
from workers.errors import (
    CopyMismatch,
    CopyPaused,
    PermanentError,
    StaleStep,
    TransientError,
    WorkerError,
)
from workers.ports import StoredCopy
from workers.steps.context import Next, Services, load, then
from workers.steps.finish import ended, final_fields, finish

log = logging.getLogger(__name__)


def copy(svc: Services, job_id: str, version: int) -> Next | None:
    """One copy attempt: from the video URL (or the attempt's checkpoint) into S3, under a lease
    it renews; it pauses before its budget ends and the next attempt goes on."""
    job = load(svc, job_id, version)
    if job is None or job.state != JobState.COPYING or not job.video_url:
        return None
    now = svc.clock()
    refused = _refused(svc, job, now)
    if refused is not None:
        finish(svc, job, refused)
        return None
    attempt = svc.store.transition(job, JobState.COPYING, copy_attempts=job.copy_attempts + 1,
                                   copy_started_at=job.copy_started_at or now, updated_at=now,
                                   next_action_at=now + svc.copy.lease_seconds)  # fmt: skip
    if attempt is None:
        return None
    lease = _Lease(svc, attempt)
    try:
        stored = _store(svc, attempt, lease)
    except StaleStep:
        log.warning("job %s: copy abandoned, another worker took the job over", job_id)
        return None
    except CopyPaused as exc:
        log.info("job %s: %s", job_id, exc.message)
        return then(svc, lease.job, "copy", 0, copy_checkpoint=exc.checkpoint)
    except (TransientError, CopyMismatch) as exc:
        return _copy_failed(svc, lease.job, exc, transient=True)
    except PermanentError as exc:
        return _copy_failed(svc, lease.job, exc, transient=False)
    _stored(svc, lease.job, stored, now)
    return None


def _refused(svc: Services, job: Job, now: float) -> Finish | None:
    """Why this video must not be fetched at all, if it must not."""
    if not host_allowed(job.video_url or "", svc.video_hosts):
        return Finish(JobState.FAILED, "UnexpectedVideoHost",
                      "DashScope returned a video_url on a host outside VIDEO_URL_HOSTS; "
                      "not fetched")  # fmt: skip
    if copy_expired(job, now):
        return Finish(JobState.EXPIRED, "VideoUrlExpired", "the video URL expired before the copy")
    return None


def _store(svc: Services, job: Job, lease: _Lease) -> StoredCopy:
    """The object in S3: an earlier attempt's verified one, or this attempt's copy."""
    key = s3_key(svc.s3_prefix, job.job_id)
    metadata = {"job-id": job.job_id}
    if job.remote_task_id:
        metadata["dashscope-task-id"] = job.remote_task_id
    # An earlier attempt may have stored and verified the object, then lost its worker before
    # recording it: the verified object (it carries its SHA-256) is taken as is. The first
    # attempt has no earlier one (keys are per job): it skips that HEAD.
    earlier = svc.copier.find(key) if job.copy_attempts > 1 else None
    return earlier or svc.copier.copy(job.video_url or "", key, metadata, heartbeat=lease.renew,
                                      resume=job.copy_checkpoint,
                                      budget=svc.copy.attempt_seconds)  # fmt: skip


def _stored(svc: Services, job: Job, stored: StoredCopy, started: float) -> None:
    """Record the stored copy: the job ends STORED and its deliveries go out."""
    done = svc.clock()
    final = svc.store.transition(job, JobState.STORED, s3_bucket=stored.bucket,
                                 s3_key=stored.key, bytes=stored.size, sha256=stored.sha256,
                                 finished_at=done, updated_at=done, error_code=None,
                                 error_message=None, copy_checkpoint=None, wake=None,
                                 **final_fields(svc, done))  # fmt: skip
    if final is None:
        log.warning("job %s: copy finished but the job moved on (stale copy)", job.job_id)
        return
    log.info("job %s stored at %s (%d bytes)", job.job_id, final.s3_uri, stored.size)
    _copy_metrics(svc, final, stored, done - started)
    ended(svc, final)


def copy_interrupted(svc: Services, job_id: str) -> Next | None:
    """The copy's task hit its soft time limit mid-step (a part upload or read that hung): send
    the copy again at once. It resumes from the job's last checkpoint; the stuck attempt's
    renewals now fail its fence, so it stops writing to the job."""
    job = svc.store.get(job_id)
    if job is None or job.state != JobState.COPYING:
        return None
    log.warning("job %s: copy attempt %d hit its time limit; going on from its checkpoint",
                job_id, job.copy_attempts)  # fmt: skip
    return then(svc, job, "copy", 0)


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
    return then(svc, job, "copy", decision.seconds, error_code=exc.code, error_message=exc.message)
