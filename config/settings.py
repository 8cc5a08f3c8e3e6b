"""Settings: the only place that reads the environment. Validated once, at start-up.

Every name below is an environment variable (upper case). A bad value stops the process with a
message naming the variable. AWS credentials are left to boto3's own chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, profiles, instance roles) and are never held here.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ChecksumMode = Literal["when_required", "when_supported"]


class SettingsError(Exception):
    """The environment holds a value the service cannot run with."""


class Settings(BaseSettings):
    # An empty variable means "the default" (docker-compose passes unset ones through empty).
    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, env_ignore_empty=True
    )

    # --- Redis and Celery
    redis_url: str = "redis://127.0.0.1:6379/0"
    celery_broker_url: str | None = None  # default: REDIS_URL
    celery_result_backend: str | None = None  # default: REDIS_URL
    # Redis re-delivers an unacknowledged message after this long. It must sit far above the
    # longest countdown and the copy's hard time limit, or polls and copies run twice.
    visibility_timeout: int = Field(default=300, ge=60)
    # A worker run with REMAP_SIGTERM=SIGQUIT gives its running tasks this long after SIGTERM,
    # then requeues what is left: the container's stop grace must exceed it by ~15 s.
    worker_soft_shutdown_seconds: float = Field(default=30.0, gt=0)
    result_expires_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    job_retention_seconds: int = Field(default=30 * 24 * 3600, ge=3600)  # final job records
    key_prefix: str = "animate-queue"
    # --- Redis Sentinel (docs/ha.md). Unset: REDIS_URL's server alone, exactly as before. Set
    # ("s1:26379,s2:26379,s3:26379"): every connection (job store, governor, timers, metrics,
    # console, CLI, and the broker and result backend unless CELERY_* name others) goes to the
    # master those Sentinels name REDIS_MASTER_NAME. REDIS_URL then gives only the database, the
    # password (redis://:pw@/0) and TLS (rediss://, with its ssl_* query parameters); its host
    # is not used.
    redis_sentinels: str = ""
    redis_master_name: str = "animate-queue"
    redis_sentinel_password: SecretStr | None = None  # the Sentinels' own requirepass
    redis_sentinel_tls: bool = False  # talk TLS to the Sentinels too (their tls-port)
    # Protected writes (every job-record transition, new jobs, parked timers) are acknowledged
    # only once this many replicas have them (WAIT, up to REDIS_WAIT_TIMEOUT_MS); fewer in time
    # is an error and the step stops. A master with no replica connected at all has none to
    # lose them to, and writes go on (counted; docs/ha.md). Unset: 1 with Sentinel, 0 without.
    redis_wait_replicas: int | None = Field(default=None, ge=0, le=10)
    # (at most 8 s: below the clients' 10 s socket timeout, so a slow WAIT is a ReplicationTimeout)
    redis_wait_timeout_ms: int = Field(default=2000, ge=10, le=8000)

    # --- DashScope accounts. DASHSCOPE_API_KEY is the account named "default"; more accounts
    # come as JSON: DASHSCOPE_ACCOUNTS='{"main": "sk-...", "backup": "sk-..."}'.
    dashscope_api_key: SecretStr | None = None  # required by workers, not by producers
    dashscope_accounts: dict[str, SecretStr] = Field(default_factory=dict)
    dashscope_default_account: str = "default"
    # Each account's quota as this fleet spends it, kept under DashScope's documented limits
    # so jitter never earns a 429. Unset: a share (DASHSCOPE_QUOTA_SHARE) of what the model's
    # profile documents (AnimateAnyone: 1 submit/s, 5 detections/s; Wan2.2-Animate: 5
    # submits/s), 15 of the 20 queries/s, and the profile's running tasks per account.
    dashscope_quota_share: float = Field(default=0.8, gt=0, le=1)
    # Daily budgets in CNY per account (JSON; "*": every account not named), UTC days. Once an
    # account's bills of the day reach it, its new jobs wait queued until the next day; jobs
    # already at DashScope are never cancelled. Unset: no budget.
    daily_budget_cny: dict[str, float] = Field(default_factory=dict)
    dashscope_submit_rate: float | None = Field(default=None, gt=0)
    dashscope_query_rate: float = Field(default=15.0, gt=0)
    dashscope_detect_rate: float | None = Field(default=None, gt=0)
    dashscope_concurrency: int | None = Field(default=None, ge=1)  # tasks DashScope runs at once
    # Remote-queued tasks kept behind the running ones, so the slot never idles between tasks.
    admission_lookahead: int = Field(default=1, ge=0)
    # Regions: an API key belongs to one region and works only against that region's host.
    # Each account is in DASHSCOPE_REGION unless DASHSCOPE_ACCOUNT_REGIONS='{"sg": "ap-southeast-1"}'
    # says otherwise; its base URL is the region's (the model's profile knows them), or
    # DASHSCOPE_REGION_URLS='{"cn-beijing": "http://proxy/api/v1"}' for a proxy or the emulator.
    # DASHSCOPE_BASE_URL, when set, is the default region's URL.
    dashscope_region: str = "cn-beijing"
    dashscope_account_regions: dict[str, str] = Field(default_factory=dict)
    dashscope_region_urls: dict[str, str] = Field(default_factory=dict)
    dashscope_base_url: str | None = None
    # The model of a job that names none (its profile, workers/models: endpoints, steps,
    # limits, quotas, prices). A job may name another of DASHSCOPE_MODELS ("model": ...).
    dashscope_model: str = "animate-anyone-gen2"
    # The models jobs may name, comma-separated; empty: every model with a profile.
    dashscope_models: str = ""
    dashscope_connect_timeout: float = Field(default=5.0, gt=0)
    dashscope_read_timeout: float = Field(default=30.0, gt=0)
    # A detect or submit attempt is presumed dead (the watchdog may resume it) this long after
    # its DashScope timeouts (connect + read) have run out: room for its own Redis writes.
    step_margin_seconds: float = Field(default=10.0, ge=1)

    # --- S3
    s3_bucket: str | None = None  # required by workers
    s3_prefix: str = "animate-queue/videos"
    aws_endpoint_url: str | None = None  # S3-compatible servers (MinIO, moto)
    aws_default_region: str | None = None
    # boto3 >= 1.36 sends CRC checksums by default; several S3-compatible servers refuse them.
    aws_request_checksum_calculation: ChecksumMode = "when_required"
    aws_response_checksum_validation: ChecksumMode = "when_required"
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    copy_part_size_mb: int = Field(default=8, ge=5, le=5120)
    copy_concurrency: int = Field(default=4, ge=1, le=32)
    copy_read_timeout: float = Field(default=60.0, gt=0)
    copy_time_limit: int = Field(default=240, ge=30)  # hard limit of one copy attempt (seconds)
    copy_lease_seconds: float = Field(default=60.0, gt=0)  # a silent copy is resumed after this
    # A failed copy is retried, with this backoff, until COPY_EXPIRY_MARGIN_SECONDS before its
    # video URL's expiry (24 h after the task ended), not a fixed number of times.
    copy_backoff_base: float = Field(default=5.0, gt=0)
    copy_backoff_max: float = Field(default=180.0, gt=0)
    copy_expiry_margin_seconds: float = Field(default=300.0, ge=0)

    # --- Intake and the address guard
    image_check_timeout: float = Field(default=10.0, gt=0)
    # A new job's inputs are checked within this long (the image fetched and read); a worker
    # that dies meanwhile leaves a RECEIVED job the watchdog has checked again after it.
    intake_seconds: float = Field(default=60.0, gt=0)
    # A job waiting in our queue is looked at this often (it is put back in its lane's queue if
    # a crash left it out).
    queued_recheck_seconds: float = Field(default=3600.0, gt=0)
    # Hosts and networks our own requests may reach although they are internal (comma list:
    # "127.0.0.1,10.1.0.0/16,minio.internal"). Everything private is refused otherwise (SSRF).
    url_allowlist: str = ""
    # Hosts a finished video may be downloaded from (comma list of patterns).
    video_url_hosts: str = "*.aliyuncs.com"

    # --- The workflow before generation: image check, action templates, inputs
    # A half-body image with use_ref_img_bg=false makes DashScope invent the legs (its docs
    # advise against it): "reject" ends the job REJECTED before anything is paid; "warn" records
    # a warning on the job and goes on.
    half_body_without_ref_bg: Literal["reject", "warn"] = "reject"
    detect_cache_seconds: int = Field(default=30 * 24 * 3600, ge=60)  # per image hash + account
    detect_max_attempts: int = Field(default=6, ge=1)
    # Template videos are downloaded (at most 200 MB), hashed and probed before any template is
    # paid for; one attempt may take this long before the watchdog resumes it elsewhere.
    video_probe_timeout: float = Field(default=120.0, gt=0)  # one read of the download
    # The whole download of a dance video, however slowly it drips; the prepare step's time
    # limits follow from it, so a resumed job never runs two downloads at once.
    video_download_seconds: float = Field(default=300.0, gt=0)
    prepare_max_attempts: int = Field(default=6, ge=1)
    # A job waiting for its template is woken when the template job ends; this is the safety
    # net if that wake-up is lost (the watchdog re-checks it after this long).
    template_wait_recheck_seconds: float = Field(default=600.0, gt=0)
    # Local files travel producer -> worker through our bucket, content-addressed under
    # INPUT_PREFIX. DashScope gets them as presigned GET URLs valid this long ("s3"), or
    # re-uploaded to its free temporary storage as oss:// URLs, bound to one account and model
    # and valid 48 h ("oss", docs §7).
    input_prefix: str = "inputs/"
    input_upload_mode: Literal["s3", "oss"] = "s3"
    input_url_ttl_seconds: int = Field(default=24 * 3600, ge=300, le=7 * 24 * 3600)

    # --- Submitting and polling
    submit_max_attempts: int = Field(default=8, ge=1)
    # After a submit whose answer was lost (a timeout after sending, a 5xx, an unreadable 200),
    # DashScope's task list is read for the task it may have created: for this long after the
    # POST ended before "nothing was created" is concluded, within this much clock skew.
    submit_list_lag_seconds: float = Field(default=30.0, ge=0)
    submit_clock_skew_seconds: float = Field(default=10.0, ge=0)
    submit_backoff_base: float = Field(default=2.0, gt=0)
    submit_backoff_max: float = Field(default=60.0, gt=0)
    poll_first_seconds: float = Field(default=2.0, gt=0)
    poll_running_seconds: float = Field(default=1.0, gt=0)
    poll_pending_seconds: float = Field(default=5.0, gt=0)
    poll_pending_max_seconds: float = Field(default=30.0, gt=0)
    poll_error_backoff_base: float = Field(default=1.0, gt=0)  # a poll that failed, again
    poll_error_backoff_max: float = Field(default=60.0, gt=0)
    poll_unknown_grace: int = Field(default=3, ge=1)  # UNKNOWN answers in a row that end a job
    throttled_max_per_job: int = Field(default=50, ge=1)  # 429s one job may collect, then FAILED
    # A wait up to this long is a Celery countdown, held in a worker's memory until due; a longer
    # one is parked in Redis (P:timers) and sent when due by the dispatcher thread every worker
    # runs each TIMER_TICK_SECONDS (workers/timers.py). 0 parks every wait.
    countdown_max_seconds: float = Field(default=10.0, ge=0)
    timer_tick_seconds: float = Field(default=0.5, gt=0, le=10)
    job_remote_deadline_seconds: float = Field(default=6 * 3600.0, gt=0)

    # A cancel that arrives after DashScope started the task cannot stop it, and it is paid for.
    # true: the video is still copied and the job ends STORED (cancel_requested set); false: it
    # is not copied and the job ends CANCELED with code CancelTooLate.
    cancel_too_late_copy: bool = True

    # --- Webhooks (Standard Webhooks signatures; "whsec_<base64>" or any string)
    webhook_secret: SecretStr | None = None
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_give_up_seconds: float = Field(default=3600.0, gt=0)
    webhook_backoff_base: float = Field(default=2.0, gt=0)
    webhook_backoff_max: float = Field(default=60.0, gt=0)
    # A final job's deliveries (result, callback, webhook) are made within this long, or the
    # watchdog makes them again.
    delivery_seconds: float = Field(default=60.0, gt=0)

    # --- Operations: logs, metrics, Flower
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_addr: str = "0.0.0.0"  # the exporter (animate-queue metrics) listens here
    metrics_port: int = Field(default=9808, ge=1, le=65535)
    # A worker process sends its step histograms and counters summed, at most this often (0:
    # at the end of every task). The bill and the outcomes are always written at once.
    metrics_flush_seconds: float = Field(default=1.0, ge=0, le=60)
    # Flower refuses to start without basic auth ("user:password", comma-separated for more
    # users) unless FLOWER_ALLOW_NO_AUTH=true says an operator chose an open Flower.
    flower_basic_auth: SecretStr | None = None
    flower_allow_no_auth: bool = False
    # The job console (animate-queue console): basic auth like Flower's ("user:password",
    # comma-separated for more users); it refuses to start without one unless
    # CONSOLE_ALLOW_NO_AUTH=true. CONSOLE_SECRET signs its forms' CSRF tokens (unset: a random
    # one per process, so a form from before a restart is refused). FLOWER_URL: where its links
    # to a job's Celery tasks go.
    console_basic_auth: SecretStr | None = None
    console_allow_no_auth: bool = False
    console_secret: SecretStr | None = None
    console_addr: str = "0.0.0.0"
    console_port: int = Field(default=5566, ge=1, le=65535)
    flower_url: str = "http://localhost:5555"
    # Where the console asks Flower's API for a job's tasks (unset: FLOWER_URL); it signs in with
    # FLOWER_BASIC_AUTH's first user.
    flower_api_url: str | None = None
    flower_db: str = "flower.db"  # Flower's persistent state (tasks seen), kept across restarts
    flower_port: int = Field(default=5555, ge=1, le=65535)

    # --- Watchdog (run by celery beat; only one acts at a time, under a Redis lock)
    watchdog_interval_seconds: float = Field(default=15.0, gt=0)
    watchdog_grace_seconds: float = Field(default=30.0, gt=0)  # overdue by this much: resume
    watchdog_max_resumes: int = Field(default=5, ge=1)  # in one state: a poison job

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        longest_wait = max(
            self.poll_pending_max_seconds,
            self.poll_error_backoff_max,
            self.submit_backoff_max,
            self.copy_backoff_max,
        )
        longest_countdown = min(longest_wait, self.countdown_max_seconds)  # the rest is parked
        if longest_countdown * 4 > self.visibility_timeout:
            raise ValueError(
                f"VISIBILITY_TIMEOUT ({self.visibility_timeout}) must be at least 4x the longest "
                f"countdown ({longest_countdown:.0f} s), or Redis re-delivers waiting messages"
            )
        if self.copy_time_limit + 60 > self.visibility_timeout:
            raise ValueError(
                f"COPY_TIME_LIMIT ({self.copy_time_limit}) must end at least 60 s before "
                f"VISIBILITY_TIMEOUT ({self.visibility_timeout}), or a long copy is re-delivered"
            )
        return self

    @model_validator(mode="after")
    def _account_names(self) -> Settings:
        import re

        for name in self.dashscope_accounts:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
                raise ValueError(f"DASHSCOPE_ACCOUNTS: {name!r} is not a usable account name")
        return self

    @model_validator(mode="after")
    def _sentinel_list(self) -> Settings:
        self.sentinel_addresses()  # ValueError names the bad entry
        return self

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """REDIS_SENTINELS as (host, port) pairs (port 26379 when not given); empty: none."""
        found = []
        for entry in (e.strip() for e in self.redis_sentinels.split(",")):
            if not entry:
                continue
            if entry.startswith("["):  # an IPv6 literal: [::1]:26379
                host, _, rest = entry[1:].partition("]")
                port = rest.removeprefix(":") or "26379"
            else:
                host, _, port = entry.partition(":")
                port = port or "26379"
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"REDIS_SENTINELS: {entry!r} is not host:port")
            found.append((host, int(port)))
        return found

    @property
    def wait_replicas(self) -> int:
        """Replicas a protected write waits for (REDIS_WAIT_REPLICAS; unset: 1 with Sentinel)."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinels.strip() else 0

    @property
    def broker_url(self) -> str:
        """CELERY_BROKER_URL, else REDIS_URL (with Sentinel, see bootstrap.celery_urls)."""
        return self.celery_broker_url or self.redis_url

    @property
    def result_backend(self) -> str:
        return self.celery_result_backend or self.redis_url

    def accounts(self) -> dict[str, str]:
        """Account name -> API key (a secret: never log this)."""
        keys = {name: key.get_secret_value() for name, key in self.dashscope_accounts.items()}
        if self.dashscope_api_key is not None and self.dashscope_api_key.get_secret_value():
            keys.setdefault("default", self.dashscope_api_key.get_secret_value())
        return {name: key for name, key in keys.items() if key}

    def require_worker(self) -> None:
        """Workers need a key and a bucket; producers and Flower do not."""
        missing = [
            name
            for name, ok in (
                ("DASHSCOPE_API_KEY", bool(self.accounts())),
                ("S3_BUCKET", bool(self.s3_bucket)),
            )
            if not ok
        ]
        if missing:
            raise SettingsError(f"workers need {' and '.join(missing)} set in the environment")
        if self.dashscope_default_account not in self.accounts():
            raise SettingsError(
                f"DASHSCOPE_DEFAULT_ACCOUNT {self.dashscope_default_account!r} is not among the "
                f"configured accounts {sorted(self.accounts())}"
            )


_JSON_FIELDS = frozenset(
    {"dashscope_accounts", "dashscope_account_regions", "dashscope_region_urls", "daily_budget_cny"}
)


def describe_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]).upper() or "settings"
        lines.append(f"{name}: {err['msg']}")
    return "; ".join(lines)


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default: the process environment), or :class:`SettingsError`."""
    try:
        if environ is None:
            return Settings()
        values: dict[str, object] = {}
        for key, value in environ.items():
            name = key.lower()
            if name not in Settings.model_fields or value == "":
                continue
            # Complex values arrive as JSON, as pydantic-settings reads them from os.environ.
            values[name] = json.loads(value) if name in _JSON_FIELDS and value else value
        return Settings.model_validate(values)
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            raise SettingsError(f"bad configuration: {describe_error(exc)}") from None
        raise SettingsError(f"bad configuration: not JSON: {exc}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
