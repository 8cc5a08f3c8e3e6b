"""The timer contract, run on InMemoryTimers and RedisTimers alike: parked wake-ups come out once
due, oldest first, each to one taker at a time on a lease, so a taker that dies before sending
loses nothing; and the Dispatcher that sends them works on either.

Redis is the real one at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Each test works
under its own ``test-<uuid>`` key prefix and deletes exactly those keys afterwards (never FLUSHDB).
RedisTimers runs on Redis's ``TIME``, the twin on ``time.time``: the tests compare due times with
each side's own "now", and wait real (short) seconds on both.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis

from workers.adapters.memory.timers import InMemoryTimers
from workers.adapters.redis.timers import Dispatcher, Parked, RedisTimers

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


@dataclass
class Twin:
    """One implementation and its clock."""

    timers: InMemoryTimers | RedisTimers
    now: Callable[[], float]


@pytest.fixture
def redis_twin(redis_client: redis.Redis) -> Iterator[Twin]:
    prefix = f"test-{uuid.uuid4().hex}"

    def now() -> float:
        secs, micros = redis_client.time()
        return secs + micros / 1e6

    yield Twin(RedisTimers(redis_client, prefix=prefix), now)
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
def twin(request: pytest.FixtureRequest) -> Twin:
    if request.param == "memory":
        return Twin(InMemoryTimers(time.time), time.time)
    redis_side: Twin = request.getfixturevalue("redis_twin")
    return redis_side


def wake(job_id: str, step: str = "poll", version: int = 3) -> Parked:
    return Parked(step, job_id, version, "producer-a")


def ids(wakes: list[Parked]) -> list[str]:
    return [p.job_id for p in wakes]


class TestTimers:
    def test_only_what_is_due_comes_out_oldest_first(self, twin: Twin) -> None:
        """Due members come out oldest first, whole and with their own due times; a taken one
        is no longer overdue nor taken again; confirmed, it is gone; the later one stays."""
        timers = twin.timers
        parked_at = twin.now()
        timers.park(wake("late"), 300.0)
        timers.park(wake("b", step="copy", version=9), -1.0)
        timers.park(wake("a"), -2.0)
        assert (timers.count(), timers.overdue()) == (3, 2)
        taken = timers.take(10)
        assert [(p.step, p.job_id, p.version, p.producer) for p in taken.wakes] == [
            ("poll", "a", 3, "producer-a"),
            ("copy", "b", 9, "producer-a"),
        ]
        assert taken.count == 2
        first, second = taken.wakes
        assert parked_at - 2 <= first.due < parked_at - 1.5  # their own due times
        assert parked_at - 1 <= second.due < parked_at - 0.5
        assert timers.take(10).wakes == []  # leased: nobody else gets them
        assert (timers.count(), timers.overdue()) == (3, 0)
        assert timers.done(taken, taken.wakes) == 2
        assert (timers.count(), timers.overdue()) == (1, 0)
        assert timers.take(10).count == 0

    def test_nothing_due_takes_nothing(self, twin: Twin) -> None:
        timers = twin.timers
        empty = timers.take(10)
        assert (empty.wakes, empty.count) == ([], 0)
        assert timers.done(empty, []) == 0
        timers.park(wake("j"), 5.0)
        assert timers.take(10).count == 0
        assert timers.count() == 1

    def test_parking_again_moves_the_due_time(self, twin: Twin) -> None:
        """One entry per wake-up (step, job, version, producer): parking it again replaces
        its due time, earlier or later; another version is another entry."""
        timers = twin.timers
        timers.park(wake("j"), -1.0)
        timers.park(wake("j"), 300.0)
        assert (timers.count(), timers.overdue()) == (1, 0)
        assert timers.take(10).wakes == []
        timers.park(wake("j"), -1.0)
        timers.park(wake("j", version=4), -1.0)
        assert [(p.job_id, p.version) for p in timers.take(10).wakes] == [("j", 3), ("j", 4)]

    def test_the_limit_takes_the_oldest(self, twin: Twin) -> None:
        timers = twin.timers
        for i in (3, 0, 4, 1, 2):
            timers.park(wake(f"j{i}"), -10.0 + i)
        first = timers.take(3)
        assert (ids(first.wakes), first.count) == (["j0", "j1", "j2"], 3)
        rest = timers.take(100)
        assert (ids(rest.wakes), rest.count) == (["j3", "j4"], 2)
        assert timers.overdue() == 0

    def test_a_taker_that_never_confirms_loses_nothing(self, twin: Twin) -> None:
        """The crash window: taken, then the process died before sending. Due again after the
        lease; the dead taker's late confirmation then removes nothing."""
        timers = twin.timers
        timers.park(wake("j"), -1.0)
        before = twin.now()
        first = timers.take(10, lease=0.3)
        after = twin.now()
        assert ids(first.wakes) == ["j"]
        assert timers.take(10, lease=0.3).wakes == []
        time.sleep(0.4)
        assert timers.overdue() == 1
        again = timers.take(10, lease=60)
        assert ids(again.wakes) == ["j"]
        assert before + 0.3 <= again.wakes[0].due <= after + 0.3  # due when the lease ended
        assert timers.done(first, first.wakes) == 0  # its lease is over: not its to drop
        assert timers.count() == 1
        assert timers.done(again, again.wakes) == 1
        assert timers.count() == 0

    def test_confirming_keeps_a_wake_up_parked_again_meanwhile(self, twin: Twin) -> None:
        """The message ran and parked the same step again (a token wait) before the
        confirmation: the new parking stays."""
        timers = twin.timers
        timers.park(wake("j"), -1.0)
        timers.park(wake("k"), -1.0)
        taken = timers.take(10)
        timers.park(wake("j"), 5.0)  # same member, a new due time
        assert timers.done(taken, taken.wakes) == 1  # k only
        assert (timers.count(), timers.overdue()) == (1, 0)

    def test_released_wake_ups_are_due_at_their_own_time(self, twin: Twin) -> None:
        """Given back (unsent), a wake-up is due again at once, with its own due time, not
        the lease's end; one confirmed meanwhile is not brought back."""
        timers = twin.timers
        timers.park(wake("a"), -2.0)
        timers.park(wake("b"), -1.0)
        taken = timers.take(10)
        a, b = taken.wakes
        assert timers.done(taken, [a]) == 1
        timers.release([a, b])
        assert (timers.count(), timers.overdue()) == (1, 1)
        back = timers.take(10)
        assert back.wakes == [b]  # its due time (part of the value) unchanged

    def test_concurrent_takers_never_share_a_member(self, twin: Twin) -> None:
        """Takers in threads (each with its own connection on Redis) get each member once."""
        timers = twin.timers
        names = [f"job-{i}" for i in range(600)]
        for i, name in enumerate(names):
            timers.park(wake(name), -1.0 - i % 50)
        taken: list[list[str]] = [[] for _ in range(6)]
        start = threading.Barrier(6)

        def take(slot: int) -> None:
            start.wait()
            for _ in range(len(names)):  # bounded: a taker that never leases would spin
                batch = timers.take(7).wakes
                if not batch:
                    return
                taken[slot].extend(ids(batch))

        threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        everything = [name for part in taken for name in part]
        assert sorted(everything) == sorted(names)  # each exactly once
        assert timers.overdue() == 0


class TestDispatcher:
    def test_it_sends_each_due_wake_up_once_and_gives_back_what_it_could_not_send(
        self, twin: Twin
    ) -> None:
        timers = twin.timers
        for i in range(10):
            timers.park(wake(f"j{i}"), -20.0 + i)
        timers.park(wake("later"), 300.0)
        sent: list[str] = []
        failed: list[str] = []

        def send(p: Parked) -> None:
            if p.job_id == "j4" and not failed:
                failed.append("j4")
                raise ConnectionError("broker down")
            sent.append(p.job_id)

        dispatcher = Dispatcher(timers, send, batch=4)
        with pytest.raises(ConnectionError):
            dispatcher.run_once()
        assert sent == ["j0", "j1", "j2", "j3"]
        assert timers.count() == 7  # j4 and the rest, back at their own due times; later
        assert timers.overdue() == 6
        assert dispatcher.run_once() == 6
        assert sent == [f"j{i}" for i in range(10)]
        assert dispatcher.sent == 10
        assert (timers.count(), timers.overdue()) == (1, 0)
        assert dispatcher.run_once() == 0

    def test_the_dispatcher_thread_ticks_and_stops(self, twin: Twin) -> None:
        timers = twin.timers
        sent: list[str] = []
        dispatcher = Dispatcher(timers, lambda p: sent.append(p.job_id), tick=0.05)
        dispatcher.start()
        try:
            timers.park(wake("soon"), 0.2)
            deadline = time.monotonic() + 5
            while not sent and time.monotonic() < deadline:
                time.sleep(0.02)
            assert sent == ["soon"]
        finally:
            dispatcher.stop()
        assert dispatcher._thread is not None and not dispatcher._thread.is_alive()
        timers.park(wake("after"), -1.0)
        time.sleep(0.2)
        assert sent == ["soon"] and timers.count() == 1  # stopped: nothing more sent
