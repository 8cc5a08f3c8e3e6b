"""The S3 copier fitted to the Copier port."""

from __future__ import annotations

from workers.adapters.s3.storage import S3Copier
from workers.ports import CopyProgress, StoredCopy


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
