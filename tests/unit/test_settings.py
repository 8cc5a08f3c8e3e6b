"""Settings: one reader of the environment, validated at start-up with messages naming the variable."""

from __future__ import annotations

import pytest

from config.settings import SettingsError, load_settings


def test_defaults() -> None:
    """With an empty environment the documented defaults apply."""
    s = load_settings({})
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.broker_url == s.result_backend == s.redis_url
    assert (
        s.dashscope_base_url is None and s.dashscope_region == "cn-beijing"
    )  # its host: the profile's
    assert s.dashscope_model == "animate-anyone-gen2"
    assert s.aws_request_checksum_calculation == "when_required"


def test_broker_and_backend_override() -> None:
    """CELERY_BROKER_URL / CELERY_RESULT_BACKEND override REDIS_URL separately."""
    s = load_settings({"REDIS_URL": "redis://a/1", "CELERY_BROKER_URL": "redis://b/2"})
    assert s.broker_url == "redis://b/2"
    assert s.result_backend == "redis://a/1"


def test_the_model_is_a_setting_that_names_a_profile() -> None:
    """DASHSCOPE_MODEL picks the model's profile (workers/models); a name with no profile stops
    the worker with the known ones named, before anything is sent."""
    from workers import bootstrap

    s = load_settings({"DASHSCOPE_MODEL": "wan2.7-r2v"})
    assert s.dashscope_model == "wan2.7-r2v"
    with pytest.raises(ValueError, match="has no profile; known: animate-anyone-gen2"):
        bootstrap.tuning(s)
    assert bootstrap.tuning(load_settings({})).profile.name == "animate-anyone-gen2"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"POLL_RUNNING_SECONDS": "soon"}, "POLL_RUNNING_SECONDS"),
        ({"POLL_RUNNING_SECONDS": "-1"}, "POLL_RUNNING_SECONDS"),
        ({"AWS_REQUEST_CHECKSUM_CALCULATION": "always"}, "AWS_REQUEST_CHECKSUM_CALCULATION"),
        ({"COPY_PART_SIZE_MB": "1"}, "COPY_PART_SIZE_MB"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], named: str) -> None:
    """A bad value is refused with the variable's name in the message."""
    with pytest.raises(SettingsError, match=named):
        load_settings(env)


def test_visibility_timeout_must_dwarf_countdowns() -> None:
    """Trap: a countdown near the visibility timeout is redelivered, so such settings are refused."""
    with pytest.raises(SettingsError, match="VISIBILITY_TIMEOUT"):
        load_settings({"VISIBILITY_TIMEOUT": "100", "COPY_TIME_LIMIT": "60"})
    with pytest.raises(SettingsError, match="VISIBILITY_TIMEOUT"):
        load_settings({"POLL_PENDING_MAX_SECONDS": "600", "COUNTDOWN_MAX_SECONDS": "600"})
    # Waits over COUNTDOWN_MAX_SECONDS are parked in Redis, not held: no redelivery to fear.
    assert load_settings({"POLL_PENDING_MAX_SECONDS": "600"}).countdown_max_seconds == 10


def test_copy_must_end_before_redelivery() -> None:
    """Trap: a copy that outlives the visibility timeout would run twice, so it is refused."""
    with pytest.raises(SettingsError, match="COPY_TIME_LIMIT"):
        load_settings({"COPY_TIME_LIMIT": "1790"})


def test_workers_need_key_and_bucket() -> None:
    """Producers need neither; a worker without them is told which is missing."""
    s = load_settings({})
    with pytest.raises(SettingsError, match="DASHSCOPE_API_KEY and S3_BUCKET"):
        s.require_worker()
    load_settings({"DASHSCOPE_API_KEY": "sk-x", "S3_BUCKET": "b"}).require_worker()


def test_key_is_secret() -> None:
    """The API key never shows in the settings' repr."""
    s = load_settings({"DASHSCOPE_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(s)
    assert "sk-very-secret" not in str(s.model_dump())
