"""The task layer's choice for the next step: a Celery countdown up to COUNTDOWN_MAX_SECONDS, the
Redis timer beyond it, and no countdown at all for a step due now."""

from __future__ import annotations

from typing import Any

import pytest

from workers.adapters.redis.timers import Parked
from workers.entrypoints.celery import tasks as tasks
from workers.steps.context import Next


class Recorder:
    def __init__(self) -> None:
        self.parked: list[tuple[Parked, float]] = []
        self.sent: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def park(self, wake: Parked, delay: float) -> None:
        self.parked.append((wake, delay))


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(tasks, "timers", lambda: rec)
    for task in (tasks.TASKS["poll"], tasks.TASKS["submit"], tasks.TASKS["copy"]):

        def apply_async(args: tuple[Any, ...], _name: str = task.name, **options: Any) -> None:
            rec.sent.append((_name, args, options))

        monkeypatch.setattr(task, "apply_async", apply_async)
    return rec


def test_the_boundary_is_a_countdown_and_beyond_it_is_parked(recorder: Recorder) -> None:
    limit = tasks.settings.countdown_max_seconds
    tasks.schedule(Next("poll", "j1", 4, limit, "shop"))
    tasks.schedule(Next("poll", "j2", 7, limit + 0.001, "shop"))
    [(name, args, options)] = recorder.sent
    assert (name, args, options["countdown"]) == ("animate.poll", ("j1", 4), limit)
    assert options["argsrepr"] == "(job_id='j1', version=4, producer='shop')"
    assert recorder.parked == [(Parked("poll", "j2", 7, "shop"), limit + 0.001)]


def test_a_step_due_now_carries_no_countdown(recorder: Recorder) -> None:
    tasks.schedule(Next("copy", "j3", 9, 0.0, "shop"))
    tasks.schedule(Next("submit", "j4", 2, -3.0, "shop"))  # overdue: now
    assert [(n, a, o["countdown"]) for n, a, o in recorder.sent] == [
        ("animate.copy", ("j3", 9), None),
        ("animate.submit", ("j4", 2), None),
    ]
    assert recorder.parked == []
    tasks.schedule(None)
    assert len(recorder.sent) == 2


def test_a_parked_wake_up_is_sent_as_its_step_without_a_countdown(recorder: Recorder) -> None:
    tasks._send_parked(Parked("poll", "j5", 11, "shop", due=123.0))
    assert [(n, a, o["countdown"]) for n, a, o in recorder.sent] == [
        ("animate.poll", ("j5", 11), None)
    ]


def test_the_worker_runs_the_dispatcher_step() -> None:
    """Celery builds every worker from app.steps['worker']: the dispatcher step is in it, and a
    cold shutdown (terminate) stops its thread as a warm one (stop) does."""
    assert tasks.TimerDispatch in tasks.app.steps["worker"]
    step = tasks.TimerDispatch.__new__(tasks.TimerDispatch)
    stopped: list[bool] = []

    class Fake:
        def stop(self) -> None:
            stopped.append(True)

    step.dispatcher = Fake()  # type: ignore[assignment]
    step.terminate(None)
    assert stopped == [True] and step.dispatcher is None


def test_a_copy_that_hits_its_soft_time_limit_is_sent_again_at_once(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SoftTimeLimitExceeded (a read or part upload hung past the budget's margin) is handled:
    the copy goes on from its checkpoint in a fresh message instead of the job waiting for the
    watchdog."""
    import dataclasses

    from celery.exceptions import SoftTimeLimitExceeded

    from workers.steps.table import STEPS

    def hangs(svc: Any, job_id: str, version: int) -> None:
        raise SoftTimeLimitExceeded()

    def interrupted(svc: Any, job_id: str) -> Next:
        return Next("copy", job_id, 9, 0, "shop")

    monkeypatch.setattr(tasks, "services", lambda: None)
    row = dataclasses.replace(STEPS["copy"], run=hangs, on_soft_limit=interrupted)
    monkeypatch.setitem(STEPS, "copy", row)
    tasks.TASKS["copy"].run("j1", 8)
    assert [(name, args) for name, args, _ in recorder.sent] == [("animate.copy", ("j1", 9))]


def test_download_steps_end_before_the_watchdog_would_resume_them() -> None:
    """A stuck download must be gone before its job is resumed elsewhere, or every resume of a
    PREPARING job would start another download beside it: each download step's hard time limit
    ends before its attempt's deadline (and the intake's before its RECEIVED deadline)."""
    from config.settings import load_settings
    from workers import bootstrap as wiring

    settings = load_settings({"DASHSCOPE_API_KEY": "sk-test-limits", "S3_BUCKET": "b"})
    svc = wiring.build_services(settings)
    assert tasks.TASKS["prepare"].time_limit < svc.prepare.attempt_seconds
    assert tasks.TASKS["prepare"].soft_time_limit < tasks.TASKS["prepare"].time_limit
    for task in (tasks.generate, tasks.make_template, tasks.TASKS["validate"]):
        assert task.time_limit < svc.intake_seconds + 30  # the deadline plus the watchdog's grace
