"""The emulator over real HTTP: documented checks and bodies, quotas, FIFO lanes, expiry, faults."""

from __future__ import annotations

import io
import itertools
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import av
import httpx
import pytest
from PIL import Image

from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer

SUBMIT = "/api/v1/services/aigc/image2video/video-synthesis"
TEMPLATE = "/api/v1/services/aigc/image2video/aa-template-generation"
DETECT = "/api/v1/services/aigc/image2video/aa-detect"
TIME_FORMAT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}$")


class Api:
    """A thin httpx helper bound to one emulator and one API key."""

    def __init__(self, server: EmulatorServer, key: str) -> None:
        self.server = server
        self.key = key
        self.http = httpx.Client(base_url=server.url, timeout=30)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def host(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        r = self.http.put(
            f"/_emulator/files/{name}", content=data, headers={"Content-Type": content_type}
        )
        return str(r.json()["url"])

    def person(self, **query: Any) -> str:
        extra = "".join(f"&{k}={v}" for k, v in query.items())
        return f"{self.server.url}/_emulator/samples/person.png?width=256&height=512{extra}"

    def template(self, seconds: float = 2.0, key: str | None = None) -> str:
        body = {"api_key": key or self.key, "seconds": seconds}
        return str(self.http.post("/_emulator/templates", json=body).json()["template_id"])

    def submit(
        self,
        image_url: str | None = None,
        template_id: str | None = None,
        *,
        parameters: dict[str, Any] | None = None,
        path: str = SUBMIT,
        headers: dict[str, str] | None = None,
        **extra_input: Any,
    ) -> httpx.Response:
        body: dict[str, Any] = {
            "model": "animate-anyone-gen2",
            "input": {
                "image_url": image_url or self.person(),
                "template_id": template_id or self.template(),
                **extra_input,
            },
            "parameters": parameters or {},
        }
        h = {**self.auth, "X-DashScope-Async": "enable", **(headers or {})}
        return self.http.post(path, json=body, headers=h)

    def task(self, task_id: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/tasks/{task_id}", headers=self.auth)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def status(self, task_id: str) -> str:
        return str(self.task(task_id)["output"]["task_status"])

    def wait(self, task_id: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.task(task_id)
            if body["output"]["task_status"] in {"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"}:
                return body
            time.sleep(0.1)
        raise AssertionError(f"task {task_id} did not finish")

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, f"/_emulator/{path}", **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def stats(self) -> dict[str, Any]:
        return dict(self.admin("GET", "stats"))

    def counters(self, model: str = "animate-anyone-gen2") -> dict[str, Any]:
        accounts = self.stats()["accounts"]
        (account,) = [a for a in accounts if model in accounts[a]] or [None]
        return dict(accounts[account][model]) if account else {}


@pytest.fixture
def api(emulator: EmulatorServer, api_key: str) -> Iterator[Api]:
    client = Api(emulator, api_key)
    yield client
    client.http.close()


def png(width: int, height: int, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 180, 160)).save(out, fmt)
    return out.getvalue()


def assert_error(r: httpx.Response, status: int, code: str, message: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"request_id", "code", "message"}
    assert body["code"] == code
    if message is not None:
        assert body["message"] == message


class TestChecks:
    def test_missing_key_is_401(self, api: Api) -> None:
        """No Authorization header gives 401 InvalidApiKey, "No API-key provided."."""
        r = api.http.post(SUBMIT, json={"model": "animate-anyone-gen2"})
        assert_error(r, 401, "InvalidApiKey", "No API-key provided.")

    def test_unknown_key_is_401_when_keys_are_restricted(self) -> None:
        """With --api-key set, any other key gets 401 "Invalid API-key provided."."""
        config = EmulatorConfig(api_keys={"sk-good": "team-a"})
        with EmulatorServer(config) as server:
            r = httpx.get(f"{server.base_url}/tasks/x", headers={"Authorization": "Bearer sk-bad"})
            assert_error(r, 401, "InvalidApiKey", "Invalid API-key provided.")
            ok = httpx.get(
                f"{server.base_url}/tasks/x", headers={"Authorization": "Bearer sk-good"}
            )
            assert ok.json()["output"]["task_status"] == "UNKNOWN"

    def test_auth_is_checked_before_the_body(self, api: Api) -> None:
        """A bad body with no key is still a 401: auth comes first."""
        r = api.http.post(SUBMIT, content=b"{not json")
        assert r.status_code == 401

    @pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
    def test_bad_json_is_illegal_input(self, api: Api, raw: bytes) -> None:
        """A body that is not a JSON object is 400 BadRequest.IllegalInput."""
        r = api.http.post(SUBMIT, content=raw, headers={**api.auth, "X-DashScope-Async": "enable"})
        assert_error(r, 400, "BadRequest.IllegalInput", "The input parameter requires json format.")

    def test_missing_model(self, api: Api) -> None:
        """No model is 400 BadRequest.EmptyModel."""
        r = api.http.post(SUBMIT, json={"input": {}}, headers=api.auth)
        assert_error(r, 400, "BadRequest.EmptyModel")

    def test_model_of_another_endpoint_is_a_url_error(self, api: Api) -> None:
        """The detect model on the video endpoint is 400 "url error, please check url!"."""
        r = api.http.post(
            SUBMIT, json={"model": "animate-anyone-detect-gen2", "input": {}}, headers=api.auth
        )
        assert_error(r, 400, "InvalidParameter", "url error, please check url!")

    def test_unknown_model(self, api: Api) -> None:
        """A model the emulator does not know is 404 ModelNotFound."""
        r = api.http.post(SUBMIT, json={"model": "nope-1", "input": {}}, headers=api.auth)
        assert_error(r, 404, "ModelNotFound")

    def test_async_endpoint_without_async_header(self, api: Api) -> None:
        """video-synthesis without X-DashScope-Async is 403 AccessDenied."""
        body = {"model": "animate-anyone-gen2", "input": {"image_url": "x"}}
        r = api.http.post(SUBMIT, json=body, headers=api.auth)
        assert_error(r, 403, "AccessDenied", "current user api does not support synchronous calls.")

    def test_sync_endpoint_with_async_header(self, api: Api) -> None:
        """aa-detect with X-DashScope-Async is 403 AccessDenied."""
        body = {"model": "animate-anyone-detect-gen2", "input": {"image_url": "x"}}
        r = api.http.post(DETECT, json=body, headers={**api.auth, "X-DashScope-Async": "enable"})
        assert_error(
            r, 403, "AccessDenied", "Current user api does not support asynchronous calls."
        )

    def test_missing_input(self, api: Api) -> None:
        """No input object is 400 BadRequest.EmptyInput."""
        r = api.http.post(
            SUBMIT,
            json={"model": "animate-anyone-gen2"},
            headers={**api.auth, "X-DashScope-Async": "enable"},
        )
        assert_error(r, 400, "BadRequest.EmptyInput")

    @pytest.mark.parametrize("missing", ["image_url", "template_id"])
    def test_required_fields(self, api: Api, missing: str) -> None:
        """A missing required input field is 400 InvalidParameter naming the field."""
        body: dict[str, Any] = {"image_url": api.person(), "template_id": api.template()}
        del body[missing]
        r = api.http.post(
            SUBMIT,
            json={"model": "animate-anyone-gen2", "input": body},
            headers={**api.auth, "X-DashScope-Async": "enable"},
        )
        assert_error(r, 400, "InvalidParameter", f"Field required: input.{missing}")

    def test_video_ratio(self, api: Api) -> None:
        """video_ratio other than 9:16 or 3:4 is refused with the documented message."""
        r = api.submit(parameters={"video_ratio": "1:1"})
        assert_error(r, 400, "InvalidParameter", "parameters.video_ratio must be 9:16 or 3:4.")

    def test_use_ref_img_bg_must_be_boolean(self, api: Api) -> None:
        """use_ref_img_bg must be a JSON boolean."""
        r = api.submit(parameters={"use_ref_img_bg": "yes"})
        assert_error(r, 400, "InvalidParameter")

    def test_unknown_input_keys_are_ignored(self, api: Api) -> None:
        """The SDK's extra input keys (prompt, extend_prompt, function) are accepted."""
        r = api.submit(prompt=None, extend_prompt=True, function="video-synthesis")
        assert r.status_code == 200, r.text
        assert r.json()["output"]["task_status"] == "PENDING"

    @pytest.mark.parametrize("path", [SUBMIT, SUBMIT + "/"])
    def test_trailing_slash_both_forms(self, api: Api, path: str) -> None:
        """The documented path (trailing slash) and the SDK's (none) both work."""
        assert api.submit(path=path).status_code == 200


class TestImageRules:
    @pytest.mark.parametrize(
        ("data", "code"),
        [
            (png(64, 64, "GIF"), "InvalidFile.Format"),
            (png(300, 750), "InvalidFile.ImageSize"),  # aspect 2.5
            (png(2050, 4100), "InvalidFile.ImageSize"),  # longest side > 4096
            (b"definitely not an image", "InvalidFile.Openerror"),
        ],
    )
    def test_image_is_refused(self, api: Api, data: bytes, code: str) -> None:
        """Bad images get the documented InvalidFile code and no task is created."""
        r = api.submit(image_url=api.host("bad", data))
        assert_error(r, 400, code)
        assert api.counters().get("submitted", 0) == 0

    def test_image_of_5mb_is_too_big(self, api: Api) -> None:
        """An image of 5 MB or more is InvalidFile.Size."""
        data = png(64, 64) + b"\0" * (5 * 1024 * 1024)
        assert_error(api.submit(image_url=api.host("big", data)), 400, "InvalidFile.Size")

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP"])
    def test_accepted_formats(self, api: Api, fmt: str) -> None:
        """JPEG, PNG and BMP are accepted."""
        r = api.submit(image_url=api.host(f"ok.{fmt}", png(200, 400, fmt)))
        assert r.status_code == 200, r.text

    def test_unreachable_url(self, api: Api) -> None:
        """A 404 behind the URL is InvalidURL."""
        r = api.submit(image_url=f"{api.server.url}/_emulator/files/missing.png")
        assert_error(r, 400, "InvalidURL")

    def test_not_http(self, api: Api) -> None:
        """Only http, https and oss:// URLs are accepted."""
        assert_error(api.submit(image_url="ftp://example/x.png"), 400, "InvalidURL")

    def test_connection_refused(self, api: Api) -> None:
        """A closed port is InvalidURL.ConnectionRefused."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        r = api.submit(image_url=f"http://127.0.0.1:{port}/x.png")
        assert_error(r, 400, "InvalidURL.ConnectionRefused")

    def test_download_timeout(self, api: Api) -> None:
        """A server that never answers is InvalidURL.Timeout."""
        api.admin("PATCH", "config", json={"fetch_timeout_seconds": 0.5})
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        try:
            port = silent.getsockname()[1]
            r = api.submit(image_url=f"http://127.0.0.1:{port}/x.png")
            assert_error(r, 400, "InvalidURL.Timeout")
        finally:
            silent.close()


class TestTemplates:
    def template_submit(self, api: Api, video_url: str) -> httpx.Response:
        return api.http.post(
            TEMPLATE + "/",
            json={"model": "animate-anyone-template-gen2", "input": {"video_url": video_url}},
            headers={**api.auth, "X-DashScope-Async": "enable"},
        )

    def dance(self, api: Api, **q: Any) -> str:
        query = {"seconds": 2.5, "fps": 24, "width": 240, "height": 400, **q}
        return f"{api.server.url}/_emulator/samples/dance.mp4?" + "&".join(
            f"{k}={v}" for k, v in query.items()
        )

    def test_template_life_and_use(self, api: Api) -> None:
        """A template task goes PENDING -> RUNNING -> SUCCEEDED and its id drives a video."""
        r = self.template_submit(api, self.dance(api))
        assert r.status_code == 200, r.text
        task_id = r.json()["output"]["task_id"]
        seen = set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = api.status(task_id)
            seen.add(status)
            if status == "SUCCEEDED":
                break
            time.sleep(0.05)
        assert seen <= {"PENDING", "RUNNING", "SUCCEEDED"}
        done = api.task(task_id)
        template_id = done["output"]["template_id"]
        assert template_id.startswith("AACT.")
        assert done["usage"] == {"video_duration": 2.5, "video_ratio": "standard"}
        assert api.submit(template_id=template_id).status_code == 200

    @pytest.mark.parametrize(
        ("query", "code"),
        [
            ({"fps": 15}, "InvalidFile.FPS"),
            ({"seconds": 1.5}, "InvalidFile.Duration"),
            ({"width": 160}, "InvalidFile.Resolution"),
            ({"width": 200, "height": 640}, "InvalidFile.AspectRatio"),
        ],
    )
    def test_template_video_rules(self, api: Api, query: dict[str, Any], code: str) -> None:
        """Template videos outside the documented limits are refused with their code."""
        assert_error(self.template_submit(api, self.dance(api, **query)), 400, code)

    def test_template_video_that_is_not_a_video(self, api: Api) -> None:
        """A file that is not a video is InvalidFile.Openerror."""
        url = api.host("junk.mp4", b"\0junk" * 100, "video/mp4")
        assert_error(self.template_submit(api, url), 400, "InvalidFile.Openerror")

    def test_template_of_another_account(self, api: Api) -> None:
        """A template made under one account is refused under another."""
        foreign = api.template(key="sk-someone-else")
        assert_error(api.submit(template_id=foreign), 400, "InvalidFile.Template.Content")

    def test_unknown_template(self, api: Api) -> None:
        """An unknown template id is InvalidFile.Template.Content."""
        assert_error(api.submit(template_id="AACT.x.y"), 400, "InvalidFile.Template.Content")

    def test_template_not_ready(self, api: Api) -> None:
        """A template whose task has not succeeded cannot be used yet."""
        api.admin("PATCH", "config", json={"template_seconds": 30})
        r = self.template_submit(api, self.dance(api))
        task_id = r.json()["output"]["task_id"]
        template_id = api.admin("GET", "tasks")  # ids are not public until success
        assert api.status(task_id) == "RUNNING"
        assert template_id
        emulator = api.server.emulator
        (pending,) = [t for t in emulator.templates.values() if t.task_id == task_id]
        assert_error(
            api.submit(template_id=pending.template_id), 400, "InvalidFile.Template.Content"
        )


class TestDetect:
    def detect(self, api: Api, url: str) -> httpx.Response:
        return api.http.post(
            DETECT,
            json={
                "model": "animate-anyone-detect-gen2",
                "input": {"image_url": url},
                "parameters": {},
            },
            headers=api.auth,
        )

    def test_pass(self, api: Api) -> None:
        """A good image passes with bodystyle full and one billed image."""
        r = self.detect(api, api.person())
        assert r.status_code == 200
        body = r.json()
        assert body["output"] == {"bodystyle": "full", "check_pass": True}
        assert body["usage"] == {"image_count": 1}

    @pytest.mark.parametrize("trigger", ["no_human", "multi_human"])
    def test_fail_is_a_business_result(self, api: Api, trigger: str) -> None:
        """A failed check is HTTP 200 with check_pass false and a reason."""
        body = self.detect(api, api.person(emulator_detect=trigger)).json()
        assert body["output"]["check_pass"] is False
        assert body["output"]["bodystyle"] == ""
        assert "human bod" in body["output"]["reason"]

    def test_detect_checks_the_image(self, api: Api) -> None:
        """Detection applies the image rules too."""
        r = self.detect(api, api.host("g", png(10, 10, "GIF")))
        assert_error(r, 400, "InvalidFile.Format")

    def test_detect_quota(self, api: Api) -> None:
        """Five detections a second pass; the sixth is throttled."""
        url = api.person()
        codes = [self.detect(api, url).status_code for _ in range(6)]
        assert codes[:5] == [200] * 5
        assert codes[5] == 429


class TestQuotas:
    def test_second_submit_in_a_second_is_429(self, api: Api) -> None:
        """1 submit per second per account and model: the second one is throttled."""
        image, template = api.person(), api.template()
        assert api.submit(image, template).status_code == 200
        assert_error(api.submit(image, template), 429, "Throttling.RateQuota")
        assert api.counters()["submitted"] == 1
        assert api.counters()["throttled"] == 1
        time.sleep(1.05)
        assert api.submit(image, template).status_code == 200

    def test_accounts_have_their_own_quota(self, api: Api, emulator: EmulatorServer) -> None:
        """Another key is another account with its own bucket."""
        other = Api(emulator, api.key + "-other")
        assert api.submit().status_code == 200
        assert other.submit().status_code == 200

    def test_query_quota(self, api: Api) -> None:
        """20 task queries a second: a burst gets its first 20 through, then 429s."""
        started = time.monotonic()
        codes = [
            api.http.get("/api/v1/tasks/none", headers=api.auth).status_code for _ in range(40)
        ]
        elapsed = time.monotonic() - started
        assert codes[:20] == [200] * 20
        assert 429 in codes
        # Tokens refill at 20/s while the burst runs; no more than that may pass.
        assert codes.count(200) <= 20 + int(elapsed * 20) + 1

    def test_one_running_task_fifo(self, api: Api) -> None:
        """Only one task runs per account and model; the rest wait PENDING and start in order."""
        api.admin("PATCH", "config", json={"submit_rate": 0})
        image, template = api.person(), api.template()
        ids = [api.submit(image, template).json()["output"]["task_id"] for _ in range(3)]
        statuses = [api.status(t) for t in ids]
        assert statuses[0] != "PENDING"
        assert statuses[1:] == ["PENDING", "PENDING"]
        done = [api.wait(t)["output"] for t in ids]
        assert [d["task_status"] for d in done] == ["SUCCEEDED"] * 3
        for first, second in itertools.pairwise(done):
            assert first["end_time"] <= second["scheduled_time"]
        assert all(TIME_FORMAT.match(d[k]) for d in done for k in ("submit_time", "end_time"))

    def test_concurrency_flag(self, api: Api) -> None:
        """--concurrency 2 lets two tasks run at once."""
        api.admin("PATCH", "config", json={"submit_rate": 0, "concurrency": 2})
        image, template = api.person(), api.template()
        ids = [api.submit(image, template).json()["output"]["task_id"] for _ in range(3)]
        assert [api.status(t) == "PENDING" for t in ids] == [False, False, True]


class TestTaskLife:
    def test_phases_in_order(self, api: Api) -> None:
        """Generation goes PENDING, PRE-PROCESSING, RUNNING, POST-PROCESSING, SUCCEEDED."""
        api.admin(
            "PATCH",
            "config",
            json={"preprocess_seconds": 10, "generation_seconds": 10, "postprocess_seconds": 10},
        )
        image, template = api.person(), api.template()
        first = api.submit(image, template).json()["output"]["task_id"]
        api.admin("POST", "clock", json={"advance": 1.01})
        second = api.submit(image, template).json()["output"]["task_id"]
        seen = [api.status(second)]
        for _ in range(4):
            api.admin("POST", "clock", json={"advance": 10})
            seen.append(api.status(second))
        assert seen == ["PENDING", "PENDING", "PENDING", "PRE-PROCESSING", "RUNNING"]
        assert api.status(first) == "SUCCEEDED"
        api.admin("POST", "clock", json={"advance": 10})
        assert api.status(second) == "POST-PROCESSING"
        api.admin("POST", "clock", json={"advance": 10})
        out = api.task(second)
        assert out["output"]["task_status"] == "SUCCEEDED"
        assert "scheduled_time" in out["output"]

    def test_pending_has_no_scheduled_time(self, api: Api) -> None:
        """A queued task shows submit_time but neither scheduled_time nor end_time."""
        api.admin("PATCH", "config", json={"submit_rate": 0, "generation_seconds": 30})
        image, template = api.person(), api.template()
        api.submit(image, template)
        queued = api.task(api.submit(image, template).json()["output"]["task_id"])["output"]
        assert queued["task_status"] == "PENDING"
        assert "scheduled_time" not in queued and "end_time" not in queued

    def test_cancel(self, api: Api) -> None:
        """Cancel works on PENDING only; a cancelled task reads CANCELED."""
        api.admin("PATCH", "config", json={"submit_rate": 0, "generation_seconds": 30})
        image, template = api.person(), api.template()
        running = api.submit(image, template).json()["output"]["task_id"]
        queued = api.submit(image, template).json()["output"]["task_id"]
        r = api.http.post(f"/api/v1/tasks/{queued}/cancel", headers=api.auth)
        assert r.status_code == 200 and set(r.json()) == {"request_id"}
        assert api.status(queued) == "CANCELED"
        r = api.http.post(f"/api/v1/tasks/{running}/cancel", headers=api.auth)
        assert_error(r, 400, "UnsupportedOperation")
        r = api.http.post(f"/api/v1/tasks/{queued}/cancel", headers=api.auth)
        assert_error(r, 400, "UnsupportedOperation")

    def test_cancelled_task_frees_its_place(self, api: Api) -> None:
        """A cancelled queued task is skipped: the next one runs after the running task."""
        api.admin("PATCH", "config", json={"submit_rate": 0})
        image, template = api.person(), api.template()
        ids = [api.submit(image, template).json()["output"]["task_id"] for _ in range(3)]
        api.http.post(f"/api/v1/tasks/{ids[1]}/cancel", headers=api.auth)
        assert api.wait(ids[2])["output"]["task_status"] == "SUCCEEDED"
        assert api.status(ids[1]) == "CANCELED"

    def test_other_accounts_tasks_are_unknown(self, api: Api, emulator: EmulatorServer) -> None:
        """A task of another account reads UNKNOWN, as an unknown id does."""
        task_id = api.submit().json()["output"]["task_id"]
        other = Api(emulator, api.key + "-other")
        assert other.status(task_id) == "UNKNOWN"
        assert other.status("no-such-task") == "UNKNOWN"

    def test_retention(self, api: Api) -> None:
        """After the retention period a finished task reads UNKNOWN with HTTP 200."""
        task_id = api.submit().json()["output"]["task_id"]
        api.wait(task_id)
        api.admin("POST", "clock", json={"advance": 86400 - 60})
        assert api.status(task_id) == "SUCCEEDED"
        api.admin("POST", "clock", json={"advance": 120})
        body = api.task(task_id)
        assert body["output"] == {"task_id": task_id, "task_status": "UNKNOWN"}

    def test_failure_trigger(self, api: Api) -> None:
        """?emulator_fail=CODE in the image URL ends the task FAILED with that code."""
        task_id = api.submit(api.person(emulator_fail="InternalError.Algo")).json()["output"][
            "task_id"
        ]
        out = api.wait(task_id)
        assert out["output"]["task_status"] == "FAILED"
        assert out["output"]["code"] == "InternalError.Algo"
        assert out["output"]["message"]
        assert "video_url" not in out["output"]


class TestList:
    def test_list_window_and_filters(self, api: Api) -> None:
        """The list shows this account's tasks with epoch-ms times, filtered and paginated."""
        api.admin("PATCH", "config", json={"submit_rate": 0})
        image, template = api.person(), api.template()
        ids = [api.submit(image, template).json()["output"]["task_id"] for _ in range(3)]
        api.wait(ids[-1])
        r = api.http.get("/api/v1/tasks", params={"page_size": 2}, headers=api.auth)
        body = r.json()
        assert body["total"] == 3 and body["total_page"] == 2 and len(body["data"]) == 2
        row = body["data"][0]
        assert row["task_id"] == ids[-1]  # newest first
        assert row["status"] == "SUCCEEDED"
        assert row["end_time"] >= row["start_time"] >= row["gmt_create"] > 1_700_000_000_000
        assert row["model_name"] == "animate-anyone-gen2"
        one = api.http.get("/api/v1/tasks/", params={"task_id": ids[0]}, headers=api.auth).json()
        assert [d["task_id"] for d in one["data"]] == [ids[0]]
        none = api.http.get("/api/v1/tasks", params={"status": "FAILED"}, headers=api.auth).json()
        assert none["total"] == 0

    def test_window_over_24h_is_refused(self, api: Api) -> None:
        """start_time and end_time more than 24 h apart is 400 InvalidParameter."""
        r = api.http.get(
            "/api/v1/tasks",
            params={"start_time": "20260101000000", "end_time": "20260102000001"},
            headers=api.auth,
        )
        assert_error(r, 400, "InvalidParameter")

    def test_old_window_is_empty(self, api: Api) -> None:
        """A window in the past holds none of today's tasks."""
        api.submit()
        r = api.http.get("/api/v1/tasks", params={"end_time": "20250101000000"}, headers=api.auth)
        assert r.json()["total"] == 0


class TestVideo:
    def finished(self, api: Api, **query: Any) -> dict[str, Any]:
        task_id = api.submit(api.person(**query), api.template(seconds=2.0)).json()["output"][
            "task_id"
        ]
        out = api.wait(task_id)
        assert out["output"]["task_status"] == "SUCCEEDED", out
        return out

    def test_video_is_real_h264_of_the_billed_length(self, api: Api, tmp_path: Any) -> None:
        """The video decodes as H.264 at 15 fps and lasts usage.video_duration."""
        out = self.finished(api)
        r = api.http.get(out["output"]["video_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        path = tmp_path / "v.mp4"
        path.write_bytes(r.content)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = sum(1 for _ in container.decode(stream))
        assert out["usage"]["video_duration"] == 2.0
        assert frames == 30

    def test_range_requests(self, api: Api) -> None:
        """Range requests get 206 and exactly the asked bytes."""
        url = self.finished(api)["output"]["video_url"]
        whole = api.http.get(url).content
        part = api.http.get(url, headers={"Range": "bytes=10-109"})
        assert part.status_code == 206
        assert part.content == whole[10:110]
        assert part.headers["content-range"] == f"bytes 10-109/{len(whole)}"

    def test_url_expires(self, api: Api) -> None:
        """After url-ttl the signed URL answers 403, in OSS's XML."""
        url = self.finished(api)["output"]["video_url"]
        assert "Expires=" in url and "Signature=" in url
        api.admin("POST", "clock", json={"advance": 86400 + 5})
        r = api.http.get(url)
        assert r.status_code == 403
        assert "<Code>AccessDenied</Code>" in r.text and "expired" in r.text

    def test_tampered_url(self, api: Api) -> None:
        """A URL whose Expires was changed no longer matches its signature."""
        url = self.finished(api)["output"]["video_url"]
        expires = re.search(r"Expires=(\d+)", url)
        assert expires
        forged = url.replace(expires.group(0), f"Expires={int(expires.group(1)) + 999}")
        r = api.http.get(forged)
        assert r.status_code == 403 and "SignatureDoesNotMatch" in r.text

    def test_padded_video(self, api: Api, tmp_path: Any) -> None:
        """video_pad_bytes makes the file that big, and it still decodes."""
        api.admin("PATCH", "config", json={"video_pad_bytes": 3_000_000})
        r = api.http.get(self.finished(api)["output"]["video_url"])
        assert len(r.content) == 3_000_000
        path = tmp_path / "p.mp4"
        path.write_bytes(r.content)
        with av.open(str(path)) as container:
            assert sum(1 for _ in container.decode(video=0)) == 30

    def test_rendering_is_cached(self, api: Api) -> None:
        """Two tasks from the same image and template share one rendering."""
        api.admin("PATCH", "config", json={"submit_rate": 0})
        image = api.host(f"{api.key}.png", png(202, 404))  # an image no other test renders
        template = api.template(seconds=2.0)
        before = api.server.emulator.render_count
        ids = [api.submit(image, template).json()["output"]["task_id"] for _ in range(2)]
        urls = [api.wait(t)["output"]["video_url"] for t in ids]
        bodies = [api.http.get(u).content for u in urls]
        assert bodies[0] == bodies[1]
        assert api.server.emulator.render_count - before == 1
        stats = api.counters()
        assert stats["video_downloads"] == 2
        assert stats["video_bytes_served"] == 2 * len(bodies[0])


class TestUploads:
    def test_policy_upload_and_resolve(self, api: Api) -> None:
        """getPolicy, a multipart post to upload_host, then oss:// resolves with the header only."""
        r = api.http.get(
            "/api/v1/uploads", params={"action": "getPolicy", "model": "animate-anyone-gen2"},
            headers=api.auth,
        )  # fmt: skip
        data = r.json()["data"]
        key = f"{data['upload_dir']}/me.png"
        form = {
            "OSSAccessKeyId": data["oss_access_key_id"],
            "Signature": data["signature"],
            "policy": data["policy"],
            "key": key,
            "x-oss-object-acl": data["x_oss_object_acl"],
            "x-oss-forbid-overwrite": data["x_oss_forbid_overwrite"],
            "success_action_status": "200",
        }
        up = httpx.post(data["upload_host"], data=form, files={"file": ("me.png", png(200, 400))})
        assert up.status_code == 200, up.text
        url = f"oss://{key}"
        assert_error(api.submit(image_url=url), 400, "InvalidURL")
        ok = api.submit(image_url=url, headers={"X-DashScope-OssResourceResolve": "enable"})
        assert ok.status_code == 200, ok.text
        again = httpx.post(data["upload_host"], data=form, files={"file": ("me.png", b"x")})
        assert again.status_code == 409

    def test_forged_policy_is_refused(self, api: Api) -> None:
        """A post whose signature does not match its policy is refused."""
        r = api.http.get(
            "/api/v1/uploads", params={"action": "getPolicy", "model": "animate-anyone-gen2"},
            headers=api.auth,
        )  # fmt: skip
        data = r.json()["data"]
        form = {"Signature": "forged", "policy": data["policy"], "key": data["upload_dir"] + "/x"}
        up = httpx.post(data["upload_host"], data=form, files={"file": ("x", b"x")})
        assert up.status_code == 403 and "SignatureDoesNotMatch" in up.text

    def test_expired_policy(self, api: Api) -> None:
        """A policy used after its expiry is refused with "Policy expired"."""
        r = api.http.get(
            "/api/v1/uploads", params={"action": "getPolicy", "model": "animate-anyone-gen2"},
            headers=api.auth,
        )  # fmt: skip
        data = r.json()["data"]
        api.admin("POST", "clock", json={"advance": 301})
        form = {"Signature": data["signature"], "policy": data["policy"]}
        form["key"] = data["upload_dir"] + "/x"
        up = httpx.post(data["upload_host"], data=form, files={"file": ("x", b"x")})
        assert up.status_code == 403 and "Policy expired" in up.text


class TestFaults:
    def test_queued_500_creates_no_task(self, api: Api) -> None:
        """A queued 500 on submit answers InternalError and nothing is created."""
        api.admin("POST", "faults/next", json={"route": "submit", "kind": "500"})
        assert_error(api.submit(), 500, "InternalError")
        assert api.counters().get("submitted", 0) == 0
        assert api.submit().status_code == 200  # one-shot

    @pytest.mark.parametrize(("kind", "status"), [("503", 503), ("429", 429)])
    def test_queued_status_faults(self, api: Api, kind: str, status: int) -> None:
        """Queued 503 and 429 faults answer with those statuses."""
        api.admin("POST", "faults/next", json={"route": "query", "kind": kind, "count": 2})
        codes = [api.http.get("/api/v1/tasks/x", headers=api.auth).status_code for _ in range(3)]
        assert codes == [status, status, 200]

    def test_drop(self, api: Api) -> None:
        """A dropped connection gets no answer at all."""
        api.admin("POST", "faults/next", json={"route": "query", "kind": "drop"})
        with pytest.raises(httpx.RemoteProtocolError):
            api.http.get("/api/v1/tasks/x", headers=api.auth)

    def test_drop_after_submit_creates_the_task(self, api: Api) -> None:
        """drop_after: the task exists (and is paid for) though the client saw no answer."""
        api.admin("POST", "faults/next", json={"route": "submit", "kind": "drop_after"})
        with pytest.raises(httpx.RemoteProtocolError):
            api.submit()
        assert api.counters()["submitted"] == 1
        listed = api.http.get("/api/v1/tasks", headers=api.auth).json()
        assert listed["total"] == 1

    @pytest.mark.parametrize("kind", ["502_after", "504_after", "garbled_after"])
    def test_answers_after_the_task_exists(self, api: Api, kind: str) -> None:
        """A gateway error page or a garbled 200 after the submit was handled: the task exists
        (and is paid for) though the client cannot read an id."""
        api.admin("POST", "faults/next", json={"route": "submit", "kind": kind})
        r = api.submit()
        if kind == "garbled_after":
            assert r.status_code == 200
            with pytest.raises(ValueError):
                r.json()
        else:
            assert r.status_code == int(kind[:3]) and "<html>" in r.text
        assert api.counters()["submitted"] == 1
        assert api.http.get("/api/v1/tasks", headers=api.auth).json()["total"] == 1

    def test_a_403_on_the_video_that_is_not_an_expiry(self, api: Api) -> None:
        """403 on a live video URL: OSS AccessDenied that does not say the request expired."""
        task_id = api.submit().json()["output"]["task_id"]
        url = api.wait(task_id)["output"]["video_url"]
        api.admin("POST", "faults/next", json={"route": "video", "kind": "403"})
        refused = api.http.get(url)
        assert refused.status_code == 403 and "AccessDenied" in refused.text
        assert "expired" not in refused.text.lower()
        assert api.http.get(url).status_code == 200  # one-shot

    def test_a_list_that_lags_behind(self, api: Api) -> None:
        """list_lag_seconds: a new task is queryable at once but listed only after the lag."""
        api.admin("PATCH", "config", json={"list_lag_seconds": 30})
        task_id = api.submit().json()["output"]["task_id"]
        assert api.http.get(f"/api/v1/tasks/{task_id}", headers=api.auth).status_code == 200
        assert api.http.get("/api/v1/tasks", headers=api.auth).json()["total"] == 0
        api.admin("POST", "clock", json={"advance": 31})
        assert api.http.get("/api/v1/tasks", headers=api.auth).json()["total"] == 1

    def test_truncated_video(self, api: Api) -> None:
        """truncate: the body ends at half the announced Content-Length, then the line drops."""
        task_id = api.submit().json()["output"]["task_id"]
        url = api.wait(task_id)["output"]["video_url"]
        size = len(api.http.get(url).content)
        api.admin("POST", "faults/next", json={"route": "video", "kind": "truncate"})
        received = bytearray()
        with pytest.raises(httpx.RemoteProtocolError), api.http.stream("GET", url) as r:
            assert int(r.headers["content-length"]) == size
            for chunk in r.iter_raw():
                received += chunk
        assert len(received) == size // 2

    def test_slow(self, api: Api) -> None:
        """A slow fault delays the answer by the given seconds."""
        api.admin("POST", "faults/next", json={"route": "query", "kind": "slow", "seconds": 0.6})
        started = time.monotonic()
        api.http.get("/api/v1/tasks/x", headers=api.auth)
        assert time.monotonic() - started >= 0.6

    def test_random_share_by_route(self, api: Api) -> None:
        """A share of 1.0 on one route fails every request there and nothing elsewhere."""
        api.admin("PUT", "faults", json={"rates": {"500": 1.0}, "routes": ["query"]})
        assert api.http.get("/api/v1/tasks/x", headers=api.auth).status_code == 500
        assert api.submit().status_code == 200

    def test_random_share_is_roughly_kept(self, api: Api) -> None:
        """A 30 % share of 503s with a seed fails about 30 % of queries."""
        api.admin("PATCH", "config", json={"query_rate": 0})
        api.admin("PUT", "faults", json={"rates": {"503": 0.3}, "routes": ["query"], "seed": 7})
        codes = [api.http.get("/api/v1/tasks/x", headers=api.auth).status_code for _ in range(200)]
        assert 40 <= codes.count(503) <= 80
        assert set(codes) == {200, 503}

    def test_task_fail_rate(self, api: Api) -> None:
        """task_fail_rate 1 makes every new task end FAILED with the configured code."""
        api.admin(
            "PUT", "faults", json={"task_fail_rate": 1.0, "task_fail_code": "InternalError.Timeout"}
        )
        out = api.wait(api.submit().json()["output"]["task_id"])
        assert out["output"]["task_status"] == "FAILED"
        assert out["output"]["code"] == "InternalError.Timeout"

    def test_bad_fault_config_is_refused(self, api: Api) -> None:
        """Nonsense fault settings get a 400 from the admin API."""
        r = api.http.put("/_emulator/faults", json={"rates": {"500": 2}})
        assert r.status_code == 400
        r = api.http.post("/_emulator/faults/next", json={"route": "nowhere", "kind": "500"})
        assert r.status_code == 400


class TestStats:
    def test_stats_count_per_account_and_model(self, api: Api) -> None:
        """Stats count submissions, queries, 429s and task statuses per account and model."""
        image, template = api.person(), api.template()
        task_id = api.submit(image, template).json()["output"]["task_id"]
        api.submit(image, template)  # 429
        api.wait(task_id)
        stats = api.stats()
        (account,) = stats["accounts"]
        assert api.key not in str(stats)  # keys never show, only account names
        gen2 = stats["accounts"][account]["animate-anyone-gen2"]
        assert gen2["submitted"] == 1
        assert gen2["throttled"] == 1
        assert gen2["queries"] >= 1
        assert gen2["tasks"] == {"SUCCEEDED": 1}


class TestConcurrentClients:
    def test_many_pollers(self, api: Api) -> None:
        """Parallel pollers all get answers while a video renders."""
        api.admin("PATCH", "config", json={"query_rate": 0})
        task_id = api.submit().json()["output"]["task_id"]
        results: list[int] = []

        def poll() -> None:
            with httpx.Client(base_url=api.server.url, timeout=10) as c:
                for _ in range(10):
                    results.append(c.get(f"/api/v1/tasks/{task_id}", headers=api.auth).status_code)

        threads = [threading.Thread(target=poll) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 50
