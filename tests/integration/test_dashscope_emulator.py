"""workers.adapters.dashscope.client against the DashScope emulator over real HTTP: the happy path, faults, cancel, list."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from emulator.server import EmulatorServer
from workers.adapters.dashscope.client import (
    DashScopeClient,
    RemoteStatus,
    RemoteTask,
    VideoRequest,
)
from workers.errors import DashScopeRejected, DashScopeThrottled, DashScopeUnavailable
from workers.models import ANIMATE_ANYONE_GEN2 as AA

FINAL = {RemoteStatus.SUCCEEDED, RemoteStatus.FAILED, RemoteStatus.CANCELED, RemoteStatus.UNKNOWN}


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture
def client(http: httpx.Client, emulator: EmulatorServer, api_key: str) -> DashScopeClient:
    return DashScopeClient(http, api_key=api_key, base_url=emulator.base_url)


@pytest.fixture
def person(emulator: EmulatorServer) -> str:
    return f"{emulator.url}/_emulator/samples/person.png"


@pytest.fixture
def template_id(http: httpx.Client, emulator: EmulatorServer, api_key: str) -> str:
    r = http.post(f"{emulator.url}/_emulator/templates", json={"api_key": api_key, "seconds": 2})
    r.raise_for_status()
    return str(r.json()["template_id"])


def admin(http: httpx.Client, emulator: EmulatorServer, method: str, path: str, body: Any) -> None:
    http.request(method, f"{emulator.url}/_emulator/{path}", json=body).raise_for_status()


def wait_for(
    client: DashScopeClient, task_id: str, until: set[RemoteStatus], timeout: float = 8
) -> RemoteTask:
    deadline = time.monotonic() + timeout
    while True:
        got = client.get_task(task_id)
        if got.status in until or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_submit_poll_to_succeeded(client: DashScopeClient, person: str, template_id: str) -> None:
    """A video job runs through its states to SUCCEEDED with a video_url and 2.0 billed seconds."""
    started = datetime.now(UTC)
    submitted = client.submit_video(VideoRequest(person, template_id, use_ref_img_bg=False))
    assert submitted.status is RemoteStatus.PENDING
    assert submitted.request_id
    seen: list[RemoteStatus] = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        got = client.get_task(submitted.task_id)
        seen.append(got.status)
        if got.status in FINAL:
            break
        time.sleep(0.05)
    assert got.status is RemoteStatus.SUCCEEDED, got
    assert got.task_id == submitted.task_id
    assert got.video_url is not None and got.video_url.startswith("http")
    assert got.video_duration == 2.0
    assert got.code is None and got.template_id is None
    assert got.submit_time is not None and got.scheduled_time is not None
    assert got.end_time is not None
    slack = timedelta(seconds=2)
    assert started - slack <= got.submit_time <= got.scheduled_time <= got.end_time
    assert got.end_time <= datetime.now(UTC) + slack
    assert set(seen) <= set(RemoteStatus) - {RemoteStatus.UNKNOWN}


def test_bad_ratio_rejected(client: DashScopeClient, person: str, template_id: str) -> None:
    """A ratio DashScope does not offer is a permanent 400 InvalidParameter."""
    with pytest.raises(DashScopeRejected) as info:
        client.submit_video(
            VideoRequest(person, template_id, use_ref_img_bg=True, video_ratio="1:1")
        )
    assert (info.value.code, info.value.status) == ("InvalidParameter", 400)
    assert "9:16 or 3:4" in info.value.message


def test_second_submit_throttled(
    client: DashScopeClient, person: str, template_id: str, api_key: str
) -> None:
    """Two submits inside a second: the second is throttled (1 QPS per model)."""
    client.submit_video(VideoRequest(person, template_id))
    with pytest.raises(DashScopeThrottled) as info:
        client.submit_video(VideoRequest(person, template_id))
    assert info.value.code == "Throttling.RateQuota"
    assert api_key not in str(info.value)


@pytest.mark.parametrize(
    ("route", "kind", "code"),
    [
        ("submit", "500", "InternalError"),
        ("query", "503", "ModelUnavailable"),
        ("query", "drop", "DashScopeUnavailable"),
    ],
)
def test_faults_are_unavailable(
    client: DashScopeClient,
    http: httpx.Client,
    emulator: EmulatorServer,
    person: str,
    template_id: str,
    api_key: str,
    route: str,
    kind: str,
    code: str,
) -> None:
    """An injected 500, 503 or dropped connection is transient, and the next call works."""
    admin(http, emulator, "POST", "faults/next", {"route": route, "kind": kind})
    if route == "submit":
        with pytest.raises(DashScopeUnavailable) as info:
            client.submit_video(VideoRequest(person, template_id))
        # Nothing was done, so no quota was spent: an immediate resubmit is accepted.
        client.submit_video(VideoRequest(person, template_id))
    else:
        submitted = client.submit_video(VideoRequest(person, template_id))
        with pytest.raises(DashScopeUnavailable) as info:
            client.get_task(submitted.task_id)
        assert client.get_task(submitted.task_id).task_id == submitted.task_id
    assert type(info.value) is DashScopeUnavailable
    assert info.value.code == code
    assert info.value.message.startswith("submit:" if route == "submit" else "query:")
    if kind == "drop":
        assert "(RemoteProtocolError)" in info.value.message
    assert api_key not in str(info.value)


def test_unknown_id(client: DashScopeClient) -> None:
    """An id DashScope never issued reads UNKNOWN, not an error."""
    got = client.get_task("00000000-0000-4000-8000-000000000000")
    assert got.status is RemoteStatus.UNKNOWN
    assert got.raw_status == "UNKNOWN"
    assert got.task_id == "00000000-0000-4000-8000-000000000000"


def test_cancel(
    client: DashScopeClient,
    http: httpx.Client,
    emulator: EmulatorServer,
    person: str,
    template_id: str,
) -> None:
    """A queued task cancels; the running one refuses with UnsupportedOperation."""
    admin(http, emulator, "PATCH", "config", {"generation_seconds": 30, "submit_rate": 0})
    first = client.submit_video(VideoRequest(person, template_id))
    second = client.submit_video(VideoRequest(person, template_id))
    assert client.get_task(second.task_id).status is RemoteStatus.PENDING
    client.cancel_task(second.task_id)
    assert client.get_task(second.task_id).status is RemoteStatus.CANCELED

    running = wait_for(client, first.task_id, {RemoteStatus.RUNNING}, timeout=3)
    assert running.status is RemoteStatus.RUNNING
    with pytest.raises(DashScopeRejected) as info:
        client.cancel_task(first.task_id)
    assert (info.value.code, info.value.status) == ("UnsupportedOperation", 400)


def test_list_finds_the_task(client: DashScopeClient, person: str, template_id: str) -> None:
    """The task list shows a fresh submission with its model and creation instant."""
    now = datetime.now(UTC)
    submitted = client.submit_video(VideoRequest(person, template_id))
    page = client.list_tasks(
        start=now - timedelta(hours=1), end=now + timedelta(minutes=1), model="animate-anyone-gen2"
    )
    assert page.total == 1 and page.page_no == 1 and page.total_page == 1
    (item,) = page.items
    assert item.task_id == submitted.task_id
    assert item.model_name == "animate-anyone-gen2"
    assert item.created_at is not None
    assert abs(item.created_at - now) < timedelta(seconds=5)
    empty = client.list_tasks(
        start=now - timedelta(hours=1), end=now + timedelta(minutes=1), status="CANCELED"
    )
    assert empty.items == () and empty.total == 0


def test_detect(client: DashScopeClient, person: str) -> None:
    """The sync image check passes a sample person."""
    output = client.detect(person)
    assert output["check_pass"] is True
    assert output["bodystyle"] == "full"


def test_template_generation(client: DashScopeClient, emulator: EmulatorServer) -> None:
    """A template task submitted through submit_async ends with a template_id."""
    submitted = client.submit_async(
        AA.remote("template"),
        {"video_url": f"{emulator.url}/_emulator/samples/dance.mp4?seconds=2.5"},
    )
    assert submitted.status is RemoteStatus.PENDING
    got = wait_for(client, submitted.task_id, FINAL)
    assert got.status is RemoteStatus.SUCCEEDED, got
    assert got.template_id is not None and got.template_id.startswith("AACT.")
    assert got.video_url is None
    assert got.video_duration == pytest.approx(2.5, abs=0.1)


def test_a_slow_drip_image_url_does_not_hold_a_worker() -> None:
    """A real server sending one byte every 0.3 s (no per-read timeout ever fires): the image
    check gives up when its whole-download deadline passes."""
    import http.server
    import threading
    import time as _time

    from workers.adapters.web.guard import AddressGuard
    from workers.adapters.web.images import HttpImageProbe
    from workers.errors import TransientError

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
                    _time.sleep(0.3)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        probe = HttpImageProbe(
            httpx.Client(timeout=httpx.Timeout(5.0)),
            AddressGuard.from_setting("127.0.0.1"),
            total_seconds=1.0,
        )
        started = _time.monotonic()
        with pytest.raises(TransientError, match="more than 1 s"):
            probe.probe(f"http://127.0.0.1:{server.server_address[1]}/me.png")
        assert _time.monotonic() - started < 3
    finally:
        server.shutdown()
