"""The job record: every field the store keeps for a job, and where its video goes."""

from __future__ import annotations

from dataclasses import dataclass

from workers.domain.costs import cost
from workers.domain.request import JobKind, JobRequest
from workers.domain.states import FINAL_STATES, JobState
from workers.domain.templates import template_lane

LEGACY_MODEL = "animate-anyone-gen2"  # the model of records that name none


def video_lane(account: str, model: str) -> str:
    """Where an account's video jobs of ``model`` wait for its slot (AnimateAnyone's lane is the
    account itself, as before jobs named their model)."""
    return account if model == LEGACY_MODEL else f"{account}:{model}"


@dataclass(frozen=True)
class Job:
    """A job as the store holds it. Times are epoch seconds."""

    job_id: str
    state: JobState
    version: int
    request: JobRequest
    created_at: float
    updated_at: float
    account: str = "default"  # the DashScope account (API key) the job runs under
    state_since: float | None = None  # entered its current state (None: at creation)
    kind: str = JobKind.VIDEO.value
    image_sha256: str | None = None  # the image's content hash (the detection cache's key)
    bodystyle: str | None = None  # the detector's answer: full | half
    detect_cached: bool = False  # the answer came from the cache (nothing billed)
    detect_attempts: int = 0
    warning: str | None = None  # went on despite something a person should know
    source_sha256: str | None = None  # the dance video's content hash (template reuse key)
    source_seconds: float | None = None
    source_url: str | None = None  # where to fetch the dance video when it is not in the request
    prepare_attempts: int = 0
    template_id: str | None = None  # the template used (video jobs) or made (template jobs)
    template_job_id: str | None = None  # the template job this job waits for
    template_reused: bool = False  # an existing template of the account's was used
    template_recreated: bool = False  # DashScope refused the template once; it was made again
    rejected_template: str | None = None  # the template DashScope refused
    intake_message_id: str | None = None
    requested_id: str | None = None  # a job_id that could not be used (REJECTED under msg id)
    admitted_at: float | None = None  # left our queue for the remote one
    token_waits: int = 0  # times a step waited for the account's quota
    throttled: int = 0  # 429s DashScope answered this job with
    cancel_requested: bool = False
    # The watchdog's view of the next wake-up (next_action_at): "sent", a message for this
    # version is queued, parked or held and no worker has taken it yet; "timer", no message:
    # the deadline itself is the wake-up; absent, a worker took the step (or nothing is due).
    wake: str | None = None
    resumes: int = 0  # steps taken in a row that never finished (worker deaths); 0 on progress
    resume_state: str | None = None  # (older records)
    delivery: str | None = None  # "pending": a final job's results, callback, webhook not all out
    published: bool = False  # its result and callback went out (at least once)
    webhook_state: str | None = None  # pending | delivered | failed
    webhook_attempts: int = 0
    webhook_delivered_at: float | None = None
    webhook_error: str | None = None
    remote_task_id: str | None = None
    remote_status: str | None = None
    remote_request_id: str | None = None
    submit_attempts: int = 0
    submit_started_at: float | None = None  # the last POST attempt began (for reconciliation)
    submit_ambiguous: bool = False  # a POST may have created a task we never heard about
    submit_uncertain_since: float | None = None  # that POST began (its reconcile window)
    submit_ended_at: float | None = None  # ...and ended without an answer we could read
    submitted_at: float | None = None
    remote_started_at: float | None = None
    remote_ended_at: float | None = None
    polls: int = 0
    poll_errors: int = 0  # consecutive
    unknown_polls: int = 0
    pending_polls: int = 0
    next_action_at: float | None = None  # when the next message should wake the job
    video_url: str | None = None
    video_expires_at: float | None = None
    video_duration: float | None = None
    # What a second of output costs (CNY), recorded at submit from the model's price table for
    # the job's mode; the estimate (the dance video's length) and the bill (usage.video_duration)
    # follow from it (workers/domain/costs.py), so they are not stored.
    price_per_second: float | None = None
    copy_attempts: int = 0
    copy_started_at: float | None = None
    copy_bytes: int | None = None  # progress of the copy under way (lease renewals report it)
    copy_checkpoint: str | None = None  # an unfinished multipart copy's resume point (JSON)
    s3_bucket: str | None = None
    s3_key: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    finished_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    duplicates: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def is_template(self) -> bool:
        return self.kind == JobKind.TEMPLATE

    @property
    def template(self) -> str:
        """The template a video job generates with: the one resolved, else the one requested."""
        return self.template_id or self.request.template_id

    @property
    def model(self) -> str:
        """The video model the job runs on: the one recorded at intake (records written before
        jobs named their model are AnimateAnyone's, the only model then)."""
        return self.request.model or LEGACY_MODEL

    @property
    def lane(self) -> str:
        """Where the job waits for DashScope's slot: each model has its own per account
        (AnimateAnyone's video lane is the account itself, as before models were per job)."""
        return (
            template_lane(self.account)
            if self.is_template
            else video_lane(self.account, self.model)
        )

    @property
    def estimated_cost(self) -> float | None:
        return cost(self.price_per_second, self.source_seconds)

    @property
    def billed_cost(self) -> float | None:
        """What DashScope bills once the task succeeded (None before)."""
        return cost(self.price_per_second, self.video_duration)

    @property
    def submit_kind(self) -> str:
        """The quota bucket its submit takes a token from: one per account and model."""
        return "template" if self.is_template else f"submit:{self.model}"

    @property
    def s3_uri(self) -> str | None:
        return f"s3://{self.s3_bucket}/{self.s3_key}" if self.s3_bucket and self.s3_key else None


def s3_key(prefix: str, job_id: str) -> str:
    """Deterministic, so a repeated copy overwrites the same object."""
    prefix = prefix.strip("/")
    return f"{prefix}/{job_id}.mp4" if prefix else f"{job_id}.mp4"
