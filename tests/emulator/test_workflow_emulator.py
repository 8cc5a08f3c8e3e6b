"""The detect/template/upload workflow against the emulator over HTTP, through DashScopeClient.

Temporary uploads (``DashScopeClient.upload`` then ``oss://`` inputs), template revocation through
the admin API, the content triggers carried inside uploaded files (a PNG text chunk, a video
``comment`` tag) and the stats counters that workers' tests read.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, PngImagePlugin

from emulator import media
from emulator.server import EmulatorServer
from workers.adapters.dashscope.client import (
    DashScopeClient,
    RemoteStatus,
    RemoteTask,
    VideoRequest,
)
from workers.errors import DashScopeRejected
from workers.models import ANIMATE_ANYONE_GEN2 as AA

DETECT = "animate-anyone-detect-gen2"
TEMPLATE = "animate-anyone-template-gen2"
VIDEO = "animate-anyone-gen2"
FINAL = {RemoteStatus.SUCCEEDED, RemoteStatus.FAILED, RemoteStatus.CANCELED, RemoteStatus.UNKNOWN}
NO_HUMAN = "The input image has no human body. Please upload other image with single person."


@pytest.fixture
def http(emulator: EmulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.url, timeout=30) as client:
        yield client


@pytest.fixture
def client(http: httpx.Client, emulator: EmulatorServer, api_key: str) -> DashScopeClient:
    return DashScopeClient(http, api_key=api_key, base_url=emulator.base_url)


@pytest.fixture
def account(emulator: EmulatorServer, api_key: str) -> str:
    name = emulator.emulator.config.account_for(api_key)
    assert name is not None
    return name


def person_png(**text: str) -> bytes:
    """The emulator's sample person, re-saved with PNG text chunks (the content triggers)."""
    chunks = PngImagePlugin.PngInfo()
    for key, value in text.items():
        chunks.add_text(key, value)
    with Image.open(io.BytesIO(media.sample_person_png(400, 800))) as image:
        out = io.BytesIO()
        image.save(out, format="PNG", pnginfo=chunks)
    return out.getvalue()


def dance_mp4(tmp_path: Path, comment: str | None = None) -> bytes:
    """A 2 s, 24 fps, 360x640 H.264 MP4 that passes the template rules, with a ``comment`` tag."""
    path = tmp_path / "dance.mp4"
    media.sample_dance_mp4(path, seconds=2, fps=24, width=360, height=640, comment=comment)
    return path.read_bytes()


def counters(http: httpx.Client, account: str, model: str) -> dict[str, Any]:
    stats = http.get("/_emulator/stats").raise_for_status().json()
    return dict(stats["accounts"].get(account, {}).get(model, {}))


def totals(http: httpx.Client) -> dict[str, Any]:
    return dict(http.get("/_emulator/stats").raise_for_status().json()["totals"])


def seed_template(http: httpx.Client, api_key: str) -> str:
    seeded = http.post("/_emulator/templates", json={"api_key": api_key, "seconds": 2})
    return str(seeded.raise_for_status().json()["template_id"])


def wait_for(client: DashScopeClient, task_id: str, timeout: float = 20) -> RemoteTask:
    deadline = time.monotonic() + timeout
    while True:
        got = client.get_task(task_id)
        if got.status in FINAL:
            return got
        assert time.monotonic() < deadline, f"task {task_id} still {got.raw_status}"
        time.sleep(0.05)


def make_template(client: DashScopeClient, video_url: str) -> RemoteTask:
    submitted = client.submit_async(AA.remote("template"), {"video_url": video_url})
    return wait_for(client, submitted.task_id)


# ------------------------------------------------------------------------------------- uploads


def test_upload_then_detect_by_oss_url(
    client: DashScopeClient, emulator: EmulatorServer, http: httpx.Client, account: str
) -> None:
    """An uploaded PNG resolves for aa-detect; the client adds the resolve header by itself."""
    data = person_png()
    url = client.upload(DETECT, "person.png", data)
    assert url.startswith(f"oss://dashscope-instant/{account}/")
    assert url.endswith("/person.png")

    stored = emulator.emulator.uploads.files[url.removeprefix("oss://")]
    assert (stored.data, stored.content_type, stored.model) == (data, "image/png", DETECT)

    assert client.detect(url) == {"check_pass": True, "bodystyle": "full"}
    detect = counters(http, account, DETECT)
    assert (detect["policies"], detect["uploads"], detect["detections"]) == (1, 1, 1)
    assert detect.get("detections_failed", 0) == 0


def test_upload_is_bound_to_its_model(
    client: DashScopeClient, http: httpx.Client, api_key: str, account: str
) -> None:
    """A file uploaded for one model is an invalid URL to another: nothing is submitted or paid."""
    for_detect = client.upload(DETECT, "person.png", person_png())
    with pytest.raises(DashScopeRejected) as caught:
        client.submit_video(VideoRequest(for_detect, seed_template(http, api_key)))
    assert caught.value.code == "InvalidURL"
    assert caught.value.status == 400

    for_video = client.upload(VIDEO, "person.png", person_png())
    with pytest.raises(DashScopeRejected) as caught:
        client.detect(for_video)
    assert caught.value.code == "InvalidURL"

    assert counters(http, account, VIDEO).get("video_submissions", 0) == 0
    assert counters(http, account, DETECT).get("detections", 0) == 0
    assert counters(http, account, VIDEO)["uploads"] == 1


def test_upload_over_the_model_cap_is_refused_locally(
    client: DashScopeClient, http: httpx.Client, account: str
) -> None:
    """The detect model's policy allows 10 MB: a larger file is never posted."""
    with pytest.raises(DashScopeRejected) as caught:
        client.upload(DETECT, "huge.png", b"\0" * (10 * 1024 * 1024 + 1))
    assert caught.value.code == "InvalidFile.Size"
    detect = counters(http, account, DETECT)
    assert detect["policies"] == 1
    assert detect.get("uploads", 0) == 0


# ---------------------------------------------------------------------------------- revocation


def test_revoked_template_is_refused_like_a_foreign_one(
    client: DashScopeClient, emulator: EmulatorServer, http: httpx.Client, account: str
) -> None:
    """A generated template works, is revoked, then fails at submit; nothing more is paid."""
    template = make_template(client, f"{emulator.url}/_emulator/samples/dance.mp4?seconds=2")
    assert template.status is RemoteStatus.SUCCEEDED, template
    assert template.template_id is not None
    person = f"{emulator.url}/_emulator/samples/person.png"
    client.submit_video(VideoRequest(person, template.template_id))

    listed = http.get("/_emulator/templates").raise_for_status().json()
    assert listed == [
        {
            "template_id": template.template_id,
            "account": account,
            "seconds": 2.0,
            "width": 360,
            "height": 640,
            "task_id": template.task_id,
            "revoked": False,
        }
    ]

    revoked = http.delete(f"/_emulator/templates/{template.template_id}")
    assert revoked.status_code == 200
    assert revoked.json()["revoked"] is True
    assert http.get("/_emulator/templates").json()[0]["revoked"] is True

    with pytest.raises(DashScopeRejected) as caught:
        client.submit_video(VideoRequest(person, template.template_id))
    assert (caught.value.code, caught.value.status) == ("InvalidFile.Template.Content", 400)

    foreign = seed_template(http, "sk-test-someone-else")
    with pytest.raises(DashScopeRejected) as other:
        client.submit_video(VideoRequest(person, foreign))
    assert other.value.code == caught.value.code

    def without_request_id(message: str) -> str:
        return message.split(" (request_id")[0]

    assert without_request_id(other.value.message) == without_request_id(caught.value.message)

    video = counters(http, account, VIDEO)
    assert (video["video_submissions"], video["submitted"]) == (1, 1)
    assert counters(http, account, TEMPLATE)["template_submissions"] == 1
    assert totals(http)["template_submissions"] == 1
    assert totals(http)["video_submissions"] == 1


def test_revoking_an_unknown_template_is_404(http: httpx.Client) -> None:
    answer = http.delete("/_emulator/templates/AACT.nobody.0000")
    assert answer.status_code == 404
    assert answer.json() == {"error": "no such template"}


def test_revoked_seeded_template_and_reset(
    client: DashScopeClient, emulator: EmulatorServer, http: httpx.Client, api_key: str
) -> None:
    """Seeded templates revoke too; a reset forgets every template."""
    template_id = seed_template(http, api_key)
    http.delete(f"/_emulator/templates/{template_id}").raise_for_status()
    (row,) = http.get("/_emulator/templates").json()
    assert (row["task_id"], row["revoked"]) == (None, True)
    with pytest.raises(DashScopeRejected) as caught:
        client.submit_video(
            VideoRequest(f"{emulator.url}/_emulator/samples/person.png", template_id)
        )
    assert caught.value.code == "InvalidFile.Template.Content"
    http.post("/_emulator/reset").raise_for_status()
    assert http.get("/_emulator/templates").json() == []


# ------------------------------------------------------------------------------ content triggers


def test_probes_read_the_triggers(tmp_path: Path) -> None:
    """probe_image gives PNG text chunks (only strings, only PNG); probe_video the comment tag."""
    tagged = media.probe_image(person_png(emulator_detect="half", note="x"))
    assert tagged.text == {"emulator_detect": "half", "note": "x"}
    assert media.probe_image(media.sample_person_png(200, 300)).text == {}
    jpeg = io.BytesIO()
    Image.new("RGB", (200, 300)).save(jpeg, format="JPEG", comment=b"emulator_detect=half")
    assert media.probe_image(jpeg.getvalue()).text == {}

    path = tmp_path / "tagged.mp4"
    media.sample_dance_mp4(path, seconds=2, comment="emulator_fail=InvalidFile.Content")
    assert media.probe_video(path).comment == "emulator_fail=InvalidFile.Content"
    media.sample_dance_mp4(path, seconds=2)
    assert media.probe_video(path).comment is None


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        ("no_human", {"check_pass": False, "reason": NO_HUMAN, "bodystyle": ""}),
        ("half", {"check_pass": True, "bodystyle": "half"}),
        ("full", {"check_pass": True, "bodystyle": "full"}),
    ],
)
def test_png_text_chunk_decides_detection(
    client: DashScopeClient,
    http: httpx.Client,
    account: str,
    chunk: str,
    expected: dict[str, Any],
) -> None:
    """An uploaded PNG's ``emulator_detect`` text chunk sets the detection result."""
    url = client.upload(DETECT, "person.png", person_png(emulator_detect=chunk))
    assert client.detect(url) == expected
    detect = counters(http, account, DETECT)
    assert detect["detections"] == 1
    assert detect.get("detections_failed", 0) == (0 if expected["check_pass"] else 1)


def test_multi_human_chunk_and_query_trigger_precedence(
    client: DashScopeClient, emulator: EmulatorServer, http: httpx.Client, account: str
) -> None:
    """multi_human works from a chunk; a URL query trigger, when present, wins over the chunk."""
    multi = client.upload(DETECT, "group.png", person_png(emulator_detect="multi_human"))
    result = client.detect(multi)
    assert result["check_pass"] is False
    assert "multi human bodies" in result["reason"]

    hosted = http.put(
        "/_emulator/files/no-human.png",
        content=person_png(emulator_detect="no_human"),
        headers={"Content-Type": "image/png"},
    )
    url = hosted.raise_for_status().json()["url"]
    assert client.detect(url)["check_pass"] is False
    assert client.detect(f"{url}?emulator_detect=half") == {"check_pass": True, "bodystyle": "half"}
    detect = counters(http, account, DETECT)
    assert (detect["detections"], detect["detections_failed"]) == (3, 2)


def test_failed_detection_then_nothing_paid(
    client: DashScopeClient, http: httpx.Client, account: str
) -> None:
    """The stats a worker test reads after a failed detection: one failed detection, no video."""
    url = client.upload(DETECT, "person.png", person_png(emulator_detect="no_human"))
    assert client.detect(url)["check_pass"] is False
    assert counters(http, account, DETECT)["detections_failed"] == 1
    assert totals(http).get("video_submissions", 0) == 0
    assert totals(http).get("template_submissions", 0) == 0


def test_video_comment_fails_the_template_task(
    client: DashScopeClient, http: httpx.Client, account: str, tmp_path: Path
) -> None:
    """An uploaded template video tagged ``comment=emulator_fail=CODE`` ends FAILED with CODE."""
    data = dance_mp4(tmp_path, comment="emulator_fail=InvalidFile.Content")
    url = client.upload(TEMPLATE, "dance.mp4", data)
    done = make_template(client, url)
    assert done.status is RemoteStatus.FAILED, done
    assert done.code == "InvalidFile.Content"
    assert done.message
    assert done.template_id is None

    # The failed task's template exists in the white-box list but can never be used.
    (row,) = http.get("/_emulator/templates").json()
    assert row["task_id"] == done.task_id
    with pytest.raises(DashScopeRejected) as caught:
        client.submit_video(VideoRequest("https://img.test/person.png", row["template_id"]))
    assert caught.value.code == "InvalidFile.Template.Content"
    assert counters(http, account, TEMPLATE)["template_submissions"] == 1
    assert counters(http, account, TEMPLATE)["tasks"] == {"FAILED": 1}


def test_video_without_comment_succeeds(
    client: DashScopeClient, http: httpx.Client, account: str, tmp_path: Path
) -> None:
    """The same upload path without the tag gives a usable template (the trigger is the cause)."""
    done = make_template(client, client.upload(TEMPLATE, "dance.mp4", dance_mp4(tmp_path)))
    assert done.status is RemoteStatus.SUCCEEDED, done
    assert done.template_id is not None
    assert done.video_duration == 2.0


def test_png_text_fails_a_generation(
    client: DashScopeClient, http: httpx.Client, api_key: str, account: str
) -> None:
    """An uploaded person image with an ``emulator_fail`` chunk makes the generation FAILED."""
    url = client.upload(VIDEO, "person.png", person_png(emulator_fail="InternalError.Algo"))
    submitted = client.submit_video(VideoRequest(url, seed_template(http, api_key)))
    done = wait_for(client, submitted.task_id)
    assert done.status is RemoteStatus.FAILED, done
    assert done.code == "InternalError.Algo"
    assert done.video_url is None
    assert counters(http, account, VIDEO)["video_submissions"] == 1
