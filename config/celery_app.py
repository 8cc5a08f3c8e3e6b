"""The Celery app, ``config.celery_app``: ``celery -A config.celery_app worker`` (or ``flower``).

Each setting that matters carries its reason; most come from ../shared/docs/celery-pitfalls.md.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import setup_logging, worker_init, worker_process_init
from kombu import Queue

from config.settings import Settings, SettingsError, get_settings
from workers.adapters.redis.connection import celery_options
from workers.adapters.redis.kombu_transport import install as install_transports
from workers.bootstrap import celery_urls, redis_address
from workers.domain.routes import QUEUE_INTAKE, QUEUES
from workers.steps.table import celery_routes

try:
    settings: Settings = get_settings()
except SettingsError as exc:
    sys.exit(f"animate-queue: {exc}")

# kombu's Redis transports, fixed to live through a lost broker connection (a Redis restart, a
# Sentinel failover) while holding unacknowledged messages; see the module.
install_transports()
app = Celery("animate_queue", include=["workers.entrypoints.celery.tasks"])
transport = {
    # Redis re-delivers any message not acknowledged within this time, including countdown
    # messages waiting in a worker. Settings check that it is >= 4x the longest countdown and
    # above the copy's hard time limit. Every process on this broker must use the same value.
    "visibility_timeout": settings.visibility_timeout,
}
# With REDIS_SENTINELS, the broker and result backend are kombu's sentinel:// URLs, and the
# master's name, the Sentinels' password and TLS go in their options (docs/ha.md).
broker_url, result_backend = celery_urls(settings)
sentinel = celery_options(redis_address(settings), broker_url, result_backend)
app.conf.update(
    broker_url=broker_url,
    result_backend=result_backend,
    broker_transport_options={**transport, **sentinel.pop("broker_transport_options", {})},
    result_backend_transport_options={
        **transport,
        **sentinel.pop("result_backend_transport_options", {}),
    },
    **sentinel,
    broker_connection_retry_on_startup=True,
    # Messages come from other services: JSON only, never pickle.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    event_serializer="json",
    # Flower is fed by events: from workers (-E) and from producers (sent events).
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    # Job state lives in our job store; tasks keep no results of their own. In particular the
    # intake task must not write a result under the job id (producers will read that id).
    task_ignore_result=True,
    result_expires=settings.result_expires_seconds,
    result_extended=True,
    # One message at a time per process; countdown messages are held in memory regardless of
    # prefetch, so cap them too.
    worker_prefetch_multiplier=1,
    worker_eta_task_limit=1000,
    # Fetch a message only when a process is free: a SIGKILLed worker then strands no more than
    # what it was running (back after the visibility timeout); its countdown messages belong to
    # jobs the watchdog resumes.
    worker_disable_prefetch=True,
    # Acknowledge after the work: a worker that dies mid-task leaves the message for another.
    # Every task is idempotent (compare-and-set with a fencing version). A child killed by the
    # OS is acknowledged (no redelivery loop); the job record stays for the watchdog.
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    worker_cancel_long_running_tasks_on_connection_loss=True,
    # Shutdown. Workers run with REMAP_SIGTERM=SIGQUIT (Procfile, Dockerfile): SIGTERM then
    # waits up to WORKER_SOFT_SHUTDOWN_SECONDS (30) for running tasks, cancels and requeues the
    # rest, countdown messages included, and exits (even when idle: give it a stop grace ~15 s
    # longer). A
    # plain SIGTERM is Celery's warm shutdown, which waits for running tasks without a limit and
    # then also returns the held countdown messages. Either way nothing waits for the
    # visibility timeout (tests/e2e/test_shutdown_e2e.py); only SIGKILL strands messages.
    worker_soft_shutdown_timeout=settings.worker_soft_shutdown_seconds,
    worker_enable_soft_shutdown_on_idle=True,
    # Every queue a job passes through is declared, so a bare `celery -A config.celery_app
    # worker` consumes them all (undeclared, it would consume only the default queue and every
    # job would stop after intake); `-Q` still splits them. Routes: workers/steps/table.py.
    task_queues=[Queue(name, routing_key=name) for name in QUEUES],
    task_default_queue=QUEUE_INTAKE,
    task_routes=celery_routes(),
    # `celery -A config.celery_app beat` sends the watchdog; the task itself takes a Redis lock,
    # so a second beat started by mistake changes nothing.
    beat_schedule={
        "animate-watchdog": {
            "task": "animate.watchdog",
            "schedule": settings.watchdog_interval_seconds,
            "options": {"expires": settings.watchdog_interval_seconds},
        }
    },
    worker_hijack_root_logger=False,
)


@setup_logging.connect
def _logging(**_: Any) -> None:
    """Our handlers and format (LOG_FORMAT) for workers and beat, instead of Celery's."""
    from config import logs
    from workers.logfields import JobFields

    logs.configure(settings)
    for handler in logging.getLogger().handlers:
        handler.addFilter(JobFields())  # the step, job id and version on every line


@worker_init.connect
def _require_worker_settings(**_: Any) -> None:
    """A worker without a key or bucket stops at start-up, saying which is missing."""
    from workers.bootstrap import account_regions, served_profiles

    try:
        settings.require_worker()
        account_regions(settings, served_profiles(settings))
    except (SettingsError, ValueError) as exc:
        sys.exit(f"animate-queue: {exc}")
    _warn_if_retiring()
    _check_replication()


def _check_replication() -> None:
    """With Sentinel or REDIS_WAIT_REPLICAS, say at start-up where the master is and how
    protected writes will be kept (workers.adapters.redis.replication)."""
    import redis

    from workers.adapters.redis.replication import check_at_start
    from workers.bootstrap import redis_client

    address = redis_address(settings)
    if not address.uses_sentinel and settings.wait_replicas == 0:
        return
    client = redis_client(settings, socket_timeout=5.0)
    try:
        check_at_start(client, settings.wait_replicas, address.describe())
    except redis.RedisError as exc:  # the broker connection retries on its own; so do we
        logging.getLogger("animate_queue").warning(
            "redis: cannot read replication from %s yet: %s", address.describe(), exc
        )
    finally:
        client.close()


def _warn_if_retiring() -> None:
    """A worker of a model close to (or past) its retirement says so at start-up."""
    import datetime
    import logging

    from workers import models
    from workers.models.retirement import retirement_notice

    today = datetime.datetime.now(datetime.UTC).date()
    notice = retirement_notice(models.profile(settings.dashscope_model), today)
    if notice is not None:
        level = logging.ERROR if notice.retired else logging.WARNING
        logging.getLogger("animate_queue").log(level, "%s", notice.message)


@worker_process_init.connect
def _fresh_clients(**_: Any) -> None:
    """Each forked process builds its own HTTP, S3 and Redis clients."""
    from workers import bootstrap as wiring

    wiring.reset()
