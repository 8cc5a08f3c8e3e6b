"""STEPS: the one table of the steps a job's wake-ups run. For each: its name (what ``Next``
carries), its Celery task name, the function, its queue, the states the watchdog resumes with it,
and which time limits its task gets. The Celery tasks, the task routes and the watchdog's resume
table are generated from it, so adding a step is one module and one row here.

Every step takes ``(svc, job_id, version)`` and returns the next wake-up (or None). Task names
are a wire contract: messages wait in Redis across deploys, so a renamed step keeps its old task
as a row marked ``legacy`` until those messages are gone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from workers.domain.routes import PUBLIC_ROUTES, QUEUE_DASHSCOPE, QUEUE_INTAKE, QUEUE_TRANSFER
from workers.domain.states import JobState
from workers.steps.context import Next, Services, Step
from workers.steps.copy import copy, copy_interrupted
from workers.steps.detect import detect
from workers.steps.finish import deliver, deliver_webhook
from workers.steps.intake import validate
from workers.steps.poll import poll
from workers.steps.prepare import prepare
from workers.steps.submit import submit

# Which time limits a step's task gets (entrypoints/celery/tasks.py turns each into seconds):
# "intake" and "prepare" download what a producer named and must end before the watchdog would
# resume their job elsewhere; "copy" pauses itself before its limit; "none": Celery's defaults.
Budget = Literal["none", "intake", "prepare", "copy"]


@dataclass(frozen=True)
class StepDef:
    name: Step
    task: str
    run: Callable[[Services, str, int], Next | None]
    queue: str
    doc: str
    resumes: frozenset[JobState] = frozenset()
    budget: Budget = "none"
    # Called instead when the task's soft time limit interrupts ``run``: (svc, job_id).
    on_soft_limit: Callable[[Services, str], Next | None] | None = None
    legacy: bool = False  # kept for messages sent before an upgrade; nothing sends it now


def _rows(*rows: StepDef) -> dict[Step, StepDef]:
    return {row.name: row for row in rows}


S = JobState
# A dict, not a frozen mapping, so a test can swap one row's function (monkeypatch.setitem);
# the tasks look their row up each time they run.
STEPS: dict[Step, StepDef] = _rows(
    StepDef("validate", "animate.validate", validate, QUEUE_INTAKE,
            "A received job's inputs, checked again (its intake's worker died checking them).",
            frozenset({S.RECEIVED}), "intake"),
    StepDef("detect", "animate.detect", detect, QUEUE_DASHSCOPE,
            "The image check (cached per image and account).", frozenset({S.DETECTING})),
    StepDef("prepare", "animate.prepare", prepare, QUEUE_TRANSFER,
            "The dance video's template: checked, reused, or made by a template job.",
            frozenset({S.PREPARING}), "prepare"),
    # QUEUED: admitted, but its submit never ran; SUBMITTING: it reconciles first.
    StepDef("submit", "animate.submit", submit, QUEUE_DASHSCOPE,
            "The paid POST, once per job (reconciled from the task list when uncertain).",
            frozenset({S.QUEUED, S.SUBMITTING})),
    StepDef("poll", "animate.poll", poll, QUEUE_DASHSCOPE,
            "One look at the remote task; the next poll is a countdown or a parked timer.",
            frozenset({S.SUBMITTED})),
    StepDef("copy", "animate.copy", copy, QUEUE_TRANSFER,
            "The copy into S3. It pauses before its time budget ends (the next attempt goes on "
            "from its checkpoint); should it hang past the soft limit, it is sent again at once.",
            frozenset({S.COPYING}), "copy", on_soft_limit=copy_interrupted),
    StepDef("deliver", "animate.deliver", deliver, QUEUE_TRANSFER,
            "A final job's result, callback and signed webhook, at least once."),
    StepDef("webhook", "animate.webhook", deliver_webhook, QUEUE_TRANSFER,
            "The old name of animate.deliver (its messages sent before the upgrade).",
            legacy=True),
)  # fmt: skip

# The watchdog resumes a job in each of these states with this step.
RESUMABLE: Mapping[JobState, Step] = {
    state: step.name for step in STEPS.values() for state in step.resumes
}

# Task name -> queue, for every task of ours: the public ones (domain/routes.py) and the steps.
ROUTES: Mapping[str, str] = {
    **PUBLIC_ROUTES,
    **{step.task: step.queue for step in STEPS.values()},
}


def queue_for(task_name: str) -> str:
    """The queue a task of ours is sent to (KeyError for a task that is not ours)."""
    return ROUTES[task_name]


def celery_routes() -> dict[str, dict[str, str]]:
    """The routes in Celery's ``task_routes`` form."""
    return {name: {"queue": queue} for name, queue in ROUTES.items()}
