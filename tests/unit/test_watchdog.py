"""The watchdog use case and the copy lease, over the fakes: who is resumed, who is poison."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.fakes import FakeClock, FakeQueueWatch, make_services, stored_copy
from workers import steps
from workers.domain.decisions import RemoteSnapshot
from workers.domain.states import JobState, RemoteStatus
from workers.domain.templates import Detection
from workers.errors import StaleStep
from workers.steps.context import Next, Services

IMAGE = "https://img.test/person.png"
TEMPLATE = "AACT.acct.1234-5678"
VIDEO = "https://bucket.oss.test/out/t.mp4?Expires=9999999999&Signature=s"


def woken(svc: Services) -> list[Next]:
    return list(svc.woken)  # type: ignore[attr-defined]


def died_mid_step(svc: Services, job_id: str) -> None:
    """A worker took the job's current step and died before finishing it (SIGKILL)."""
    job = svc.store.get(job_id)
    assert job is not None
    svc.store.take(job_id, job.version)


def run(svc: Services, **kw: Any) -> steps.WatchdogReport:
    return steps.watchdog(svc, grace=30, max_resumes=kw.get("max_resumes", 3), accounts=["default"])


def submitted(svc: Services, job_id: str = "j1") -> Next:
    steps.intake(
        svc,
        {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": job_id, "detect": False},
        (),
        "m",
    )
    (submit,) = [n for n in woken(svc) if n.job_id == job_id and n.step == "submit"]
    svc.api.submit_script.append(f"task-{job_id}")  # type: ignore[attr-defined]
    step = steps.submit(svc, job_id, submit.version)
    assert step is not None and step.step == "poll"
    return step


@pytest.fixture
def svc() -> Services:
    return make_services()


def clock(svc: Services) -> FakeClock:
    assert isinstance(svc.clock, FakeClock)
    return svc.clock


class TestWatchdog:
    def test_on_time_jobs_are_left_alone(self, svc: Services) -> None:
        """A job whose poll is due but not overdue by the grace is not touched."""
        step = submitted(svc)
        clock(svc).advance(step.countdown + 29)
        assert run(svc).resumed == []

    def test_lost_poll_is_resumed_with_a_new_version(self, svc: Services) -> None:
        """Overdue past the grace: a fresh poll at a new version; the lost one would be stale."""
        step = submitted(svc)
        clock(svc).advance(step.countdown + 31)
        assert run(svc).resumed == ["j1"]
        resume = woken(svc)[-1]
        assert (resume.step, resume.job_id, resume.countdown) == ("poll", "j1", 0)
        assert resume.version > step.version
        svc.api.poll_script.append(RemoteSnapshot(RemoteStatus.RUNNING, "RUNNING"))  # type: ignore[attr-defined]
        assert steps.poll(svc, "j1", step.version) is None  # the original: stale
        assert steps.poll(svc, "j1", resume.version) is not None

    def test_submitting_resumes_submit(self, svc: Services) -> None:
        """A job stuck in SUBMITTING gets its submit step back (which reconciles first)."""
        steps.intake(
            svc,
            {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "j1", "detect": False},
            (),
            "m",
        )
        assert len(woken(svc)) == 1
        job = svc.store.get("j1")
        assert job is not None
        svc.store.transition(job, JobState.SUBMITTING, submit_ambiguous=True,
                             next_action_at=clock(svc)() + 45)  # fmt: skip
        clock(svc).advance(80)
        assert run(svc).resumed == ["j1"]
        assert woken(svc)[-1].step == "submit"

    def test_a_step_that_kills_its_worker_before_payment_is_poison(self, svc: Services) -> None:
        """A detect step taken and never finished, max_resumes times in a row: FAILED
        PoisonJob, nothing paid (it would keep taking workers down)."""
        steps.intake(svc, {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "j1"}, (), "m")
        for _ in range(3):
            died_mid_step(svc, "j1")
            clock(svc).advance(100)
            assert run(svc).resumed == ["j1"]
        died_mid_step(svc, "j1")
        clock(svc).advance(100)
        report = run(svc)
        assert report.poisoned == ["j1"]
        job = svc.store.get("j1")
        assert job is not None
        assert (job.state, job.error_code) == (JobState.FAILED, "PoisonJob")
        assert svc.api.submits == []  # type: ignore[attr-defined]

    def test_progress_resets_the_count(self, svc: Services) -> None:
        """Deaths count in a row: a step that finishes cleanly starts the count again."""
        steps.intake(svc, {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "j1"}, (), "m")
        for _ in range(2):
            died_mid_step(svc, "j1")
            clock(svc).advance(100)
            run(svc)
        job = svc.store.get("j1")
        assert job is not None and job.resumes == 2
        svc.api.detect_script.append(Detection(True, "full"))  # type: ignore[attr-defined]
        assert steps.detect(svc, "j1", woken(svc)[-1].version) is None  # done: QUEUED
        job = svc.store.get("j1")
        assert job is not None and (job.state, job.resumes) == (JobState.QUEUED, 0)

    def test_unadmitted_queued_jobs_are_not_resumed(self, svc: Services) -> None:
        """Jobs waiting in our queue have no deadline: 10,000 of them cost the watchdog nothing."""
        svc.governor.capacity = 0  # type: ignore[attr-defined]
        steps.intake(
            svc,
            {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "q", "detect": False},
            (),
            "m",
        )
        clock(svc).advance(1000)
        assert run(svc).resumed == []
        assert svc.store.due(clock(svc)()) == []


class TestCopyLease:
    def test_lease_renews_and_fences(self, svc: Services) -> None:
        """While bytes flow the lease moves forward; once taken over, renewing raises StaleStep."""
        step = submitted(svc)
        svc.api.poll_script.append(  # type: ignore[attr-defined]
            RemoteSnapshot(
                RemoteStatus.SUCCEEDED, "SUCCEEDED", video_url=VIDEO, end_time=clock(svc)()
            )
        )
        copy_step = steps.poll(svc, "j1", step.version)
        assert copy_step is not None and copy_step.step == "copy"
        outcome: list[str] = []

        def copy_with_takeover(
            url: str, key: str, metadata: dict[str, str], heartbeat: Any, **_: Any
        ) -> Any:
            heartbeat()  # renews
            job = svc.store.get("j1")
            assert job is not None and job.next_action_at == clock(svc)() + svc.copy.lease_seconds
            svc.store.transition(job, JobState.COPYING)  # another worker takes over
            try:
                heartbeat()
            except StaleStep:
                outcome.append("stale")
                raise
            return stored_copy(key)

        svc.copier.copy = copy_with_takeover  # type: ignore[method-assign]
        assert steps.copy(svc, "j1", copy_step.version) is None
        assert outcome == ["stale"]
        job = svc.store.get("j1")
        assert job is not None and job.state == JobState.COPYING  # the stale copy recorded nothing


def test_video_on_unexpected_host_is_not_fetched() -> None:
    """A video_url outside the allowed hosts ends the job FAILED before any download."""
    svc = make_services(video_hosts=("*.aliyuncs.com",))
    step = submitted(svc)
    svc.api.poll_script.append(  # type: ignore[attr-defined]
        RemoteSnapshot(
            RemoteStatus.SUCCEEDED,
            "SUCCEEDED",
            video_url="http://169.254.169.254/x.mp4",
            end_time=clock(svc)(),
        )
    )
    copy_step = steps.poll(svc, "j1", step.version)
    assert copy_step is not None
    assert steps.copy(svc, "j1", copy_step.version) is None
    job = svc.store.get("j1")
    assert job is not None and (job.state, job.error_code) == (
        JobState.FAILED,
        "UnexpectedVideoHost",
    )
    assert svc.copier.calls == []  # type: ignore[attr-defined]


class TestCancel:
    def test_remote_pending_is_cancelled_at_dashscope(self, svc: Services) -> None:
        """A job queued at DashScope is cancelled there and ends CANCELED."""
        submitted(svc)
        result = steps.cancel(svc, "j1")
        assert result.outcome == "canceled"
        assert svc.api.cancels == ["task-j1"]  # type: ignore[attr-defined]
        job = svc.store.get("j1")
        assert job is not None and job.state == JobState.CANCELED

    def test_running_is_too_late_and_still_copied(self, svc: Services) -> None:
        """Running at DashScope: too late; by default the paid video is still stored."""
        step = submitted(svc)
        svc.api.poll_script.append(RemoteSnapshot(RemoteStatus.RUNNING, "RUNNING"))  # type: ignore[attr-defined]
        step2 = steps.poll(svc, "j1", step.version)
        assert step2 is not None
        assert steps.cancel(svc, "j1").outcome == "too_late"
        assert svc.api.cancels == []  # type: ignore[attr-defined]
        job = svc.store.get("j1")
        assert job is not None and job.cancel_requested

    def test_running_not_copied_when_configured(self) -> None:
        """CANCEL_TOO_LATE_COPY=false: the finished task is not copied; CANCELED CancelTooLate."""
        svc = make_services(copy_after_late_cancel=False)
        step = submitted(svc)
        svc.api.poll_script.append(RemoteSnapshot(RemoteStatus.RUNNING, "RUNNING"))  # type: ignore[attr-defined]
        step = steps.poll(svc, "j1", step.version) or step
        steps.cancel(svc, "j1")
        job = svc.store.get("j1")
        assert job is not None
        svc.api.poll_script.append(  # type: ignore[attr-defined]
            RemoteSnapshot(
                RemoteStatus.SUCCEEDED, "SUCCEEDED", video_url=VIDEO, end_time=clock(svc)()
            )
        )
        assert steps.poll(svc, "j1", job.version) is None
        job = svc.store.get("j1")
        assert job is not None and (job.state, job.error_code) == (
            JobState.CANCELED,
            "CancelTooLate",
        )
        assert svc.copier.calls == []  # type: ignore[attr-defined]


def test_copy_progress_reaches_the_job() -> None:
    """The reader's heartbeat reports bytes so far; the lease renewal records them on the job."""
    import io

    from workers.adapters.s3.storage import SourceReader

    counts: list[int] = []
    chunks = iter([b"a" * 10, b"b" * 20, b"c" * 5])
    reader = SourceReader(chunks, expected_size=35, source="x", heartbeat=counts.append,
                          heartbeat_every=0)  # fmt: skip
    assert io.BufferedReader(reader).read() == b"a" * 10 + b"b" * 20 + b"c" * 5
    assert counts == [0, 10, 30]  # called before each chunk is counted

    svc = make_services()
    step = submitted(svc)
    svc.api.poll_script.append(  # type: ignore[attr-defined]
        RemoteSnapshot(RemoteStatus.SUCCEEDED, "SUCCEEDED", video_url=VIDEO, end_time=clock(svc)())
    )
    copy_step = steps.poll(svc, "j1", step.version)
    assert copy_step is not None
    seen: list[int | None] = []

    def copy(url: str, key: str, metadata: dict[str, str], heartbeat: Any, **_: Any) -> Any:
        heartbeat(1234)
        job = svc.store.get("j1")
        seen.append(job.copy_bytes if job else None)
        return stored_copy(key)

    svc.copier.copy = copy  # type: ignore[method-assign]
    steps.copy(svc, "j1", copy_step.version)
    assert seen == [1234]


def copying(svc: Services, video: str = VIDEO) -> Next:
    """A job whose paid video waits to be copied (its copy message sent, not yet taken)."""
    step = submitted(svc)
    svc.api.poll_script.append(  # type: ignore[attr-defined]
        RemoteSnapshot(RemoteStatus.SUCCEEDED, "SUCCEEDED", video_url=video, end_time=clock(svc)())
    )
    copy_step = steps.poll(svc, "j1", step.version)
    assert copy_step is not None and copy_step.step == "copy"
    return copy_step


class TestBacklogIsNotACrash:
    """A message waiting in a backlog is not a dead worker (issue: the watchdog failed paid jobs
    when the transfer pool was down for about 5.5 minutes)."""

    @pytest.mark.parametrize(
        "transfer",
        [(0, 0.0), (2, 10_000.0)],
        ids=["pool-down", "pool-saturated"],
    )
    def test_transfer_pool_down_ten_minutes(self, transfer: tuple[int, float]) -> None:
        """Copy messages wait 10 minutes in `transfer` (nobody consumes it, or its oldest
        message is older than the job's wait): no resume, no count, no second message, not
        failed; when the pool takes the original message, the video is stored."""
        queues = FakeQueueWatch({"celery": (1, 0.0), "dashscope": (1, 0.0), "transfer": transfer})
        svc = make_services(queues=queues)
        step = copying(svc)
        before = len(woken(svc))
        for _ in range(40):  # a pass every 15 s for 10 minutes
            clock(svc).advance(15)
            report = run(svc)
            assert report.resumed == [] and report.poisoned == []
        assert len(woken(svc)) == before  # nothing more put in the queue
        job = svc.store.get("j1")
        assert job is not None and (job.state, job.resumes, job.version) == (
            JobState.COPYING,
            0,
            step.version,
        )
        queues.states["transfer"] = (1, 0.0)  # the pool is back and takes the message
        svc.copier.script.append(stored_copy("videos/j1.mp4"))  # type: ignore[attr-defined]
        assert steps.copy(svc, "j1", step.version) is None
        job = svc.store.get("j1")
        assert job is not None and job.state == JobState.STORED
        assert len(svc.copier.calls) == 1  # type: ignore[attr-defined]

    def test_a_lost_message_is_sent_again_without_counting(self) -> None:
        """The queue flows (its oldest message is younger than this job's wait), so the job's
        message is not in it: lost (a SIGKILLed worker held it). Sent again, version bumped,
        not counted as a death, however often it happens."""
        svc = make_services(queues=FakeQueueWatch({"dashscope": (1, 0.0)}))
        step = submitted(svc)
        for i in range(8):
            clock(svc).advance(100)
            assert run(svc).resumed == ["j1"]
            job = svc.store.get("j1")
            assert job is not None and (job.state, job.resumes) == (JobState.SUBMITTED, 0)
            assert woken(svc)[-1].step == "poll" and woken(svc)[-1].version > step.version + i

    def test_one_outstanding_message_per_job(self) -> None:
        """A resent message that then waits in a backlog is not resent again and again."""
        queues = FakeQueueWatch({"dashscope": (1, 0.0)})
        svc = make_services(queues=queues)
        submitted(svc)
        clock(svc).advance(100)
        assert run(svc).resumed == ["j1"]  # lost: sent again
        queues.states["dashscope"] = (1, 10_000.0)  # now the queue is backed up
        before = len(woken(svc))
        for _ in range(20):
            clock(svc).advance(15)
            assert run(svc).resumed == []
        assert len(woken(svc)) == before


class TestPaidJobsAreNeverPoisoned:
    def test_a_copy_that_keeps_killing_its_worker_retries_until_the_url_dies(self) -> None:
        """Deaths mid-copy are counted and backed off, never PoisonJob while the URL lives; the
        URL's expiry ends the job EXPIRED."""
        svc = make_services(queues=FakeQueueWatch({"transfer": (1, 0.0)}))
        expires = int(clock(svc)()) + 24 * 3600
        latest = copying(svc, f"https://b.oss.test/v.mp4?Expires={expires}&Signature=s")
        job = svc.store.get("j1")
        assert job is not None and job.video_expires_at is not None
        delays: list[float] = []
        while clock(svc).advance(latest.countdown) < job.video_expires_at:
            svc.copier.script.append(WorkerDied())  # type: ignore[attr-defined]
            with pytest.raises(WorkerDied):
                steps.copy(svc, "j1", latest.version)
            clock(svc).advance(svc.copy.lease_seconds + 31)
            report = run(svc, max_resumes=2)
            assert report.poisoned == []
            current = svc.store.get("j1")
            assert current is not None and current.state == JobState.COPYING, current
            latest = woken(svc)[-1]
            assert latest.step == "copy"
            delays.append(latest.countdown)
            if len(delays) > 2000:
                raise AssertionError("no end in sight")
        assert max(delays) <= svc.copy.backoff.cap and delays[-1] > delays[0]
        steps.copy(svc, "j1", latest.version)
        current = svc.store.get("j1")
        assert current is not None
        assert (current.state, current.error_code) == (JobState.EXPIRED, "VideoUrlExpired")

    def test_a_poll_that_keeps_dying_is_not_poisoned(self) -> None:
        """A polling job whose polls die (unrelated hiccups) is resumed, never failed for it:
        its remote task is paid and will be copied."""
        svc = make_services(queues=FakeQueueWatch({"dashscope": (1, 0.0)}))
        submitted(svc)
        for _ in range(10):
            died_mid_step(svc, "j1")
            clock(svc).advance(woken(svc)[-1].countdown + 100)
            assert run(svc, max_resumes=2).poisoned == []
        job = svc.store.get("j1")
        assert job is not None and job.state == JobState.SUBMITTED and job.resumes == 10


class WorkerDied(BaseException):
    """Stands for a SIGKILL mid-step: nothing the pipeline catches."""


def test_a_crash_right_after_admission_leaves_nothing_stuck() -> None:
    """The worker dies between the admission and sending the job's submit message (two leaks
    of this kind used to stop a default lane: a slot held by a job QUEUED and never admitted).
    The slot and the admission are one step, so the job is admitted and due, and the watchdog
    sends its submit."""
    svc = make_services()
    sent: list[Next] = []

    def dies(step: Next) -> None:
        raise WorkerDied()

    svc = dataclasses.replace(svc, wake=dies)
    with pytest.raises(WorkerDied):
        steps.intake(
            svc,
            {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "j1", "detect": False},
            (),
            "m",
        )
    job = svc.store.get("j1")
    assert job is not None and job.state == JobState.QUEUED and job.admitted_at is not None
    assert svc.governor.inflight("default") == ["j1"]  # type: ignore[attr-defined]
    svc = dataclasses.replace(svc, wake=sent.append)
    clock(svc).advance(31)
    assert run(svc).resumed == ["j1"]
    [submit] = sent
    svc.api.submit_script.append("task-j1")  # type: ignore[attr-defined]
    assert steps.submit(svc, "j1", submit.version) is not None
    assert svc.store.get("j1").state == JobState.SUBMITTED  # type: ignore[union-attr]


def test_a_worker_killed_mid_intake_leaves_a_job_the_watchdog_finds() -> None:
    """The record exists from intake's first write, RECEIVED with a deadline: the worker dying
    while the image is fetched leaves a job the watchdog has checked again (animate.validate);
    nothing was sent before that check passed."""
    from tests.fakes import FakeImageProbe

    class DiesOnce(FakeImageProbe):
        def probe(self, url: str, *, trusted: bool = False) -> Any:
            if not self.probes:
                self.probes.append(url)
                raise WorkerDied()
            return super().probe(url, trusted=trusted)

    svc = make_services(images=DiesOnce())
    with pytest.raises(WorkerDied):
        steps.intake(svc, {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "j1"}, (), "m")
    job = svc.store.get("j1")
    assert job is not None and job.state == JobState.RECEIVED and job.next_action_at is not None
    assert svc.store.due(clock(svc)() + svc.intake_seconds) == ["j1"]
    clock(svc).advance(svc.intake_seconds + 31)
    assert run(svc).resumed == ["j1"]
    resume = woken(svc)[-1]
    assert resume.step == "validate"
    assert steps.validate(svc, "j1", resume.version) is None
    job = svc.store.get("j1")
    assert job is not None and job.state == JobState.DETECTING  # checked, on its way
    assert woken(svc)[-1].step == "detect"
    assert svc.api.detects == [] and svc.api.submits == []  # type: ignore[attr-defined]


def test_a_received_job_can_be_cancelled_for_free() -> None:
    svc = make_services()
    svc.images.facts = WorkerDied()  # type: ignore[attr-defined]
    with pytest.raises(WorkerDied):
        steps.intake(svc, {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "j1"}, (), "m")
    assert steps.cancel(svc, "j1").outcome == "canceled"
    assert svc.store.get("j1").state == JobState.CANCELED  # type: ignore[union-attr]


def test_a_queued_job_left_out_of_its_lane_is_put_back() -> None:
    """QUEUED jobs have a deadline too: one that a crash left out of its lane's queue (between
    the move and the enqueue) is put back when the watchdog looks, and goes on."""
    svc = make_services()
    svc.governor.capacity = 0  # type: ignore[attr-defined]
    steps.intake(
        svc, {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "j1", "detect": False}, (), "m"
    )
    job = svc.store.get("j1")
    assert job is not None and job.state == JobState.QUEUED and job.next_action_at is not None
    assert svc.governor.dequeue(job)  # type: ignore[attr-defined]  # "the crash"
    svc.governor.capacity = 2  # type: ignore[attr-defined]
    clock(svc).advance(svc.queued_recheck - 60)
    run(svc)
    assert svc.store.get("j1").admitted_at is None  # type: ignore[union-attr]  # not due yet
    clock(svc).advance(120)
    run(svc)
    job = svc.store.get("j1")
    assert job is not None and job.admitted_at is not None
    assert woken(svc)[-1].step == "submit"


class TestDeliveries:
    """Results, callbacks and webhooks go out at least once: a worker that dies between a job's
    final move and its deliveries leaves a final job with a deadline, which the watchdog
    delivers."""

    def test_a_death_between_the_final_move_and_the_result_is_delivered_later(self) -> None:
        published: list[str] = []

        class Results:
            dead = True

            def publish(self, job: Any) -> None:
                if self.dead:
                    self.dead = False
                    raise WorkerDied()
                published.append(job.job_id)

        svc = make_services(results=Results(), queues=FakeQueueWatch({"transfer": (1, 0.0)}))
        copy_step = copying(svc)
        svc.copier.script.append(stored_copy("videos/j1.mp4"))  # type: ignore[attr-defined]
        with pytest.raises(WorkerDied):
            steps.copy(svc, "j1", copy_step.version)
        job = svc.store.get("j1")
        assert job is not None and job.state == JobState.STORED  # the video is safe
        assert (job.delivery, job.published) == ("pending", False) and published == []
        clock(svc).advance(svc.delivery_seconds + 31)
        assert run(svc).resumed == ["j1"]
        deliver = woken(svc)[-1]
        assert deliver.step == "deliver"
        assert steps.deliver(svc, "j1", deliver.version) is None
        job = svc.store.get("j1")
        assert job is not None and (job.delivery, job.published) == (None, True)
        assert published == ["j1"]
        assert svc.store.due(clock(svc)() + 10_000) == []  # nothing left to do

    def test_webhook_retries_have_the_watchdog_behind_them(self) -> None:
        """A webhook retry whose message is lost is sent again by the watchdog; a delivered
        webhook ends the deliveries."""
        from workers.errors import TransientError

        sent: list[str] = []

        class Hooks:
            def send(self, url: str, msg_id: str, payload: dict[str, Any]) -> None:
                sent.append(msg_id)
                if len(sent) == 1:
                    raise TransientError("503", code="WebhookUnavailable")

        svc = make_services(webhooks=Hooks(), queues=FakeQueueWatch({"transfer": (1, 0.0)}))
        steps.intake(
            svc,
            {"image_url": IMAGE, "template_id": TEMPLATE, "job_id": "j1", "detect": False,
             "webhook_url": "https://hooks.test/h"},
            (),
            "m",
        )  # fmt: skip
        steps.cancel(svc, "j1")  # final: CANCELED, its webhook due
        job = svc.store.get("j1")
        assert job is not None and job.state == JobState.CANCELED
        assert (job.delivery, job.webhook_state, sent) == ("pending", "pending", ["msg_j1"])
        retry = woken(svc)[-1]
        assert retry.step == "deliver" and retry.countdown > 0
        clock(svc).advance(retry.countdown + 60)  # the retry's message was lost
        assert run(svc).resumed == ["j1"]
        again = woken(svc)[-1]
        assert steps.deliver(svc, "j1", again.version) is None
        job = svc.store.get("j1")
        assert job is not None and (job.delivery, job.webhook_state) == (None, "delivered")
        assert sent == ["msg_j1", "msg_j1"]  # the same id: the receiver's key to deduplicate


def test_the_admission_pass_covers_every_models_lane(svc: Services) -> None:
    """Each model has its own lane per account: the watchdog's pass admits a job waiting in a
    Wan model's lane as it does AnimateAnyone's (a budget hold, or a lost wake-up, leaves jobs
    there with nothing else to admit them)."""
    svc.governor.capacity = 0  # type: ignore[attr-defined]
    steps.intake(
        svc,
        {"image_url": IMAGE, "video_url": "https://cdn.test/d.mp4", "job_id": "wan",
         "model": "wan2.2-animate-mix", "mode": "wan-std"},
        (),
        "m",
    )  # fmt: skip
    (prepare,) = [n for n in woken(svc) if n.step == "prepare"]
    steps.prepare(svc, "wan", prepare.version)
    job = svc.store.get("wan")
    assert job is not None and (job.state, job.lane) == (
        JobState.QUEUED,
        "default:wan2.2-animate-mix",
    )
    assert [n for n in woken(svc) if n.step == "submit"] == []
    svc.governor.capacity = 2  # type: ignore[attr-defined]
    run(svc)
    assert [n.job_id for n in woken(svc) if n.step == "submit"] == ["wan"]
