"""Submit: the paid call, once per job, and the reconcile of an uncertain one."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from workers.domain.decisions import (
    Finish,
)
from workers.domain.job import Job
from workers.domain.request import (
    JobKind,
    JobRequest,
)
from workers.domain.states import JobState
from workers.errors import (
    DashScopeRejected,
    DashScopeThrottled,
    PermanentError,
    TransientError,
)
from workers.steps.admission import (
    BUDGET_REACHED,
    free_lane,
    hold_for_budget,
    over_budget,
    wait_for_token,
)
from workers.steps.context import Next, Services, load, next_fields, profile_of, source_ref, then
from workers.steps.finish import finish
from workers.steps.prepare import TEMPLATE_REFUSED, template_refused

log = logging.getLogger(__name__)


def submit(svc: Services, job_id: str, version: int) -> Next | None:
    """Submit the job once. It claims SUBMITTING, then the lane's submit lock (one POST in flight
    or unresolved per account and model, so an uncertain POST's task can be told from another
    job's); an earlier uncertain attempt is reconciled from the task list before anything is
    sent again; the task id that comes back is recorded with its ownership in one step."""
    job = load(svc, job_id, version)
    if job is None or job.state not in (JobState.QUEUED, JobState.SUBMITTING):
        return None
    if job.state == JobState.QUEUED and job.admitted_at is None:
        return None  # not admitted: it waits in our queue
    if job.state == JobState.QUEUED:
        held = over_budget(svc, job.account)
        if held is not None:  # (a SUBMITTING job may have paid already: it is never held)
            hold_for_budget(svc, job, held)
            return None
    waiting = wait_for_token(svc, job, job.submit_kind, "submit")
    if waiting is not None:
        return waiting
    claimed = _claim(svc, job)
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
    return _post(svc, job, inputs)


def _claim(svc: Services, job: Job) -> Job | None:
    """An admitted QUEUED job becomes SUBMITTING (None: another worker moved it first)."""
    if job.state != JobState.QUEUED:
        return job
    now = svc.clock()
    cleared = (
        {"error_code": None, "error_message": None} if job.error_code == BUDGET_REACHED else {}
    )
    return svc.store.transition(job, JobState.SUBMITTING, updated_at=now,
                                next_action_at=now + svc.submit.attempt_seconds,
                                **cleared)  # fmt: skip


def _post(svc: Services, job: Job, inputs: JobRequest | str) -> Next | None:
    """The paid POST, recorded as uncertain until its answer is: a worker that dies in between
    leaves the job marked, so whoever resumes it reconciles instead of resubmitting."""
    started = svc.clock()
    attempting = svc.store.transition(
        job,
        JobState.SUBMITTING,
        submit_attempts=job.submit_attempts + 1,
        submit_started_at=started,
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
        free_lane(svc, job)
        if exc.code == TEMPLATE_REFUSED and not job.is_template:
            return template_refused(svc, job, exc)
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
        return svc.inputs.for_dashscope(source_ref(job), job.account, "template")
    kind = f"video:{job.model}"  # the job's own model (records that name none: AnimateAnyone)
    image_url = svc.inputs.for_dashscope(job.request.image_url, job.account, kind)
    if not profile_of(svc, job).takes_templates:  # the dance video goes with the call
        video_url = svc.inputs.for_dashscope(source_ref(job), job.account, kind)
        return dataclasses.replace(job.request, image_url=image_url, video_url=video_url,
                                   model=job.model)  # fmt: skip
    return dataclasses.replace(job.request, image_url=image_url, template_id=job.template,
                               model=job.model)  # fmt: skip


def _submitted(svc: Services, job: Job, task_id: str) -> Next | None:
    """Record the task as the job's and as owned by it, in one step (and free the lane)."""
    now = svc.clock()
    done = svc.store.record_submission(
        job,
        task_id,
        **submit_costs(svc, job),
        remote_status="PENDING",
        submitted_at=now,
        submit_ambiguous=None,
        submit_uncertain_since=None,
        submit_ended_at=None,
        # (only reconciliation reads it, and there is nothing left to reconcile: a job in
        # flight keeps a smaller record)
        submit_started_at=None,
        **{**next_fields(svc, job, svc.poll.first_delay), "updated_at": now},
    )
    if done is None:
        log.error("job %s: task %s could not be recorded (the job moved on, or another job owns "
                  "it)", job.job_id, task_id)  # fmt: skip
        return None
    free_lane(svc, job)
    log.info("job %s submitted as DashScope task %s", job.job_id, task_id)
    return Next.of("poll", done, svc.poll.first_delay)


def submit_costs(svc: Services, job: Job) -> dict[str, Any]:
    """The price of a second of the job's output (its model, its mode), recorded with the task
    id: the estimate and the bill follow from it."""
    profile = profile_of(svc, job)
    remote = profile.remote("template" if job.is_template else "video")
    price = remote.price_cny_per_second if job.is_template else (
        profile.price_per_second(job.request.mode))  # fmt: skip
    return {"price_per_second": price}


def _submit_throttled(svc: Services, job: Job, exc: DashScopeThrottled) -> Next | None:
    """429: DashScope did nothing. Slow the account's bucket; the attempt does not count."""
    free_lane(svc, job)
    svc.governor.throttled(job.account, job.submit_kind)
    if job.throttled + 1 >= svc.max_throttled:
        finish(svc, job, Finish(JobState.FAILED, exc.code, f"{job.throttled + 1} 429s: {exc}"))
        return None
    delay = max(svc.governor.take(job.account, job.submit_kind), 0.5) + svc.rand() * 0.5
    return then(
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
        free_lane(svc, job)
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
    waiting = then(svc, job, "submit", delay, **changes)
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
    listed = svc.api.recent_tasks(job.account, started - skew, ended + skew, JobKind(job.kind),
                                  None if job.is_template else job.model)  # fmt: skip
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
        return then(svc, job, "submit", min(10.0, max(1.0, settled - now)))
    return _NOTHING_CREATED
