"""A no-op Celery app for Celery's own floor (``bench/overhead.py``).

``celery -A bench.noop_app worker`` (from the repository root). The broker is ``NOOP_BROKER_URL``
(else ``REDIS_URL``), and every setting that changes what one message costs is the same as in
``config/celery_app.py``: JSON only, acks late, prefetch multiplier 1 with prefetch disabled, the
ETA limit, task events from workers (``-E``) and sent events from producers, started-state tracking,
no results stored, the same visibility timeout. The tasks do nothing but, for ``bench.hop``, send
the next message of a chain, as each step of a job sends the next step.
"""

from __future__ import annotations

import os

from celery import Celery

broker = os.environ.get("NOOP_BROKER_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1/0")
transport = {"visibility_timeout": int(os.environ.get("VISIBILITY_TIMEOUT", "300"))}

app = Celery("bench_noop", broker=broker, backend=broker)
app.conf.update(
    broker_transport_options=transport,
    result_backend_transport_options=transport,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    event_serializer="json",
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    worker_eta_task_limit=1000,
    worker_disable_prefetch=True,
    task_acks_late=True,
    task_reject_on_worker_lost=False,
    task_default_queue="celery",
)


@app.task(name="bench.noop")
def noop() -> None:
    """Nothing at all: the cost of one message, received, run and acknowledged."""


@app.task(name="bench.hop")
def hop(left: int, queue: str = "celery") -> None:
    """One link of a chain: send the next link while any are left (what a job step does)."""
    if left > 1:
        hop.apply_async((left - 1, queue), queue=queue)
