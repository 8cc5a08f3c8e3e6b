"""The one table of queues and task routes: the Celery app, the producer client, callbacks and
the queue checks all read it, so a task is never routed one way and sent another.

Queues:

* ``celery``: intake. Celery's default queue, so a producer with only ``celery`` installed and a
  task name lands here without any routing of its own. The public tasks (``animate.generate``,
  ``animate.template``, ``animate.cancel``) are routed here for that reason.
* ``dashscope``: detect, submit and poll: short calls, bound by DashScope's quota.
* ``transfer``: copies and dance-video checks: long downloads must never delay a poll.

The app declares all three (``task_queues``), so a bare ``celery -A config.celery_app worker``
consumes every one of them, and ``-Q`` still splits them between worker pools.

Producer callbacks never go to these queues: our workers consume them and would discard a task
they do not know ("Received unregistered task ... discarded"). A job with a ``callback_task``
must name its own ``callback_queue``.
"""

from __future__ import annotations

from collections.abc import Mapping

QUEUE_INTAKE = "celery"
QUEUE_DASHSCOPE = "dashscope"
QUEUE_TRANSFER = "transfer"
QUEUES: tuple[str, ...] = (QUEUE_INTAKE, QUEUE_DASHSCOPE, QUEUE_TRANSFER)

# Task name -> queue. Task names are a wire contract (messages wait in Redis across deploys).
ROUTES: Mapping[str, str] = {
    "animate.generate": QUEUE_INTAKE,
    "animate.template": QUEUE_INTAKE,
    "animate.cancel": QUEUE_INTAKE,
    "animate.validate": QUEUE_INTAKE,  # an intake whose worker died: its inputs checked again
    "animate.detect": QUEUE_DASHSCOPE,
    "animate.submit": QUEUE_DASHSCOPE,
    "animate.poll": QUEUE_DASHSCOPE,
    "animate.watchdog": QUEUE_DASHSCOPE,
    "animate.prepare": QUEUE_TRANSFER,  # downloads the dance video
    "animate.copy": QUEUE_TRANSFER,
    "animate.deliver": QUEUE_TRANSFER,  # a final job's result, callback and webhook
    "animate.webhook": QUEUE_TRANSFER,  # (its old name, for messages sent before the upgrade)
}


def queue_for(task_name: str) -> str:
    """The queue a task of ours is sent to (KeyError for a task that is not ours)."""
    return ROUTES[task_name]


def celery_routes() -> dict[str, dict[str, str]]:
    """The table in Celery's ``task_routes`` form."""
    return {name: {"queue": queue} for name, queue in ROUTES.items()}
