"""The steps over the fakes of tests/fakes.py: each use case, judged by the store."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, replace
from typing import Any

import pytest

from tests.fakes import (
    TUNING,
    FakeClock,
    FakeCopier,
    FakeImageProbe,
    FakeVideoApi,
    ambiguous,
    make_services,
    stored_copy,
)
from workers import steps
from workers.adapters.memory.store import START, InMemoryJobStore
from workers.domain.costs import next_utc_midnight, utc_day
from workers.domain.decisions import Finish, RemoteSnapshot
from workers.domain.job import Job
from workers.domain.media import ImageFacts
from workers.domain.policies import Backoff
from workers.domain.request import JobRequest
from workers.domain.states import URL_TTL_SECONDS, JobState, RemoteStatus
from workers.errors import (
    CopyMismatch,
    CopyPaused,
    DashScopeBadResponse,
    DashScopeRejected,
    DashScopeUnavailable,
    InvalidJobRequest,
    JobNotFound,
    SourceExpired,
    SourceRejected,
    SourceUnavailable,
    StorageUnavailable,
    StoreUnavailable,
)
from workers.ports import StoredCopy
from workers.steps.context import Next, Services
from workers.steps.intake import IntakeResult

IMAGE = "https://img.test/person.png"
TEMPLATE = "AACT.acct.1234-5678"
JOB = "order-1"
MSG = "msg-1"
EXPIRES = int(START) + 86_000
VIDEO = f"https://bucket.oss.test/out/task-1.mp4?Expires={EXPIRES}&Signature=s"
KEY = f"videos/{JOB}.mp4"


@dataclass
class World:
    """The fakes behind one Services, kept typed so tests can script and inspect them."""

    store: InMemoryJobStore
    api: FakeVideoApi
    copier: FakeCopier
    images: FakeImageProbe
    clock: FakeClock
    svc: Services

    def job(self, job_id: str = JOB) -> Job:
        job = self.store.get(job_id)
        assert job is not None, f"no job {job_id}"
        return job


def make_world(
    *, store: InMemoryJobStore | None = None, images: FakeImageProbe | None = None, **policies: Any
) -> World:
    store = store or InMemoryJobStore()
    images = images or FakeImageProbe()
    api, copier, clock = FakeVideoApi(), FakeCopier(), FakeClock()
    svc = make_services(store=store, api=api, copier=copier, images=images, clock=clock, **policies)
    return World(store, api, copier, images, clock, svc)


@pytest.fixture
def w() -> World:
    return make_world()


def kwargs(**changes: Any) -> dict[str, Any]:
    """A request without the image check (its own tests are in test_workflow.py)."""
    return {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": JOB, "detect": False, **changes}


def snap(status: RemoteStatus, raw: str | None = None, **fields: Any) -> RemoteSnapshot:
    return RemoteSnapshot(status=status, raw_status=raw or status.value, **fields)


def woken(w: World, step: str = "submit", job_id: str = JOB) -> list[Next]:
    """The wake-ups the use cases asked the task layer for, for one job and step."""
    return [n for n in w.svc.woken if n.step == step and n.job_id == job_id]  # type: ignore[attr-defined]


def queued(w: World) -> Next:
    """Intake, admission (the account has room): the submit wake-up it asked for."""
    result = steps.intake(w.svc, kwargs(), (), MSG)
    assert result.state == JobState.QUEUED
    (step,) = woken(w)
    return step


def submitted(w: World, task_id: str = "task-1") -> Next:
    w.api.submit_script.append(task_id)
    step = steps.submit(w.svc, JOB, queued(w).version)
    assert step is not None and step.step == "poll"
    return step


def copying(w: World) -> Next:
    poll = submitted(w)
    w.api.poll_script.append(
        snap(RemoteStatus.SUCCEEDED, video_url=VIDEO, video_duration=5.0, end_time=START)
    )
    step = steps.poll(w.svc, JOB, poll.version)
    assert step is not None and step.step == "copy"
    return step


# ---------------------------------------------------------------------------------------- intake


class TestIntake:
    def test_valid_request_is_queued(self, w: World) -> None:
        """A valid request becomes a QUEUED job and asks for a submit now; nothing is sent yet."""
        result = steps.intake(w.svc, kwargs(metadata={"user": 7}), (), MSG)
        assert result == IntakeResult(JOB, JobState.QUEUED, True, None)
        # received (1), checked and queued (2), admitted at once: the account has room (3)
        assert woken(w) == [Next("submit", JOB, 3, 0)]
        job = w.job()
        assert (job.state, job.version) == (JobState.QUEUED, 3)
        assert job.request == JobRequest(  # (a record naming no model: AnimateAnyone's)
            IMAGE, TEMPLATE, None, None, JOB, {"user": 7}, detect=False
        )
        assert job.model == "animate-anyone-gen2"
        assert job.intake_message_id == MSG
        assert job.created_at == job.updated_at == job.admitted_at == START
        assert w.images.probes == [IMAGE]
        assert w.api.submits == []

    def test_message_id_when_no_job_id(self, w: World) -> None:
        """Without a job_id the message id names the job."""
        result = steps.intake(
            w.svc, {"image_url": IMAGE, "template_id": TEMPLATE, "detect": False}, (), MSG
        )
        assert result.job_id == MSG
        assert w.job(MSG).state == JobState.QUEUED

    def test_invalid_request_is_rejected_with_code(self, w: World) -> None:
        """Bad input: a REJECTED record under the producer's job_id; nothing probed or sent."""
        result = steps.intake(w.svc, kwargs(video_ratio="9:16"), (), MSG)
        assert result == IntakeResult(JOB, JobState.REJECTED, True, None)
        job = w.job()
        assert job.state == JobState.REJECTED
        assert job.error_code == "InvalidRequest.VideoRatioWithoutRefBg"
        assert job.error_message
        assert job.finished_at == START
        assert job.next_action_at is None
        assert job.intake_message_id == MSG
        assert w.images.probes == []
        assert w.api.submits == []

    @pytest.mark.parametrize("job_id", ["bad id!", 12, "x\n"])
    def test_invalid_job_id_falls_back_to_message_id(self, w: World, job_id: Any) -> None:
        """When the job_id itself is unusable, the REJECTED record is kept under the message id."""
        result = steps.intake(w.svc, kwargs(job_id=job_id), (), MSG)
        assert (result.job_id, result.state) == (MSG, JobState.REJECTED)
        assert w.job(MSG).error_code == "InvalidRequest.JobId"
        assert list(w.store.jobs) == [MSG]

    def test_positional_args_rejected(self, w: World) -> None:
        """Positional args are refused at intake like any other rule."""
        result = steps.intake(w.svc, kwargs(), (IMAGE,), MSG)
        assert result.state == JobState.REJECTED
        assert w.job().error_code == "InvalidRequest.PositionalArgs"

    def test_rejected_intake_redelivered(self, w: World) -> None:
        """A redelivered bad request finds its REJECTED record; nothing new is made."""
        steps.intake(w.svc, kwargs(bogus=1), (), MSG)
        again = steps.intake(w.svc, kwargs(bogus=1), (), MSG)
        assert again == IntakeResult(JOB, JobState.REJECTED, False, None)
        job = w.job()
        assert job.version == 1  # created REJECTED (its delivery bumps nothing): nothing new
        assert (job.delivery, job.published) == (None, True)

    def test_duplicate_job_id_from_another_message(self, w: World) -> None:
        """Same job_id, another message: no new job, the duplicate is counted, version unchanged."""
        first = queued(w)
        again = steps.intake(w.svc, kwargs(template_id="AACT.other"), (), "msg-2")
        assert again == IntakeResult(JOB, JobState.QUEUED, False, None)
        steps.intake(w.svc, kwargs(), (), "msg-3")
        job = w.job()
        assert job.duplicates == 2
        assert job.version == first.version
        assert job.request.template_id == TEMPLATE
        assert job.intake_message_id == MSG
        assert len(w.store.jobs) == 1
        assert w.images.probes == [IMAGE]  # the duplicates were not probed

    def test_duplicate_keeps_inflight_messages_valid(self, w: World) -> None:
        """The submit message scheduled before the duplicate still works (no version bump)."""
        step = queued(w)
        steps.intake(w.svc, kwargs(), (), "msg-2")
        w.api.submit_script.append("task-1")
        assert steps.submit(w.svc, JOB, step.version) is not None

    def test_redelivered_intake_continues(self, w: World) -> None:
        """The same message again (a redelivery) after admission changes nothing."""
        first = queued(w)
        again = steps.intake(w.svc, kwargs(), (), MSG)
        assert again == IntakeResult(JOB, JobState.QUEUED, False, None)
        assert woken(w) == [first]
        assert w.job().duplicates == 0

    def test_redelivered_intake_after_submit_stops(self, w: World) -> None:
        """A redelivery after the job moved on reports the state and schedules nothing."""
        submitted(w)
        again = steps.intake(w.svc, kwargs(), (), MSG)
        assert again == IntakeResult(JOB, JobState.SUBMITTED, False, None)

    @pytest.mark.parametrize(
        ("facts", "code"),
        [
            (ImageFacts("GIF", 100, 500, 500), "InvalidImage.Format"),
            (ImageFacts("PNG", 6 * 1024 * 1024, 500, 500), "InvalidImage.Size"),
            (ImageFacts("PNG", 100, 5000, 4000), "InvalidImage.LongestSide"),
            (ImageFacts("PNG", 100, 300, 100), "InvalidImage.AspectRatio"),
            (
                InvalidJobRequest("not an image", code="InvalidImage.Unreadable"),
                "InvalidImage.Unreadable",
            ),
        ],
    )
    def test_image_rejected(self, facts: ImageFacts | Exception, code: str) -> None:
        """An image DashScope would refuse: REJECTED with InvalidImage.*, zero submits."""
        w = make_world(images=FakeImageProbe(facts))
        result = steps.intake(w.svc, kwargs(), (), MSG)
        assert result == IntakeResult(JOB, JobState.REJECTED, True, None)
        job = w.job()
        # received (1), rejected (2); its outcome delivered (no version bump)
        assert (job.state, job.error_code, job.version) == (JobState.REJECTED, code, 2)
        assert job.finished_at == START
        assert w.api.submits == []

    def test_image_unreachable_is_rejected(self, w: World) -> None:
        """A transient probe failure refuses the job (never pay blind): InvalidImage.Unreachable."""
        w.images.facts = SourceUnavailable("image host answered 503")
        result = steps.intake(w.svc, kwargs(), (), MSG)
        assert result.state == JobState.REJECTED
        job = w.job()
        assert job.error_code == "InvalidImage.Unreachable"
        assert job.error_message == "image host answered 503"
        assert w.api.submits == []


# ---------------------------------------------------------------------------------------- submit


class TestSubmit:
    def test_submits_once_and_schedules_poll(self, w: World) -> None:
        """QUEUED -> SUBMITTED with the task id; the poll comes after first_delay."""
        step = queued(w)
        w.clock.advance(10)
        w.api.submit_script.append("task-1")
        nxt = steps.submit(w.svc, JOB, step.version)
        job = w.job()
        assert nxt == Next("poll", JOB, job.version, TUNING.poll.first_delay)
        assert job.state == JobState.SUBMITTED
        assert (job.remote_task_id, job.remote_status) == ("task-1", "PENDING")
        assert job.submit_attempts == 1
        assert job.submitted_at == START + 10
        assert job.submit_started_at is None  # only reconciliation needed it: dropped
        assert job.submit_ambiguous is False
        assert job.next_action_at == START + 10 + TUNING.poll.first_delay
        # what the producer asked for, sent to the job's own model (named in the POST)
        assert w.api.submits == [dataclasses.replace(job.request, model="animate-anyone-gen2")]
        assert w.store.remote_owners(["task-1"]) == {"task-1": JOB}  # recorded as owned

    def test_duplicate_submit_message_does_nothing(self, w: World) -> None:
        """A second submit message with the same version finds a stale version: one api.submit."""
        step = queued(w)
        w.api.submit_script.append("task-1")
        assert steps.submit(w.svc, JOB, step.version) is not None
        before = w.job()
        assert steps.submit(w.svc, JOB, step.version) is None
        assert w.job() == before
        assert len(w.api.submits) == 1

    def test_concurrent_submit_messages(self) -> None:
        """Two workers load the same version at once: exactly one calls api.submit."""
        gate = threading.Barrier(2, timeout=5)

        class RacingStore(InMemoryJobStore):
            racing = False

            def get(self, job_id: str) -> Job | None:
                job = super().get(job_id)
                if self.racing:
                    gate.wait()  # both workers hold the same version before either moves
                return job

        store = RacingStore()
        w = make_world(store=store)
        step = queued(w)
        w.api.submit_script.extend(["task-1", "task-2"])
        store.racing = True
        results: list[Next | None] = []
        threads = [
            threading.Thread(target=lambda: results.append(steps.submit(w.svc, JOB, step.version)))
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        store.racing = False
        assert len(results) == 2
        assert sum(r is not None for r in results) == 1
        assert len(w.api.submits) == 1
        assert w.job().remote_task_id == "task-1"

    def test_stale_or_missing_or_moved_on(self, w: World) -> None:
        """A stale version, an unknown job, or a job past SUBMITTING: nothing happens."""
        step = submitted(w)
        assert steps.submit(w.svc, JOB, step.version - 1) is None
        assert steps.submit(w.svc, "nope", 1) is None
        assert steps.submit(w.svc, JOB, step.version) is None  # SUBMITTED at that version
        assert len(w.api.submits) == 1

    def test_rejected_by_dashscope(self, w: World) -> None:
        """A 4xx ends the job FAILED with DashScope's code and message; no retry."""
        step = queued(w)
        w.api.submit_script.append(DashScopeRejected("bad template", code="InvalidParameter"))
        assert steps.submit(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.error_code, job.error_message) == (
            JobState.FAILED,
            "InvalidParameter",
            "bad template",
        )
        assert job.finished_at == START
        assert job.next_action_at is None

    def test_other_permanent_error(self, w: World) -> None:
        """Any permanent error from submit ends the job FAILED with its code."""
        step = queued(w)
        w.api.submit_script.append(DashScopeBadResponse("no task_id"))
        assert steps.submit(w.svc, JOB, step.version) is None
        assert w.job().error_code == "DashScopeBadResponse"

    def test_transient_error_retries_with_backoff(self, w: World) -> None:
        """A transient, unambiguous failure schedules another submit after the backoff."""
        step = queued(w)
        w.api.submit_script.append(DashScopeUnavailable("503"))
        nxt = steps.submit(w.svc, JOB, step.version)
        job = w.job()
        delay = TUNING.submit.backoff.delay(1, lambda: 0.5)
        assert nxt == Next("submit", JOB, job.version, delay)
        assert job.state == JobState.SUBMITTING
        assert job.submit_attempts == 1
        assert job.submit_ambiguous is False
        assert (job.error_code, job.error_message) == ("DashScopeUnavailable", "503")
        assert job.next_action_at == START + delay

        w.clock.advance(delay)
        w.api.submit_script.append("task-1")
        assert nxt is not None
        poll = steps.submit(w.svc, JOB, nxt.version)
        assert poll is not None and poll.step == "poll"
        job = w.job()
        assert (job.state, job.submit_attempts) == (JobState.SUBMITTED, 2)
        assert w.api.recent_calls == []  # nothing ambiguous: no reconciliation

    def test_gives_up_after_max_attempts(self) -> None:
        """After max_attempts transient failures: FAILED, SubmitRetriesExhausted."""
        w = make_world(submit=dataclasses.replace(TUNING.submit, max_attempts=3))
        step: Next | None = queued(w)
        delays = []
        for _ in range(3):
            w.api.submit_script.append(DashScopeUnavailable("503"))
            assert step is not None
            step = steps.submit(w.svc, JOB, step.version)
            if step is not None:
                delays.append(step.countdown)
        assert step is None
        assert delays == [1.5, 3.0]  # the backoff grows
        job = w.job()
        assert (job.state, job.error_code, job.submit_attempts) == (
            JobState.FAILED,
            "SubmitRetriesExhausted",
            3,
        )
        assert len(w.api.submits) == 3

    def test_gives_up_ambiguous(self) -> None:
        """Giving up after an ambiguous last attempt says so (a task may exist)."""
        w = make_world(submit=dataclasses.replace(TUNING.submit, max_attempts=1))
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        assert steps.submit(w.svc, JOB, queued(w).version) is None
        assert w.job().error_code == "SubmitAmbiguous"

    def test_ambiguous_then_adopts_unclaimed_task(self, w: World) -> None:
        """After an ambiguous failure the next attempt reads the task list first and adopts."""
        step = queued(w)
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        retry = steps.submit(w.svc, JOB, step.version)
        assert retry is not None and retry.step == "submit"
        job = w.job()
        assert job.submit_ambiguous is True
        started = job.submit_started_at
        assert started == START

        w.clock.advance(30)
        w.api.recent = ["task-lost"]
        poll = steps.submit(w.svc, JOB, retry.version)
        job = w.job()
        assert poll == Next("poll", JOB, job.version, TUNING.poll.first_delay)
        assert (job.state, job.remote_task_id) == (JobState.SUBMITTED, "task-lost")
        assert job.submit_ambiguous is False
        assert job.submit_attempts == 1  # no second attempt was made
        assert len(w.api.submits) == 1  # zero extra submits
        # the window: the uncertain POST's start to its failure, each widened by the clock skew
        skew = TUNING.submit.clock_skew
        assert w.api.recent_calls == [(started - skew, START + skew)]

    def test_task_claimed_by_another_job_is_not_adopted(self, w: World) -> None:
        """A listed task that another job owns is skipped; with nothing else listed once the
        list's lag has passed, the job submits again."""
        w.store.remote_owner["task-other"] = "other-job"
        step = queued(w)
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        retry = steps.submit(w.svc, JOB, step.version)
        assert retry is not None
        w.api.recent = ["task-other"]
        w.clock.advance(TUNING.submit.list_lag)
        w.api.submit_script.append("task-new")
        assert steps.submit(w.svc, JOB, retry.version) is not None
        job = w.job()
        assert job.remote_task_id == "task-new"
        assert (job.submit_attempts, job.submit_ambiguous) == (2, False)
        assert len(w.api.submits) == 2
        assert len(w.api.recent_calls) == 1

    def test_the_one_unowned_task_among_owned_ones_is_adopted(self, w: World) -> None:
        w.store.remote_owner.update({"task-a": "job-a", "task-c": "job-c"})
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        retry = steps.submit(w.svc, JOB, queued(w).version)
        assert retry is not None
        w.api.recent = ["task-a", "task-b", "task-c"]
        steps.submit(w.svc, JOB, retry.version)
        assert w.job().remote_task_id == "task-b"
        assert w.store.remote_owners(["task-b"]) == {"task-b": JOB}

    def test_several_unclaimed_tasks_are_never_adopted(self) -> None:
        """Two unowned tasks in the window (someone else used the key meanwhile): neither can be
        told to be this job's, so none is adopted (no swapped videos), nothing is submitted
        again (no second payment); the job fails saying which tasks, and they are counted."""
        w = make_world()
        counted: list[tuple[str, float, dict[str, str]]] = []

        class Counting:
            def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
                counted.append((name, amount, labels))

            def observe(self, name: str, value: float, **labels: str) -> None:
                pass

        w.svc = dataclasses.replace(w.svc, metrics=Counting())
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        retry = steps.submit(w.svc, JOB, queued(w).version)
        assert retry is not None
        w.api.recent = ["task-x", "task-y"]
        assert steps.submit(w.svc, JOB, retry.version) is None
        job = w.job()
        assert (job.state, job.error_code) == (JobState.FAILED, "SubmitAmbiguous")
        assert "task-x" in (job.error_message or "") and "task-y" in (job.error_message or "")
        assert job.remote_task_id is None and len(w.api.submits) == 1
        assert ("remote_tasks_unclaimed_total", 2, {"account": "default"}) in counted
        assert w.store.remote_owners(["task-x", "task-y"]) == {"task-x": None, "task-y": None}

    def test_a_list_that_lags_is_read_again_before_anything_is_resent(self, w: World) -> None:
        """The uncertain POST's task is not listed yet: no second POST; the list is read again
        (not an attempt) until list_lag after the POST ended, and the late task is adopted."""
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        step = steps.submit(w.svc, JOB, queued(w).version)
        assert step is not None
        w.api.recent = []
        looks = 0
        while w.clock.now < START + 20:
            w.clock.advance(step.countdown)
            step = steps.submit(w.svc, JOB, step.version)
            assert step is not None and step.step == "submit"
            looks += 1
        assert looks >= 2 and len(w.api.submits) == 1 and w.job().submit_attempts == 1
        w.api.recent = ["task-late"]
        w.clock.advance(step.countdown)
        poll = steps.submit(w.svc, JOB, step.version)
        assert poll is not None and poll.step == "poll"
        assert w.job().remote_task_id == "task-late" and len(w.api.submits) == 1
        # every look covered the same window, from the uncertain POST's start
        assert {since for since, _ in w.api.recent_calls} == {START - TUNING.submit.clock_skew}

    def test_the_task_id_and_its_owner_are_one_write(self) -> None:
        """Redis times out on the write that records the task id: nothing is half-recorded,
        so the resumed job finds its own task unowned in the list and adopts it. (Two writes,
        "owned" then "the job's", once left the task owned by nobody's record: the job skipped
        it and paid again.)"""

        class TimesOut(InMemoryJobStore):
            """Times out on the first write that carries the task id, however it is made."""

            armed = True

            def fire(self) -> None:
                if self.armed:
                    self.armed = False
                    raise StoreUnavailable("updating job: timeout")

            def record_submission(self, *args: Any, **kwargs: Any) -> Job | None:
                self.fire()
                return super().record_submission(*args, **kwargs)

            def transition(self, job: Job, state: JobState, **changes: Any) -> Job | None:
                if "remote_task_id" in changes:
                    self.fire()
                return super().transition(job, state, **changes)

        w = make_world(store=TimesOut())
        w.api.submit_script.append("task-1")
        with pytest.raises(StoreUnavailable):
            steps.submit(w.svc, JOB, queued(w).version)
        job = w.job()
        assert (job.state, job.submit_ambiguous) == (JobState.SUBMITTING, True)
        w.api.recent = ["task-1"]
        assert steps.submit(w.svc, JOB, job.version) is not None  # the watchdog's resume
        assert w.job().remote_task_id == "task-1"
        assert len(w.api.submits) == 1

    def test_the_lane_waits_while_a_submit_is_unresolved(self) -> None:
        """Job A's POST is uncertain: job B of the same lane does not POST until A's task is
        resolved, so A's reconciliation can only find A's task (never B's: no swap)."""
        w = make_world()
        step_a = queued(w)
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        retry_a = steps.submit(w.svc, JOB, step_a.version)
        assert retry_a is not None
        steps.intake(
            w.svc, {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "b", "detect": False},
            (), "m-b",
        )  # fmt: skip
        b = w.store.get("b")
        assert b is not None
        w.store.transition(b, JobState.QUEUED, admitted_at=START)
        b = w.store.get("b")
        assert b is not None
        assert steps.submit(w.svc, "b", b.version) is None  # waits in line, no message
        assert len(w.api.submits) == 1  # B did not POST
        waiting = w.store.get("b")
        assert waiting is not None and waiting.wake == "timer"  # no message: it waits in line
        w.api.recent = ["task-a"]
        woken_before = len(w.svc.woken)  # type: ignore[attr-defined]
        assert steps.submit(w.svc, JOB, retry_a.version) is not None  # A adopts its task
        [wake_b] = w.svc.woken[woken_before:]  # type: ignore[attr-defined]
        assert (wake_b.step, wake_b.job_id) == ("submit", "b")  # the unlock wakes B
        w.api.submit_script.append("task-b")
        assert steps.submit(w.svc, "b", wake_b.version) is not None  # the lane is free
        assert (w.job().remote_task_id, w.store.get("b").remote_task_id) == ("task-a", "task-b")  # type: ignore[union-attr]

    def test_a_definite_failure_frees_the_lane(self, w: World) -> None:
        """A connect error, a 429 or a 4xx: nothing was created, the lane is free at once."""
        w.api.submit_script.append(DashScopeUnavailable("connect refused"))
        assert steps.submit(w.svc, JOB, queued(w).version) is not None
        assert w.store.submit_locks == {}
        assert w.job().submit_ambiguous is False

    def test_reconcile_failure_retries_without_submitting(self, w: World) -> None:
        """If the task list cannot be read, nothing is submitted: retry later, still ambiguous."""
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        retry = steps.submit(w.svc, JOB, queued(w).version)
        assert retry is not None
        w.api.recent_error = DashScopeUnavailable("list 503")
        again = steps.submit(w.svc, JOB, retry.version)
        assert again is not None and again.step == "submit"
        job = w.job()
        assert (job.state, job.submit_ambiguous, job.submit_attempts) == (
            JobState.SUBMITTING,
            True,
            2,  # a failed reconciliation counts, so a task list that never answers ends it
        )
        assert job.error_message == "list 503"
        assert len(w.api.submits) == 1

    def test_reconcile_failures_are_bounded(self, w: World) -> None:
        """A task list that never answers ends the job SubmitAmbiguous after max_attempts."""
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        step = steps.submit(w.svc, JOB, queued(w).version)
        w.api.recent_error = DashScopeUnavailable("list 503")
        while step is not None:
            step = steps.submit(w.svc, JOB, step.version)
        job = w.job()
        assert (job.state, job.error_code) == (JobState.FAILED, "SubmitAmbiguous")
        assert job.error_message.startswith(f"{TUNING.submit.max_attempts} submit attempts")
        assert len(w.api.submits) == 1

    def test_ambiguity_survives_until_the_list_says_nothing_was_created(self, w: World) -> None:
        """After an uncertain POST the job stays marked (and its lane locked) through every
        look at the list; only a look after the lag with nothing found clears it, and then
        the next POST's own outcome decides."""
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        retry = steps.submit(w.svc, JOB, queued(w).version)
        assert retry is not None
        assert w.job().submit_ambiguous is True and w.store.submit_locks == {"default": JOB}
        w.clock.advance(TUNING.submit.list_lag)
        w.api.submit_script.append(DashScopeUnavailable("connect refused"))
        retry = steps.submit(w.svc, JOB, retry.version)
        assert retry is not None
        job = w.job()
        assert job.submit_ambiguous is False and job.submit_attempts == 2
        assert w.store.submit_locks == {}
        assert len(w.api.recent_calls) == 1

    def test_duplicate_during_reconciliation_does_not_resubmit(self, w: World) -> None:
        """Two messages at one version: while one reconciles, the other claims the attempt.

        The first must not reload the job and submit on top of the other's POST in flight.
        """
        w.api.submit_script.append(ambiguous(DashScopeUnavailable("read timeout")))
        retry = steps.submit(w.svc, JOB, queued(w).version)
        assert retry is not None
        loaded = w.job()

        def other_worker_claims_the_attempt() -> None:
            claimed = w.store.transition(
                loaded, JobState.SUBMITTING, submit_attempts=loaded.submit_attempts + 1
            )
            assert claimed is not None

        w.api.on_recent_tasks = other_worker_claims_the_attempt
        assert steps.submit(w.svc, JOB, retry.version) is None
        assert len(w.api.submits) == 1

    def test_crash_mid_post_is_reconciled_on_resume(self, w: World) -> None:
        """A worker dying while its POST is in flight leaves the job marked ambiguous.

        Whoever resumes the job (the watchdog, with the current version) lists tasks before
        anything is submitted again, and adopts the one the dead worker created.
        """

        class Crash(BaseException):
            pass

        def die(request: JobRequest) -> None:
            raise Crash

        w.api.on_submit = die
        with pytest.raises(Crash):
            steps.submit(w.svc, JOB, queued(w).version)
        job = w.job()
        assert (job.state, job.submit_ambiguous, job.submit_attempts) == (
            JobState.SUBMITTING,
            True,
            1,
        )
        w.api.on_submit = None
        w.api.recent = ["task-created-before-crash"]
        assert steps.submit(w.svc, JOB, job.version) is not None
        assert w.job().remote_task_id == "task-created-before-crash"
        assert len(w.api.submits) == 1


# ---------------------------------------------------------------------------------------- poll


class TestPoll:
    def test_pending_waits_longer_each_time(self, w: World) -> None:
        """PENDING: poll again after 5 s, then 7.5 s; the counters move, the state does not."""
        step: Next | None = submitted(w)
        countdowns = []
        for _ in range(2):
            w.api.poll_script.append(snap(RemoteStatus.PENDING))
            assert step is not None
            w.clock.advance(step.countdown)
            step = steps.poll(w.svc, JOB, step.version)
            assert step is not None and step.step == "poll"
            countdowns.append(step.countdown)
        assert countdowns == [5.0, 7.5]
        job = w.job()
        assert step is not None and step.version == job.version
        assert (job.state, job.remote_status) == (JobState.SUBMITTED, "PENDING")
        assert (job.polls, job.pending_polls, job.poll_errors) == (2, 2, 0)
        assert job.next_action_at == w.clock.now + 7.5
        assert job.remote_started_at is None
        assert w.api.polls == ["task-1", "task-1"]

    @pytest.mark.parametrize(
        "status", [RemoteStatus.PRE_PROCESSING, RemoteStatus.RUNNING, RemoteStatus.POST_PROCESSING]
    )
    def test_running_statuses(self, w: World, status: RemoteStatus) -> None:
        """Active statuses poll at the running interval and note when the work started."""
        step = submitted(w)
        w.clock.advance(2)
        w.api.poll_script.append(snap(status))
        nxt = steps.poll(w.svc, JOB, step.version)
        job = w.job()
        assert nxt == Next("poll", JOB, job.version, TUNING.poll.running_interval)
        assert (job.remote_status, job.remote_started_at) == (status.value, START + 2)

        w.clock.advance(3)
        w.api.poll_script.append(snap(RemoteStatus.RUNNING))
        assert nxt is not None
        steps.poll(w.svc, JOB, nxt.version)
        assert w.job().remote_started_at == START + 2  # the first sighting is kept

    def test_succeeded_starts_copy(self, w: World) -> None:
        """SUCCEEDED -> COPYING with the URL, its expiry and the duration; copy now."""
        step = submitted(w)
        w.clock.advance(60)
        w.api.poll_script.append(
            snap(RemoteStatus.SUCCEEDED, video_url=VIDEO, video_duration=5.0, end_time=START + 55)
        )
        nxt = steps.poll(w.svc, JOB, step.version)
        job = w.job()
        assert nxt == Next("copy", JOB, job.version, 0)
        assert job.state == JobState.COPYING
        assert (job.video_url, job.video_expires_at, job.video_duration) == (
            VIDEO,
            float(EXPIRES),
            5.0,
        )
        assert job.remote_ended_at == START + 55
        assert job.remote_status == "SUCCEEDED"
        assert job.next_action_at == START + 60

    def test_succeeded_without_expires_uses_end_time(self, w: World) -> None:
        """A URL without Expires is taken to live 24 h from the task's end."""
        step = submitted(w)
        w.api.poll_script.append(
            snap(RemoteStatus.SUCCEEDED, video_url="https://b.test/x.mp4", end_time=START + 5)
        )
        steps.poll(w.svc, JOB, step.version)
        assert w.job().video_expires_at == START + 5 + URL_TTL_SECONDS

    def test_succeeded_without_url_fails(self, w: World) -> None:
        """SUCCEEDED without a video_url: FAILED, DashScopeBadResponse."""
        step = submitted(w)
        w.api.poll_script.append(snap(RemoteStatus.SUCCEEDED))
        assert steps.poll(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.error_code) == (JobState.FAILED, "DashScopeBadResponse")

    def test_remote_failed(self, w: World) -> None:
        """FAILED remotely: FAILED with DashScope's code and message, last status recorded."""
        step = submitted(w)
        w.clock.advance(9)
        w.api.poll_script.append(
            snap(RemoteStatus.FAILED, code="DataInspectionFailed", message="no")
        )
        assert steps.poll(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.error_code, job.error_message) == (
            JobState.FAILED,
            "DataInspectionFailed",
            "no",
        )
        assert (job.remote_status, job.polls) == ("FAILED", 1)
        assert job.finished_at == START + 9
        assert job.next_action_at is None
        assert w.api.cancels == []

    def test_remote_canceled(self, w: World) -> None:
        """CANCELED remotely ends the job CANCELED."""
        step = submitted(w)
        w.api.poll_script.append(snap(RemoteStatus.CANCELED))
        assert steps.poll(w.svc, JOB, step.version) is None
        assert w.job().state == JobState.CANCELED

    def test_unknown_grace_then_failed(self, w: World) -> None:
        """UNKNOWN right after submit is tolerated briefly, then the job FAILS."""
        step: Next | None = submitted(w)
        for _ in range(TUNING.poll.unknown_grace - 1):
            w.api.poll_script.append(snap(RemoteStatus.UNKNOWN))
            assert step is not None
            step = steps.poll(w.svc, JOB, step.version)
            assert step is not None and step.countdown == TUNING.poll.running_interval
        assert w.job().unknown_polls == TUNING.poll.unknown_grace - 1
        w.api.poll_script.append(snap(RemoteStatus.UNKNOWN))
        assert step is not None
        assert steps.poll(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.error_code) == (JobState.FAILED, "RemoteTaskUnknown")

    def test_unrecognised_status_waits(self, w: World) -> None:
        """An undocumented status is recorded raw and polled at the slow interval."""
        step = submitted(w)
        w.api.poll_script.append(snap(RemoteStatus.UNKNOWN, raw="SUSPENDED"))
        nxt = steps.poll(w.svc, JOB, step.version)
        assert nxt is not None and nxt.countdown == TUNING.poll.pending_max
        job = w.job()
        assert (job.state, job.remote_status, job.unknown_polls) == (
            JobState.SUBMITTED,
            "SUSPENDED",
            0,
        )

    def test_stale_version_ignored(self, w: World) -> None:
        """A poll message from an older version neither asks DashScope nor changes the job."""
        step = submitted(w)
        w.api.poll_script.append(snap(RemoteStatus.PENDING))
        nxt = steps.poll(w.svc, JOB, step.version)
        assert nxt is not None
        before = w.job()
        assert steps.poll(w.svc, JOB, step.version) is None
        assert w.job() == before
        assert len(w.api.polls) == 1

    def test_not_submitted_ignored(self, w: World) -> None:
        """A poll for a job in another state, or an unknown job, does nothing."""
        step = queued(w)
        assert steps.poll(w.svc, JOB, step.version) is None
        assert steps.poll(w.svc, "nope", 1) is None
        assert w.api.polls == []

    def test_transient_error_counts_and_retries(self, w: World) -> None:
        """A failed poll: poll again after the error backoff, poll_errors + 1, state unchanged."""
        step = submitted(w)
        w.api.poll_script.append(snap(RemoteStatus.RUNNING))
        step2 = steps.poll(w.svc, JOB, step.version)
        assert step2 is not None
        w.api.poll_script.extend([DashScopeUnavailable("timeout"), DashScopeUnavailable("502")])
        first = steps.poll(w.svc, JOB, step2.version)
        assert first is not None
        second = steps.poll(w.svc, JOB, first.version)
        job = w.job()
        assert second == Next(
            "poll", JOB, job.version, TUNING.poll.error_backoff.delay(2, w.svc.rand)
        )
        assert first.countdown == TUNING.poll.error_backoff.delay(1, w.svc.rand)
        assert (job.state, job.remote_status, job.poll_errors, job.polls) == (
            JobState.SUBMITTED,
            "RUNNING",
            2,
            1,
        )
        w.api.poll_script.append(snap(RemoteStatus.RUNNING))
        assert second is not None
        steps.poll(w.svc, JOB, second.version)
        assert w.job().poll_errors == 0  # consecutive errors only

    def test_transient_error_past_deadline_fails(self, w: World) -> None:
        """A failed poll after the deadline ends the job FAILED, without a cancel."""
        step = submitted(w)
        w.clock.advance(TUNING.poll.deadline)
        w.api.poll_script.append(DashScopeUnavailable("timeout"))
        assert steps.poll(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.error_code) == (JobState.FAILED, "PollDeadlineExceeded")
        assert w.api.cancels == []

    def test_permanent_poll_error_keeps_polling(self, w: World) -> None:
        """Even a 4xx on a query does not abandon a task that may be paid for: retry, show why."""
        step = submitted(w)
        w.api.poll_script.append(DashScopeRejected("bad key", code="InvalidApiKey"))
        retry = steps.poll(w.svc, JOB, step.version)
        assert retry is not None and retry.step == "poll"
        job = w.job()
        assert (job.state, job.error_code, job.poll_errors) == (
            JobState.SUBMITTED,
            "InvalidApiKey",
            1,
        )
        w.api.poll_script.append(snap(RemoteStatus.RUNNING))
        steps.poll(w.svc, JOB, retry.version)
        assert (w.job().error_code, w.job().poll_errors) == (None, 0)

    def test_deadline_while_pending_cancels_remote(self, w: World) -> None:
        """Past the deadline and still PENDING: cancel the (free) remote task, then FAILED."""
        step = submitted(w)
        w.clock.advance(TUNING.poll.deadline)
        w.api.poll_script.append(snap(RemoteStatus.PENDING))
        assert steps.poll(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.error_code, job.remote_status) == (
            JobState.FAILED,
            "PollDeadlineExceeded",
            "PENDING",
        )
        assert w.api.cancels == ["task-1"]

    def test_deadline_while_running_does_not_cancel(self, w: World) -> None:
        """Past the deadline while RUNNING: FAILED, and no cancel (it would not be free)."""
        step = submitted(w)
        w.clock.advance(TUNING.poll.deadline)
        w.api.poll_script.append(snap(RemoteStatus.RUNNING))
        assert steps.poll(w.svc, JOB, step.version) is None
        assert w.job().state == JobState.FAILED
        assert w.api.cancels == []

    def test_cancel_failure_still_finishes(self, w: World) -> None:
        """A cancel that fails is logged; the job still ends FAILED."""
        step = submitted(w)
        w.clock.advance(TUNING.poll.deadline)
        w.api.poll_script.append(snap(RemoteStatus.PENDING))
        w.api.cancel_script.append(DashScopeUnavailable("503"))
        assert steps.poll(w.svc, JOB, step.version) is None
        assert w.job().state == JobState.FAILED
        assert w.api.cancels == ["task-1"]


# ---------------------------------------------------------------------------------------- copy


class TestCopy:
    def test_success_stores(self, w: World) -> None:
        """A verified copy: STORED with bucket, key, bytes and sha256; the error is cleared."""
        step = copying(w)
        w.clock.advance(20)
        w.copier.script.append(StoredCopy("bkt", KEY, 4321, "f" * 64))
        assert steps.copy(w.svc, JOB, step.version) is None
        job = w.job()
        assert job.state == JobState.STORED
        assert (job.s3_bucket, job.s3_key, job.bytes, job.sha256) == ("bkt", KEY, 4321, "f" * 64)
        assert job.s3_uri == f"s3://bkt/{KEY}"
        assert job.copy_attempts == 1
        assert job.copy_started_at == START + 20
        assert job.finished_at == START + 20
        assert (job.error_code, job.error_message, job.next_action_at) == (None, None, None)
        assert w.copier.calls == [
            (VIDEO, KEY, {"job-id": JOB, "dashscope-task-id": "task-1"}),
        ]

    def test_transient_failure_retries(self, w: World) -> None:
        """A transient failure schedules another copy after the backoff, then succeeds."""
        step = copying(w)
        w.copier.script.extend([SourceUnavailable("reset"), stored_copy(KEY)])
        retry = steps.copy(w.svc, JOB, step.version)
        job = w.job()
        delay = TUNING.copy.backoff.delay(1, lambda: 0.5)
        assert retry == Next("copy", JOB, job.version, delay)
        assert (job.state, job.copy_attempts, job.error_code) == (
            JobState.COPYING,
            1,
            "SourceUnavailable",
        )
        assert job.next_action_at == START + delay
        w.clock.advance(delay)
        assert retry is not None
        assert steps.copy(w.svc, JOB, retry.version) is None
        job = w.job()
        assert (job.state, job.copy_attempts, job.error_code) == (JobState.STORED, 2, None)
        assert job.copy_started_at == START  # the first attempt's start is kept

    @pytest.mark.parametrize("error", [StorageUnavailable("S3 503"), CopyMismatch("size differs")])
    def test_mismatch_and_storage_errors_are_retried(self, w: World, error: Exception) -> None:
        """CopyMismatch (S3 holds another size) is retried like a transient error."""
        step = copying(w)
        w.copier.script.append(error)
        retry = steps.copy(w.svc, JOB, step.version)
        assert retry is not None and retry.step == "copy"
        assert w.job().state == JobState.COPYING

    def test_expired_source(self, w: World) -> None:
        """A 403 from the signed URL: EXPIRED."""
        step = copying(w)
        w.copier.script.append(SourceExpired("403"))
        assert steps.copy(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.error_code) == (JobState.EXPIRED, "VideoUrlExpired")

    def test_url_already_expired(self, w: World) -> None:
        """A copy that starts after the URL's expiry ends EXPIRED without trying."""
        step = copying(w)
        w.clock.now = float(EXPIRES)
        assert steps.copy(w.svc, JOB, step.version) is None
        assert w.job().state == JobState.EXPIRED
        assert w.copier.calls == []

    def test_permanent_failure(self, w: World) -> None:
        """A permanent failure: FAILED with its code."""
        step = copying(w)
        w.copier.script.append(SourceRejected("404 from the bucket"))
        assert steps.copy(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.error_code, job.error_message) == (
            JobState.FAILED,
            "VideoUrlRejected",
            "404 from the bucket",
        )

    def test_an_s3_outage_of_twenty_minutes_loses_nothing(self) -> None:
        """S3 refuses every upload for 20 minutes (more attempts than the fixed count of 20 the
        copy once had): it keeps retrying with capped backoff (60 s, as once deployed), and the
        video is stored once S3 is back."""
        w = make_world(copy=dataclasses.replace(TUNING.copy, backoff=Backoff(base=5.0, cap=60.0)))
        step: Next | None = copying(w)
        outage_ends = w.clock.now + 20 * 60
        attempts = 0
        while w.clock.now < outage_ends:
            assert step is not None and step.step == "copy"
            w.copier.script.append(StorageUnavailable("503 Slow Down"))
            step = steps.copy(w.svc, JOB, step.version)
            attempts += 1
            assert step is not None and step.countdown <= w.svc.copy.backoff.cap
            w.clock.advance(step.countdown)
        assert attempts > 20 and w.job().state == JobState.COPYING
        w.copier.script.append(stored_copy(KEY))
        assert step is not None and steps.copy(w.svc, JOB, step.version) is None
        assert w.job().state == JobState.STORED

    def test_an_interrupted_copy_is_sent_again_at_once(self, w: World) -> None:
        """The task's soft time limit: the copy goes on at once, at a new version (the stuck
        attempt's lease renewals are fenced off); a job no longer COPYING is left alone."""
        step = copying(w)
        again = steps.copy_interrupted(w.svc, JOB)
        assert again is not None and (again.step, again.countdown) == ("copy", 0)
        assert again.version > step.version
        w.copier.script.append(stored_copy(KEY))
        assert steps.copy(w.svc, JOB, again.version) is None
        assert steps.copy_interrupted(w.svc, JOB) is None  # STORED

    def test_a_paused_copy_goes_on_at_once_from_its_checkpoint(self, w: World) -> None:
        """A copy that used its time budget: sent again at once (no backoff), and the next
        attempt is handed the checkpoint; the record drops it once the video is stored."""
        step = copying(w)
        w.copier.script.append(CopyPaused("paused at byte 16 MiB", '{"upload_id": "u1"}'))
        again = steps.copy(w.svc, JOB, step.version)
        assert again is not None and (again.step, again.countdown) == ("copy", 0)
        assert w.job().copy_checkpoint == '{"upload_id": "u1"}'
        assert w.job().error_code is None  # not a failure
        w.copier.script.append(stored_copy(KEY))
        assert steps.copy(w.svc, JOB, again.version) is None
        assert w.copier.resumes == [None, '{"upload_id": "u1"}']
        job = w.job()
        assert (job.state, job.copy_checkpoint) == (JobState.STORED, None)

    def test_retries_end_at_the_urls_expiry(self, w: World) -> None:
        """An outage that outlives the URL: the job ends EXPIRED with the last error, and the
        unfinished multipart upload it left is aborted."""
        step: Next | None = copying(w)

        def saves_a_checkpoint() -> None:
            heartbeat = w.copier.heartbeats[-1]
            assert heartbeat is not None
            heartbeat(8 * 1024 * 1024, '{"upload_id": "u9"}')

        w.copier.on_copy = saves_a_checkpoint
        while step is not None:
            w.copier.script.append(StorageUnavailable("503 Slow Down"))
            step = steps.copy(w.svc, JOB, step.version)
            if step is not None:
                w.clock.advance(step.countdown)
        job = w.job()
        assert (job.state, job.error_code) == (JobState.EXPIRED, "VideoUrlExpired")
        assert "StorageUnavailable: 503 Slow Down" in (job.error_message or "")
        assert w.clock.now <= EXPIRES
        assert w.copier.aborted == [(KEY, '{"upload_id": "u9"}')]
        assert job.copy_checkpoint is None

    def test_only_a_later_attempt_looks_for_an_earlier_attempts_object(self, w: World) -> None:
        """An attempt that stored the object and died before recording it: the next attempt
        takes that object as is. The first attempt has no earlier one, so it skips the HEAD."""
        step: Next | None = copying(w)
        looked: list[str] = []
        find = w.copier.find
        w.copier.find = lambda key: looked.append(key) or find(key)  # type: ignore[method-assign]
        w.copier.script.append(SourceUnavailable("the worker died mid-copy"))
        assert step is not None
        step = steps.copy(w.svc, JOB, step.version)
        assert looked == [] and len(w.copier.calls) == 1
        w.copier.objects[KEY] = stored_copy(KEY)  # what that attempt had stored and verified
        assert step is not None
        assert steps.copy(w.svc, JOB, step.version) is None
        assert looked == [KEY] and len(w.copier.calls) == 1  # taken as is: no second download
        assert w.job().state == JobState.STORED

    def test_stale_version_ignored(self, w: World) -> None:
        """A copy message from an older version does nothing."""
        step = copying(w)
        w.copier.script.append(SourceUnavailable("reset"))
        assert steps.copy(w.svc, JOB, step.version) is not None
        before = w.job()
        assert steps.copy(w.svc, JOB, step.version) is None
        assert w.job() == before
        assert len(w.copier.calls) == 1

    def test_not_copying_ignored(self, w: World) -> None:
        """A copy message for a job in another state, or an unknown job, does nothing."""
        step = submitted(w)
        assert steps.copy(w.svc, JOB, step.version) is None
        assert steps.copy(w.svc, "nope", 1) is None
        assert w.copier.calls == []
        assert w.job().state == JobState.SUBMITTED

    def test_copy_finishing_after_job_moved_on(self, w: World) -> None:
        """If the job moved on while the copy ran, the finished copy records nothing."""
        step = copying(w)

        def expire_meanwhile() -> None:
            job = w.job()
            assert w.store.transition(job, JobState.EXPIRED, error_code="VideoUrlExpired")

        w.copier.on_copy = expire_meanwhile
        w.copier.script.append(stored_copy(KEY))
        assert steps.copy(w.svc, JOB, step.version) is None
        job = w.job()
        assert (job.state, job.s3_key) == (JobState.EXPIRED, None)


# ---------------------------------------------------------------------------------------- whole


class TestWholeJob:
    def test_happy_path_follows_each_next(self, w: World) -> None:
        """intake -> submit -> poll (PENDING, RUNNING, SUCCEEDED) -> copy -> STORED."""
        w.api.submit_script.append("task-1")
        w.api.poll_script.extend(
            [
                snap(RemoteStatus.PENDING),
                snap(RemoteStatus.RUNNING),
                snap(RemoteStatus.SUCCEEDED, video_url=VIDEO, end_time=START + 30),
            ]
        )
        w.copier.script.append(stored_copy(KEY))
        by_name = {"submit": steps.submit, "poll": steps.poll, "copy": steps.copy}
        steps.intake(w.svc, kwargs(), (), MSG)
        step: Next | None = woken(w)[0]
        trail = []
        while step is not None:
            trail.append(step.step)
            w.clock.advance(step.countdown)
            step = by_name[step.step](w.svc, step.job_id, step.version)
        assert trail == ["submit", "poll", "poll", "poll", "copy"]
        job = w.job()
        assert job.state == JobState.STORED
        assert job.s3_uri == f"s3://videos-bucket/{KEY}"
        assert len(w.api.submits) == 1


class TestFinish:
    def test_refuses_an_illegal_move(self, w: World) -> None:
        """finish() will not move a job out of a final state."""
        steps.intake(w.svc, kwargs(bogus=1), (), MSG)
        job = w.job()
        assert steps.finish(w.svc, job, Finish(JobState.FAILED, "X", "y")) is None
        assert w.job() == job

    def test_services_are_plain_data(self) -> None:
        """make_services fills every port and a fixed rand."""
        svc = make_services()
        assert svc.rand() == 0.5
        assert svc.clock() == START
        assert isinstance(svc.store, InMemoryJobStore)
        other = replace(svc, s3_prefix="elsewhere")
        assert other.store is svc.store

    def test_unexpected_call_fails_loudly(self) -> None:
        """The fakes refuse calls nobody scripted."""
        api = FakeVideoApi()
        with pytest.raises(AssertionError):
            api.submit("default", JobRequest(IMAGE, TEMPLATE))
        with pytest.raises(AssertionError):
            api.poll("default", "task-1")
        with pytest.raises(AssertionError):
            FakeCopier().copy(VIDEO, KEY, {})
        with pytest.raises(JobNotFound):
            FakeImageProbe(JobNotFound("x")).probe(IMAGE)


# ---------------------------------------------------------------------------------------- budget


class TestDailyBudget:
    """DAILY_BUDGET_CNY: once an account's bills of the (UTC) day reach its budget, no new paid
    job is admitted or submitted until the next day; a job already at DashScope runs on."""

    def test_a_bill_counts_and_a_spent_budget_holds_the_next_job_until_tomorrow(self) -> None:
        w = make_world(daily_budget={"default": 0.5})
        copying(w)  # the first job: billed 5 s x 0.08 CNY = 0.4
        first = w.job()
        assert (first.price_per_second, first.billed_cost) == (0.08, 0.4)
        day = utc_day(w.clock())
        assert w.svc.governor.spent("default", day) == pytest.approx(0.4)
        w.svc.governor.add_spend("default", day, 0.2, "other")  # another job's: 0.6 >= 0.5
        result = steps.intake(w.svc, kwargs(job_id="order-2"), (), "msg-2")
        assert result.state == JobState.QUEUED
        assert woken(w, job_id="order-2") == []  # not admitted
        held = w.job("order-2")
        assert held.admitted_at is None and w.api.submits[1:] == []
        # The next UTC day: the watchdog's admission pass lets it in; it is submitted.
        w.clock.now = next_utc_midnight(w.clock()) + 1
        steps.admission.admit(w.svc, "default")
        (wake,) = woken(w, job_id="order-2")
        w.api.submit_script.append("task-2")
        assert steps.submit(w.svc, "order-2", wake.version) is not None
        assert w.job("order-2").state == JobState.SUBMITTED

    def test_an_admitted_job_is_held_with_the_reason_and_gives_its_slot_back(self) -> None:
        w = make_world(daily_budget={"*": 1.0})
        wake = queued(w)  # admitted while the budget had room
        w.svc.governor.add_spend("default", utc_day(w.clock()), 1.0, "other")
        assert steps.submit(w.svc, JOB, wake.version) is None
        job = w.job()
        assert (job.state, job.admitted_at, job.error_code) == (
            JobState.QUEUED,
            None,
            "BudgetReached",
        )
        assert "daily budget of 1 CNY" in (job.error_message or "")
        assert w.api.submits == [] and w.svc.governor.inflight("default") == []
        w.clock.now = next_utc_midnight(w.clock()) + 1
        steps.admission.admit(w.svc, "default")
        (again,) = [n for n in woken(w) if n.version > wake.version]
        w.api.submit_script.append("task-1")
        assert steps.submit(w.svc, JOB, again.version) is not None
        job = w.job()
        assert job.state == JobState.SUBMITTED and job.error_code is None

    def test_a_job_already_submitting_is_never_held(self) -> None:
        """SUBMITTING may mean a POST went out: it is reconciled or sent, never parked."""
        w = make_world(daily_budget={"default": 0.1})
        wake = queued(w)
        job = w.store.transition(w.job(), JobState.SUBMITTING)
        assert job is not None
        w.svc.governor.add_spend("default", utc_day(w.clock()), 5.0, "other")
        w.api.submit_script.append("task-1")
        assert steps.submit(w.svc, JOB, job.version) is not None
        assert w.job().state == JobState.SUBMITTED and wake.version < job.version


class TestJobsOwnModel:
    def test_a_record_that_names_no_model_is_submitted_to_animate_anyone(self) -> None:
        """Jobs recorded before jobs named their model are AnimateAnyone's, whatever the
        service's default is now (here a Wan model): their lane, bucket and POST stay its."""
        from workers.models import WAN_ANIMATE_MOVE

        w = make_world(profile=WAN_ANIMATE_MOVE)
        request = JobRequest(IMAGE, TEMPLATE, job_id="old", detect=False)  # no model: old record
        now = w.clock()
        job = Job("old", JobState.QUEUED, 3, request, now, now, admitted_at=now)
        w.store.create(job)
        assert (job.model, job.lane, job.submit_kind) == (
            "animate-anyone-gen2", "default", "submit:animate-anyone-gen2",
        )  # fmt: skip
        w.api.submit_script.append("task-old")
        assert steps.submit(w.svc, "old", 3) is not None
        (sent,) = w.api.submits
        assert (sent.model, sent.template_id) == ("animate-anyone-gen2", TEMPLATE)
        assert w.job("old").price_per_second == 0.08  # AnimateAnyone's price
