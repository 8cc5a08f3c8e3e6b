"""Poll: ask DashScope about the job's task, and act on the answer."""

from __future__ import annotations

import logging
from typing import Any

from workers.domain.costs import cost
from workers.domain.decisions import (
    Finish,
    RemoteSnapshot,
    StartCopy,
    TemplateReady,
    Wait,
    decide_poll,
    decide_poll_error,
)
from workers.domain.job import Job
from workers.domain.states import JobState
from workers.errors import (
    DashScopeThrottled,
    WorkerError,
)
from workers.steps.admission import add_spend, free_slot, wait_for_token
from workers.steps.cancel import cancel_remote
from workers.steps.context import Next, Services, load, source_ref, then
from workers.steps.finish import finish

log = logging.getLogger(__name__)


def poll(svc: Services, job_id: str, version: int) -> Next | None:
    """One look at the job's remote task: wait again, or start the copy, or end the job."""
    job = load(svc, job_id, version)
    if job is None or job.state != JobState.SUBMITTED or not job.remote_task_id:
        return None
    waiting = wait_for_token(svc, job, "query", "poll")
    if waiting is not None:
        return waiting
    if job.cancel_requested and job.remote_status in (None, "PENDING"):
        return cancel_remote(svc, job)
    now = svc.clock()
    try:
        remote = svc.api.poll(job.account, job.remote_task_id)
    except WorkerError as exc:
        return _failed(svc, job, exc, now)
    decision = decide_poll(job, remote, now, svc.poll)
    answered = _answered(job, remote, now)
    if isinstance(decision, Wait):
        return then(svc, job, "poll", decision.seconds,
                    pending_polls=job.pending_polls + (decision.reason == "pending"),
                    unknown_polls=job.unknown_polls + (decision.reason == "unknown"),
                    **answered)  # fmt: skip
    if isinstance(decision, (TemplateReady, StartCopy)) and decision.video_duration:
        # DashScope bills usage.video_duration once the task SUCCEEDED, whatever happens next.
        svc.metrics.inc("video_seconds_total", decision.video_duration, account=job.account,
                        producer=job.request.producer, kind=job.kind)  # fmt: skip
        billed = cost(job.price_per_second, decision.video_duration)
        if billed is not None:
            svc.metrics.inc("cost_cny_total", billed, account=job.account,
                            model=job.model)  # fmt: skip
            add_spend(svc, job, billed, now)
    if isinstance(decision, StartCopy):
        return _video_ready(svc, job, decision, remote, answered)
    if isinstance(decision, TemplateReady):
        _template_ready(svc, job, decision, remote, answered)
    else:
        _ended(svc, job, decision, answered)
    return None


def _failed(svc: Services, job: Job, exc: WorkerError, now: float) -> Next | None:
    """The query failed. Whatever its error (network, 5xx, a garbled body, even a 4xx after a key
    rotation), the task itself may be running and paid for: keep asking, with backoff, until the
    deadline, and show the error on the job meanwhile."""
    if isinstance(exc, DashScopeThrottled):
        svc.governor.throttled(job.account, "query")
    retry = decide_poll_error(job, now, svc.poll, svc.rand)
    if isinstance(retry, Finish):
        finish(svc, job, retry)
        return None
    log.warning("job %s: poll failed (%s); again in %.1fs", job.job_id, exc, retry.seconds)
    return then(svc, job, "poll", retry.seconds, poll_errors=job.poll_errors + 1,
                throttled=job.throttled + isinstance(exc, DashScopeThrottled),
                error_code=exc.code, error_message=exc.message)  # fmt: skip


def _answered(job: Job, remote: RemoteSnapshot, now: float) -> dict[str, Any]:
    """The fields every answer updates, whatever is decided on it."""
    fields: dict[str, Any] = {
        "remote_status": remote.raw_status,
        "polls": job.polls + 1,
        "poll_errors": 0,
        "updated_at": now,
    }
    if job.poll_errors:
        fields.update(error_code=None, error_message=None)
    if remote.status.value in ("PRE-PROCESSING", "RUNNING", "POST-PROCESSING"):
        fields["remote_started_at"] = job.remote_started_at or now
    return fields


def _template_ready(svc: Services, job: Job, ready: TemplateReady, remote: RemoteSnapshot,
                    answered: dict[str, Any]) -> None:  # fmt: skip
    svc.store.register_template(ready.template_id, job.account, source_sha256=job.source_sha256,
                                source_url=source_ref(job), job_id=job.job_id,
                                video_seconds=ready.video_duration)  # fmt: skip
    finish(svc, job, Finish(JobState.READY), template_id=ready.template_id,
           video_duration=ready.video_duration,
           remote_ended_at=remote.end_time or answered["updated_at"],
           **answered)  # fmt: skip


def _video_ready(svc: Services, job: Job, ready: StartCopy, remote: RemoteSnapshot,
                 answered: dict[str, Any]) -> Next | None:  # fmt: skip
    """The video exists (and is paid for): free the lane, then copy it, unless a cancel came too
    late and the deployment chose not to store such videos."""
    free_slot(svc, job)
    if job.cancel_requested and not svc.copy_after_late_cancel:
        moved = svc.store.transition(job, job.state, **answered)
        finish(svc, moved or job, Finish(JobState.CANCELED, "CancelTooLate",
               "cancelled after DashScope started it: the video was paid for and not copied "
               "(CANCEL_TOO_LATE_COPY=false)"))  # fmt: skip
        return None
    return then(svc, job, "copy", 0, JobState.COPYING, video_url=ready.video_url,
                video_expires_at=ready.expires_at, video_duration=ready.video_duration,
                remote_ended_at=remote.end_time or answered["updated_at"], **answered)  # fmt: skip


def _ended(svc: Services, job: Job, end: Finish, answered: dict[str, Any]) -> None:
    """The task failed, was canceled, or ran out of time: the job ends (the task is canceled
    at DashScope first when the decision says so)."""
    if end.cancel_remote and job.remote_task_id:
        try:
            svc.api.cancel(job.account, job.remote_task_id)
        except WorkerError as exc:
            log.warning("job %s: could not cancel remote task: %s", job.job_id, exc)
    moved = svc.store.transition(job, job.state, **answered)
    finish(svc, moved or job, end)
