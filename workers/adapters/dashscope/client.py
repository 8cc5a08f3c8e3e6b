"""The DashScope adapter: AnimateAnyone's async task API (submit, query, cancel, list, detect) over httpx.

It owns the wire format (URLs, headers, bodies, Beijing-time stamps) and maps every HTTP outcome onto
``workers.errors``. It never retries, sleeps or sets timeouts: the injected ``httpx.Client`` does.
It also does DashScope's temporary upload (a policy, then an OSS form post) for inputs that exist
only as local bytes.
"""

from __future__ import annotations

import logging
import math
import mimetypes
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx

from workers.domain.states import RemoteStatus as RemoteStatus
from workers.errors import (
    DashScopeBadResponse,
    DashScopeRejected,
    DashScopeThrottled,
    DashScopeUnavailable,
)
from workers.models import ANIMATE_ANYONE_GEN2, ModelProfile, RemoteModel

logger = logging.getLogger(__name__)

# DashScope prints task times (and reads list bounds) in Beijing time, which has no DST.
BEIJING = timezone(timedelta(hours=8), "UTC+08:00")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TASK_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S")
_LIST_TIME_FORMAT = "%Y%m%d%H%M%S"
_MAX_ERROR_TEXT = 200  # of a non-JSON error body (an HTML page from a proxy, say)
_MAX_ERROR_MESSAGE = 500  # of DashScope's own error message
_UPLOADS = "/uploads"
_MAX_FILENAME_BYTES = 255
# What the getPolicy ``data`` object must hold (strings), besides ``max_file_size_mb`` (a number).
_POLICY_FIELDS = (
    "policy",
    "signature",
    "upload_dir",
    "upload_host",
    "oss_access_key_id",
    "x_oss_object_acl",
    "x_oss_forbid_overwrite",
)
# OSS answers errors in XML; only these elements are read, with bounded patterns.
_OSS_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_OSS_MESSAGE = re.compile(r"<Message>([^<]{1,500})</Message>")
_OSS_REQUEST_ID = re.compile(r"<RequestId>([^<]{1,100})</RequestId>")

# httpx transport failures, most specific first, and how a job record names them.
_TRANSPORT_FAILURES: tuple[tuple[type[httpx.RequestError], str], ...] = (
    (httpx.ConnectTimeout, "connect timed out"),
    (httpx.ReadTimeout, "read timed out"),
    (httpx.WriteTimeout, "write timed out"),
    (httpx.PoolTimeout, "no free connection in the pool"),
    (httpx.TimeoutException, "timed out"),
    (httpx.ProxyError, "proxy failed"),
    (httpx.UnsupportedProtocol, "unsupported URL scheme"),
    (httpx.ConnectError, "could not connect"),
    (httpx.RemoteProtocolError, "connection dropped"),
    (httpx.LocalProtocolError, "could not send the request"),
    (httpx.ReadError, "read failed"),
    (httpx.WriteError, "write failed"),
    (httpx.DecodingError, "could not decode the response"),
)


@dataclass(frozen=True)
class VideoRequest:
    """One video job: the person image and either the action template to apply
    (``animate-anyone-gen2``) or the dance video and a mode (Wan2.2-Animate)."""

    image_url: str
    template_id: str = ""
    use_ref_img_bg: bool | None = None  # omitted from ``parameters`` when None (DashScope: false)
    video_ratio: str | None = None  # omitted when None (DashScope: "9:16")
    video_url: str | None = None  # Wan2.2-Animate: the reference video
    mode: str | None = None  # Wan2.2-Animate: wan-std | wan-pro
    check_image: bool | None = None  # Wan2.2-Animate: omitted when None (DashScope: true)


@dataclass(frozen=True)
class SubmittedTask:
    """DashScope's answer to an accepted async submit."""

    task_id: str
    status: RemoteStatus
    request_id: str | None


@dataclass(frozen=True)
class RemoteTask:
    """One ``GET /tasks/{id}`` answer. Times are aware datetimes in UTC."""

    task_id: str
    status: RemoteStatus
    raw_status: str
    video_url: str | None  # SUCCEEDED video tasks; valid 24 h after end_time
    template_id: str | None  # SUCCEEDED template tasks
    video_duration: float | None  # usage.video_duration, the billed seconds
    code: str | None  # FAILED (or UNKNOWN, if DashScope sends one)
    message: str | None
    submit_time: datetime | None
    scheduled_time: datetime | None
    end_time: datetime | None
    request_id: str | None


@dataclass(frozen=True)
class TaskListItem:
    """One row of ``GET /tasks``. ``status`` is DashScope's string as sent."""

    task_id: str
    status: str
    model_name: str | None
    created_at: datetime | None  # gmt_create, aware UTC
    request_id: str | None


@dataclass(frozen=True)
class TaskPage:
    """One page of ``GET /tasks``."""

    items: tuple[TaskListItem, ...]
    total: int
    page_no: int
    total_page: int


class DashScopeClient:
    """DashScope's AnimateAnyone endpoints and task API, one call per method.

    ``http`` carries the connection pool and the timeouts, so the caller must configure them
    (``httpx.Client(timeout=httpx.Timeout(...))``); httpx's default of 5 s everywhere may be short for
    a submit, where DashScope may fetch the input before it answers. Every URL is built from ``base_url``
    (``https://dashscope.aliyuncs.com/api/v1``), so any ``base_url`` on ``http`` itself is ignored.

    Failures raise ``workers.errors``: ``DashScopeUnavailable`` (transport errors, timeouts, 5xx,
    408), ``DashScopeThrottled`` (429), ``DashScopeRejected`` (other 4xx, with DashScope's code) and
    ``DashScopeBadResponse`` (a 200 without the documented shape). Nothing is retried here.

    ``upload`` puts local bytes into DashScope's temporary store (docs §7) and returns an
    ``oss://`` URL. It asks ``GET /uploads?action=getPolicy`` (with the key), then form-posts the
    file to the policy's ``upload_host`` without the key. The file is bound to the model named and
    to this account for 48 h; any call that passes an ``oss://`` URL gets the
    ``X-DashScope-OssResourceResolve: enable`` header automatically.
    """

    def __init__(
        self,
        http: httpx.Client,
        *,
        api_key: str,
        base_url: str,
        profile: ModelProfile = ANIMATE_ANYONE_GEN2,
        oss_resolve: bool = False,
    ) -> None:
        # A key with spaces or control characters would make httpx raise an error quoting the header.
        if not api_key or not all("!" <= c <= "~" for c in api_key):
            raise ValueError("api_key must be non-empty printable ASCII without spaces")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ValueError(
                f"base_url must be an absolute http(s) URL without a query: {base_url!r}"
            )
        for remote in (profile.video, profile.detect, profile.template):
            if remote is not None:
                _check_segment(remote.service, "service")
                _check_segment(remote.endpoint, "endpoint")
        self._http = http
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._profile = profile
        self._oss_resolve = oss_resolve

    def __repr__(self) -> str:
        return f"DashScopeClient(base_url={self._base_url!r}, model={self._profile.name!r})"

    # ------------------------------------------------------------------ public API

    def submit_video(
        self, request: VideoRequest, profile: ModelProfile | None = None
    ) -> SubmittedTask:
        """Start one video generation (``X-DashScope-Async: enable``) on ``profile``'s model (the
        client's own by default); every call is a paid task."""
        profile = profile or self._profile
        fields = profile.input_fields
        if not profile.takes_templates:  # Wan2.2-Animate: image, video and mode
            if request.video_url is None or request.mode is None:  # (intake makes sure of both)
                raise DashScopeRejected(f"{profile.name} needs video_url and mode: nothing sent",
                                        code="InvalidRequest.Mode")  # fmt: skip
            wan: dict[str, Any] = {"mode": request.mode}
            if request.check_image is not None:
                wan["check_image"] = request.check_image
            video_input = {fields["image_url"]: request.image_url,
                           fields["video_url"]: request.video_url}  # fmt: skip
            return self.submit_async(profile.video, video_input, wan)
        parameters: dict[str, Any] = {}
        if request.use_ref_img_bg is not None:
            parameters["use_ref_img_bg"] = request.use_ref_img_bg
        if request.video_ratio is not None:
            parameters["video_ratio"] = request.video_ratio
        return self.submit_async(
            profile.video,
            {fields["image_url"]: request.image_url, fields["template_id"]: request.template_id},
            parameters,
        )

    def submit_async(
        self,
        remote: RemoteModel,
        input: dict[str, Any],
        parameters: dict[str, Any] | None = None,
    ) -> SubmittedTask:
        """Start an async task of ``remote`` (at its ``/services/aigc/...`` path).

        For example ``submit_async(profile.template, {"video_url": ...})``.
        """
        _check_segment(remote.endpoint, "endpoint")
        headers = {"X-DashScope-Async": "enable", **self._oss_header(input)}
        body = {"model": remote.name, "input": input, "parameters": parameters or {}}
        response = self._send("submit", "POST", remote.path, json_body=body, headers=headers)
        data = _json_object("submit", response)
        output = _output("submit", data)
        raw_status = _required_str("submit", output, "task_status")
        return SubmittedTask(
            task_id=_required_str("submit", output, "task_id"),
            status=RemoteStatus.parse(raw_status),
            request_id=_optional_str("submit", data, "request_id"),
        )

    def get_task(self, task_id: str) -> RemoteTask:
        """Query one task. An unknown or expired id is HTTP 200 with status ``UNKNOWN``, not an error."""
        _check_segment(task_id, "task_id")
        response = self._send("query", "GET", f"/tasks/{task_id}")
        return _parse_task("query", _json_object("query", response), task_id)

    def cancel_task(self, task_id: str) -> None:
        """Cancel a PENDING task; any other state gives ``DashScopeRejected("UnsupportedOperation")``."""
        _check_segment(task_id, "task_id")
        # The answer is only {"request_id": ...}: a 2xx is success whatever its body.
        self._send("cancel", "POST", f"/tasks/{task_id}/cancel")

    def list_tasks(
        self,
        *,
        start: datetime,
        end: datetime,
        model: str | None = None,
        status: str | None = None,
        page_no: int = 1,
        page_size: int = 100,
    ) -> TaskPage:
        """One page of the account's tasks submitted between ``start`` and ``end`` (aware datetimes).

        DashScope allows a window of at most 24 h and truncates the bounds to whole seconds.
        """
        if start.tzinfo is None or end.tzinfo is None:
            raise ValueError("start and end must be timezone-aware")
        if end < start:
            raise ValueError("end is before start")
        if page_no < 1 or page_size < 1:
            raise ValueError("page_no and page_size start at 1")
        params: dict[str, str] = {
            "start_time": start.astimezone(BEIJING).strftime(_LIST_TIME_FORMAT),
            "end_time": end.astimezone(BEIJING).strftime(_LIST_TIME_FORMAT),
        }
        if model is not None:
            params["model_name"] = model
        if status is not None:
            params["status"] = status
        params["page_no"] = str(page_no)
        params["page_size"] = str(page_size)
        response = self._send("list", "GET", "/tasks", params=params)
        return _parse_page(_json_object("list", response), page_no, page_size)

    def detect(self, image_url: str, profile: ModelProfile | None = None) -> dict[str, Any]:
        """Run the sync image check and return its ``output``: ``check_pass``, ``bodystyle``, ``reason``.

        A failed check is a business answer (HTTP 200, ``check_pass`` false), not an exception.
        ``profile``: the family whose detector runs (the client's own by default).
        """
        detector = (profile or self._profile).remote("detect")
        body = {"model": detector.name, "input": {"image_url": image_url}, "parameters": {}}
        response = self._send(
            "detect", "POST", detector.path, json_body=body, headers=self._oss_header(body["input"])
        )
        output = _output("detect", _json_object("detect", response))
        if not isinstance(output.get("check_pass"), bool):
            raise DashScopeBadResponse(
                "detect: output.check_pass missing"
                if output.get("check_pass") is None
                else "detect: output.check_pass is not a boolean"
            )
        return dict(output)

    def upload(
        self, model: str, filename: str, data: bytes, content_type: str | None = None
    ) -> str:
        """Upload ``data`` as ``filename`` for ``model``; return its ``oss://{upload_dir}/{filename}``.

        ``filename`` must be a plain basename. A file over the policy's ``max_file_size_mb`` is
        refused (``DashScopeRejected`` ``InvalidFile.Size``) before anything is posted.
        ``content_type`` defaults to a guess from ``filename``.
        """
        _check_filename(filename)
        if not model or not all("!" <= c <= "~" for c in model):
            raise ValueError(f"model is not a DashScope model name: {model!r:.80}")
        response = self._send(
            "upload policy", "GET", _UPLOADS, params={"action": "getPolicy", "model": model}
        )
        policy = _upload_policy(_json_object("upload policy", response))
        max_bytes = policy.max_file_size_mb * 1024 * 1024
        if len(data) > max_bytes:
            raise DashScopeRejected(
                f"upload: {filename!r:.80} is {len(data)} bytes, over the "
                f"{policy.max_file_size_mb:g} MB this model accepts",
                code="InvalidFile.Size",
                status=400,
            )
        key = f"{policy.upload_dir}/{filename}"
        # The SDK's field order (OSS wants ``file`` last; httpx sends data fields, then files).
        form = {
            "OSSAccessKeyId": policy.oss_access_key_id,
            "Signature": policy.signature,
            "policy": policy.policy,
            "key": key,
            "x-oss-object-acl": policy.x_oss_object_acl,
            "x-oss-forbid-overwrite": policy.x_oss_forbid_overwrite,
            "success_action_status": "200",
            "x-oss-content-type": content_type
            or mimetypes.guess_type(filename)[0]
            or "application/octet-stream",
        }
        request = self._http.build_request(
            "POST",
            policy.upload_host,
            data=form,
            files={"file": (filename, data, form["x-oss-content-type"])},
            headers={"Accept": "application/json"},
        )
        # The key must never reach the upload host, even if the injected client carries defaults.
        request.headers.pop("Authorization", None)
        try:
            answer = self._http.send(request, auth=None)
        except httpx.RequestError as exc:
            logger.debug("upload POST failed: %s", type(exc).__name__)
            raise DashScopeUnavailable(f"upload: {_describe(exc)}") from exc
        logger.debug("upload POST -> %d", answer.status_code)
        if not answer.is_success:
            code, text, request_id = _oss_error_details(answer)
            self._raise_mapped("upload", answer.status_code, code, text, request_id)
        return f"oss://{key}"

    # ------------------------------------------------------------------ plumbing

    def _oss_header(self, inputs: object) -> dict[str, str]:
        # oss:// temporary-upload URLs resolve only with this header (docs §7).
        if self._oss_resolve or _mentions_oss(inputs):
            return {"X-DashScope-OssResourceResolve": "enable"}
        return {}

    def _send(
        self,
        op: str,
        method: str,
        path: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        request_headers = {"Authorization": f"Bearer {self._api_key}"}
        if json_body is not None:
            request_headers["Content-Type"] = "application/json"
        request_headers.update(headers or {})
        try:
            response = self._http.request(
                method,
                self._base_url + path,
                json=json_body,
                params=params,
                headers=request_headers,
            )
        except httpx.RequestError as exc:
            logger.debug("%s %s failed: %s", method, path, type(exc).__name__)
            raise DashScopeUnavailable(f"{op}: {_describe(exc)}") from exc
        logger.debug("%s %s -> %d", method, path, response.status_code)
        if not response.is_success:
            self._raise_for_status(op, response)
        return response

    def _raise_for_status(self, op: str, response: httpx.Response) -> NoReturn:
        code, text, request_id = _error_details(response)
        self._raise_mapped(op, response.status_code, code, text, request_id)

    def _raise_mapped(
        self, op: str, status: int, code: str | None, text: str, request_id: str | None
    ) -> NoReturn:
        message = f"{op}: HTTP {status}"
        if text:
            message += f": {text}"
        if request_id:
            message += f" (request_id {request_id})"
        # Never echo the key, even if a server or proxy put it into its answer.
        message = message.replace(self._api_key, "***")
        if code is not None:
            code = code.replace(self._api_key, "***")
        if status == 429:
            raise DashScopeThrottled(message, code=code or "Throttling")
        if status >= 500 or status == 408:
            raise DashScopeUnavailable(message, code=code or f"HTTP{status}")
        if status >= 400:
            raise DashScopeRejected(message, code=code or f"HTTP{status}", status=status)
        # 1xx/3xx: redirects are not followed, and DashScope never sends one (a wrong base_url?).
        raise DashScopeBadResponse(f"{op}: unexpected HTTP {status}")


# ---------------------------------------------------------------------- parsing helpers


def _check_segment(value: str, what: str) -> None:
    # Ids go into the URL path: only ids DashScope handed out are expected, so refuse anything that
    # would change the path or the query rather than escape it.
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or any(c in "/?#%\\" or c.isspace() or not c.isprintable() for c in value)
    ):
        raise ValueError(f"{what} is not a URL-path-safe DashScope id: {value!r:.80}")


def _check_filename(filename: str) -> None:
    # The name becomes part of the OSS key and of the oss:// URL: no directories, nothing that a
    # URL parser would read as a query, fragment or escape, no control characters.
    if (
        not isinstance(filename, str)
        or not filename
        or filename in (".", "..")
        or len(filename.encode()) > _MAX_FILENAME_BYTES
        or any(c in "/\\?#%" or not c.isprintable() for c in filename)
    ):
        raise ValueError(f"filename must be a plain file name: {filename!r:.80}")


@dataclass(frozen=True)
class _UploadPolicy:
    policy: str
    signature: str
    upload_dir: str
    upload_host: str
    oss_access_key_id: str
    x_oss_object_acl: str
    x_oss_forbid_overwrite: str
    max_file_size_mb: float


def _upload_policy(body: Mapping[str, Any]) -> _UploadPolicy:
    op = "upload policy"
    data = body.get("data")
    if not isinstance(data, dict):
        raise DashScopeBadResponse(
            f"{op}: data missing" if data is None else f"{op}: data is not an object"
        )
    values = {name: _required_str(op, data, name, "data") for name in _POLICY_FIELDS}
    cap = data.get("max_file_size_mb")
    if cap is None:
        raise DashScopeBadResponse(f"{op}: data.max_file_size_mb missing")
    if not (_is_number(cap) and math.isfinite(cap) and cap > 0):
        raise DashScopeBadResponse(f"{op}: data.max_file_size_mb is not a positive number")
    host = urlsplit(values["upload_host"])
    if host.scheme not in ("http", "https") or not host.netloc:
        raise DashScopeBadResponse(f"{op}: data.upload_host is not an http(s) URL")
    return _UploadPolicy(**values, max_file_size_mb=float(cap))


def _oss_error_details(response: httpx.Response) -> tuple[str | None, str, str | None]:
    """(code, message, request_id) of an OSS error answer (XML ``<Error>``); the body may be anything."""
    try:
        text = response.text[:4096]
    except (LookupError, ValueError):  # an unknown or lying charset
        text = ""
    code = _OSS_CODE.search(text)
    message = _OSS_MESSAGE.search(text)
    request_id = _OSS_REQUEST_ID.search(text)
    if code is None and message is None:
        return None, text[:_MAX_ERROR_TEXT].strip() or response.reason_phrase, None
    return (
        code.group(1).strip() if code else None,
        message.group(1).strip() if message else response.reason_phrase,
        request_id.group(1).strip() if request_id else None,
    )


def _mentions_oss(value: object) -> bool:
    if isinstance(value, str):
        return value.startswith("oss://")
    if isinstance(value, Mapping):
        return any(_mentions_oss(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_mentions_oss(v) for v in value)
    return False


def _describe(exc: httpx.RequestError) -> str:
    for kind, text in _TRANSPORT_FAILURES:
        if isinstance(exc, kind):
            return f"{text} ({type(exc).__name__})"
    return f"transport error ({type(exc).__name__})"


def _error_details(response: httpx.Response) -> tuple[str | None, str, str | None]:
    """(code, message, request_id) of an error answer; the body may be anything."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        code = body.get("code")
        message = body.get("message") or body.get("msg")
        request_id = body.get("request_id")
        return (
            code if isinstance(code, str) and code else None,
            message[:_MAX_ERROR_MESSAGE]
            if isinstance(message, str) and message
            else response.reason_phrase,
            request_id if isinstance(request_id, str) and request_id else None,
        )
    try:
        text = response.text[:_MAX_ERROR_TEXT].strip()
    except (LookupError, ValueError):  # an unknown or lying charset
        text = ""
    return None, text or response.reason_phrase, None


def _json_object(op: str, response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise DashScopeBadResponse(f"{op}: body is not JSON") from exc
    if not isinstance(body, dict):
        raise DashScopeBadResponse(f"{op}: body is not a JSON object")
    return body


def _output(op: str, body: Mapping[str, Any]) -> dict[str, Any]:
    output = body.get("output")
    if isinstance(output, dict):
        return output
    problem = "output missing" if output is None else "output is not an object"
    code = body.get("code")
    if isinstance(code, str) and code:
        problem += f" (code {code!r:.80})"
    raise DashScopeBadResponse(f"{op}: {problem}")


def _required_str(op: str, obj: Mapping[str, Any], key: str, where: str = "output") -> str:
    value = obj.get(key)
    if value is None or value == "":
        raise DashScopeBadResponse(f"{op}: {where}.{key} missing")
    if not isinstance(value, str):
        raise DashScopeBadResponse(f"{op}: {where}.{key} is not a string")
    return value


def _optional_str(op: str, obj: Mapping[str, Any], key: str, where: str = "") -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DashScopeBadResponse(f"{op}: {where}{key} is not a string")
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _beijing_time(value: object) -> datetime | None:
    """``YYYY-MM-DD HH:mm:ss.SSS`` in Beijing time as an aware UTC datetime.

    Informational only, so a stamp in another format reads as None instead of failing a paid task.
    """
    if not isinstance(value, str):
        return None
    for fmt in _TASK_TIME_FORMATS:
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=BEIJING).astimezone(UTC)
        except ValueError:
            continue
    return None


def _parse_task(op: str, body: dict[str, Any], task_id: str) -> RemoteTask:
    output = _output(op, body)
    returned_id = _required_str(op, output, "task_id")
    if returned_id != task_id:
        raise DashScopeBadResponse(
            f"{op}: output.task_id {returned_id!r:.80} is not the one asked for"
        )
    raw_status = _required_str(op, output, "task_status")
    usage = body.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise DashScopeBadResponse(f"{op}: usage is not an object")
    duration = (usage or {}).get("video_duration")
    if duration is not None and not (_is_number(duration) and math.isfinite(duration)):
        raise DashScopeBadResponse(f"{op}: usage.video_duration is not a number")
    return RemoteTask(
        task_id=returned_id,
        status=RemoteStatus.parse(raw_status),
        raw_status=raw_status,
        video_url=_video_url(op, output),
        template_id=_optional_str(op, output, "template_id", "output.") or None,
        video_duration=float(duration) if duration is not None else None,
        code=_optional_str(op, output, "code", "output.") or None,
        message=_optional_str(op, output, "message", "output.") or None,
        submit_time=_beijing_time(output.get("submit_time")),
        scheduled_time=_beijing_time(output.get("scheduled_time")),
        end_time=_beijing_time(output.get("end_time")),
        request_id=_optional_str(op, body, "request_id"),
    )


def _video_url(op: str, output: Mapping[str, Any]) -> str | None:
    """A SUCCEEDED task's video: ``output.video_url`` (AnimateAnyone; some sources show it for
    Wan too) or ``output.results.video_url`` (Wan2.2-Animate's documented place)."""
    direct = _optional_str(op, output, "video_url", "output.")
    if direct:
        return direct
    results = output.get("results")
    if results is None:
        return None
    if not isinstance(results, dict):
        raise DashScopeBadResponse(f"{op}: output.results is not an object")
    return _optional_str(op, results, "video_url", "output.results.") or None


def _parse_page(body: dict[str, Any], page_no: int, page_size: int) -> TaskPage:
    data = body.get("data")
    if data is None:
        data = []
    if not isinstance(data, list):
        raise DashScopeBadResponse("list: data is not a list")
    items = tuple(_parse_row(i, row) for i, row in enumerate(data))
    total = _optional_int(body, "total")
    total = len(items) if total is None else total
    page = _optional_int(body, "page_no")
    total_page = _optional_int(body, "total_page")
    return TaskPage(
        items=items,
        total=total,
        page_no=page_no if page is None else page,
        total_page=math.ceil(total / page_size) if total_page is None else total_page,
    )


def _optional_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise DashScopeBadResponse(f"list: {key} is not an integer")
    return value


def _parse_row(index: int, row: object) -> TaskListItem:
    where = f"data[{index}]"
    if not isinstance(row, dict):
        raise DashScopeBadResponse(f"list: {where} is not an object")
    created = row.get("gmt_create")
    if created is not None and not (_is_number(created) and math.isfinite(created)):
        raise DashScopeBadResponse(f"list: {where}.gmt_create is not epoch milliseconds")
    return TaskListItem(
        task_id=_required_str("list", row, "task_id", where),
        status=_required_str("list", row, "status", where),
        model_name=_optional_str("list", row, "model_name", f"{where}."),
        created_at=_EPOCH + timedelta(milliseconds=created) if created is not None else None,
        request_id=_optional_str("list", row, "request_id", f"{where}."),
    )
