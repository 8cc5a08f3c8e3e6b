"""The Celery tasks: thin shells around :mod:`workers.steps`. Task names are a wire contract.

``animate.generate``, ``animate.template`` and ``animate.cancel`` are public (other services
``send_task`` them). The steps' tasks (``animate.detect``, ``animate.poll``, ...) are generated
from the step table (workers/steps/table.py); they are internal, but their names are still fixed:
countdown messages wait in Redis across deploys. Their arguments are always ``(job_id, version)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Task, bootsteps
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_shutdown, worker_shutdown

from config.celery_app import app, settings
from workers import logfields, steps
from workers.adapters.redis.inbox import RedisInbox
from workers.adapters.redis.queues import Heartbeats, RedisQueues
from workers.adapters.redis.store import RedisJobStore
from workers.adapters.redis.timers import Dispatcher, Parked, RedisTimers
from workers.bootstrap import broker_redis, built, install, redis_client, replication
from workers.bootstrap import services as _services
from workers.domain.request import JobKind
from workers.domain.routes import QUEUES
from workers.entrypoints.celery.results import CeleryResults
from workers.errors import StoreUnavailable
from workers.steps.context import Step
from workers.steps.table import STEPS, Budget, StepDef

log = logging.getLogger(__name__)
LOCK_KEY = f"{settings.key_prefix}:watchdog-lock"
# When a watchdog message (sent by beat) last ran: `animate-queue health beat` reads it.
BEAT_HEARTBEAT_KEY = f"{settings.key_prefix}:beat-heartbeat"


@functools.cache
def svc_lock() -> Any:
    return redis_client(settings)  # one connection pool per process, not one per tick


RETRY: dict[str, Any] = {
    # Only the job store can fail outside the pipeline's own handling; DashScope and S3 errors
    # are decided on by the pipeline (which never uses Celery retries for "not ready yet").
    "autoretry_for": (StoreUnavailable,),
    "retry_backoff": 2,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 8,
}


@functools.cache
def timers() -> RedisTimers:
    client = svc_lock()
    return RedisTimers(client, prefix=settings.key_prefix,
                       replication=replication(settings, client))  # fmt: skip


@functools.cache
def broker_client() -> Any:
    """The broker's Redis (the job store's unless CELERY_BROKER_URL names another)."""
    return broker_redis(settings) or svc_lock()


@functools.cache
def inbox() -> RedisInbox | None:
    """The intake inbox, kept only where protected writes are (REDIS_WAIT_REPLICAS > 0)."""
    if settings.wait_replicas == 0:
        return None
    client = svc_lock()
    return RedisInbox(client, prefix=settings.key_prefix,
                      replication=replication(settings, client))  # fmt: skip


def _send_intake_again(sent: Any) -> None:
    """The producer's intake message once more, as it was: same task, kwargs and message id."""
    app.send_task(sent.task, kwargs=sent.kwargs, queue=sent.queue, task_id=sent.message_id)


def _taken(result: steps.IntakeResult, kwargs: dict[str, Any], message_id: str) -> None:
    """Cross the job off the intake inbox, under every id its producer may have noted it by."""
    box = inbox()
    if box is not None:
        named = kwargs.get("job_id")
        box.taken(result.job_id, named if isinstance(named, str) else "", message_id)


def schedule(step: steps.Next | None) -> None:
    """Send the next step: now, as a short countdown, or parked in the Redis timer when later.

    Only waits up to ``COUNTDOWN_MAX_SECONDS`` become Celery countdowns (held by a worker until
    due); a later one goes to ``P:timers``, which the dispatchers send when due (workers.adapters.redis.timers).
    """
    if step is None:
        return
    if step.countdown > settings.countdown_max_seconds:
        wake = Parked(step.step, step.job_id, step.version, step.producer)
        timers().park(wake, step.countdown)
        return
    _send(step.step, step.job_id, step.version, step.producer, max(0.0, step.countdown))


def _send(step: str, job_id: str, version: int, producer: str, countdown: float) -> None:
    task = TASKS[step]  # type: ignore[index]  # (a parked step named by an older release: KeyError)
    options: dict[str, Any] = {
        "countdown": countdown or None,
        # What Flower shows as the arguments: the job id and its producer, searchable there.
        "argsrepr": f"(job_id={job_id!r}, version={version}, producer={producer!r})",
    }
    task.apply_async((job_id, version), **options)


def _send_parked(parked: Parked) -> None:
    _send(parked.step, parked.job_id, parked.version, parked.producer, 0.0)


class TimerDispatch(bootsteps.StartStopStep):
    """A thread in each worker's main process that sends parked wake-ups once they are due.

    Every worker runs one; taking is atomic, so they share the work. It starts after the pool's
    first processes are forked; billiard forks a replacement from the main process when one dies,
    which Celery's and redis-py's after-fork resets make safe for the clients this thread uses.
    Celery calls ``stop`` on a warm shutdown and ``terminate`` on a cold one (SIGQUIT, which
    ``REMAP_SIGTERM`` makes of SIGTERM): both stop the thread, and whatever it had taken and not
    confirmed comes due again after the lease.
    """

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.dispatcher: Dispatcher | None = None

    def start(self, worker: Any) -> None:
        self.dispatcher = Dispatcher(timers(), _send_parked, tick=settings.timer_tick_seconds)
        self.dispatcher.start()

    def stop(self, worker: Any) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop()
            self.dispatcher = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)


class QueueHeartbeat(bootsteps.StartStopStep):
    """A thread in each worker's main process saying which queues this node consumes, so an
    operator sees a routed queue that nobody consumes (workers.adapters.redis.queues, health queues)."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.heartbeats: Heartbeats | None = None

    def start(self, worker: Any) -> None:
        self.heartbeats = Heartbeats(
            RedisQueues(broker_redis(settings) or svc_lock(), prefix=settings.key_prefix),
            worker.hostname,
            lambda: list(worker.app.amqp.queues.consume_from),
            QUEUES,
        )
        self.heartbeats.start()

    def stop(self, worker: Any) -> None:
        if self.heartbeats is not None:
            self.heartbeats.stop()
            self.heartbeats = None

    def terminate(self, worker: Any) -> None:
        self.stop(worker)


app.steps["worker"].add(TimerDispatch)
app.steps["worker"].add(QueueHeartbeat)


class MeteredTask(Task[Any, Any]):
    """Our tasks' base: what a task records goes to Redis in one transaction at its end.

    (A base class rather than a decorator, so Celery still checks the arguments against the
    task function's own signature.)
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        batch = getattr(_services().metrics, "batch", None)
        with batch() if batch is not None else contextlib.nullcontext():
            return super().__call__(*args, **kwargs)


def services() -> steps.Services:
    """This process's services (built once, never changed)."""
    return _services()


@worker_process_shutdown.connect
@worker_shutdown.connect
def _flush_metrics(**_: Any) -> None:
    """A pool process (or a solo worker) on its way out sends the metrics it still holds
    (``METRICS_FLUSH_SECONDS``)."""
    svc = built()
    flush = getattr(svc.metrics, "flush", None) if svc is not None else None
    if flush is not None:
        with contextlib.suppress(Exception):  # never in the way of a shutdown
            flush()


# The wake-ups the use cases ask for on the side (admissions), and final outcomes under the job
# id, for every services this process builds. (``schedule`` is looked up when called.)
install(wake=lambda step: schedule(step), results=CeleryResults(app))


# Time limits of the steps that download what a producer named: the downloads have deadlines
# of their own; these make sure a stuck one is gone before the watchdog resumes its job.
INTAKE_LIMITS: dict[str, Any] = {
    "soft_time_limit": int(settings.intake_seconds),
    "time_limit": int(settings.intake_seconds) + 15,
}
PREPARE_LIMITS: dict[str, Any] = {
    "soft_time_limit": int(settings.video_download_seconds) + 30,
    "time_limit": int(settings.video_download_seconds) + 45,
}


@app.task(name="animate.generate", bind=True, base=MeteredTask, **INTAKE_LIMITS, **RETRY)
def generate(self: Task[Any, Any], *args: Any, **kwargs: Any) -> None:
    """Intake: validate, create the job (id = ``job_id`` or this message's id), then submit."""
    result = steps.intake(services(), kwargs, args, str(self.request.id))
    _taken(result, kwargs, str(self.request.id))
    schedule(result.next)


@app.task(name="animate.template", bind=True, base=MeteredTask, **INTAKE_LIMITS, **RETRY)
def make_template(self: Task[Any, Any], *args: Any, **kwargs: Any) -> None:
    """Intake of a template job: a dance video in, an action template id (state READY) out."""
    result = steps.intake(services(), kwargs, args, str(self.request.id), JobKind.TEMPLATE)
    _taken(result, kwargs, str(self.request.id))
    schedule(result.next)


def _limits(budget: Budget) -> dict[str, Any]:
    if budget == "intake":
        return INTAKE_LIMITS
    if budget == "prepare":
        return PREPARE_LIMITS
    if budget == "copy":
        return {"time_limit": settings.copy_time_limit,
                "soft_time_limit": settings.copy_time_limit - 30}  # fmt: skip
    return {}


def _step_task(row: StepDef) -> Task[Any, Any]:
    """The Celery task of one step: ``(job_id, version)`` in, the next wake-up scheduled."""
    name = row.name

    def run(self: Task[Any, Any], job_id: str, version: int) -> None:
        step = STEPS[name]  # looked up when it runs (a test may swap the row)
        with logfields.bound(step=name, job_id=job_id, version=version):
            try:
                schedule(step.run(services(), job_id, version))
            except SoftTimeLimitExceeded:
                if step.on_soft_limit is None:
                    raise
                schedule(step.on_soft_limit(services(), job_id))

    run.__name__ = run.__qualname__ = f"{name}_job"
    run.__doc__ = row.doc
    run.__module__ = __name__
    register: Callable[[Callable[..., None]], Task[Any, Any]] = app.task(
        name=row.task, bind=True, base=MeteredTask, **_limits(row.budget), **RETRY
    )
    return register(run)


# One task per row of the step table (workers/steps/table.py).
TASKS: dict[Step, Task[Any, Any]] = {name: _step_task(row) for name, row in STEPS.items()}


@app.task(name="animate.cancel", bind=True, ignore_result=False, base=MeteredTask, **RETRY)
def cancel_job(self: Task[Any, Any], job_id: str) -> dict[str, Any]:
    """Cancel a job (free while queued; DashScope's cancel while remote PENDING)."""
    result = steps.cancel(services(), str(job_id))
    return {
        "job_id": result.job_id,
        "state": result.state.value if result.state else None,
        "outcome": result.outcome,
        "message": result.message,
    }


@app.task(name="animate.watchdog", bind=True, base=MeteredTask, **RETRY)
def watchdog(self: Task[Any, Any]) -> None:
    """Resume overdue jobs and run an admission pass per account (sent by celery beat)."""
    svc = services()
    # One watchdog per interval, whatever number of beats send it: the lock is never released,
    # it expires.
    ttl = max(1, int(settings.watchdog_interval_seconds * 0.8))
    svc_lock().set(BEAT_HEARTBEAT_KEY, repr(time.time()), ex=int(ttl * 20) + 60)
    if not svc_lock().set(LOCK_KEY, str(self.request.id), nx=True, ex=ttl):
        return
    # Index entries whose records expired (final-state sets, old remote task ids), a bounded
    # batch per pass, so Redis memory per job stays flat over months.
    swept = svc.store.sweep() if isinstance(svc.store, RedisJobStore) else 0
    report = steps.watchdog(
        svc,
        grace=settings.watchdog_grace_seconds,
        max_resumes=settings.watchdog_max_resumes,
        accounts=sorted(svc.accounts),
    )
    box = inbox()
    if box is not None:  # new jobs whose intake message was lost on its way
        steps.resend_lost_intakes(
            svc,
            box,
            _send_intake_again,
            lambda queue: int(broker_client().llen(queue)),
            grace=settings.watchdog_grace_seconds,
        )
    log.info("watchdog pass: %d resumed, %d poisoned, %d waiting in a backlog, %d index "
             "entries swept", len(report.resumed), len(report.poisoned), len(report.waiting),
             swept)  # fmt: skip
    if report.resumed or report.poisoned:
        log.warning(
            "watchdog resumed %d job(s), failed %d poison job(s)",
            len(report.resumed),
            len(report.poisoned),
        )
