"""Poll: ask DashScope about the job's task, and act on the answer."""

from __future__ import annotations

import logging
from typing import Any

from workers.domain.decisions import (
    Finish,
    StartCopy,
    TemplateReady,
    Wait,
    decide_poll,
    decide_poll_error,
)
from workers.domain.states import JobState
from workers.errors import (
    DashScopeThrottled,
    WorkerError,
)
from workers.steps.admission import free_slot, wait_for_token
from workers.steps.cancel import cancel_remote
from workers.steps.context import Next, Services, load, source_ref, then
from workers.steps.finish import finish

log = logging.getLogger(__name__)


def poll(svc: Services, job_id: str, version: int) -> Next | None:
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
        return then(
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
        return then(
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
            source_url=source_ref(job),
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
        free_slot(svc, job)
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
        free_slot(svc, job)
        return then(
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
