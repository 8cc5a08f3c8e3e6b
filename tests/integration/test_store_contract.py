"""The JobStore contract, run on InMemoryJobStore and RedisJobStore alike, plus Redis's indexes.

Redis is the real one at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Each test works
under its own ``test-<uuid>`` key prefix and deletes exactly those keys afterwards (never FLUSHDB).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from workers.adapters.memory.store import InMemoryJobStore
from workers.adapters.redis.store import RedisJobStore
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import FINAL_STATES, JobState
from workers.domain.templates import Detection, TemplateSource
from workers.ports import JobStore

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
FINAL_TTL = 3600
T0 = 1_700_000_000.123456789  # more digits than a float keeps: what survives must be exact
IMAGE = "https://img.test/person.png"
TEMPLATE = "AACT.acct.1234-5678"


@pytest.fixture
def redis_store(redis_client: redis.Redis) -> Iterator[RedisJobStore]:
    prefix = f"test-{uuid.uuid4().hex}"
    yield RedisJobStore(redis_client, prefix=prefix, final_ttl=FINAL_TTL)
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> JobStore:
    if request.param == "memory":
        return InMemoryJobStore()
    store: RedisJobStore = request.getfixturevalue("redis_store")
    return store


def new_job(job_id: str = "job-1", **changes: Any) -> Job:
    job = Job(
        job_id=job_id,
        state=JobState.QUEUED,
        version=1,
        request=JobRequest(IMAGE, TEMPLATE, job_id=job_id),
        created_at=T0,
        updated_at=T0,
        next_action_at=T0,
    )
    return dataclasses.replace(job, **changes)


def full_job(job_id: str = "full-1") -> Job:
    """A job with every field set to a value of its own type (none left at None)."""
    metadata = {"user": {"id": 7, "tags": ["a", "ü"]}, "ok": True, "none": None, "f": 0.1}
    job = Job(
        job_id=job_id,
        state=JobState.COPYING,
        version=7,
        request=JobRequest(
            IMAGE,
            TEMPLATE,
            True,
            "9:16",
            job_id,
            metadata,
            "acct-b",
            -7,
            "svc.orders",
            "billing.done",
            "billing",
            "https://hooks.test/v",
            "s3://bucket/inputs/dance.mp4",
            False,
            "wan2.2-animate-move",
            "wan-pro",
            False,
        ),
        created_at=T0,
        updated_at=0.1 + 0.2,
        account="acct-b",
        intake_message_id="3f1e6c1a-msg",
        requested_id="order 42",
        admitted_at=T0 + 0.5,
        token_waits=3,
        throttled=2,
        cancel_requested=True,
        wake="sent",
        delivery="pending",
        published=True,
        submit_uncertain_since=T0 + 1.5,
        submit_ended_at=T0 + 31.5,
        copy_checkpoint='{"upload_id":"u1","parts":2}',
        resumes=2,
        resume_state="COPYING",
        webhook_state="pending",
        webhook_attempts=2,
        webhook_delivered_at=T0 + 9.5,
        webhook_error="WebhookUnavailable: 503",
        remote_task_id="task-1",
        remote_status="SUCCEEDED",
        remote_request_id="req-1",
        submit_attempts=3,
        submit_started_at=T0 + 1.000001,
        submit_ambiguous=True,
        submitted_at=T0 + 2.5,
        remote_started_at=T0 + 1e-6,
        remote_ended_at=1e-300,
        polls=12,
        poll_errors=2,
        unknown_polls=1,
        pending_polls=4,
        next_action_at=T0 + 3.3,
        video_url="https://b.test/out.mp4?Expires=1700086400&Signature=a%2Fb",
        video_expires_at=1_700_086_400.0,
        video_duration=5.123456789012345,
        price_per_second=0.6,
        copy_attempts=2,
        copy_started_at=T0 + 4,
        copy_bytes=4096,
        s3_bucket="bucket",
        s3_key="videos/full-1.mp4",
        bytes=12_345_678_901_234,
        sha256="ab" * 32,
        finished_at=T0 + 5,
        error_code="SourceUnavailable",
        error_message="reset — retry ✓",
        duplicates=5,
        kind="template",
        image_sha256="12" * 32,
        bodystyle="half",
        detect_cached=True,
        detect_attempts=2,
        warning="half body — ✓",
        source_sha256="34" * 32,
        source_seconds=3.25,
        source_url="s3://bucket/inputs/x.mp4",
        prepare_attempts=1,
        template_id="AACT.acct.new",
        template_job_id="tpl.abc.acct.2",
        template_reused=True,
        template_recreated=True,
        rejected_template="AACT.acct.old",
        state_since=T0 + 4.5,
    )
    assert all(getattr(job, f.name) is not None for f in dataclasses.fields(Job))
    return job


class TestJobStoreContract:
    def test_roundtrip_every_field(self, store: JobStore) -> None:
        """Every field comes back equal: floats to the last bit, bools, ints, the metadata dict."""
        job = full_job()
        assert store.create(job) == (job, True)
        got = store.get(job.job_id)
        assert got == job
        assert got is not None
        assert got.updated_at == 0.30000000000000004
        assert got.created_at.hex() == T0.hex()
        assert got.submit_ambiguous is True
        assert isinstance(got.bytes, int) and isinstance(got.polls, int)
        assert got.request.metadata == job.request.metadata

    def test_roundtrip_defaults(self, store: JobStore) -> None:
        """A fresh job's unset fields come back as None, and its defaults as defaults."""
        job = new_job(next_action_at=None)
        store.create(job)
        got = store.get(job.job_id)
        assert got == job
        assert got is not None
        assert got.remote_task_id is None and got.submit_ambiguous is False and got.polls == 0

    def test_take_marks_the_step_taken_at_its_version_only(self, store: JobStore) -> None:
        """A step taken at the job's version clears ``wake`` (its message is no longer
        outstanding) without a version bump; a stale message's take changes nothing."""
        job, _ = store.create(new_job(wake="sent"))
        assert store.take(job.job_id, job.version + 1) == job  # stale (or future): untouched
        taken = store.take(job.job_id, job.version)
        assert taken is not None and (taken.wake, taken.version) == (None, job.version)
        assert store.get(job.job_id) == taken
        assert store.take("nope", 1) is None

    def test_get_missing(self, store: JobStore) -> None:
        """An unknown id reads as None."""
        assert store.get("nope") is None

    def test_create_twice_returns_existing(self, store: JobStore) -> None:
        """A second create with the same id changes nothing and returns the stored job."""
        first = new_job()
        store.create(first)
        moved = store.transition(first, JobState.SUBMITTING)
        assert moved is not None
        again = new_job(request=JobRequest(IMAGE, "AACT.other", job_id="job-1"))
        existing, created = store.create(again)
        assert not created
        assert existing == store.get("job-1")
        assert (existing.state, existing.version) == (JobState.SUBMITTING, 2)
        assert existing.request.template_id == TEMPLATE

    def test_transition_applies_and_bumps_version(self, store: JobStore) -> None:
        """A transition sets the state and the changes, and the version goes up by one."""
        job = new_job()
        store.create(job)
        moved = store.transition(
            job, JobState.SUBMITTING, submit_attempts=1, submit_started_at=T0 + 1
        )
        assert moved is not None
        assert (moved.state, moved.version, moved.submit_attempts) == (JobState.SUBMITTING, 2, 1)
        assert store.get(job.job_id) == moved
        again = store.transition(moved, JobState.SUBMITTING, submit_attempts=2)
        assert again is not None and again.version == 3  # a self-move is progress too
        assert store.get(job.job_id) == again

    def test_compare_and_set_one_winner(self, store: JobStore) -> None:
        """Two transitions from one loaded version: the first wins, the second changes nothing."""
        store.create(new_job())
        loaded = store.get("job-1")
        assert loaded is not None
        winner = store.transition(loaded, JobState.SUBMITTING, updated_at=T0 + 1)
        loser = store.transition(loaded, JobState.CANCELED, error_code="Canceled")
        assert winner is not None and loser is None
        assert store.get("job-1") == winner

    def test_stale_and_missing(self, store: JobStore) -> None:
        """A version that moved on, or a job that does not exist, loses."""
        job = new_job()
        store.create(job)
        store.transition(job, JobState.SUBMITTING)
        assert store.transition(dataclasses.replace(job, version=5), JobState.FAILED) is None
        assert store.transition(new_job("ghost"), JobState.SUBMITTING) is None
        assert store.get("ghost") is None

    def test_none_change_deletes_field(self, store: JobStore) -> None:
        """A change to None removes the field: it reads back as None."""
        job = full_job()
        store.create(job)
        moved = store.transition(
            job, JobState.STORED, error_code=None, error_message=None, next_action_at=None
        )
        assert moved is not None
        got = store.get(job.job_id)
        assert got == moved
        assert got is not None
        assert (got.error_code, got.error_message, got.next_action_at) == (None, None, None)
        assert got.s3_key == job.s3_key  # untouched fields stay

    def test_note_duplicate_keeps_version(self, store: JobStore) -> None:
        """note_duplicate counts without a version bump, so in-flight messages stay valid."""
        job = new_job()
        store.create(job)
        store.note_duplicate("job-1")
        store.note_duplicate("job-1")
        got = store.get("job-1")
        assert got is not None
        assert (got.duplicates, got.version) == (2, 1)
        assert store.transition(job, JobState.SUBMITTING) is not None  # the token still holds
        after = store.get("job-1")
        assert after is not None and after.duplicates == 2  # a transition keeps the count

    def test_note_duplicate_on_missing_job(self, store: JobStore) -> None:
        """Counting a duplicate of a job that is gone (expired) creates nothing."""
        store.note_duplicate("gone")
        assert store.get("gone") is None
        assert store.create(new_job("gone"))[1]

    def test_record_submission_records_the_task_with_its_owner(self, store: JobStore) -> None:
        """The task id and its owner come in one step; a task another job owns is never
        recorded (nothing is written); a stale version records nothing."""
        a, _ = store.create(new_job("a", state=JobState.SUBMITTING))
        b, _ = store.create(new_job("b", state=JobState.SUBMITTING))
        assert store.lock_submit("lane-1", "a") is None
        done = store.record_submission(a, "task-1", remote_status="PENDING")
        assert done is not None and (done.state, done.remote_task_id) == (
            JobState.SUBMITTED,
            "task-1",
        )
        assert store.remote_owners(["task-1", "task-9"]) == {"task-1": "a", "task-9": None}
        assert store.lock_submit("lane-1", "b") is None  # freed by the record
        assert store.record_submission(b, "task-1") is None  # owned by a
        assert store.get("b") == b and store.remote_owners(["task-1"]) == {"task-1": "a"}
        assert store.record_submission(a, "task-2") is None  # a's old version
        assert store.remote_owners(["task-2"]) == {"task-2": None}

    def test_the_submit_lock_holds_while_its_holder_submits(self, store: JobStore) -> None:
        """One holder per lane while it is SUBMITTING; the others wait in line and the unlock
        hands back the longest waiter still submitting; a holder that moved on, or is gone, is
        taken over; unlocking is the holder's alone."""
        a, _ = store.create(new_job("a", state=JobState.SUBMITTING))
        for name in ("b", "c", "d"):
            store.create(new_job(name, state=JobState.SUBMITTING))
        assert store.lock_submit("lane", "a") is None
        assert store.lock_submit("lane", "a") is None  # again: still a's
        assert store.lock_submit("lane", "b") == "a"
        assert store.lock_submit("lane", "c") == "a"
        assert store.lock_submit("lane", "b") == "a"  # waits once, in its first place
        assert store.lock_submit("other-lane", "d") is None
        assert store.unlock_submit("lane", "b") is None  # not b's: nothing
        assert store.lock_submit("lane", "d") == "a"
        b = store.get("b")
        assert b is not None and b.wake == "timer"  # waiting with no message of its own
        assert store.unlock_submit("lane", "a") == ("b", b.version)  # the longest waiter
        assert store.lock_submit("lane", "b") is None
        c = store.get("c")
        assert c is not None
        store.transition(c, JobState.CANCELED)  # c waited, then ended: skipped
        d = store.get("d")
        assert d is not None
        assert store.unlock_submit("lane", "b") == ("d", d.version)
        assert store.lock_submit("lane", "d") is None
        assert store.unlock_submit("lane", "d") is None  # nobody left waiting
        assert store.lock_submit("lane", "a") is None
        a = store.get("a")
        assert a is not None
        store.transition(a, JobState.FAILED)
        assert store.lock_submit("lane", "b") is None  # a ended: taken over
        assert store.lock_submit("lane", "gone-job") == "b"
        assert store.unlock_submit("lane", "b") is None  # a waiter with no record: skipped

    def test_due_and_counts(self, store: JobStore) -> None:
        """The deadline index lists non-final jobs that are due, earliest first; counts by state."""
        assert isinstance(store, InMemoryJobStore | RedisJobStore)
        a = new_job("a", next_action_at=T0 + 10)
        b = new_job("b", next_action_at=T0 + 5)
        c = new_job("c", next_action_at=T0 + 100)
        for job in (a, b, c):
            store.create(job)
        assert store.due(T0 + 10) == ["b", "a"]
        store.transition(b, JobState.CANCELED)
        assert store.due(T0 + 1000) == ["a", "c"]
        store.transition(a, JobState.SUBMITTING, next_action_at=None)
        assert store.due(T0 + 1000) == ["c"]
        counts = store.count_by_state()
        assert (counts["QUEUED"], counts["SUBMITTING"], counts["CANCELED"]) == (1, 1, 1)


class TestWorkflowRecords:
    """Templates by account and source video, waiters, the detection cache: both stores alike."""

    SHA = "5e" * 32

    def test_template_registry_and_owner(self, store: JobStore) -> None:
        assert store.template_info("AACT.a.1") is None and store.template_owner("AACT.a.1") is None
        store.register_template("AACT.a.1", "acct-a", source_sha256=self.SHA,
                                source_url="s3://b/inputs/x.mp4", job_id="tpl-1",
                                video_seconds=3.5)  # fmt: skip
        info = store.template_info("AACT.a.1")
        assert info is not None
        assert (info.account, info.source_sha256, info.source_url, info.job_id) == (
            "acct-a", self.SHA, "s3://b/inputs/x.mp4", "tpl-1")  # fmt: skip
        assert (info.video_seconds, info.revoked) == (3.5, False)
        assert store.template_owner("AACT.a.1") == "acct-a"
        assert store.template_source("acct-a", self.SHA).template_id == "AACT.a.1"
        assert store.template_source("acct-b", self.SHA).template_id is None  # per account

    def test_source_claims_are_compare_and_set(self, store: JobStore) -> None:
        assert store.template_source("acct-a", self.SHA) == TemplateSource()
        assert store.claim_template_source("acct-a", self.SHA, None, "tpl.1", 1)
        assert not store.claim_template_source("acct-a", self.SHA, None, "tpl.other", 1)
        assert store.template_source("acct-a", self.SHA) == TemplateSource(None, "tpl.1", 1)
        assert not store.claim_template_source("acct-a", self.SHA, "tpl.0", "tpl.2", 2)
        assert store.claim_template_source("acct-a", self.SHA, "tpl.1", "tpl.2", 2)
        assert store.template_source("acct-a", self.SHA).generation == 2

    def test_forget_only_the_refused_template(self, store: JobStore) -> None:
        store.register_template("AACT.a.1", "acct-a", source_sha256=self.SHA)
        store.forget_template("acct-a", self.SHA, "AACT.a.other")
        assert store.template_source("acct-a", self.SHA).template_id == "AACT.a.1"
        store.forget_template("acct-a", self.SHA, "AACT.a.1")
        assert store.template_source("acct-a", self.SHA).template_id is None
        info = store.template_info("AACT.a.1")
        assert info is not None and info.revoked

    def test_waiters(self, store: JobStore) -> None:
        assert store.waiters("tpl.1") == []
        store.add_waiter("tpl.1", "j2")
        store.add_waiter("tpl.1", "j1")
        store.add_waiter("tpl.1", "j1")
        assert store.waiters("tpl.1") == ["j1", "j2"]

    def test_detection_cache_and_claim(self, store: JobStore) -> None:
        assert store.detection("acct-a", self.SHA) is None
        found = Detection(False, None, "The input image has no human body.")
        store.save_detection("acct-a", self.SHA, found, 60)
        assert store.detection("acct-a", self.SHA) == found
        assert store.detection("acct-b", self.SHA) is None
        assert store.claim_detection("acct-a", self.SHA, "j1", 60)
        assert store.claim_detection("acct-a", self.SHA, "j1", 60)  # the holder again
        assert not store.claim_detection("acct-a", self.SHA, "j2", 60)


class TestConcurrency:
    def test_twenty_threads_one_winner(self, store: JobStore) -> None:
        """20 threads race one transition from the same version: exactly one wins."""
        job = new_job()
        store.create(job)
        start = threading.Barrier(20, timeout=10)
        results: list[Job | None] = []
        lock = threading.Lock()

        def race(n: int) -> None:
            start.wait()
            result = store.transition(job, JobState.SUBMITTING, submit_attempts=n + 1)
            with lock:
                results.append(result)

        threads = [threading.Thread(target=race, args=(n,)) for n in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(results) == 20
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        stored = store.get(job.job_id)
        assert stored is not None
        assert stored.version == 2
        assert stored.submit_attempts == winners[0].submit_attempts


class TestRedisIndexes:
    """What only Redis keeps: state sets, the deadline zset, TTLs, absent fields."""

    @staticmethod
    def members(store: RedisJobStore, state: JobState) -> set[bytes | str]:
        return set(store.redis.smembers(f"{store.prefix}:state:{state.value}"))

    @staticmethod
    def deadline(store: RedisJobStore, job_id: str) -> float | None:
        score = store.redis.zscore(f"{store.prefix}:deadlines", job_id)
        return None if score is None else float(score)

    def test_a_change_back_to_a_default_removes_the_field(self, redis_store: RedisJobStore) -> None:
        """Counters reset to 0 (a poll after errors) leave no field behind: the record stays
        small (bench/inflight.py counts bytes per job), and it reads back the same."""
        redis_store.create(new_job("d"))
        job = redis_store.get("d")
        assert job is not None
        job = redis_store.transition(job, JobState.SUBMITTED, poll_errors=2, polls=1)
        assert job is not None
        job = redis_store.transition(job, JobState.SUBMITTED, poll_errors=0, polls=2)
        assert job is not None and (job.poll_errors, job.polls) == (0, 2)
        fields = redis_store.redis.hgetall(redis_store.key("d"))
        assert b"poll_errors" not in fields and fields[b"polls"] == b"2"
        assert redis_store.get("d") == job

    def test_the_timeline_keeps_one_line_for_a_run_of_polls_that_saw_nothing_new(
        self, redis_store: RedisJobStore
    ) -> None:
        redis_store.create(new_job("t"))
        job = redis_store.get("t")
        assert job is not None
        job = redis_store.transition(job, JobState.QUEUED, admitted_at=T0 + 1)  # no line
        assert job is not None
        job = redis_store.transition(job, JobState.SUBMITTED, remote_status="PENDING")
        for i, status in enumerate(["PENDING", "PENDING", "RUNNING", "RUNNING", "RUNNING"]):
            assert job is not None
            job = redis_store.transition(
                job, JobState.SUBMITTED, remote_status=status, polls=i + 1, updated_at=T0 + 10 + i
            )
        lines = redis_store.timeline("t")
        polls = [(e.get("poll"), e.get("remote_status"), e.get("unchanged")) for e in lines[1:]]
        assert polls == [
            (None, "PENDING", None),  # the submit
            (2, None, True),  # polls 1 and 2 saw PENDING again: one line, the latest
            (3, "RUNNING", None),
            (5, None, True),  # polls 4 and 5
        ]
        assert lines[-1]["at"] == round(T0 + 14, 3)
        assert [e["to"] for e in lines[:1]] == ["QUEUED"] and len(lines) == 5

    def test_a_line_stores_no_from_and_reads_back_with_it(self, redis_store: RedisJobStore) -> None:
        """A move's ``from`` is the line before's ``to``: not stored (bench/inflight.py counts
        Redis bytes per job), put back when read; a line written by an older release, with its
        own ``from``, reads back as it was."""
        redis_store.create(new_job("fr"))
        job = redis_store.get("fr")
        assert job is not None
        job = redis_store.transition(job, JobState.SUBMITTING)
        assert job is not None
        key = f"{redis_store.prefix}:timeline:fr"
        raw = [json.loads(line) for line in redis_store.redis.lrange(key, 0, -1)]
        assert all("from" not in line for line in raw)
        old = {"at": T0 + 5, "to": "SUBMITTED", "from": "ELSEWHERE"}
        redis_store.redis.rpush(key, json.dumps(old))
        assert [(e["to"], e.get("from")) for e in redis_store.timeline("fr")] == [
            ("QUEUED", None),
            ("SUBMITTING", "QUEUED"),
            ("SUBMITTED", "ELSEWHERE"),
        ]

    def test_the_timeline_keeps_its_last_200_lines(self, redis_store: RedisJobStore) -> None:
        """A job that moves for days (a copy retried until its URL dies) keeps a bounded
        timeline: the newest 200 lines."""
        redis_store.create(new_job("cap"))
        job = redis_store.get("cap")
        for attempt in range(1, 231):
            assert job is not None
            job = redis_store.transition(job, JobState.SUBMITTING, submit_attempts=attempt + 1)
        lines = redis_store.timeline("cap")
        assert len(lines) == 200
        assert lines[-1]["submit_attempts"] == 231 and lines[0]["submit_attempts"] == 32

    def test_a_first_attempt_needs_no_line_of_its_own(self, redis_store: RedisJobStore) -> None:
        redis_store.create(new_job("a1"))
        job = redis_store.get("a1")
        assert job is not None
        job = redis_store.transition(job, JobState.SUBMITTING)
        assert job is not None
        job = redis_store.transition(job, JobState.SUBMITTING, submit_attempts=1)  # implied
        assert job is not None
        job = redis_store.transition(job, JobState.SUBMITTING, submit_attempts=2)
        assert job is not None and job.submit_attempts == 2
        lines = redis_store.timeline("a1")
        assert [(e["to"], e.get("from"), e.get("submit_attempts")) for e in lines] == [
            ("QUEUED", None, None),
            ("SUBMITTING", "QUEUED", None),
            ("SUBMITTING", None, 2),
        ]

    def test_jobs_by_state_gauge_and_step_times(
        self, redis_store: RedisJobStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Each change of state moves one count in ``P:m:jobs`` (state|account|kind), in the same
        script; the time spent in the state left is observed; one log line per move."""
        seen: list[tuple[str, float, dict[str, str]]] = []

        class Recorder:
            def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
                seen.append((name, amount, labels))

            def observe(self, name: str, value: float, **labels: str) -> None:
                seen.append((name, value, labels))

        redis_store.metrics = Recorder()
        redis_store.create(new_job("a", account="acct-x", created_at=T0, state_since=None))
        redis_store.create(new_job("b", kind="template"))
        a = redis_store.get("a")
        assert a is not None
        caplog.set_level("INFO", logger="workers.adapters.redis.store")
        moved = redis_store.transition(a, JobState.SUBMITTING, updated_at=T0 + 2.5)
        assert moved is not None and moved.state_since == T0 + 2.5
        assert redis_store.transition(moved, JobState.SUBMITTING, updated_at=T0 + 3) is not None
        raw = redis_store.redis.hgetall(f"{redis_store.prefix}:m:jobs")
        counts = {k.decode(): int(v) for k, v in raw.items()}
        assert counts == {
            "QUEUED|acct-x|video": 0,
            "SUBMITTING|acct-x|video": 1,
            "QUEUED|default|template": 1,
        }
        assert seen == [("step_seconds", 2.5, {"step": "QUEUED", "kind": "video"})]  # once
        (line,) = [r for r in caplog.records if getattr(r, "event", None) == "job.transition"]
        assert (line.job_id, line.from_state, line.to_state, line.account) == (  # type: ignore[attr-defined]
            "a", "QUEUED", "SUBMITTING", "acct-x")  # fmt: skip
        assert line.seconds_in_state == 2.5  # type: ignore[attr-defined]

    def test_sweep_drops_index_entries_of_expired_records(self, redis_store: RedisJobStore) -> None:
        """Final jobs expire; the sweep takes their ids out of the state sets (and old remote
        task ids out of the reconcile set), and leaves live ones alone."""
        for name in ("gone-1", "gone-2", "kept"):
            redis_store.create(new_job(name))
            job = redis_store.get(name)
            assert job is not None
            redis_store.transition(job, JobState.REJECTED)
        redis_store.redis.delete(redis_store.key("gone-1"), redis_store.key("gone-2"))
        for name, task in (("old-owner", "old-task"), ("new-owner", "new-task")):
            owner, _ = redis_store.create(new_job(name, state=JobState.SUBMITTING))
            assert redis_store.record_submission(owner, task) is not None
        old = time.time() - FINAL_TTL - 2 * 86400
        redis_store.redis.zadd(f"{redis_store.prefix}:remote-tasks", {"old-task": old})
        assert redis_store.sweep(batch=10) == 3
        assert self.members(redis_store, JobState.REJECTED) == {b"kept"}
        owners = redis_store.remote_owners(["new-task", "old-task"])
        assert owners == {"new-task": "new-owner", "old-task": None}  # forgotten after retention
        assert redis_store.sweep() == 0

    def test_none_fields_absent(self, redis_store: RedisJobStore) -> None:
        """None fields are not written at all; the rest are plain strings."""
        job = new_job()
        redis_store.create(job)
        raw = redis_store.redis.hgetall(redis_store.key("job-1"))
        fields = {k.decode() if isinstance(k, bytes) else k for k in raw}
        absent = {f.name for f in dataclasses.fields(Job) if getattr(job, f.name) is None}
        assert absent and not fields & absent
        assert raw[b"state"] == b"QUEUED" and raw[b"version"] == b"1"

    def test_state_index_moves(self, redis_store: RedisJobStore) -> None:
        """The job id moves between the per-state sets with each transition."""
        job = new_job()
        redis_store.create(job)
        assert b"job-1" in self.members(redis_store, JobState.QUEUED)
        moved = redis_store.transition(job, JobState.SUBMITTING)
        assert moved is not None
        assert b"job-1" not in self.members(redis_store, JobState.QUEUED)
        assert b"job-1" in self.members(redis_store, JobState.SUBMITTING)
        again = redis_store.transition(moved, JobState.SUBMITTING)
        assert again is not None
        assert self.members(redis_store, JobState.SUBMITTING) == {b"job-1"}
        assert redis_store.transition(job, JobState.FAILED) is None  # a loser moves nothing
        assert self.members(redis_store, JobState.FAILED) == set()

    def test_deadlines_follow_next_action_at(self, redis_store: RedisJobStore) -> None:
        """The deadline score is next_action_at, updated or removed with it."""
        job = new_job()
        redis_store.create(job)
        assert self.deadline(redis_store, "job-1") == T0
        moved = redis_store.transition(job, JobState.SUBMITTING, next_action_at=T0 + 60.25)
        assert moved is not None
        assert self.deadline(redis_store, "job-1") == T0 + 60.25
        kept = redis_store.transition(moved, JobState.SUBMITTING, polls=1)
        assert kept is not None
        assert self.deadline(redis_store, "job-1") == T0 + 60.25  # unchanged when not named
        cleared = redis_store.transition(kept, JobState.SUBMITTING, next_action_at=None)
        assert cleared is not None
        assert self.deadline(redis_store, "job-1") is None

    @pytest.mark.parametrize("final", sorted(FINAL_STATES - {JobState.REJECTED}))
    def test_final_leaves_deadlines_and_gets_ttl(
        self, redis_store: RedisJobStore, final: JobState
    ) -> None:
        """A final state leaves the deadline index (even with next_action_at set) and expires."""
        job = new_job(state=JobState.COPYING)
        redis_store.create(job)
        key = redis_store.key("job-1")
        assert redis_store.redis.ttl(key) == -1  # live jobs never expire
        assert self.deadline(redis_store, "job-1") == T0
        done = redis_store.transition(job, final)
        assert done is not None
        assert self.deadline(redis_store, "job-1") is None
        assert 0 < redis_store.redis.ttl(key) <= FINAL_TTL
        assert b"job-1" in self.members(redis_store, final)

    def test_rejected_at_create_gets_ttl(self, redis_store: RedisJobStore) -> None:
        """A job created final (REJECTED at intake) expires too, and is not in the deadlines."""
        redis_store.create(new_job(state=JobState.REJECTED, next_action_at=None))
        assert 0 < redis_store.redis.ttl(redis_store.key("job-1")) <= FINAL_TTL
        assert self.deadline(redis_store, "job-1") is None
        assert b"job-1" in self.members(redis_store, JobState.REJECTED)

    def test_note_duplicate_leaves_no_orphan(self, redis_store: RedisJobStore) -> None:
        """Counting a duplicate of an expired job writes no hash (it could never be decoded)."""
        redis_store.note_duplicate("gone")
        assert not redis_store.redis.exists(redis_store.key("gone"))


def test_the_workers_clock_is_redis_s_whatever_the_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hosts whose wall clocks are an hour apart read the same time, Redis's: deadlines one
    sets are due when the other (the watchdog) thinks so, as for the timers and buckets."""
    import redis as redis_lib

    from workers.adapters.redis.store import RedisClock

    client = redis_lib.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # this host is an hour fast
    clock = RedisClock(client)
    secs, micros = client.time()
    assert abs(clock() - (secs + micros / 1e6)) < 0.5
    client.close()
