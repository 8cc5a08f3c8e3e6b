"""Inputs from our bucket, handed to DashScope as presigned URLs or uploaded to its OSS."""

from __future__ import annotations

from pathlib import PurePosixPath

import redis
from botocore.exceptions import BotoCoreError, ClientError

from workers.adapters.dashscope.api import DashScopeVideoApi
from workers.adapters.s3.inputs import S3Inputs, parse_s3_ref
from workers.errors import (
    InvalidJobRequest,
    StorageUnavailable,
    StoreUnavailable,
)

OSS_URL_SECONDS = 47 * 3600  # DashScope keeps a temporary upload 48 h (docs §7); an hour spare


class BucketInputs:
    """The pipeline's ``Inputs`` port over our bucket.

    ``s3://`` references become presigned GET URLs. In ``oss`` mode DashScope gets them through
    its temporary storage instead: the object is read from the bucket and uploaded once per
    account and model (DashScope binds each upload to both), and the oss:// URL is cached in
    Redis while it lives. That mode holds the file in memory during the upload (images are at
    most 5 MB, dance videos at most 200 MB); DashScope documents the storage as not meant for
    production, which is why presigned URLs are the default.
    """

    def __init__(
        self,
        inputs: S3Inputs,
        *,
        ttl: int,
        mode: str = "s3",
        api: DashScopeVideoApi | None = None,
        cache: redis.Redis | None = None,
        prefix: str = "animate-queue",
    ) -> None:
        self.inputs = inputs
        self.ttl = ttl
        self.mode = mode
        self.api = api
        self.cache = cache
        self.prefix = prefix

    def for_us(self, ref: str) -> tuple[str, bool]:
        if parse_s3_ref(ref) is None:
            return ref, False
        return self._presign(ref, 3600), True

    def for_dashscope(self, ref: str, account: str, model: str) -> str:
        where = parse_s3_ref(ref)
        if where is None:
            return ref
        if self.mode != "oss":
            return self._presign(ref, self.ttl)
        assert self.api is not None and self.cache is not None
        cache_key = f"{self.prefix}:oss:{account}:{model}:{where[1]}"
        try:
            cached = self.cache.get(cache_key)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading the upload cache: {exc}") from exc
        if cached is not None:
            return cached.decode() if isinstance(cached, bytes) else str(cached)
        try:
            body = self.inputs.s3.get_object(Bucket=where[0], Key=where[1])["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailable(f"reading {ref}: {type(exc).__name__}") from exc
        url = self.api.upload(account, model, PurePosixPath(where[1]).name, body)
        try:
            self.cache.set(cache_key, url, ex=OSS_URL_SECONDS)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"writing the upload cache: {exc}") from exc
        return url

    def _presign(self, ref: str, ttl: int) -> str:
        try:
            return self.inputs.presign(ref, ttl)
        except ValueError as exc:
            raise InvalidJobRequest(str(exc), code="InvalidRequest.BadUrl") from None
