"""Cancel: free while the job waits with us, DashScope's cancel while the task is PENDING there."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

from workers.domain.decisions import (
    Finish,
)
from workers.domain.job import Job
from workers.domain.states import JobState
from workers.errors import (
    DashScopeRejected,
    TransientError,
)
from workers.steps.context import Next, Services, then
from workers.steps.finish import finish

log = logging.getLogger(__name__)


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
                step = cancel_remote(svc, marked)
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


def cancel_remote(svc: Services, job: Job) -> Next | None:
    """DashScope's cancel for a remote-PENDING task; if it has started, carry on polling."""
    assert job.remote_task_id is not None
    try:
        svc.api.cancel(job.account, job.remote_task_id)
    except DashScopeRejected:
        # UnsupportedOperation: it left PENDING in the meantime. Keep it (and poll it).
        return then(
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
        return then(svc, job, "poll", 1.0)
    finish(svc, job, Finish(JobState.CANCELED, "Canceled", "cancelled while queued at DashScope"))
    return None
