"""workers.adapters.dashscope.client through httpx.MockTransport: request shapes, parsing and error mapping, no network."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from workers.adapters.dashscope.client import (
    DashScopeClient,
    RemoteStatus,
    RemoteTask,
    SubmittedTask,
    TaskListItem,
    VideoRequest,
)
from workers.errors import (
    DashScopeBadResponse,
    DashScopeRejected,
    DashScopeThrottled,
    DashScopeUnavailable,
    PermanentError,
    TransientError,
    WorkerError,
)
from workers.models import ANIMATE_ANYONE_GEN2 as AA

KEY = "sk-unit-3f9c2a7be81d4c6f"
BASE = "https://dashscope.test/api/v1"
SUBMIT_URL = f"{BASE}/services/aigc/image2video/video-synthesis"
TASK_ID = "a8532587-fa8c-4ef8-82be-0c46b17950d1"
REQUEST_ID = "7574ee8f-38a3-4b1e-9280-11c33ab46e51"
TEMPLATE_ID = "AACT.acct.1234-5678"
IMAGE = "https://img.test/person.png"

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Server:
    """A MockTransport handler that records requests and plays back queued replies in order."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            if isinstance(reply, httpx.RequestError):
                reply.request = request
            raise reply
        if isinstance(reply, httpx.Response):
            return reply
        return reply(request)

    @property
    def only(self) -> httpx.Request:
        assert len(self.requests) == 1, self.requests
        return self.requests[0]


def make(*replies: Reply, **kwargs: Any) -> tuple[DashScopeClient, Server]:
    server = Server(*replies)
    http = httpx.Client(transport=httpx.MockTransport(server), timeout=7)
    kwargs.setdefault("base_url", BASE)
    return DashScopeClient(http, api_key=KEY, **kwargs), server


def ok(body: Any) -> httpx.Response:
    return httpx.Response(200, json=body)


def error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"request_id": REQUEST_ID, "code": code, "message": message})


def accepted(task_id: str = TASK_ID) -> httpx.Response:
    return ok({"output": {"task_id": task_id, "task_status": "PENDING"}, "request_id": REQUEST_ID})


def task(output: dict[str, Any], **extra: Any) -> httpx.Response:
    return ok({"request_id": REQUEST_ID, "output": {"task_id": TASK_ID, **output}, **extra})


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)


# One call per client operation, all of which share the error mapping.
OPERATIONS: dict[str, Callable[[DashScopeClient], object]] = {
    "submit": lambda c: c.submit_video(VideoRequest(IMAGE, TEMPLATE_ID)),
    "query": lambda c: c.get_task(TASK_ID),
    "cancel": lambda c: c.cancel_task(TASK_ID),
    "list": lambda c: c.list_tasks(
        start=datetime(2025, 4, 25, tzinfo=UTC), end=datetime(2025, 4, 25, 12, tzinfo=UTC)
    ),
    "detect": lambda c: c.detect(IMAGE),
}


def assert_no_key(exc: BaseException) -> None:
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert all(KEY not in str(arg) for arg in exc.args)


class TestRequests:
    """What goes on the wire."""

    def test_submit_video_shape(self) -> None:
        """A video submit posts the documented body with the async header and no OSS header."""
        client, server = make(accepted())
        submitted = client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID))
        assert submitted == SubmittedTask(TASK_ID, RemoteStatus.PENDING, REQUEST_ID)
        request = server.only
        assert request.method == "POST"
        assert str(request.url) == SUBMIT_URL
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["X-DashScope-Async"] == "enable"
        assert "X-DashScope-OssResourceResolve" not in request.headers
        assert body_of(request) == {
            "model": "animate-anyone-gen2",
            "input": {"image_url": IMAGE, "template_id": TEMPLATE_ID},
            "parameters": {},
        }

    @pytest.mark.parametrize(
        ("use_bg", "ratio", "parameters"),
        [
            (False, None, {"use_ref_img_bg": False}),
            (True, "3:4", {"use_ref_img_bg": True, "video_ratio": "3:4"}),
            (None, "9:16", {"video_ratio": "9:16"}),
        ],
    )
    def test_submit_video_parameters(
        self, use_bg: bool | None, ratio: str | None, parameters: dict[str, Any]
    ) -> None:
        """Parameters that are None are left out; False is sent."""
        client, server = make(accepted())
        client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID, use_bg, ratio))
        assert body_of(server.only)["parameters"] == parameters

    @pytest.mark.parametrize("base", [BASE, BASE + "/", BASE + "//"])
    def test_base_url_normalised(self, base: str) -> None:
        """A trailing slash on base_url does not double up; the path has no trailing slash."""
        client, server = make(accepted(), task({"task_status": "RUNNING"}), base_url=base)
        client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID))
        client.get_task(TASK_ID)
        assert [str(r.url) for r in server.requests] == [SUBMIT_URL, f"{BASE}/tasks/{TASK_ID}"]

    def test_client_base_url_and_timeout_are_the_callers(self) -> None:
        """Absolute URLs ignore a base_url on the httpx client; its timeout is used unchanged."""
        server = Server(task({"task_status": "RUNNING"}))
        http = httpx.Client(
            transport=httpx.MockTransport(server),
            base_url="https://elsewhere.test/x",
            timeout=httpx.Timeout(3, connect=1),
        )
        DashScopeClient(http, api_key=KEY, base_url=BASE).get_task(TASK_ID)
        assert str(server.only.url) == f"{BASE}/tasks/{TASK_ID}"
        assert server.only.extensions["timeout"] == httpx.Timeout(3, connect=1).as_dict()

    def test_custom_model_and_endpoint(self) -> None:
        """The profile's video model picks the URL and the body's model."""
        other = dataclasses.replace(AA.video, name="wan2.2-animate-mix", endpoint="other-endpoint")
        client, server = make(accepted(), profile=dataclasses.replace(AA, video=other))
        client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID))
        assert str(server.only.url) == f"{BASE}/services/aigc/image2video/other-endpoint"
        assert body_of(server.only)["model"] == "wan2.2-animate-mix"

    def test_get_task_shape(self) -> None:
        """A query is a bare authorised GET: no body, no async header."""
        client, server = make(task({"task_status": "RUNNING"}))
        client.get_task(TASK_ID)
        request = server.only
        assert (request.method, str(request.url)) == ("GET", f"{BASE}/tasks/{TASK_ID}")
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert "X-DashScope-Async" not in request.headers
        assert "Content-Type" not in request.headers
        assert request.content == b""

    def test_cancel_shape(self) -> None:
        """Cancel is a POST with an empty body and no Content-Type, like the SDK's."""
        client, server = make(ok({"request_id": REQUEST_ID}))
        client.cancel_task(TASK_ID)
        request = server.only
        assert (request.method, str(request.url)) == ("POST", f"{BASE}/tasks/{TASK_ID}/cancel")
        assert request.content == b""
        assert "Content-Type" not in request.headers
        assert "X-DashScope-Async" not in request.headers
        assert request.headers["Authorization"] == f"Bearer {KEY}"

    @pytest.mark.parametrize("reply", [httpx.Response(200), httpx.Response(200, text="ok")])
    def test_cancel_ignores_the_body(self, reply: httpx.Response) -> None:
        """A 2xx cancel is a success whatever its body says."""
        client, _ = make(reply)
        client.cancel_task(TASK_ID)

    def test_list_query(self) -> None:
        """List bounds go out as YYYYMMDDhhmmss in Beijing time; None filters are left out."""
        client, server = make(ok({"total": 0, "total_page": 0, "page_no": 1, "data": []}))
        client.list_tasks(
            start=datetime(2025, 4, 25, 8, 0, 5, 999000, tzinfo=UTC),
            end=datetime(2025, 4, 26, 7, 59, 59, tzinfo=timezone(timedelta(hours=-1))),
        )
        request = server.only
        assert request.method == "GET"
        assert request.url.copy_with(query=None) == httpx.URL(f"{BASE}/tasks")
        assert dict(request.url.params) == {
            "start_time": "20250425160005",
            "end_time": "20250426165959",
            "page_no": "1",
            "page_size": "100",
        }
        assert "X-DashScope-Async" not in request.headers
        assert request.headers["Authorization"] == f"Bearer {KEY}"

    def test_list_filters(self) -> None:
        """Model, status and paging are passed through."""
        client, server = make(ok({"total": 0, "total_page": 0, "page_no": 3, "data": []}))
        client.list_tasks(
            start=datetime(2025, 1, 1, tzinfo=UTC),
            end=datetime(2025, 1, 1, 1, tzinfo=UTC),
            model="animate-anyone-gen2",
            status="SUCCEEDED",
            page_no=3,
            page_size=10,
        )
        params = server.only.url.params
        assert params["model_name"] == "animate-anyone-gen2"
        assert params["status"] == "SUCCEEDED"
        assert (params["page_no"], params["page_size"]) == ("3", "10")

    def test_detect_shape(self) -> None:
        """Detect is sync: same auth and body shape, never the async header."""
        output = {"bodystyle": "full", "check_pass": True}
        client, server = make(
            ok({"output": output, "usage": {"image_count": 1}, "request_id": REQUEST_ID})
        )
        assert client.detect(IMAGE) == output
        request = server.only
        assert str(request.url) == f"{BASE}/services/aigc/image2video/aa-detect"
        assert request.method == "POST"
        assert "X-DashScope-Async" not in request.headers
        assert request.headers["Content-Type"] == "application/json"
        assert request.headers["Authorization"] == f"Bearer {KEY}"
        assert body_of(request) == {
            "model": "animate-anyone-detect-gen2",
            "input": {"image_url": IMAGE},
            "parameters": {},
        }

    def test_detect_failed_check_is_an_answer(self) -> None:
        """check_pass false comes back as data, with its reason."""
        output = {"check_pass": False, "reason": "no human body", "bodystyle": ""}
        client, _ = make(ok({"output": output}))
        assert client.detect(IMAGE) == output

    def test_submit_async_template(self) -> None:
        """The generic submit builds the URL from the endpoint and always sends parameters."""
        client, server = make(accepted())
        video = "https://v.test/dance.mp4"
        submitted = client.submit_async(AA.remote("template"), {"video_url": video})
        assert submitted.task_id == TASK_ID
        request = server.only
        assert str(request.url) == f"{BASE}/services/aigc/image2video/aa-template-generation"
        assert request.headers["X-DashScope-Async"] == "enable"
        assert body_of(request) == {
            "model": "animate-anyone-template-gen2",
            "input": {"video_url": video},
            "parameters": {},
        }

    def test_oss_header_from_flag(self) -> None:
        """oss_resolve=True adds the OSS header to submits and detects."""
        client, server = make(accepted(), ok({"output": {"check_pass": True}}), oss_resolve=True)
        client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID))
        client.detect(IMAGE)
        assert [r.headers["X-DashScope-OssResourceResolve"] for r in server.requests] == [
            "enable",
            "enable",
        ]

    def test_oss_header_from_url(self) -> None:
        """An oss:// input URL adds the OSS header by itself."""
        oss = "oss://dashscope-instant/acct/2025-01-01/x/person.png"
        client, server = make(
            accepted(), ok({"output": {"check_pass": True}}), accepted(), accepted()
        )
        client.submit_video(VideoRequest(oss, TEMPLATE_ID))
        client.detect(oss)
        client.submit_async(AA.remote("template"), {"video_url": oss})
        client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID))
        headers = [r.headers.get("X-DashScope-OssResourceResolve") for r in server.requests]
        assert headers == ["enable", "enable", "enable", None]
        assert "X-DashScope-Async" not in server.requests[1].headers

    @pytest.mark.parametrize("bad", ["", "a/b", "a?b", "a#b", "..", ".", "a%2Fb", "a b", "a\nb"])
    @pytest.mark.parametrize("call", ["get_task", "cancel_task"])
    def test_unsafe_task_id_refused(self, bad: str, call: str) -> None:
        """An id that would change the URL path is refused before anything is sent."""
        client, server = make()
        with pytest.raises(ValueError):
            getattr(client, call)(bad)
        assert server.requests == []

    @pytest.mark.parametrize("bad", ["", "a/b", "x?y"])
    def test_unsafe_endpoint_refused(self, bad: str) -> None:
        """submit_async refuses an endpoint that is not one path segment."""
        client, server = make()
        with pytest.raises(ValueError):
            client.submit_async(dataclasses.replace(AA.video, endpoint=bad), {"video_url": IMAGE})
        with pytest.raises(ValueError):
            make(profile=dataclasses.replace(AA, video=dataclasses.replace(AA.video, endpoint=bad)))
        assert server.requests == []

    def test_list_needs_aware_bounds(self) -> None:
        """Naive datetimes, reversed bounds and page numbers below 1 are programming errors."""
        client, server = make()
        aware = datetime(2025, 1, 1, tzinfo=UTC)
        with pytest.raises(ValueError, match="timezone-aware"):
            client.list_tasks(start=datetime(2025, 1, 1), end=aware)
        with pytest.raises(ValueError, match="before"):
            client.list_tasks(start=aware, end=aware - timedelta(seconds=1))
        with pytest.raises(ValueError):
            client.list_tasks(start=aware, end=aware, page_no=0)
        assert server.requests == []

    @pytest.mark.parametrize("key", ["", "sk bad", "sk-\nx"])
    def test_bad_api_key_refused(self, key: str) -> None:
        """A key httpx could not send is refused at construction, without echoing it."""
        with httpx.Client() as http, pytest.raises(ValueError) as info:
            DashScopeClient(http, api_key=key, base_url=BASE)
        assert key == "" or key not in str(info.value)

    @pytest.mark.parametrize("base", ["dashscope.test/api/v1", "ftp://x/api/v1", "https:///x"])
    def test_bad_base_url_refused(self, base: str) -> None:
        """base_url must be an absolute http(s) URL."""
        with httpx.Client() as http, pytest.raises(ValueError, match="base_url"):
            DashScopeClient(http, api_key=KEY, base_url=base)


class TestParsing:
    """What comes back."""

    def test_succeeded_video(self) -> None:
        """The documented success: video_url, billed seconds, and Beijing times as UTC instants."""
        client, _ = make(
            task(
                {
                    "task_status": "SUCCEEDED",
                    "submit_time": "2023-12-20 21:36:31.896",
                    "scheduled_time": "2023-12-20 21:36:39.009",
                    "end_time": "2023-12-21 07:59:59.000",
                    "video_url": "https://oss.test/1.mp4?Expires=1",
                },
                usage={"video_duration": 10.23, "video_ratio": "standard"},
            )
        )
        got = client.get_task(TASK_ID)
        assert got == RemoteTask(
            task_id=TASK_ID,
            status=RemoteStatus.SUCCEEDED,
            raw_status="SUCCEEDED",
            video_url="https://oss.test/1.mp4?Expires=1",
            template_id=None,
            video_duration=10.23,
            code=None,
            message=None,
            submit_time=datetime(2023, 12, 20, 13, 36, 31, 896000, tzinfo=UTC),
            scheduled_time=datetime(2023, 12, 20, 13, 36, 39, 9000, tzinfo=UTC),
            end_time=datetime(2023, 12, 20, 23, 59, 59, tzinfo=UTC),
            request_id=REQUEST_ID,
        )
        assert got.submit_time is not None and got.submit_time.utcoffset() == timedelta(0)

    def test_time_without_milliseconds(self) -> None:
        """A stamp without milliseconds still parses; an unreadable one reads as None."""
        client, _ = make(
            task(
                {
                    "task_status": "RUNNING",
                    "submit_time": "2024-01-01 08:00:00",
                    "scheduled_time": "01/01/2024",
                }
            )
        )
        got = client.get_task(TASK_ID)
        assert got.submit_time == datetime(2024, 1, 1, tzinfo=UTC)
        assert got.scheduled_time is None
        assert got.end_time is None

    def test_succeeded_template(self) -> None:
        """A template task carries template_id; an integer duration becomes a float."""
        client, _ = make(
            task(
                {"task_status": "SUCCEEDED", "template_id": TEMPLATE_ID},
                usage={"video_duration": 2, "video_ratio": "standard"},
            )
        )
        got = client.get_task(TASK_ID)
        assert (got.template_id, got.video_url) == (TEMPLATE_ID, None)
        assert got.video_duration == 2.0 and isinstance(got.video_duration, float)

    def test_succeeded_without_video_url_is_not_an_error(self) -> None:
        """A success without video_url is left for the caller to judge."""
        client, _ = make(task({"task_status": "SUCCEEDED"}))
        got = client.get_task(TASK_ID)
        assert got.status is RemoteStatus.SUCCEEDED
        assert (got.video_url, got.video_duration) == (None, None)

    def test_failed(self) -> None:
        """A task-level failure is HTTP 200 with code and message."""
        client, _ = make(
            task(
                {
                    "task_status": "FAILED",
                    "code": "InvalidFile.Content",
                    "message": "The input image has no human body.",
                }
            )
        )
        got = client.get_task(TASK_ID)
        assert got.status is RemoteStatus.FAILED
        assert (got.code, got.message) == (
            "InvalidFile.Content",
            "The input image has no human body.",
        )

    def test_unknown_is_a_task_not_an_error(self) -> None:
        """An unknown or expired id reads UNKNOWN with HTTP 200."""
        client, _ = make(task({"task_status": "UNKNOWN"}))
        got = client.get_task(TASK_ID)
        assert (got.status, got.raw_status) == (RemoteStatus.UNKNOWN, "UNKNOWN")
        assert got.submit_time is None and got.code is None

    @pytest.mark.parametrize("raw", ["SUSPENDED", "succeeded", "QUEUED"])
    def test_unlisted_status_kept_raw(self, raw: str) -> None:
        """A status this module does not know parses as UNKNOWN and keeps the string."""
        client, _ = make(task({"task_status": raw, "code": "X"}))
        got = client.get_task(TASK_ID)
        assert (got.status, got.raw_status, got.code) == (RemoteStatus.UNKNOWN, raw, "X")

    @pytest.mark.parametrize("status", list(RemoteStatus))
    def test_every_status_parses(self, status: RemoteStatus) -> None:
        """Every documented status, hyphenated ones included, maps to its member."""
        client, _ = make(task({"task_status": status.value}))
        got = client.get_task(TASK_ID)
        assert got.status is status and got.raw_status == status.value

    def test_submit_status_parsed(self) -> None:
        """The submit answer's status and request_id are kept; request_id may be absent."""
        client, _ = make(ok({"output": {"task_id": TASK_ID, "task_status": "PRE-PROCESSING"}}))
        assert client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID)) == SubmittedTask(
            TASK_ID, RemoteStatus.PRE_PROCESSING, None
        )

    def test_list_page(self) -> None:
        """Rows keep DashScope's status string; gmt_create epoch ms becomes an exact UTC instant."""
        client, _ = make(
            ok(
                {
                    "total": 3,
                    "total_page": 2,
                    "page_no": 1,
                    "page_size": 2,
                    "request_id": REQUEST_ID,
                    "data": [
                        {
                            "api_key_id": "15xxxx",
                            "gmt_create": 1745568428109,
                            "start_time": 1745568428138,
                            "model_name": "animate-anyone-gen2",
                            "request_id": "1abfc3c8",
                            "status": "RUNNING",
                            "task_id": TASK_ID,
                        },
                        {"task_id": "t2", "status": "SUSPENDED"},
                    ],
                }
            )
        )
        page = client.list_tasks(
            start=datetime(2025, 4, 25, tzinfo=UTC),
            end=datetime(2025, 4, 25, 12, tzinfo=UTC),
            page_size=2,
        )
        assert (page.total, page.page_no, page.total_page) == (3, 1, 2)
        assert page.items == (
            TaskListItem(
                task_id=TASK_ID,
                status="RUNNING",
                model_name="animate-anyone-gen2",
                created_at=datetime(2025, 4, 25, 8, 7, 8, 109000, tzinfo=UTC),
                request_id="1abfc3c8",
            ),
            TaskListItem("t2", "SUSPENDED", None, None, None),
        )

    def test_list_page_defaults(self) -> None:
        """Missing counters fall back to what the page itself shows."""
        client, _ = make(ok({"data": [{"task_id": "t", "status": "PENDING"}]}))
        page = client.list_tasks(
            start=datetime(2025, 1, 1, tzinfo=UTC), end=datetime(2025, 1, 1, tzinfo=UTC), page_no=2
        )
        assert (len(page.items), page.total, page.page_no, page.total_page) == (1, 1, 2, 1)

    def test_repr_hides_key(self) -> None:
        """repr shows where and which model, never the key."""
        client, _ = make()
        text = repr(client)
        assert KEY not in text
        assert BASE in text and "animate-anyone-gen2" in text

    def test_debug_log_has_no_key(self, caplog: pytest.LogCaptureFixture) -> None:
        """The module logs method, path and status at DEBUG, and never the key."""
        client, _ = make(task({"task_status": "RUNNING"}), error(400, "InvalidParameter", KEY))
        with caplog.at_level(logging.DEBUG, logger="workers.adapters.dashscope.client"):
            client.get_task(TASK_ID)
            with pytest.raises(DashScopeRejected):
                client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID))
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert f"GET /tasks/{TASK_ID} -> 200" in text
        assert "POST /services/aigc/image2video/video-synthesis -> 400" in text
        assert KEY not in text


TRANSPORT_ERRORS = [
    (httpx.ConnectError("refused"), "could not connect (ConnectError)"),
    (httpx.ConnectTimeout("slow"), "connect timed out (ConnectTimeout)"),
    (httpx.ReadTimeout("slow"), "read timed out (ReadTimeout)"),
    (httpx.WriteTimeout("slow"), "write timed out (WriteTimeout)"),
    (httpx.PoolTimeout("busy"), "no free connection in the pool (PoolTimeout)"),
    (httpx.RemoteProtocolError("Server disconnected"), "connection dropped (RemoteProtocolError)"),
    (httpx.ReadError("reset"), "read failed (ReadError)"),
    (httpx.ProxyError("bad proxy"), "proxy failed (ProxyError)"),
]


class TestErrors:
    """How HTTP outcomes map onto workers.errors, for every operation."""

    @pytest.mark.parametrize("op", OPERATIONS)
    @pytest.mark.parametrize(("exc", "text"), TRANSPORT_ERRORS, ids=lambda v: type(v).__name__)
    def test_transport_errors_are_unavailable(self, op: str, exc: Exception, text: str) -> None:
        """Network failures and timeouts become DashScopeUnavailable naming the operation."""
        client, server = make(exc)
        with pytest.raises(DashScopeUnavailable) as info:
            OPERATIONS[op](client)
        assert type(info.value) is DashScopeUnavailable
        assert info.value.message == f"{op}: {text}"
        assert info.value.code == "DashScopeUnavailable"
        assert info.value.__cause__ is exc
        assert len(server.requests) == 1  # never retried
        assert_no_key(info.value)

    @pytest.mark.parametrize("op", OPERATIONS)
    @pytest.mark.parametrize(
        ("reply", "kind", "code"),
        [
            (error(429, "Throttling.RateQuota", "Requests rate limit exceeded."), DashScopeThrottled, "Throttling.RateQuota"),
            (httpx.Response(429, text="slow down"), DashScopeThrottled, "Throttling"),
            (httpx.Response(429, json={"message": "x"}), DashScopeThrottled, "Throttling"),
            (error(500, "InternalError", "Internal server error!"), DashScopeUnavailable, "InternalError"),
            (error(503, "ModelUnavailable", "Model is unavailable."), DashScopeUnavailable, "ModelUnavailable"),
            (httpx.Response(502, text="<html>Bad Gateway</html>"), DashScopeUnavailable, "HTTP502"),
            (httpx.Response(504), DashScopeUnavailable, "HTTP504"),
            (httpx.Response(408, text="timeout"), DashScopeUnavailable, "HTTP408"),
            (error(400, "InvalidParameter", "parameters.video_ratio must be 9:16 or 3:4."), DashScopeRejected, "InvalidParameter"),
            (error(401, "InvalidApiKey", "Invalid API-key provided."), DashScopeRejected, "InvalidApiKey"),
            (error(403, "AccessDenied", "Access denied."), DashScopeRejected, "AccessDenied"),
            (httpx.Response(404, text="<html>nginx</html>"), DashScopeRejected, "HTTP404"),
            (httpx.Response(413, json=["not", "an", "object"]), DashScopeRejected, "HTTP413"),
        ],
        ids=lambda v: str(v.status_code) if isinstance(v, httpx.Response) else None,
    )  # fmt: skip
    def test_status_mapping(
        self, op: str, reply: httpx.Response, kind: type[WorkerError], code: str
    ) -> None:
        """429 throttles, 5xx and 408 are transient, other 4xx permanent; the body's code wins."""
        client, server = make(reply)
        with pytest.raises(WorkerError) as info:
            OPERATIONS[op](client)
        assert type(info.value) is kind
        assert info.value.code == code
        assert info.value.message.startswith(f"{op}: HTTP {reply.status_code}")
        assert isinstance(
            info.value, PermanentError if kind is DashScopeRejected else TransientError
        )
        if isinstance(info.value, DashScopeRejected):
            assert info.value.status == reply.status_code
        assert len(server.requests) == 1
        assert_no_key(info.value)

    def test_rejected_message_and_request_id(self) -> None:
        """DashScope's message and request id are kept for the job record."""
        client, _ = make(
            error(400, "InvalidParameter", "parameters.video_ratio must be 9:16 or 3:4.")
        )
        with pytest.raises(DashScopeRejected) as info:
            client.submit_video(VideoRequest(IMAGE, TEMPLATE_ID, True, "1:1"))
        assert str(info.value) == (
            "InvalidParameter: submit: HTTP 400: parameters.video_ratio must be 9:16 or 3:4. "
            f"(request_id {REQUEST_ID})"
        )

    def test_cancel_not_pending(self) -> None:
        """Cancelling a task that left PENDING is a permanent UnsupportedOperation."""
        client, _ = make(
            error(
                400,
                "UnsupportedOperation",
                "Failed to cancel the task, please confirm if the task is in PENDING status.",
            )
        )
        with pytest.raises(DashScopeRejected) as info:
            client.cancel_task(TASK_ID)
        assert (info.value.code, info.value.status) == ("UnsupportedOperation", 400)

    def test_non_json_body_first_200_chars(self) -> None:
        """A proxy's HTML error page is quoted, cut at 200 characters."""
        page = "<html>" + "x" * 300 + "</html>"
        client, _ = make(httpx.Response(403, text=page))
        with pytest.raises(DashScopeRejected) as info:
            client.get_task(TASK_ID)
        assert info.value.code == "HTTP403"
        assert info.value.message == f"query: HTTP 403: {page[:200]}"

    def test_empty_error_body_uses_reason(self) -> None:
        """An empty error body falls back to the HTTP reason phrase."""
        client, _ = make(httpx.Response(503))
        with pytest.raises(DashScopeUnavailable) as info:
            client.get_task(TASK_ID)
        assert info.value.message == "query: HTTP 503: Service Unavailable"

    @pytest.mark.parametrize("op", OPERATIONS)
    def test_key_echoed_by_server_is_redacted(self, op: str) -> None:
        """Even a server that echoes the key does not get it into an exception."""
        echo = httpx.Response(
            401, json={"code": "InvalidApiKey", "message": f"Invalid API-key provided: {KEY}"}
        )
        html = httpx.Response(502, text=f"<p>Authorization: Bearer {KEY}</p>")
        for reply in (echo, html):
            client, _ = make(reply)
            with pytest.raises(WorkerError) as info:
                OPERATIONS[op](client)
            assert_no_key(info.value)
            assert "***" in info.value.message

    def test_redirect_is_bad_response(self) -> None:
        """Redirects are not followed: an unexpected 3xx is a bad response."""
        client, _ = make(httpx.Response(302, headers={"Location": "https://x.test/"}))
        with pytest.raises(DashScopeBadResponse, match="unexpected HTTP 302"):
            client.get_task(TASK_ID)


SUBMIT_OP = OPERATIONS["submit"]
QUERY_OP = OPERATIONS["query"]


class TestBadResponses:
    """A 200 without the documented shape is DashScopeBadResponse with a specific message."""

    @pytest.mark.parametrize(
        ("op", "reply", "message"),
        [
            ("submit", httpx.Response(200, text="<html>hi</html>"), "submit: body is not JSON"),
            ("submit", httpx.Response(200, content=b"\xff\xfe\x00"), "submit: body is not JSON"),
            ("submit", ok([1, 2]), "submit: body is not a JSON object"),
            ("submit", ok({"request_id": "r"}), "submit: output missing"),
            ("submit", ok({"code": "Oops"}), "submit: output missing (code 'Oops')"),
            ("submit", ok({"output": "PENDING"}), "submit: output is not an object"),
            ("submit", ok({"output": {"task_status": "PENDING"}}), "submit: output.task_id missing"),
            ("submit", ok({"output": {"task_id": TASK_ID}}), "submit: output.task_status missing"),
            ("submit", ok({"output": {"task_id": 7, "task_status": "PENDING"}}), "submit: output.task_id is not a string"),
            ("query", ok({"output": {"task_id": TASK_ID}}), "query: output.task_status missing"),
            ("query", ok({"output": {"task_status": "RUNNING"}}), "query: output.task_id missing"),
            ("query", ok({"output": {"task_id": "other", "task_status": "RUNNING"}}), "query: output.task_id 'other' is not the one asked for"),
            ("query", ok({"output": {"task_id": TASK_ID, "task_status": ["RUNNING"]}}), "query: output.task_status is not a string"),
            ("query", task({"task_status": "SUCCEEDED"}, usage={"video_duration": "10.2"}), "query: usage.video_duration is not a number"),
            ("query", task({"task_status": "SUCCEEDED"}, usage={"video_duration": True}), "query: usage.video_duration is not a number"),
            ("query", httpx.Response(200, content=b'{"request_id": "r", "output": {"task_id": "' + TASK_ID.encode() + b'", "task_status": "SUCCEEDED"}, "usage": {"video_duration": NaN}}'), "query: usage.video_duration is not a number"),
            ("query", task({"task_status": "SUCCEEDED"}, usage=[1]), "query: usage is not an object"),
            ("query", task({"task_status": "SUCCEEDED", "video_url": {"u": 1}}), "query: output.video_url is not a string"),
            ("detect", ok({"output": {"bodystyle": "full"}}), "detect: output.check_pass missing"),
            ("detect", ok({"output": {"check_pass": "yes"}}), "detect: output.check_pass is not a boolean"),
            ("detect", ok({"usage": {}}), "detect: output missing"),
            ("list", ok({"data": {"a": 1}}), "list: data is not a list"),
            ("list", ok({"data": ["x"]}), "list: data[0] is not an object"),
            ("list", ok({"data": [{"status": "RUNNING"}]}), "list: data[0].task_id missing"),
            ("list", ok({"data": [{"task_id": "t"}]}), "list: data[0].status missing"),
            ("list", ok({"data": [{"task_id": "t", "status": "RUNNING", "gmt_create": "2025"}]}), "list: data[0].gmt_create is not epoch milliseconds"),
            ("list", ok({"data": [], "total": "3"}), "list: total is not an integer"),
        ],
    )  # fmt: skip
    def test_shape_errors(self, op: str, reply: httpx.Response, message: str) -> None:
        """Each shape problem names the operation and the field."""
        client, _ = make(reply)
        with pytest.raises(DashScopeBadResponse) as info:
            OPERATIONS[op](client)
        assert info.value.message == message
        assert info.value.code == "DashScopeBadResponse"
        assert_no_key(info.value)
