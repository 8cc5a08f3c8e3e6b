"""One table routes every task: the app, the producer client and callbacks agree with it, and a
bare ``celery -A config.celery_app worker`` (no -Q) consumes every queue a job passes through."""

from __future__ import annotations

from typing import Any

import pytest

from config.celery_app import app
from workers.domain import routes
from workers.domain.request import parse_request, parse_template_request
from workers.errors import InvalidJobRequest
from workers.producer import AnimateQueue
from workers.steps import table

OK = {"image_url": "https://cdn.test/a.png", "template_id": "AACT.abc.def"}


def test_every_task_of_ours_has_a_route_and_every_route_a_task() -> None:
    """Adding a task without a route (or a route to nothing) fails here, not in production."""
    import workers.entrypoints.celery.tasks  # noqa: F401  (registers the tasks)

    ours = {name for name in app.tasks if name.startswith("animate.")}
    assert ours == set(table.ROUTES)
    assert app.conf.task_routes == table.celery_routes()
    assert set(table.ROUTES.values()) <= set(routes.QUEUES)


def test_a_bare_worker_consumes_every_queue() -> None:
    """The queues are declared, so a worker started without -Q consumes all three (Celery's
    default otherwise: the default queue only, and every job stops after intake)."""
    declared = {q.name for q in app.conf.task_queues}
    assert declared == set(routes.QUEUES)
    assert set(app.amqp.queues.consume_from) == set(routes.QUEUES)
    assert app.conf.task_default_queue == routes.QUEUE_INTAKE


def test_the_client_sends_cancel_where_the_table_routes_it(monkeypatch: Any) -> None:
    """animate.cancel goes to the queue the workers route it to (they were once different)."""
    sent: list[tuple[str, str]] = []

    class Result:
        def get(self, timeout: float) -> dict[str, Any]:
            return {"job_id": "j", "state": "CANCELED", "outcome": "canceled", "message": ""}

    queue = AnimateQueue("redis://127.0.0.1:1/0")
    monkeypatch.setattr(
        queue.celery, "send_task", lambda name, **kw: sent.append((name, kw["queue"])) or Result()
    )
    queue.cancel("j")
    queue.submit("https://cdn.test/a.png", "AACT.abc.def", job_id="j2")
    assert sent == [
        ("animate.cancel", table.queue_for("animate.cancel")),
        ("animate.generate", table.queue_for("animate.generate")),
    ]


class TestCallbackQueue:
    def test_a_callback_needs_its_own_queue(self) -> None:
        """Without callback_queue the callback would land on `celery`, which our workers consume
        and where they would discard it as an unregistered task: refused at intake instead."""
        with pytest.raises(InvalidJobRequest) as caught:
            parse_request({**OK, "callback_task": "shop.done"})
        assert caught.value.code == "InvalidRequest.Callback"
        assert "callback_queue" in caught.value.message
        with pytest.raises(InvalidJobRequest):
            parse_template_request({"video_url": "https://cdn.test/d.mp4", "callback_task": "a.b"})

    @pytest.mark.parametrize("queue", routes.QUEUES)
    def test_our_queues_are_refused(self, queue: str) -> None:
        with pytest.raises(InvalidJobRequest) as caught:
            parse_request({**OK, "callback_task": "shop.done", "callback_queue": queue})
        assert caught.value.code == "InvalidRequest.Callback"
        assert queue in caught.value.message

    def test_a_queue_of_the_producers_own_is_kept(self) -> None:
        request = parse_request({**OK, "callback_task": "shop.done", "callback_queue": "shop"})
        assert (request.callback_task, request.callback_queue) == ("shop.done", "shop")


class TestStepTable:
    """The step table generates the tasks, their routes and the watchdog's resume table."""

    def test_each_row_is_a_registered_task_on_its_queue(self) -> None:
        from workers.entrypoints.celery import tasks

        for name, row in table.STEPS.items():
            task = tasks.TASKS[name]
            assert task.name == row.task and app.tasks[row.task].name == row.task
            assert table.queue_for(row.task) == row.queue
            assert app.tasks[row.task].__doc__ == row.doc  # (Flower shows it)

    def test_the_watchdog_resumes_every_working_state_with_its_step(self) -> None:
        from workers.domain.states import JobState

        working = {JobState.RECEIVED, JobState.DETECTING, JobState.PREPARING, JobState.QUEUED,
                   JobState.SUBMITTING, JobState.SUBMITTED, JobState.COPYING}  # fmt: skip
        assert set(table.RESUMABLE) == working
        assert table.RESUMABLE[JobState.SUBMITTED] == "poll"
        assert table.RESUMABLE[JobState.SUBMITTING] == "submit"
        assert not any(row.resumes for row in table.STEPS.values() if row.legacy)

    def test_time_limits_follow_the_budget(self) -> None:
        from workers.entrypoints.celery import tasks

        assert tasks.TASKS["copy"].time_limit == tasks.settings.copy_time_limit
        assert tasks.TASKS["validate"].time_limit == tasks.INTAKE_LIMITS["time_limit"]
        assert tasks.TASKS["prepare"].time_limit == tasks.PREPARE_LIMITS["time_limit"]
        assert tasks.TASKS["poll"].time_limit is None
