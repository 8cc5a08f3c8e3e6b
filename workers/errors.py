"""The one exception tree of the workers: what is worth retrying, and what ends a job.

::

    WorkerError                     code + message, recorded on the job when it ends one
    ├── TransientError              retried with backoff and jitter, a bounded number of times
    │   ├── DashScopeUnavailable    network error, timeout, 5xx from DashScope
    │   │   ├── DashScopeThrottled  429 from DashScope (it did nothing)
    │   │   └── DashScopeUncertain  a submit whose answer was lost: a task may exist
    │   ├── SourceUnavailable       the video download failed or ended short (network, 5xx)
    │   ├── StorageUnavailable      S3 failed (network, 5xx, or a refusal an operator can fix)
    │   ├── CopyPaused              a copy used its time budget; the next attempt goes on from
    │   │                           its checkpoint (not a failure)
    │   └── StoreUnavailable        Redis failed
    ├── StaleStep                   the job moved on (another worker took over): stop quietly
    └── PermanentError              never retried; ends the job
        ├── InvalidJobRequest       bad producer input (the job is REJECTED; nothing was sent)
        ├── DashScopeRejected       4xx from DashScope, with its code and message
        ├── DashScopeBadResponse    a 200 that does not have the documented shape
        ├── SourceExpired           the signed video URL has expired (403)
        ├── SourceRejected          the video URL answered another 4xx
        ├── CopyMismatch            S3 holds a different size than was streamed
        └── JobNotFound             no record for that job id

Adapters raise these (``raise ... from exc`` keeps the library's error as the cause); the retry
policy keys on the transient/permanent split, never on httpx or botocore classes.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the workers raise on purpose."""

    code = "WorkerError"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class StaleStep(WorkerError):
    """This step's fencing token is stale: a newer step owns the job. Nothing to record."""

    code = "StaleStep"


class TransientError(WorkerError):
    """Worth another try later."""

    code = "Transient"


class PermanentError(WorkerError):
    """Another try would fail the same way."""

    code = "Permanent"


class DashScopeUnavailable(TransientError):
    code = "DashScopeUnavailable"


class DashScopeThrottled(DashScopeUnavailable):
    code = "Throttling.RateQuota"


class DashScopeUncertain(DashScopeUnavailable):
    """A submit that DashScope may have acted on although we could not read its answer: a
    timeout or dropped connection after the request was sent, a 5xx or 408 (a gateway may have
    passed it on), a 200 whose body is not the documented JSON. Never resubmit blindly:
    reconcile with the task list first."""

    code = "SubmitUncertain"


class SourceUnavailable(TransientError):
    code = "SourceUnavailable"


class StorageUnavailable(TransientError):
    code = "StorageUnavailable"


class CopyPaused(TransientError):
    """A multipart copy used its attempt's time budget; its upload stays open and ``checkpoint``
    (opaque JSON, the copier's) lets the next attempt go on from where this one stopped."""

    code = "CopyPaused"

    def __init__(self, message: str, checkpoint: str) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class StoreUnavailable(TransientError):
    code = "StoreUnavailable"


class ReplicationTimeout(StoreUnavailable):
    """A protected write reached the Redis master but not the replicas it waits for in time: a
    failover could still lose it, so nothing that follows from it is done (the watchdog resumes
    the job from whichever record survives)."""

    code = "ReplicationTimeout"


class InvalidJobRequest(PermanentError):
    code = "InvalidRequest"


class DashScopeRejected(PermanentError):
    """DashScope refused the request (4xx other than 429): its code and message are kept."""

    code = "DashScopeRejected"

    def __init__(self, message: str, *, code: str | None = None, status: int = 400) -> None:
        super().__init__(message, code=code)
        self.status = status


class DashScopeBadResponse(PermanentError):
    code = "DashScopeBadResponse"


class SourceExpired(PermanentError):
    code = "VideoUrlExpired"


class SourceRejected(PermanentError):
    code = "VideoUrlRejected"


class CopyMismatch(PermanentError):
    code = "CopyMismatch"


class JobNotFound(PermanentError):
    code = "JobNotFound"


class JobFailed(Exception):
    """What ``AsyncResult(job_id).get()`` raises for a job that did not end ``STORED``.

    ``args`` are ``(error_code, error_message, result_object)``. A producer with only ``celery``
    installed gets an exception class of the same name (Celery makes one up), with the same args.
    """
