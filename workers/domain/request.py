"""A producer's request: the fields it may send, how each is checked, the parsed :class:`JobRequest`."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from workers.domain.routes import QUEUES
from workers.errors import InvalidJobRequest
from workers.models.animate_anyone import ANIMATE_ANYONE_GEN2
from workers.models.profile import ModelProfile

VIDEO_RATIOS = ("9:16", "3:4")


# Fields every kind of job takes.
COMMON_FIELDS = frozenset(
    {
        "job_id",
        "metadata",
        "account",
        "priority",
        "producer",
        "callback_task",
        "callback_queue",
        "webhook_url",
    }
)


REQUEST_FIELDS = COMMON_FIELDS | {
    "image_url",
    "template_id",
    "video_url",
    "detect",
    "use_ref_img_bg",
    "video_ratio",
    "model",
}


TEMPLATE_FIELDS = COMMON_FIELDS | {"video_url"}


# A family that takes the dance video with every job (Wan2.2-Animate): its fields.
REFERENCE_VIDEO_FIELDS = COMMON_FIELDS | {"image_url", "video_url", "model", "mode", "check_image"}


# Fields of one family only: named with the reason when sent to the other.
TEMPLATE_FAMILY_ONLY = ("template_id", "detect", "use_ref_img_bg", "video_ratio")
REFERENCE_VIDEO_ONLY = ("mode", "check_image")


CALLBACK_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,199}\Z")


class JobKind(StrEnum):
    VIDEO = "video"  # animate.generate: ends STORED with a video in S3
    TEMPLATE = "template"  # animate.template: ends READY with an action template id


def callback_task_ok(value: Any) -> bool:
    """A Celery task name of the producer's own (never one of ours)."""
    return (
        isinstance(value, str)
        and bool(CALLBACK_RE.match(value))
        and not value.startswith("animate.")
    )


def callback_queue_ok(value: Any) -> bool:
    """A queue of the producer's own (never one our workers consume)."""
    return name_ok(value) and value not in QUEUES


def name_ok(value: Any) -> bool:
    """An account, producer or queue name."""
    return isinstance(value, str) and bool(NAME_RE.match(value))


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # accounts and producers


PRIORITY_RANGE = (-100, 100)


DEFAULT_PRODUCER = "default"


# \Z, not $: "$" also matches before a trailing newline, which would let "id\n" through.
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


TEMPLATE_ID_RE = re.compile(r"^AACT\.[A-Za-z0-9][A-Za-z0-9._-]{1,254}\Z")


MAX_URL_LENGTH = 2048


MAX_ECHOED_NAMES = 5  # unknown field names quoted back in an error, at most...


MAX_ECHOED_NAME = 40  # ...and this many characters of each


MAX_METADATA_BYTES = 4096


@dataclass(frozen=True)
class JobRequest:
    """A producer's request after validation.

    Inputs are URLs: ``http(s)://...``, or ``s3://<our bucket>/<key>`` for files a producer put
    in our bucket (the CLI and the Python API upload local files there). A video job names its
    motion either as ``template_id`` or as ``video_url`` (the dance video: its account's template
    for that video is reused, or made first). A template job has only ``video_url``.
    """

    image_url: str = ""
    template_id: str = ""
    use_ref_img_bg: bool | None = None
    video_ratio: str | None = None
    job_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    account: str | None = None  # None: the template's owner, else the default account
    priority: int = 0  # higher first, among this account's queued jobs
    producer: str = DEFAULT_PRODUCER  # fair round-robin between producers of one priority
    callback_task: str | None = None  # sent the result object when the job ends
    callback_queue: str | None = None
    webhook_url: str | None = None  # POSTed the signed result object when the job ends
    video_url: str | None = None  # the dance video to make (or reuse) a template from
    detect: bool = True  # check the image with DashScope's detector first (video jobs)
    model: str | None = None  # the video model the producer asked for (checked at intake)
    mode: str | None = None  # Wan2.2-Animate: wan-std or wan-pro
    check_image: bool | None = None  # Wan2.2-Animate: the call's own image check (default on)


def reject(code: str, message: str) -> InvalidJobRequest:
    return InvalidJobRequest(message, code=code)


def check_url(value: Any, name: str, *, allow_s3: bool = False) -> str:
    if not isinstance(value, str) or not value:
        raise reject("InvalidRequest.MissingField", f"{name} is required (a string URL)")
    if len(value) > MAX_URL_LENGTH:
        raise reject("InvalidRequest.BadUrl", f"{name} is longer than {MAX_URL_LENGTH} characters")
    try:
        parts = urlsplit(value)
    except ValueError:
        raise reject("InvalidRequest.BadUrl", f"{name} is not a URL") from None
    schemes = ("http", "https", "s3") if allow_s3 else ("http", "https")
    if parts.scheme not in schemes:
        allowed = "an http, https or s3 URL" if allow_s3 else "an http or https URL"
        raise reject(
            "InvalidRequest.BadUrl",
            f"{name} must be {allowed}, not {parts.scheme or 'a bare path'!r}",
        )
    if not parts.hostname:
        raise reject("InvalidRequest.BadUrl", f"{name} has no host")
    if parts.scheme == "s3" and (
        len(parts.path) < 2 or parts.query or parts.fragment or "\\" in value
    ):
        raise reject("InvalidRequest.BadUrl", f"{name} must look like s3://bucket/key")
    return value


def s3_ref(value: str) -> tuple[str, str] | None:
    """(bucket, key) of an ``s3://bucket/key`` input, else None."""
    parts = urlsplit(value)
    if parts.scheme != "s3" or not parts.hostname:
        return None
    return parts.netloc, parts.path.lstrip("/")


def _check_args(
    kind: str, kwargs: Mapping[str, Any], args: tuple[Any, ...], allowed: frozenset[str]
) -> None:
    if args:
        raise reject(
            "InvalidRequest.PositionalArgs",
            f"{kind} takes keyword arguments only (kwargs=...), got positional ones",
        )
    unknown = sorted(str(k) for k in set(kwargs) - allowed)
    if unknown:
        # Names chosen by a producer go into the job's error and the logs: bounded, and shown
        # as text (repr) whatever they hold.
        shown = [repr(name[:MAX_ECHOED_NAME]) + ("..." if len(name) > MAX_ECHOED_NAME else "")
                 for name in unknown[:MAX_ECHOED_NAMES]]  # fmt: skip
        more = (
            f" and {len(unknown) - MAX_ECHOED_NAMES} more"
            if len(unknown) > MAX_ECHOED_NAMES
            else ""
        )
        raise reject(
            "InvalidRequest.UnknownField",
            f"unknown field(s) {', '.join(shown)}{more}; allowed: {', '.join(sorted(allowed))}",
        )


def parse_request(
    kwargs: Mapping[str, Any],
    args: tuple[Any, ...] = (),
    profile: ModelProfile = ANIMATE_ANYONE_GEN2,
) -> JobRequest:
    """Validate the ``animate.generate`` kwargs for the model family this deployment runs
    (``profile``); raise :class:`InvalidJobRequest` with the reason. A field of the other
    family is refused by name, saying why, before anything is fetched or paid for."""
    model = _check_model(kwargs, profile)
    if not profile.takes_templates:
        return _parse_reference_video(kwargs, args, profile)
    _not_for(kwargs, REFERENCE_VIDEO_ONLY, profile)
    _check_args("animate.generate", kwargs, args, REQUEST_FIELDS)
    common = dataclasses.replace(_common(kwargs), model=model)
    image_url = check_url(kwargs.get("image_url"), "image_url", allow_s3=True)
    template_id = kwargs.get("template_id")
    video_url = kwargs.get("video_url")
    if template_id is not None and video_url is not None:
        raise reject(
            "InvalidRequest.TemplateOrVideo",
            "give template_id or video_url, not both (video_url makes or reuses a template)",
        )
    if video_url is not None:
        check_url(video_url, "video_url", allow_s3=True)
        template_id = ""
    elif not isinstance(template_id, str) or not template_id:
        raise reject(
            "InvalidRequest.MissingField",
            "template_id (an action template id) or video_url (a dance video) is required",
        )
    elif not TEMPLATE_ID_RE.match(template_id):
        raise reject(
            "InvalidRequest.TemplateId",
            "template_id must look like 'AACT.<...>' (an id from action-template generation)",
        )
    detect = kwargs.get("detect", True)
    if not isinstance(detect, bool):
        raise reject("InvalidRequest.BadType", "detect must be true or false")
    use_bg = kwargs.get("use_ref_img_bg")
    if use_bg is not None and not isinstance(use_bg, bool):
        raise reject("InvalidRequest.BadType", "use_ref_img_bg must be true or false")
    ratio = kwargs.get("video_ratio")
    if ratio is not None:
        if ratio not in VIDEO_RATIOS:
            raise reject("InvalidRequest.VideoRatio", "video_ratio must be '9:16' or '3:4'")
        if use_bg is not True:
            raise reject(
                "InvalidRequest.VideoRatioWithoutRefBg",
                "video_ratio only applies with use_ref_img_bg=true (otherwise the template's "
                "ratio is used); drop it or set use_ref_img_bg",
            )
    return dataclasses.replace(
        common,
        image_url=image_url,
        template_id=template_id,
        use_ref_img_bg=use_bg,
        video_ratio=ratio,
        video_url=video_url,
        detect=detect,
    )


def _check_model(kwargs: Mapping[str, Any], profile: ModelProfile) -> str | None:
    model = kwargs.get("model") if isinstance(kwargs, Mapping) else None
    if model is None:
        return None
    if not isinstance(model, str) or model != profile.name:
        shown = repr(model)[:80]
        raise reject(
            "InvalidRequest.Model",
            f"model {shown} is not {profile.name}, whose fields these are checked against",
        )
    return model


def _not_for(kwargs: Mapping[str, Any], names: Iterable[str], profile: ModelProfile) -> None:
    given = [name for name in names if isinstance(kwargs, Mapping) and name in kwargs]
    if not given:
        return
    if "template_id" in given:
        raise reject(
            "InvalidRequest.TemplateForModel",
            f"{profile.name} takes the dance video itself (video_url) with every job; action "
            "templates (template_id) are AnimateAnyone's",
        )
    family = "AnimateAnyone" if profile.takes_templates else "Wan2.2-Animate"
    other = "Wan2.2-Animate" if profile.takes_templates else "AnimateAnyone"
    raise reject(
        "InvalidRequest.NotForModel",
        f"{', '.join(given)} applies to {other} models, not {profile.name} ({family})",
    )


def _parse_reference_video(
    kwargs: Mapping[str, Any], args: tuple[Any, ...], profile: ModelProfile
) -> JobRequest:
    """A Wan2.2-Animate job: the person image, the dance video and the mode, in one call."""
    _not_for(kwargs, TEMPLATE_FAMILY_ONLY, profile)
    _check_args("animate.generate", kwargs, args, REFERENCE_VIDEO_FIELDS)
    common = _common(kwargs)
    image_url = check_url(kwargs.get("image_url"), "image_url", allow_s3=True)
    video_url = check_url(kwargs.get("video_url"), "video_url", allow_s3=True)
    mode = kwargs.get("mode")
    if mode not in profile.modes:
        shown = "missing" if mode is None else repr(mode)[:40]
        raise reject(
            "InvalidRequest.Mode",
            f"mode is {shown}; {profile.name} needs one of {', '.join(profile.modes)}",
        )
    check_image = kwargs.get("check_image")
    if check_image is not None and not isinstance(check_image, bool):
        raise reject("InvalidRequest.BadType", "check_image must be true or false")
    return dataclasses.replace(
        common, image_url=image_url, video_url=video_url, detect=False,
        model=kwargs.get("model"), mode=mode, check_image=check_image,
    )  # fmt: skip


def parse_template_request(kwargs: Mapping[str, Any], args: tuple[Any, ...] = ()) -> JobRequest:
    """Validate the ``animate.template`` kwargs (a template job: a dance video in, a template out)."""
    _check_args("animate.template", kwargs, args, TEMPLATE_FIELDS)
    common = _common(kwargs)
    video_url = check_url(kwargs.get("video_url"), "video_url", allow_s3=True)
    return dataclasses.replace(common, video_url=video_url, detect=False)


def _common(kwargs: Mapping[str, Any]) -> JobRequest:
    """The fields every job takes."""
    job_id = kwargs.get("job_id")
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID_RE.match(job_id)):
        raise reject(
            "InvalidRequest.JobId",
            "job_id must be 1-128 characters of letters, digits and . _ : - "
            "(starting with a letter or digit)",
        )
    metadata = kwargs.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise reject("InvalidRequest.Metadata", "metadata must be a JSON object")
    try:
        size = len(json.dumps(metadata, separators=(",", ":"), allow_nan=False).encode())
    except (TypeError, ValueError):
        raise reject("InvalidRequest.Metadata", "metadata must be plain JSON") from None
    if size > MAX_METADATA_BYTES:
        raise reject(
            "InvalidRequest.Metadata", f"metadata is {size} bytes; at most {MAX_METADATA_BYTES}"
        )
    account = kwargs.get("account")
    if account is not None and not (isinstance(account, str) and NAME_RE.match(account)):
        raise reject("InvalidRequest.Account", "account must be a configured account's name")
    priority = kwargs.get("priority", 0)
    if (
        isinstance(priority, bool)
        or not isinstance(priority, int)
        or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]
    ):
        raise reject(
            "InvalidRequest.Priority",
            f"priority must be an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}",
        )
    producer = kwargs.get("producer", DEFAULT_PRODUCER)
    if not isinstance(producer, str) or not NAME_RE.match(producer):
        raise reject(
            "InvalidRequest.Producer",
            "producer must be 1-64 characters of letters, digits and . _ -",
        )
    callback_task, callback_queue = _callback(kwargs)
    webhook_url = kwargs.get("webhook_url")
    if webhook_url is not None:
        check_url(webhook_url, "webhook_url")
    return JobRequest(
        job_id=job_id,
        metadata=metadata,
        account=account,
        priority=priority,
        producer=producer,
        callback_task=callback_task,
        callback_queue=callback_queue,
        webhook_url=webhook_url,
    )


def _callback(kwargs: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The producer's callback task and the queue of its own it goes to (both or neither)."""
    callback_task = kwargs.get("callback_task")
    if callback_task is not None and not callback_task_ok(callback_task):
        raise reject(
            "InvalidRequest.Callback",
            "callback_task must be a Celery task name of yours (not animate.*)",
        )
    callback_queue = kwargs.get("callback_queue")
    if callback_queue is not None and not name_ok(callback_queue):
        raise reject("InvalidRequest.Callback", "callback_queue must be a queue name")
    if callback_queue is not None and callback_task is None:
        raise reject("InvalidRequest.Callback", "callback_queue needs a callback_task")
    if callback_task is not None and callback_queue is None:
        raise reject(
            "InvalidRequest.Callback",
            "callback_task needs a callback_queue that your own workers consume (our workers "
            "consume the default queue and would discard your task as unregistered)",
        )
    if callback_queue in QUEUES:
        raise reject(
            "InvalidRequest.Callback",
            f"callback_queue {callback_queue!r} is one of this service's queues; our workers "
            "would discard your task there: use a queue of your own",
        )
    return callback_task, callback_queue


def host_allowed(url: str, patterns: Iterable[str]) -> bool:
    """Whether a result URL's host matches one of ``patterns`` (``*.aliyuncs.com``, ``127.0.0.1``)."""
    host = (urlsplit(url).hostname or "").lower()
    return bool(host) and any(fnmatch.fnmatchcase(host, p.strip().lower()) for p in patterns)
