"""bootstrap is the one place settings become policies: every tunable has one default (in
settings), production reads each from its setting, and the services are built once, frozen."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from config.settings import Settings, load_settings
from workers import bootstrap
from workers.domain import policies
from workers.steps.context import Services, Tuning

WORKER = {"DASHSCOPE_API_KEY": "sk-test-bootstrap", "S3_BUCKET": "b"}


@pytest.mark.parametrize(
    "cls",
    [
        policies.Backoff,
        policies.PollPolicy,
        policies.CopyPolicy,
        policies.DetectPolicy,
        policies.PreparePolicy,
        policies.SubmitPolicy,
        policies.WebhookPolicy,
        Tuning,
    ],
)
def test_policies_hold_values_and_no_defaults_of_their_own(cls: type[Any]) -> None:
    defaulted = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert defaulted == []


# (setting, a value unlike its default, where production reads it)
READS: list[tuple[str, str, Callable[[Tuning], Any], Any]] = [
    ("POLL_FIRST_SECONDS", "7", lambda t: t.poll.first_delay, 7.0),
    ("POLL_RUNNING_SECONDS", "7", lambda t: t.poll.running_interval, 7.0),
    ("POLL_PENDING_SECONDS", "7", lambda t: t.poll.pending_interval, 7.0),
    ("POLL_PENDING_MAX_SECONDS", "70", lambda t: t.poll.pending_max, 70.0),
    ("JOB_REMOTE_DEADLINE_SECONDS", "700", lambda t: t.poll.deadline, 700.0),
    ("POLL_UNKNOWN_GRACE", "7", lambda t: t.poll.unknown_grace, 7),
    ("POLL_ERROR_BACKOFF_BASE", "7", lambda t: t.poll.error_backoff.base, 7.0),
    ("POLL_ERROR_BACKOFF_MAX", "70", lambda t: t.poll.error_backoff.cap, 70.0),
    ("SUBMIT_MAX_ATTEMPTS", "7", lambda t: t.submit.max_attempts, 7),
    ("SUBMIT_BACKOFF_BASE", "7", lambda t: t.submit.backoff.base, 7.0),
    ("SUBMIT_BACKOFF_MAX", "70", lambda t: t.submit.backoff.cap, 70.0),
    ("SUBMIT_LIST_LAG_SECONDS", "7", lambda t: t.submit.list_lag, 7.0),
    ("SUBMIT_CLOCK_SKEW_SECONDS", "7", lambda t: t.submit.clock_skew, 7.0),
    ("STEP_MARGIN_SECONDS", "7", lambda t: t.submit.attempt_seconds, 5 + 30 + 7.0),
    ("STEP_MARGIN_SECONDS", "7", lambda t: t.detect.attempt_seconds, 5 + 30 + 7.0),
    ("DASHSCOPE_READ_TIMEOUT", "7", lambda t: t.submit.attempt_seconds, 5 + 7 + 10.0),
    ("COPY_BACKOFF_BASE", "7", lambda t: t.copy.backoff.base, 7.0),
    ("COPY_BACKOFF_MAX", "70", lambda t: t.copy.backoff.cap, 70.0),
    ("COPY_LEASE_SECONDS", "7", lambda t: t.copy.lease_seconds, 7.0),
    ("COPY_EXPIRY_MARGIN_SECONDS", "7", lambda t: t.copy.expiry_margin, 7.0),
    ("COPY_TIME_LIMIT", "100", lambda t: t.copy.attempt_seconds, 50.0),
    ("DETECT_MAX_ATTEMPTS", "7", lambda t: t.detect.max_attempts, 7),
    ("DETECT_CACHE_SECONDS", "700", lambda t: t.detect.cache_seconds, 700),
    ("HALF_BODY_WITHOUT_REF_BG", "warn", lambda t: t.detect.half_body, "warn"),
    ("PREPARE_MAX_ATTEMPTS", "7", lambda t: t.prepare.max_attempts, 7),
    ("TEMPLATE_WAIT_RECHECK_SECONDS", "7", lambda t: t.prepare.recheck_seconds, 7.0),
    ("VIDEO_DOWNLOAD_SECONDS", "7", lambda t: t.prepare.attempt_seconds, 67.0),
    ("WEBHOOK_GIVE_UP_SECONDS", "7", lambda t: t.webhook.give_up_after, 7.0),
    ("WEBHOOK_BACKOFF_BASE", "7", lambda t: t.webhook.backoff.base, 7.0),
    ("WEBHOOK_BACKOFF_MAX", "70", lambda t: t.webhook.backoff.cap, 70.0),
    ("INTAKE_SECONDS", "70", lambda t: t.intake_seconds, 70.0),
    ("QUEUED_RECHECK_SECONDS", "70", lambda t: t.queued_recheck, 70.0),
    ("DELIVERY_SECONDS", "70", lambda t: t.delivery_seconds, 70.0),
    ("THROTTLED_MAX_PER_JOB", "7", lambda t: t.max_throttled, 7),
    ("CANCEL_TOO_LATE_COPY", "false", lambda t: t.copy_after_late_cancel, False),
    ("S3_PREFIX", "p/v", lambda t: t.s3_prefix, "p/v"),
    ("INPUT_PREFIX", "in/", lambda t: t.input_prefix, "in/"),
    ("VIDEO_URL_HOSTS", "cdn.test", lambda t: t.video_hosts, ("cdn.test",)),
]


@pytest.mark.parametrize(("name", "value", "read", "expected"), READS)
def test_production_reads_each_tunable_from_its_setting(
    name: str, value: str, read: Callable[[Tuning], Any], expected: Any
) -> None:
    default = read(bootstrap.tuning(load_settings(WORKER)))
    assert default != expected  # the value chosen differs from the default...
    assert read(bootstrap.tuning(load_settings({**WORKER, name: value}))) == expected  # ...and wins


def test_the_poll_interval_production_runs_on_is_the_setting() -> None:
    """The defect this refactor ends: PollPolicy said 3 s, production polled every 1 s."""
    settings = load_settings({**WORKER, "POLL_RUNNING_SECONDS": "4.5"})
    svc = bootstrap.build_services(settings)
    assert svc.poll.running_interval == 4.5
    assert bootstrap.tuning(load_settings(WORKER)).poll.running_interval == (
        Settings.model_fields["poll_running_seconds"].default
    )


def test_services_are_frozen_and_carry_the_entrypoint_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[Any] = []
    monkeypatch.setattr(bootstrap, "_installed", {})
    bootstrap.install(wake=sent.append)
    svc = bootstrap.build_services(load_settings(WORKER))
    assert isinstance(svc, Services)
    with pytest.raises(dataclasses.FrozenInstanceError):
        svc.wake = print  # type: ignore[misc]
    svc.wake("a step")  # type: ignore[arg-type]
    assert sent == ["a step"]


def test_the_quota_spent_follows_the_models_profile_unless_set() -> None:
    """Nothing hard-coded: unset rates are a share of what the model's profile documents."""
    aa = bootstrap.quota(load_settings({}))
    assert (aa.submit, aa.query, aa.detect, aa.concurrency) == (0.8, 15.0, 4.0, 1)
    wan = bootstrap.quota(load_settings({"DASHSCOPE_MODEL": "wan2.2-animate-move"}))
    assert (wan.submit, wan.concurrency) == (4.0, 1)
    own = bootstrap.quota(load_settings({"DASHSCOPE_MODEL": "wan2.2-animate-mix",
                                         "DASHSCOPE_SUBMIT_RATE": "2.5",
                                         "DASHSCOPE_CONCURRENCY": "3"}))  # fmt: skip
    assert (own.submit, own.concurrency) == (2.5, 3)


def test_each_account_uses_its_regions_host() -> None:
    """An API key works only in its region: each account's base URL follows its region (the
    model profile's host, DASHSCOPE_BASE_URL for the default region, or DASHSCOPE_REGION_URLS);
    an account in a region the model is not offered in stops the worker."""
    from config.settings import SettingsError
    from workers import models

    wan = models.profile("wan2.2-animate-move")
    settings = load_settings({**WORKER, "DASHSCOPE_ACCOUNTS": '{"sg": "sk-sg-000001"}',
                              "DASHSCOPE_ACCOUNT_REGIONS": '{"sg": "ap-southeast-1"}'})  # fmt: skip
    assert bootstrap.account_regions(settings, [wan]) == {
        "default": ("cn-beijing", "https://dashscope.aliyuncs.com/api/v1"),
        "sg": ("ap-southeast-1", "https://dashscope-intl.aliyuncs.com/api/v1"),
    }
    proxied = load_settings({**WORKER, "DASHSCOPE_BASE_URL": "http://emu:8765/api/v1",
                             "DASHSCOPE_REGION_URLS": '{"ap-southeast-1": "http://sg/api/v1"}',
                             "DASHSCOPE_ACCOUNTS": '{"sg": "sk-sg-000001"}',
                             "DASHSCOPE_ACCOUNT_REGIONS": '{"sg": "ap-southeast-1"}'})  # fmt: skip
    assert bootstrap.account_regions(proxied, [wan]) == {
        "default": ("cn-beijing", "http://emu:8765/api/v1"),
        "sg": ("ap-southeast-1", "http://sg/api/v1"),
    }
    with pytest.raises(SettingsError, match="none of animate-anyone-gen2 is offered"):
        bootstrap.account_regions(settings, [models.profile("animate-anyone-gen2")])
    # A Singapore account is fine where a model offered there may be named (Wan).
    both = [models.profile("animate-anyone-gen2"), wan]
    assert bootstrap.account_regions(settings, both)["sg"][0] == "ap-southeast-1"
    with pytest.raises(SettingsError, match="region 'us-east-1'"):
        bootstrap.account_regions(load_settings({**WORKER, "DASHSCOPE_REGION": "us-east-1"}), [wan])
