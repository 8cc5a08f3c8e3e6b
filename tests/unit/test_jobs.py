"""workers.domain, the pure core: request and image rules, transitions, backoff, every decision."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tests.fakes import TUNING
from workers.domain.decisions import (
    Finish,
    RemoteSnapshot,
    RetryCopy,
    StartCopy,
    Wait,
    copy_expired,
    decide_copy_error,
    decide_poll,
    decide_poll_error,
    url_expiry,
)
from workers.domain.job import Job, s3_key
from workers.domain.media import ImageFacts, check_image
from workers.domain.policies import Backoff
from workers.domain.request import MAX_METADATA_BYTES, MAX_URL_LENGTH, JobRequest, parse_request
from workers.domain.states import (
    ACTIVE_REMOTE,
    FINAL_STATES,
    TRANSITIONS,
    URL_TTL_SECONDS,
    JobState,
    RemoteStatus,
    can_move,
)
from workers.errors import InvalidJobRequest
from workers.models import ANIMATE_ANYONE_GEN2 as AA

NOW = 1_700_000_000.0
IMAGE = "https://img.test/person.png"
TEMPLATE = "AACT.acct.1234-5678"
EXPIRES = 1_700_086_400
VIDEO = f"https://bucket.oss.test/out/t1.mp4?Expires={EXPIRES}&OSSAccessKeyId=x&Signature=y"
POLICY = TUNING.poll


def valid(**changes: Any) -> dict[str, Any]:
    return {"image_url": IMAGE, "template_id": TEMPLATE, **changes}


def rejected(kwargs: dict[str, Any], args: tuple[Any, ...] = ()) -> str:
    with pytest.raises(InvalidJobRequest) as info:
        parse_request(kwargs, args)
    return info.value.code


def make_job(**changes: Any) -> Job:
    base = Job(
        job_id="job-1",
        state=JobState.SUBMITTED,
        version=3,
        request=JobRequest(IMAGE, TEMPLATE),
        created_at=NOW - 100,
        updated_at=NOW - 100,
        submitted_at=NOW - 60,
        remote_task_id="task-1",
    )
    return dataclasses.replace(base, **changes)


def remote(status: RemoteStatus, raw: str | None = None, **fields: Any) -> RemoteSnapshot:
    return RemoteSnapshot(status=status, raw_status=raw or status.value, **fields)


class TestParseRequest:
    def test_minimal_request(self) -> None:
        """Only image_url and template_id are required; the rest default."""
        request = parse_request(valid())
        assert request == JobRequest(IMAGE, TEMPLATE, None, None, None, {})

    def test_full_request(self) -> None:
        """Every allowed field is kept as given."""
        request = parse_request(
            valid(use_ref_img_bg=True, video_ratio="3:4", job_id="order-7:a_b.c", metadata={"a": 1})
        )
        assert request == JobRequest(IMAGE, TEMPLATE, True, "3:4", "order-7:a_b.c", {"a": 1})

    def test_unknown_field(self) -> None:
        """A field outside the contract is refused, naming it."""
        with pytest.raises(InvalidJobRequest) as info:
            parse_request(valid(callback="x", image="y"))
        assert info.value.code == "InvalidRequest.UnknownField"
        assert "'callback', 'image'" in info.value.message

    def test_positional_args(self) -> None:
        """animate.generate takes kwargs only."""
        assert rejected(valid(), (IMAGE,)) == "InvalidRequest.PositionalArgs"

    @pytest.mark.parametrize(
        "job_id",
        ["", "-starts-with-dash", ".dot", "has space", "slash/x", "x" * 129, 42, "ok\n", "é"],
    )
    def test_bad_job_id(self, job_id: Any) -> None:
        """job_id: 1-128 of letters, digits and . _ : -, alphanumeric first; no trailing newline."""
        assert rejected(valid(job_id=job_id)) == "InvalidRequest.JobId"

    @pytest.mark.parametrize("job_id", ["a", "A" * 128, "0.1_2:3-4", None])
    def test_good_job_id(self, job_id: str | None) -> None:
        """The job_id bounds, and None (the message id is used)."""
        assert parse_request(valid(job_id=job_id)).job_id == job_id

    @pytest.mark.parametrize("url", [None, "", 7])
    def test_missing_image_url(self, url: Any) -> None:
        """image_url must be a non-empty string."""
        assert rejected(valid(image_url=url)) == "InvalidRequest.MissingField"

    def test_image_url_absent(self) -> None:
        """A request without image_url is refused."""
        assert rejected({"template_id": TEMPLATE}) == "InvalidRequest.MissingField"

    @pytest.mark.parametrize(
        "url",
        [
            "ftp://img.test/a.png",
            "file:///etc/passwd",
            "img.test/a.png",
            "https:///a.png",
            "http://[::1/a.png",
            "https://img.test/" + "a" * (MAX_URL_LENGTH - len("https://img.test/") + 1),
        ],
    )
    def test_bad_image_url(self, url: str) -> None:
        """http(s) only, with a host, parseable, at most 2048 characters."""
        assert rejected(valid(image_url=url)) == "InvalidRequest.BadUrl"

    def test_image_url_at_length_limit(self) -> None:
        """A URL of exactly 2048 characters is fine."""
        url = "https://img.test/" + "a" * (MAX_URL_LENGTH - len("https://img.test/"))
        assert parse_request(valid(image_url=url)).image_url == url

    @pytest.mark.parametrize("template", [None, "", 3])
    def test_missing_template_id(self, template: Any) -> None:
        """template_id must be a non-empty string."""
        assert rejected(valid(template_id=template)) == "InvalidRequest.MissingField"

    @pytest.mark.parametrize(
        "template",
        ["acct.1234", "AACT.", "AACT.x", "AACT.-abc", "AACT.a b", "aact.abc", "AACT.ab\n"],
    )
    def test_bad_template_id(self, template: str) -> None:
        """template_id looks like AACT.<alnum><2-255 of alnum . _ ->."""
        assert rejected(valid(template_id=template)) == "InvalidRequest.TemplateId"

    @pytest.mark.parametrize("template", ["AACT.ab", "AACT." + "a" * 255])
    def test_template_id_bounds(self, template: str) -> None:
        """The shortest and longest template ids pass."""
        assert parse_request(valid(template_id=template)).template_id == template

    @pytest.mark.parametrize("value", ["true", 1, 0, "yes"])
    def test_use_ref_img_bg_type(self, value: Any) -> None:
        """use_ref_img_bg is a real bool, not a truthy value."""
        assert rejected(valid(use_ref_img_bg=value)) == "InvalidRequest.BadType"

    @pytest.mark.parametrize("value", [True, False])
    def test_use_ref_img_bg_bools(self, value: bool) -> None:
        """Both bools are kept."""
        assert parse_request(valid(use_ref_img_bg=value)).use_ref_img_bg is value

    @pytest.mark.parametrize("ratio", ["16:9", "1:1", "", 0.5625, "9/16"])
    def test_video_ratio_values(self, ratio: Any) -> None:
        """Only 9:16 and 3:4."""
        assert rejected(valid(use_ref_img_bg=True, video_ratio=ratio)) == (
            "InvalidRequest.VideoRatio"
        )

    @pytest.mark.parametrize("ratio", ["9:16", "3:4"])
    def test_video_ratio_accepted(self, ratio: str) -> None:
        """Both documented ratios pass with use_ref_img_bg=True."""
        assert parse_request(valid(use_ref_img_bg=True, video_ratio=ratio)).video_ratio == ratio

    @pytest.mark.parametrize("bg", [None, False])
    def test_video_ratio_without_ref_bg(self, bg: bool | None) -> None:
        """video_ratio only applies with use_ref_img_bg=True."""
        kwargs = valid(video_ratio="9:16")
        if bg is not None:
            kwargs["use_ref_img_bg"] = bg
        assert rejected(kwargs) == "InvalidRequest.VideoRatioWithoutRefBg"

    @pytest.mark.parametrize("metadata", [[1, 2], "x", 3])
    def test_metadata_not_an_object(self, metadata: Any) -> None:
        """metadata must be a JSON object."""
        assert rejected(valid(metadata=metadata)) == "InvalidRequest.Metadata"

    @pytest.mark.parametrize(
        "metadata", [{"a": object()}, {"a": {1, 2}}, {("t",): 1}, {"a": float("nan")}]
    )
    def test_metadata_not_json(self, metadata: dict[Any, Any]) -> None:
        """metadata must serialise as plain JSON (NaN is not JSON)."""
        assert rejected(valid(metadata=metadata)) == "InvalidRequest.Metadata"

    def test_metadata_size_limit(self) -> None:
        """Compact JSON of at most 4096 bytes passes; one more byte does not."""
        filler = MAX_METADATA_BYTES - len(json.dumps({"k": ""}, separators=(",", ":")))
        at_limit = {"k": "x" * filler}
        assert parse_request(valid(metadata=at_limit)).metadata == at_limit
        assert rejected(valid(metadata={"k": "x" * (filler + 1)})) == "InvalidRequest.Metadata"

    def test_metadata_none_is_empty(self) -> None:
        """metadata=None means no metadata."""
        assert parse_request(valid(metadata=None)).metadata == {}

    def test_rule_order_reports_first_problem(self) -> None:
        """Unknown fields are reported before the other rules."""
        assert rejected({"bogus": 1}) == "InvalidRequest.UnknownField"


class TestCheckImage:
    @pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
    def test_formats_accepted(self, fmt: str) -> None:
        """The three documented formats pass."""
        check_image(ImageFacts(fmt, 1000, 640, 480), AA.image)

    @pytest.mark.parametrize("fmt", ["GIF", "WEBP", "jpeg", None])
    def test_format_refused(self, fmt: str | None) -> None:
        """Anything else, and an unknown format, is refused."""
        with pytest.raises(InvalidJobRequest) as info:
            check_image(ImageFacts(fmt, 1000, 640, 480), AA.image)
        assert info.value.code == "InvalidImage.Format"
        assert (fmt or "unknown") in info.value.message

    def test_size_must_be_under_5_mib(self) -> None:
        """Exactly 5 MiB is refused; one byte less passes; an unknown size passes."""
        with pytest.raises(InvalidJobRequest) as info:
            check_image(ImageFacts("PNG", AA.image.max_bytes, 640, 480), AA.image)
        assert info.value.code == "InvalidImage.Size"
        check_image(ImageFacts("PNG", AA.image.max_bytes - 1, 640, 480), AA.image)
        check_image(ImageFacts("PNG", None, 640, 480), AA.image)

    @pytest.mark.parametrize(("w", "h"), [(0, 100), (100, 0), (0, 0), (-5, 10)])
    def test_no_pixels(self, w: int, h: int) -> None:
        """A zero (or negative) dimension is refused before any division."""
        with pytest.raises(InvalidJobRequest) as info:
            check_image(ImageFacts("PNG", 10, w, h), AA.image)
        assert info.value.code == "InvalidImage.Dimensions"

    @pytest.mark.parametrize(("w", "h"), [(4097, 3000), (3000, 4097)])
    def test_longest_side(self, w: int, h: int) -> None:
        """The longest side is at most 4096."""
        with pytest.raises(InvalidJobRequest) as info:
            check_image(ImageFacts("JPEG", 10, w, h), AA.image)
        assert info.value.code == "InvalidImage.LongestSide"

    @pytest.mark.parametrize(("w", "h"), [(2001, 1000), (1000, 2001), (100, 300)])
    def test_aspect(self, w: int, h: int) -> None:
        """The aspect ratio is at most 2, either way round."""
        with pytest.raises(InvalidJobRequest) as info:
            check_image(ImageFacts("JPEG", 10, w, h), AA.image)
        assert info.value.code == "InvalidImage.AspectRatio"

    @pytest.mark.parametrize(("w", "h"), [(4096, 2048), (2048, 4096), (4096, 4096), (1, 2), (1, 1)])
    def test_happy_path_at_the_limits(self, w: int, h: int) -> None:
        """4096 on the long side, aspect exactly 2, just under 5 MiB: all pass."""
        check_image(ImageFacts("BMP", AA.image.max_bytes - 1, w, h), AA.image)


class TestTransitions:
    def test_finals_have_no_exits(self) -> None:
        """No move leaves a final state, not even to itself."""
        for final in FINAL_STATES:
            assert final not in TRANSITIONS
            for target in JobState:
                assert not can_move(final, target)

    def test_every_state_is_final_or_has_exits(self) -> None:
        """A non-final state always has somewhere to go."""
        for state in JobState:
            assert (state in FINAL_STATES) != (state in TRANSITIONS)

    @pytest.mark.parametrize(
        ("source", "target"),
        [
            (JobState.QUEUED, JobState.STORED),
            (JobState.QUEUED, JobState.SUBMITTED),
            (JobState.QUEUED, JobState.COPYING),
            (JobState.QUEUED, JobState.FAILED),
            (JobState.SUBMITTING, JobState.QUEUED),
            (JobState.SUBMITTING, JobState.COPYING),
            (JobState.SUBMITTING, JobState.REJECTED),
            (JobState.SUBMITTED, JobState.SUBMITTING),
            (JobState.SUBMITTED, JobState.STORED),
            (JobState.SUBMITTED, JobState.REJECTED),
            (JobState.COPYING, JobState.SUBMITTED),
            (JobState.COPYING, JobState.CANCELED),
        ],
    )
    def test_forbidden_moves(self, source: JobState, target: JobState) -> None:
        """No skipping ahead, no going back, REJECTED only from intake."""
        assert not can_move(source, target)

    @pytest.mark.parametrize(
        ("source", "target"),
        [
            (JobState.QUEUED, JobState.SUBMITTING),
            (JobState.QUEUED, JobState.REJECTED),
            (JobState.QUEUED, JobState.CANCELED),
            (JobState.SUBMITTING, JobState.SUBMITTING),
            (JobState.SUBMITTING, JobState.SUBMITTED),
            (JobState.SUBMITTING, JobState.FAILED),
            (JobState.SUBMITTED, JobState.SUBMITTED),
            (JobState.SUBMITTED, JobState.COPYING),
            (JobState.SUBMITTED, JobState.CANCELED),
            (JobState.COPYING, JobState.COPYING),
            (JobState.COPYING, JobState.STORED),
            (JobState.COPYING, JobState.EXPIRED),
            (JobState.COPYING, JobState.FAILED),
        ],
    )
    def test_allowed_moves(self, source: JobState, target: JobState) -> None:
        """The life of a job in the design notes."""
        assert can_move(source, target)

    def test_job_final_and_s3_uri(self) -> None:
        """Job.final follows the state; s3_uri needs both bucket and key."""
        assert not make_job().final
        assert make_job(state=JobState.STORED).final
        assert make_job().s3_uri is None
        assert make_job(s3_bucket="b").s3_uri is None
        assert make_job(s3_bucket="b", s3_key="p/j.mp4").s3_uri == "s3://b/p/j.mp4"


class TestBackoff:
    @pytest.mark.parametrize("attempt", [0, 1, 2, 5, 8, 9, 30, 5000])
    def test_jitter_within_half_and_full_ceiling(self, attempt: int) -> None:
        """The delay lies in [ceiling/2, ceiling], with ceiling = min(cap, base * 2^(attempt-1))."""
        backoff = Backoff(base=2.0, cap=300.0)
        ceiling = min(300.0, 2.0 * 2.0 ** min(max(0, attempt - 1), 60))
        assert backoff.delay(attempt, lambda: 0.0) == ceiling / 2
        assert backoff.delay(attempt, lambda: 0.999999) <= ceiling
        assert backoff.delay(attempt, lambda: 0.999999) > ceiling * 0.99

    def test_growth_doubles(self) -> None:
        """Each attempt doubles the ceiling, from base at the first."""
        backoff = Backoff(base=2.0, cap=1e9)
        delays = [backoff.delay(n, lambda: 1.0) for n in range(1, 6)]
        assert delays == [2.0, 4.0, 8.0, 16.0, 32.0]
        assert backoff.delay(0, lambda: 1.0) == 2.0  # attempt 0 is treated as the first

    def test_cap(self) -> None:
        """Past the cap, the delay stays within [cap/2, cap]."""
        backoff = Backoff(base=5.0, cap=300.0)
        assert backoff.delay(7, lambda: 1.0) == 300.0
        assert backoff.delay(7, lambda: 0.0) == 150.0

    def test_huge_attempt_does_not_overflow(self) -> None:
        """A very long run of attempts stays at the cap instead of raising OverflowError."""
        assert Backoff(base=2.0, cap=60.0).delay(10_000, lambda: 0.5) == 45.0

    def test_default_rand(self) -> None:
        """Without a rand the delay still lies within the bounds."""
        for _ in range(50):
            assert 1.0 <= Backoff(base=2.0, cap=60.0).delay(1) <= 2.0


class TestUrlExpiry:
    def test_expires_param(self) -> None:
        """The signed URL's Expires epoch wins."""
        assert url_expiry(VIDEO, NOW, NOW) == float(EXPIRES)

    @pytest.mark.parametrize(
        "query", ["Expires=soon", "Expires=1.5e9", "Expires=", "Expires=" + "9" * 400, "x=1"]
    )
    def test_bad_or_missing_expires_falls_back_to_end_time(self, query: str) -> None:
        """Without a usable Expires: end time + 24 h."""
        url = f"https://bucket.oss.test/out.mp4?{query}"
        assert url_expiry(url, NOW - 50, NOW) == NOW - 50 + URL_TTL_SECONDS

    def test_no_end_time_falls_back_to_now(self) -> None:
        """Without Expires or end time: now + 24 h."""
        assert url_expiry("https://b.test/out.mp4", None, NOW) == NOW + URL_TTL_SECONDS

    def test_unparseable_url(self) -> None:
        """A URL urlsplit refuses also falls back."""
        assert url_expiry("http://[::1/x?Expires=5", None, NOW) == NOW + URL_TTL_SECONDS


class TestDecidePoll:
    def test_pending_backoff_grows_to_max(self) -> None:
        """PENDING: 5 s, then half as much again each time, up to 30 s."""
        waits = [
            decide_poll(make_job(pending_polls=n), remote(RemoteStatus.PENDING), NOW, POLICY)
            for n in range(8)
        ]
        assert all(isinstance(w, Wait) and w.reason == "pending" for w in waits)
        seconds = [w.seconds for w in waits if isinstance(w, Wait)]
        assert seconds[:4] == [5.0, 7.5, 11.25, 16.875]
        assert seconds == sorted(seconds)
        assert seconds[-1] == POLICY.pending_max
        far = decide_poll(make_job(pending_polls=10_000), remote(RemoteStatus.PENDING), NOW, POLICY)
        assert far == Wait(POLICY.pending_max, "pending")

    @pytest.mark.parametrize("status", sorted(ACTIVE_REMOTE))
    def test_running_statuses(self, status: RemoteStatus) -> None:
        """PRE-PROCESSING, RUNNING and POST-PROCESSING poll at the running interval."""
        assert decide_poll(make_job(), remote(status), NOW, POLICY) == Wait(
            POLICY.running_interval, "running"
        )

    def test_succeeded_expiry_from_url(self) -> None:
        """SUCCEEDED starts the copy; the deadline is the URL's Expires."""
        snap = remote(RemoteStatus.SUCCEEDED, video_url=VIDEO, video_duration=5.2, end_time=NOW)
        assert decide_poll(make_job(), snap, NOW, POLICY) == StartCopy(VIDEO, float(EXPIRES), 5.2)

    def test_succeeded_expiry_from_end_time(self) -> None:
        """Without Expires in the URL: end_time + 24 h."""
        url = "https://bucket.oss.test/out.mp4"
        snap = remote(RemoteStatus.SUCCEEDED, video_url=url, end_time=NOW - 10)
        decision = decide_poll(make_job(), snap, NOW, POLICY)
        assert decision == StartCopy(url, NOW - 10 + URL_TTL_SECONDS, None)

    def test_succeeded_after_deadline_still_copies(self) -> None:
        """A paid result is never thrown away for lateness."""
        snap = remote(RemoteStatus.SUCCEEDED, video_url=VIDEO)
        late = NOW + POLICY.deadline * 2
        assert isinstance(decide_poll(make_job(), snap, late, POLICY), StartCopy)

    @pytest.mark.parametrize("url", [None, ""])
    def test_succeeded_without_url(self, url: str | None) -> None:
        """SUCCEEDED without a video_url is a bad response: FAILED."""
        decision = decide_poll(
            make_job(), remote(RemoteStatus.SUCCEEDED, video_url=url), NOW, POLICY
        )
        assert decision == Finish(
            JobState.FAILED, "DashScopeBadResponse", "the task SUCCEEDED without a video_url"
        )

    def test_failed_keeps_remote_code(self) -> None:
        """FAILED carries DashScope's code and message."""
        snap = remote(RemoteStatus.FAILED, code="InvalidParameter", message="bad image")
        assert decide_poll(make_job(), snap, NOW, POLICY) == Finish(
            JobState.FAILED, "InvalidParameter", "bad image"
        )

    def test_failed_without_code(self) -> None:
        """FAILED without details still says what happened."""
        decision = decide_poll(make_job(), remote(RemoteStatus.FAILED), NOW, POLICY)
        assert isinstance(decision, Finish)
        assert decision.state == JobState.FAILED
        assert decision.code == "RemoteFailed"
        assert decision.message

    def test_canceled(self) -> None:
        """CANCELED remotely ends the job CANCELED."""
        decision = decide_poll(make_job(), remote(RemoteStatus.CANCELED), NOW, POLICY)
        assert isinstance(decision, Finish)
        assert (decision.state, decision.code) == (JobState.CANCELED, "RemoteCanceled")

    def test_unknown_grace_then_failed(self) -> None:
        """UNKNOWN is tolerated a little while (unknown_grace - 1 waits), then FAILED."""
        snap = remote(RemoteStatus.UNKNOWN)
        for seen in range(POLICY.unknown_grace - 1):
            assert decide_poll(make_job(unknown_polls=seen), snap, NOW, POLICY) == Wait(
                POLICY.running_interval, "unknown"
            )
        decision = decide_poll(make_job(unknown_polls=POLICY.unknown_grace - 1), snap, NOW, POLICY)
        assert isinstance(decision, Finish)
        assert (decision.state, decision.code) == (JobState.FAILED, "RemoteTaskUnknown")
        assert not decision.cancel_remote

    def test_unrecognised_status_waits(self) -> None:
        """A status this code does not know (mapped to UNKNOWN, raw kept) keeps polling slowly."""
        snap = remote(RemoteStatus.UNKNOWN, raw="SUSPENDED")
        assert decide_poll(make_job(unknown_polls=99), snap, NOW, POLICY) == Wait(
            POLICY.pending_max, "unrecognised status SUSPENDED"
        )

    def test_deadline_cancels_only_pending(self) -> None:
        """Past the deadline: FAILED; the remote task is cancelled (free) only while PENDING."""
        late = NOW - 60 + POLICY.deadline
        pending = decide_poll(make_job(), remote(RemoteStatus.PENDING), late, POLICY)
        assert isinstance(pending, Finish)
        assert (pending.state, pending.code, pending.cancel_remote) == (
            JobState.FAILED,
            "PollDeadlineExceeded",
            True,
        )
        for status in (*ACTIVE_REMOTE, RemoteStatus.UNKNOWN):
            raw = "SUSPENDED" if status == RemoteStatus.UNKNOWN else None
            decision = decide_poll(make_job(), remote(status, raw), late, POLICY)
            assert isinstance(decision, Finish)
            assert decision.code == "PollDeadlineExceeded"
            assert not decision.cancel_remote
            assert (raw or status.value) in (decision.message or "")

    def test_just_before_deadline_waits(self) -> None:
        """One second before the deadline the job still waits."""
        early = NOW - 60 + POLICY.deadline - 1
        assert isinstance(
            decide_poll(make_job(), remote(RemoteStatus.RUNNING), early, POLICY), Wait
        )

    def test_deadline_counts_from_creation_without_submitted_at(self) -> None:
        """A job with no submitted_at measures its deadline from created_at."""
        job = make_job(submitted_at=None)
        late = job.created_at + POLICY.deadline
        assert isinstance(decide_poll(job, remote(RemoteStatus.RUNNING), late, POLICY), Finish)


class TestDecidePollError:
    def test_backoff_from_consecutive_errors(self) -> None:
        """A failed poll waits by the error backoff, growing with consecutive errors."""
        rand = lambda: 0.5  # noqa: E731
        policy = dataclasses.replace(POLICY, error_backoff=Backoff(base=2.0, cap=60.0))
        first = decide_poll_error(make_job(poll_errors=0), NOW, policy, rand)
        third = decide_poll_error(make_job(poll_errors=2), NOW, policy, rand)
        assert first == Wait(1.5, "poll error")
        assert third == Wait(6.0, "poll error")
        capped = decide_poll_error(make_job(poll_errors=50), NOW, policy, rand)
        assert capped == Wait(45.0, "poll error")

    def test_deadline(self) -> None:
        """Past the deadline a failed poll ends the job FAILED."""
        job = make_job()
        assert job.submitted_at is not None
        decision = decide_poll_error(job, job.submitted_at + POLICY.deadline, POLICY, lambda: 0.5)
        assert isinstance(decision, Finish)
        assert (decision.state, decision.code) == (JobState.FAILED, "PollDeadlineExceeded")
        assert not decision.cancel_remote


class TestDecideCopyError:
    POLICY = dataclasses.replace(TUNING.copy, expiry_margin=600.0)

    def job(self, **changes: Any) -> Job:
        fields: dict[str, Any] = {
            "state": JobState.COPYING,
            "video_url": VIDEO,
            "video_expires_at": NOW + 3600,
            "copy_attempts": 1,
        }
        return make_job(**{**fields, **changes})

    def test_transient_retries_with_backoff(self) -> None:
        """A transient failure retries after the copy backoff."""
        decision = decide_copy_error(
            self.job(), "SourceUnavailable", "reset", True, NOW, self.POLICY, lambda: 0.5
        )
        assert decision == RetryCopy(3.75)

    def test_expired_code(self) -> None:
        """A 403 on the signed URL (VideoUrlExpired) ends the job EXPIRED, even if not yet due."""
        decision = decide_copy_error(self.job(), "VideoUrlExpired", "403", False, NOW, self.POLICY)
        assert isinstance(decision, Finish)
        assert (decision.state, decision.code) == (JobState.EXPIRED, "VideoUrlExpired")
        assert "403" in (decision.message or "")

    def test_past_expiry(self) -> None:
        """Any failure once the URL has expired ends the job EXPIRED."""
        decision = decide_copy_error(
            self.job(), "SourceUnavailable", "reset", True, NOW + 3600, self.POLICY
        )
        assert isinstance(decision, Finish)
        assert decision.state == JobState.EXPIRED

    def test_permanent(self) -> None:
        """A permanent failure ends the job FAILED with its code."""
        decision = decide_copy_error(self.job(), "VideoUrlRejected", "404", False, NOW, self.POLICY)
        assert decision == Finish(JobState.FAILED, "VideoUrlRejected", "404")

    def test_no_attempt_count_ends_a_copy(self) -> None:
        """However many attempts failed, a transient failure is retried while the URL lives:
        S3 outages last longer than any fixed count of backoffs."""
        decision = decide_copy_error(
            self.job(copy_attempts=500), "StorageUnavailable", "503", True, NOW, self.POLICY
        )
        assert isinstance(decision, RetryCopy)
        assert decision.seconds <= self.POLICY.backoff.cap

    def test_the_last_try_is_at_the_margin_before_expiry(self) -> None:
        """A retry that would land inside the safety margin before the URL's expiry is moved to
        the margin's start; a failure inside the margin ends the job EXPIRED, saying why."""
        job = self.job(copy_attempts=9, video_expires_at=NOW + 700)
        decision = decide_copy_error(job, "StorageUnavailable", "503", True, NOW, self.POLICY,
                                     lambda: 1.0)  # fmt: skip
        assert decision == RetryCopy(100.0)
        last = dataclasses.replace(job, copy_attempts=10)
        ended = decide_copy_error(last, "StorageUnavailable", "503", True, NOW + 100, self.POLICY)
        assert isinstance(ended, Finish)
        assert (ended.state, ended.code) == (JobState.EXPIRED, "VideoUrlExpired")
        assert "10 copy attempts" in (ended.message or "")
        assert "StorageUnavailable: 503" in (ended.message or "")

    def test_no_expiry_known(self) -> None:
        """Without a known expiry the delay is not clipped."""
        job = self.job(video_expires_at=None, copy_attempts=2)
        decision = decide_copy_error(
            job, "SourceUnavailable", "x", True, NOW, self.POLICY, lambda: 1.0
        )
        assert decision == RetryCopy(10.0)

    def test_copy_expired(self) -> None:
        """copy_expired: only with a known expiry, from that instant on."""
        assert not copy_expired(self.job(video_expires_at=None), NOW)
        assert not copy_expired(self.job(), NOW + 3599)
        assert copy_expired(self.job(), NOW + 3600)


class TestS3Key:
    @pytest.mark.parametrize(
        ("prefix", "key"),
        [
            ("videos", "videos/j-1.mp4"),
            ("/videos/", "videos/j-1.mp4"),
            ("a/b", "a/b/j-1.mp4"),
            ("", "j-1.mp4"),
            ("/", "j-1.mp4"),
        ],
    )
    def test_key(self, prefix: str, key: str) -> None:
        """Deterministic: prefix (slashes trimmed) / job_id .mp4."""
        assert s3_key(prefix, "j-1") == key
