"""The queues, and the routes of the public tasks: with the step table (workers/steps/table.py)
the one source of routes the Celery app, the producer client, callbacks and the queue checks all
read, so a task is never routed one way and sent another.

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

# The public tasks (other services send_task them) and beat's watchdog -> queue. The steps' own
# tasks and queues are in the step table (workers/steps/table.py), which adds them to these.
# Task names are a wire contract (messages wait in Redis across deploys).
PUBLIC_ROUTES: Mapping[str, str] = {
    "animate.generate": QUEUE_INTAKE,
    "animate.template": QUEUE_INTAKE,
    "animate.cancel": QUEUE_INTAKE,
    "animate.watchdog": QUEUE_DASHSCOPE,
}


def public_queue(task_name: str) -> str:
    """The queue a public task is sent to (KeyError for a task producers do not send)."""
    return PUBLIC_ROUTES[task_name]
