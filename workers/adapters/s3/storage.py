"""The S3 adapter: stream a finished video from its signed URL into S3, verified, without holding it.

It owns four things:

- ``make_s3_client``: a boto3 S3 client whose checksum behaviour, timeouts, retries and addressing
  style are explicit (boto3 >= 1.36 sends CRC32 headers by default, which several S3-compatible
  servers refuse). Credentials always come from boto3's own chain (``AWS_*`` env, profile, role).
- ``SourceReader``: an ``io.RawIOBase`` fed from an httpx byte iterator. Wrapped in
  ``io.BufferedReader`` it never short-reads (the truncation trap of a naive ``read`` that returns
  one network chunk: ``upload_fileobj`` then stores a fraction of the video without an error). It
  counts and SHA-256-hashes every byte, and at end of stream it *raises* if the count differs from
  ``Content-Length``, so s3transfer aborts the upload instead of completing a short object.
- ``S3Copier``: ``copy(source_url, key, metadata=...)`` GETs the URL. A video of at most one part
  (by Content-Length; 8 MiB by default, which most AnimateAnyone videos are) is read, hashed and
  stored with one PUT carrying ``sha256`` in its metadata and a Content-MD5. A bigger one streams
  through the reader into ``upload_fileobj`` (managed multipart, bounded memory); its stored size is
  checked with a HEAD, and its SHA-256, known only once the stream ends, becomes the object's
  ``sha256`` tag. A server without object tagging gets it in the metadata instead, by a
  ``copy_object`` of the object onto itself (which rewrites every byte, and stops at 5 GiB: a
  bigger video there is stored and verified but never recognised by ``find``). ``find(key)``
  recognises a finished copy by its ``sha256`` metadata or tag; the key is chosen by the caller
  and deterministic, so a repeat simply overwrites identical bytes.
- ``RedactSignedUrls``: a logging filter that S3Copier puts on the ``httpx`` logger, whose INFO
  line ``HTTP Request: GET <url>`` would otherwise carry the URL's ``Signature``.

Errors are the project's tree (``workers.errors``): a 403 whose body says the request has expired
is ``SourceExpired``; other 4xx ``SourceRejected``; other 403s, 5xx, 408, 429, timeouts, dropped
or short bodies ``SourceUnavailable``; anything S3 or botocore refuses or fails at ``StorageUnavailable`` (a
missing bucket is an operator problem, and retrying it keeps a paid video alive until the URL
expires); a stored size that differs from what was streamed ``CopyMismatch``.

Secrets never reach a message or a log line: the source URL is reduced to scheme, host and path (its
query carries the OSS signature), and AWS credentials are never handled here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import boto3
import httpx
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from workers.adapters.s3.multipart import (
    Checkpoint,
    PartUploads,
    hash_state,
    new_hash,
    restore_hash,
)
from workers.errors import (
    CopyMismatch,
    CopyPaused,
    SourceExpired,
    SourceRejected,
    SourceUnavailable,
    StorageUnavailable,
    WorkerError,
)

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer
    from mypy_boto3_s3.client import S3Client

__all__ = [
    "RedactSignedUrls",
    "S3Copier",
    "SourceReader",
    "StoredObject",
    "make_s3_client",
    "redact_url",
]

logger = logging.getLogger(__name__)

MiB: Final = 1024 * 1024
CONTENT_TYPE: Final = "video/mp4"
SHA256_KEY: Final = "sha256"  # the metadata key the copier owns (S3 returns keys lowercased)

_MIN_PART_SIZE: Final = 5 * MiB  # S3's smallest part (all but the last)
_MAX_PART_SIZE: Final = 5 * 1024 * MiB  # S3's largest part
_MAX_PARTS: Final = 10_000  # S3's part-number limit
_MAX_COPY_OBJECT_SIZE: Final = 5 * 1024 * MiB  # CopyObject refuses larger sources
_READ_BUFFER: Final = 1 * MiB  # io.BufferedReader's buffer over the SourceReader
_ERROR_EXCERPT: Final = 200  # characters of a refusal's body kept in the message
_METADATA_TEXT = re.compile(r"[\x20-\x7e]*")
# query parameters that carry a signature or a credential (OSS, S3 presigned, STS)
_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:[\w.-]*signature|[\w.-]*credential|[\w.-]*token|ossaccesskeyid)=)[^&\s\"'<>]+"
)


@dataclass(frozen=True)
class StoredObject:
    """A verified copy in S3: its size and SHA-256 are those of the bytes streamed from the source."""

    bucket: str
    key: str
    size: int
    sha256: str  # hex
    etag: str | None  # S3's ETag, quotes included; not an MD5 for multipart objects
    # user metadata as S3 returns it (keys lowercased); "sha256" is in it for a single-PUT copy,
    # in the object's tags for a multipart one (or in it again where the server has no tagging)
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def make_s3_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    checksum_calculation: str = "when_required",
    checksum_validation: str = "when_required",
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_attempts: int = 3,
    addressing_style: str = "auto",
) -> S3Client:
    """A boto3 S3 client with explicit checksum, timeout, retry and addressing settings.

    ``checksum_calculation``/``checksum_validation`` are botocore's ``request_checksum_calculation``
    and ``response_checksum_validation``: "when_required" (works with every S3-compatible server)
    or "when_supported" (boto3's default since 1.36: CRC32 on every upload). Credentials come from
    boto3's chain, never from here. A fresh ``boto3.session.Session`` is used because the default
    session is not thread-safe.
    """
    calculation = _checksum_mode("checksum_calculation", checksum_calculation)
    validation = _checksum_mode("checksum_validation", checksum_validation)
    style = _addressing_style(addressing_style)
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
    config = Config(
        request_checksum_calculation=calculation,
        response_checksum_validation=validation,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # total_max_attempts counts the first try (as AWS_MAX_ATTEMPTS does); botocore's
        # retries["max_attempts"] would count retries only (3 there means 4 requests).
        retries={"total_max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": style},
        # Presigned input URLs: botocore would sign them SigV2 in us-east-1, which S3 buckets
        # made since 2020 refuse.
        signature_version="s3v4",
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _checksum_mode(name: str, value: str) -> Literal["when_required", "when_supported"]:
    if value == "when_required":
        return "when_required"
    if value == "when_supported":
        return "when_supported"
    raise ValueError(f"{name} must be 'when_required' or 'when_supported', not {value!r}")


def _addressing_style(value: str) -> Literal["auto", "virtual", "path"]:
    if value == "auto":
        return "auto"
    if value == "virtual":
        return "virtual"
    if value == "path":
        return "path"
    raise ValueError(f"addressing_style must be 'auto', 'virtual' or 'path', not {value!r}")


def redact_url(url: str | httpx.URL) -> str:
    """Scheme, host, port and path only: the query of a signed URL carries its signature."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<unparseable url>"
    port = f":{parsed.port}" if parsed.port is not None else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path}"


class RedactSignedUrls(logging.Filter):
    """Blanks signature and credential query parameters out of a logger's records.

    httpx logs every request at INFO as ``HTTP Request: GET <full url> ...``, which for a signed
    video URL includes its ``Signature``. ``S3Copier`` installs this filter on the ``httpx``
    logger (once per process); wiring may install it on other loggers too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = _SECRET_PARAM.sub(r"\1***", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _redact_httpx_logs() -> None:
    httpx_logger = logging.getLogger("httpx")
    if not any(isinstance(f, RedactSignedUrls) for f in httpx_logger.filters):
        httpx_logger.addFilter(RedactSignedUrls())


class SourceReader(io.RawIOBase):
    """A non-seekable raw stream over an iterator of byte chunks, counted and hashed as it goes.

    Wrap it in ``io.BufferedReader`` before handing it to boto3: ``BufferedReader.read(n)`` loops
    over ``readinto`` until it has ``n`` bytes or the end, which is what s3transfer's non-seekable
    upload path relies on. It holds at most one pending chunk (a ``memoryview``, not a copy).

    At the end of the iterator it checks the count against ``expected_size`` (the
    ``Content-Length``) and raises ``SourceUnavailable`` from inside ``readinto`` when they differ;
    a body that runs longer fails as soon as it does. An ``httpx.HTTPError`` from the iterator
    becomes ``SourceUnavailable`` too. The error is kept in ``error`` (and raised again on any later
    read), so the caller can recognise it whatever the consumer did with it.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        *,
        expected_size: int | None,
        source: str,
        heartbeat: Callable[[int], None] | None = None,
        heartbeat_every: float = 5.0,
    ) -> None:
        super().__init__()
        self._chunks = chunks
        # Called with the bytes so far every ``heartbeat_every`` seconds while bytes flow (a copy
        # renews its lease and reports progress);
        # whatever it raises aborts the upload.
        self._heartbeat = heartbeat
        self._heartbeat_every = heartbeat_every
        self._last_beat = time.monotonic()
        self._expected = expected_size
        self._source = source  # already redacted: it goes into messages
        self._pending = memoryview(b"")
        self._sha = hashlib.sha256()
        self._count = 0
        self._finished = False
        self.error: WorkerError | None = None

    @property
    def size(self) -> int:
        """Bytes received from the source so far."""
        return self._count

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes received so far (of the whole body once ``finished``)."""
        return self._sha.hexdigest()

    @property
    def finished(self) -> bool:
        """True once the whole body was read and matched ``expected_size``."""
        return self._finished

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        if self.error is not None:
            raise self.error
        target = memoryview(buffer).cast("B")
        if len(target) == 0:
            return 0
        while not self._pending:
            if self._finished:
                return 0
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._finish()
                return 0
            except httpx.HTTPError as exc:
                raise self._fail(
                    f"download of {self._source} failed after {self._count} bytes: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if not chunk:
                continue
            if self._heartbeat is not None and (
                time.monotonic() - self._last_beat >= self._heartbeat_every
            ):
                self._last_beat = time.monotonic()
                self._heartbeat(self._count)
            self._sha.update(chunk)
            self._count += len(chunk)
            if self._expected is not None and self._count > self._expected:
                raise self._fail(
                    f"download of {self._source} sent more than its Content-Length "
                    f"({self._count} > {self._expected} bytes)"
                )
            self._pending = memoryview(chunk)
        n = min(len(target), len(self._pending))
        target[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._pending = memoryview(b"")
        super().close()

    def _finish(self) -> None:
        if self._expected is not None and self._count != self._expected:
            raise self._fail(
                f"download of {self._source} ended short: {self._count} of {self._expected} bytes "
                "(Content-Length)"
            )
        self._finished = True

    def _fail(self, message: str) -> SourceUnavailable:
        error = SourceUnavailable(message)
        self.error = error
        self._pending = memoryview(b"")
        return error


class Heartbeat(Protocol):
    def __call__(self, copied: int, checkpoint: str | None = None, /) -> None: ...


@dataclass
class _Job:
    """One copy's own settings, handed down the steps."""

    key: str
    metadata: Mapping[str, str]
    source: str
    heartbeat: Heartbeat | None
    budget: float | None
    every: float = 5.0  # seconds between checkpoints saved while parts flow

    def beat(self, copied: int, checkpoint: str | None = None) -> None:
        if self.heartbeat is not None:
            self.heartbeat(copied, checkpoint)


def _continues(response: httpx.Response, point: Checkpoint) -> bool:
    """Whether a response is the rest of the video from the checkpoint's offset on."""
    if response.status_code != 206:
        return False
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("content-range", ""))
    return match is not None and int(match[1]) == point.offset and int(match[3]) == point.total


def _part_size_for(size: int | None, minimum: int) -> int:
    """The multipart chunk size: ``minimum``, or more so that ``size`` fits in 10,000 parts.

    s3transfer only adjusts the chunk size when it knows the size, which it never does for a
    non-seekable stream; at 8 MiB an unknown-size stream would fail past ~78 GiB.
    """
    if size is None or size <= 0:
        return minimum
    per_part = -(-size // _MAX_PARTS)
    rounded = -(-per_part // MiB) * MiB
    return max(minimum, rounded)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _is_not_implemented(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 501 or error.get("Code") in ("NotImplemented", "501")


def _is_not_found(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or error.get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Copier:
    """Copies videos from (signed, expiring) URLs into one bucket, streaming and verified.

    ``part_size`` is the multipart threshold and the smallest part; ``max_concurrency`` the part
    uploads in flight; ``max_in_memory_chunks`` the parts read ahead. s3transfer submits no more
    parts than ``max_in_memory_chunks`` at a time, so at most min(the two) uploads run and the
    buffers hold about ``(max_in_memory_chunks + 1) * part size`` plus a 1 MiB read buffer
    (``bench/copy.py`` measures it).
    """

    def __init__(
        self,
        s3: S3Client,
        http: httpx.Client,
        *,
        bucket: str,
        part_size: int = 8 * MiB,
        max_concurrency: int = 4,
        max_in_memory_chunks: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not _MIN_PART_SIZE <= part_size <= _MAX_PART_SIZE:
            raise ValueError(f"part_size must be between 5 MiB and 5 GiB, not {part_size}")
        if max_concurrency < 1 or max_in_memory_chunks < 1:
            raise ValueError("max_concurrency and max_in_memory_chunks must be at least 1")
        if not bucket:
            raise ValueError("bucket must not be empty")
        _redact_httpx_logs()
        self._s3 = s3
        self._http = http
        self.bucket = bucket
        self._part_size = part_size
        self._max_concurrency = max_concurrency
        self._max_in_memory_chunks = max_in_memory_chunks
        self._clock = clock  # measures an attempt's budget

    # ------------------------------------------------------------------------------ public

    def copy(
        self,
        source_url: str,
        key: str,
        *,
        metadata: dict[str, str],
        heartbeat: Heartbeat | None = None,
        resume: str | None = None,
        budget: float | None = None,
    ) -> StoredObject:
        """Stream ``source_url`` into ``s3://bucket/key``, verify it, and stamp its SHA-256.

        Metadata keys and values must be printable ASCII (S3 sends them as headers); "sha256" is
        reserved. Raises the ``workers.errors`` classes listed in the module docstring. When it
        raises, ``find(key)`` reports no new copy: nothing is stored under ``key`` until the
        whole video is, a size mismatch deletes the object, and an object whose stamping failed
        has no "sha256".

        A multipart copy keeps its upload open when it fails or runs out of ``budget`` seconds
        (then it raises :class:`~workers.errors.CopyPaused`): ``heartbeat(bytes, checkpoint)``
        is handed a checkpoint (JSON) now and then, and a later call given it as ``resume`` goes
        on from there instead of starting over. ``abort(key, checkpoint)`` gives the upload up.
        """
        self._check_metadata(metadata)
        source = redact_url(source_url)
        point = Checkpoint.from_json(resume)
        etags: dict[int, str] = {}
        if point is not None:
            found = self._reopen(key, point, source)
            if isinstance(found, StoredObject):
                return found
            point, etags = found if found is not None else (None, {})
        headers = {"Accept-Encoding": "identity"}
        if point is not None:
            headers["Range"] = f"bytes={point.offset}-"
            if point.etag:
                headers["If-Range"] = point.etag
        try:
            with self._http.stream(
                "GET", source_url, headers=headers, follow_redirects=True
            ) as response:
                self._check_status(response, source_url, source)
                if point is not None and not _continues(response, point):
                    # The source sent the whole video (no ranges, or it changed): start over.
                    logger.info("%s: the source did not resume at byte %d; copying from the "
                                "start", self._uri(key), point.offset)  # fmt: skip
                    self.abort(key, point.to_json())
                    point, etags = None, {}
                    if response.status_code != 200:
                        raise SourceUnavailable(f"{source} answered a range we did not ask for")
                job = _Job(key, metadata, source, heartbeat, budget)
                return self._store(response, job, point, etags)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            raise SourceRejected(f"cannot download {source}: {exc}") from exc
        except httpx.HTTPError as exc:
            raise SourceUnavailable(
                f"download of {source} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def abort(self, key: str, checkpoint: str | None) -> None:
        """Give up the unfinished multipart upload a checkpoint names (its parts are deleted).
        Quiet: an upload already gone, or S3 down (the bucket's lifecycle rule sweeps it)."""
        point = Checkpoint.from_json(checkpoint)
        if point is not None:
            self._abort_upload(key, point.upload_id)

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (BotoCoreError, ClientError) as exc:
            logger.info("could not abort the upload of %s (%s); the lifecycle rule will",
                        self._uri(key), type(exc).__name__)  # fmt: skip

    def find(self, key: str) -> StoredObject | None:
        """The stored copy under ``key``, or None when there is none.

        None also when the object exists but carries no "sha256" metadata: such an object is not
        a finished copy (the process died between upload and stamping, or it is over 5 GiB, where
        the stamping self-copy is not possible), so the caller should copy again.
        """
        head = self._head(key)
        if head is None:
            return None
        metadata = dict(head.get("Metadata", {}))
        sha256 = metadata.get(SHA256_KEY) or self._tagged_sha256(key, head)
        if not sha256:
            return None
        return StoredObject(
            bucket=self.bucket,
            key=key,
            size=int(head.get("ContentLength", 0)),
            sha256=sha256,
            etag=head.get("ETag"),
            metadata=metadata,
        )

    # ------------------------------------------------------------------------------ steps

    @staticmethod
    def _check_metadata(metadata: Mapping[str, str]) -> None:
        for name, value in metadata.items():
            if (
                not name
                or not _METADATA_TEXT.fullmatch(name)
                or not _METADATA_TEXT.fullmatch(value)
            ):
                raise ValueError(f"metadata must be printable ASCII: {name!r}")
            if name.lower() == SHA256_KEY:
                raise ValueError(f"metadata key {SHA256_KEY!r} is reserved for the copier")

    @staticmethod
    def _check_status(response: httpx.Response, source_url: str, source: str) -> None:
        status = response.status_code
        if status in (200, 206):
            return
        excerpt = _error_excerpt(response, source_url)
        message = f"{source} answered HTTP {status}: {excerpt}"
        if status == 403 and "expired" in excerpt.lower():
            raise SourceExpired(message)  # OSS and S3: "Request has expired."
        if status in (403, 408, 429) or status >= 500:
            # A 403 that does not say so is not taken for expiry (the pipeline also knows the
            # URL's Expires): a policy blip or a proxy must not cost a paid video.
            raise SourceUnavailable(message)
        raise SourceRejected(message)

    def _store(
        self,
        response: httpx.Response,
        job: _Job,
        point: Checkpoint | None,
        etags: dict[int, str],
    ) -> StoredObject:
        length = _content_length(response)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            chunks = response.iter_raw()
            expected = length
        else:  # refused our Accept-Encoding: identity; Content-Length counts the encoded bytes
            chunks = response.iter_bytes()
            expected = None
        reader = SourceReader(
            chunks,
            expected_size=expected,
            source=job.source,
            heartbeat=job.beat if job.heartbeat is not None else None,
        )
        body = io.BufferedReader(reader, buffer_size=_READ_BUFFER)
        try:
            if point is None and expected is not None and expected <= self._part_size:
                return self._put_whole(body, reader, job.key, job.metadata, job.source)
            total = point.total if point is not None else expected
            etag = response.headers.get("etag") if point is None else point.etag
            return self._put_multipart(body, reader, job, total, etag, point, etags)
        finally:
            body.close()

    def _put_whole(
        self,
        body: io.BufferedReader[SourceReader],
        reader: SourceReader,
        key: str,
        metadata: Mapping[str, str],
        source: str,
    ) -> StoredObject:
        """A video of at most one part: read it (bounded by the part size), hash it, one PUT.

        The SHA-256 is known before the PUT, so it goes into the metadata directly; Content-MD5
        makes the server check the bytes it stores, so no HEAD is needed afterwards.
        """
        data = body.read()  # SourceReader raises on a body longer or shorter than Content-Length
        if not reader.finished:
            raise CopyMismatch(f"download of {source} stopped after {reader.size} bytes")
        final = {name.lower(): value for name, value in metadata.items()}
        final[SHA256_KEY] = reader.sha256
        digest = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        try:
            result = self._s3.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                Metadata=final,
                ContentType=CONTENT_TYPE,
                ContentMD5=digest,
            )
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise self._storage_error("upload to", key, exc) from exc
        return self._stored(key, reader, result.get("ETag"), final, source)

    def _put_multipart(
        self,
        body: io.BufferedReader[SourceReader],
        reader: SourceReader,
        job: _Job,
        total: int | None,
        source_etag: str | None,
        point: Checkpoint | None,
        etags: dict[int, str],
    ) -> StoredObject:
        """Stream a bigger video (or one of unknown length) as a multipart upload, part by part,
        a bounded number in flight, from ``point`` when a checkpoint resumes it.

        The SHA-256 is only known once the stream ends, after the object's metadata was sent, so
        it becomes the object's ``sha256`` tag (a metadata-only call). Servers without tagging get
        the old way: the object copied onto itself with the hash in its metadata, which rewrites
        every byte (27 % of a 1 GiB copy on moto, bench/copy_speed.py).
        """
        key = job.key
        upload_id, part_size, hasher, first, states = self._open_upload(job, total, point)

        def checkpoint(parts: int) -> Checkpoint | None:
            if total is None:
                return None  # a length we do not know cannot be resumed with a range
            return Checkpoint(upload_id, part_size, total, parts, states[parts], source_etag)

        uploads = PartUploads(
            lambda number, data: self._upload_part(key, upload_id, number, data),
            concurrency=self._max_concurrency,
            in_flight=self._max_in_memory_chunks,
            first=first,
            etags=etags,
        )
        beat = _Beat(job, reader, lambda: checkpoint(uploads.done))
        number = first
        stop_at = self._clock() + job.budget if job.budget is not None else None
        try:
            while True:
                if stop_at is not None and total is not None and self._clock() >= stop_at:
                    uploads.finish(beat)
                    beat(force=True)
                    raise _paused(job, total, checkpoint(uploads.done))
                data = body.read(part_size)  # whole parts: the reader never short-reads
                if not data:
                    break
                hasher.update(data)
                states[number] = hash_state(hasher)
                uploads.submit(number, data, beat)
                del data
                uploads.collect()
                beat()
                number += 1
            uploads.finish(beat)
        except CopyPaused:
            raise
        except BaseException:
            uploads.drain()
            if job.heartbeat is not None and total is not None:
                with contextlib.suppress(Exception):
                    beat(force=True)  # keep what is done for the next attempt
            else:  # nobody could resume it: do not leave it behind
                self._abort_upload(key, upload_id)
            _raise_source_error(reader)
            raise
        if not reader.finished:  # the consumer stopped before the end: never trust that object
            raise CopyMismatch(f"upload of {job.source} stopped after {reader.size} bytes")
        sha256 = str(hasher.finalize())
        size = (point.offset if point is not None else 0) + reader.size
        beat(force=True)  # every part in: a crash after completing can still find the hash
        return self._complete(key, upload_id, uploads.parts(), size, sha256, job)

    def _open_upload(
        self, job: _Job, total: int | None, point: Checkpoint | None
    ) -> tuple[str, int, Any, int, dict[int, Any]]:
        """A new multipart upload, or the one ``point`` resumes: its id, part size, the running
        SHA-256, the first part number to send, and the hash state after each part so far."""
        if point is not None:
            hasher = restore_hash(point.sha_state)
            return (point.upload_id, point.part_size, hasher, point.parts + 1,
                    {point.parts: point.sha_state})  # fmt: skip
        hasher = new_hash()
        try:
            created = self._s3.create_multipart_upload(
                Bucket=self.bucket, Key=job.key, Metadata=dict(job.metadata),
                ContentType=CONTENT_TYPE,
            )  # fmt: skip
        except (BotoCoreError, ClientError) as exc:
            raise self._storage_error("upload to", job.key, exc) from exc
        part_size = _part_size_for(total, self._part_size)
        return created["UploadId"], part_size, hasher, 1, {0: hash_state(hasher)}

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        try:
            answer = self._s3.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._storage_error(f"part {number} of", key, exc) from exc
        return str(answer["ETag"])

    def _complete(
        self,
        key: str,
        upload_id: str,
        parts: list[dict[str, Any]],
        size: int,
        sha256: str,
        job: _Job,
    ) -> StoredObject:
        """Complete the upload, check the stored size, record the SHA-256."""
        try:
            self._s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._storage_error("completing the upload to", key, exc) from exc
        return self._verified(key, size, sha256, job.metadata, job.source)

    def _verified(
        self, key: str, size: int, sha256: str, metadata: Mapping[str, str], source: str
    ) -> StoredObject:
        head = self._head(key)
        if head is None:
            raise StorageUnavailable(f"{self._uri(key)} is missing right after its upload")
        stored = int(head.get("ContentLength", -1))
        if stored != size:
            self._delete_quietly(key)
            raise CopyMismatch(
                f"{self._uri(key)} holds {stored} bytes but {size} were streamed from {source}"
            )
        final = {name.lower(): value for name, value in metadata.items()}
        etag = head.get("ETag")
        if not self._tag(key, sha256):
            if size <= _MAX_COPY_OBJECT_SIZE:
                final[SHA256_KEY] = sha256
                etag = self._stamp(key, final, etag)
            else:
                logger.warning(
                    "%s is over 5 GiB on a server without tagging: its sha256 %s is not recorded",
                    self._uri(key),
                    sha256,
                )
        logger.info("copied %s to %s (%d bytes, sha256 %s)", source, self._uri(key), size, sha256)
        return StoredObject(self.bucket, key, size, sha256, etag, final)

    def _reopen(
        self, key: str, point: Checkpoint, source: str
    ) -> StoredObject | tuple[Checkpoint, dict[int, str]] | None:
        """Check a checkpoint against S3: its parts (and their ETags) when the upload is still
        open and holds them; the finished copy when the upload was completed (by an attempt
        that died before recording it); None to start over."""
        etags: dict[int, str] = {}
        marker = 0
        try:
            while True:
                page = self._s3.list_parts(
                    Bucket=self.bucket, Key=key, UploadId=point.upload_id, PartNumberMarker=marker
                )
                for part in page.get("Parts", []):
                    number = int(part["PartNumber"])
                    wanted = min(point.part_size, point.total - (number - 1) * point.part_size)
                    if number <= point.parts and int(part["Size"]) == wanted:
                        etags[number] = str(part["ETag"])
                if not page.get("IsTruncated"):
                    break
                marker = int(page["NextPartNumberMarker"])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise self._storage_error("listing the parts of", key, exc) from exc
            if point.complete:  # completed, then the attempt died: finish recording it
                return self._verified(key, point.total, point.sha256(), {}, source)
            return None
        except BotoCoreError as exc:
            raise self._storage_error("listing the parts of", key, exc) from exc
        if len(etags) != point.parts:
            logger.info("%s: the open upload lacks parts the checkpoint names; starting over",
                        self._uri(key))  # fmt: skip
            self.abort(key, point.to_json())
            return None
        return point, etags

    def _stored(
        self,
        key: str,
        reader: SourceReader,
        etag: str | None,
        metadata: dict[str, str],
        source: str,
    ) -> StoredObject:
        size, sha256 = reader.size, reader.sha256
        logger.info("copied %s to %s (%d bytes, sha256 %s)", source, self._uri(key), size, sha256)
        return StoredObject(self.bucket, key, size, sha256, etag, metadata)

    def _tag(self, key: str, sha256: str) -> bool:
        """Record ``sha256`` as the object's tag; False when the server has no object tagging."""
        try:
            self._s3.put_object_tagging(
                Bucket=self.bucket,
                Key=key,
                Tagging={"TagSet": [{"Key": SHA256_KEY, "Value": sha256}]},
            )
        except ClientError as exc:
            if _is_not_implemented(exc):
                logger.info("%s: no object tagging on this server; stamping metadata", self.bucket)
                return False
            if exc.response.get("Error", {}).get("Code") == "AccessDenied":
                # The video is stored and paid for: record its hash the old way rather than
                # retry until the URL expires. Grant s3:PutObjectTagging to stop this.
                logger.warning(
                    "%s: tagging refused (AccessDenied: grant s3:PutObjectTagging and "
                    "s3:GetObjectTagging); stamping metadata by a copy instead",
                    self._uri(key),
                )
                return False
            raise self._storage_error("tagging of", key, exc) from exc
        except BotoCoreError as exc:
            raise self._storage_error("tagging of", key, exc) from exc
        return True

    def _stamp(self, key: str, metadata: dict[str, str], etag: str | None) -> str | None:
        """Replace the object's metadata by copying it onto itself (only possible up to 5 GiB).

        ``CopySourceIfMatch`` makes sure the stamped object is the one just verified (a concurrent
        writer would make S3 answer 412, reported as ``StorageUnavailable``: copy again).
        """
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "CopySource": {"Bucket": self.bucket, "Key": key},
            "MetadataDirective": "REPLACE",
            "Metadata": metadata,
            "ContentType": CONTENT_TYPE,
        }
        if etag:
            args["CopySourceIfMatch"] = etag
        if self._sends_checksums():
            # The upload carried per-part CRC32s; the copy is a single-part object, so ask for a
            # fresh full-object CRC32. Without it moto keeps the multipart (composite) value and a
            # validating GET fails; servers that refuse checksum headers run "when_required".
            args["ChecksumAlgorithm"] = "CRC32"
        try:
            result = self._s3.copy_object(**args)
        except (BotoCoreError, ClientError) as exc:
            raise self._storage_error("metadata update of", key, exc) from exc
        new_etag = result.get("CopyObjectResult", {}).get("ETag")
        return new_etag if new_etag is not None else etag

    def _sends_checksums(self) -> bool:
        meta = getattr(self._s3, "meta", None)
        config = getattr(meta, "config", None)
        return getattr(config, "request_checksum_calculation", None) == "when_supported"

    def _tagged_sha256(self, key: str, head: Mapping[str, Any]) -> str | None:
        if head.get("TagCount") == 0:
            return None  # said so; a server that omits the header is asked
        try:
            tags = self._s3.get_object_tagging(Bucket=self.bucket, Key=key)["TagSet"]
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise self._storage_error("tags of", key, exc) from exc
        except BotoCoreError as exc:
            raise self._storage_error("tags of", key, exc) from exc
        return next((tag["Value"] for tag in tags if tag["Key"] == SHA256_KEY), None)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                return None
            raise self._storage_error("HEAD of", key, exc) from exc
        except BotoCoreError as exc:
            raise self._storage_error("HEAD of", key, exc) from exc
        return dict(head)

    def _delete_quietly(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            logger.warning("could not delete the bad copy %s: %s", self._uri(key), exc)

    def _storage_error(self, what: str, key: str, exc: Exception) -> StorageUnavailable:
        return StorageUnavailable(f"{what} {self._uri(key)} failed: {type(exc).__name__}: {exc}")

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def _error_excerpt(response: httpx.Response, source_url: str) -> str:
    """The first 200 characters of an error body, with any query value of the URL blanked out."""
    data = b""
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= 4 * _ERROR_EXCERPT:
                break
    except httpx.HTTPError:
        pass  # the status is what matters; a broken error body is not
    text = " ".join(data.decode("utf-8", errors="replace").split())[:_ERROR_EXCERPT]
    try:
        params = httpx.URL(source_url).params
    except (httpx.InvalidURL, TypeError):
        return text
    for _name, value in params.multi_items():
        if len(value) >= 6:
            text = text.replace(value, "***")
    return text


LIFECYCLE_RULE_ID = "animate-queue-abort-incomplete-uploads"


def ensure_abort_rule(s3: S3Client, bucket: str, prefix: str, days: int) -> dict[str, Any]:
    """Make the bucket abort multipart uploads left unfinished ``days`` after they began, under
    ``prefix`` (copies keep uploads open between attempts on purpose; one whose job ended
    without finishing it is aborted by the workers, and this rule sweeps what a crash left).

    The bucket's other lifecycle rules are kept; ours is replaced by its id. The rule set."""
    try:
        current = s3.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise StorageUnavailable(f"reading the lifecycle of {bucket}: {exc}") from exc
        current = []
    except BotoCoreError as exc:
        raise StorageUnavailable(f"reading the lifecycle of {bucket}: {exc}") from exc
    rule: dict[str, Any] = {
        "ID": LIFECYCLE_RULE_ID,
        "Filter": {"Prefix": prefix.strip("/") + "/" if prefix.strip("/") else ""},
        "Status": "Enabled",
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
    }
    rules = [r for r in current if r.get("ID") != LIFECYCLE_RULE_ID] + [rule]
    try:
        s3.put_bucket_lifecycle_configuration(
            Bucket=bucket,
            LifecycleConfiguration={"Rules": rules},  # type: ignore[typeddict-item]
        )
    except (BotoCoreError, ClientError) as exc:
        raise StorageUnavailable(f"writing the lifecycle of {bucket}: {exc}") from exc
    return rule


def _paused(job: _Job, total: int, paused: Checkpoint | None) -> CopyPaused:
    """The copy stops at its time budget, every part sent so far recorded: where to go on."""
    assert paused is not None
    return CopyPaused(
        f"copy of {job.source} paused at byte {paused.offset} of {total} (its time budget); "
        "the next attempt goes on from there",
        paused.to_json(),
    )


def _raise_source_error(reader: SourceReader) -> None:
    """A failure that began at the source (the download) is raised as that, not as the upload's
    consequence of it."""
    if reader.error is not None:
        raise reader.error from reader.error.__cause__


class _Beat:
    """The copy's heartbeat: bytes so far and the resume point, saved at most every
    ``job.every`` seconds (at once when forced), so a crash loses little and renews the lease."""

    def __init__(self, job: _Job, reader: SourceReader, point: Callable[[], Checkpoint | None]):
        self.job, self.reader, self.point = job, reader, point
        self.last_saved = time.monotonic()

    def __call__(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last_saved >= self.job.every:
            self.last_saved = time.monotonic()
            now = self.point()
            self.job.beat(self.reader.size, now.to_json() if now else None)
