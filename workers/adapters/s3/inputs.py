"""Local input files: content-addressed in our bucket, handed to DashScope as presigned URLs.

A producer with a file on disk (a person image, a dance video) checks it locally with the same rules
the workers apply, then uploads it once under ``<INPUT_PREFIX><sha256><suffix>`` and sends the job
an ``s3://<bucket>/<key>`` reference. The same bytes always land on the same key, so sending a file
again uploads nothing. Workers turn the reference into a presigned GET URL for DashScope.
"""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from workers.adapters.web.images import HEADER_BYTES, facts_from_header
from workers.domain.media import ImageFacts, VideoFacts, check_image, check_template_video
from workers.errors import InvalidJobRequest, StorageUnavailable
from workers.models import ANIMATE_ANYONE_GEN2, ModelProfile

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

__all__ = [
    "REMOTE_SCHEMES",
    "S3Inputs",
    "check_local_image",
    "check_local_video",
    "file_sha256",
    "is_local",
    "local_path",
    "parse_s3_ref",
]

REMOTE_SCHEMES: Final = frozenset({"http", "https", "s3", "oss"})
CHUNK: Final = 1024 * 1024
_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")
_CONTENT_NAME = re.compile(r"([0-9a-f]{64})(\.[a-z0-9]{1,10})?")


def parse_s3_ref(ref: str) -> tuple[str, str] | None:
    """``(bucket, key)`` for ``s3://bucket/key``, else None."""
    if not isinstance(ref, str) or not ref.startswith("s3://"):
        return None
    bucket, sep, key = ref[len("s3://") :].partition("/")
    if not sep or not bucket or not key or key.startswith("/"):
        return None
    if any(c.isspace() for c in bucket):
        return None
    return bucket, key


def is_local(value: str | Path) -> bool:
    """A Path, or a string that is not an http(s), s3 or oss URL: a file on this machine."""
    if isinstance(value, Path):
        return True
    try:
        scheme = urlsplit(value).scheme.lower()
    except ValueError:
        return True
    return scheme not in REMOTE_SCHEMES


def local_path(value: str | Path, what: str = "file") -> Path:
    """The regular file ``value`` names, or FileNotFoundError saying which input is missing."""
    path = Path(value).expanduser()
    if not path.is_file():
        problem = "is not a regular file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{what} {str(value)!r} {problem} (nor is it an http(s) URL)")
    return path


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_local_image(path: Path, profile: ModelProfile = ANIMATE_ANYONE_GEN2) -> ImageFacts:
    """The image's facts, checked against the model's limits (InvalidJobRequest if refused)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER_BYTES)
    facts = facts_from_header(head, size, profile.image.max_bytes)
    check_image(facts, profile.image)
    return facts


def check_local_video(
    path: Path, *, sha256: str | None = None, profile: ModelProfile = ANIMATE_ANYONE_GEN2
) -> VideoFacts:
    """The dance video's facts (PyAV), checked against the model's limits for it (a template's
    source, or the video sent with every Wan2.2-Animate job): InvalidJobRequest if refused."""
    from workers.adapters.web.videos import probe_file

    facts = probe_file(path, sha256=sha256)
    limits = profile.template_video if profile.takes_templates else profile.input_video
    if limits is None:
        raise InvalidJobRequest(
            f"{profile.name} takes no dance video", code="InvalidRequest.TemplateOrVideo"
        )
    check_template_video(facts, limits)
    return facts


def _is_not_found(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or error.get("Code") in ("404", "NoSuchKey", "NotFound")


def _is_forbidden(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 403 or exc.response.get("Error", {}).get("Code") in ("403", "AccessDenied")


class S3Inputs:
    """Uploads local inputs into ``bucket`` under ``prefix``, keyed by their SHA-256."""

    def __init__(self, s3: S3Client, bucket: str, prefix: str = "inputs/") -> None:
        if not bucket:
            raise ValueError("bucket must not be empty (S3_BUCKET)")
        self.s3 = s3
        self.bucket = bucket
        self.prefix = prefix.lstrip("/")

    def key_for(self, sha256: str, suffix: str) -> str:
        suffix = suffix.lower()
        return f"{self.prefix}{sha256}{suffix if _SUFFIX.fullmatch(suffix) else ''}"

    def upload(self, path: Path) -> str:
        """Upload ``path`` unless its bytes are already there; its ``s3://`` reference."""
        before = path.stat()
        sha256 = file_sha256(path)
        key = self.key_for(sha256, path.suffix)
        ref = f"s3://{self.bucket}/{key}"
        existing = self._head(key)
        if existing is not None and existing.get("ContentLength") == before.st_size:
            return ref
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        try:
            self.s3.upload_file(
                str(path),
                self.bucket,
                key,
                ExtraArgs={"ContentType": content_type, "Metadata": {"sha256": sha256}},
            )
        except (Boto3Error, BotoCoreError, ClientError) as exc:  # Boto3Error: S3UploadFailedError
            raise StorageUnavailable(
                f"upload of {path.name} to {ref} failed: {type(exc).__name__}: {exc}"
            ) from exc
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            # The key names bytes that may no longer be the ones stored: do not leave them there.
            self._delete_quietly(key)
            raise StorageUnavailable(f"{path} changed while it was being uploaded; send it again")
        return ref

    def presign(self, ref: str, ttl: int) -> str:
        """A presigned GET URL for an object of this bucket, valid ``ttl`` seconds."""
        key = self._key_of(ref)
        if key is None:
            raise ValueError(f"{ref!r} is not an s3:// reference in bucket {self.bucket!r}")
        try:
            return self.s3.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl
            )
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"presigning {ref} failed: {type(exc).__name__}") from exc

    def sha256_of(self, ref: str) -> str | None:
        """The SHA-256 a content-addressed reference names, else None."""
        key = self._key_of(ref)
        if key is None or not key.startswith(self.prefix):
            return None
        match = _CONTENT_NAME.fullmatch(key[len(self.prefix) :])
        return match.group(1) if match else None

    def _key_of(self, ref: str) -> str | None:
        parsed = parse_s3_ref(ref)
        if parsed is None or parsed[0] != self.bucket:
            return None
        return parsed[1]

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self.s3.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            # Without s3:ListBucket, S3 answers a missing key with 403: upload to find out.
            if _is_not_found(exc) or _is_forbidden(exc):
                return None
            raise StorageUnavailable(
                f"HEAD of s3://{self.bucket}/{key} failed: {type(exc).__name__}: {exc}"
            ) from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(
                f"HEAD of s3://{self.bucket}/{key} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _delete_quietly(self, key: str) -> None:
        with contextlib.suppress(BotoCoreError, ClientError):
            self.s3.delete_object(Bucket=self.bucket, Key=key)
