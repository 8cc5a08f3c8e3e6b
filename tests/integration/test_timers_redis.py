"""The Redis timer's own side (``P:timers``): one sorted set scored on Redis's clock, the lease
as Redis formats its score, entries that are not ours, and takers on separate connections.

The behaviour both timers promise (due order, leases, confirmation, give-back, the Dispatcher)
is the contract suite's, tests/integration/test_timers_contract.py."""

from __future__ import annotations

import json
import threading

import redis

from workers.adapters.redis.timers import Parked, RedisTimers


def wake(job_id: str, step: str = "poll", version: int = 3) -> Parked:
    return Parked(step, job_id, version, "producer-a")


def redis_now(client: redis.Redis) -> float:
    secs, micros = client.time()
    return secs + micros / 1e6


def test_the_timer_is_one_sorted_set_on_redis_time(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    """``P:timers``: the JSON ``[step, job_id, version, producer]`` scored with its due time on
    Redis's clock; a taken member is re-scored to the lease's end, whose score (as Redis formats
    it) is the lease."""
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    key = f"{redis_prefix}:timers"
    before = redis_now(redis_client)
    timers.park(wake("late"), 300.0)
    timers.park(wake("j", step="copy", version=9), -1.0)
    after = redis_now(redis_client)
    assert redis_client.zcard(key) == 2
    late = redis_client.zscore(key, json.dumps(["poll", "late", 3, "producer-a"]))
    assert late is not None and before + 300 <= late <= after + 300
    taken = timers.take(10, lease=30)
    assert [p.job_id for p in taken.wakes] == ["j"]
    member = json.dumps(["copy", "j", 9, "producer-a"])
    raw = redis_client.eval("return redis.call('ZSCORE', KEYS[1], ARGV[1])", 1, key, member)
    assert taken.lease == raw.decode()  # the score's text, as Redis formats it
    assert float(taken.lease) >= after + 30


def test_unreadable_members_are_dropped(redis_client: redis.Redis, redis_prefix: str) -> None:
    """A member that is not a parked wake-up is counted in the batch, dropped and logged."""
    timers = RedisTimers(redis_client, prefix=redis_prefix)
    for i in range(3):
        timers.park(wake(f"j{i}"), -10.0 + i)
    redis_client.zadd(f"{redis_prefix}:timers", {"not json": 1.0, '["too", "short"]': 2.0})
    first = timers.take(3)  # the two unreadable ones (due long ago) and j0
    assert first.count == 3
    assert [p.job_id for p in first.wakes] == ["j0"]
    assert [p.job_id for p in timers.take(100).wakes] == ["j1", "j2"]
    assert redis_client.zscore(f"{redis_prefix}:timers", "not json") is None
    assert timers.count() == 3


def test_concurrent_takers_never_share_a_member(
    redis_client: redis.Redis, redis_prefix: str
) -> None:
    """3000 members, six takers on their own pooled connections: each member comes out once."""
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
