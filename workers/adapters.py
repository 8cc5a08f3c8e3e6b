"""Fitting the DashScope client and the S3 copier to the pipeline's ports (core types in and out)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import httpx

from workers.dashscope import DashScopeClient, RemoteTask, VideoRequest
from workers.errors import DashScopeRejected, TransientError
from workers.jobs import JobRequest, RemoteSnapshot
from workers.pipeline import StoredCopy
from workers.storage import S3Copier

# Errors raised after the request left us: DashScope may have acted on it.
_AMBIGUOUS = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.WriteError,
              httpx.RemoteProtocolError, httpx.DecodingError)  # fmt: skip


class DashScopeVideoApi:
    """The pipeline's ``VideoApi`` over one :class:`DashScopeClient` per account."""

    def __init__(self, clients: Mapping[str, DashScopeClient], model: str) -> None:
        self.clients = dict(clients)
        self.model = model

    def _client(self, account: str) -> DashScopeClient:
        try:
            return self.clients[account]
        except KeyError:
            raise DashScopeRejected(
                f"account {account!r} is not configured on this worker", code="UnknownAccount"
            ) from None

    def submit(self, account: str, request: JobRequest) -> str:
        submitted = self._client(account).submit_video(
            VideoRequest(
                image_url=request.image_url,
                template_id=request.template_id,
                use_ref_img_bg=request.use_ref_img_bg,
                video_ratio=request.video_ratio,
            )
        )
        return submitted.task_id

    def submit_is_ambiguous(self, exc: TransientError) -> bool:
        return isinstance(exc.__cause__, _AMBIGUOUS)

    def poll(self, account: str, task_id: str) -> RemoteSnapshot:
        return snapshot(self._client(account).get_task(task_id))

    def cancel(self, account: str, task_id: str) -> None:
        self._client(account).cancel_task(task_id)

    def recent_tasks(self, account: str, since: float, until: float) -> list[str]:
        page = self._client(account).list_tasks(
            start=datetime.fromtimestamp(since, UTC),
            end=datetime.fromtimestamp(until, UTC),
            model=self.model,
            page_size=100,
        )
        return [item.task_id for item in page.items]


def snapshot(task: RemoteTask) -> RemoteSnapshot:
    return RemoteSnapshot(
        status=task.status,
        raw_status=task.raw_status,
        video_url=task.video_url,
        video_duration=task.video_duration,
        end_time=task.end_time.timestamp() if task.end_time else None,
        code=task.code,
        message=task.message,
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
        heartbeat: Callable[[int], None] | None = None,
    ) -> StoredCopy:
        stored = self.copier.copy(url, key, metadata=metadata, heartbeat=heartbeat)
        return StoredCopy(stored.bucket, stored.key, stored.size, stored.sha256)

    def find(self, key: str) -> StoredCopy | None:
        stored = self.copier.find(key)
        return StoredCopy(stored.bucket, stored.key, stored.size, stored.sha256) if stored else None
