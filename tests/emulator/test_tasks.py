"""The task book without HTTP: FIFO lanes, phases, cancel, retention; token buckets; fault plans."""

from __future__ import annotations

import pytest

from emulator import tasks
from emulator.faults import FaultError, FaultPlan, url_trigger
from emulator.limits import Buckets

PHASES = ((tasks.PRE_PROCESSING, 1.0), (tasks.RUNNING, 2.0), (tasks.POST_PROCESSING, 1.0))


def add(book: tasks.TaskBook, now: float, account: str = "a", model: str = "m") -> tasks.Task:
    return book.add(
        account=account, model=model, endpoint="video-synthesis", now=now, phases=PHASES, inputs={}
    )


class TestTaskBook:
    def test_phases(self) -> None:
        """A task walks its phases and then succeeds."""
        book = tasks.TaskBook(concurrency=1, retention_seconds=100)
        t = add(book, 0)
        assert [t.status_at(x) for x in (0, 1.5, 3.5, 4.0)] == [
            tasks.PRE_PROCESSING,
            tasks.RUNNING,
            tasks.POST_PROCESSING,
            tasks.SUCCEEDED,
        ]

    def test_fifo_with_one_slot(self) -> None:
        """Queued tasks start one after another, each when the previous one ends."""
        book = tasks.TaskBook(concurrency=1, retention_seconds=100)
        a, b, c = add(book, 0), add(book, 0.5), add(book, 1)
        book.advance(100)
        assert (a.scheduled_time, b.scheduled_time, c.scheduled_time) == (0, 4, 8)

    def test_idle_lane_starts_at_submit(self) -> None:
        """A task submitted to an idle lane starts at once, not when the last one ended."""
        book = tasks.TaskBook(concurrency=1, retention_seconds=100)
        add(book, 0)
        late = add(book, 50)
        assert late.scheduled_time == 50

    def test_two_slots(self) -> None:
        """With two slots the third task waits for the first to end."""
        book = tasks.TaskBook(concurrency=2, retention_seconds=100)
        a, b, c = add(book, 0), add(book, 0), add(book, 1)
        book.advance(100)
        assert (a.scheduled_time, b.scheduled_time, c.scheduled_time) == (0, 0, 4)

    def test_lanes_are_per_account_and_model(self) -> None:
        """Another account or model has its own slot."""
        book = tasks.TaskBook(concurrency=1, retention_seconds=100)
        add(book, 0)
        assert add(book, 0, account="b").scheduled_time == 0
        assert add(book, 0, model="other").scheduled_time == 0

    def test_cancel_pending_skips_it(self) -> None:
        """A cancelled queued task never runs and the next one takes its turn."""
        book = tasks.TaskBook(concurrency=1, retention_seconds=100)
        add(book, 0)
        b, c = add(book, 0), add(book, 0)
        assert book.cancel(b, 1)
        book.advance(100)
        assert b.scheduled_time is None and b.status_at(100) == tasks.CANCELED
        assert c.scheduled_time == 4

    def test_cancel_running_refused(self) -> None:
        """A task past PENDING cannot be cancelled."""
        book = tasks.TaskBook(concurrency=1, retention_seconds=100)
        a = add(book, 0)
        assert not book.cancel(a, 0.5)
        assert a.status_at(10) == tasks.SUCCEEDED

    def test_failure(self) -> None:
        """A task with a failure ends FAILED after its phases."""
        book = tasks.TaskBook(concurrency=1, retention_seconds=100)
        t = book.add(
            account="a", model="m", endpoint="e", now=0, phases=PHASES, inputs={},
            failure=("InternalError.Algo", "boom"),
        )  # fmt: skip
        assert t.status_at(2.5) == tasks.RUNNING
        assert t.status_at(4) == tasks.FAILED

    def test_retention(self) -> None:
        """A finished task disappears retention_seconds after it ended; unfinished ones stay."""
        book = tasks.TaskBook(concurrency=1, retention_seconds=10)
        a = add(book, 0)
        b = add(book, 0)  # ends at 8
        assert book.get(a.task_id, 13.9) is a
        assert book.get(a.task_id, 14) is None
        assert book.get(b.task_id, 17) is b
        assert book.purge(100) == 2 and not book.tasks


class TestBuckets:
    def test_one_per_second(self) -> None:
        """Rate 1: one token, refilled after a second."""
        b = Buckets()
        assert b.take(("k",), 1, 0.0)
        assert not b.take(("k",), 1, 0.5)
        assert b.take(("k",), 1, 1.0)

    def test_burst_is_the_rate(self) -> None:
        """Rate 5 allows a burst of 5."""
        b = Buckets()
        assert [b.take(("k",), 5, 0.0) for _ in range(6)] == [True] * 5 + [False]

    def test_zero_is_unlimited(self) -> None:
        """Rate 0 never throttles."""
        b = Buckets()
        assert all(b.take(("k",), 0, 0.0) for _ in range(100))


class TestFaultPlan:
    def test_queued_before_random(self) -> None:
        """Queued faults are consumed in order, route first, then 'any'."""
        plan = FaultPlan()
        plan.enqueue({"route": "any", "kind": "503"})
        plan.enqueue({"route": "submit", "kind": "drop_after", "count": 2})
        kinds = [f.kind if (f := plan.pick("submit")) else None for _ in range(4)]
        assert kinds == ["drop_after", "drop_after", "503", None]

    def test_routes_limit_random_faults(self) -> None:
        """Random faults only hit the configured route groups."""
        plan = FaultPlan()
        plan.configure({"rates": {"500": 1.0}, "routes": ["query"]})
        assert plan.pick("submit") is None
        fault = plan.pick("query")
        assert fault is not None and fault.kind == "500"

    @pytest.mark.parametrize(
        "body",
        [
            {"rates": {"500": 0.7, "503": 0.7}},
            {"rates": {"teapot": 0.1}},
            {"routes": []},
            {"task_fail_rate": 2},
            {"slow_seconds": -1},
        ],
    )
    def test_nonsense_is_refused(self, body: dict[str, object]) -> None:
        """Shares over 1, unknown kinds or routes and negative delays are refused."""
        with pytest.raises(FaultError):
            FaultPlan().configure(body)

    def test_trigger_wins(self) -> None:
        """A URL trigger decides the task failure before the random share."""
        plan = FaultPlan()
        assert plan.task_failure("InvalidFile.Content") == "InvalidFile.Content"
        assert plan.task_failure(None) is None
        assert url_trigger("http://x/a.png?emulator_fail=X.Y&b=1", "emulator_fail") == "X.Y"
        assert url_trigger("http://x/a.png", "emulator_fail") is None
