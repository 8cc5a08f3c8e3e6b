"""The Governor contract, run on InMemoryGovernor and RedisGovernor alike: token buckets with 429
feedback, the admission order, the lane's slots, and admission's mark on the job's record.

Redis is the real one at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Each test works
under its own ``test-<uuid>`` key prefix and deletes exactly those keys afterwards (never FLUSHDB).
The twin runs on ``time.time``, Redis on its own ``TIME``: the same host's clock, so the tests
compare times with each twin's own "now" and wait real (short) seconds on both.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from workers.adapters.memory.governor import InMemoryGovernor
from workers.adapters.memory.store import InMemoryJobStore
from workers.adapters.redis.governor import RedisGovernor
from workers.adapters.redis.store import RedisJobStore
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import JobState
from workers.domain.templates import template_lane
from workers.ports import Governor

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
MODEL = "animate-anyone-gen2"
RATES = {"submit": 1.0, "query": 10.0, "detect": 4.0}


@dataclass
class Twin:
    """One implementation: a governor builder over a job store, and that side's clock."""

    name: str
    store: InMemoryJobStore | RedisJobStore
    build: Callable[[int, dict[str, float]], Governor]
    now: Callable[[], float]
    forget: Callable[[str], None]  # the job's record vanishes (expired, deleted)

    def governor(self, capacity: int = 2, **rates: float) -> Governor:
        return self.build(capacity, {**RATES, **rates})

    def job(self, name: str, priority: int = 0, producer: str = "p", **changes: Any) -> Job:
        """A QUEUED job, stored."""
        now = self.now()
        request = JobRequest("https://x/a.png", "AACT.t", priority=priority, producer=producer)
        job = Job(name, JobState.QUEUED, 1, request, now, now, **changes)
        stored, created = self.store.create(job)
        assert created
        return stored

    def queued(self, governor: Governor, *names: str, **changes: Any) -> list[Job]:
        jobs = [self.job(name, **changes) for name in names]
        for job in jobs:
            governor.enqueue(job)
        return jobs

    def move(self, job_id: str, state: JobState) -> None:
        loaded = self.store.get(job_id)
        assert loaded is not None
        assert self.store.transition(loaded, state) is not None


@pytest.fixture
def redis_twin(redis_client: redis.Redis) -> Iterator[Twin]:
    prefix = f"test-{uuid.uuid4().hex}"
    store = RedisJobStore(redis_client, prefix=prefix, final_ttl=60)

    def build(capacity: int, rates: dict[str, float]) -> Governor:
        return RedisGovernor(
            redis_client, prefix=prefix, model=MODEL, rates=rates, capacity=capacity
        )

    def now() -> float:
        secs, micros = redis_client.time()
        return secs + micros / 1e6

    def forget(job_id: str) -> None:
        redis_client.delete(store.key(job_id))

    yield Twin("redis", store, build, now, forget)
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        redis_client.delete(*keys)


def memory_twin() -> Twin:
    store = InMemoryJobStore()

    def build(capacity: int, rates: dict[str, float]) -> Governor:
        return InMemoryGovernor(capacity, store, rates=rates, clock=time.time)

    def forget(job_id: str) -> None:
        with store.lock:
            del store.jobs[job_id]

    return Twin("memory", store, build, time.time, forget)


@pytest.fixture(params=["memory", "redis"])
def twin(request: pytest.FixtureRequest) -> Twin:
    if request.param == "memory":
        return memory_twin()
    redis_side: Twin = request.getfixturevalue("redis_twin")
    return redis_side


class TestBuckets:
    def test_a_bucket_grants_its_burst_then_asks_to_wait_one_tokens_time(self, twin: Twin) -> None:
        """Rate 10: ten tokens at once, then the 11th waits about 1/10 s."""
        g = twin.governor()
        assert [g.take("a", "query") for _ in range(10)] == [0.0] * 10
        assert 0.05 < g.take("a", "query") <= 0.1

    def test_the_wait_is_what_it_takes(self, twin: Twin) -> None:
        """A refused take names the seconds until a token is due: after them it is granted, and
        the token is gone again at once (one refill, not a fresh burst)."""
        g = twin.governor(query=5.0)
        assert [g.take("a", "query") for _ in range(5)] == [0.0] * 5
        wait = g.take("a", "query")
        assert 0.1 < wait <= 0.2
        time.sleep(wait + 0.02)
        assert g.take("a", "query") == 0.0
        assert g.take("a", "query") > 0.0

    def test_a_slow_bucket_holds_one_token(self, twin: Twin) -> None:
        """Below one a second, the burst is one token; the next is due after 1/rate s."""
        g = twin.governor(detect=0.5)
        assert g.take("a", "detect") == 0.0
        assert 1.9 < g.take("a", "detect") <= 2.0

    def test_a_429_empties_the_bucket_and_halves_its_rate(self, twin: Twin) -> None:
        """Full at rate 2, a 429 leaves no token and one costs 1 s; a second 429, 2 s."""
        g = twin.governor(submit=2.0)
        g.throttled("a", "submit")
        assert 0.9 < g.take("a", "submit") <= 1.0
        g.throttled("a", "submit")
        assert 1.9 < g.take("a", "submit") <= 2.0

    def test_429s_slow_a_bucket_down_to_a_tenth_of_its_rate(self, twin: Twin) -> None:
        """However many 429s, the rate stays at least a tenth of the configured one."""
        g = twin.governor(query=10.0)
        for _ in range(12):
            g.throttled("a", "query")
        assert 0.9 < g.take("a", "query") <= 1.0

    def test_buckets_are_per_account_and_kind(self, twin: Twin) -> None:
        """Each account, and each kind of an account, has its own tokens; a template submit
        has its own bucket at the submit rate; a 429 slows only its own bucket."""
        g = twin.governor(submit=1.0)
        assert g.take("a", "submit") == 0.0
        assert g.take("a", "submit") > 0.9
        assert g.take("b", "submit") == 0.0
        assert g.take("a", "query") == 0.0
        assert g.take("a", "template") == 0.0
        assert 0.9 < g.take("a", "template") <= 1.0
        g.throttled("a", "detect")
        assert g.take("b", "detect") == 0.0
        assert g.take("a", "detect") > 0.2


class TestAdmission:
    def test_priority_then_producers_in_turn_then_arrival(self, twin: Twin) -> None:
        """Highest priority first; within it producers alternate; within a producer, arrival."""
        g = twin.governor(capacity=100)
        plan = [("x1", 0, "x"), ("x2", 0, "x"), ("x3", 0, "x"), ("y1", 0, "y"), ("y2", 0, "y"),
                ("h1", 5, "x"), ("l1", -1, "z"), ("h2", 5, "y")]  # fmt: skip
        for name, prio, producer in plan:
            g.enqueue(twin.job(name, prio, producer))
        assert g.admit("default") == ["h1", "h2", "x1", "y1", "x2", "y2", "x3", "l1"]
        assert g.admit("default") == []

    def test_a_producer_that_arrives_later_takes_its_turn(self, twin: Twin) -> None:
        """A producer enqueuing while others wait joins the rotation after them."""
        g = twin.governor(capacity=1)
        twin.queued(g, "x1", "x2", producer="x")
        assert g.admit("default") == ["x1"]
        twin.queued(g, "y1", producer="y")
        twin.queued(g, "x3", producer="x")
        admitted = []
        for name in ("x1", "x2", "y1"):
            g.release("default", name)
            admitted += g.admit("default")
        assert admitted == ["x2", "y1", "x3"]

    def test_admission_never_exceeds_capacity_and_a_release_frees_a_slot(self, twin: Twin) -> None:
        """Only ``capacity`` jobs hold or wait for the slot; inflight lists them until each is
        released; a release lets exactly one more in."""
        g = twin.governor(capacity=2)
        twin.queued(g, "j0", "j1", "j2", "j3")
        assert g.inflight("default") == []
        assert g.admit("default") == ["j0", "j1"]
        assert g.admit("default") == []
        assert g.inflight("default") == ["j0", "j1"]
        g.release("default", "j0")
        g.release("default", "not-admitted")  # harmless
        assert g.inflight("default") == ["j1"]
        assert g.admit("default") == ["j2"]
        assert g.admit("default") == []
        assert g.inflight("default") == ["j1", "j2"]

    def test_admit_marks_the_job_admitted_on_its_record(self, twin: Twin) -> None:
        """In the same step as the slot: admitted_at (now), due now, its submit message
        outstanding (wake "sent"), the resume count cleared, the version bumped, still QUEUED."""
        g = twin.governor(capacity=1)
        (job,) = twin.queued(g, "a", resumes=2, next_action_at=twin.now() + 600)
        before = twin.now()
        assert g.admit("default") == ["a"]
        after = twin.now()
        got = twin.store.get("a")
        assert got is not None
        assert got.admitted_at is not None and before - 0.01 <= got.admitted_at <= after + 0.01
        assert got.next_action_at == got.admitted_at == got.updated_at
        assert (got.state, got.version, got.wake, got.resumes) == (
            JobState.QUEUED,
            job.version + 1,
            "sent",
            0,
        )
        assert twin.store.due(after + 0.01) == ["a"]  # due now, no longer in ten minutes
        assert twin.store.transition(job, JobState.SUBMITTING) is None  # the old version lost

    def test_only_jobs_still_queued_are_admitted(self, twin: Twin) -> None:
        """An entry whose job was cancelled meanwhile, or whose record is gone, is dropped,
        not admitted, and takes no slot."""
        g = twin.governor(capacity=1)
        cancelled, ghost, _ = twin.queued(g, "c1", "g1", "q1")
        twin.move(cancelled.job_id, JobState.CANCELED)
        twin.forget(ghost.job_id)
        assert g.admit("default") == ["q1"]
        assert g.inflight("default") == ["q1"]
        g.release("default", "q1")
        assert g.admit("default") == []  # dropped for good
        canceled = twin.store.get("c1")
        assert canceled is not None and canceled.admitted_at is None

    def test_dequeue(self, twin: Twin) -> None:
        """A dequeued job is never admitted (True once, then False); an admitted one is not in
        the queue; a producer whose line empties leaves the rotation and comes back later."""
        g = twin.governor(capacity=10)
        a1, a2 = twin.queued(g, "a1", "a2", producer="a")
        (b1,) = twin.queued(g, "b1", producer="b")
        assert g.dequeue(a1) is True
        assert g.dequeue(a1) is False
        assert g.dequeue(a2) is True
        assert g.admit("default") == ["b1"]
        assert g.dequeue(b1) is False  # admitted: in a slot, not in the queue
        twin.queued(g, "a3", producer="a")
        assert g.admit("default") == ["a3"]

    def test_ensure_queued_puts_back_only_a_missing_job(self, twin: Twin) -> None:
        """The watchdog's recheck of a QUEUED job: present in its line, or holding a slot, it
        is left alone (False); missing, it is put back (True), once."""
        g = twin.governor(capacity=1)
        a, b = twin.queued(g, "a", "b")
        assert g.admit("default") == ["a"]  # a holds the slot, b waits in line
        assert g.ensure_queued(a) is False
        assert g.ensure_queued(b) is False
        assert g.dequeue(b)
        assert g.ensure_queued(b) is True  # missing: put back
        assert g.ensure_queued(b) is False
        c = twin.job("c")
        assert g.ensure_queued(c) is True  # never enqueued: queued now, behind b
        g.release("default", "a")
        assert g.admit("default") == ["b"]  # once: a second entry would come out again
        g.release("default", "b")
        assert g.admit("default") == ["c"]
        g.release("default", "c")
        assert g.admit("default") == []

    def test_lanes_have_their_own_queue_and_slots(self, twin: Twin) -> None:
        """A template job queues in its account's template lane: it never waits behind the
        account's videos, and each lane has its own slots and inflight list."""
        g = twin.governor(capacity=1)
        twin.queued(g, "v0", "v1")
        (t0,) = twin.queued(g, "t0", kind="template")
        assert t0.lane == template_lane("default") != "default"
        assert g.admit("default") == ["v0"]
        assert g.admit(t0.lane) == ["t0"]
        assert g.inflight("default") == ["v0"]
        assert g.inflight(t0.lane) == ["t0"]
        g.release(t0.lane, "v0")  # another lane's job: nothing freed here
        assert g.admit("default") == []
        assert g.admit("other") == []

    def test_a_job_that_moved_past_the_slot_does_not_leak_it(self, twin: Twin) -> None:
        """A full lane drops members whose job ended, is copying or vanished without a
        release; one still submitted keeps its slot."""
        g = twin.governor(capacity=4)
        twin.queued(g, "q0", "q1", "q2", "q3", "q4", "q5", "q6", "q7")
        assert g.admit("default") == ["q0", "q1", "q2", "q3"]
        twin.move("q0", JobState.CANCELED)
        twin.move("q1", JobState.COPYING)
        twin.forget("q2")
        twin.move("q3", JobState.SUBMITTED)
        assert g.admit("default") == ["q4", "q5", "q6"]
        assert g.inflight("default") == ["q3", "q4", "q5", "q6"]


class TestSpend:
    def test_a_days_bills_add_up_per_account_and_day_once_per_job(self, twin: Twin) -> None:
        """The daily budget's count: bills add up per account and UTC day, each job's once
        (a poll retried after its bill was counted does not count it again); other accounts
        and days start at 0."""
        g = twin.governor()
        assert g.spent("a", "2026-12-06") == 0.0
        assert g.add_spend("a", "2026-12-06", 0.4, "j1") == pytest.approx(0.4)
        assert g.add_spend("a", "2026-12-06", 0.25, "j2") == pytest.approx(0.65)
        assert g.add_spend("a", "2026-12-06", 0.4, "j1") == pytest.approx(0.65)  # again: once
        assert g.spent("a", "2026-12-06") == pytest.approx(0.65)
        assert g.spent("b", "2026-12-06") == 0.0 and g.spent("a", "2026-12-07") == 0.0

    def test_a_days_bills_by_account_and_model(self, twin: Twin) -> None:
        g = twin.governor()
        g.add_spend("a", "2026-12-06", 0.4, "j1", "animate-anyone-gen2")
        g.add_spend("a", "2026-12-06", 1.2, "j2", "wan2.2-animate-move")
        g.add_spend("a", "2026-12-06", 1.2, "j2", "wan2.2-animate-move")  # once
        g.add_spend("b", "2026-12-06", 0.6, "j3", "wan2.2-animate-move")
        assert g.spent_by_model("2026-12-06") == pytest.approx({
            ("a", "animate-anyone-gen2"): 0.4, ("a", "wan2.2-animate-move"): 1.2,
            ("b", "wan2.2-animate-move"): 0.6,
        })  # fmt: skip
        assert g.spent_by_model("2026-12-07") == {}
