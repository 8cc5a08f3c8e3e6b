"""The emulator's HTTP surface: DashScope's AnimateAnyone routes, task APIs, uploads, videos, admin.

Request checks run in the documented order (auth, JSON, model, async header, input, fields, media,
quota). Remote task state lives in :mod:`emulator.tasks`; media work in :mod:`emulator.media`
runs in a thread pool so the event loop keeps answering polls while a video renders.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import math
import secrets
import tempfile
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from emulator import errors, media, tasks
from emulator.config import (
    ASYNC_MODELS,
    DETECT_MODEL,
    ENDPOINT_MODELS,
    TEMPLATE_MODEL,
    VIDEO_MODEL,
    WAN_MODELS,
    WAN_MODES,
    EmulatorConfig,
)
from emulator.errors import ApiError
from emulator.faults import Fault, FaultError, FaultPlan, url_trigger
from emulator.limits import Buckets, Clock
from emulator.stats import Stats
from emulator.uploads import UploadError, UploadStore

BEIJING = timezone(timedelta(hours=8))
IMAGE_LIMIT = 5 * 1024 * 1024
VIDEO_LIMIT = 200 * 1024 * 1024
RATIO_SIZES = {"9:16": (9, 16), "3:4": (3, 4)}
DETECT_REASONS = {
    "no_human": "The input image has no human body. Please upload other image with single person.",
    "multi_human": "The input image has no human body or multi human bodies. "
    "Please upload other image with single person.",
}

REQUEST_ID = web.RequestKey("request_id", str)
ACCOUNT = web.RequestKey("account", str)
MODEL = web.RequestKey("model", str)
FAULT = web.RequestKey("fault", Fault)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def beijing_time(epoch: float) -> str:
    """DashScope's ``YYYY-MM-DD HH:mm:ss.SSS`` (Beijing time)."""
    return datetime.fromtimestamp(epoch, BEIJING).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def parse_list_time(text: str) -> float:
    return datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=BEIJING).timestamp()


def comment_trigger(comment: str | None, name: str) -> str | None:
    """A trigger in a video's ``comment`` tag, in query form: ``emulator_fail=InvalidFile.Content``.

    Inputs uploaded from local files arrive through presigned or ``oss://`` URLs whose query a
    test does not control, so the trigger can ride in the media itself.
    """
    values = parse_qs(comment.strip()).get(name) if comment else None
    return values[0] if values else None


@dataclass
class Template:
    template_id: str
    account: str
    seconds: float
    width: int
    height: int
    task_id: str | None  # None for templates seeded through the admin API
    revoked: bool = False  # set through the admin API: the template is then unusable


@dataclass
class Fetched:
    data: bytes | None  # images are kept in memory
    path: Path | None  # videos go to a temp file
    trigger_url: str


class Emulator:
    """All state of one emulator instance, and the handlers that act on it."""

    def __init__(self, config: EmulatorConfig, workdir: Path | None = None) -> None:
        self.config = config
        self._initial = dataclasses.replace(config, api_keys=dict(config.api_keys))
        self.clock = Clock()
        self.buckets = Buckets()
        self.stats = Stats()
        self.faults = FaultPlan()
        if config.seed is not None:
            self.faults.rng.seed(config.seed)
        self.book = tasks.TaskBook(config.concurrency, config.retention_seconds)
        self.secret = secrets.token_bytes(32)
        self.uploads = UploadStore(self.secret)
        self.templates: dict[str, Template] = {}
        self.images: dict[str, bytes] = {}  # sha256 -> bytes, inputs of generation tasks
        self.files: dict[str, tuple[bytes, str]] = {}  # admin-hosted inputs
        self._tmp = tempfile.TemporaryDirectory(prefix="dashscope-emulator-")
        self.workdir = workdir or Path(self._tmp.name)
        self.renders: dict[str, asyncio.Future[Path]] = {}
        self.render_count = 0  # encodes actually run (the cache saves the rest)
        self._http: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------- app assembly

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=VIDEO_LIMIT + 1024)
        r = app.router
        base = "/api/v1/services/aigc/image2video/{endpoint}"
        for path in (base, base + "/"):
            r.add_post(path, self.submit, name=None)
        for path in ("/api/v1/tasks", "/api/v1/tasks/"):
            r.add_get(path, self.list_tasks)
        r.add_get("/api/v1/tasks/{task_id}", self.query)
        r.add_get("/api/v1/tasks/{task_id}/", self.query)
        r.add_post("/api/v1/tasks/{task_id}/cancel", self.cancel)
        r.add_post("/api/v1/tasks/{task_id}/cancel/", self.cancel)
        r.add_get("/api/v1/uploads", self.get_policy)
        r.add_get("/api/v1/uploads/", self.get_policy)
        r.add_post("/oss-upload", self.upload_sink)
        r.add_post("/oss-upload/", self.upload_sink)
        r.add_get("/oss/results/{name}", self.download)
        r.add_get("/_emulator/health", self.admin_health)
        r.add_get("/_emulator/stats", self.admin_stats)
        r.add_post("/_emulator/reset", self.admin_reset)
        r.add_get("/_emulator/config", self.admin_config)
        r.add_patch("/_emulator/config", self.admin_config)
        r.add_get("/_emulator/faults", self.admin_faults)
        r.add_put("/_emulator/faults", self.admin_faults)
        r.add_post("/_emulator/faults/next", self.admin_fault_next)
        r.add_get("/_emulator/clock", self.admin_clock)
        r.add_post("/_emulator/clock", self.admin_clock)
        r.add_post("/_emulator/templates", self.admin_template)
        r.add_get("/_emulator/templates", self.admin_list_templates)
        r.add_delete("/_emulator/templates/{template_id}", self.admin_revoke_template)
        r.add_get("/_emulator/tasks", self.admin_tasks)
        r.add_put("/_emulator/files/{name}", self.admin_put_file)
        r.add_get("/_emulator/files/{name}", self.admin_get_file)
        r.add_get("/_emulator/samples/person.png", self.sample_person)
        r.add_get("/_emulator/samples/dance.mp4", self.sample_dance)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()
        self._tmp.cleanup()

    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            timeout = aiohttp.ClientTimeout(total=self.config.fetch_timeout_seconds)
            self._http = aiohttp.ClientSession(timeout=timeout)
        return self._http

    # ---------------------------------------------------------------- middleware

    @staticmethod
    def route_group(request: web.Request) -> str | None:
        path = request.path
        if path.startswith("/_emulator/"):
            return None
        if path.startswith("/api/v1/services/"):
            return "detect" if "aa-detect" in path else "submit"
        if path.rstrip("/").endswith("/cancel"):
            return "cancel"
        if path.rstrip("/") == "/api/v1/tasks":
            return "list"
        if path.startswith("/api/v1/tasks/"):
            return "query"
        if path.startswith("/api/v1/uploads"):
            return "policy"
        if path.startswith("/oss-upload"):
            return "upload"
        if path.startswith("/oss/results/"):
            return "video"
        return None

    def account_of(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        return self.config.account_for(key) or "-"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        request[REQUEST_ID] = request_id
        group = self.route_group(request)
        fault = self.faults.pick(group) if group else None
        try:
            if fault is not None:
                request[FAULT] = fault
                early = await self._fault_before(request, fault, group or "any")
                if early is not None:
                    return early
            response = await handler(request)
        except ApiError as exc:
            model = request.get(MODEL, "-")
            self.stats.add(request.get(ACCOUNT, self.account_of(request)), model, "errors")
            if exc.status == 429:
                self.stats.add(request.get(ACCOUNT, self.account_of(request)), model, "throttled")
            response = web.json_response(exc.body(request_id), status=exc.status)
        except web.HTTPNotFound:
            response = web.json_response(errors.not_found().body(request_id), status=404)
        except web.HTTPMethodNotAllowed:
            response = web.json_response(errors.not_found().body(request_id), status=405)
        if fault is not None and fault.kind == "drop_after":
            self._drop(request)
        elif fault is not None and fault.kind == "slow_after":
            await asyncio.sleep(fault.seconds)
        elif fault is not None and fault.kind in ("502_after", "504_after"):
            status = int(fault.kind[:3])
            reason = "Bad Gateway" if status == 502 else "Gateway Timeout"
            page = f"<html><body><h1>{status} {reason}</h1><p>gateway</p></body></html>"
            return web.Response(status=status, text=page, content_type="text/html")
        elif fault is not None and fault.kind == "garbled_after":
            return web.Response(
                status=200, text='{"output": {"task_id": ', content_type="application/json"
            )
        return response

    async def _fault_before(
        self, request: web.Request, fault: Fault, group: str
    ) -> web.StreamResponse | None:
        account = self.account_of(request)
        self.stats.add(account, "-", f"faults_{fault.kind}")
        if fault.kind == "slow":
            await asyncio.sleep(fault.seconds)
            return None
        if fault.kind == "drop":
            self._drop(request)
            return web.Response(status=500)  # never reaches the client
        status_errors = {
            "500": errors.internal_error,
            "503": errors.model_unavailable,
            "429": errors.throttled,
        }
        if fault.kind == "403":
            if group == "video":
                return oss_error(403, "AccessDenied", "Access denied by bucket policy.",
                                 request[REQUEST_ID])  # fmt: skip
            exc = errors.ApiError(403, "AccessDenied", "Access denied.")
            return web.json_response(exc.body(request[REQUEST_ID]), status=exc.status)
        if fault.kind in status_errors:
            exc = status_errors[fault.kind]()
            if fault.kind == "429":
                self.stats.add(account, "-", "throttled")
            return web.json_response(exc.body(request[REQUEST_ID]), status=exc.status)
        return None  # drop_after / slow_after act after the handler

    @staticmethod
    def _drop(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    # ---------------------------------------------------------------- common checks

    def authenticate(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise errors.invalid_api_key(missing=True)
        key = header[7:].strip()
        account = self.config.account_for(key)
        if account is None or self.config.key_regions.get(key, self.config.region) != (
            self.config.region
        ):
            raise errors.invalid_api_key(missing=False)
        request[ACCOUNT] = account
        return account

    def take(self, key: tuple[str, ...], rate: float) -> None:
        if not self.buckets.take(key, rate, self.clock.now()):
            raise errors.throttled()

    async def json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise errors.illegal_input() from None
        if not isinstance(body, dict):
            raise errors.illegal_input()
        return body

    def base_url(self, request: web.Request) -> str:
        if self.config.public_url:
            return self.config.public_url.rstrip("/")
        return f"{request.scheme}://{request.host}"

    # ---------------------------------------------------------------- fetching inputs

    async def fetch(
        self, request: web.Request, url: Any, field: str, *, account: str, model: str, video: bool
    ) -> Fetched:
        """Download an input by URL (http, https or oss://) with DashScope's errors."""
        if not isinstance(url, str) or not url:
            raise errors.field_required(field)
        limit = VIDEO_LIMIT if video else IMAGE_LIMIT
        if url.startswith("oss://"):
            if request.headers.get("X-DashScope-OssResourceResolve", "").lower() != "enable":
                raise errors.invalid_url(
                    "The request URL is invalid, please check the request URL is available "
                    "and the request image format is one of the following types: JPEG, JPG, "
                    "PNG, BMP, and WEBP."
                )
            upload = self.uploads.resolve(url, account=account, model=model, now=self.clock.now())
            if upload is None:
                raise errors.invalid_url()
            return self._keep(upload.data, url, video)
        if not url.startswith(("http://", "https://")):
            raise errors.invalid_url()
        try:
            async with self.http().get(url) as response:
                if response.status != 200:
                    raise errors.invalid_url(
                        f"Download the media resource failed with HTTP {response.status}, "
                        "please check the request URL is available."
                    )
                if video:
                    return await self._spool(response, url, limit)
                data = await self._read_capped(response, limit)
        except ApiError:
            raise
        except TimeoutError:
            raise errors.download_timeout(url) from None
        except aiohttp.ClientConnectorError:
            raise errors.connection_refused(url) from None
        except (aiohttp.ClientError, ValueError):
            raise errors.invalid_url() from None
        return self._keep(data, url, video)

    @staticmethod
    async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
        """The body, or its first ``limit + 1`` bytes when it is larger (enough to refuse it)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                break
        return b"".join(chunks)

    def _keep(self, data: bytes, url: str, video: bool) -> Fetched:
        if not video:
            return Fetched(data, None, url)
        path = self.workdir / f"in-{uuid.uuid4().hex}"
        path.write_bytes(data)
        return Fetched(None, path, url)

    async def _spool(self, response: aiohttp.ClientResponse, url: str, limit: int) -> Fetched:
        path = self.workdir / f"in-{uuid.uuid4().hex}"
        size = 0
        with path.open("wb") as out:
            async for chunk in response.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > limit:
                    break
                out.write(chunk)
        if size > limit:
            path.unlink(missing_ok=True)
            raise ApiError(
                400,
                "InvalidFile.Size",
                "Invalid file size. The video file size must be less than 200MB, "
                "and the duration must be less than 60s.",
            )
        return Fetched(None, path, url)

    async def fetch_video(
        self,
        request: web.Request,
        inputs: dict[str, Any],
        account: str,
        model: str,
        check: Callable[[media.VideoInfo], None],
    ) -> tuple[Fetched, media.VideoInfo]:
        """``input.video_url`` downloaded, probed and checked against ``check`` (the spooled
        file removed either way); a refusal is DashScope's 400 with the file's code."""
        fetched = await self.fetch(
            request, inputs.get("video_url"), "input.video_url",
            account=account, model=model, video=True,
        )  # fmt: skip
        assert fetched.path is not None
        try:
            info = await asyncio.to_thread(media.probe_video, fetched.path)
            check(info)
        except media.MediaError as exc:
            raise ApiError(400, exc.code, exc.message) from None
        finally:
            fetched.path.unlink(missing_ok=True)
        return fetched, info

    async def check_image(self, fetched: Fetched) -> media.ImageInfo:
        data = fetched.data or b""
        try:
            return await asyncio.to_thread(media.probe_image, data)
        except media.MediaError as exc:
            raise ApiError(400, exc.code, exc.message) from None

    # ---------------------------------------------------------------- submit / detect

    async def submit(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        if endpoint not in ENDPOINT_MODELS:
            raise errors.not_found()
        account = self.authenticate(request)
        body = await self.json_body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise errors.empty_model()
        request[MODEL] = model
        if model in self.config.retired_models:
            raise errors.model_not_found(model)
        if model not in ENDPOINT_MODELS[endpoint]:
            known = any(model in models for models in ENDPOINT_MODELS.values())
            raise errors.url_error() if known else errors.model_not_found(model)
        is_async = request.headers.get("X-DashScope-Async", "").lower() == "enable"
        if model in ASYNC_MODELS and not is_async:
            raise errors.async_required()
        if model == DETECT_MODEL and is_async:
            raise errors.sync_only()
        inputs = body.get("input")
        if not isinstance(inputs, dict) or not inputs:
            raise errors.empty_input()
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise errors.invalid_parameter(
                "The request is missing required parameters or in a wrong format, "
                "please check the parameters that you send."
            )
        if model == DETECT_MODEL:
            return await self._detect(request, account, inputs)
        if model == TEMPLATE_MODEL:
            return await self._submit_template(request, account, inputs)
        if model in WAN_MODELS:
            return await self._submit_wan(request, account, model, inputs, parameters)
        return await self._submit_video(request, account, inputs, parameters)

    async def _detect(
        self, request: web.Request, account: str, inputs: dict[str, Any]
    ) -> web.StreamResponse:
        fetched = await self.fetch(
            request, inputs.get("image_url"), "input.image_url",
            account=account, model=DETECT_MODEL, video=False,
        )  # fmt: skip
        info = await self.check_image(fetched)
        self.take((account, DETECT_MODEL), self.config.detect_rate)
        self.stats.add(account, DETECT_MODEL, "detections")
        trigger = url_trigger(fetched.trigger_url, "emulator_detect") or info.text.get(
            "emulator_detect"
        )
        if trigger in DETECT_REASONS:
            self.stats.add(account, DETECT_MODEL, "detections_failed")
            output: dict[str, Any] = {
                "check_pass": False,
                "reason": DETECT_REASONS[trigger],
                "bodystyle": "",
            }
        else:
            output = {"bodystyle": "half" if trigger == "half" else "full", "check_pass": True}
        return web.json_response(
            {"output": output, "usage": {"image_count": 1}, "request_id": request[REQUEST_ID]}
        )

    async def _submit_template(
        self, request: web.Request, account: str, inputs: dict[str, Any]
    ) -> web.StreamResponse:
        fetched, info = await self.fetch_video(
            request, inputs, account, TEMPLATE_MODEL, media.check_template_video
        )
        self.take((account, TEMPLATE_MODEL, "submit"), self.config.submit_rate)
        template_id = f"AACT.{account}.{uuid.uuid4()}"
        failure = self.faults.task_failure(
            url_trigger(fetched.trigger_url, "emulator_fail")
            or comment_trigger(info.comment, "emulator_fail")
        )
        task = self.book.add(
            account=account,
            model=TEMPLATE_MODEL,
            endpoint="aa-template-generation",
            now=self.clock.now(),
            phases=((tasks.RUNNING, self.config.template_seconds),),
            inputs={"video_url": fetched.trigger_url},
            failure=(failure, errors.task_failure_message(failure)) if failure else None,
            result={"template_id": template_id},
            usage={"video_duration": round(info.duration, 2), "video_ratio": "standard"},
        )
        self.templates[template_id] = Template(
            template_id, account, info.duration, info.width, info.height, task.task_id
        )
        return self._accepted(request, task)

    async def _submit_video(
        self,
        request: web.Request,
        account: str,
        inputs: dict[str, Any],
        parameters: dict[str, Any],
    ) -> web.StreamResponse:
        if not inputs.get("image_url"):
            raise errors.field_required("input.image_url")
        template_id = inputs.get("template_id")
        if not isinstance(template_id, str) or not template_id:
            raise errors.field_required("input.template_id")
        use_bg = parameters.get("use_ref_img_bg", False)
        if not isinstance(use_bg, bool):
            raise errors.invalid_parameter(
                "Required parameter(parameters.use_ref_img_bg) missing or invalid, "
                "please check the request parameters."
            )
        ratio = parameters.get("video_ratio", "9:16")
        if ratio not in RATIO_SIZES:
            raise errors.invalid_parameter("parameters.video_ratio must be 9:16 or 3:4.")
        template = self.usable_template(template_id, account)
        if template is None:
            raise errors.template_content()
        fetched = await self.fetch(
            request, inputs.get("image_url"), "input.image_url",
            account=account, model=VIDEO_MODEL, video=False,
        )  # fmt: skip
        info = await self.check_image(fetched)
        self.take((account, VIDEO_MODEL, "submit"), self.config.submit_rate)
        data = fetched.data or b""
        digest = hashlib.sha256(data).hexdigest()
        self.images[digest] = data
        width, height = self.output_size(use_bg, ratio, template)
        failure = self.faults.task_failure(
            url_trigger(fetched.trigger_url, "emulator_fail") or info.text.get("emulator_fail")
        )
        task = self.book.add(
            account=account,
            model=VIDEO_MODEL,
            endpoint="video-synthesis",
            now=self.clock.now(),
            phases=self.video_phases(),
            inputs={
                "image_url": fetched.trigger_url,
                "template_id": template_id,
                "image_sha256": digest,
                "width": width,
                "height": height,
                "seconds": template.seconds,
            },
            failure=(failure, errors.task_failure_message(failure)) if failure else None,
            usage={
                "video_duration": round(media.output_duration(template.seconds), 2),
                "video_ratio": "standard",
            },
        )
        return self._accepted(request, task)

    async def _submit_wan(
        self,
        request: web.Request,
        account: str,
        model: str,
        inputs: dict[str, Any],
        parameters: dict[str, Any],
    ) -> web.StreamResponse:
        """Wan2.2-Animate move/mix: the person image and the reference video in one call; the
        output is as long as the video (successor-models.md)."""
        for name in ("image_url", "video_url"):
            if not inputs.get(name):
                raise errors.field_required(f"input.{name}")
        if "template_id" in inputs:
            raise errors.invalid_parameter(f"input.template_id is not a parameter of {model}.")
        mode = parameters.get("mode")
        if mode not in WAN_MODES:
            raise errors.invalid_parameter(
                "Required parameter(parameters.mode) missing or invalid, it must be one of "
                + ", ".join(WAN_MODES)
                + "."
            )
        check = parameters.get("check_image", True)
        if not isinstance(check, bool):
            raise errors.invalid_parameter("parameters.check_image must be a boolean.")
        fetched = await self.fetch(
            request, inputs.get("image_url"), "input.image_url",
            account=account, model=model, video=False,
        )  # fmt: skip
        data = fetched.data or b""
        try:
            image = await asyncio.to_thread(media.probe_wan_image, data)
        except media.MediaError as exc:
            raise ApiError(400, exc.code, exc.message) from None
        video, info = await self.fetch_video(request, inputs, account, model, media.check_wan_video)
        self.take((account, model, "submit"), self.config.wan_submit_rate)
        digest = hashlib.sha256(data).hexdigest()
        self.images[digest] = data
        width, height = self.scaled(info.width, info.height)
        failure = self.faults.task_failure(
            url_trigger(fetched.trigger_url, "emulator_fail") or image.text.get("emulator_fail")
        )
        task = self.book.add(
            account=account,
            model=model,
            endpoint="video-synthesis",
            now=self.clock.now(),
            phases=self.video_phases(),
            inputs={
                "image_url": fetched.trigger_url,
                "video_url": video.trigger_url,
                "mode": mode,
                "image_sha256": digest,
                "width": width,
                "height": height,
                "seconds": info.duration,
            },
            failure=(failure, errors.task_failure_message(failure)) if failure else None,
            usage={
                "video_duration": round(media.output_duration(info.duration), 2),
                "video_ratio": "standard" if mode == "wan-std" else "pro",
            },
        )
        return self._accepted(request, task)

    def _accepted(self, request: web.Request, task: tasks.Task) -> web.StreamResponse:
        self.stats.add(task.account, task.model, "submitted")
        # Named per kind as well, so the totals keep templates and (paid) videos apart.
        kind = "template_submissions" if task.model == TEMPLATE_MODEL else "video_submissions"
        self.stats.add(task.account, task.model, kind)
        return web.json_response(
            {
                "output": {"task_id": task.task_id, "task_status": tasks.PENDING},
                "request_id": request[REQUEST_ID],
            }
        )

    def usable_template(self, template_id: str, account: str) -> Template | None:
        template = self.templates.get(template_id)
        if template is None or template.account != account or template.revoked:
            return None
        if template.task_id is not None:
            source = self.book.get(template.task_id, self.clock.now())
            if source is None or source.status_at(self.clock.now()) != tasks.SUCCEEDED:
                return None
        return template

    def output_size(self, use_bg: bool, ratio: str, template: Template) -> tuple[int, int]:
        """The output's size: the ratio asked for, else the template's."""
        if use_bg:
            return self.scaled(*RATIO_SIZES[ratio])
        return self.scaled(template.width, template.height)

    def scaled(self, w: int, h: int) -> tuple[int, int]:
        """720P by default: the short side is ``video_short_side`` (kept even for H.264)."""
        short = self.config.video_short_side
        if w <= h:
            return short, 2 * round(short * h / w / 2)
        return 2 * round(short * w / h / 2), short

    def video_phases(self) -> tuple[tuple[str, float], ...]:
        """A video task's life: pre-processing, generation, post-processing."""
        c = self.config
        return (
            (tasks.PRE_PROCESSING, c.preprocess_seconds),
            (tasks.RUNNING, c.generation_seconds),
            (tasks.POST_PROCESSING, c.postprocess_seconds),
        )

    # ---------------------------------------------------------------- task APIs

    def task_view(self, request: web.Request, task: tasks.Task, now: float) -> dict[str, Any]:
        status = task.status_at(now)
        output: dict[str, Any] = {
            "task_id": task.task_id,
            "task_status": status,
            "submit_time": beijing_time(task.submit_time),
        }
        if task.scheduled_time is not None and task.scheduled_time <= now:
            output["scheduled_time"] = beijing_time(task.scheduled_time)
        end = task.end_time
        if status in tasks.FINAL and end is not None:
            output["end_time"] = beijing_time(end)
        body: dict[str, Any] = {"request_id": request[REQUEST_ID], "output": output}
        if status == tasks.SUCCEEDED and end is not None:
            output.update(task.result)
            if task.model == VIDEO_MODEL:
                output["video_url"] = self.video_url(request, task, end)
            elif task.model in WAN_MODELS:  # documented under output.results
                output["results"] = {"video_url": self.video_url(request, task, end)}
            body["usage"] = dict(task.usage)
        elif status == tasks.FAILED and task.failure:
            output["code"], output["message"] = task.failure
        return body

    async def query(self, request: web.Request) -> web.StreamResponse:
        account = self.authenticate(request)
        self.take((account, "tasks"), self.config.query_rate)
        task_id = request.match_info["task_id"]
        now = self.clock.now()
        task = self.book.get(task_id, now)
        if task is None or task.account != account:
            self.stats.add(account, "-", "queries")
            return web.json_response(
                {
                    "request_id": request[REQUEST_ID],
                    "output": {"task_id": task_id, "task_status": tasks.UNKNOWN},
                }
            )
        request[MODEL] = task.model
        self.stats.add(account, task.model, "queries")
        return web.json_response(self.task_view(request, task, now))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        account = self.authenticate(request)
        self.take((account, "tasks"), self.config.query_rate)
        now = self.clock.now()
        task = self.book.get(request.match_info["task_id"], now)
        if task is None or task.account != account or not self.book.cancel(task, now):
            raise errors.unsupported_cancel()
        request[MODEL] = task.model
        self.stats.add(account, task.model, "canceled")
        return web.json_response({"request_id": request[REQUEST_ID]})

    async def list_tasks(self, request: web.Request) -> web.StreamResponse:
        account = self.authenticate(request)
        self.take((account, "tasks"), self.config.query_rate)
        q = request.query
        now = self.clock.now()
        try:
            start = parse_list_time(q["start_time"]) if q.get("start_time") else None
            end = parse_list_time(q["end_time"]) if q.get("end_time") else None
            page_no = int(q.get("page_no", "1"))
            page_size = int(q.get("page_size", "10"))
        except ValueError:
            raise errors.invalid_parameter(
                "Required parameter(start_time/end_time/page_no/page_size) missing or invalid, "
                "please check the request parameters."
            ) from None
        if start is None and end is None:
            start, end = now - 86400, now
        elif start is None:
            assert end is not None
            start = end - 86400
        elif end is None:
            end = start + 86400
        if end < start or end - start > 86400:
            raise errors.invalid_parameter("The time range must be within 24 hours.")
        if page_no < 1 or not 1 <= page_size <= 100:
            raise errors.invalid_parameter("page_no must be >= 1 and page_size 1 ~ 100.")
        wanted = q.get("status")
        rows = []
        for task in sorted(self.book.visible(now), key=lambda t: t.submit_time, reverse=True):
            if task.account != account or not start <= task.submit_time <= end:
                continue
            if now - task.submit_time < self.config.list_lag_seconds:
                continue  # a list that lags behind: the task exists, it is not shown yet
            if q.get("task_id") and task.task_id != q["task_id"]:
                continue
            if q.get("model_name") and task.model != q["model_name"]:
                continue
            status = task.status_at(now)
            if wanted and status != wanted:
                continue
            rows.append(self.list_row(task, status, now))
        self.stats.add(account, "-", "lists")
        total = len(rows)
        first = (page_no - 1) * page_size
        return web.json_response(
            {
                "total": total,
                "total_page": math.ceil(total / page_size),
                "page_no": page_no,
                "page_size": page_size,
                "request_id": request[REQUEST_ID],
                "data": rows[first : first + page_size],
            }
        )

    @staticmethod
    def list_row(task: tasks.Task, status: str, now: float) -> dict[str, Any]:
        row: dict[str, Any] = {
            "api_key_id": task.account,
            "caller_parent_id": task.account,
            "caller_uid": task.account,
            "gmt_create": int(task.submit_time * 1000),
            "model_name": task.model,
            "region": "cn-beijing",
            "request_id": task.request_id,
            "status": status,
            "task_id": task.task_id,
            "user_api_unique_key": (f"apikey:v1:aigc:image2video:{task.endpoint}:{task.model}"),
        }
        if task.scheduled_time is not None and task.scheduled_time <= now:
            row["start_time"] = int(task.scheduled_time * 1000)
        end = task.end_time
        if status in tasks.FINAL and end is not None:
            row["end_time"] = int(end * 1000)
        return row

    # ---------------------------------------------------------------- uploads

    async def get_policy(self, request: web.Request) -> web.StreamResponse:
        account = self.authenticate(request)
        if request.query.get("action") != "getPolicy":
            raise errors.invalid_parameter("Required parameter(action) missing or invalid.")
        model = request.query.get("model", "")
        if not model:
            raise errors.field_required("model")
        request[MODEL] = model
        self.take((account, model, "policy"), self.config.policy_rate)
        self.stats.add(account, model, "policies")
        data = self.uploads.policy(
            account=account,
            model=model,
            now=self.clock.now(),
            ttl=self.config.policy_ttl_seconds,
            host=f"{self.base_url(request)}/oss-upload",
            max_mb=100 if model in ASYNC_MODELS else 10,
        )
        return web.json_response({"request_id": request[REQUEST_ID], "data": data})

    async def upload_sink(self, request: web.Request) -> web.StreamResponse:
        form: dict[str, Any] = {}
        data = b""
        content_type = "application/octet-stream"
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, aiohttp.BodyPartReader) or part.name is None:
                continue
            if part.name == "file":
                data = await part.read(decode=False)
                content_type = part.headers.get("Content-Type", content_type)
            else:
                form[part.name] = await part.text()
        content_type = form.get("x-oss-content-type", content_type)
        try:
            upload = self.uploads.accept(
                form, bytes(data), content_type, self.clock.now(), self.config.upload_ttl_seconds
            )
        except UploadError as exc:
            return oss_error(exc.status, exc.code, exc.message, request[REQUEST_ID])
        self.stats.add(upload.account, upload.model, "uploads")
        return web.Response(status=200)

    # ---------------------------------------------------------------- results

    def _url_signature(self, name: str, expires: int) -> str:
        message = f"GET\n/oss/results/{name}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()[:32]

    def video_url(self, request: web.Request, task: tasks.Task, end: float) -> str:
        # The real URL lives 24 h after the task ends; copies must finish before Expires.
        expires = int(end + self.config.url_ttl_seconds)
        name = f"{task.task_id}.mp4"
        query = urlencode(
            {
                "Expires": expires,
                "OSSAccessKeyId": "LTAIemulator",
                "Signature": self._url_signature(name, expires),
            }
        )
        return f"{self.base_url(request)}/oss/results/{name}?{query}"

    async def download(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            expires = int(request.query.get("Expires", ""))
        except ValueError:
            return oss_error(403, "AccessDenied", "Missing or bad Expires.", request[REQUEST_ID])
        signature = request.query.get("Signature", "")
        if not hmac.compare_digest(signature, self._url_signature(name, expires)):
            return oss_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
                request[REQUEST_ID],
            )
        if self.clock.now() > expires:
            return oss_error(403, "AccessDenied", "Request has expired.", request[REQUEST_ID])
        task = self.book.tasks.get(name.removesuffix(".mp4"))
        if task is None:
            return oss_error(404, "NoSuchKey", "The specified key does not exist.", "")
        path = await self.render(task)
        fault = request.get(FAULT)
        if fault is not None and fault.kind == "truncate":
            return await self._truncated(request, path)

        def sent(size: int) -> None:
            self.stats.add(task.account, task.model, "video_downloads")
            self.stats.add(task.account, task.model, "video_bytes_served", size)

        if self.config.video_bytes_per_second > 0:
            return await throttled(request, path, self.config.video_bytes_per_second, sent)
        return CountingFileResponse(path, sent, headers={"Content-Type": "video/mp4"})

    async def _truncated(self, request: web.Request, path: Path) -> web.StreamResponse:
        """Announce the whole file, send half of it, and hang up."""
        data = path.read_bytes()
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        self._drop(request)
        return response

    async def render(self, task: tasks.Task) -> Path:
        """The output MP4 for a task, rendered once per distinct input and size, then reused."""
        i = task.inputs
        pad = self.config.video_pad_bytes
        key = f"{i['image_sha256']}-{i['seconds']:.3f}-{i['width']}x{i['height']}-{pad}"
        future = self.renders.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self.renders[key] = future
            try:
                path = await asyncio.to_thread(self._render_file, key, i, pad)
            except Exception as exc:
                del self.renders[key]
                future.set_exception(exc)
                raise
            future.set_result(path)
        return await asyncio.shield(future)

    def _render_file(self, key: str, i: dict[str, Any], pad: int) -> Path:
        plain = self.workdir / f"render-{key.rsplit('-', 1)[0]}.mp4"
        if not plain.exists():
            self.render_count += 1
            image = self.images[i["image_sha256"]]
            media.render_animation(
                image, float(i["seconds"]), plain, width=i["width"], height=i["height"]
            )
        if pad <= plain.stat().st_size:
            return plain
        padded = self.workdir / f"render-{key}.mp4"
        media.pad_mp4(plain, padded, pad)
        return padded

    # ---------------------------------------------------------------- admin

    async def admin_health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    def tasks_by_status(self) -> dict[tuple[str, str], Counter[str]]:
        now = self.clock.now()
        out: dict[tuple[str, str], Counter[str]] = {}
        for task in self.book.visible(now):
            out.setdefault((task.account, task.model), Counter())[task.status_at(now)] += 1
        return out

    async def admin_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats.snapshot(self.tasks_by_status()))

    async def admin_reset(self, request: web.Request) -> web.StreamResponse:
        """Forget tasks, templates, uploads, counters, faults, config changes and the clock offset."""
        for f in fields(EmulatorConfig):
            setattr(self.config, f.name, getattr(self._initial, f.name))
        self.book = tasks.TaskBook(self.config.concurrency, self.config.retention_seconds)
        self.buckets.clear()
        self.stats.clear()
        self.faults.reset()
        self.templates.clear()
        self.uploads.files.clear()
        self.clock.offset = 0.0
        return web.json_response({"ok": True})

    async def admin_config(self, request: web.Request) -> web.StreamResponse:
        if request.method == "PATCH":
            changes = await request.json()
            known = {f.name for f in fields(EmulatorConfig)}
            bad = [k for k in changes if k not in known or k == "api_keys"]
            if not isinstance(changes, dict) or bad:
                return web.json_response({"error": f"unknown or fixed settings: {bad}"}, status=400)
            for name, value in changes.items():
                setattr(self.config, name, value)
            self.book.concurrency = self.config.concurrency
            self.book.retention_seconds = self.config.retention_seconds
        view = asdict(self.config)
        view["api_keys"] = sorted(set(self.config.api_keys.values()))  # account names only
        view["key_regions"] = {  # by account: the keys themselves are never shown
            self.config.account_for(key) or "?": region
            for key, region in self.config.key_regions.items()
        }
        return web.json_response(view)

    async def admin_faults(self, request: web.Request) -> web.StreamResponse:
        if request.method == "PUT":
            try:
                self.faults.configure(await request.json())
            except (FaultError, ValueError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.faults.describe())

    async def admin_fault_next(self, request: web.Request) -> web.StreamResponse:
        try:
            self.faults.enqueue(await request.json())
        except (FaultError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.faults.describe())

    async def admin_clock(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            body = await request.json()
            seconds = body.get("advance") if isinstance(body, dict) else None
            if not isinstance(seconds, int | float) or seconds < 0:
                return web.json_response({"error": "advance is seconds >= 0"}, status=400)
            self.clock.advance(float(seconds))
        return web.json_response({"now": self.clock.now(), "offset": self.clock.offset})

    async def admin_template(self, request: web.Request) -> web.StreamResponse:
        """Seed a ready template for an API key without running template generation."""
        body = await request.json()
        account = self.config.account_for(str(body.get("api_key", "")))
        if account is None:
            return web.json_response({"error": "api_key is not accepted"}, status=400)
        seconds = float(body.get("seconds", 4.0))
        width, height = int(body.get("width", 720)), int(body.get("height", 1280))
        template_id = f"AACT.{account}.{uuid.uuid4()}"
        self.templates[template_id] = Template(template_id, account, seconds, width, height, None)
        return web.json_response({"template_id": template_id, "seconds": seconds})

    async def admin_list_templates(self, request: web.Request) -> web.StreamResponse:
        """Every template (generated or seeded), with its account and whether it was revoked."""
        return web.json_response([asdict(t) for t in self.templates.values()])

    async def admin_revoke_template(self, request: web.Request) -> web.StreamResponse:
        """Make a template unusable: a later submit naming it gets ``InvalidFile.Template.Content``."""
        template = self.templates.get(request.match_info["template_id"])
        if template is None:
            return web.json_response({"error": "no such template"}, status=404)
        template.revoked = True
        return web.json_response(asdict(template))

    async def admin_tasks(self, request: web.Request) -> web.StreamResponse:
        now = self.clock.now()
        return web.json_response(
            [
                {
                    "task_id": t.task_id,
                    "account": t.account,
                    "model": t.model,
                    "status": t.status_at(now),
                    "queue_position": self.book.queue_position(t),
                    "submit_time": t.submit_time,
                    "scheduled_time": t.scheduled_time,
                    "end_time": t.end_time,
                    # which input it was made from: lets a test tell whose video is whose
                    "image_sha256": t.inputs.get("image_sha256"),
                }
                for t in self.book.visible(now)
            ]
        )

    async def admin_put_file(self, request: web.Request) -> web.StreamResponse:
        """Host an input file at ``/_emulator/files/{name}`` (a stand-in for a public URL)."""
        name = request.match_info["name"]
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        self.files[name] = (await request.read(), content_type)
        return web.json_response({"url": f"{self.base_url(request)}/_emulator/files/{name}"})

    async def admin_get_file(self, request: web.Request) -> web.StreamResponse:
        entry = self.files.get(request.match_info["name"])
        if entry is None:
            return web.Response(status=404, text="no such file")
        return web.Response(body=entry[0], content_type=entry[1])

    async def sample_person(self, request: web.Request) -> web.StreamResponse:
        """A generated person image: ``?width=512&height=1024`` (any query is ignored otherwise)."""
        try:
            width = int(request.query.get("width", "512"))
            height = int(request.query.get("height", "1024"))
        except ValueError:
            return web.Response(status=400, text="width and height are integers")
        data = await asyncio.to_thread(media.sample_person_png, width, height)
        return web.Response(body=data, content_type="image/png")

    async def sample_dance(self, request: web.Request) -> web.StreamResponse:
        """A generated dance clip: ``?seconds=3&fps=24&width=360&height=640``."""
        q = request.query
        try:
            seconds, fps = float(q.get("seconds", "3")), int(q.get("fps", "24"))
            width, height = int(q.get("width", "360")), int(q.get("height", "640"))
        except ValueError:
            return web.Response(status=400, text="seconds, fps, width and height are numbers")
        path = self.workdir / f"dance-{seconds}-{fps}-{width}x{height}.mp4"
        if not path.exists():
            await asyncio.to_thread(
                media.sample_dance_mp4, path, seconds=seconds, fps=fps, width=width, height=height
            )
        return web.FileResponse(path, headers={"Content-Type": "video/mp4"})


async def throttled(
    request: web.Request, path: Path, rate: int, sent: Callable[[int], None]
) -> web.StreamResponse:
    """The file at ``rate`` bytes a second, with ``Range: bytes=N-`` (and ``If-Range`` on its
    ETag) answered 206 as OSS does: a slow path that a resuming copy can pick up midway."""
    stat = path.stat()
    size, etag = stat.st_size, f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
    start = 0
    wanted = request.headers.get("Range", "")
    if wanted.startswith("bytes=") and request.headers.get("If-Range", etag) == etag:
        first = wanted.removeprefix("bytes=").split("-", 1)[0]
        start = int(first) if first.isdigit() and int(first) < size else 0
    response = web.StreamResponse(status=206 if start else 200)
    response.headers.update({"Content-Type": "video/mp4", "ETag": etag, "Accept-Ranges": "bytes"})
    if start:
        response.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    response.content_length = size - start
    await response.prepare(request)
    chunk = max(1024, min(256 * 1024, rate // 10))
    written = 0
    try:
        with path.open("rb") as f:
            f.seek(start)
            while data := f.read(chunk):
                await response.write(data)
                written += len(data)
                await asyncio.sleep(len(data) / rate)
    except ConnectionError:  # the client hung up (a copy that paused): count what it got
        pass
    finally:
        sent(written)
    return response


class CountingFileResponse(web.FileResponse):
    """A file response (Range support included) that reports how many body bytes it sends."""

    def __init__(self, path: Path, sent: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._sent = sent

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        writer = await super().prepare(request)
        if request.method == "GET":
            self._sent(self.content_length or 0)
        return writer


def oss_error(status: int, code: str, message: str, request_id: str) -> web.Response:
    """OSS answers in XML, not DashScope's JSON."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
        f"  <Code>{code}</Code>\n  <Message>{message}</Message>\n"
        f"  <RequestId>{request_id}</RequestId>\n  <HostId>emulator</HostId>\n</Error>\n"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


EMULATOR_KEY = web.AppKey("emulator", Emulator)


def create_app(config: EmulatorConfig | None = None) -> web.Application:
    """An aiohttp application for one emulator instance (its state is at ``app[EMULATOR_KEY]``)."""
    emulator = Emulator(config or EmulatorConfig())
    app = emulator.make_app()
    app[EMULATOR_KEY] = emulator
    return app
