"""The workflow before generation, over the fakes: the image check, templates as jobs, reuse,
recreation of a refused template, cancel and the watchdog in the new states."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.fakes import (
    TUNING,
    VALID_VIDEO,
    FakeClock,
    FakeCopier,
    FakeImageProbe,
    FakeVideoApi,
    FakeVideoProbe,
    make_services,
    stored_copy,
)
from workers import steps
from workers.adapters.memory.governor import InMemoryGovernor
from workers.adapters.memory.store import InMemoryJobStore
from workers.domain.decisions import RemoteSnapshot
from workers.domain.job import Job
from workers.domain.media import ImageFacts, VideoFacts
from workers.domain.request import JobKind
from workers.domain.states import JobState, RemoteStatus
from workers.domain.templates import Detection, template_job_id
from workers.errors import DashScopeRejected, DashScopeUnavailable, InvalidJobRequest
from workers.steps.context import Next, Services
from workers.steps.intake import _probe_image

IMAGE = "https://img.test/person.png"
DANCE = "https://cdn.test/dance.mp4"
SHA = VALID_VIDEO.sha256
PASS = Detection(True, "full")


class World:
    def __init__(self, **overrides: Any) -> None:
        self.store = InMemoryJobStore()
        self.api = FakeVideoApi()
        self.videos = FakeVideoProbe()
        self.images = FakeImageProbe(ImageFacts("PNG", 200_000, 768, 1024, "aa" * 32))
        self.governor = overrides.pop("governor", None) or InMemoryGovernor(capacity=1)
        self.clock = FakeClock()
        self.copier = FakeCopier([stored_copy(f"videos/j{i}.mp4") for i in range(1, 4)])
        self.svc: Services = make_services(
            copier=self.copier,
            images=self.images,
            store=self.store, api=self.api, videos=self.videos, governor=self.governor,
            clock=self.clock, **overrides,
        )  # fmt: skip

    @property
    def woken(self) -> list[Next]:
        return self.svc.woken  # type: ignore[attr-defined,no-any-return]

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def run(self, count: int | None = None) -> None:
        """Run the wake-ups the use cases ask for, in order: ``count`` of them, or until none is
        left, or until the next one would need a remote answer the test did not script."""
        handlers = {"detect": steps.detect, "prepare": steps.prepare,
                 "submit": steps.submit, "poll": steps.poll, "copy": steps.copy,
                 "webhook": steps.deliver_webhook}  # fmt: skip
        for _ in range(count or 50):
            if not self.woken:
                return
            step = self.woken.pop(0)
            try:
                nxt = handlers[step.step](self.svc, step.job_id, step.version)
            except AssertionError as exc:
                if "nothing scripted" not in str(exc):
                    raise
                self.woken.insert(0, step)
                return
            if nxt is not None:
                self.woken.append(nxt)
        if count is None:
            raise RuntimeError("the jobs did not settle")

    def generate(self, job_id: str, **kwargs: Any) -> steps.IntakeResult:
        return steps.intake(
            self.svc, {"image_url": IMAGE, "job_id": job_id, **kwargs}, (), "m-" + job_id
        )


def template_done(template_id: str = "AACT.default.t1", seconds: float = 3.0) -> RemoteSnapshot:
    return RemoteSnapshot(RemoteStatus.SUCCEEDED, "SUCCEEDED", template_id=template_id,
                          video_duration=seconds, end_time=1.0)  # fmt: skip


def video_done() -> RemoteSnapshot:
    return RemoteSnapshot(RemoteStatus.SUCCEEDED, "SUCCEEDED",
                          video_url="https://b.aliyuncs.com/v.mp4?Expires=9999999999",
                          video_duration=3.0, end_time=1.0)  # fmt: skip


class TestDetect:
    def test_pass_goes_to_the_queue_and_is_cached(self) -> None:
        w = World()
        w.api.detect_script.append(PASS)
        assert w.generate("j1", template_id="AACT.x.1").state == JobState.DETECTING
        assert [n.step for n in w.woken] == ["detect"]
        w.api.submit_script.append("task-1")
        w.run(2)
        job = w.job("j1")
        assert job.state == JobState.SUBMITTED and job.bodystyle == "full"
        assert not job.detect_cached and job.detect_attempts == 1
        assert w.api.detects == [IMAGE]
        # The same image again (same content hash): no second check is billed.
        w.generate("j2", template_id="AACT.x.1")
        step = next(n for n in w.woken if n.job_id == "j2")
        steps.detect(w.svc, "j2", step.version)
        second = w.job("j2")
        assert second.detect_cached and second.detect_attempts == 0
        assert w.api.detects == [IMAGE]

    def test_failed_check_rejects_with_the_reason_and_submits_nothing(self) -> None:
        w = World()
        reason = "The input image has no human body. Please upload other image with single person."
        w.api.detect_script.append(Detection(False, None, reason))
        w.generate("j1", template_id="AACT.x.1")
        w.run()
        job = w.job("j1")
        assert (job.state, job.error_code, job.error_message) == (
            JobState.REJECTED, "InvalidImage.DetectFailed", reason)  # fmt: skip
        assert w.api.submits == [] and w.api.template_submits == []

    @pytest.mark.parametrize(("policy", "bg", "state", "warned"), [
        ("reject", None, JobState.REJECTED, False),
        ("reject", False, JobState.REJECTED, False),
        ("reject", True, JobState.QUEUED, False),
        ("warn", None, JobState.QUEUED, True),
    ])  # fmt: skip
    def test_half_body_without_ref_bg(
        self, policy: str, bg: bool | None, state: JobState, warned: bool
    ) -> None:
        w = World(
            detect=dataclasses.replace(TUNING.detect, half_body=policy),
            governor=InMemoryGovernor(capacity=0),
        )
        w.api.detect_script.append(Detection(True, "half"))
        extra = {} if bg is None else {"use_ref_img_bg": bg}
        w.generate("j1", template_id="AACT.x.1", **extra)
        w.run()
        job = w.job("j1")
        assert job.state == state and job.bodystyle == "half"
        assert (job.warning is not None) == warned
        if state == JobState.REJECTED:
            assert job.error_code == "InvalidImage.HalfBody"

    def test_transient_errors_retry_then_give_up(self) -> None:
        w = World(detect=dataclasses.replace(TUNING.detect, max_attempts=2))
        w.api.detect_script.extend([DashScopeUnavailable("detect: HTTP 503")] * 2)
        w.generate("j1", template_id="AACT.x.1")
        w.run()
        job = w.job("j1")
        assert (job.state, job.error_code, job.detect_attempts) == (
            JobState.FAILED, "DetectRetriesExhausted", 2)  # fmt: skip

    def test_image_fault_from_dashscope_is_a_rejection(self) -> None:
        w = World()
        w.api.detect_script.append(DashScopeRejected("detect: bad", code="InvalidFile.Content"))
        w.generate("j1", template_id="AACT.x.1")
        w.run()
        assert w.job("j1").state == JobState.REJECTED

    def test_turned_off_per_job(self) -> None:
        w = World()
        assert w.generate("j1", template_id="AACT.x.1", detect=False).state == JobState.QUEUED
        assert w.api.detects == []

    def test_one_image_is_checked_by_one_job_at_a_time(self) -> None:
        w = World()
        w.store.claim_detection("default", "ee" * 32, "other-job", 60)
        w.svc = dataclasses.replace(  # an image whose hash another job is checking
            w.svc, images=type(w.svc.images)(ImageFacts("PNG", 1000, 500, 800, "ee" * 32))
        )
        w.generate("j1", template_id="AACT.x.1")
        step = w.woken.pop()
        again = steps.detect(w.svc, step.job_id, step.version)
        assert again is not None and again.step == "detect" and 1 <= again.countdown <= 2
        assert w.api.detects == []
        w.store.save_detection("default", "ee" * 32, PASS, 60)  # the other job's answer lands
        assert steps.detect(w.svc, "j1", again.version) is None
        assert w.job("j1").detect_cached and w.job("j1").state == JobState.QUEUED


class TestTemplates:
    def test_video_url_runs_the_whole_chain_with_a_template_job(self) -> None:
        w = World()
        w.api.detect_script.append(PASS)
        w.api.submit_script.extend(["tpl-task", "vid-task"])
        w.api.poll_script.extend([template_done(), video_done()])
        w.generate("j1", video_url=DANCE)
        w.run()
        maker_id = template_job_id("default", SHA, 1)
        maker, job = w.job(maker_id), w.job("j1")
        assert (maker.kind, maker.state, maker.template_id) == ("template", JobState.READY,
                                                                 "AACT.default.t1")  # fmt: skip
        assert job.state == JobState.STORED and job.template_id == "AACT.default.t1"
        assert not job.template_reused and job.template_job_id == maker_id
        assert w.api.template_submits == [DANCE]
        assert [r.template_id for r in w.api.submits] == ["AACT.default.t1"]
        assert w.store.template_source("default", SHA).template_id == "AACT.default.t1"
        info = w.store.template_info("AACT.default.t1")
        assert info is not None and (info.account, info.source_sha256) == ("default", SHA)

    def test_second_job_for_the_same_dance_reuses_the_template(self) -> None:
        w = World()
        w.store.register_template("AACT.default.t1", "default", source_sha256=SHA)
        w.api.submit_script.append("vid-task")
        w.generate("j2", video_url=DANCE, detect=False)
        w.run(3)
        job = w.job("j2")
        assert job.template_reused and job.template_id == "AACT.default.t1"
        assert w.api.template_submits == []

    def test_templates_are_per_account(self) -> None:
        w = World(accounts=frozenset({"default", "other"}))
        w.store.register_template("AACT.default.t1", "default", source_sha256=SHA)
        w.api.submit_script.append("tpl-task")
        w.generate("j1", video_url=DANCE, detect=False, account="other")
        w.run(3)
        assert w.api.template_submits == [DANCE]
        assert w.api.accounts_used == ["other"]
        assert w.job(template_job_id("other", SHA, 1)).account == "other"

    def test_two_jobs_at_once_share_one_template_job(self) -> None:
        w = World()
        w.generate("j1", video_url=DANCE, detect=False)
        w.generate("j2", video_url=DANCE, detect=False)
        w.api.submit_script.extend(["tpl-task", "v1", "v2"])
        w.api.poll_script.extend([template_done()])
        w.run(8)
        assert w.api.template_submits == [DANCE]
        assert {w.job("j1").template_job_id, w.job("j2").template_job_id} == {
            template_job_id("default", SHA, 1)
        }
        assert {w.job(j).template_id for j in ("j1", "j2")} == {"AACT.default.t1"}

    @pytest.mark.parametrize(("facts", "code"), [
        (VideoFacts("mp4", "h264", 1000, 720, 1280, 15.0, 5.0, SHA), "InvalidVideo.FPS"),
        (VideoFacts("mp4", "h264", 1000, 720, 1280, 24.0, 61.0, SHA), "InvalidVideo.Duration"),
        (VideoFacts("matroska", "h264", 1000, 720, 1280, 24.0, 5.0, SHA), "InvalidVideo.Format"),
    ])  # fmt: skip
    def test_bad_dance_video_is_rejected_locally(self, facts: VideoFacts, code: str) -> None:
        w = World()
        w.videos.script.append(facts)
        w.generate("j1", video_url=DANCE, detect=False)
        w.run()
        job = w.job("j1")
        assert (job.state, job.error_code) == (JobState.REJECTED, code)
        assert w.api.template_submits == [] and w.api.submits == []

    def test_unreachable_video_is_retried_then_failed(self) -> None:
        w = World(prepare=dataclasses.replace(TUNING.prepare, max_attempts=2))
        w.videos.script.extend([DashScopeUnavailable("503")] * 2)
        w.generate("j1", video_url=DANCE, detect=False)
        w.run()
        assert w.job("j1").state == JobState.FAILED and w.job("j1").prepare_attempts == 2

    def test_failed_template_fails_its_waiters_without_another_paid_attempt(self) -> None:
        w = World()
        w.api.submit_script.append("tpl-task")
        w.api.poll_script.append(
            RemoteSnapshot(
                RemoteStatus.FAILED, "FAILED", code="InvalidFile.FullBody", message="not full"
            )
        )
        w.generate("j1", video_url=DANCE, detect=False)
        w.run()
        job = w.job("j1")
        assert (job.state, job.error_code) == (JobState.FAILED, "TemplateFailed")
        assert "InvalidFile.FullBody" in (job.error_message or "")
        # A later job for the same video is told at once: the content would fail again.
        w.generate("j2", video_url=DANCE, detect=False)
        w.run()
        assert w.job("j2").state == JobState.FAILED and w.api.template_submits == [DANCE]

    def test_refused_template_is_made_again_once(self) -> None:
        w = World()
        w.store.register_template("AACT.default.old", "default", source_sha256=SHA,
                                  source_url=DANCE)  # fmt: skip
        refused = DashScopeRejected(
            "Invalid template content.", code="InvalidFile.Template.Content"
        )
        w.api.submit_script.extend([refused, "tpl-task", "vid-task"])
        w.api.poll_script.extend([template_done("AACT.default.new"), video_done()])
        w.generate("j1", template_id="AACT.default.old", detect=False)
        w.run()
        job = w.job("j1")
        assert job.state == JobState.STORED
        assert (job.template_recreated, job.rejected_template, job.template_id) == (
            True, "AACT.default.old", "AACT.default.new")  # fmt: skip
        assert w.api.template_submits == [DANCE]
        old = w.store.template_info("AACT.default.old")
        assert old is not None and old.revoked
        assert w.store.template_source("default", SHA).template_id == "AACT.default.new"

    def test_refused_twice_fails(self) -> None:
        w = World()
        refused = DashScopeRejected(
            "Invalid template content.", code="InvalidFile.Template.Content"
        )
        w.api.submit_script.extend(["tpl-task", refused, "tpl-task-2", refused])
        w.api.poll_script.extend([template_done("AACT.default.a"), template_done("AACT.default.b")])
        w.generate("j1", video_url=DANCE, detect=False)
        w.run()
        job = w.job("j1")
        assert (job.state, job.error_code) == (JobState.FAILED, "InvalidFile.Template.Content")
        assert len(w.api.template_submits) == 2

    def test_refused_template_of_unknown_origin_fails(self) -> None:
        w = World()
        refused = DashScopeRejected(
            "Invalid template content.", code="InvalidFile.Template.Content"
        )
        w.api.submit_script.append(refused)
        w.generate("j1", template_id="AACT.x.unknown", detect=False)
        w.run()
        assert w.job("j1").state == JobState.FAILED and w.api.template_submits == []

    def test_template_job_of_a_producer(self) -> None:
        w = World()
        w.api.submit_script.append("tpl-task")
        w.api.poll_script.append(template_done())
        result = steps.intake(w.svc, {"video_url": DANCE, "job_id": "t1"}, (), "m",
                                 JobKind.TEMPLATE)  # fmt: skip
        assert result.state == JobState.PREPARING
        w.run()
        job = w.job("t1")
        assert (job.state, job.template_id, job.kind) == (JobState.READY, "AACT.default.t1",
                                                           "template")  # fmt: skip
        # Asked again for the same video: READY at once with the same template, nothing paid.
        steps.intake(w.svc, {"video_url": DANCE, "job_id": "t2"}, (), "m2", JobKind.TEMPLATE)
        w.run()
        again = w.job("t2")
        assert (again.state, again.template_id, again.template_reused) == (
            JobState.READY, "AACT.default.t1", True)  # fmt: skip
        assert w.api.template_submits == [DANCE]

    def test_templates_have_their_own_lane(self) -> None:
        """A template job does not wait behind the account's video jobs (one slot per model)."""
        w = World()
        w.generate("v1", template_id="AACT.x.1", detect=False)  # takes the video slot
        w.generate("j1", video_url=DANCE, detect=False)
        step = next(n for n in w.woken if n.job_id == "j1")
        assert steps.prepare(w.svc, "j1", step.version) is None
        maker_id = template_job_id("default", SHA, 1)
        assert w.governor.inflight("default") == ["v1"]
        assert w.governor.inflight("default:template") == [maker_id]


class TestCancelAndWatchdog:
    def test_cancel_while_detecting_or_preparing_is_free(self) -> None:
        w = World()
        w.generate("j1", template_id="AACT.x.1")
        assert steps.cancel(w.svc, "j1").outcome == "canceled"
        w.generate("j2", video_url=DANCE, detect=False)
        w.run(2)  # waiting for its template job
        assert w.job("j2").state == JobState.PREPARING
        assert steps.cancel(w.svc, "j2").outcome == "canceled"
        assert w.job(template_job_id("default", SHA, 1)).state == JobState.QUEUED  # goes on

    def test_lost_wake_up_of_a_waiting_job_is_recovered(self) -> None:
        w = World(prepare=dataclasses.replace(TUNING.prepare, recheck_seconds=600))
        w.api.submit_script.extend(["tpl-task", "vid-task"])
        w.generate("j1", video_url=DANCE, detect=False)
        w.run(3)
        maker_id = template_job_id("default", SHA, 1)
        # The template finishes, but its wake-up of the waiter is lost (the worker died).
        w.api.poll_script.append(template_done())
        poll = next(n for n in w.woken if n.step == "poll")
        w.woken.clear()
        w.svc = dataclasses.replace(w.svc, wake=lambda step: None)
        steps.poll(w.svc, maker_id, poll.version)
        assert w.job(maker_id).state == JobState.READY and w.job("j1").state == JobState.PREPARING
        woken: list[Next] = []
        w.svc = dataclasses.replace(w.svc, wake=woken.append)
        w.clock.advance(600 + 31)
        report = steps.watchdog(w.svc, grace=30, max_resumes=3, accounts=["default"])
        assert report.resumed == ["j1"]
        assert steps.prepare(w.svc, "j1", woken[0].version) is None
        assert w.job("j1").state == JobState.QUEUED

    def test_a_long_wait_is_not_poison(self) -> None:
        """Re-checks of a job whose template is still being made reset the resume count."""
        w = World(prepare=dataclasses.replace(TUNING.prepare, recheck_seconds=60),
                  poll=dataclasses.replace(TUNING.poll, first_delay=1, running_interval=300))  # fmt: skip
        w.api.submit_script.append("tpl-task")
        w.generate("j1", video_url=DANCE, detect=False)
        w.run()
        for _ in range(6):  # the template job runs for a long time (and is polled meanwhile)
            w.clock.advance(60 + 31)
            w.api.poll_script.append(RemoteSnapshot(RemoteStatus.RUNNING, "RUNNING"))
            steps.watchdog(w.svc, grace=30, max_resumes=2, accounts=[])
            assert any(n.job_id == "j1" for n in w.woken), "the watchdog re-checks the waiter"
            w.run()
            assert w.job("j1").state == JobState.PREPARING, w.job("j1").error_message


def test_s3_inputs_must_be_in_our_bucket() -> None:
    w = World(input_bucket="ours")
    w.generate("j1", template_id="AACT.x.1", image_url="s3://theirs/inputs/a.png")
    job = w.job("j1")
    assert (job.state, job.error_code) == (JobState.REJECTED, "InvalidRequest.BadUrl")


def test_unreachable_image_at_intake_is_rejected() -> None:
    w = World()
    w.svc = dataclasses.replace(
        w.svc, images=type(w.svc.images)(DashScopeUnavailable("image: 503"))
    )
    w.generate("j1", template_id="AACT.x.1")
    assert w.job("j1").error_code == "InvalidImage.Unreachable"
    with pytest.raises(InvalidJobRequest):
        _probe_image(w.svc, w.job("j1").request, w.svc.profile.image)


class Recorder:
    """Metrics checked against the exporter's definitions, and kept for assertions."""

    def __init__(self) -> None:
        from workers.adapters.redis.metrics import NoMetrics

        self.check = NoMetrics()
        self.seen: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self.check.inc(name, amount, **labels)
        self.seen.append((name, amount, labels))

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.check.observe(name, value, **labels)
        self.seen.append((name, value, labels))

    def values(self, name: str) -> list[tuple[float, dict[str, str]]]:
        return [(v, labels) for n, v, labels in self.seen if n == name]


def test_the_chain_reports_its_metrics() -> None:
    """Billed seconds (template and video), copy figures and outcomes, under known names."""
    metrics = Recorder()
    w = World(metrics=metrics)
    w.api.detect_script.append(PASS)
    w.api.submit_script.extend(["tpl-task", "vid-task"])
    w.api.poll_script.extend([template_done(seconds=2.5), video_done()])
    w.generate("j1", video_url=DANCE, producer="shop")
    w.clock.advance(5)
    w.run()
    assert w.job("j1").state == JobState.STORED
    assert metrics.values("video_seconds_total") == [
        (2.5, {"account": "default", "producer": "shop", "kind": "template"}),
        (3.0, {"account": "default", "producer": "shop", "kind": "video"}),
    ]
    finished = metrics.values("jobs_finished_total")
    assert [labels["state"] for _, labels in finished] == ["READY", "STORED"]
    ((size, _),) = metrics.values("copy_bytes_total")
    assert size == w.job("j1").bytes
    ((delay, _),) = metrics.values("copy_delay_seconds")
    assert delay == w.job("j1").finished_at - 1.0  # the remote end_time the poll reported
    ((margin, _),) = metrics.values("expiry_margin_seconds")
    assert margin == 9_999_999_999 - w.job("j1").finished_at
