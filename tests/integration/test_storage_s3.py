"""workers.adapters.s3.storage against a real S3 API (moto's threaded server) and the real emulator's videos.

Also the truncation trap (pitfall #9): a naive file-like whose ``read(n)`` returns one network chunk
makes ``upload_fileobj`` store a fraction of the stream without any error.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.awsrequest import AWSResponse

from emulator.server import EmulatorServer
from workers.adapters.s3.storage import S3Copier, SourceReader, make_s3_client
from workers.errors import SourceExpired, SourceUnavailable, StorageUnavailable

MiB = 1024 * 1024


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture
def http_client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(10.0)) as client:
        yield client


def video_url(emulator: EmulatorServer, api_key: str) -> str:
    """A real signed video_url: seed a template, submit a generation, poll until SUCCEEDED."""
    return emulator.finished_video_url(api_key)


def uploads_in_progress(s3: Any, bucket: str) -> list[Any]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


class Truncating(http.server.BaseHTTPRequestHandler):
    """Announces ``size`` bytes, sends half of them, and hangs up."""

    size = 0

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(self.size))
        self.end_headers()
        half = self.size // 2
        block = bytes(range(256)) * 4096  # 1 MiB
        sent = 0
        while sent < half:
            n = min(len(block), half - sent)
            self.wfile.write(block[:n])
            sent += n
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def truncating_server() -> Iterator[type[Truncating]]:
    handler = type("Handler", (Truncating,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/results/t.mp4?Signature=abc123"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------------------------- the trap


class NaiveReader:
    """The tempting wrapper: ``read(n)`` returns whatever chunk comes next, whatever n is."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, n: int = -1) -> bytes:
        return next(self._chunks, b"")


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_naive_reader_silently_truncates_and_ours_does_not(s3: Any, bucket: str) -> None:
    data = bytes(range(256)) * (20 * MiB // 256)
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)

    s3.upload_fileobj(NaiveReader(chunks_of(data, 64 * 1024)), bucket, "naive", Config=config)
    naive = s3.head_object(Bucket=bucket, Key="naive")["ContentLength"]
    assert naive == 128 * 1024  # 2 of 320 chunks: the first read, then "read to the end"; no error

    reader = SourceReader(chunks_of(data, 64 * 1024), expected_size=len(data), source="test")
    s3.upload_fileobj(io.BufferedReader(reader, buffer_size=MiB), bucket, "ours", Config=config)
    stored = s3.get_object(Bucket=bucket, Key="ours")["Body"].read()
    assert len(stored) == len(data) == reader.size
    assert hashlib.sha256(stored).hexdigest() == reader.sha256 == hashlib.sha256(data).hexdigest()


def test_an_exception_raised_in_read_surfaces_as_itself_and_aborts(s3: Any, bucket: str) -> None:
    """What s3transfer does with an error from read(): re-raises the same object, aborts the MPU."""

    def failing() -> Iterator[bytes]:
        yield from chunks_of(b"x" * (12 * MiB), 64 * 1024)
        raise httpx.ReadError("reset")

    reader = SourceReader(failing(), expected_size=20 * MiB, source="test")
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB)
    with pytest.raises(SourceUnavailable) as info:
        s3.upload_fileobj(io.BufferedReader(reader, MiB), bucket, "k", Config=config)
    assert info.value is reader.error  # not wrapped in S3UploadFailedError
    assert uploads_in_progress(s3, bucket) == []
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


# ---------------------------------------------------------------------------------- the copier


def test_copy_happy_path_find_and_repeat(
    emulator: EmulatorServer, api_key: str, s3: Any, bucket: str, http_client: httpx.Client
) -> None:
    url = video_url(emulator, api_key)
    direct = httpx.get(url, timeout=10).raise_for_status().content
    copier = S3Copier(s3, http_client, bucket=bucket)
    key = "jobs/job-1.mp4"

    stored = copier.copy(url, key, metadata={"job-id": "job-1"})

    body = s3.get_object(Bucket=bucket, Key=key)
    assert body["Body"].read() == direct
    assert stored.size == len(direct)
    assert stored.sha256 == hashlib.sha256(direct).hexdigest()
    assert body["ContentType"] == "video/mp4"
    assert body["Metadata"] == {"job-id": "job-1", "sha256": stored.sha256}
    assert stored.uri == f"s3://{bucket}/{key}"
    assert copier.find(key) == stored
    assert copier.find("jobs/other.mp4") is None

    again = copier.copy(url, key, metadata={"job-id": "job-1"})
    assert (again.size, again.sha256) == (stored.size, stored.sha256)
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 1
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == direct


def test_copy_big_padded_video_goes_multipart(
    emulator: EmulatorServer, api_key: str, s3: Any, bucket: str, http_client: httpx.Client
) -> None:
    pad = 20_000_000
    httpx.patch(
        f"{emulator.url}/_emulator/config", json={"video_pad_bytes": pad}
    ).raise_for_status()
    url = video_url(emulator, api_key)
    copier = S3Copier(s3, http_client, bucket=bucket)
    parts: list[int] = []
    s3.meta.events.register(
        "provide-client-params.s3.UploadPart",
        lambda params, **_: parts.append(params["PartNumber"]),
    )

    stored = copier.copy(url, "big.mp4", metadata={"job-id": "big"})

    assert stored.size == pad
    assert sorted(parts) == [1, 2, 3]  # 8 + 8 + 3.07 MiB
    head = s3.head_object(Bucket=bucket, Key="big.mp4")
    assert head["ContentLength"] == pad
    digest = hashlib.sha256()
    for chunk in s3.get_object(Bucket=bucket, Key="big.mp4")["Body"].iter_chunks(MiB):
        digest.update(chunk)
    assert head["Metadata"] == {"job-id": "big"}
    tags = s3.get_object_tagging(Bucket=bucket, Key="big.mp4")["TagSet"]
    assert digest.hexdigest() == stored.sha256
    assert tags == [{"Key": "sha256", "Value": stored.sha256}]
    assert copier.find("big.mp4") == stored


def test_a_server_without_tagging_gets_the_stamp_instead(
    emulator: EmulatorServer, api_key: str, s3: Any, bucket: str, http_client: httpx.Client
) -> None:
    """botocore parses a real 501 NotImplemented (as R2 or GCS answer PutObjectTagging)."""
    httpx.patch(
        f"{emulator.url}/_emulator/config", json={"video_pad_bytes": 9 * MiB}
    ).raise_for_status()
    refusal = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code>'
        b"<Message>A header you provided implies functionality that is not implemented"
        b"</Message></Error>"
    )

    def no_tagging(request: Any, **_: Any) -> AWSResponse:
        raw = type("Raw", (), {"stream": lambda self, **kw: iter([refusal])})()
        return AWSResponse(request.url, 501, {}, raw)

    s3.meta.events.register("before-send.s3.PutObjectTagging", no_tagging)
    try:
        stored = S3Copier(s3, http_client, bucket=bucket).copy(
            video_url(emulator, api_key), "plain.mp4", metadata={"job-id": "p"}
        )
    finally:
        s3.meta.events.unregister("before-send.s3.PutObjectTagging", no_tagging)
    head = s3.head_object(Bucket=bucket, Key="plain.mp4")
    assert head["Metadata"] == {"job-id": "p", "sha256": stored.sha256}
    assert s3.get_object_tagging(Bucket=bucket, Key="plain.mp4")["TagSet"] == []
    body = s3.get_object(Bucket=bucket, Key="plain.mp4")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == stored.sha256 and len(body) == 9 * MiB
    assert S3Copier(s3, http_client, bucket=bucket).find("plain.mp4") == stored


def test_expired_url_is_source_expired_and_stores_nothing(
    emulator: EmulatorServer, api_key: str, s3: Any, bucket: str, http_client: httpx.Client
) -> None:
    url = video_url(emulator, api_key)
    httpx.post(f"{emulator.url}/_emulator/clock", json={"advance": 86500}).raise_for_status()
    copier = S3Copier(s3, http_client, bucket=bucket)
    with pytest.raises(SourceExpired) as info:
        copier.copy(url, "k.mp4", metadata={})
    assert "403" in str(info.value) and "Request has expired." in str(info.value)
    assert "Signature=" not in str(info.value)
    assert copier.find("k.mp4") is None


def test_dropped_connection_is_source_unavailable(
    emulator: EmulatorServer, api_key: str, s3: Any, bucket: str, http_client: httpx.Client
) -> None:
    url = video_url(emulator, api_key)
    fault = {"route": "video", "kind": "drop"}
    httpx.post(f"{emulator.url}/_emulator/faults/next", json=fault).raise_for_status()
    copier = S3Copier(s3, http_client, bucket=bucket)
    with pytest.raises(SourceUnavailable):
        copier.copy(url, "k.mp4", metadata={})
    assert copier.find("k.mp4") is None
    assert copier.copy(url, "k.mp4", metadata={}).size > 0  # the next try works


@pytest.mark.parametrize("size", [2 * MiB, 24 * MiB], ids=["single-put", "multipart"])
def test_truncated_body_is_source_unavailable_and_leaves_nothing(
    truncating_server: Any, size: int, s3: Any, bucket: str, http_client: httpx.Client
) -> None:
    truncating_server.size = size
    copier = S3Copier(s3, http_client, bucket=bucket)
    with pytest.raises(SourceUnavailable) as info:
        copier.copy(truncating_server.url, "short.mp4", metadata={"job-id": "j"})
    assert "abc123" not in str(info.value)
    assert copier.find("short.mp4") is None
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    assert uploads_in_progress(s3, bucket) == []


def test_missing_bucket_is_storage_unavailable(
    emulator: EmulatorServer, api_key: str, s3: Any, http_client: httpx.Client
) -> None:
    url = video_url(emulator, api_key)
    copier = S3Copier(s3, http_client, bucket=f"missing-{uuid.uuid4().hex[:8]}")
    with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
        copier.copy(url, "k.mp4", metadata={})


@pytest.mark.parametrize("mode", ["when_required", "when_supported"])
def test_both_checksum_modes_work_against_moto(
    emulator: EmulatorServer,
    api_key: str,
    moto_endpoint: str,
    aws_env: None,
    bucket: str,
    http_client: httpx.Client,
    mode: str,
) -> None:
    httpx.patch(
        f"{emulator.url}/_emulator/config", json={"video_pad_bytes": 9 * MiB}
    ).raise_for_status()  # just over the threshold: multipart with checksums on every part
    client = make_s3_client(
        endpoint_url=moto_endpoint,
        region="us-east-1",
        checksum_calculation=mode,
        checksum_validation=mode,
    )
    assert client.meta.config.request_checksum_calculation == mode
    url = video_url(emulator, api_key)
    copier = S3Copier(client, http_client, bucket=bucket)
    stored = copier.copy(url, f"{mode}.mp4", metadata={"mode": mode})
    assert stored.size == 9 * MiB
    assert copier.find(f"{mode}.mp4") == stored
    direct = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    body = direct.get_object(Bucket=bucket, Key=f"{mode}.mp4")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == stored.sha256


def test_a_paused_copy_resumes_from_its_checkpoint_in_another_copier(
    emulator: EmulatorServer, api_key: str, s3: Any, bucket: str, http_client: httpx.Client
) -> None:
    """A 20 MB video (3 parts) whose first attempt runs out of time after two parts: the open
    upload is kept; a second copier (as in another process) lists the parts moto holds, asks
    the emulator for the rest with a Range, uploads the third part only, and the object is
    byte-exact with the SHA-256 of all of it."""
    from workers.errors import CopyPaused

    pad = 20_000_000
    httpx.patch(
        f"{emulator.url}/_emulator/config", json={"video_pad_bytes": pad}
    ).raise_for_status()
    url = video_url(emulator, api_key)
    whole = http_client.get(url).content
    parts: list[int] = []
    s3.meta.events.register(
        "provide-client-params.s3.UploadPart",
        lambda params, **_: parts.append(params["PartNumber"]),
    )
    ticks = iter(range(1_000_000))
    first = S3Copier(s3, http_client, bucket=bucket, clock=lambda: float(next(ticks)))
    with pytest.raises(CopyPaused) as paused:
        first.copy(url, "resumed.mp4", metadata={"job-id": "r"}, heartbeat=lambda *_: None,
                   budget=2.5)  # fmt: skip
    assert sorted(parts) == [1, 2]
    assert len(uploads_in_progress(s3, bucket)) == 1
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

    second = S3Copier(s3, http_client, bucket=bucket)
    stored = second.copy(
        url, "resumed.mp4", metadata={"job-id": "r"}, resume=paused.value.checkpoint
    )
    assert sorted(parts) == [1, 2, 3]
    assert stored.size == pad == len(whole)
    assert stored.sha256 == hashlib.sha256(whole).hexdigest()
    body = s3.get_object(Bucket=bucket, Key="resumed.mp4")["Body"].read()
    assert body == whole
    assert uploads_in_progress(s3, bucket) == []
    assert second.find("resumed.mp4") == stored


def test_bucket_setup_adds_the_abort_rule_and_keeps_the_others(
    moto_endpoint: str, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`animate-queue bucket setup` puts the rule that sweeps unfinished uploads under
    S3_PREFIX, keeps the bucket's other rules, and running it twice changes nothing more."""
    from click.testing import CliRunner

    from config.settings import get_settings
    from workers.entrypoints import cli

    other = {"ID": "logs", "Filter": {"Prefix": "logs/"}, "Status": "Enabled",
             "Expiration": {"Days": 30}}  # fmt: skip
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [other]})
    monkeypatch.setenv("S3_BUCKET", bucket)
    monkeypatch.setenv("S3_PREFIX", "animate-queue/videos")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    get_settings.cache_clear()
    try:
        for _ in range(2):
            result = CliRunner().invoke(cli.main, ["bucket", "setup", "--days", "2"])
            assert result.exit_code == 0, result.output
    finally:
        get_settings.cache_clear()
    assert "aborted 2 day(s) after" in result.output
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert set(rules) == {"logs", "animate-queue-abort-incomplete-uploads"}
    ours = rules["animate-queue-abort-incomplete-uploads"]
    assert ours["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 2}
    assert ours["Filter"] == {"Prefix": "animate-queue/videos/"}
    assert ours["Status"] == "Enabled"
