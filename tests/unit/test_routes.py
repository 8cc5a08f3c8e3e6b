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

OK = {"image_url": "https://cdn.test/a.png", "template_id": "AACT.abc.def"}


def test_every_task_of_ours_has_a_route_and_every_route_a_task() -> None:
    """Adding a task without a route (or a route to nothing) fails here, not in production."""
    import workers.entrypoints.celery.tasks  # noqa: F401  (registers the tasks)

    ours = {name for name in app.tasks if name.startswith("animate.")}
    assert ours == set(routes.ROUTES)
    assert app.conf.task_routes == routes.celery_routes()
    assert set(routes.ROUTES.values()) <= set(routes.QUEUES)


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
        ("animate.cancel", routes.queue_for("animate.cancel")),
        ("animate.generate", routes.queue_for("animate.generate")),
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
