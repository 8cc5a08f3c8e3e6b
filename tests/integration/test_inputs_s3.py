"""workers.adapters.s3.inputs against a real S3 API (moto's threaded server): content-addressed uploads,
presigned URLs, references; and AnimateQueue sending and downloading through it."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from workers.adapters.s3.inputs import S3Inputs, is_local, local_path, parse_s3_ref
from workers.adapters.s3.storage import make_s3_client
from workers.errors import CopyMismatch, StorageUnavailable
from workers.producer import AnimateQueue

MiB = 1024 * 1024
ASSETS = Path(__file__).resolve().parents[2] / "devstack" / "assets"


@pytest.fixture
def inputs(s3: Any, bucket: str) -> S3Inputs:
    return S3Inputs(s3, bucket, "inputs/")


def count_calls(s3: Any, operation: str) -> list[str]:
    """The keys of every ``operation`` request the client makes from now on."""
    calls: list[str] = []
    s3.meta.events.register(
        f"provide-client-params.s3.{operation}", lambda params, **_: calls.append(params["Key"])
    )
    return calls


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("s3://b/k.png", ("b", "k.png")),
        ("s3://my-bucket/inputs/a/b.mp4", ("my-bucket", "inputs/a/b.mp4")),
        ("s3://b/", None),
        ("s3://b", None),
        ("s3:///k", None),
        ("s3://b//k", None),
        ("https://b/k", None),
        ("S3://b/k", None),
        ("/tmp/x.png", None),
        ("", None),
    ],
)
def test_parse_s3_ref(ref: str, expected: tuple[str, str] | None) -> None:
    assert parse_s3_ref(ref) == expected


@pytest.mark.parametrize(
    ("value", "local"),
    [
        ("https://cdn.example.com/a.png", False),
        ("HTTP://cdn.example.com/a.png", False),
        ("s3://bucket/key.png", False),
        ("oss://dashscope-instant/x.png", False),
        ("me.png", True),
        ("./dance.mp4", True),
        ("/abs/path/file.png", True),
        ("C:\\pictures\\me.png", True),
        (Path("https://looks-like-a-url"), True),
    ],
)
def test_is_local(value: str | Path, local: bool) -> None:
    assert is_local(value) is local


def test_local_path_must_be_an_existing_file(tmp_path: Path) -> None:
    assert local_path(write(tmp_path / "a.png", b"x")) == tmp_path / "a.png"
    with pytest.raises(FileNotFoundError, match=r"image '.*nope\.png' does not exist"):
        local_path(tmp_path / "nope.png", "image")
    with pytest.raises(FileNotFoundError, match="is not a regular file"):
        local_path(tmp_path, "video")


# ---------------------------------------------------------------------------------- uploads


def test_upload_is_content_addressed_and_stamped(
    inputs: S3Inputs, s3: Any, bucket: str, tmp_path: Path
) -> None:
    data = (ASSETS / "person.png").read_bytes()
    sha = hashlib.sha256(data).hexdigest()

    ref = inputs.upload(write(tmp_path / "Me.PNG", data))

    assert ref == f"s3://{bucket}/inputs/{sha}.png"
    obj = s3.get_object(Bucket=bucket, Key=f"inputs/{sha}.png")
    assert obj["Body"].read() == data
    assert obj["ContentType"] == "image/png"
    assert obj["Metadata"] == {"sha256": sha}
    assert inputs.sha256_of(ref) == sha


def test_the_same_bytes_are_uploaded_once(
    inputs: S3Inputs, s3: Any, bucket: str, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    puts = count_calls(s3, "PutObject")
    first = inputs.upload(write(tmp_path / "one.mp4", data))
    head = s3.head_object(Bucket=bucket, Key=first.split("/", 3)[3])

    again = inputs.upload(write(tmp_path / "other-name.MP4", data))

    assert again == first
    assert len(puts) == 1
    later = s3.head_object(Bucket=bucket, Key=first.split("/", 3)[3])
    assert (later["ETag"], later["LastModified"]) == (head["ETag"], head["LastModified"])
    # Different bytes are a different object.
    third = inputs.upload(write(tmp_path / "one-more.mp4", data + b"!"))
    assert third != first
    assert len(puts) == 2
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 2


def test_a_wrong_size_object_under_the_key_is_replaced(
    inputs: S3Inputs, s3: Any, bucket: str, tmp_path: Path
) -> None:
    data = b"real video bytes" * 1000
    key = f"inputs/{hashlib.sha256(data).hexdigest()}.mp4"
    s3.put_object(Bucket=bucket, Key=key, Body=b"truncated")

    inputs.upload(write(tmp_path / "v.mp4", data))

    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data


def test_odd_suffixes_are_dropped_from_the_key(inputs: S3Inputs, tmp_path: Path) -> None:
    data = b"abc"
    sha = hashlib.sha256(data).hexdigest()
    assert inputs.upload(write(tmp_path / "noext", data)).endswith(f"/inputs/{sha}")
    assert inputs.upload(write(tmp_path / "x.we ird", data)).endswith(f"/inputs/{sha}")


@pytest.mark.parametrize("mode", ["when_required", "when_supported"])
def test_multipart_upload_in_both_checksum_modes(
    moto_endpoint: str, aws_env: None, bucket: str, tmp_path: Path, mode: str
) -> None:
    client = make_s3_client(
        endpoint_url=moto_endpoint,
        region="us-east-1",
        checksum_calculation=mode,
        checksum_validation=mode,
    )
    data = os.urandom(9 * MiB)  # over s3transfer's 8 MiB threshold: multipart
    parts = count_calls(client, "UploadPart")
    ref = S3Inputs(client, bucket).upload(write(tmp_path / f"{mode}.mp4", data))
    assert len(parts) == 2
    key = parse_s3_ref(ref)
    assert key is not None
    body = client.get_object(Bucket=bucket, Key=key[1])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_file_changed_during_the_upload_is_not_left_under_its_hash(
    inputs: S3Inputs, s3: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "growing.mp4", b"first part")
    upload_file = s3.upload_file

    def upload_then_append(*args: Any, **kwargs: Any) -> None:
        upload_file(*args, **kwargs)
        with path.open("ab") as f:
            f.write(b" and more")

    monkeypatch.setattr(s3, "upload_file", upload_then_append)
    with pytest.raises(StorageUnavailable, match="changed while it was being uploaded"):
        inputs.upload(path)
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_upload_to_a_missing_bucket_is_storage_unavailable(s3: Any, tmp_path: Path) -> None:
    inputs = S3Inputs(s3, f"missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
        inputs.upload(write(tmp_path / "a.png", b"x"))


# ---------------------------------------------------------------------------------- presigning


def test_presigned_url_serves_the_bytes(
    inputs: S3Inputs, bucket: str, tmp_path: Path, aws_env: None
) -> None:
    data = os.urandom(100_000)
    ref = inputs.upload(write(tmp_path / "clip.mp4", data))

    url = inputs.presign(ref, ttl=900)

    query = parse_qs(urlsplit(url).query)
    # SigV4 even in us-east-1, where botocore would default to SigV2 (refused by new buckets).
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["900"]
    assert "AWSAccessKeyId" not in query
    # Fetched without any credential, as DashScope would.
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == data


@pytest.mark.parametrize(
    "ref",
    [
        "s3://someone-else/inputs/x.png",
        "https://example.com/x.png",
        "s3://{bucket}",
        "s3://{bucket}/",
        "inputs/x.png",
    ],
)
def test_presign_refuses_refs_outside_the_bucket(inputs: S3Inputs, bucket: str, ref: str) -> None:
    with pytest.raises(ValueError, match="not an s3:// reference in bucket"):
        inputs.presign(ref.format(bucket=bucket), ttl=300)


def test_sha256_of(inputs: S3Inputs, bucket: str) -> None:
    sha = "a" * 64
    assert inputs.sha256_of(f"s3://{bucket}/inputs/{sha}.png") == sha
    assert inputs.sha256_of(f"s3://{bucket}/inputs/{sha}") == sha
    assert inputs.sha256_of(f"s3://{bucket}/inputs/{sha}.PNG") is None  # keys we write are lower
    assert inputs.sha256_of(f"s3://{bucket}/other/{sha}.png") is None  # outside the prefix
    assert inputs.sha256_of(f"s3://{bucket}/inputs/{'a' * 63}.png") is None
    assert inputs.sha256_of(f"s3://{bucket}/inputs/sub/{sha}.png") is None
    assert inputs.sha256_of(f"s3://other/inputs/{sha}.png") is None
    assert inputs.sha256_of(f"https://host/inputs/{sha}.png") is None


# ---------------------------------------------------------------------------------- the client


@pytest.fixture
def queue(inputs: S3Inputs) -> Iterator[tuple[AnimateQueue, list[tuple[str, dict[str, Any]]]]]:
    q = AnimateQueue("redis://127.0.0.1:6379/0", key_prefix=f"t-{uuid.uuid4().hex}", inputs=inputs)
    sent: list[tuple[str, dict[str, Any]]] = []

    def send_task(name: str, *, kwargs: dict[str, Any], queue: str, task_id: str) -> None:
        assert queue == "celery"
        sent.append((name, kwargs))

    q.celery.send_task = send_task  # type: ignore[method-assign,assignment]
    yield q, sent
    q.close()


def test_generate_uploads_local_files_and_sends_refs(
    queue: tuple[AnimateQueue, list[tuple[str, dict[str, Any]]]],
    inputs: S3Inputs,
    s3: Any,
    bucket: str,
    tmp_path: Path,
) -> None:
    q, sent = queue
    image = ASSETS / "person.png"
    video = ASSETS / "dance.mp4"

    job = q.generate(image, video=video, job_id="order-7", detect=False)

    assert job == "order-7"
    [(name, kwargs)] = sent
    assert name == "animate.generate"
    image_sha = hashlib.sha256(image.read_bytes()).hexdigest()
    video_sha = hashlib.sha256(video.read_bytes()).hexdigest()
    assert kwargs == {
        "image_url": f"s3://{bucket}/inputs/{image_sha}.png",
        "video_url": f"s3://{bucket}/inputs/{video_sha}.mp4",
        "detect": False,
        "job_id": "order-7",
    }
    for ref in (kwargs["image_url"], kwargs["video_url"]):
        got = httpx.get(inputs.presign(ref, ttl=300), timeout=10).content
        assert hashlib.sha256(got).hexdigest() == inputs.sha256_of(ref)

    template_job = q.make_template(str(video), account="main")
    assert sent[1] == (
        "animate.template",
        {"video_url": kwargs["video_url"], "account": "main"},
    )
    assert template_job != job


def test_download_fetches_and_verifies_a_stored_video(
    queue: tuple[AnimateQueue, list[tuple[str, dict[str, Any]]]],
    s3: Any,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q, _ = queue
    data = os.urandom(50_000)
    s3.put_object(Bucket=bucket, Key="videos/j1.mp4", Body=data)
    view = {
        "job_id": "j1",
        "state": "STORED",
        "s3_bucket": bucket,
        "s3_key": "videos/j1.mp4",
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    monkeypatch.setattr(q, "get", lambda job_id: view if job_id == "j1" else None)

    path = q.download("j1", tmp_path / "out")

    assert path == tmp_path / "out" / "j1.mp4"
    assert path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["j1.mp4"]  # no temporary left

    view["sha256"] = "0" * 64
    with pytest.raises(CopyMismatch):
        q.download("j1", tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []
    view["state"] = "FAILED"
    with pytest.raises(ValueError, match="FAILED, not STORED"):
        q.download("j1", tmp_path / "out")
