"""The producer side of ``animate-queue generate`` and ``animate-queue templates``: what is sent.

A real AnimateQueue whose Celery ``send_task`` is captured, with a fake S3Inputs (same interface)
that records uploads; nothing reaches Redis or S3. Local files are real: the devstack assets and
clips made with PyAV, checked with the workers' own rules.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from devstack.media import make_image, make_video
from workers.entrypoints import cli
from workers.producer import AnimateQueue

ASSETS = Path(__file__).resolve().parents[2] / "devstack" / "assets"
BUCKET = "animate-test"
SHA = "ab" * 32


class FakeS3:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}

    def download_file(self, bucket: str, key: str, filename: str) -> None:
        Path(filename).write_bytes(self.objects[(bucket, key)])


class FakeInputs:
    """S3Inputs' interface: content-addressed refs, uploads recorded."""

    def __init__(self) -> None:
        self.bucket = BUCKET
        self.s3 = FakeS3()
        self.uploaded: list[Path] = []

    def upload(self, path: Path) -> str:
        self.uploaded.append(path)
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        return f"s3://{BUCKET}/inputs/{sha}{path.suffix.lower()}"


class Harness:
    def __init__(self, queue: AnimateQueue, inputs: FakeInputs | None) -> None:
        self.queue = queue
        self.inputs = inputs
        self.sent: list[tuple[str, dict[str, Any], str, str]] = []
        self.views: dict[str, dict[str, Any]] = {}
        self.runner = CliRunner()

    def send_task(self, name: str, *, kwargs: dict[str, Any], queue: str, task_id: str) -> None:
        json.dumps(kwargs)  # the message is JSON: everything sent must be
        self.sent.append((name, kwargs, queue, task_id))

    def run(self, *args: str) -> Any:
        return self.runner.invoke(cli.main, list(args), catch_exceptions=False)

    @property
    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        return [(name, kwargs) for name, kwargs, _, _ in self.sent]


def sha_ref(path: Path) -> str:
    return f"s3://{BUCKET}/inputs/{hashlib.sha256(path.read_bytes()).hexdigest()}{path.suffix}"


def final_view(job_id: str, state: str, **extra: Any) -> dict[str, Any]:
    """A job record as job_view returns it, with what render() shows."""
    view: dict[str, Any] = {
        "job_id": job_id,
        "state": state,
        "remote_task_id": None,
        "remote_status": None,
        "s3_bucket": None,
        "s3_key": None,
        "s3_uri": None,
        "bytes": None,
        "sha256": None,
        "video_duration": None,
        "error_code": None,
        "error_message": None,
        "seconds": {"queued": None, "remote": None, "copy": None, "total": None},
    }
    view.update(extra)
    return view


def make_harness(monkeypatch: pytest.MonkeyPatch, inputs: FakeInputs | None) -> Harness:
    queue = AnimateQueue(
        "redis://127.0.0.1:6379/0",
        key_prefix=f"cli-test-{uuid.uuid4().hex}",
        inputs=inputs,  # type: ignore[arg-type]
    )
    h = Harness(queue, inputs)
    monkeypatch.setattr(queue.celery, "send_task", h.send_task)
    monkeypatch.setattr(queue, "get", lambda job_id: h.views.get(job_id))
    monkeypatch.setattr(cli, "_queue", lambda: queue)
    return h


@pytest.fixture
def h(monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    harness = make_harness(monkeypatch, FakeInputs())
    yield harness
    harness.queue.close()


# ---------------------------------------------------------------------------------- generate


def test_local_files_are_uploaded_and_sent_as_s3_refs(h: Harness) -> None:
    image, video = ASSETS / "person.png", ASSETS / "dance.mp4"

    result = h.run("generate", "--image", str(image), "--video", str(video), "--job-id", "o-1")

    assert result.exit_code == 0, result.output
    assert result.stdout == "o-1\n"
    assert h.inputs is not None and h.inputs.uploaded == [image, video]
    [(name, kwargs, queue, task_id)] = h.sent
    assert (name, queue) == ("animate.generate", "celery")
    assert kwargs == {"image_url": sha_ref(image), "video_url": sha_ref(video), "job_id": "o-1"}
    uuid.UUID(task_id)  # the message id is a fresh UUID; the job id is the job_id


def test_urls_are_sent_as_given_with_every_option(h: Harness) -> None:
    result = h.run(
        "generate",
        "--image", "https://cdn.example.com/me.png",
        "--template-id", "AACT.abc.123",
        "--no-detect",
        "--use-ref-img-bg",
        "--video-ratio", "3:4",
        "--metadata", '{"order": 42}',
        "--account", "main",
        "--priority", "5",
        "--producer", "billing",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    [(name, kwargs, _, task_id)] = h.sent
    assert result.stdout == f"{task_id}\n"  # no job_id: the job id is the message id
    assert name == "animate.generate"
    assert kwargs == {
        "image_url": "https://cdn.example.com/me.png",
        "template_id": "AACT.abc.123",
        "detect": False,
        "use_ref_img_bg": True,
        "video_ratio": "3:4",
        "metadata": {"order": 42},
        "account": "main",
        "priority": 5,
        "producer": "billing",
    }
    assert h.inputs is not None and h.inputs.uploaded == []


def test_detect_is_left_to_the_default_unless_refused(h: Harness) -> None:
    h.run("generate", "--image", "https://x.example/a.png", "--video", "s3://animate-test/v.mp4")
    [(_, kwargs)] = h.messages
    assert kwargs == {
        "image_url": "https://x.example/a.png",
        "video_url": "s3://animate-test/v.mp4",
    }


@pytest.mark.parametrize(
    "motion",
    [
        ["--video", "https://x.example/d.mp4", "--template-id", "AACT.abc.123"],
        [],
    ],
    ids=["both", "neither"],
)
def test_exactly_one_of_video_and_template_id(h: Harness, motion: list[str]) -> None:
    result = h.run("generate", "--image", "https://x.example/a.png", *motion)
    assert result.exit_code == 2
    assert "exactly one of --video and --template-id" in result.output
    assert h.sent == []


def test_a_bad_local_video_is_refused_before_anything_is_sent(h: Harness, tmp_path: Path) -> None:
    clip = make_video(tmp_path / "slow.mp4", fps=15, seconds=2.5)

    result = h.run("generate", "--image", str(ASSETS / "person.png"), "--video", str(clip))

    assert result.exit_code == 2
    assert "InvalidVideo.FPS" in result.stderr
    assert "15.00 fps" in result.stderr
    assert "--video" in result.stderr
    assert h.sent == []
    assert h.inputs is not None and h.inputs.uploaded == []  # not even the good image


def test_a_bad_local_image_is_refused_before_anything_is_sent(h: Harness, tmp_path: Path) -> None:
    wide = make_image(tmp_path / "wide.png", width=1500, height=500)

    result = h.run("generate", "--image", str(wide), "--template-id", "AACT.abc.123")

    assert result.exit_code == 2
    assert "InvalidImage.AspectRatio" in result.stderr
    assert "--image" in result.stderr
    assert h.sent == []


def test_a_missing_local_file_is_a_clear_error(h: Harness, tmp_path: Path) -> None:
    result = h.run(
        "generate", "--image", str(tmp_path / "nope.png"), "--template-id", "AACT.abc.123"
    )
    assert result.exit_code == 2
    assert "nope.png' does not exist" in result.stderr
    assert h.sent == []


def test_local_files_need_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    h = make_harness(monkeypatch, None)
    result = h.run(
        "generate", "--image", str(ASSETS / "person.png"), "--template-id", "AACT.abc.123"
    )
    assert result.exit_code == 1
    assert "S3_BUCKET" in result.stderr
    assert h.sent == []
    # URLs need no bucket.
    ok = h.run("generate", "--image", "https://x.example/a.png", "--template-id", "AACT.abc.1")
    assert ok.exit_code == 0
    assert len(h.sent) == 1


def test_wait_prints_the_s3_uri_and_download_the_path(h: Harness, tmp_path: Path) -> None:
    data = b"\x00\x00\x00\x18ftypmp42 a stored video"
    assert h.inputs is not None
    h.inputs.s3.objects[(BUCKET, "videos/o-2.mp4")] = data
    h.views["o-2"] = final_view(
        "o-2",
        "STORED",
        s3_bucket=BUCKET,
        s3_key="videos/o-2.mp4",
        s3_uri=f"s3://{BUCKET}/videos/o-2.mp4",
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )

    result = h.run(
        "generate",
        "--image", "https://x.example/a.png",
        "--template-id", "AACT.abc.123",
        "--job-id", "o-2",
        "--download", str(tmp_path / "out"),
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    target = tmp_path / "out" / "o-2.mp4"
    assert result.stdout.splitlines() == ["o-2", f"s3://{BUCKET}/videos/o-2.mp4", str(target)]
    assert target.read_bytes() == data
    assert "STORED" in result.stderr  # the record, shown on stderr


def test_wait_exits_1_with_the_error_when_the_job_did_not_store(h: Harness) -> None:
    h.views["o-3"] = final_view(
        "o-3", "REJECTED", error_code="InvalidImage.Detect", error_message="no person found"
    )
    result = h.run(
        "generate",
        "--image", "https://x.example/a.png",
        "--video", "https://x.example/d.mp4",
        "--job-id", "o-3",
        "--wait",
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stdout == "o-3\n"
    assert "ended REJECTED (InvalidImage.Detect: no person found)" in result.stderr


def test_submit_still_sends_urls(h: Harness) -> None:
    result = h.run(
        "submit", "--image-url", "https://x.example/a.png", "--template-id", "AACT.abc.123"
    )
    assert result.exit_code == 0
    assert h.messages == [
        (
            "animate.generate",
            {"image_url": "https://x.example/a.png", "template_id": "AACT.abc.123"},
        )
    ]


# ---------------------------------------------------------------------------------- templates

TEMPLATES: list[dict[str, Any]] = [
    {
        "template_id": "AACT.main.1",
        "account": "main",
        "source_sha256": SHA,
        "job_id": "t-1",
        "created_at": 1_767_225_600.0,  # 2026-01-01 00:00 UTC
        "video_seconds": 3.0,
        "revoked": False,
    },
    {
        "template_id": "AACT.backup.9",
        "account": "backup",
        "source_sha256": None,
        "job_id": None,
        "created_at": None,
        "video_seconds": None,
        "revoked": True,
    },
]


def test_templates_lists_them(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str | None] = []

    def list_templates(account: str | None = None) -> list[dict[str, Any]]:
        asked.append(account)
        return [t for t in TEMPLATES if account is None or t["account"] == account]

    monkeypatch.setattr(h.queue.store, "list_templates", list_templates, raising=False)
    monkeypatch.setenv("COLUMNS", "160")  # rich folds cells to fit 80 columns otherwise

    table = h.run("templates")
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if "AACT." in line]
    assert len(rows) == 2
    backup, main = rows  # sorted by account
    assert "AACT.backup.9" in backup and "yes" in backup
    for cell in ("AACT.main.1", "main", SHA[:12], "3.0", "2026-01-01 00:00"):
        assert cell in main
    assert SHA[:13] not in main

    as_json = h.run("templates", "--json", "--account", "main")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout) == [TEMPLATES[0]]
    assert asked == [None, "main"]


def test_templates_add_still_records_an_owner(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    added: list[tuple[str, str]] = []
    monkeypatch.setattr(h.queue.store, "register_template", lambda t, a: added.append((t, a)))
    result = h.run("templates", "add", "AACT.x.1", "--account", "main")
    assert result.exit_code == 0
    assert added == [("AACT.x.1", "main")]
    assert h.sent == []


def test_templates_create_sends_animate_template(h: Harness) -> None:
    video = ASSETS / "dance.mp4"
    result = h.run("templates", "create", "--video", str(video), "--account", "main")
    assert result.exit_code == 0, result.output
    [(name, kwargs, queue, task_id)] = h.sent
    assert (name, queue) == ("animate.template", "celery")
    assert kwargs == {"video_url": sha_ref(video), "account": "main"}
    assert result.stdout == f"{task_id}\n"


def test_templates_create_wait_prints_the_template_id(h: Harness) -> None:
    h.views["t-2"] = final_view("t-2", "READY", template_id="AACT.new.2")
    result = h.run(
        "templates", "create", "--video", "https://x.example/d.mp4", "--job-id", "t-2", "--wait"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["t-2", "AACT.new.2"]
    assert h.messages == [
        ("animate.template", {"video_url": "https://x.example/d.mp4", "job_id": "t-2"})
    ]


def test_templates_create_refuses_a_bad_local_video(h: Harness, tmp_path: Path) -> None:
    clip = make_video(tmp_path / "tiny.mp4", width=120, height=160)
    result = h.run("templates", "create", "--video", str(clip))
    assert result.exit_code == 2
    assert "InvalidVideo.Resolution" in result.stderr
    assert h.sent == []


def test_templates_create_wait_fails_when_not_ready(h: Harness) -> None:
    h.views["t-3"] = final_view(
        "t-3", "FAILED", error_code="InvalidParameter", error_message="no person in the video"
    )
    result = h.run(
        "templates", "create", "--video", "https://x.example/d.mp4", "--job-id", "t-3", "--wait"
    )
    assert result.exit_code == 1
    assert "ended FAILED (InvalidParameter: no person in the video)" in result.stderr
