"""Prepare: the dance video, checked against the model's limits; then, for a model that takes
action templates, its template, reused or made by a template job."""

from __future__ import annotations

import logging

from workers.domain.decisions import (
    Finish,
    template_failed_for_good,
)
from workers.domain.job import Job
from workers.domain.media import check_template_video
from workers.domain.request import (
    JobKind,
    JobRequest,
)
from workers.domain.states import JobState
from workers.domain.templates import (
    template_job_id,
)
from workers.errors import (
    DashScopeRejected,
    InvalidJobRequest,
    TransientError,
)
from workers.steps.admission import admit, enqueue, free_slot
from workers.steps.context import (
    WAKE_TIMER,
    Next,
    Services,
    begin_attempt,
    load,
    profile_of,
    retry_later,
    source_ref,
    then,
)
from workers.steps.finish import finish

log = logging.getLogger(__name__)


TEMPLATE_REFUSED = "InvalidFile.Template.Content"  # DashScope: no such template for this account


def prepare(svc: Services, job_id: str, version: int) -> Next | None:
    """Check a job's dance video (once), then, for a model that takes action templates, reuse
    the account's template for it, wait for the template job making it, or start that job; a
    model that takes the video itself queues the job."""
    job = load(svc, job_id, version)
    if job is None or job.state != JobState.PREPARING:
        return None
    if job.source_sha256 is None:
        checked = _check_source(svc, job)
        if not isinstance(checked, Job):
            return checked  # the retry's wake-up, or None: the job ended or moved on
        job = checked
    if not profile_of(svc, job).takes_templates:
        # The video goes with the call itself (Wan2.2-Animate): checked, it waits for a slot.
        enqueue(svc, job)
        return None
    for _ in range(3):  # compare-and-set on the source record: go again if another job moved it
        outcome = _resolve_template(svc, job)
        if outcome is not _AGAIN:
            return outcome if isinstance(outcome, Next) else None
        reloaded = svc.store.get(job_id)
        if reloaded is None or reloaded.version != job.version:
            return None
    return retry_later(svc, job, "prepare", 1.0 + svc.rand())


def _check_source(svc: Services, job: Job) -> Job | Next | None:
    """Fetch and check the dance video against the model's limits, once: the job with the
    video's hash and length recorded, a retry's wake-up, or None (the job ended or moved on)."""
    if svc.videos is None:
        finish(svc, job, Finish(JobState.FAILED, "NoVideoProbe", "no video probe configured"))
        return None
    attempt = begin_attempt(svc, job, JobState.PREPARING, "prepare_attempts",
                            svc.prepare.attempt_seconds)  # fmt: skip
    if attempt is None:
        return None
    job = attempt
    try:
        url, trusted = svc.inputs.for_us(source_ref(job))
        facts = svc.videos.probe(url, trusted=trusted)
        profile = profile_of(svc, job)
        limits = profile.template_video if profile.takes_templates else profile.input_video
        if limits is None:
            raise InvalidJobRequest(f"{profile.name} makes no action templates",
                                    code="InvalidRequest.TemplateOrVideo")  # fmt: skip
        check_template_video(facts, limits)
    except InvalidJobRequest as exc:
        finish(svc, job, Finish(JobState.REJECTED, exc.code, exc.message))
        return None
    except TransientError as exc:
        if job.prepare_attempts >= svc.prepare.max_attempts:
            finish(svc, job, Finish(JobState.FAILED, exc.code,
                                    f"{job.prepare_attempts} attempts to fetch the dance "
                                    f"video failed; last: {exc.message}"))  # fmt: skip
            return None
        delay = svc.prepare.backoff.delay(job.prepare_attempts, svc.rand)
        return retry_later(svc, job, "prepare", delay, error=exc)
    return svc.store.transition(
        job,
        JobState.PREPARING,
        source_sha256=facts.sha256,
        source_seconds=round(facts.seconds, 3),
        error_code=None,
        error_message=None,
        updated_at=svc.clock(),
    )


_AGAIN = object()


def _resolve_template(svc: Services, job: Job) -> Next | object | None:
    assert job.source_sha256 is not None
    account, sha = job.account, job.source_sha256
    source = svc.store.template_source(account, sha)
    if source.template_id and source.template_id != job.rejected_template:
        return _template_found(svc, job, source.template_id, reused=True)
    maker = svc.store.get(source.job_id) if source.job_id else None
    if maker is not None and maker.job_id == job.job_id:
        return _queue_self(svc, job)  # a template job that claimed its video earlier
    if maker is not None and not maker.final:
        return _wait_for_maker(svc, job, maker)
    if maker is not None:
        if (
            maker.state == JobState.READY
            and maker.template_id
            and maker.template_id != job.rejected_template
        ):
            return _template_found(svc, job, maker.template_id, reused=True)
        if maker.job_id == job.template_job_id or template_failed_for_good(maker):
            # The template job this job waited for failed, or failed on content DashScope will
            # refuse again: no new paid attempt; the job ends with the reason.
            finish(
                svc,
                job,
                Finish(
                    JobState.FAILED,
                    "TemplateFailed",
                    f"making the action template failed (job {maker.job_id}): "
                    f"{maker.error_code}: {maker.error_message}",
                ),
            )
            return None
    generation = source.generation + 1
    maker_id = job.job_id if job.is_template else template_job_id(account, sha, generation)
    if not svc.store.claim_template_source(account, sha, source.job_id, maker_id, generation):
        return _AGAIN
    if job.is_template:
        return _queue_self(svc, job)
    maker = _start_template_job(svc, job, maker_id)
    return _wait_for_maker(svc, job, maker)


def _template_found(svc: Services, job: Job, template_id: str, *, reused: bool) -> Next | None:
    if job.is_template:
        finish(svc, job, Finish(JobState.READY), template_id=template_id, template_reused=reused)
        return None
    moved = enqueue(
        svc,
        job,
        template_id=template_id,
        template_reused=reused and job.template_job_id is None,
        error_code=None,
        error_message=None,
        resumes=None,
    )
    if moved is not None:
        log.info("job %s: template %s ready; queued", job.job_id, template_id)
    return None


def _queue_self(svc: Services, job: Job) -> Next | None:
    """A template job goes to its account's template lane."""
    enqueue(svc, job)
    return None


def _start_template_job(svc: Services, job: Job, maker_id: str) -> Job:
    """The template job for a video job's dance video (shared by every job that names it)."""
    now = svc.clock()
    maker = Job(
        job_id=maker_id,
        state=JobState.QUEUED,
        version=1,
        request=JobRequest(
            video_url=source_ref(job),
            account=job.account,
            priority=job.request.priority,
            producer=job.request.producer,
            detect=False,
            metadata={"for_job": job.job_id},
        ),
        created_at=now,
        updated_at=now,
        account=job.account,
        kind=JobKind.TEMPLATE.value,
        source_sha256=job.source_sha256,
        source_seconds=job.source_seconds,
        next_action_at=now + svc.queued_recheck,
        wake=WAKE_TIMER,
    )
    stored, created = svc.store.create(maker)
    if created:
        log.info("job %s: template job %s started for its dance video", job.job_id, maker_id)
        svc.governor.enqueue(stored)
        admit(svc, stored.lane)
    return stored


def _wait_for_maker(svc: Services, job: Job, maker: Job) -> Next | None:
    """Wait for the template job: it wakes its waiters when it ends. The deadline is the safety
    net for a lost wake-up (the watchdog re-checks then)."""
    svc.store.add_waiter(maker.job_id, job.job_id)
    waiting = _note_maker(svc, job, maker.job_id)
    if waiting is None:
        return None
    latest = svc.store.get(maker.job_id)
    if latest is not None and latest.final:
        # It ended between our look and our registration: its wake-up may have missed us.
        return Next.of("prepare", waiting, 0)
    return None


def _note_maker(svc: Services, job: Job, maker_id: str) -> Job | None:
    now = svc.clock()
    return svc.store.transition(
        job,
        JobState.PREPARING,
        template_job_id=maker_id,
        resumes=None,  # waiting is healthy: the watchdog's re-checks are not crashes
        updated_at=now,
        next_action_at=now + svc.prepare.recheck_seconds,
        wake=WAKE_TIMER,  # no message: the recheck is the watchdog's
    )


def template_refused(svc: Services, job: Job, exc: DashScopeRejected) -> Next | None:
    """DashScope no longer accepts the job's template. If we know the video it was made from,
    forget it and make it again, once; the job goes on with the new one."""
    bad = job.template
    info = svc.store.template_info(bad)
    sha = job.source_sha256 or (info.source_sha256 if info else None)
    url = job.request.video_url or job.source_url or (info.source_url if info else None)
    if job.template_recreated or sha is None or url is None:
        why = (
            "even after it was made again"
            if job.template_recreated
            else "and the video it was made from is unknown, so it cannot be made again"
        )
        finish(svc, job, Finish(JobState.FAILED, exc.code, f"{exc.message} ({why})"))
        return None
    svc.store.forget_template(job.account, sha, bad)
    moved = then(
        svc,
        job,
        "prepare",
        0,
        JobState.PREPARING,
        template_recreated=True,
        rejected_template=bad,
        template_id=None,
        template_job_id=None,
        template_reused=False,
        source_sha256=sha,
        source_url=None if job.request.video_url else url,
        submit_ambiguous=False,  # a 400: DashScope created nothing
        admitted_at=None,
        error_code=exc.code,
        error_message=f"template {bad} refused by DashScope; making it again",
    )
    if moved is None:
        return None
    log.warning("job %s: template %s refused (%s); making it again", job.job_id, bad, exc.code)
    free_slot(svc, job)
    return moved
