"""The DashScope adapter's submit outcomes (which leave open whether a task exists) and its
reading of the whole task list, through httpx's MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from workers.adapters.dashscope.api import DashScopeVideoApi
from workers.adapters.dashscope.client import DashScopeClient
from workers.domain.request import JobRequest
from workers.errors import (
    DashScopeBadResponse,
    DashScopeRejected,
    DashScopeThrottled,
    DashScopeUnavailable,
    DashScopeUncertain,
    TransientError,
)
from workers.models import ANIMATE_ANYONE_GEN2 as AA

REQUEST = JobRequest(image_url="https://img.test/a.png", template_id="AACT.x.y")


def api(handler: Callable[[httpx.Request], httpx.Response]) -> DashScopeVideoApi:
    client = DashScopeClient(
        httpx.Client(transport=httpx.MockTransport(handler)),
        api_key="sk-test-0123456789",
        base_url="https://dashscope.test/api/v1",
    )
    return DashScopeVideoApi({"default": client}, AA)


def answer(
    status: int, body: object, content_type: str = "application/json"
) -> Callable[..., httpx.Response]:
    text = body if isinstance(body, str) else json.dumps(body)
    return lambda request: httpx.Response(status, text=text, headers={"content-type": content_type})


def raising(exc: Exception) -> Callable[..., httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


@pytest.mark.parametrize(
    "handler",
    [
        answer(502, "<html><h1>502 Bad Gateway</h1></html>", "text/html"),
        answer(504, "<html><h1>504 Gateway Timeout</h1></html>", "text/html"),
        answer(500, {"code": "InternalError", "message": "oops"}),
        answer(408, {"code": "RequestTimeOut", "message": "late"}),
        answer(200, '{"output": {"task_id": ', "application/json"),  # cut short
        answer(200, {"output": {"task_status": "PENDING"}}),  # no task id
        raising(httpx.ReadTimeout("read timed out")),
        raising(httpx.RemoteProtocolError("peer closed the connection")),
    ],
    ids=["502", "504", "500", "408", "garbled-200", "no-task-id", "read-timeout", "dropped"],
)
def test_a_submit_that_may_have_created_a_task_is_uncertain(
    handler: Callable[[httpx.Request], httpx.Response],
) -> None:
    """These answers leave open whether DashScope created (and bills) the task: never a plain
    retry, never a permanent failure that leaves a paid task unwatched."""
    video_api = api(handler)
    with pytest.raises(DashScopeUncertain) as info:
        video_api.submit("default", REQUEST)
    assert isinstance(info.value, TransientError)
    assert video_api.submit_is_ambiguous(info.value)
    with pytest.raises(DashScopeUncertain):
        video_api.submit_template("default", "https://v.test/d.mp4")


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (raising(httpx.ConnectError("refused")), DashScopeUnavailable),
        (raising(httpx.ConnectTimeout("no route")), DashScopeUnavailable),
        (answer(429, {"code": "Throttling.RateQuota", "message": "slow"}), DashScopeThrottled),
        (answer(400, {"code": "InvalidParameter", "message": "bad"}), DashScopeRejected),
    ],
    ids=["connect-error", "connect-timeout", "429", "400"],
)
def test_a_submit_that_created_nothing_is_not_uncertain(
    handler: Callable[[httpx.Request], httpx.Response], error: type[Exception]
) -> None:
    """Nothing was sent (connect errors), or DashScope says it did nothing (429, other 4xx)."""
    video_api = api(handler)
    with pytest.raises(error) as info:
        video_api.submit("default", REQUEST)
    assert not isinstance(info.value, DashScopeUncertain)
    if isinstance(info.value, TransientError):
        assert not video_api.submit_is_ambiguous(info.value)


def test_a_poll_keeps_its_own_errors() -> None:
    """Only submits become uncertain: a garbled poll answer is still a bad response."""
    video_api = api(answer(200, "not json", "text/plain"))
    with pytest.raises(DashScopeBadResponse):
        video_api.poll("default", "task-1")


def test_recent_tasks_reads_every_page() -> None:
    """A window with 150 tasks comes in two pages of 100: both are read, in order."""
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params["page_no"])
        asked.append(request.url.params["page_no"])
        assert request.url.params["model_name"] == "animate-anyone-gen2"
        ids = range((page - 1) * 100, min(page * 100, 150))
        rows = [{"task_id": f"t{i}", "status": "RUNNING", "gmt_create": 1} for i in ids]
        body = {"total": 150, "total_page": 2, "page_no": page, "data": rows}
        return httpx.Response(200, json=body)

    ids = api(handler).recent_tasks("default", 1_700_000_000.0, 1_700_000_060.0)
    assert asked == ["1", "2"]
    assert ids == [f"t{i}" for i in range(150)]
