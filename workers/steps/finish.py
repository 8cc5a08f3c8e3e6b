"""Ending a job and delivering its outcome (result, callback, webhook) at least once."""

from __future__ import annotations

import logging
from typing import Any

from workers.domain.decisions import (
    Finish,
)
from workers.domain.job import Job
from workers.domain.states import JobState, can_move
from workers.domain.views import result_object
from workers.errors import (
    InvalidJobRequest,
    PermanentError,
    TransientError,
    WorkerError,
)
from workers.steps.admission import free_lane, free_slot
from workers.steps.context import DELIVERY_PENDING, Next, Services, load, then

log = logging.getLogger(__name__)


def wake_waiters(svc: Services, maker: Job) -> None:
    """A template job ended: the jobs waiting for it go on (or fail with its reason)."""
    for waiter_id in svc.store.waiters(maker.job_id):
        waiter = svc.store.get(waiter_id)
        if waiter is not None and waiter.state == JobState.PREPARING:
            svc.wake(Next.of("prepare", waiter, 0))


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
        **final_fields(svc, now),
    }
    fields.update(changes)
    done = svc.store.transition(job, decision.state, **fields)
    if done is not None:
        log.info("job %s %s: %s %s", job.job_id, decision.state, decision.code, decision.message)
        if job.state == JobState.SUBMITTING:
            free_lane(svc, job)
        if job.state in (JobState.QUEUED, JobState.SUBMITTING, JobState.SUBMITTED):
            free_slot(svc, done)
        ended(svc, done)
    return done


def final_fields(svc: Services, now: float) -> dict[str, Any]:
    """What every move to a final state also records: its results, callback and webhook are
    still to be delivered, by this deadline (a worker that dies before they are leaves a final
    job the watchdog delivers: at least once, never never)."""
    return {"delivery": DELIVERY_PENDING, "next_action_at": now + svc.delivery_seconds}


def ended(svc: Services, job: Job) -> None:
    """The job is final: count it, then deliver its outcome (at once; again if need be)."""
    svc.metrics.inc("jobs_finished_total", state=job.state.value, account=job.account,
                    kind=job.kind)  # fmt: skip
    later = _deliver(svc, job)
    if later is not None:
        svc.wake(later)


def deliver(svc: Services, job_id: str, version: int) -> Next | None:
    """The deliveries of a final job not yet made (its worker died, or the webhook is retried)."""
    job = load(svc, job_id, version)
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
            return then(svc, job, "deliver", delay, webhook_error=f"publish: {exc}"[:200])
        changes["published"] = True
        if job.is_template:
            wake_waiters(svc, job)
    if job.request.webhook_url and job.webhook_state not in ("delivered", "failed"):
        outcome = _post_webhook(svc, job)
        if isinstance(outcome, float):  # again later: the delivery stays pending
            return then(svc, job, "deliver", outcome, webhook_state="pending",
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
