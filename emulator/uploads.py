"""Temporary uploads: the policy the SDK asks for, the files it posts, and ``oss://`` resolution.

A policy is a base64 JSON document signed with the emulator's secret; the sink checks the signature,
the expiry and that the key lies under the policy's directory, as OSS does. A file is bound to the
account and the model named when the policy was issued.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Upload:
    key: str
    account: str
    model: str
    data: bytes
    content_type: str
    expires_at: float


class UploadError(Exception):
    """The sink refuses the post (OSS answers with an XML error)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class UploadStore:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self.files: dict[str, Upload] = {}

    def _sign(self, policy: str) -> str:
        digest = hmac.new(self._secret, policy.encode(), hashlib.sha1).digest()
        return base64.b64encode(digest).decode()

    def policy(
        self, *, account: str, model: str, now: float, ttl: float, host: str, max_mb: int
    ) -> dict[str, Any]:
        day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
        upload_dir = f"dashscope-instant/{account}/{day}/{uuid.uuid4().hex}"
        document = {
            "expiration": now + ttl,
            "account": account,
            "model": model,
            "dir": upload_dir,
            "max_bytes": max_mb * 1024 * 1024,
        }
        policy = base64.b64encode(json.dumps(document).encode()).decode()
        return {
            "policy": policy,
            "signature": self._sign(policy),
            "upload_dir": upload_dir,
            "upload_host": host,
            "expire_in_seconds": int(ttl),
            "max_file_size_mb": max_mb,
            "capacity_limit_mb": 999999999,
            "oss_access_key_id": "LTAIemulator",
            "x_oss_object_acl": "private",
            "x_oss_forbid_overwrite": "true",
        }

    def accept(
        self, form: dict[str, Any], data: bytes, content_type: str, now: float, file_ttl: float
    ) -> Upload:
        policy, signature, key = form.get("policy"), form.get("Signature"), form.get("key")
        if not (isinstance(policy, str) and isinstance(signature, str) and isinstance(key, str)):
            raise UploadError(400, "InvalidArgument", "policy, Signature and key are required.")
        if not hmac.compare_digest(self._sign(policy), signature):
            raise UploadError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )
        document = json.loads(base64.b64decode(policy))
        if now > float(document["expiration"]):
            raise UploadError(403, "AccessDenied", "Invalid according to Policy: Policy expired.")
        if not key.startswith(document["dir"] + "/"):
            raise UploadError(
                403, "AccessDenied", "Invalid according to Policy: Policy Condition failed."
            )
        if len(data) > int(document["max_bytes"]):
            raise UploadError(400, "EntityTooLarge", "Your proposed upload exceeds the limit.")
        if key in self.files and form.get("x-oss-forbid-overwrite") == "true":
            raise UploadError(409, "FileAlreadyExists", "The object you specified already exists.")
        upload = Upload(
            key, document["account"], document["model"], data, content_type, now + file_ttl
        )
        self.files[key] = upload
        return upload

    def resolve(self, url: str, *, account: str, model: str, now: float) -> Upload | None:
        """The file behind ``oss://key``, if it exists for this account and model and is not expired."""
        upload = self.files.get(url.removeprefix("oss://"))
        if upload is None or upload.expires_at < now:
            return None
        if upload.account != account or upload.model != model:
            return None
        return upload
