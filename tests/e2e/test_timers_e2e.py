"""Waits parked in the Redis timer (workers/timers.py) instead of held countdown messages.

Trap (../shared/docs/celery-pitfalls.md 1.3): a SIGKILLed worker takes the countdown messages it
holds with it, and Redis gives them back only after ``visibility_timeout`` (300 s here). No beat
runs in these tests, so no watchdog hides that: the parked poll survives the kill and the next
worker sends it on time, while the held countdown (the same job with ``COUNTDOWN_MAX_SECONDS``
above the poll interval) stays stranded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from devstack import RedisServer, Worker
from workers.producer import AnimateQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TIMERS = "animate-queue:timers"
POLL = 3.0  # every poll interval, seconds
LEASE = (
    60.0  # workers.adapters.redis.timers.LEASE_SECONDS: a taken wake-up is re-scored this far ahead
)


@pytest.fixture
def timer_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def env_for(
    worker_env: dict[str, str], server: RedisServer, countdown_max: float
) -> dict[str, str]:
    return {
        **worker_env,
        "REDIS_URL": server.url,
        "POLL_FIRST_SECONDS": str(POLL),
        "POLL_RUNNING_SECONDS": str(POLL),
        "POLL_PENDING_SECONDS": str(POLL),
        "POLL_PENDING_MAX_SECONDS": str(POLL),
        "COUNTDOWN_MAX_SECONDS": str(countdown_max),
        "TIMER_TICK_SECONDS": "0.2",
        "VISIBILITY_TIMEOUT": "300",
    }


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def parked_polls(r: redis.Redis, job_id: str) -> list[tuple[list[Any], float]]:
    members = r.zrange(TIMERS, 0, -1, withscores=True)
    found = [(json.loads(m), score) for m, score in members]
    return [(m, s) for m, s in found if m[1] == job_id and m[0] == "poll"]


def test_a_job_polls_through_the_timer_and_no_worker_holds_its_polls(
    worker_env: dict[str, str], timer_redis: RedisServer, remote: Any, job_id: str
) -> None:
    remote.config(generation_seconds=7)
    r = redis.Redis.from_url(timer_redis.url)
    q = AnimateQueue(timer_redis.url)
    w = Worker(env_for(worker_env, timer_redis, 0), concurrency=2, name=f"t-{job_id}@%h")
    try:
        w.start()
        q.submit(remote.image(), remote.template(), job_id=job_id)
        versions: set[int] = set()
        deadline = time.monotonic() + 60
        while (view := q.get(job_id)) is None or view["state"] not in ("STORED", "FAILED"):
            assert time.monotonic() < deadline, view
            parked = parked_polls(r, job_id)
            if parked and view is not None and view["state"] == "SUBMITTED":
                [(member, due)] = parked
                version = r.hget(f"animate-queue:job:{job_id}", "version")
                assert version is not None and member[2] == int(version)  # the fencing token
                ahead = due - time.time()
                if LEASE - 1.0 <= ahead <= LEASE + 0.5:
                    # on a dispatcher's 60 s lease: taken and being sent (its message may be
                    # running already, until the entry is confirmed): not a held countdown
                    time.sleep(0.05)
                    continue
                assert -1.0 < ahead <= POLL + 0.5, ahead  # due soon (or just now)
                if ahead > 0.5:  # (not about to be taken and sent while we look)
                    # nothing held in a worker: kombu's unacked hash has no poll of this job
                    # (the submit that parked it may still be finishing: not a poll)
                    held = [json.dumps(json.loads(v)) for v in r.hvals("unacked")]
                    polls = [h for h in held if job_id in h and '"animate.poll"' in h]
                    assert not polls, polls
                versions.add(member[2])
            time.sleep(0.1)
        assert view["state"] == "STORED", view
        assert len(versions) >= 2  # two polls (at least) each parked in the timer
        assert view["attempts"]["polls"] >= 2
        assert remote.counters()["submitted"] == 1
        assert r.zcard(TIMERS) == 0
        # devstack's Redis runs with REDIS_TUNING, as docker-compose's does: the record, signed
        # video URL and all, stays in the compact encoding (bench/inflight.py: 0.8 KB, not 1.9)
        assert r.object("encoding", f"animate-queue:job:{job_id}") == b"listpack"
    finally:
        w.kill()
        q.close()


@pytest.mark.parametrize("mode", ["parked", "held"])
def test_sigkill_strands_a_held_countdown_but_not_a_parked_poll(
    worker_env: dict[str, str], timer_redis: RedisServer, remote: Any, job_id: str, mode: str
) -> None:
    remote.config(generation_seconds=4)
    env = env_for(worker_env, timer_redis, 0 if mode == "parked" else 60)
    r = redis.Redis.from_url(timer_redis.url)
    first = Worker(env, concurrency=2, name=f"victim-{job_id}@%h").start()
    second: Worker | None = None
    q = AnimateQueue(timer_redis.url)
    try:
        q.submit(remote.image(), remote.template(), job_id=job_id)
        wait_for(lambda: (q.get(job_id) or {}).get("state") == "SUBMITTED", 30, "SUBMITTED")
        if mode == "parked":
            wait_for(lambda: parked_polls(r, job_id), 10, "the parked poll")
        else:
            wait_for(lambda: r.hlen("unacked") > 0, 10, "the held countdown")
        first.kill()
        killed = time.monotonic()
        second = Worker(env, concurrency=2, name=f"fresh-{job_id}@%h").start()
        if mode == "parked":
            view = q.wait(job_id, timeout=60)
            assert view["state"] == "STORED", view
            assert time.monotonic() - killed < 30  # on time, not after the 300 s timeout
            assert remote.counters()["submitted"] == 1
        else:
            # The held poll went down with the worker: nothing moves the job until Redis
            # restores the message after VISIBILITY_TIMEOUT (or the watchdog resumes it).
            time.sleep(4 * POLL)
            view = q.get(job_id)
            assert view is not None and view["state"] == "SUBMITTED", view
            assert r.hlen("unacked") > 0  # stranded there
    finally:
        q.close()
        first.kill()
        if second is not None:
            second.kill()
