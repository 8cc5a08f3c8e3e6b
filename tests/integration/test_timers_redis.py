"""The Redis timer (``P:timers``): parked wake-ups come out once due, each to one taker at a time,
on a lease, so a taker that dies before sending loses nothing."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from workers.adapters.redis.timers import Dispatcher, Parked, RedisTimers


def wake(job_id: str, step: str = "poll", version: int = 3) -> Parked:
    return Parked(step, job_id, version, "producer-a")


def test_only_what_is_due_comes_out_oldest_first(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    timers.park(wake("late"), 300.0)
    timers.park(wake("b", step="copy", version=9), -1.0)
    timers.park(wake("a"), -2.0)
    assert timers.overdue() == 2
    taken = timers.take(10)
    assert [(p.step, p.job_id, p.version, p.producer) for p in taken.wakes] == [
        ("poll", "a", 3, "producer-a"),
        ("copy", "b", 9, "producer-a"),
    ]
    secs, micros = redis_client.time()
    now = secs + micros / 1e6
    assert now - 3 < taken.wakes[0].due < taken.wakes[1].due <= now  # their own due times
    assert timers.take(10).wakes == []  # leased: nobody else gets them
    assert timers.done(taken, taken.wakes) == 2
    assert timers.count() == 1
    late = redis_client.zscore(f"{redis_prefix}:timers", wake("late").member())
    assert late is not None and late > now + 290


def test_a_taker_that_never_confirms_loses_nothing(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The crash window: taken, then the process died before sending. Due again after the lease."""
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    timers.park(wake("j"), -1.0)
    first = timers.take(10, lease=0.3)
    assert [p.job_id for p in first.wakes] == ["j"]
    assert timers.take(10, lease=0.3).wakes == []
    time.sleep(0.4)
    again = timers.take(10, lease=60)
    assert [p.job_id for p in again.wakes] == ["j"]
    assert timers.done(first, first.wakes) == 0  # the dead taker's lease is over: not its to drop
    assert timers.count() == 1
    assert timers.done(again, again.wakes) == 1
    assert timers.count() == 0


def test_confirming_keeps_a_wake_up_parked_again_meanwhile(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    """The message ran and parked the same step again (a token wait) before the confirmation."""
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    timers.park(wake("j"), -1.0)
    taken = timers.take(10)
    timers.park(wake("j"), 5.0)  # same member, a new due time
    assert timers.done(taken, taken.wakes) == 0
    assert timers.count() == 1


def test_limit_and_unreadable_members(redis_client: redis.Redis, redis_prefix: str) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    for i in range(5):
        timers.park(wake(f"j{i}"), -10.0 + i)
    redis_client.zadd(f"{redis_prefix}:timers", {"not json": 1.0})  # due long ago
    first = timers.take(3)  # the unreadable one (dropped, logged), j0, j1
    assert first.count == 3
    assert [p.job_id for p in first.wakes] == ["j0", "j1"]
    assert [p.job_id for p in timers.take(100).wakes] == ["j2", "j3", "j4"]
    assert redis_client.zscore(f"{redis_prefix}:timers", "not json") is None


def test_concurrent_takers_never_share_a_member(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    ids = [f"job-{i}" for i in range(3000)]
    pipe = redis_client.pipeline(transaction=False)
    for i, job_id in enumerate(ids):
        pipe.zadd(f"{redis_prefix}:timers", {wake(job_id).member(): float(i % 50)})
    pipe.execute()
    taken: list[list[str]] = [[] for _ in range(6)]

    def take(slot: int) -> None:  # redis-py hands each thread its own pooled connection
        while batch := timers.take(37).wakes:
            taken[slot].extend(p.job_id for p in batch)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [job_id for part in taken for job_id in part]
    assert sorted(everything) == sorted(ids)  # each exactly once
    assert sum(1 for part in taken if part) > 1  # they really competed


def test_a_dispatcher_sends_each_due_wake_up_once_and_gives_back_what_it_could_not_send(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    for i in range(10):
        timers.park(wake(f"j{i}"), -20.0 + i)
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
    assert timers.count() == 6  # j4 and the rest of its batch, back at their own due times
    assert timers.overdue() == 6
    assert dispatcher.run_once() == 6
    assert sent == [f"j{i}" for i in range(10)]
    assert timers.count() == 0


def test_the_dispatcher_thread_ticks_and_stops(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
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
