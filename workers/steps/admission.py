"""Admission: a lane's queue of jobs, its slots at DashScope, and the quota tokens a call waits for."""

from __future__ import annotations

import logging
from typing import Any

from workers.domain.costs import budget_for, budget_reached, utc_day
from workers.domain.job import Job
from workers.domain.states import JobState
from workers.errors import StoreUnavailable
from workers.steps.context import WAKE_TIMER, Next, Services, Step, then

log = logging.getLogger(__name__)
BUDGET_REACHED = "BudgetReached"


def enqueue(svc: Services, job: Job, **changes: Any) -> Job | None:
    """Into our own queue: nothing is sent until the lane has room (admission control). A
    queued job is looked at again after ``queued_recheck`` (the watchdog makes sure it is in
    its lane's queue), so even a queued job always has a deadline."""
    now = svc.clock()
    moved = svc.store.transition(job, JobState.QUEUED, updated_at=now, wake=WAKE_TIMER,
                                 next_action_at=now + svc.queued_recheck,
                                 **changes)  # fmt: skip
    if moved is not None:
        svc.governor.enqueue(moved)
        admit(svc, moved.lane)
    return moved


def admit(svc: Services, lane: str) -> None:
    """Let queued jobs go to DashScope while the lane (an account and model) has room and the
    account is under its daily budget; wake their submit steps. The governor takes the slot and
    marks the job admitted in one step, so a crash here only loses the message, which the
    watchdog sends again."""
    if over_budget(svc, lane.split(":", 1)[0]) is not None:
        return  # the watchdog's admission pass lets them in on the next UTC day
    for job_id in svc.governor.admit(lane):
        job = svc.store.get(job_id)
        if job is not None and job.state == JobState.QUEUED and job.admitted_at is not None:
            svc.wake(Next.of("submit", job, 0))


# Beyond this many jobs holding or awaiting an account's slots (a dedicated deployment with many
# concurrent tasks), looking for the task that just started costs more than its next poll saves.
FREE_SLOT_SCAN_LIMIT = 8


def free_slot(svc: Services, job: Job) -> None:
    """The job has left DashScope's slot (or never reached it): let the next one in.

    The task queued longest behind it at DashScope has most likely just started, and its poll
    chain is on the slow remote-PENDING schedule: ask about it now, so its end is noticed
    promptly. (The slow message it already has becomes stale and does nothing.) One slot freed
    starts one task: only that one is woken.
    """
    svc.governor.release(job.lane, job.job_id)
    others = svc.governor.inflight(job.lane)
    if len(others) <= FREE_SLOT_SCAN_LIMIT:
        waiting = [
            other
            for other in (svc.store.get(other_id) for other_id in others)
            if other is not None
            and other.state == JobState.SUBMITTED
            and other.remote_status in (None, "PENDING")
        ]
        if waiting:
            first = min(waiting, key=lambda o: (o.submitted_at or o.created_at, o.job_id))
            svc.wake(Next.of("poll", first, 0))
    admit(svc, job.lane)


def wait_for_token(svc: Services, job: Job, kind: str, step: Step) -> Next | None:
    """None when a ``kind`` token was granted; else the same step later, at the same state.

    Waiting for the quota is not a failure: it uses no attempt and no Celery retry.
    """
    wait = svc.governor.take(job.account, kind)
    if wait <= 0:
        return None
    delay = wait + svc.rand() * 0.05  # spread the waiters a little
    return then(svc, job, step, delay, token_waits=job.token_waits + 1)


def free_lane(svc: Services, job: Job) -> None:
    """Free the lane's submit lock (if the job holds it) and wake the job waiting longest."""
    waiter = svc.store.unlock_submit(job.lane, job.job_id)
    if waiter is not None:
        svc.wake(Next("submit", waiter[0], waiter[1], 0))


def over_budget(svc: Services, account: str) -> str | None:
    """Why the account may not start a paid job now (its daily budget is spent), or None."""
    budget = budget_for(svc.daily_budget, account)
    if budget is None:
        return None
    now = svc.clock()
    spent = svc.governor.spent(account, utc_day(now))
    if not budget_reached(budget, spent):
        return None
    return (f"account {account!r} reached its daily budget of {budget:g} CNY ({spent:g} billed "
            f"on {utc_day(now)}, UTC); new jobs wait for the next day (DAILY_BUDGET_CNY)")  # fmt: skip


def hold_for_budget(svc: Services, job: Job, why: str) -> None:
    """An admitted job whose account's budget ran out before its submit: it waits in the queue,
    saying why, until the next UTC day, and gives its slot back (only once it is back in the
    queue: a worker that moved it first keeps the slot). Nothing was sent for it."""
    held = enqueue(svc, job, admitted_at=None, error_code=BUDGET_REACHED, error_message=why)
    if held is not None:
        svc.governor.release(job.lane, job.job_id)
        log.info("job %s held: %s", job.job_id, why)


def add_spend(svc: Services, job: Job, billed: float, now: float) -> None:
    """Count a job's bill against its account's day and model (once per job): the daily budget
    and the console's spend today read it. Best effort: a failure to count is logged; the job,
    paid for, goes on."""
    account = job.account
    try:
        svc.governor.add_spend(account, utc_day(now), billed, job.job_id, job.model)
    except StoreUnavailable as exc:
        log.warning("could not count %.4f CNY against %s's budget: %s", billed, account, exc)
