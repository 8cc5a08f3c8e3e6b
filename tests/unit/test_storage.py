"""workers.adapters.s3.storage without a network: the reader, the client factory, and S3Copier over fakes.

The source is an ``httpx.MockTransport``; S3 is ``FakeS3``, which reads the body the way
s3transfer's non-seekable path does (``read(threshold)``, then ``read(chunksize)`` until empty) and
stores nothing when a read raises, as an aborted multipart upload does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from workers.adapters.s3 import storage
from workers.adapters.s3.multipart import Checkpoint
from workers.adapters.s3.storage import S3Copier, SourceReader, StoredObject, make_s3_client
from workers.errors import (
    CopyMismatch,
    SourceExpired,
    SourceRejected,
    SourceUnavailable,
    StorageUnavailable,
)

MiB = 1024 * 1024
SIGNATURE = "c0ffee0123456789abcdef0123456789"
URL = f"https://bucket.oss-cn-beijing.aliyuncs.com/results/t1.mp4?Expires=1700000000&OSSAccessKeyId=LTAIx&Signature={SIGNATURE}"


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, sizes: Iterator[int] | None = None, chunk: int = 65536) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        n = next(sizes) if sizes is not None else chunk
        yield data[pos : pos + n]
        pos += n


def client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        operation,
    )


# ---------------------------------------------------------------------------------- the reader


def test_reader_yields_exact_bytes_and_sha256() -> None:
    data = payload(3 * MiB + 17)
    rng = random.Random(2)
    sizes = iter(lambda: rng.choice([0, 1, 7, 4096, 65536, 300_000]), None)
    reader = SourceReader(chunked(data, sizes), expected_size=len(data), source="s")
    got = io.BufferedReader(reader, buffer_size=MiB).read()
    assert got == data
    assert reader.finished
    assert reader.size == len(data)
    assert reader.sha256 == hashlib.sha256(data).hexdigest()
    assert not reader.seekable()


def test_buffered_read_n_returns_n_bytes_until_eof() -> None:
    data = payload(10 * MiB + 5)
    reader = SourceReader(chunked(data, chunk=65536), expected_size=len(data), source="s")
    body = io.BufferedReader(reader, buffer_size=MiB)
    sizes = []
    while part := body.read(3 * MiB):
        sizes.append(len(part))
    assert sizes == [3 * MiB, 3 * MiB, 3 * MiB, MiB + 5]
    assert body.read(3 * MiB) == b""


def test_reader_short_body_raises_at_eof_instead_of_ending() -> None:
    data = payload(MiB)
    reader = SourceReader(chunked(data), expected_size=len(data) + 1, source="https://h/p.mp4")
    body = io.BufferedReader(reader, buffer_size=MiB)
    with pytest.raises(SourceUnavailable, match="ended short: 1048576 of 1048577"):
        body.read()
    assert reader.error is not None
    assert not reader.finished
    with pytest.raises(SourceUnavailable):  # and stays failed: never a quiet b""
        body.read(10)


def test_reader_longer_body_than_content_length_raises() -> None:
    reader = SourceReader(iter([b"abc", b"def"]), expected_size=4, source="s")
    with pytest.raises(SourceUnavailable, match="more than its Content-Length"):
        io.BufferedReader(reader).read()


def test_reader_without_content_length_counts_what_came() -> None:
    reader = SourceReader(iter([b"abc", b"", b"de"]), expected_size=None, source="s")
    assert io.BufferedReader(reader).read() == b"abcde"
    assert reader.finished and reader.size == 5


def test_reader_wraps_httpx_errors_mid_stream() -> None:
    def chunks() -> Iterator[bytes]:
        yield b"x" * 1000
        raise httpx.ReadError("connection reset")

    reader = SourceReader(chunks(), expected_size=5000, source="https://h/p.mp4")
    with pytest.raises(SourceUnavailable, match="failed after 1000 bytes") as info:
        io.BufferedReader(reader).read()
    assert isinstance(info.value.__cause__, httpx.ReadError)
    assert reader.error is info.value


def test_part_size_keeps_parts_under_10000() -> None:
    assert storage._part_size_for(None, 8 * MiB) == 8 * MiB
    assert storage._part_size_for(200 * MiB, 8 * MiB) == 8 * MiB
    size = 100 * 1024 * MiB  # 100 GiB: 8 MiB parts would need 12,800
    part = storage._part_size_for(size, 8 * MiB)
    assert part % MiB == 0
    assert -(-size // part) <= 10_000
    assert part == 11 * MiB


def test_redact_url_keeps_no_query() -> None:
    assert storage.redact_url(URL) == "https://bucket.oss-cn-beijing.aliyuncs.com/results/t1.mp4"
    assert storage.redact_url("http://user:pw@127.0.0.1:8080/a?b=c") == "http://127.0.0.1:8080/a"


# ---------------------------------------------------------------------------------- the client


def test_make_s3_client_passes_its_config() -> None:
    client = make_s3_client(
        endpoint_url="http://127.0.0.1:9",
        region="eu-west-1",
        connect_timeout=1.5,
        read_timeout=7.0,
        max_attempts=5,
        addressing_style="path",
    )
    config = client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.connect_timeout == 1.5
    assert config.read_timeout == 7.0
    assert config.retries == {"total_max_attempts": 5, "mode": "standard"}  # 5 requests in all
    assert config.s3 == {"addressing_style": "path"}
    assert client.meta.region_name == "eu-west-1"
    assert client.meta.endpoint_url == "http://127.0.0.1:9"

    supported = make_s3_client(
        endpoint_url=None,
        region="us-east-1",
        checksum_calculation="when_supported",
        checksum_validation="when_supported",
    )
    assert supported.meta.config.request_checksum_calculation == "when_supported"
    assert supported.meta.config.response_checksum_validation == "when_supported"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"checksum_calculation": "always"},
        {"checksum_validation": "WHEN_REQUIRED"},
        {"addressing_style": "dns"},
        {"max_attempts": 0},
    ],
)
def test_make_s3_client_refuses_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_s3_client(endpoint_url=None, region="us-east-1", **kwargs)


# ---------------------------------------------------------------------------------- the copier


class FakeS3:
    """Just enough of an S3 client for S3Copier: objects, multipart uploads, tags."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploads: dict[str, dict[str, Any]] = {}
        self._uploads = 0
        self.upload_error: BaseException | None = None
        self.stop_after: int | None = None  # store only the first N bytes, then stop reading
        self.size_lie: int = 0  # added to ContentLength on HEAD
        self.head_error: BaseException | None = None
        self.copy_error: BaseException | None = None
        self.tagging_error: BaseException | None = None
        self.tags: dict[str, dict[str, str]] = {}
        self.tag_count = True  # False: HEAD never says how many tags (some S3-compatible servers)
        self._etags = 0

    def _etag(self) -> str:
        self._etags += 1
        return f'"etag-{self._etags}"'

    def create_multipart_upload(self, Bucket, Key, Metadata, ContentType):
        self.calls.append(("create_multipart_upload", {"Key": Key, "Metadata": Metadata}))
        self._uploads += 1
        upload_id = f"upload-{self._uploads}"
        self.uploads[upload_id] = {
            "Key": Key,
            "Metadata": {k.lower(): v for k, v in Metadata.items()},
            "ContentType": ContentType,
            "parts": {},
        }
        return {"UploadId": upload_id}

    def upload_part(self, Bucket, Key, UploadId, PartNumber, Body):
        self.calls.append(
            ("upload_part", {"Key": Key, "PartNumber": PartNumber, "Size": len(Body)})
        )
        if self.upload_error is not None:
            raise self.upload_error
        if UploadId not in self.uploads:
            raise client_error("NoSuchUpload", 404, "UploadPart")
        etag = f'"part-{PartNumber}-{hashlib.md5(Body).hexdigest()[:8]}"'
        self.uploads[UploadId]["parts"][PartNumber] = (bytes(Body), etag)
        return {"ETag": etag}

    def list_parts(self, Bucket, Key, UploadId, PartNumberMarker=0):
        self.calls.append(("list_parts", {"Key": Key, "UploadId": UploadId}))
        if UploadId not in self.uploads:
            raise client_error("NoSuchUpload", 404, "ListParts")
        parts = self.uploads[UploadId]["parts"]
        return {
            "Parts": [
                {"PartNumber": n, "ETag": etag, "Size": len(body)}
                for n, (body, etag) in sorted(parts.items())
                if n > PartNumberMarker
            ],
            "IsTruncated": False,
        }

    def complete_multipart_upload(self, Bucket, Key, UploadId, MultipartUpload):
        self.calls.append(("complete_multipart_upload", {"Key": Key, "UploadId": UploadId}))
        upload = self.uploads.pop(UploadId)
        stored = upload["parts"]
        chosen = [(p["PartNumber"], p["ETag"]) for p in MultipartUpload["Parts"]]
        assert [n for n, _ in chosen] == list(range(1, len(chosen) + 1))
        assert all(stored[n][1] == etag for n, etag in chosen)
        data = b"".join(stored[n][0] for n, _ in chosen)
        if self.stop_after is not None:
            data = data[: self.stop_after]
        self.objects[Key] = {
            "Body": data,
            "Metadata": upload["Metadata"],
            "ContentType": upload["ContentType"],
            "ETag": self._etag(),
        }
        self.tags.pop(Key, None)
        return {}

    def abort_multipart_upload(self, Bucket, Key, UploadId):
        self.calls.append(("abort_multipart_upload", {"Key": Key, "UploadId": UploadId}))
        if self.uploads.pop(UploadId, None) is None:
            raise client_error("NoSuchUpload", 404, "AbortMultipartUpload")
        return {}

    def put_object(self, Bucket, Key, Body, Metadata, ContentType, ContentMD5):
        self.calls.append(("put_object", {"Bucket": Bucket, "Key": Key, "Metadata": Metadata}))
        if self.upload_error is not None:
            raise self.upload_error
        assert base64.b64decode(ContentMD5) == hashlib.md5(Body).digest()
        etag = self._etag()
        self.objects[Key] = {
            "Body": bytes(Body),
            "Metadata": {k.lower(): v for k, v in Metadata.items()},
            "ContentType": ContentType,
            "ETag": etag,
        }
        self.tags.pop(Key, None)
        return {"ETag": etag}

    def put_object_tagging(self, Bucket, Key, Tagging):
        self.calls.append(("put_object_tagging", {"Bucket": Bucket, "Key": Key}))
        if self.tagging_error is not None:
            raise self.tagging_error
        assert Key in self.objects
        self.tags[Key] = {tag["Key"]: tag["Value"] for tag in Tagging["TagSet"]}
        return {}

    def get_object_tagging(self, Bucket, Key):
        self.calls.append(("get_object_tagging", {"Bucket": Bucket, "Key": Key}))
        tags = self.tags.get(Key, {})
        return {"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]}

    def head_object(self, Bucket, Key):
        self.calls.append(("head_object", {"Bucket": Bucket, "Key": Key}))
        if self.head_error is not None:
            raise self.head_error
        if Key not in self.objects:
            raise client_error("404", 404, "HeadObject")
        obj = self.objects[Key]
        return {
            "ContentLength": len(obj["Body"]) + self.size_lie,
            "Metadata": dict(obj["Metadata"]),
            "ContentType": obj["ContentType"],
            "ETag": obj["ETag"],
            **({"TagCount": len(self.tags[Key])} if self.tags.get(Key) and self.tag_count else {}),
        }

    def copy_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("copy_object", kwargs))
        if self.copy_error is not None:
            raise self.copy_error
        source = self.objects[kwargs["CopySource"]["Key"]]
        assert kwargs.get("CopySourceIfMatch") in (None, source["ETag"])
        assert kwargs["MetadataDirective"] == "REPLACE"
        etag = self._etag()
        self.objects[kwargs["Key"]] = {
            "Body": source["Body"],
            "Metadata": {k.lower(): v for k, v in kwargs["Metadata"].items()},
            "ContentType": kwargs["ContentType"],
            "ETag": etag,
        }
        return {"CopyObjectResult": {"ETag": etag}}

    def delete_object(self, Bucket, Key):
        self.calls.append(("delete_object", {"Bucket": Bucket, "Key": Key}))
        self.objects.pop(Key, None)
        return {}

    def called(self, name: str) -> list[dict[str, Any]]:
        return [args for op, args in self.calls if op == name]


def source(
    body: bytes = b"",
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    stream: Callable[[], Iterator[bytes]] | None = None,
    error: Exception | None = None,
) -> httpx.Client:
    def handler(request: httpx.Request) -> httpx.Response:
        if error is not None:
            raise error
        assert request.headers["accept-encoding"] == "identity"
        hdrs = {"content-type": "video/mp4", "content-length": str(len(body))}
        hdrs.update(headers or {})
        content = stream() if stream is not None else chunked(body)
        return httpx.Response(status, headers=hdrs, content=content)

    return httpx.Client(transport=httpx.MockTransport(handler))


def beats(saved: list[str]) -> Callable[..., None]:
    """A heartbeat that keeps every checkpoint it is handed."""

    def beat(copied: int, checkpoint: str | None = None) -> None:
        if checkpoint is not None:
            saved.append(checkpoint)

    return beat


def copier(s3: FakeS3, http: httpx.Client, **kwargs: Any) -> S3Copier:
    return S3Copier(s3, http, bucket="videos", **kwargs)  # type: ignore[arg-type]


def test_copy_streams_verifies_and_tags_sha256() -> None:
    data = payload(20 * MiB + 3)
    s3 = FakeS3()
    stored = copier(s3, source(data)).copy(URL, "jobs/j1.mp4", metadata={"Job-Id": "j1"})
    sha = hashlib.sha256(data).hexdigest()
    assert stored == StoredObject("videos", "jobs/j1.mp4", len(data), sha, '"etag-1"')
    assert stored.uri == "s3://videos/jobs/j1.mp4"
    assert stored.metadata == {"job-id": "j1"}
    obj = s3.objects["jobs/j1.mp4"]
    assert obj["Body"] == data
    assert obj["Metadata"] == {"job-id": "j1"}
    assert obj["ContentType"] == "video/mp4"
    assert s3.tags["jobs/j1.mp4"] == {"sha256": sha}
    [upload] = s3.called("create_multipart_upload")
    assert upload["Metadata"] == {"Job-Id": "j1"}
    assert [p["Size"] for p in s3.called("upload_part")] == [8 * MiB, 8 * MiB, 4 * MiB + 3]
    # no copy_object: the object's bytes are never rewritten to record the hash
    assert [op for op, _ in s3.calls if op != "upload_part"] == [
        "create_multipart_upload",
        "complete_multipart_upload",
        "head_object",
        "put_object_tagging",
    ]

    found = copier(s3, source()).find("jobs/j1.mp4")
    assert found == stored
    assert found is not None and found.metadata == stored.metadata


def test_a_video_of_one_part_is_one_put_with_its_sha256_in_metadata() -> None:
    data = payload(8 * MiB)  # exactly the part size: still one PUT
    s3 = FakeS3()
    stored = copier(s3, source(data)).copy(URL, "jobs/j2.mp4", metadata={"Job-Id": "j2"})
    sha = hashlib.sha256(data).hexdigest()
    assert stored == StoredObject("videos", "jobs/j2.mp4", len(data), sha, '"etag-1"')
    assert stored.metadata == {"job-id": "j2", "sha256": sha}
    assert s3.objects["jobs/j2.mp4"]["Body"] == data
    assert s3.objects["jobs/j2.mp4"]["Metadata"] == {"job-id": "j2", "sha256": sha}
    # one request: the fake checked Content-MD5 against the body, as S3 does
    assert [op for op, _ in s3.calls] == ["put_object"]
    assert copier(s3, source()).find("jobs/j2.mp4") == stored


def test_a_head_without_a_tag_count_still_finds_the_tagged_copy() -> None:
    s3 = FakeS3()
    s3.tag_count = False
    stored = copier(s3, source(payload(20 * MiB))).copy(URL, "k", metadata={"job-id": "j"})
    assert "TagCount" not in s3.head_object(Bucket="videos", Key="k")
    assert copier(s3, source()).find("k") == stored
    assert s3.called("get_object_tagging")


@pytest.mark.parametrize(
    "refusal",
    [
        client_error("NotImplemented", 501, "PutObjectTagging"),  # no tagging on this server
        client_error("AccessDenied", 403, "PutObjectTagging"),  # no s3:PutObjectTagging grant
    ],
)
def test_a_refused_tag_gets_the_sha256_stamped_into_metadata(refusal: Exception) -> None:
    data = payload(20 * MiB)
    s3 = FakeS3()
    s3.tagging_error = refusal
    stored = copier(s3, source(data)).copy(URL, "k", metadata={"job-id": "j"})
    sha = hashlib.sha256(data).hexdigest()
    assert stored.metadata == {"job-id": "j", "sha256": sha}
    assert stored.etag == '"etag-2"'
    assert [op for op, _ in s3.calls if op != "upload_part"] == [
        "create_multipart_upload",
        "complete_multipart_upload",
        "head_object",
        "put_object_tagging",
        "copy_object",
    ]
    [stamp] = s3.called("copy_object")
    assert stamp["CopySourceIfMatch"] == '"etag-1"'
    assert stamp["ContentType"] == "video/mp4"
    assert s3.objects["k"]["Metadata"] == {"job-id": "j", "sha256": sha}
    assert copier(s3, source()).find("k") == stored


def test_copy_without_content_length_still_verifies_the_counted_bytes() -> None:
    data = payload(MiB)
    s3 = FakeS3()

    def no_length(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"transfer-encoding": "chunked"}, content=chunked(data))

    http = httpx.Client(transport=httpx.MockTransport(no_length))
    stored = copier(s3, http).copy(URL, "k", metadata={})
    assert stored.size == len(data)
    assert s3.objects["k"]["Body"] == data


def test_copy_sizes_parts_from_content_length() -> None:
    """200 GiB announced: 8 MiB parts would need 25,600 of S3's 10,000; 21 MiB ones fit."""
    size = 200 * 1024 * MiB  # announced; the fake sends 30 MiB, then the line drops
    s3 = FakeS3()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-length": str(size)}, content=chunked(payload(30 * MiB))
        )

    with pytest.raises(SourceUnavailable, match="ended short"):
        copier(s3, httpx.Client(transport=httpx.MockTransport(handler))).copy(URL, "k", metadata={})
    assert [p["Size"] for p in s3.called("upload_part")] == [21 * MiB]


@pytest.mark.parametrize(
    "body",
    [
        b"<Error><Code>AccessDenied</Code><Message>Access denied.</Message></Error>",
        b"<html>403 Forbidden (WAF)</html>",
        b"",
    ],
)
def test_a_403_that_does_not_say_expired_is_retried(body: bytes) -> None:
    """Only the body (or the clock, in the pipeline) makes a 403 mean "expired": any other
    403 (a policy blip, a proxy) is transient, so a paid video is not given up for it."""
    with pytest.raises(SourceUnavailable) as info:
        copier(FakeS3(), source(body, status=403)).copy(URL, "k", metadata={})
    assert "403" in str(info.value) and SIGNATURE not in str(info.value)


def test_expired_url_is_source_expired_without_the_signature() -> None:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n  <Code>AccessDenied</Code>\n'
        f"  <Message>Request has expired.</Message>\n  <Signature>{SIGNATURE}</Signature>\n</Error>\n"
    ).encode()
    s3 = FakeS3()
    with pytest.raises(SourceExpired) as info:
        copier(s3, source(body, status=403)).copy(URL, "k", metadata={})
    message = str(info.value)
    assert "403" in message and "Request has expired." in message
    assert "bucket.oss-cn-beijing.aliyuncs.com/results/t1.mp4" in message
    assert SIGNATURE not in message and "Expires=" not in message and "t1.mp4?" not in message
    assert s3.calls == []


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, SourceRejected),
        (410, SourceRejected),
        (400, SourceRejected),
        (408, SourceUnavailable),
        (429, SourceUnavailable),
        (500, SourceUnavailable),
        (503, SourceUnavailable),
    ],
)
def test_source_status_mapping(status: int, error: type[Exception]) -> None:
    s3 = FakeS3()
    with pytest.raises(error, match=f"HTTP {status}"):
        copier(s3, source(b"<Error/>", status=status)).copy(URL, "k", metadata={})
    assert s3.calls == []


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("slow"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
)
def test_transport_errors_before_the_body_are_source_unavailable(exc: Exception) -> None:
    s3 = FakeS3()
    with pytest.raises(SourceUnavailable) as info:
        copier(s3, source(error=exc)).copy(URL, "k", metadata={})
    assert info.value.__cause__ is exc
    assert SIGNATURE not in str(info.value)
    assert s3.calls == []


def test_bad_scheme_is_source_rejected() -> None:
    with pytest.raises(SourceRejected):
        copier(FakeS3(), httpx.Client()).copy("ftp://h/v.mp4", "k", metadata={})


@pytest.mark.parametrize("size", [MiB, 20 * MiB])  # single PUT and multipart paths
def test_error_mid_body_stores_nothing(size: int) -> None:
    data = payload(size)

    def broken() -> Iterator[bytes]:
        yield from chunked(data[: size // 2])
        raise httpx.ReadTimeout("timed out")

    s3 = FakeS3()
    with pytest.raises(SourceUnavailable, match="ReadTimeout") as info:
        copier(s3, source(data, stream=broken)).copy(URL, "k", metadata={})
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert s3.objects == {}


@pytest.mark.parametrize("size", [MiB, 20 * MiB])
def test_body_shorter_than_content_length_stores_nothing(size: int) -> None:
    data = payload(size)
    s3 = FakeS3()
    http = source(data, stream=lambda: chunked(data[: size // 2]))
    with pytest.raises(SourceUnavailable, match="ended short"):
        copier(s3, http).copy(URL, "k", metadata={})
    assert s3.objects == {}
    assert copier(s3, http).find("k") is None


def test_a_source_error_mid_upload_surfaces_as_itself_and_keeps_the_upload() -> None:
    """The source breaks after two parts: SourceUnavailable (not a storage error), nothing is
    stored under the key, and the open upload's checkpoint holds the two parts done."""
    data = payload(30 * MiB)
    saved: list[str] = []
    s3 = FakeS3()
    http = source(data, stream=lambda: chunked(data[: 17 * MiB]))
    with pytest.raises(SourceUnavailable, match="ended short"):
        copier(s3, http).copy(URL, "k", metadata={}, heartbeat=beats(saved))
    assert s3.objects == {} and len(s3.uploads) == 1
    point = Checkpoint.from_json(saved[-1])
    assert point is not None and (point.parts, point.offset, point.total) == (2, 16 * MiB, 30 * MiB)
    assert point.sha256() == hashlib.sha256(data[: 16 * MiB]).hexdigest()


@pytest.mark.parametrize(
    "exc",
    [
        client_error("NoSuchBucket", 404),
        client_error("AccessDenied", 403),
        client_error("InternalError", 500),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    ],
)
@pytest.mark.parametrize("size", [MiB, 20 * MiB])  # single PUT and multipart paths
def test_s3_failures_are_storage_unavailable(exc: Exception, size: int) -> None:
    s3 = FakeS3()
    s3.upload_error = exc
    with pytest.raises(StorageUnavailable) as info:
        copier(s3, source(payload(size))).copy(URL, "k", metadata={})
    assert info.value.__cause__ is exc
    assert "s3://videos/k" in str(info.value)


def test_head_tag_and_stamp_failures_are_storage_unavailable() -> None:
    s3 = FakeS3()
    s3.tagging_error = client_error("InternalError", 500, "PutObjectTagging")
    with pytest.raises(StorageUnavailable, match=r"tagging of s3://videos/k.*InternalError"):
        copier(s3, source(payload(20 * MiB))).copy(URL, "k", metadata={})
    assert copier(s3, source()).find("k") is None  # uploaded but never tagged: not a copy

    s3 = FakeS3()
    s3.tagging_error = client_error("NotImplemented", 501, "PutObjectTagging")
    s3.copy_error = client_error("PreconditionFailed", 412, "CopyObject")
    with pytest.raises(StorageUnavailable, match="PreconditionFailed"):
        copier(s3, source(payload(20 * MiB))).copy(URL, "k", metadata={})
    assert copier(s3, source()).find("k") is None  # uploaded but never stamped: not a copy

    s3 = FakeS3()
    s3.head_error = client_error("InternalError", 500, "HeadObject")
    with pytest.raises(StorageUnavailable):
        copier(s3, source()).find("k")


def test_size_mismatch_deletes_and_raises_copy_mismatch() -> None:
    s3 = FakeS3()
    s3.size_lie = -1
    with pytest.raises(CopyMismatch, match="holds 20971519 bytes but 20971520"):
        copier(s3, source(payload(20 * MiB))).copy(URL, "k", metadata={})
    assert s3.objects == {}
    assert s3.called("delete_object") == [{"Bucket": "videos", "Key": "k"}]
    assert s3.called("put_object_tagging") == []


def test_a_store_that_keeps_less_than_was_sent_is_caught() -> None:
    """The naive-reader trap seen from the other side: S3 holds less than the source had (the
    size is checked after the upload); the short object is deleted."""
    s3 = FakeS3()
    s3.stop_after = 8 * MiB
    with pytest.raises(CopyMismatch, match="holds 8388608 bytes but 20971520"):
        copier(s3, source(payload(20 * MiB))).copy(URL, "k", metadata={})
    assert s3.objects == {}


def test_objects_over_5_gib_skip_the_stamping_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_MAX_COPY_OBJECT_SIZE", 1000)
    s3 = FakeS3()
    s3.tagging_error = client_error("NotImplemented", 501, "PutObjectTagging")
    data = payload(6 * MiB)
    stored = copier(s3, source(data), part_size=5 * MiB).copy(URL, "k", metadata={"job-id": "j"})
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.etag == '"etag-1"'
    assert s3.called("copy_object") == []
    assert copier(s3, source()).find("k") is None


def test_repeat_copy_overwrites_with_the_same_content() -> None:
    data = payload(MiB)
    s3 = FakeS3()
    first = copier(s3, source(data)).copy(URL, "k", metadata={"job-id": "j"})
    second = copier(s3, source(data)).copy(URL, "k", metadata={"job-id": "j"})
    assert (first.size, first.sha256) == (second.size, second.sha256)
    assert len(s3.objects) == 1


def test_find_absent_is_none() -> None:
    assert copier(FakeS3(), source()).find("nope") is None


def test_metadata_and_constructor_are_checked() -> None:
    c = copier(FakeS3(), source(b"x"))
    with pytest.raises(ValueError, match="reserved"):
        c.copy(URL, "k", metadata={"SHA256": "x"})
    with pytest.raises(ValueError, match="ASCII"):
        c.copy(URL, "k", metadata={"job": "é"})
    with pytest.raises(ValueError):
        copier(FakeS3(), source(), part_size=MiB)
    with pytest.raises(ValueError):
        copier(FakeS3(), source(), max_concurrency=0)


def test_logs_never_carry_the_signature(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    copier(FakeS3(), source(payload(1000))).copy(URL, "k", metadata={})
    with pytest.raises(SourceExpired):
        copier(FakeS3(), source(b"Request has expired.", status=403)).copy(URL, "k", metadata={})
    assert "copied https://bucket.oss-cn-beijing.aliyuncs.com/results/t1.mp4" in caplog.text
    assert SIGNATURE not in caplog.text
    assert "Signature=***" in caplog.text  # httpx's own request line, redacted by our filter


def test_redact_filter_blanks_signed_query_values() -> None:
    record = logging.LogRecord("httpx", logging.INFO, __file__, 1, "GET %s", (URL,), None)
    assert storage.RedactSignedUrls().filter(record)
    assert record.getMessage() == (
        "GET https://bucket.oss-cn-beijing.aliyuncs.com/results/t1.mp4"
        "?Expires=1700000000&OSSAccessKeyId=***&Signature=***"
    )
    presigned = "https://s3/x?X-Amz-Credential=AKIA%2F&X-Amz-Signature=abc&X-Amz-Security-Token=t"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, presigned, None, None)
    storage.RedactSignedUrls().filter(record)
    assert record.getMessage() == (
        "https://s3/x?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***"
    )


@pytest.mark.parametrize(
    ("mode", "algorithm"), [("when_supported", "CRC32"), ("when_required", None)]
)
def test_stamping_copy_asks_for_a_fresh_checksum_only_when_checksums_are_on(
    mode: str, algorithm: str | None
) -> None:
    s3 = FakeS3()
    s3.meta = type("Meta", (), {"config": type("C", (), {"request_checksum_calculation": mode})})  # type: ignore[attr-defined]
    s3.tagging_error = client_error("NotImplemented", 501, "PutObjectTagging")
    copier(s3, source(payload(9 * MiB))).copy(URL, "k", metadata={})
    [stamp] = s3.called("copy_object")
    assert stamp.get("ChecksumAlgorithm") == algorithm


# ---------------------------------------------------------------------------------- resuming


class Ranged:
    """A source that serves HTTP ranges (206 + Content-Range) unless told not to."""

    def __init__(self, data: bytes, *, ranges: bool = True, etag: str = '"src-1"') -> None:
        self.data, self.ranges, self.etag = data, ranges, etag
        self.requests: list[dict[str, str]] = []

    def client(self) -> httpx.Client:
        def handler(request: httpx.Request) -> httpx.Response:
            self.requests.append(dict(request.headers))
            wanted = request.headers.get("range")
            if wanted and self.ranges and request.headers.get("if-range") in (None, self.etag):
                start = int(wanted.removeprefix("bytes=").rstrip("-"))
                body = self.data[start:]
                headers = {
                    "content-length": str(len(body)),
                    "content-range": f"bytes {start}-{len(self.data) - 1}/{len(self.data)}",
                    "etag": self.etag,
                }
                return httpx.Response(206, headers=headers, content=chunked(body))
            headers = {"content-length": str(len(self.data)), "etag": self.etag}
            return httpx.Response(200, headers=headers, content=chunked(self.data))

        return httpx.Client(transport=httpx.MockTransport(handler))


class Ticks:
    """A clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def paused_copy(s3: FakeS3, src: Ranged, budget: float = 2.5) -> str:
    """A copy that runs out of its budget after a few parts: its checkpoint."""
    from workers.errors import CopyPaused

    c = copier(s3, src.client(), clock=Ticks())
    with pytest.raises(CopyPaused) as info:
        c.copy(URL, "k", metadata={"job-id": "j"}, budget=budget)
    return info.value.checkpoint


def test_a_paused_copy_goes_on_where_it_stopped() -> None:
    """Out of time after two parts: the upload stays open; the next attempt (another copier, as
    in another process) asks the source for the rest only, uploads only the missing parts, and
    the whole video is stored with the SHA-256 of all of it."""
    data = payload(30 * MiB + 5)
    s3, src = FakeS3(), Ranged(data)
    checkpoint = paused_copy(s3, src)
    point = Checkpoint.from_json(checkpoint)
    assert point is not None and point.parts == 2 and point.etag == '"src-1"'
    assert s3.objects == {} and len(s3.uploads) == 1
    parts_before = len(s3.called("upload_part"))

    stored = copier(s3, src.client()).copy(URL, "k", metadata={"job-id": "j"}, resume=checkpoint)
    assert src.requests[-1]["range"] == f"bytes={16 * MiB}-"
    assert src.requests[-1]["if-range"] == '"src-1"'
    assert [p["PartNumber"] for p in s3.called("upload_part")[parts_before:]] == [3, 4]
    assert s3.objects["k"]["Body"] == data
    assert stored.size == len(data) and stored.sha256 == hashlib.sha256(data).hexdigest()
    assert s3.tags["k"] == {"sha256": stored.sha256}
    assert s3.uploads == {}


def test_a_source_that_ignores_the_range_starts_over() -> None:
    """The source answers 200 with the whole video (no ranges, or it changed): the old upload is
    aborted and the copy starts from the first byte."""
    data = payload(30 * MiB)
    s3, src = FakeS3(), Ranged(data)
    checkpoint = paused_copy(s3, src)
    src.ranges = False
    stored = copier(s3, src.client()).copy(URL, "k", metadata={}, resume=checkpoint)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert len(s3.called("abort_multipart_upload")) == 1
    assert s3.objects["k"]["Body"] == data and s3.uploads == {}


def test_a_checkpoint_whose_upload_is_gone_starts_over() -> None:
    """The bucket's lifecycle rule (or someone) removed the open upload: start over, whole."""
    data = payload(30 * MiB)
    s3, src = FakeS3(), Ranged(data)
    checkpoint = paused_copy(s3, src)
    s3.uploads.clear()
    stored = copier(s3, src.client()).copy(URL, "k", metadata={}, resume=checkpoint)
    assert "range" not in src.requests[-1]
    assert s3.objects["k"]["Body"] == data and stored.size == len(data)


def test_an_upload_completed_by_an_attempt_that_then_died_is_recognised() -> None:
    """The last checkpoint names every part; the attempt completed the upload and died before
    tagging it. The next attempt finds the object, checks its size, tags it with the hash the
    checkpoint carries, and downloads nothing."""
    data = payload(20 * MiB)
    s3, src = FakeS3(), Ranged(data)
    saved: list[str] = []
    s3.tagging_error = KeyboardInterrupt()  # the process dies right after completing
    with pytest.raises(KeyboardInterrupt):
        copier(s3, src.client()).copy(URL, "k", metadata={}, heartbeat=beats(saved))
    s3.tagging_error = None
    point = Checkpoint.from_json(saved[-1])
    assert point is not None and point.complete
    requests = len(src.requests)
    stored = copier(s3, src.client()).copy(URL, "k", metadata={}, resume=saved[-1])
    assert len(src.requests) == requests  # nothing downloaded again
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert s3.tags["k"] == {"sha256": stored.sha256}


def test_abort_frees_the_upload_and_is_quiet_when_it_is_gone() -> None:
    s3, src = FakeS3(), Ranged(payload(30 * MiB))
    checkpoint = paused_copy(s3, src)
    c = copier(s3, src.client())
    c.abort("k", checkpoint)
    assert s3.uploads == {}
    c.abort("k", checkpoint)  # already gone: nothing raised
    c.abort("k", "not json")
    assert len(s3.called("abort_multipart_upload")) == 2


def test_a_garbled_checkpoint_is_ignored() -> None:
    """A checkpoint that does not parse (or names nothing usable) means: start over."""
    for raw in (None, "", "{", '{"upload_id": ""}', '{"upload_id": "u", "part_size": 0}'):
        assert Checkpoint.from_json(raw) is None
