"""The Redis governor: shared token buckets with 429 feedback, and the admission queue's order."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from workers.adapters.redis.governor import RedisGovernor
from workers.adapters.redis.store import RedisJobStore
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import JobState

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL)
    try:
        c.ping()
    except redis.RedisError:
        pytest.skip("no Redis at REDIS_URL")
    yield c
    c.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    p = f"test-gov-{uuid.uuid4().hex[:8]}"
    yield p
    for key in client.scan_iter(f"{p}:*"):
        client.delete(key)


def governor(client: redis.Redis, prefix: str, capacity: int = 2, **rates: float) -> RedisGovernor:
    return RedisGovernor(
        client,
        prefix=prefix,
        model="animate-anyone-gen2",
        rates={"submit": 1.0, "query": 10.0, "detect": 4.0, **rates},
        capacity=capacity,
    )


def make_job(store: RedisJobStore, name: str, priority: int = 0, producer: str = "p") -> Job:
    now = time.time()
    request = JobRequest("https://x/a.png", "AACT.t", priority=priority, producer=producer)
    job = Job(name, JobState.QUEUED, 1, request, now, now)
    store.create(job)
    return job


class TestBuckets:
    def test_burst_then_rate(self, client: redis.Redis, prefix: str) -> None:
        """A bucket of rate 10 grants 10 at once, then asks the 11th to wait about 0.1 s."""
        g = governor(client, prefix)
        assert [g.take("a", "query") for _ in range(10)] == [0.0] * 10
        wait = g.take("a", "query")
        assert 0.05 < wait <= 0.1

    def test_shared_across_clients(self, client: redis.Redis, prefix: str) -> None:
        """Threads with their own connections (as separate processes would) share one bucket."""
        granted: list[float] = []
        lock = threading.Lock()

        def hammer() -> None:
            own = governor(redis.Redis.from_url(REDIS_URL), prefix)
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                if own.take("a", "query") == 0:
                    with lock:
                        granted.append(time.monotonic())
                time.sleep(0.005)

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # 10 at once, then 10/s for about a second, whatever the number of takers.
        assert 15 <= len(granted) <= 22

    def test_429_halves_the_rate(self, client: redis.Redis, prefix: str) -> None:
        """After a 429 the bucket is empty and refills at half speed; the 429 is counted."""
        g = governor(client, prefix, submit=2.0)
        g.throttled("a", "submit")
        wait = g.take("a", "submit")
        assert 0.9 < wait <= 1.0  # one token at 2/s x 0.5
        view = g.account_view("a")
        assert view["buckets"]["submit"]["throttled_429"] == 1
        assert view["buckets"]["submit"]["rate"] < 2.0

    def test_buckets_are_per_account(self, client: redis.Redis, prefix: str) -> None:
        """Another account has its own tokens."""
        g = governor(client, prefix)
        assert g.take("a", "submit") == 0
        assert g.take("a", "submit") > 0
        assert g.take("b", "submit") == 0


class TestAdmission:
    def test_priority_then_producers_in_turn(self, client: redis.Redis, prefix: str) -> None:
        """Highest priority first; within it producers alternate; within a producer, arrival."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=100)
        plan = [("x1", 0, "x"), ("x2", 0, "x"), ("x3", 0, "x"), ("y1", 0, "y"), ("y2", 0, "y"),
                ("h1", 5, "x"), ("l1", -1, "z")]  # fmt: skip
        for name, prio, producer in plan:
            g.enqueue(make_job(store, name, prio, producer))
        assert g.account_view("default")["queued"] == 7
        assert g.admit("default") == ["h1", "x1", "y1", "x2", "y2", "x3", "l1"]
        assert g.account_view("default")["queued"] == 0

    def test_capacity_and_release(self, client: redis.Redis, prefix: str) -> None:
        """Only `capacity` jobs are admitted; a release lets the next one in."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=2)
        for i in range(4):
            g.enqueue(make_job(store, f"j{i}"))
        assert g.admit("default") == ["j0", "j1"]
        assert g.admit("default") == []
        g.release("default", "j0")
        assert g.admit("default") == ["j2"]

    def test_ensure_queued_puts_back_only_a_missing_job(
        self, client: redis.Redis, prefix: str
    ) -> None:
        """The watchdog's recheck of a QUEUED job: present in its line, or holding a slot, it
        is left alone; missing (a crash between the move and the enqueue), it is put back."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=1)
        a, b = make_job(store, "a"), make_job(store, "b")
        g.enqueue(a)
        g.enqueue(b)
        assert g.admit("default") == ["a"]  # a holds the slot, b waits in line
        assert not g.ensure_queued(a) and not g.ensure_queued(b)
        assert g.dequeue(b)
        assert g.ensure_queued(b)  # missing: put back
        assert not g.ensure_queued(b)
        assert g.account_view("default")["queued"] == 1
        g.release("default", "a")
        assert g.admit("default") == ["b"]

    def test_templates_queue_in_their_own_lane(self, client: redis.Redis, prefix: str) -> None:
        """DashScope runs one template and one video at a time per account: a template job never
        waits behind the account's videos, and the lanes' buckets and views stay apart."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=1)
        g.enqueue(make_job(store, "v0"))
        g.enqueue(make_job(store, "v1"))
        template = dataclasses.replace(make_job(store, "t0"), kind="template")
        store.redis.hset(store.key("t0"), "kind", "template")
        g.enqueue(template)
        assert g.admit("default") == ["v0"]
        assert g.admit("default:template") == ["t0"]
        assert g.inflight("default:template") == ["t0"]
        assert g.accounts() == ["default"]  # lanes are not accounts
        view = g.account_view("default")
        assert view["queued"] == 1 and view["templates"] == {"queued": 0, "inflight": 1}
        assert g.take("default", "template") == 0  # its own bucket: the video submit is untouched
        assert g.take("default", "submit") == 0
        admitted = store.get("t0")  # the admission moved its record on (admitted_at, version)
        assert admitted is not None and admitted.admitted_at is not None
        assert admitted.version == template.version + 1 and admitted.wake == "sent"
        store.transition(admitted, JobState.READY)
        assert g.admit("default:template") == []  # a READY template leaves the slot
        assert g.inflight("default:template") == []

    def test_finished_jobs_do_not_leak_capacity(self, client: redis.Redis, prefix: str) -> None:
        """A member whose job ended without a release is dropped at the next admission."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=1)
        first = make_job(store, "j0")
        g.enqueue(first)
        g.enqueue(make_job(store, "j1"))
        assert g.admit("default") == ["j0"]
        loaded = store.get("j0")
        assert loaded is not None
        store.transition(loaded, JobState.CANCELED)
        assert g.admit("default") == ["j1"]

    def test_healing_runs_at_most_once_a_second(self, client: redis.Redis, prefix: str) -> None:
        """A busy full lane does not re-read its members on every admission."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=1)
        jobs = [make_job(store, f"h{i}") for i in range(3)]
        for job in jobs:
            g.enqueue(job)
        assert g.admit("default") == ["h0"]
        for i, expected in ((0, ["h1"]), (1, [])):
            loaded = store.get(f"h{i}")
            assert loaded is not None
            store.transition(loaded, JobState.CANCELED)  # ended without a release
            assert g.admit("default") == expected
        time.sleep(1.1)
        assert g.admit("default") == ["h2"]

    def test_dequeue(self, client: redis.Redis, prefix: str) -> None:
        """A dequeued job is never admitted, and its producer leaves the rotation."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=10)
        a, b = make_job(store, "a1", producer="a"), make_job(store, "b1", producer="b")
        g.enqueue(a)
        g.enqueue(b)
        assert g.dequeue(a) is True
        assert g.dequeue(a) is False
        assert g.admit("default") == ["b1"]

    def test_cancelled_while_queued_is_skipped(self, client: redis.Redis, prefix: str) -> None:
        """A queued entry whose job was cancelled meanwhile is skipped, not admitted."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=10)
        job = make_job(store, "c1")
        g.enqueue(job)
        store.transition(job, JobState.CANCELED)
        assert g.admit("default") == []
