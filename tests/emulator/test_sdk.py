"""The official dashscope SDK (2.0.2) against the emulator: it must not tell the difference.

Everything DashScope-facing goes through the SDK; plain HTTP is used only for the emulator's admin
routes (config, seeded templates) and to download the output video, as a real client would.
"""

from __future__ import annotations

import io
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any

import av
import dashscope
import httpx
import pytest
from dashscope import VideoSynthesis
from dashscope.client.base_api import BaseApi, BaseAsyncApi
from dashscope.utils.oss_utils import OssUtils
from PIL import Image

from emulator.server import EmulatorServer

DETECT = "animate-anyone-detect-gen2"
TEMPLATE = "animate-anyone-template-gen2"
VIDEO = "animate-anyone-gen2"
BEIJING = timezone(timedelta(hours=8))
SUBMIT_GAP = 1.05  # the submit quota is 1 per second per (account, model)


# ------------------------------------------------------------------------------------- helpers


@pytest.fixture
def sdk(emulator: EmulatorServer, api_key: str, monkeypatch: pytest.MonkeyPatch) -> EmulatorServer:
    """The SDK pointed at the emulator with this test's key (the module attributes are restored)."""
    monkeypatch.setattr(dashscope, "base_http_api_url", emulator.base_url)
    monkeypatch.setattr(dashscope, "api_key", api_key)
    return emulator


def person_url(emulator: EmulatorServer, extra: str = "") -> str:
    url = f"{emulator.url}/_emulator/samples/person.png?width=512&height=1024"
    return f"{url}&{extra}" if extra else url


def dance_url(emulator: EmulatorServer, seconds: float = 3) -> str:
    return (
        f"{emulator.url}/_emulator/samples/dance.mp4?seconds={seconds}&fps=24&width=360&height=640"
    )


def seed_template(emulator: EmulatorServer, key: str, seconds: float = 3) -> str:
    """A ready template for ``key`` via the admin API (no template task)."""
    r = httpx.post(
        f"{emulator.url}/_emulator/templates", json={"api_key": key, "seconds": seconds}, timeout=10
    )
    r.raise_for_status()
    return str(r.json()["template_id"])


def sdk_template(emulator: EmulatorServer, api_key: str | None = None) -> str:
    """A template made through the SDK: template generation, then wait."""
    task = BaseAsyncApi.async_call(
        model=TEMPLATE,
        input={"video_url": dance_url(emulator)},
        task_group="aigc",
        task="image2video",
        function="aa-template-generation",
        api_key=api_key,
    )
    assert task.status_code == HTTPStatus.OK, (task.code, task.message)
    done = BaseAsyncApi.wait(task, api_key=api_key, wait_timeout=20)
    assert done.status_code == HTTPStatus.OK, (done.code, done.message)
    assert done.output["task_status"] == "SUCCEEDED", done.output
    return str(done.output["template_id"])


def submit_video(image_url: str, template_id: str, **kwargs: Any) -> Any:
    """The generic (clean body) video-synthesis submit."""
    params: dict[str, Any] = {"use_ref_img_bg": False, "video_ratio": "9:16"}
    params.update(kwargs)
    return BaseAsyncApi.async_call(
        model=VIDEO,
        input={"image_url": image_url, "template_id": template_id},
        task_group="aigc",
        task="image2video",
        function="video-synthesis",
        **params,
    )


def probe_video(url: str) -> dict[str, Any]:
    """Download an output video and decode it entirely with PyAV."""
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    with av.open(io.BytesIO(response.content)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return {
            "codec": stream.codec_context.name,
            "fps": float(stream.average_rate),
            "frames": frames,
            "duration": container.duration / av.time_base,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "audio": len(container.streams.audio),
        }


def beijing_stamp(moment: datetime) -> str:
    return moment.astimezone(BEIJING).strftime("%Y%m%d%H%M%S")


# --------------------------------------------------------------------------------------- detect


def test_detect_pass_fail_and_half(sdk: EmulatorServer) -> None:
    """BaseApi.call on aa-detect: a pass (full), a business failure with a reason, and half body."""
    ok = BaseApi.call(
        model=DETECT,
        input={"image_url": person_url(sdk)},
        task_group="aigc",
        task="image2video",
        function="aa-detect",
    )
    assert ok.status_code == HTTPStatus.OK, (ok.code, ok.message)
    assert ok.output["check_pass"] is True
    assert ok.output["bodystyle"] == "full"
    assert ok.usage["image_count"] == 1
    assert ok.request_id

    failed = BaseApi.call(
        model=DETECT,
        input={"image_url": person_url(sdk, "emulator_detect=no_human")},
        task_group="aigc",
        task="image2video",
        function="aa-detect",
    )
    assert failed.status_code == HTTPStatus.OK, (failed.code, failed.message)
    assert failed.output["check_pass"] is False
    assert failed.output["reason"]
    assert failed.output["bodystyle"] == ""
    assert failed.usage["image_count"] == 1

    half = BaseApi.call(
        model=DETECT,
        input={"image_url": person_url(sdk, "emulator_detect=half")},
        task_group="aigc",
        task="image2video",
        function="aa-detect",
    )
    assert half.status_code == HTTPStatus.OK, (half.code, half.message)
    assert half.output["check_pass"] is True
    assert half.output["bodystyle"] == "half"


# ------------------------------------------------------------------------------------- template


def test_template_generation(sdk: EmulatorServer) -> None:
    """Template generation via async_call + wait: SUCCEEDED, an AACT. id, about 3 s of usage."""
    task = BaseAsyncApi.async_call(
        model=TEMPLATE,
        input={"video_url": dance_url(sdk)},
        task_group="aigc",
        task="image2video",
        function="aa-template-generation",
    )
    assert task.status_code == HTTPStatus.OK, (task.code, task.message)
    assert task.output["task_status"] == "PENDING"
    task_id = task.output["task_id"]
    assert uuid.UUID(task_id)

    done = BaseAsyncApi.wait(task, wait_timeout=20)
    assert done.status_code == HTTPStatus.OK, (done.code, done.message)
    assert done.output["task_id"] == task_id
    assert done.output["task_status"] == "SUCCEEDED"
    assert done.output["template_id"].startswith("AACT.")
    assert done.usage["video_duration"] == pytest.approx(3.0, abs=0.05)
    assert done.usage["video_ratio"] == "standard"
    for field in ("submit_time", "scheduled_time", "end_time"):
        datetime.strptime(done.output[field], "%Y-%m-%d %H:%M:%S.%f")


# ---------------------------------------------------------------------------------------- video


def test_video_generic_and_decoded_output(sdk: EmulatorServer) -> None:
    """Generic video-synthesis on an SDK-made template; the MP4 is H.264, 15 fps, usage-long."""
    template_id = sdk_template(sdk)
    task = submit_video(person_url(sdk), template_id, use_ref_img_bg=False, video_ratio="9:16")
    assert task.status_code == HTTPStatus.OK, (task.code, task.message)
    assert task.output["task_status"] == "PENDING"

    done = BaseAsyncApi.wait(task, wait_timeout=20)
    assert done.status_code == HTTPStatus.OK, (done.code, done.message)
    assert done.output["task_status"] == "SUCCEEDED", done.output
    assert done.output["video_url"]
    duration = done.usage["video_duration"]
    assert duration == pytest.approx(3.0, abs=0.1)

    video = probe_video(done.output["video_url"])
    assert video["codec"] == "h264"
    assert video["fps"] == pytest.approx(15)
    assert video["frames"] / 15 == pytest.approx(duration, abs=1 / 15)
    assert video["duration"] == pytest.approx(duration, abs=0.1)
    assert video["audio"] == 0
    # use_ref_img_bg=False follows the template video's ratio (360x640 = 9:16)
    assert video["width"] / video["height"] == pytest.approx(9 / 16, abs=0.02)


def test_video_typed_video_synthesis(sdk: EmulatorServer) -> None:
    """VideoSynthesis.async_call/wait (polluted input keys) succeeds; 3:4 with use_ref_img_bg."""
    template_id = sdk_template(sdk)
    task = VideoSynthesis.async_call(
        model=VIDEO,
        task="image2video",
        extra_input={"image_url": person_url(sdk), "template_id": template_id},
        use_ref_img_bg=True,
        video_ratio="3:4",
    )
    assert task.status_code == HTTPStatus.OK, (task.code, task.message)
    assert task.output.task_id

    done = VideoSynthesis.wait(task, wait_timeout=20)
    assert done.status_code == HTTPStatus.OK, (done.code, done.message)
    assert done.output.task_status == "SUCCEEDED"
    assert done.output.video_url
    assert done.usage.video_duration > 0

    video = probe_video(done.output.video_url)
    assert video["width"] / video["height"] == pytest.approx(0.75, abs=0.02)


# -------------------------------------------------------------------------- fetch/cancel/list


def test_fetch_cancel_and_list_queue(sdk: EmulatorServer, api_key: str) -> None:
    """fetch shows live status; cancel works on PENDING only (400 UnsupportedOperation otherwise)."""
    original = httpx.get(f"{sdk.url}/_emulator/config", timeout=10).json()["generation_seconds"]
    httpx.patch(
        f"{sdk.url}/_emulator/config", json={"generation_seconds": 30}, timeout=10
    ).raise_for_status()
    try:
        template_id = seed_template(sdk, api_key)
        first = submit_video(person_url(sdk), template_id)
        assert first.status_code == HTTPStatus.OK, (first.code, first.message)
        time.sleep(SUBMIT_GAP)
        second = submit_video(person_url(sdk), template_id)
        assert second.status_code == HTTPStatus.OK, (second.code, second.message)
        first_id, second_id = first.output["task_id"], second.output["task_id"]

        running = BaseAsyncApi.fetch(first)
        assert running.status_code == HTTPStatus.OK
        assert running.output["task_id"] == first_id
        assert running.output["task_status"] in ("PRE-PROCESSING", "RUNNING")
        assert "scheduled_time" in running.output
        pending = BaseAsyncApi.fetch(second_id)
        assert pending.status_code == HTTPStatus.OK
        assert pending.output["task_status"] == "PENDING"

        canceled = BaseAsyncApi.cancel(second_id)
        assert canceled.status_code == HTTPStatus.OK, (canceled.code, canceled.message)
        assert canceled.request_id
        after = BaseAsyncApi.fetch(second_id)
        assert after.output["task_status"] == "CANCELED"
        # wait() treats CANCELED as final and returns at once
        assert BaseAsyncApi.wait(second_id, wait_timeout=5).output["task_status"] == "CANCELED"

        refused = BaseAsyncApi.cancel(first_id)
        assert refused.status_code == HTTPStatus.BAD_REQUEST
        assert refused.code == "UnsupportedOperation"
        assert refused.message
        again = BaseAsyncApi.cancel(second_id)
        assert again.status_code == HTTPStatus.BAD_REQUEST
        assert again.code == "UnsupportedOperation"

        listed = BaseAsyncApi.list(model_name=VIDEO, page_no=1, page_size=10)
        assert listed.status_code == HTTPStatus.OK, (listed.code, listed.message)
        statuses = {row["task_id"]: row["status"] for row in listed.output["data"]}
        assert listed.output["total"] == 2
        assert statuses[second_id] == "CANCELED"
        assert statuses[first_id] in ("PRE-PROCESSING", "RUNNING")
    finally:
        httpx.patch(
            f"{sdk.url}/_emulator/config", json={"generation_seconds": original}, timeout=10
        ).raise_for_status()


def test_list_filters_and_time_window(sdk: EmulatorServer) -> None:
    """BaseAsyncApi.list by model, status, page and a Beijing-time window; gmt_create in epoch ms."""
    before = time.time()
    template_id = sdk_template(sdk)
    task = submit_video(person_url(sdk), template_id)
    assert task.status_code == HTTPStatus.OK, (task.code, task.message)
    video_id = task.output["task_id"]
    done = BaseAsyncApi.wait(task, wait_timeout=20)
    assert done.output["task_status"] == "SUCCEEDED"
    after = time.time()

    by_model = BaseAsyncApi.list(model_name=VIDEO, page_no=1, page_size=10)
    assert by_model.status_code == HTTPStatus.OK, (by_model.code, by_model.message)
    assert by_model.output["total"] == 1
    [row] = by_model.output["data"]
    assert row["task_id"] == video_id
    assert row["model_name"] == VIDEO
    assert row["status"] == "SUCCEEDED"
    assert isinstance(row["gmt_create"], int)
    assert before * 1000 - 1000 <= row["gmt_create"] <= after * 1000 + 1000
    assert row["gmt_create"] <= row["start_time"] <= row["end_time"]

    succeeded = BaseAsyncApi.list(model_name=VIDEO, status="SUCCEEDED", page_no=1, page_size=10)
    assert succeeded.status_code == HTTPStatus.OK
    assert [r["task_id"] for r in succeeded.output["data"]] == [video_id]
    failed = BaseAsyncApi.list(model_name=VIDEO, status="FAILED", page_no=1, page_size=10)
    assert failed.status_code == HTTPStatus.OK
    assert failed.output["total"] == 0
    assert failed.output["data"] == []

    # Both models, one row a page.
    paged = BaseAsyncApi.list(page_no=1, page_size=1)
    assert paged.status_code == HTTPStatus.OK
    assert paged.output["total"] == 2
    assert len(paged.output["data"]) == 1
    assert paged.output["total_page"] == 2

    # start_time/end_time are Beijing wall-clock: a +-10 min window around now holds both tasks
    # (read as UTC it would be 8 hours off and hold none).
    now = datetime.now(UTC)
    window = BaseAsyncApi.list(
        start_time=beijing_stamp(now - timedelta(minutes=10)),
        end_time=beijing_stamp(now + timedelta(minutes=10)),
        page_no=1,
        page_size=10,
    )
    assert window.status_code == HTTPStatus.OK, (window.code, window.message)
    assert window.output["total"] == 2
    assert video_id in {r["task_id"] for r in window.output["data"]}
    yesterday = BaseAsyncApi.list(
        start_time=beijing_stamp(now - timedelta(hours=20)),
        end_time=beijing_stamp(now - timedelta(hours=10)),
        model_name=VIDEO,
        page_no=1,
        page_size=10,
    )
    assert yesterday.status_code == HTTPStatus.OK
    assert yesterday.output["total"] == 0


# --------------------------------------------------------------------------------------- uploads


def test_oss_upload_and_resolution(sdk: EmulatorServer, api_key: str, tmp_path: Path) -> None:
    """OssUtils.upload gives an oss:// URL usable only with the resolve header and the same account."""
    path = tmp_path / "person.png"
    Image.new("RGB", (400, 800), (200, 180, 160)).save(path)
    oss_url, certificate = OssUtils.upload(model=VIDEO, file_path=str(path), api_key=api_key)
    assert oss_url.startswith("oss://dashscope-instant/")
    assert oss_url.endswith("/person.png")
    assert certificate["upload_dir"] in oss_url
    resolve = {"X-DashScope-OssResourceResolve": "enable"}
    template_id = seed_template(sdk, api_key)

    missing_header = submit_video(oss_url, template_id)
    assert missing_header.status_code == HTTPStatus.BAD_REQUEST
    assert missing_header.code.startswith("InvalidURL"), missing_header.code

    other_key = f"sk-test-{uuid.uuid4().hex[:12]}"
    foreign = BaseAsyncApi.async_call(
        model=VIDEO,
        input={"image_url": oss_url, "template_id": seed_template(sdk, other_key)},
        task_group="aigc",
        task="image2video",
        function="video-synthesis",
        api_key=other_key,
        headers=resolve,
    )
    assert foreign.status_code == HTTPStatus.BAD_REQUEST
    assert foreign.code.startswith("InvalidURL"), foreign.code

    task = submit_video(oss_url, template_id, headers=resolve)
    assert task.status_code == HTTPStatus.OK, (task.code, task.message)
    done = BaseAsyncApi.wait(task, wait_timeout=20)
    assert done.status_code == HTTPStatus.OK
    assert done.output["task_status"] == "SUCCEEDED", done.output
    assert httpx.get(done.output["video_url"], timeout=30).status_code == 200


# ---------------------------------------------------------------------------------------- errors


def test_error_shapes(sdk: EmulatorServer, api_key: str) -> None:
    """Bad ratio and a foreign template are HTTP 400s; a failed task is a 200 with FAILED."""
    template_id = seed_template(sdk, api_key)

    ratio = submit_video(person_url(sdk), template_id, use_ref_img_bg=True, video_ratio="1:1")
    assert ratio.status_code == HTTPStatus.BAD_REQUEST
    assert ratio.code == "InvalidParameter"
    assert ratio.message == "parameters.video_ratio must be 9:16 or 3:4."
    assert ratio.request_id

    typed = VideoSynthesis.async_call(
        model=VIDEO,
        task="image2video",
        extra_input={"image_url": person_url(sdk), "template_id": template_id},
        use_ref_img_bg=True,
        video_ratio="1:1",
    )
    assert typed.status_code == HTTPStatus.BAD_REQUEST
    assert typed.code == "InvalidParameter"

    foreign_template = seed_template(sdk, f"sk-test-{uuid.uuid4().hex[:12]}")
    foreign = submit_video(person_url(sdk), foreign_template)
    assert foreign.status_code == HTTPStatus.BAD_REQUEST
    assert foreign.code == "InvalidFile.Template.Content"
    assert foreign.message

    task = submit_video(person_url(sdk, "emulator_fail=InternalError.Algo"), template_id)
    assert task.status_code == HTTPStatus.OK, (task.code, task.message)
    done = BaseAsyncApi.wait(task, wait_timeout=20)
    assert done.status_code == HTTPStatus.OK
    assert done.code is None
    assert done.output["task_status"] == "FAILED"
    assert done.output["code"] == "InternalError.Algo"
    assert done.output["message"]
    assert "video_url" not in done.output
