"""Fitting the DashScope client, the S3 copier and the input bucket to the pipeline's ports (core
types in and out)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import PurePosixPath

import httpx
import redis
from botocore.exceptions import BotoCoreError, ClientError

from workers.dashscope import DashScopeClient, RemoteTask, VideoRequest
from workers.errors import (
    DashScopeBadResponse,
    DashScopeRejected,
    DashScopeThrottled,
    DashScopeUnavailable,
    DashScopeUncertain,
    InvalidJobRequest,
    StorageUnavailable,
    StoreUnavailable,
    TransientError,
    WorkerError,
)
from workers.inputs import S3Inputs, parse_s3_ref
from workers.jobs import Detection, JobKind, JobRequest, RemoteSnapshot
from workers.pipeline import CopyProgress, Metrics, StoredCopy
from workers.queues import RedisQueues
from workers.routes import QUEUES
from workers.storage import S3Copier

# Errors raised after the request left us: DashScope may have acted on it. (Connect errors and
# a full pool mean nothing was sent.)
_AMBIGUOUS = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.WriteError,
              httpx.RemoteProtocolError, httpx.DecodingError)  # fmt: skip
MAX_LIST_PAGES = 50  # 5,000 tasks in one submit's window: more means something else is wrong


@contextmanager
def _uncertain_when_unanswered() -> Iterator[None]:
    """A submit's errors that leave open whether DashScope created the (paid) task become
    :class:`DashScopeUncertain`: transport errors after sending, 5xx and 408 answers (a gateway
    may have forwarded it), and a 200 we cannot read. 429 and other 4xx stay what they are:
    DashScope documents that nothing was done."""
    try:
        yield
    except DashScopeThrottled:
        raise
    except DashScopeUnavailable as exc:
        cause = exc.__cause__
        if cause is None or isinstance(cause, _AMBIGUOUS):  # an HTTP 5xx/408, or sent and lost
            raise DashScopeUncertain(exc.message, code=exc.code) from exc
        raise
    except DashScopeBadResponse as exc:
        raise DashScopeUncertain(
            f"{exc.message} (the answer to a submit: a task may exist)", code=exc.code
        ) from exc


class DashScopeVideoApi:
    """The pipeline's ``VideoApi`` over one :class:`DashScopeClient` per account."""

    def __init__(
        self,
        clients: Mapping[str, DashScopeClient],
        model: str,
        *,
        template_model: str = "animate-anyone-template-gen2",
        detect_model: str = "animate-anyone-detect-gen2",
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.clients = dict(clients)
        self.model = model
        self.template_model = template_model
        self.detect_model = detect_model

    def model_for(self, kind: str) -> str:
        """The model name behind a step: ``video``, ``template`` or ``detect``."""
        return {"template": self.template_model, "detect": self.detect_model}.get(kind, self.model)

    @contextmanager
    def _counted(self, op: str, account: str) -> Iterator[None]:
        """Count DashScope's refusals and failures by code (429s also on their own)."""
        try:
            yield
        except WorkerError as exc:
            if self.metrics is not None:
                self.metrics.inc("remote_errors_total", account=account, op=op, code=exc.code)
                if isinstance(exc, DashScopeThrottled):
                    self.metrics.inc("throttled_total", account=account, op=op)
            raise

    def _client(self, account: str) -> DashScopeClient:
        try:
            return self.clients[account]
        except KeyError:
            raise DashScopeRejected(
                f"account {account!r} is not configured on this worker", code="UnknownAccount"
            ) from None

    def submit(self, account: str, request: JobRequest) -> str:
        with self._counted("submit", account), _uncertain_when_unanswered():
            submitted = self._client(account).submit_video(
                VideoRequest(
                    image_url=request.image_url,
                    template_id=request.template_id,
                    use_ref_img_bg=request.use_ref_img_bg,
                    video_ratio=request.video_ratio,
                )
            )
            return submitted.task_id

    def submit_template(self, account: str, video_url: str) -> str:
        with self._counted("template", account), _uncertain_when_unanswered():
            submitted = self._client(account).submit_async(
                "aa-template-generation", self.template_model, {"video_url": video_url}
            )
            return submitted.task_id

    def detect(self, account: str, image_url: str) -> Detection:
        with self._counted("detect", account):
            output = self._client(account).detect(image_url, model=self.detect_model)
            bodystyle, reason = output.get("bodystyle"), output.get("reason")
            return Detection(
                check_pass=bool(output["check_pass"]),
                bodystyle=bodystyle if isinstance(bodystyle, str) and bodystyle else None,
                reason=reason if isinstance(reason, str) and reason else None,
            )

    def upload(self, account: str, kind: str, filename: str, data: bytes) -> str:
        """DashScope's temporary storage (docs §7): an oss:// URL for one account and model."""
        with self._counted("upload", account):
            return self._client(account).upload(self.model_for(kind), filename, data)

    def submit_is_ambiguous(self, exc: TransientError) -> bool:
        return isinstance(exc, DashScopeUncertain)

    def poll(self, account: str, task_id: str) -> RemoteSnapshot:
        with self._counted("query", account):
            return snapshot(self._client(account).get_task(task_id))

    def cancel(self, account: str, task_id: str) -> None:
        with self._counted("cancel", account):
            self._client(account).cancel_task(task_id)

    def recent_tasks(
        self, account: str, since: float, until: float, kind: str = JobKind.VIDEO
    ) -> list[str]:
        """Every task of the account for the kind's model created in [since, until]: every
        page is read (a busy account's window may hold more than one)."""
        ids: list[str] = []
        with self._counted("list", account):
            for page_no in range(1, MAX_LIST_PAGES + 1):
                page = self._client(account).list_tasks(
                    start=datetime.fromtimestamp(since, UTC),
                    end=datetime.fromtimestamp(until, UTC),
                    model=self.model_for(kind),
                    page_no=page_no,
                    page_size=100,
                )
                ids += [item.task_id for item in page.items]
                if not page.items or page_no >= page.total_page:
                    return ids
        raise DashScopeUnavailable(f"list: more than {MAX_LIST_PAGES} pages of tasks in the window")


def snapshot(task: RemoteTask) -> RemoteSnapshot:
    return RemoteSnapshot(
        status=task.status,
        raw_status=task.raw_status,
        video_url=task.video_url,
        video_duration=task.video_duration,
        end_time=task.end_time.timestamp() if task.end_time else None,
        code=task.code,
        message=task.message,
        template_id=task.template_id,
    )


class S3CopierPort:
    """The pipeline's ``Copier`` over :class:`S3Copier`."""

    def __init__(self, copier: S3Copier) -> None:
        self.copier = copier

    def copy(
        self,
        url: str,
        key: str,
        metadata: dict[str, str],
        heartbeat: CopyProgress | None = None,
        resume: str | None = None,
        budget: float | None = None,
    ) -> StoredCopy:
        stored = self.copier.copy(
            url, key, metadata=metadata, heartbeat=heartbeat, resume=resume, budget=budget
        )
        return StoredCopy(stored.bucket, stored.key, stored.size, stored.sha256)

    def abort(self, key: str, checkpoint: str) -> None:
        self.copier.abort(key, checkpoint)

    def find(self, key: str) -> StoredCopy | None:
        stored = self.copier.find(key)
        return StoredCopy(stored.bucket, stored.key, stored.size, stored.sha256) if stored else None


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


class BrokerQueues:
    """The pipeline's ``QueueWatch`` over the broker's queues of the route table."""

    def __init__(self, queues: RedisQueues) -> None:
        self.queues = queues

    def waiting(self) -> dict[str, tuple[int, float]]:
        return {s.name: (s.consumers, s.oldest_seconds) for s in self.queues.sample(QUEUES)}
