"""The watchdog: overdue jobs resumed, backlogs told from deaths, queued jobs rechecked."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from workers.domain.decisions import (
    Finish,
)
from workers.domain.job import Job, video_lane
from workers.domain.states import JobState
from workers.domain.templates import (
    template_lane,
)
from workers.steps.admission import admit
from workers.steps.context import DELIVERY_PENDING, WAKE_SENT, WAKE_TIMER, Next, Services, Step
from workers.steps.finish import finish
from workers.steps.table import RESUMABLE, STEPS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchdogReport:
    resumed: list[str]  # sent their step again (a lost message, or a worker that died)
    poisoned: list[str]  # failed: their step killed its worker max_resumes times in a row
    admitted_accounts: int
    waiting: list[str] = field(default_factory=list)  # overdue, but their message is in a backlog


def watchdog(
    svc: Services, *, grace: float, max_resumes: int, accounts: list[str], limit: int = 500
) -> WatchdogReport:
    """Look at every job whose next wake-up is overdue by more than ``grace``, and tell apart:

    * **a message waiting in a backlog** (``wake`` "sent", and the step's queue has no consumer
      or an oldest message at least as old as this job's wait): left alone. Sending another
      would only lengthen the queue, and nothing has failed.
    * **a lost message** (``wake`` "sent", but the queue flows: a SIGKILLed worker held it, or
      a Redis failover dropped it) and **a deadline that is itself the wake-up** (``wake``
      "timer"): sent again. Not a death.
    * **a step a worker took and never finished** (no ``wake``): the worker died in it. The
      count of such deaths in a row (reset by any step that finishes) decides: a job that has
      taken ``max_resumes`` workers down before anything was paid is failed (``PoisonJob``); a
      job with a paid task (submitted, polling, copying, or a submit that may have created a
      task) never is: it is resumed with a growing delay until its own deadline (the poll
      deadline, the video URL's expiry) ends it.

    Each resend bumps the version, so a late original message is stale and does nothing. Then
    every account gets an admission pass.
    """
    now = svc.clock()
    queues = svc.queues.waiting() if svc.queues is not None else None
    seen: dict[str, list[str]] = {"resumed": [], "poisoned": [], "waiting": []}
    for job_id in svc.store.due(now - grace, limit):
        job = svc.store.get(job_id)
        step = _step_for(svc, job) if job is not None else None
        if job is None or step is None:
            continue
        overdue = now - (job.next_action_at if job.next_action_at is not None else now)
        if job.wake == WAKE_SENT and _in_backlog(queues, step, overdue, grace):
            seen["waiting"].append(job_id)
            continue
        outcome = _resume(svc, job, step, now, overdue, max_resumes)
        if outcome is not None:
            seen[outcome].append(job_id)
    for account in accounts:  # every lane of the account: each model's, and the templates'
        lanes = {account, template_lane(account)} | {video_lane(account, m) for m in svc.profiles}
        for lane in sorted(lanes):
            admit(svc, lane)
    return WatchdogReport(seen["resumed"], seen["poisoned"], len(accounts), seen["waiting"])


class SentIntake(Protocol):
    """One noted intake message (workers.adapters.redis.inbox.Sent)."""

    @property
    def job_id(self) -> str: ...
    @property
    def queue(self) -> str: ...
    @property
    def sent_at(self) -> float: ...


class IntakeInbox(Protocol):
    """New jobs sent and not yet taken by intake (workers.adapters.redis.inbox)."""

    def older_than(self, at: float, limit: int = 100) -> Sequence[SentIntake]: ...
    def taken(self, *job_ids: str) -> None: ...
    def again(self, job_id: str, at: float) -> None: ...


def resend_lost_intakes(
    svc: Services,
    inbox: IntakeInbox,
    send: Callable[[Any], None],  # gets the entry back (the inbox's own type)
    waiting: Callable[[str], int],
    *,
    grace: float,
    give_up_after: float = 24 * 3600.0,
) -> list[str]:
    """Send again the intake message of each job sent more than ``grace`` ago that has no
    record: lost in a failover, or popped by a worker that never received it. Only while its
    queue is empty (``waiting``: messages in it) and consumed: a message still queued would be
    a backlog, not a loss. A job found in the store only leaves the inbox. One entry's failure
    (Redis, the broker) is logged and the others go on."""
    now = svc.clock()
    consumers = svc.queues.waiting() if svc.queues is not None else {}
    resent = []
    for sent in inbox.older_than(now - grace):
        try:
            if svc.store.get(sent.job_id) is not None:
                inbox.taken(sent.job_id)
                continue
            age = now - sent.sent_at
            if age > give_up_after:
                log.error("job %s: its intake message was never taken in %.0f s; given up",
                          sent.job_id, age)  # fmt: skip
                inbox.taken(sent.job_id)
                continue
            if consumers.get(sent.queue, (1, 0.0))[0] == 0 or waiting(sent.queue) > 0:
                continue  # nobody consumes it, or it may be waiting its turn
            send(sent)
            inbox.again(sent.job_id, now)
        except Exception as exc:  # the next pass tries again
            log.warning("job %s: could not check or resend its intake message: %s",
                        sent.job_id, exc)  # fmt: skip
            continue
        svc.metrics.inc("watchdog_resumes_total", reason="lost", step="intake")
        log.warning("job %s: its intake message was lost (sent %.0f s ago, no record); sent "
                    "again", sent.job_id, age)  # fmt: skip
        resent.append(sent.job_id)
    return resent


def _step_for(svc: Services, job: Job) -> Step | None:
    """The step that carries an overdue job on (None: nothing to resume; a QUEUED job not yet
    admitted is rechecked on the spot)."""
    if job.final:
        return "deliver" if job.delivery == DELIVERY_PENDING else None
    if job.state == JobState.QUEUED and job.admitted_at is None:
        _recheck_queued(svc, job)
        return None
    return RESUMABLE.get(job.state)


def _resume(svc: Services, job: Job, step: Step, now: float, overdue: float,
            max_resumes: int) -> Literal["resumed", "poisoned"] | None:  # fmt: skip
    """Send ``step`` again (a lost message or a timer: at once; a worker that died in it: with a
    growing delay), or fail an unpaid job that took too many workers down."""
    if job.wake in (WAKE_SENT, WAKE_TIMER):
        reason, deaths, delay = ("lost" if job.wake == WAKE_SENT else "timer"), job.resumes, 0.0
    else:
        reason, deaths = "died", job.resumes + 1
        if deaths > max_resumes and not _paid(job):
            finish(svc, job, Finish(JobState.FAILED, "PoisonJob",
                   f"its {step} step was taken {deaths} times in a row in {job.state} and its "
                   "worker died each time; stopped before anything was paid, so it cannot take "
                   "more workers down"))  # fmt: skip
            return "poisoned"
        delay = svc.copy.backoff.delay(deaths, svc.rand) if deaths > 1 else 0.0
    moved = svc.store.transition(job, job.state, resumes=deaths or None, updated_at=now,
                                 next_action_at=now + delay, wake=WAKE_SENT)  # fmt: skip
    if moved is None:
        return None  # it moved on by itself in the meantime
    log.warning("job %s: resumed, overdue %.0f s in %s (%s): %s sent again in %.0f s",
                job.job_id, overdue, job.state, reason, step, delay)  # fmt: skip
    svc.metrics.inc("watchdog_resumes_total", reason=reason, step=step)
    svc.wake(Next.of(step, moved, delay))
    return "resumed"


def _recheck_queued(svc: Services, job: Job) -> None:
    """A job long in our queue: make sure it is in its lane's queue (it is put back if a crash
    left it out), and look again later."""
    if svc.governor.ensure_queued(job):
        log.warning("job %s: QUEUED but not in its lane's queue; put back", job.job_id)
    now = svc.clock()
    svc.store.transition(job, JobState.QUEUED, updated_at=now, wake=WAKE_TIMER,
                         next_action_at=now + svc.queued_recheck)  # fmt: skip
    admit(svc, job.lane)


def _in_backlog(
    queues: Mapping[str, tuple[int, float]] | None, step: Step, overdue: float, grace: float
) -> bool:
    """Whether the job's message is plausibly still waiting in its queue: nobody consumes the
    queue, or its oldest message has waited about as long as this job (queues are FIFO, so a
    queue whose oldest message is younger no longer holds this job's). Unknown queues: no."""
    if queues is None:
        return False
    consumers, oldest = queues.get(STEPS[step].queue, (0, 0.0))
    return consumers == 0 or oldest + grace >= overdue


def _paid(job: Job) -> bool:
    """A remote task exists, or may: its video must not be given up for a crash count."""
    return job.state in (JobState.SUBMITTED, JobState.COPYING) or (
        job.state == JobState.SUBMITTING and job.submit_ambiguous
    )
