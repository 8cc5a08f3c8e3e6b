"""The Redis governor's own side: buckets shared by every client and kept per model, the 429
counters and views, the queue-depth counter, and the bounded healing of a full lane.

The behaviour both governors promise (tokens, order, slots, admission's mark) is the contract
suite's, tests/integration/test_governor_contract.py."""

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

    def test_submit_buckets_are_per_model(self, client: redis.Redis, prefix: str) -> None:
        """``P:bucket:A:submit:<model>``: another model's submits have their own tokens; the
        account's other kinds are shared."""
        g = governor(client, prefix)
        other = RedisGovernor(client, prefix=prefix, model="other-model",
                              rates={"submit": 1.0, "query": 1.0}, capacity=1)  # fmt: skip
        assert g.take("a", "submit") == 0 and g.take("a", "submit") > 0
        assert other.take("a", "submit") == 0
        assert client.exists(f"{prefix}:bucket:a:submit:animate-anyone-gen2")
        assert client.exists(f"{prefix}:bucket:a:submit:other-model")
        assert [g.take("a", "query") for _ in range(10)] == [0.0] * 10
        assert other.take("a", "query") > 0  # the same bucket, emptied by g
        assert client.exists(f"{prefix}:bucket:a:query")

    def test_an_idle_bucket_expires_after_a_day_renewed_hourly(
        self, client: redis.Redis, prefix: str
    ) -> None:
        """A bucket nobody takes from is gone a day later; its expiry is renewed when a take
        falls in another hour than the last one, not on every take (one command fewer each)."""
        g = governor(client, prefix)
        key = f"{prefix}:bucket:a:query"
        g.take("a", "query")
        assert 86_000 < client.ttl(key) <= 86_400
        client.expire(key, 500)
        g.take("a", "query")  # the same hour: the expiry stands
        assert client.ttl(key) <= 500
        client.hset(key, "ts", str(time.time() - 3 * 3600))  # its last take, hours ago
        g.take("a", "query")
        assert 86_000 < client.ttl(key) <= 86_400

    def test_a_429_is_counted_and_shown(self, client: redis.Redis, prefix: str) -> None:
        """The account view counts the 429s and shows the bucket's lowered rate."""
        g = governor(client, prefix, submit=2.0)
        g.throttled("a", "submit")
        g.throttled("a", "submit")
        view = g.account_view("a")
        assert view["buckets"]["submit"]["throttled_429"] == 2
        assert view["buckets"]["submit"]["rate_configured"] == 2.0
        assert 0.5 <= view["buckets"]["submit"]["rate"] < 0.6
        assert view["buckets"]["query"]["throttled_429"] == 0
        assert view["throttled_429"] == 2


class TestAdmission:
    def test_the_depth_counter_follows_the_queue(self, client: redis.Redis, prefix: str) -> None:
        """``P:acct:A:depth`` (the view's ``queued``) counts enqueues, dequeues, the watchdog's
        put-backs and admissions."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=1)
        a, b, c = (make_job(store, name) for name in "abc")
        for job in (a, b, c):
            g.enqueue(job)
        assert g.account_view("default")["queued"] == 3
        assert g.dequeue(c) and not g.dequeue(c)
        assert g.account_view("default")["queued"] == 2
        assert g.admit("default") == ["a"]
        assert not g.ensure_queued(a) and not g.ensure_queued(b)
        assert g.account_view("default")["queued"] == 1
        assert g.ensure_queued(c)
        view = g.account_view("default")
        assert (view["queued"], view["inflight"], view["capacity"]) == (2, 1, 1)

    def test_lanes_are_not_accounts(self, client: redis.Redis, prefix: str) -> None:
        """A template lane ``A:template`` is listed under its account, and the account view
        shows its queue and slots apart from the videos'."""
        store = RedisJobStore(client, prefix=prefix, final_ttl=60)
        g = governor(client, prefix, capacity=1)
        g.enqueue(make_job(store, "v0"))
        g.enqueue(make_job(store, "v1"))
        template = dataclasses.replace(make_job(store, "t0"), kind="template")
        store.redis.hset(store.key("t0"), "kind", "template")
        g.enqueue(template)
        assert g.admit("default") == ["v0"]
        assert g.admit("default:template") == ["t0"]
        assert g.accounts() == ["default"]  # lanes are not accounts
        view = g.account_view("default")
        assert view["queued"] == 1 and view["inflight"] == 1
        assert view["templates"] == {"queued": 0, "inflight": 1}

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
