"""The Redis timer (``P:timers``): parked wake-ups come out once due, each to exactly one taker."""

from __future__ import annotations

import threading

import pytest
import redis

from workers.timers import Dispatcher, Parked, RedisTimers


def parked(job_id: str, due: float, step: str = "poll", version: int = 3) -> Parked:
    return Parked(step, job_id, version, "producer-a", due)


def test_only_what_is_due_comes_out_oldest_first(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    timers.park(parked("late", 300.0))
    timers.park(parked("b", 200.0, step="copy", version=9))
    timers.park(parked("a", 100.0))
    assert timers.pop_due(50.0, 10) == []
    assert timers.overdue(250.0) == 2
    got = timers.pop_due(250.0, 10)
    assert [(p.step, p.job_id, p.version, p.producer) for p in got] == [
        ("poll", "a", 3, "producer-a"),
        ("copy", "b", 9, "producer-a"),
    ]
    assert timers.pop_due(250.0, 10) == []  # taken: gone
    assert timers.count() == 1
    assert redis_client.zscore(f"{redis_prefix}:timers", parked("late", 0).member()) == 300.0


def test_limit_and_unreadable_members(redis_client: redis.Redis, redis_prefix: str) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    for i in range(5):
        timers.park(parked(f"j{i}", float(i)))
    redis_client.zadd(f"{redis_prefix}:timers", {"not json": 0.5})
    first = timers.pop_due(10.0, 3)  # j0, the unreadable one (dropped, logged), j1
    assert [p.job_id for p in first] == ["j0", "j1"]
    assert [p.job_id for p in timers.pop_due(10.0, 100)] == ["j2", "j3", "j4"]
    assert timers.count() == 0


def test_concurrent_takers_never_share_a_member(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    ids = [f"job-{i}" for i in range(3000)]
    for i, job_id in enumerate(ids):
        timers.park(parked(job_id, float(i % 50)))
    taken: list[list[str]] = [[] for _ in range(6)]

    def take(slot: int) -> None:  # redis-py hands each thread its own pooled connection
        while batch := timers.pop_due(100.0, 37):
            taken[slot].extend(p.job_id for p in batch)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [job_id for part in taken for job_id in part]
    assert sorted(everything) == sorted(ids)  # each exactly once
    assert sum(1 for part in taken if part) > 1  # they really competed


def test_a_dispatcher_sends_each_due_wake_up_once_and_parks_back_what_it_could_not_send(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    for i in range(10):
        timers.park(parked(f"j{i}", 1.0 + i))
    sent: list[str] = []

    def send(p: Parked) -> None:
        if p.job_id == "j4" and "j4" not in failed:
            failed.append("j4")
            raise ConnectionError("broker down")
        sent.append(p.job_id)

    failed: list[str] = []
    dispatcher = Dispatcher(timers, send, batch=4, clock=lambda: 100.0)
    with pytest.raises(ConnectionError):
        dispatcher.run_once()
    assert sent == ["j0", "j1", "j2", "j3"]
    assert timers.count() == 6  # j4 and the rest of its batch went back, with their due times
    assert dispatcher.run_once() == 6
    assert sent == [f"j{i}" for i in range(10)]
    assert timers.count() == 0
