"""The whole AnimateAnyone workflow with real processes: local files -> our bucket -> image check
-> action template (made, reused, or made again) -> video -> S3, against the emulator over HTTP.

One worker runs here with two DashScope accounts on its own redis-server; a second one, started
only by the oss:// test, hands inputs to DashScope through its temporary storage instead of
presigned URLs.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import RedisServer, S3Server, Worker
from devstack.media import make_image, make_video
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from workers.adapters.s3.inputs import S3Inputs
from workers.producer import AnimateQueue

pytestmark = pytest.mark.timeout(180)

KEYS = {"main": "sk-workflow-main-000001", "other": "sk-workflow-other-00002"}
ACCOUNTS = {name: EmulatorConfig().account_for(key) for name, key in KEYS.items()}
TEMPLATE_MODEL = "animate-anyone-template-gen2"
VIDEO_MODEL = "animate-anyone-gen2"
DETECT_MODEL = "animate-anyone-detect-gen2"
_heights = itertools.count(640, 16)


def workflow_env(worker_env: dict[str, str], redis_url: str, **extra: str) -> dict[str, str]:
    return {
        **worker_env,
        "REDIS_URL": redis_url,
        "DASHSCOPE_API_KEY": "",
        "DASHSCOPE_ACCOUNTS": json.dumps(KEYS),
        "DASHSCOPE_DEFAULT_ACCOUNT": "main",
        **extra,
    }


@pytest.fixture(scope="module")
def wf_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def wf_worker(wf_redis: RedisServer, worker_env: dict[str, str]) -> Iterator[Worker]:
    w = Worker(workflow_env(worker_env, wf_redis.url), concurrency=3, name="workflow@%h")
    w.start()
    yield w
    w.stop()


def producer(redis_url: str, s3_server: S3Server, bucket: str) -> AnimateQueue:
    return AnimateQueue(redis_url, inputs=S3Inputs(s3_server.client(), bucket, "inputs/"))


@pytest.fixture
def wq(
    wf_redis: RedisServer, wf_worker: Worker, s3_server: S3Server, remote: Any
) -> Iterator[AnimateQueue]:
    q = producer(wf_redis.url, s3_server, remote.bucket)
    yield q
    q.close()


class Stats:
    """The emulator's counters: what was billed, per account and model."""

    def __init__(self, server: EmulatorServer) -> None:
        self.http = httpx.Client(base_url=server.url, timeout=10)

    def count(self, model: str, name: str, account: str | None = None) -> int:
        accounts = self.http.get("/_emulator/stats").json()["accounts"]
        total = 0
        for acct, models in accounts.items():
            if account is None or acct == ACCOUNTS[account]:
                total += int(models.get(model, {}).get(name, 0))
        return total

    def templates(self) -> list[dict[str, Any]]:
        return list(self.http.get("/_emulator/templates").json()["templates"])


@pytest.fixture
def stats(emulator: EmulatorServer) -> Iterator[Stats]:
    s = Stats(emulator)
    yield s
    s.http.close()


@pytest.fixture
def dance(tmp_path: Path) -> Path:
    """A dance clip of its own (a content hash no other test shares)."""
    return make_video(tmp_path / "dance.mp4", width=360, height=next(_heights), fps=24, seconds=2.5)


@pytest.fixture
def person(tmp_path: Path) -> Path:
    return make_image(tmp_path / "person.png", width=512, height=768)


def states(q: AnimateQueue, job_id: str) -> list[str]:
    return [e["to"] for e in q.timeline(job_id) if "to" in e]


def dedupe(seq: list[str]) -> list[str]:
    return [s for i, s in enumerate(seq) if i == 0 or seq[i - 1] != s]


def test_full_chain_from_local_files(
    wq: AnimateQueue, stats: Stats, dance: Path, person: Path, s3_server: S3Server, remote: Any
) -> None:
    """Local image and dance video: uploaded once, checked, a template made, the video stored."""
    job_id = wq.generate(person, video=dance, job_id="wf-full")
    view = wq.wait(job_id, timeout=90)
    assert view["state"] == "STORED", view
    assert view["request"]["image_url"].startswith(f"s3://{remote.bucket}/inputs/")
    assert view["request"]["video_url"].startswith(f"s3://{remote.bucket}/inputs/")
    assert view["detection"]["bodystyle"] == "full" and not view["detection"]["cached"]
    assert view["template_id"].startswith("AACT.") and not view["template_reused"]
    assert dedupe(states(wq, job_id)) == [
        "RECEIVED", "DETECTING", "PREPARING", "QUEUED", "SUBMITTING", "SUBMITTED", "COPYING",
        "STORED",
    ]  # fmt: skip
    maker = wq.get(view["template_job_id"])
    assert maker is not None
    assert (maker["kind"], maker["state"], maker["template_id"]) == (
        "template", "READY", view["template_id"])  # fmt: skip
    assert maker["source_video"]["seconds"] == pytest.approx(2.5, abs=0.05)
    assert stats.count(TEMPLATE_MODEL, "template_submissions") == 1
    assert stats.count(VIDEO_MODEL, "video_submissions") == 1
    assert stats.count(DETECT_MODEL, "detections") == 1
    body = s3_server.client().get_object(Bucket=remote.bucket, Key=view["s3_key"])["Body"].read()
    assert len(body) == view["bytes"] > 0
    (known,) = [t for t in wq.templates("main") if t["template_id"] == view["template_id"]]
    assert known["source_sha256"] == maker["source_video"]["sha256"]


def test_same_dance_again_reuses_the_template(
    wq: AnimateQueue, stats: Stats, dance: Path, person: Path
) -> None:
    """The second job for the same dance makes no template and checks the image no more."""
    first = wq.wait(wq.generate(person, video=dance), timeout=90)
    assert first["state"] == "STORED", first
    templates, detections = (stats.count(TEMPLATE_MODEL, "template_submissions"),
                             stats.count(DETECT_MODEL, "detections"))  # fmt: skip
    again = wq.wait(wq.generate(person, video=dance), timeout=90)
    assert again["state"] == "STORED", again
    assert again["template_reused"] and again["template_id"] == first["template_id"]
    assert again["detection"]["cached"]
    assert stats.count(TEMPLATE_MODEL, "template_submissions") == templates  # zero more
    assert stats.count(DETECT_MODEL, "detections") == detections
    assert stats.count(VIDEO_MODEL, "video_submissions") == 2


def test_failed_detection_rejects_and_pays_nothing(
    wq: AnimateQueue, stats: Stats, dance: Path, tmp_path: Path
) -> None:
    """An image DashScope's detector refuses: REJECTED with its reason, nothing generated."""
    nobody = make_image(tmp_path / "nobody.png", text={"emulator_detect": "no_human"})
    view = wq.wait(wq.generate(nobody, video=dance), timeout=60)
    assert (view["state"], view["error_code"]) == ("REJECTED", "InvalidImage.DetectFailed")
    assert "no human body" in view["error_message"]
    assert stats.count(DETECT_MODEL, "detections") == 1
    assert stats.count(TEMPLATE_MODEL, "template_submissions") == 0
    assert stats.count(VIDEO_MODEL, "video_submissions") == 0


def test_half_body_without_ref_bg_is_refused(
    wq: AnimateQueue, stats: Stats, tmp_path: Path, remote: Any
) -> None:
    half = make_image(tmp_path / "half.png", text={"emulator_detect": "half"})
    view = wq.wait(wq.generate(half, template_id=remote.template()), timeout=60)
    assert (view["state"], view["error_code"]) == ("REJECTED", "InvalidImage.HalfBody")
    assert view["detection"]["bodystyle"] == "half"
    assert stats.count(VIDEO_MODEL, "video_submissions") == 0


def test_templates_belong_to_their_account(
    wq: AnimateQueue, stats: Stats, dance: Path, person: Path
) -> None:
    """A template made under one account is refused for another, and the other account makes
    its own template for the same dance instead of reusing it."""
    made = wq.wait(wq.make_template(dance, account="other"), timeout=90)
    assert (made["state"], made["account"], made["kind"]) == ("READY", "other", "template"), made
    assert stats.count(TEMPLATE_MODEL, "template_submissions", "other") == 1

    refused = wq.wait(wq.generate(person, template_id=made["template_id"], account="main"), 60)
    assert (refused["state"], refused["error_code"]) == (
        "REJECTED",
        "InvalidRequest.TemplateAccount",
    )
    assert stats.count(VIDEO_MODEL, "video_submissions") == 0

    own = wq.wait(wq.generate(person, video=dance, account="main", detect=False), timeout=90)
    assert own["state"] == "STORED", own
    assert own["template_id"] != made["template_id"] and not own["template_reused"]
    assert stats.count(TEMPLATE_MODEL, "template_submissions", "main") == 1
    # Under its own account the template is used as is.
    theirs = wq.wait(wq.generate(person, template_id=made["template_id"], detect=False), 90)
    assert (theirs["state"], theirs["account"]) == ("STORED", "other"), theirs


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"fps": 15}, "InvalidVideo.FPS"),
        ({"seconds": 1.0}, "InvalidVideo.Duration"),
        ({"seconds": 61.0, "width": 200, "height": 200}, "InvalidVideo.Duration"),
        ({"width": 160, "height": 320}, "InvalidVideo.Resolution"),
        ({"width": 2100, "height": 800, "seconds": 2.1}, "InvalidVideo.Resolution"),
        ({"width": 200, "height": 700}, "InvalidVideo.AspectRatio"),
        ({"suffix": ".mkv"}, "InvalidVideo.Format"),
        ({"codec": "mpeg4", "suffix": ".avi"}, "InvalidVideo.Codec"),
        ({"garbage": True}, "InvalidVideo.Format"),
    ],
)
def test_bad_dance_video_is_rejected_before_any_template(
    wq: AnimateQueue, stats: Stats, person: Path, tmp_path: Path, spec: dict[str, Any], code: str
) -> None:
    """Each documented limit, checked by the worker (PyAV) before a template is paid for. The
    file goes to the bucket directly, past the producer's own identical check."""
    options = dict(spec)
    path = tmp_path / ("dance" + str(options.pop("suffix", ".mp4")))
    if options.pop("garbage", False):
        path.write_bytes(b"not a video at all\n" * 100)
    else:
        make_video(path, **{"width": 360, "height": 640, "fps": 24, "seconds": 2.5, **options})
    assert wq.inputs is not None
    ref = wq.inputs.upload(path)
    view = wq.wait(wq.generate(person, video=ref, detect=False), timeout=60)
    assert (view["state"], view["error_code"]) == ("REJECTED", code), view
    assert stats.count(TEMPLATE_MODEL, "template_submissions") == 0
    assert stats.count(VIDEO_MODEL, "video_submissions") == 0


def test_refused_template_is_made_again_and_the_job_goes_on(
    wq: AnimateQueue, stats: Stats, dance: Path, person: Path
) -> None:
    first = wq.wait(wq.generate(person, video=dance, detect=False), timeout=90)
    assert first["state"] == "STORED", first
    revoked = stats.http.delete(f"/_emulator/templates/{first['template_id']}")
    assert revoked.status_code == 200
    again = wq.wait(wq.generate(person, video=dance, detect=False), timeout=90)
    assert again["state"] == "STORED", again
    assert again["template_recreated"] and again["template_id"] != first["template_id"]
    assert stats.count(TEMPLATE_MODEL, "template_submissions") == 2
    (old,) = [t for t in wq.templates("main") if t["template_id"] == first["template_id"]]
    assert old["revoked"]


@pytest.fixture(scope="module")
def oss_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def oss_worker(oss_redis: RedisServer, worker_env: dict[str, str]) -> Iterator[Worker]:
    env = workflow_env(worker_env, oss_redis.url, INPUT_UPLOAD_MODE="oss")
    w = Worker(env, concurrency=3, name="oss@%h")
    w.start()
    yield w
    w.stop()


def test_oss_temporary_upload_path(
    oss_redis: RedisServer,
    oss_worker: Worker,
    s3_server: S3Server,
    remote: Any,
    emulator: EmulatorServer,
    stats: Stats,
    dance: Path,
    person: Path,
) -> None:
    """INPUT_UPLOAD_MODE=oss: DashScope fetches the inputs from its own temporary storage
    (oss:// URLs, uploaded once per account and model), never from our bucket."""
    q = producer(oss_redis.url, s3_server, remote.bucket)
    try:
        view = q.wait(q.generate(person, video=dance), timeout=90)
        assert view["state"] == "STORED", view
        uploads = emulator.emulator.uploads
        models = sorted(u.model for u in uploads.files.values())
        # The image for the detector and for generation, the video for the template: each model
        # gets its own copy, as DashScope binds a temporary file to one model.
        assert models == sorted([DETECT_MODEL, VIDEO_MODEL, TEMPLATE_MODEL])
        again = q.wait(q.generate(person, video=dance, detect=False), timeout=90)
        assert again["state"] == "STORED" and again["template_reused"]
        assert len(uploads.files) == 3  # cached: nothing uploaded twice
    finally:
        q.close()
