"""The emulator's Wan2.2-Animate models (move, mix) over real HTTP: one call with the image, the
reference video and a mode; the documented limits (2-30 s, WEBP allowed, 200 px at least); the
5-per-second submit quota and one running task per account and model; the video under
``output.results.video_url`` with the billed seconds in ``usage``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from emulator.server import EmulatorServer

SUBMIT = "/api/v1/services/aigc/image2video/video-synthesis"


class Wan:
    def __init__(self, server: EmulatorServer, key: str, model: str) -> None:
        self.server, self.key, self.model = server, key, model
        self.http = httpx.Client(base_url=server.url, timeout=30)
        self.auth = {"Authorization": f"Bearer {key}"}

    def image(self, width: int = 256, height: int = 512) -> str:
        return f"{self.server.url}/_emulator/samples/person.png?width={width}&height={height}"

    def video(self, seconds: float = 2.5) -> str:
        return (
            f"{self.server.url}/_emulator/samples/dance.mp4?seconds={seconds}&width=360&height=640"
        )

    def submit(self, *, parameters: Any = None, **inputs: Any) -> httpx.Response:
        body = {
            "model": self.model,
            "input": {"image_url": self.image(), "video_url": self.video(), **inputs},
            "parameters": {"mode": "wan-std"} if parameters is None else parameters,
        }
        body["input"] = {k: v for k, v in body["input"].items() if v is not None}
        headers = {**self.auth, "X-DashScope-Async": "enable"}
        return self.http.post(SUBMIT, json=body, headers=headers)

    def task(self, task_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/api/v1/tasks/{task_id}", headers=self.auth).json())

    def config(self, **changes: Any) -> None:
        self.http.patch("/_emulator/config", json=changes).raise_for_status()


@pytest.fixture(params=["wan2.2-animate-move", "wan2.2-animate-mix"])
def wan(request: pytest.FixtureRequest, emulator: EmulatorServer, api_key: str) -> Iterator[Wan]:
    client = Wan(emulator, api_key, str(request.param))
    yield client
    client.http.close()


def wait_final(wan: Wan, task_id: str, budget: float = 30) -> dict[str, Any]:
    end = time.monotonic() + budget
    while time.monotonic() < end:
        body = wan.task(task_id)
        if body["output"]["task_status"] in ("SUCCEEDED", "FAILED", "CANCELED"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never ended")


def test_a_task_ends_with_its_video_under_results_and_the_billed_seconds(wan: Wan) -> None:
    r = wan.submit(parameters={"mode": "wan-pro", "check_image": True})
    assert r.status_code == 200, r.text
    task_id = r.json()["output"]["task_id"]
    body = wait_final(wan, task_id)
    output = body["output"]
    assert output["task_status"] == "SUCCEEDED"
    assert "video_url" not in output
    video = httpx.get(output["results"]["video_url"], timeout=30)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    assert body["usage"]["video_duration"] == pytest.approx(2.5, abs=0.3)
    assert body["usage"]["video_ratio"] == "pro"


@pytest.mark.parametrize(
    ("inputs", "parameters", "code", "words"),
    [
        ({"video_url": None}, None, "InvalidParameter", "input.video_url"),
        ({}, {}, "InvalidParameter", "parameters.mode"),
        ({}, {"mode": "wan-max"}, "InvalidParameter", "parameters.mode"),
        ({"template_id": "AACT.x"}, None, "InvalidParameter", "template_id"),
        ({"video_url": "long"}, None, "InvalidFile.Duration", "2 s ~ 30 s"),
        ({"image_url": "small"}, None, "InvalidFile.ImageSize", "beyond limit"),
    ],
)
def test_what_the_model_refuses(
    wan: Wan, inputs: dict[str, Any], parameters: Any, code: str, words: str
) -> None:
    inputs = dict(inputs)
    if inputs.get("video_url") == "long":
        inputs["video_url"] = wan.video(31)
    if inputs.get("image_url") == "small":
        inputs["image_url"] = wan.image(150, 300)
    r = wan.submit(parameters=parameters, **inputs)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == code and words in r.json()["message"], r.json()


def test_webp_images_and_a_one_to_three_aspect_are_taken(wan: Wan) -> None:
    r = wan.submit(image_url=wan.image(256, 768))  # 1:3: AnimateAnyone stops at 1:2
    assert r.status_code == 200, r.text


def test_five_submits_a_second_then_429(wan: Wan) -> None:
    codes = [wan.submit().status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and 429 in codes[5:], codes


def test_one_task_runs_at_a_time_per_account_and_model(wan: Wan) -> None:
    wan.config(generation_seconds=1.0, wan_submit_rate=0)
    first = wan.submit().json()["output"]["task_id"]
    second = wan.submit().json()["output"]["task_id"]
    time.sleep(0.3)
    assert wan.task(first)["output"]["task_status"] in ("PRE-PROCESSING", "RUNNING")
    assert wan.task(second)["output"]["task_status"] == "PENDING"
    assert wait_final(wan, second)["output"]["task_status"] == "SUCCEEDED"


def test_a_key_of_another_region_is_refused_and_never_shown(wan: Wan) -> None:
    """A DashScope host serves one region; a key made in another region gets 401 InvalidApiKey.
    The admin view names the key's account, never the key."""
    wan.config(region="ap-southeast-1", key_regions={wan.key: "cn-beijing"})
    r = wan.submit()
    assert r.status_code == 401 and r.json()["code"] == "InvalidApiKey"
    view = wan.http.get("/_emulator/config").json()
    assert wan.key not in str(view) and list(view["key_regions"].values()) == ["cn-beijing"]
    wan.config(region="cn-beijing")
    assert wan.submit().status_code == 200
