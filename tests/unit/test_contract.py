"""The written contract and the code agree: the kwargs schema, the result schema, task names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from workers.domain.job import Job
from workers.domain.request import (
    JOB_ID_RE,
    NAME_RE,
    PRIORITY_RANGE,
    REQUEST_FIELDS,
    TEMPLATE_FIELDS,
    TEMPLATE_ID_RE,
    VIDEO_RATIOS,
    JobKind,
    JobRequest,
    parse_request,
    parse_template_request,
)
from workers.domain.states import JobState
from workers.domain.views import result_object
from workers.errors import InvalidJobRequest
from workers.models import WAN_ANIMATE_MOVE

DOCS = Path(__file__).resolve().parents[2] / "docs"
KWARGS = json.loads((DOCS / "schema" / "generate-kwargs.v1.json").read_text())
RESULT = json.loads((DOCS / "schema" / "result.v1.json").read_text())
TEMPLATE = json.loads((DOCS / "schema" / "template-kwargs.v1.json").read_text())
OK = {"image_url": "https://cdn.test/a.png", "template_id": "AACT.abc.def"}


def test_fields_match() -> None:
    """The schema's properties are exactly the fields intake accepts; the required ones agree."""
    assert set(KWARGS["properties"]) == set(REQUEST_FIELDS)
    assert set(KWARGS["required"]) == {"image_url"}
    assert KWARGS["oneOf"] == [{"required": ["template_id"]}, {"required": ["video_url"]}]
    assert KWARGS["additionalProperties"] is False
    assert set(TEMPLATE["properties"]) == set(TEMPLATE_FIELDS)
    assert set(TEMPLATE["required"]) == {"video_url"}
    assert TEMPLATE["additionalProperties"] is False


def test_rules_match() -> None:
    """Patterns, enums and ranges in the schema are the code's."""
    props = KWARGS["properties"]
    assert props["video_ratio"]["enum"] == list(VIDEO_RATIOS)
    assert (props["priority"]["minimum"], props["priority"]["maximum"]) == PRIORITY_RANGE
    for field, regex in (("job_id", JOB_ID_RE), ("template_id", TEMPLATE_ID_RE),
                         ("account", NAME_RE), ("producer", NAME_RE)):  # fmt: skip
        assert props[field]["pattern"].rstrip("$") == regex.pattern.removesuffix("\\Z")


SAMPLES: list[dict[str, Any]] = [
    OK,
    {**OK, "use_ref_img_bg": True, "video_ratio": "3:4"},
    {**OK, "video_ratio": "3:4"},
    {**OK, "use_ref_img_bg": False, "video_ratio": "9:16"},
    {**OK, "video_ratio": "1:1", "use_ref_img_bg": True},
    {**OK, "use_ref_img_bg": "yes"},
    {**OK, "job_id": "order-42"},
    {**OK, "job_id": "-bad"},
    {**OK, "job_id": "x" * 129},
    {**OK, "template_id": "ACT.1"},
    {**OK, "image_url": "ftp://x/a.png"},
    {**OK, "image_url": "HTTPS://CDN.test/a.png"},
    {"image_url": "https://cdn.test/a.png"},
    {**OK, "priority": 5, "producer": "billing", "account": "main"},
    {**OK, "priority": 101},
    {**OK, "priority": 1.5},
    {**OK, "priority": True},
    {**OK, "producer": ""},
    {**OK, "metadata": {"a": [1, 2]}},
    {**OK, "metadata": [1]},
    {**OK, "extra": 1},
    {**OK, "callback_task": "billing.video_done", "callback_queue": "billing"},
    {**OK, "callback_task": "billing.video_done"},
    {**OK, "callback_task": "animate.poll"},
    {**OK, "callback_queue": "billing"},
    {**OK, "callback_task": "bad name"},
    {"image_url": "https://cdn.test/a.png", "video_url": "https://cdn.test/dance.mp4"},
    {"image_url": "s3://bucket/inputs/ab.png", "video_url": "s3://bucket/inputs/cd.mp4"},
    {**OK, "video_url": "https://cdn.test/dance.mp4"},
    {"image_url": "https://cdn.test/a.png", "video_url": "ftp://cdn.test/dance.mp4"},
    {"image_url": "s3://bucket", "video_url": "https://cdn.test/dance.mp4"},
    {"image_url": "s3://bucket/k?x=1", "template_id": "AACT.abc.def"},
    {**OK, "detect": False},
    {**OK, "detect": "no"},
]
TEMPLATE_SAMPLES: list[dict[str, Any]] = [
    {"video_url": "https://cdn.test/dance.mp4"},
    {"video_url": "s3://bucket/inputs/cd.mp4", "account": "main", "job_id": "t-1"},
    {"video_url": "https://cdn.test/dance.mp4", "image_url": "https://cdn.test/a.png"},
    {"video_url": "https://cdn.test/dance.mp4", "detect": False},
    {"video_url": "file:///tmp/dance.mp4"},
    {},
    {"video_url": "https://cdn.test/dance.mp4", "callback_queue": "q"},
]


@pytest.mark.parametrize("kwargs", SAMPLES)
def test_schema_and_code_decide_alike(kwargs: dict[str, Any]) -> None:
    """The same request is accepted by both the schema and intake, or refused by both."""
    schema_ok = jsonschema.Draft202012Validator(KWARGS).is_valid(kwargs)
    try:
        parse_request(kwargs)
        code_ok = True
    except InvalidJobRequest:
        code_ok = False
    assert schema_ok == code_ok, kwargs


@pytest.mark.parametrize("kwargs", TEMPLATE_SAMPLES)
def test_template_schema_and_code_decide_alike(kwargs: dict[str, Any]) -> None:
    schema_ok = jsonschema.Draft202012Validator(TEMPLATE).is_valid(kwargs)
    try:
        parse_template_request(kwargs)
        code_ok = True
    except InvalidJobRequest:
        code_ok = False
    assert schema_ok == code_ok, kwargs


def test_template_result_matches_the_schema() -> None:
    request = JobRequest(video_url="https://cdn.test/dance.mp4")
    job = Job(
        "tpl-1", JobState.READY, 7, request, 1.0, 2.0, kind=JobKind.TEMPLATE.value,
        template_id="AACT.acct.1", remote_task_id="t-9", video_duration=3.0, finished_at=2.0,
    )  # fmt: skip
    outcome = result_object(job)
    jsonschema.Draft202012Validator(RESULT).validate(outcome)
    assert (outcome["kind"], outcome["state"], outcome["template_id"]) == (
        "template",
        "READY",
        "AACT.acct.1",
    )


@pytest.mark.parametrize("state", ["STORED", "FAILED", "REJECTED", "CANCELED", "EXPIRED"])
def test_result_object_matches_its_schema(state: str) -> None:
    """The result object the code publishes validates against result.v1.json in every state."""
    request = JobRequest("https://cdn.test/a.png", "AACT.abc.def", metadata={"n": 1})
    stored = state == "STORED"
    job = Job(
        "order-42", JobState(state), 9, request, 1.0, 2.0,
        remote_task_id="t-1", submitted_at=1.5, finished_at=2.0, video_duration=4.0 if stored else None,
        s3_bucket="b" if stored else None, s3_key="v/order-42.mp4" if stored else None,
        bytes=10 if stored else None, sha256="ab" * 32 if stored else None,
        error_code=None if stored else "InternalError.Algo",
        error_message=None if stored else "boom",
    )  # fmt: skip
    jsonschema.Draft202012Validator(RESULT).validate(result_object(job))
    assert set(RESULT["properties"]) == set(result_object(job))


def test_public_task_names_are_registered() -> None:
    """The task names the contract publishes are the ones the worker registers."""
    text = (DOCS / "contract.md").read_text()
    import workers.entrypoints.celery.tasks  # noqa: F401  (registers the tasks)
    from config.celery_app import app

    for name in ("animate.generate", "animate.template", "animate.cancel"):
        assert f"`{name}`" in text
        assert name in app.tasks


# ------------------------------------------------------------------ a Wan2.2-Animate deployment

WAN_KWARGS = json.loads((DOCS / "schema" / "generate-kwargs.wan.v1.json").read_text())
WAN_OK = {"image_url": "https://cdn.test/a.png", "video_url": "https://cdn.test/d.mp4",
          "mode": "wan-std"}  # fmt: skip
WAN_SAMPLES: list[dict[str, Any]] = [
    WAN_OK,
    {**WAN_OK, "mode": "wan-pro", "check_image": False, "model": "wan2.2-animate-move"},
    {**WAN_OK, "mode": "wan-max"},
    {k: v for k, v in WAN_OK.items() if k != "mode"},
    {k: v for k, v in WAN_OK.items() if k != "video_url"},
    {**WAN_OK, "template_id": "AACT.abc.def"},
    {**WAN_OK, "detect": False},
    {**WAN_OK, "video_ratio": "9:16"},
    {**WAN_OK, "check_image": "no"},
    {**WAN_OK, "model": "animate-anyone-gen2"},
    {**WAN_OK, "callback_task": "billing.done", "callback_queue": "billing"},
    {**WAN_OK, "callback_task": "billing.done"},
    {**WAN_OK, "image_url": "s3://bucket/inputs/a.png", "video_url": "s3://bucket/inputs/d.mp4"},
    {**WAN_OK, "extra": 1},
]


def test_the_wan_schema_has_the_fields_a_wan_deployment_takes() -> None:
    from workers.domain.request import REFERENCE_VIDEO_FIELDS

    assert set(WAN_KWARGS["properties"]) == set(REFERENCE_VIDEO_FIELDS)
    assert set(WAN_KWARGS["required"]) == {"image_url", "video_url", "mode"}
    assert WAN_KWARGS["properties"]["mode"]["enum"] == list(WAN_ANIMATE_MOVE.modes)
    assert KWARGS["properties"]["model"]["enum"] == ["animate-anyone-gen2"]


@pytest.mark.parametrize("kwargs", WAN_SAMPLES)
def test_wan_schema_and_code_decide_alike(kwargs: dict[str, Any]) -> None:
    """(The schema names both Wan models; the code takes only its deployment's: samples name
    the deployment's, wan2.2-animate-move.)"""
    schema_ok = jsonschema.Draft202012Validator(WAN_KWARGS).is_valid(kwargs)
    try:
        parse_request(kwargs, (), WAN_ANIMATE_MOVE)
        code_ok = True
    except InvalidJobRequest:
        code_ok = False
    assert schema_ok == code_ok, kwargs
