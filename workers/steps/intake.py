"""Intake: a producer's message becomes a job record, its inputs checked, and the job queued."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workers.domain.decisions import (
    Finish,
)
from workers.domain.job import LEGACY_MODEL, Job
from workers.domain.media import ImageFacts, check_image
from workers.domain.request import (
    JOB_ID_RE,
    JobKind,
    JobRequest,
    callback_queue_ok,
    callback_task_ok,
    parse_request,
    parse_template_request,
    s3_ref,
)
from workers.domain.states import JobState
from workers.errors import (
    InvalidJobRequest,
    TransientError,
)
from workers.models.profile import ImageLimits, ModelProfile
from workers.steps.admission import enqueue
from workers.steps.context import Next, Services, load, profile_of, then
from workers.steps.finish import ended, final_fields, finish

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntakeResult:
    job_id: str
    state: JobState
    created: bool
    next: Next | None = None


def intake(
    svc: Services,
    kwargs: Mapping[str, Any],
    args: tuple[Any, ...],
    message_id: str,
    kind: JobKind = JobKind.VIDEO,
) -> IntakeResult:
    """Validate a producer's request, create the job (or find it), check the image.

    Bad input still creates a record, in REJECTED with the reason, so the producer can see why.
    """
    now = svc.clock()
    try:
        if kind == JobKind.TEMPLATE:
            request = parse_template_request(kwargs, args)
        else:
            profile = _named_profile(svc, kwargs)
            # The model is recorded, except AnimateAnyone's: a record naming none is its (as
            # before jobs named models), and a queued job's record stays small.
            recorded = None if profile.name == LEGACY_MODEL else profile.name
            request = dataclasses.replace(parse_request(kwargs, args, profile), model=recorded)
    except InvalidJobRequest as exc:
        return _rejected(svc, kwargs, message_id, kind, exc, now)
    job_id = request.job_id or message_id
    account, _ = _account_for(svc, request)
    job = Job(
        job_id=job_id,
        state=JobState.RECEIVED,
        version=1,
        request=request,
        created_at=now,
        updated_at=now,
        account=account,
        kind=kind.value,
        intake_message_id=message_id,
        # From its first write the job has a deadline: a worker that dies while checking the
        # inputs leaves a job the watchdog finds, and checks again (animate.validate).
        next_action_at=now + svc.intake_seconds,
    )
    stored, created = svc.store.create(job)
    if not created and stored.intake_message_id != message_id:
        # Same job_id from another message: the idempotency key did its job.
        log.info("job %s already exists (state %s); duplicate intake ignored", job_id, stored.state)
        svc.store.note_duplicate(job_id)  # no version bump: in-flight messages stay valid
        return IntakeResult(job_id, stored.state, False)
    if stored.state != JobState.RECEIVED:
        return IntakeResult(job_id, stored.state, created)  # a redelivered intake, already past
    return IntakeResult(job_id, _validate(svc, stored), created)


def _rejected(svc: Services, kwargs: Mapping[str, Any], message_id: str, kind: JobKind,
              exc: InvalidJobRequest, now: float) -> IntakeResult:  # fmt: skip
    """A refused request still gets a record, REJECTED with the reason, so the producer can see
    why; its callback (if that part is sound) hears it too."""
    raw_id = kwargs.get("job_id") if isinstance(kwargs, Mapping) else None
    job_id = raw_id if isinstance(raw_id, str) and _usable_id(raw_id) else message_id
    task, queue = kwargs.get("callback_task"), kwargs.get("callback_queue")
    callback_ok = callback_task_ok(task) and callback_queue_ok(queue)
    placeholder = JobRequest(job_id=job_id, callback_task=task if callback_ok else None,
                             callback_queue=queue if callback_ok else None)  # fmt: skip
    job = Job(
        job_id=job_id, state=JobState.REJECTED, version=1, request=placeholder, created_at=now,
        updated_at=now, kind=kind.value, intake_message_id=message_id, finished_at=now,
        error_code=exc.code, error_message=exc.message,
        # A job_id that cannot name a job: the record goes under the message id, and the
        # refusal is also published under the id the producer asked for (its AsyncResult).
        requested_id=raw_id if job_id != raw_id and _echoable_id(raw_id) else None,
        **final_fields(svc, now),
    )  # fmt: skip
    stored, created = svc.store.create(job)
    log.info("job %s rejected at intake: %s", stored.job_id, exc)
    if created:
        ended(svc, stored)
    return IntakeResult(stored.job_id, stored.state, created)


def validate(svc: Services, job_id: str, version: int) -> Next | None:
    """Check a received job's inputs again: its intake's worker died while checking them."""
    job = load(svc, job_id, version)
    if job is not None and job.state == JobState.RECEIVED:
        _validate(svc, job)
    return None


def _validate(svc: Services, job: Job) -> JobState:
    """Check a received job's inputs (nothing is sent before this passes), then move it on:
    into the image check, the dance video's preparation, or our queue. The state it is in."""
    request = job.request
    profile = profile_of(svc, job)
    try:
        _, refusal = _account_for(svc, request)
        if refusal is not None:
            raise refusal
        _check_region(svc, job, profile)
        if request.webhook_url and svc.guard is not None:
            svc.guard.check(request.webhook_url, "webhook_url")
        for ref in (request.image_url, request.video_url):
            _check_input_ref(svc, ref)
        facts = _probe_image(svc, request, profile.image) if not job.is_template else None
    except InvalidJobRequest as exc:
        done = finish(svc, job, Finish(JobState.REJECTED, exc.code, exc.message))
        return done.state if done else job.state
    sha = facts.sha256 if facts else None
    runs = profile.steps  # the steps a job of this model family runs
    if request.detect and not job.is_template and "detect" in runs:
        woken = then(svc, job, "detect", 0, JobState.DETECTING, image_sha256=sha)
    elif request.video_url is not None and ("prepare" in runs or job.is_template):
        woken = then(svc, job, "prepare", 0, JobState.PREPARING, image_sha256=sha)
    else:
        enqueue(svc, job, image_sha256=sha)
        return JobState.QUEUED
    if woken is not None:
        svc.wake(woken)
    return JobState.DETECTING if request.detect and not job.is_template else JobState.PREPARING


def _check_input_ref(svc: Services, ref: str | None) -> None:
    where = s3_ref(ref) if ref else None
    if where is None:
        return
    if svc.input_bucket is None or where[0] != svc.input_bucket:
        raise InvalidJobRequest(
            f"{ref} is not in this service's input bucket "
            f"({svc.input_bucket or 'none is configured'}); use an http(s) URL",
            code="InvalidRequest.BadUrl",
        )
    prefix = svc.input_prefix.lstrip("/")
    key = where[1]
    if not key.startswith(prefix) or ".." in key.split("/") or key == prefix:
        # Only what producers upload is theirs to name: never another job's stored video.
        raise InvalidJobRequest(
            f"s3:// inputs must be under {prefix!r} in the input bucket (where the client and "
            "CLI upload local files); use an http(s) URL for anything else",
            code="InvalidRequest.BadUrl",
        )


def _named_profile(svc: Services, kwargs: Mapping[str, Any]) -> ModelProfile:
    """The profile of the model a job names (``model``), else the default (DASHSCOPE_MODEL)."""
    model = kwargs.get("model") if isinstance(kwargs, Mapping) else None
    if model is None:
        return svc.profile
    found = svc.profiles.get(model) if isinstance(model, str) else None
    if found is None:
        raise InvalidJobRequest(
            f"model {repr(model)[:80]} is not one this service runs (it runs: "
            f"{', '.join(svc.profiles)}; DASHSCOPE_MODELS)",
            code="InvalidRequest.Model",
        )
    return found


def _check_region(svc: Services, job: Job, profile: ModelProfile) -> None:
    """A model not offered in the account's region could never run there: refused up front."""
    region = svc.account_regions.get(job.account)
    if region is not None and region not in profile.regions:
        raise InvalidJobRequest(
            f"{profile.name} is not offered in region {region} of account {job.account!r} "
            f"(its regions: {', '.join(profile.regions)})",
            code="InvalidRequest.Region",
        )


def _probe_image(svc: Services, request: JobRequest, limits: ImageLimits) -> ImageFacts:
    """Look at the image before anything is paid for: DashScope's documented limits."""
    url, trusted = svc.inputs.for_us(request.image_url)
    try:
        facts = svc.images.probe(url, trusted=trusted)
    except TransientError as exc:
        # The image could not be fetched right now. Without a look at it we may not spend money,
        # so the job is refused with the reason; the producer may enqueue it again.
        raise InvalidJobRequest(exc.message, code="InvalidImage.Unreachable") from exc
    check_image(facts, limits)
    return facts


def _account_for(svc: Services, request: JobRequest) -> tuple[str, InvalidJobRequest | None]:
    """The account a job runs under: the one it names, else its template's owner, else the
    default. A template only works under the account that made it."""
    owner = svc.store.template_owner(request.template_id)
    account = request.account or owner or svc.default_account
    if account not in svc.accounts:
        return svc.default_account, InvalidJobRequest(
            f"account {account!r} is not configured (configured: {', '.join(sorted(svc.accounts))})",
            code="InvalidRequest.Account",
        )
    if owner is not None and owner != account:
        return account, InvalidJobRequest(
            f"template {request.template_id} belongs to account {owner!r}, not {account!r}",
            code="InvalidRequest.TemplateAccount",
        )
    return account, None


def _usable_id(value: str) -> bool:
    return bool(JOB_ID_RE.match(value))


def _echoable_id(value: Any) -> bool:
    """A producer's unusable job_id that can still key its result (a short string)."""
    return isinstance(value, str) and 0 < len(value) <= 256
