"""The composition root: build the pipeline's services from settings, once per worker process.

Clients are made lazily after the prefork fork (never at import), so no socket is shared between
processes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import httpx
import redis

from config.settings import Settings, SettingsError, get_settings
from workers import models
from workers.adapters.dashscope.api import DashScopeVideoApi
from workers.adapters.dashscope.client import DashScopeClient
from workers.adapters.redis.broker import BrokerQueues
from workers.adapters.redis.connection import RedisAddress, connect
from workers.adapters.redis.governor import RedisGovernor
from workers.adapters.redis.metrics import RedisMetrics
from workers.adapters.redis.queues import RedisQueues
from workers.adapters.redis.replication import Replication
from workers.adapters.redis.store import RedisClock, RedisJobStore
from workers.adapters.s3.bucket_inputs import BucketInputs
from workers.adapters.s3.copier import S3CopierPort
from workers.adapters.s3.inputs import S3Inputs
from workers.adapters.s3.storage import S3Copier, make_s3_client
from workers.adapters.web.guard import AddressGuard
from workers.adapters.web.images import HttpImageProbe
from workers.adapters.web.videos import HttpVideoProbe
from workers.adapters.web.webhooks import HttpWebhooks
from workers.domain.policies import (
    Backoff,
    CopyPolicy,
    DetectPolicy,
    PollPolicy,
    PreparePolicy,
    SubmitPolicy,
    WebhookPolicy,
)
from workers.models import ModelProfile
from workers.steps.context import Services, Tuning

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

_lock = threading.Lock()
_services: Services | None = None
# Ports only an entrypoint can make (the Celery tasks' scheduler and result backend), given once
# when it is imported (install) and passed to every build.
_installed: dict[str, Any] = {}


def redis_address(settings: Settings) -> RedisAddress:
    """Where Redis is: REDIS_URL's server, or the master REDIS_SENTINELS name."""
    return RedisAddress(
        url=settings.redis_url,
        sentinels=tuple(settings.sentinel_addresses()),
        master_name=settings.redis_master_name,
        sentinel_password=(
            settings.redis_sentinel_password.get_secret_value()
            if settings.redis_sentinel_password is not None
            else None
        ),
        sentinel_tls=settings.redis_sentinel_tls,
    )


def redis_client(settings: Settings, **timeouts: Any) -> redis.Redis:
    """A client of the job store's Redis (through Sentinel when configured); ``timeouts``:
    :func:`workers.adapters.redis.connection.connect`'s."""
    return connect(redis_address(settings), **timeouts)


def celery_urls(settings: Settings) -> tuple[str, str]:
    """The broker's and result backend's URLs: CELERY_BROKER_URL and CELERY_RESULT_BACKEND
    where set, else the job store's Redis (with Sentinel, kombu's ``sentinel://`` list)."""
    own = redis_address(settings).celery_url()
    return settings.celery_broker_url or own, settings.celery_result_backend or own


def broker_redis(settings: Settings) -> redis.Redis | None:
    """A client of the broker's Redis when it is not the job store's (None: the same one)."""
    url = settings.broker_url
    if settings.celery_broker_url is None or url == settings.redis_url:
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def replication(
    settings: Settings, client: redis.Redis, metrics: RedisMetrics | None = None
) -> Replication | None:
    """How protected writes on ``client`` wait for replicas (None: REDIS_WAIT_REPLICAS is 0)."""
    if settings.wait_replicas == 0:
        return None
    return Replication(
        client,
        required=settings.wait_replicas,
        timeout_ms=settings.redis_wait_timeout_ms,
        metrics=metrics,
    )


def s3_client(settings: Settings) -> S3Client:
    """The S3 client every process of ours uses, as the settings describe it."""
    return make_s3_client(
        endpoint_url=settings.aws_endpoint_url,
        region=settings.aws_default_region,
        checksum_calculation=settings.aws_request_checksum_calculation,
        checksum_validation=settings.aws_response_checksum_validation,
        addressing_style=settings.s3_addressing_style,
    )


def job_store(settings: Settings, metrics: RedisMetrics | None = None) -> RedisJobStore:
    client = redis_client(settings)
    return RedisJobStore(
        client,
        prefix=settings.key_prefix,
        final_ttl=settings.job_retention_seconds,
        metrics=metrics,
        replication=replication(settings, client, metrics),
    )


@dataclass(frozen=True)
class Quota:
    """What the fleet spends of each account's quota for the configured model."""

    submit: float
    query: float
    detect: float
    concurrency: int


def served_models(settings: Settings) -> list[str]:
    """The models jobs may name (DASHSCOPE_MODELS; empty: all with a profile), the default first.
    ValueError names an unknown one."""
    named = [m.strip() for m in settings.dashscope_models.split(",") if m.strip()]
    served = named or list(models.PROFILES)
    for name in served:
        models.profile(name)  # ValueError for a model without a profile
    return [settings.dashscope_model, *(m for m in served if m != settings.dashscope_model)]


def quota(settings: Settings, model: str | None = None) -> Quota:
    """The settings' rates, or where unset a share of what the model's profile documents
    (``model``: the default one, DASHSCOPE_MODEL)."""
    documented = models.profile(model or settings.dashscope_model).quotas
    share = settings.dashscope_quota_share
    return Quota(
        submit=settings.dashscope_submit_rate or documented.submits_per_second * share,
        query=settings.dashscope_query_rate,
        detect=settings.dashscope_detect_rate or max(documented.detects_per_second * share, 0.1),
        concurrency=settings.dashscope_concurrency or documented.running_tasks,
    )


def governor(settings: Settings) -> RedisGovernor:
    spend = quota(settings)
    client = redis_client(settings)
    return RedisGovernor(
        client,
        prefix=settings.key_prefix,
        model=settings.dashscope_model,
        rates={
            "submit": spend.submit,
            "query": spend.query,
            "detect": spend.detect,
            "template": spend.submit,
            # each model's submits: its own bucket per account, at its own documented rate (every
            # model with a profile: jobs recorded under one no longer served still finish)
            **{f"submit:{name}": quota(settings, name).submit for name in models.PROFILES},
        },
        capacity=spend.concurrency + settings.admission_lookahead,
        replication=replication(settings, client),
    )


def _dance_video_max_bytes(profile: ModelProfile) -> int:
    """The largest dance video the family takes (as a template's source, or with each job)."""
    limits = profile.template_video if profile.takes_templates else profile.input_video
    return limits.max_bytes if limits is not None else 0


def build_services(settings: Settings) -> Services:
    """Every port the steps use, made from ``settings``, with the tuning (``tuning``)."""
    settings.require_worker()
    assert settings.s3_bucket is not None
    metrics = RedisMetrics(
        redis_client(settings), settings.key_prefix, flush_seconds=settings.metrics_flush_seconds
    )
    tuned = tuning(settings)
    profile = tuned.profile
    api = video_api(settings, metrics, profile)
    s3 = s3_client(settings)
    guard = AddressGuard.from_setting(settings.url_allowlist)
    image_http = httpx.Client(timeout=httpx.Timeout(settings.image_check_timeout))
    video_http = httpx.Client(timeout=httpx.Timeout(settings.video_probe_timeout, connect=10.0))
    broker = broker_redis(settings) or redis_client(settings)
    return Services.of(
        tuned,
        **_installed,
        clock=RedisClock(redis_client(settings)),  # one clock for every deadline: Redis's
        queues=BrokerQueues(RedisQueues(broker, prefix=settings.key_prefix)),
        webhooks=webhooks(settings, guard),
        guard=guard,
        store=job_store(settings, metrics),
        metrics=metrics,
        api=api,
        inputs=BucketInputs(
            S3Inputs(s3, settings.s3_bucket, settings.input_prefix),
            ttl=settings.input_url_ttl_seconds,
            mode=settings.input_upload_mode,
            api=api,
            cache=redis_client(settings),
            prefix=settings.key_prefix,
        ),
        videos=HttpVideoProbe(
            video_http,
            guard,
            total_seconds=settings.video_download_seconds,
            max_bytes=_dance_video_max_bytes(profile),
        ),
        governor=governor(settings),
        copier=S3CopierPort(copier(settings, s3)),
        images=HttpImageProbe(
            image_http,
            guard,
            total_seconds=max(5.0, settings.intake_seconds - 15),
            max_bytes=profile.image.max_bytes,
        ),
    )


def video_api(
    settings: Settings, metrics: RedisMetrics, profile: ModelProfile
) -> DashScopeVideoApi:
    """DashScope, one client per account, over one HTTP pool with the call timeouts."""
    api_http = httpx.Client(
        timeout=httpx.Timeout(
            settings.dashscope_read_timeout, connect=settings.dashscope_connect_timeout
        )
    )
    regions = account_regions(settings, served_profiles(settings))
    clients = {
        account: DashScopeClient(
            api_http, api_key=key, base_url=regions[account][1], profile=profile
        )
        for account, key in settings.accounts().items()
    }
    served = {name: models.profile(name) for name in served_models(settings)}
    return DashScopeVideoApi(clients, profile, metrics=metrics, regions=regions, profiles=served)


def account_regions(
    settings: Settings, profiles: Sequence[ModelProfile]
) -> dict[str, tuple[str, str]]:
    """Each account's region and the base URL its key is used against (a region's host serves
    every model offered there). SettingsError for an account in a region none of ``profiles``
    (the models jobs may name) is offered in: its key could never run a job. A job for a model
    not offered in its account's region is refused at intake."""
    offered = {region: url for p in reversed(profiles) for region, url in p.regions.items()}
    out = {}
    for account in settings.accounts():
        region = settings.dashscope_account_regions.get(account, settings.dashscope_region)
        if region not in offered:
            names = ", ".join(p.name for p in profiles)
            raise SettingsError(
                f"account {account!r} is in region {region!r}, where none of {names} is "
                f"offered (their regions: {', '.join(sorted(offered))}); see DASHSCOPE_REGION "
                "and DASHSCOPE_ACCOUNT_REGIONS"
            )
        url = settings.dashscope_region_urls.get(region)
        if url is None and region == settings.dashscope_region:
            url = settings.dashscope_base_url
        out[account] = (region, url or offered[region])
    return out


def served_profiles(settings: Settings) -> list[ModelProfile]:
    return [models.profile(name) for name in served_models(settings)]


def copier(settings: Settings, s3: S3Client) -> S3Copier:
    """The copy from a video URL into the bucket (its download client follows redirects)."""
    assert settings.s3_bucket is not None
    download = httpx.Client(
        timeout=httpx.Timeout(settings.copy_read_timeout, connect=10.0), follow_redirects=True
    )
    return S3Copier(
        s3,
        download,
        bucket=settings.s3_bucket,
        part_size=settings.copy_part_size_mb * 1024 * 1024,
        max_concurrency=settings.copy_concurrency,
    )


def webhooks(settings: Settings, guard: AddressGuard) -> HttpWebhooks | None:
    """Signed webhooks, when a WEBHOOK_SECRET is set (None otherwise)."""
    if settings.webhook_secret is None or not settings.webhook_secret.get_secret_value():
        return None
    return HttpWebhooks(
        httpx.Client(timeout=httpx.Timeout(settings.webhook_timeout_seconds)),
        settings.webhook_secret.get_secret_value(),
        guard,
    )


# A prepare attempt downloads the dance video (VIDEO_DOWNLOAD_SECONDS at most), then probes and
# hashes it: this much more before the watchdog may resume it elsewhere.
PREPARE_MARGIN_SECONDS = 60.0


def tuning(settings: Settings) -> Tuning:
    """Every value the steps are tuned by, from ``settings`` (the one place defaults live)."""
    return Tuning(
        s3_prefix=settings.s3_prefix,
        input_bucket=settings.s3_bucket,
        input_prefix=settings.input_prefix,
        accounts=frozenset(settings.accounts()),
        default_account=settings.dashscope_default_account,
        profile=models.profile(settings.dashscope_model),
        profiles=MappingProxyType({name: models.profile(name) for name in served_models(settings)}),
        account_regions=MappingProxyType(
            {
                account: settings.dashscope_account_regions.get(account, settings.dashscope_region)
                for account in settings.accounts()
            }
        ),
        video_hosts=tuple(
            h.strip()
            for h in f"{settings.video_url_hosts},{settings.url_allowlist}".split(",")
            if h.strip() and "/" not in h
        ),
        max_throttled=settings.throttled_max_per_job,
        daily_budget=MappingProxyType(dict(settings.daily_budget_cny)),
        copy_after_late_cancel=settings.cancel_too_late_copy,
        intake_seconds=settings.intake_seconds,
        queued_recheck=settings.queued_recheck_seconds,
        delivery_seconds=settings.delivery_seconds,
        **policies(settings),
    )


def policies(settings: Settings) -> dict[str, Any]:
    """The steps' policies (detect, prepare, poll, submit, copy, webhook), from ``settings``."""
    # A detect or submit attempt is presumed dead once its DashScope timeouts and a margin passed.
    attempt_seconds = (
        settings.dashscope_connect_timeout
        + settings.dashscope_read_timeout
        + settings.step_margin_seconds
    )
    submit_backoff = Backoff(base=settings.submit_backoff_base, cap=settings.submit_backoff_max)
    return {
        "detect": DetectPolicy(
            max_attempts=settings.detect_max_attempts,
            attempt_seconds=attempt_seconds,
            cache_seconds=settings.detect_cache_seconds,
            half_body=settings.half_body_without_ref_bg,
            backoff=submit_backoff,
        ),
        "prepare": PreparePolicy(
            max_attempts=settings.prepare_max_attempts,
            attempt_seconds=settings.video_download_seconds + PREPARE_MARGIN_SECONDS,
            recheck_seconds=settings.template_wait_recheck_seconds,
            backoff=submit_backoff,
        ),
        "poll": PollPolicy(
            first_delay=settings.poll_first_seconds,
            running_interval=settings.poll_running_seconds,
            pending_interval=settings.poll_pending_seconds,
            pending_max=settings.poll_pending_max_seconds,
            deadline=settings.job_remote_deadline_seconds,
            unknown_grace=settings.poll_unknown_grace,
            error_backoff=Backoff(
                base=settings.poll_error_backoff_base, cap=settings.poll_error_backoff_max
            ),
        ),
        "submit": SubmitPolicy(
            max_attempts=settings.submit_max_attempts,
            attempt_seconds=attempt_seconds,
            list_lag=settings.submit_list_lag_seconds,
            clock_skew=settings.submit_clock_skew_seconds,
            backoff=submit_backoff,
        ),
        "copy": CopyPolicy(
            backoff=Backoff(base=settings.copy_backoff_base, cap=settings.copy_backoff_max),
            lease_seconds=settings.copy_lease_seconds,
            expiry_margin=settings.copy_expiry_margin_seconds,
            # Pause (and go on in the next attempt) well before the task's soft time limit.
            attempt_seconds=max(settings.copy_time_limit / 2, settings.copy_time_limit - 60),
        ),
        "webhook": WebhookPolicy(
            give_up_after=settings.webhook_give_up_seconds,
            backoff=Backoff(base=settings.webhook_backoff_base, cap=settings.webhook_backoff_max),
        ),
    }


def services() -> Services:
    """This process's services, built on first use."""
    global _services
    if _services is None:
        with _lock:
            if _services is None:
                _services = build_services(get_settings())
    return _services


def built() -> Services | None:
    """This process's services if they were built, else None (never builds them)."""
    return _services


def install(**ports: Any) -> None:
    """Ports the entrypoint makes (``wake``, ``results``), for every services built from now."""
    with _lock:
        _installed.update(ports)
    reset()


def reset() -> None:
    """Forget the services (after a fork, or in tests)."""
    global _services
    _services = None
