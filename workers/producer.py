"""The producers' Python API: ``generate``, ``make_template``, ``get``, ``wait``, ``download``.

>>> s3 = make_s3_client(endpoint_url=None, region="eu-central-1")
>>> queue = AnimateQueue("redis://127.0.0.1:6379/0", inputs=S3Inputs(s3, "my-bucket"))
>>> job_id = queue.generate(Path("me.png"), video=Path("dance.mp4"), job_id="order-42")
>>> queue.wait(job_id, timeout=900)["state"]
'STORED'
>>> queue.download(job_id, Path("out"))
PosixPath('out/order-42.mp4')

``image`` and ``video`` are http(s) URLs, ``s3://`` references into our bucket, or local files.
Local files are checked here with the workers' own rules (a refusal raises ``InvalidJobRequest``
before anything is uploaded or sent), then uploaded once, content-addressed, through ``inputs``
(an :class:`~workers.adapters.s3.inputs.S3Inputs`). Without local files only the Redis URL is needed: the
job is the public ``animate.generate`` (or ``animate.template``) message with JSON kwargs on
Celery's default queue, and reading goes straight to the job records. No DashScope key is needed.
``submit(image_url, template_id)`` is the older URL-only form of ``generate``.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError
from celery import Celery

from workers import models
from workers.adapters.redis.connection import RedisAddress, celery_options, connect
from workers.adapters.redis.governor import RedisGovernor
from workers.adapters.redis.inbox import RedisInbox
from workers.adapters.redis.replication import Replication
from workers.adapters.redis.store import RedisJobStore
from workers.adapters.s3.inputs import (
    S3Inputs,
    check_local_image,
    check_local_video,
    is_local,
    local_path,
)
from workers.domain.request import JOB_ID_RE, TEMPLATE_FAMILY_ONLY
from workers.domain.routes import public_queue
from workers.domain.states import FINAL_STATES, JobState
from workers.domain.views import job_view
from workers.errors import CopyMismatch, InvalidJobRequest, JobNotFound, StorageUnavailable
from workers.models import ANIMATE_ANYONE_GEN2
from workers.steps.table import queue_for

INTAKE_TASK = "animate.generate"
TEMPLATE_TASK = "animate.template"
CANCEL_TASK = "animate.cancel"
COPY_TASK = "animate.copy"
# A job that ended without its video may run again (as a new job); the request fields it keeps.
RERUNNABLE = frozenset({"FAILED", "EXPIRED", "CANCELED"})
RERUN_FIELDS = ("image_url", "template_id", "video_url", "detect", "use_ref_img_bg",
                "video_ratio", "account", "priority", "producer", "callback_task",
                "callback_queue", "webhook_url", "model", "mode", "check_image")  # fmt: skip


def _check_job_id(job_id: Any) -> None:
    """Refuse, before sending, a job_id the workers could not use as one (it would name
    nothing a producer could wait on)."""
    if job_id is not None and not (isinstance(job_id, str) and JOB_ID_RE.match(job_id)):
        raise InvalidJobRequest(
            "job_id must be 1-128 characters of letters, digits and . _ : - (starting with a "
            f"letter or digit), not {str(job_id)[:40]!r}",
            code="InvalidRequest.JobId",
        )


class JobTimeout(TimeoutError):
    """The job did not reach a final state in time (it goes on; ask again later)."""


class AnimateQueue:
    """Enqueue jobs and read their records."""

    def __init__(
        self,
        redis_url: str,
        *,
        broker_url: str | None = None,
        result_backend: str | None = None,
        key_prefix: str = "animate-queue",
        rates: dict[str, float] | None = None,
        capacity: int = 2,
        inputs: S3Inputs | None = None,
        model: str = ANIMATE_ANYONE_GEN2.name,
        governor: RedisGovernor | None = None,
        address: RedisAddress | None = None,
        wait_replicas: int | None = None,
        wait_timeout_ms: int = 2000,
    ) -> None:
        """``model`` keys the quota buckets and lanes (the workers' DASHSCOPE_MODEL); ``rates``
        and ``capacity`` only label the account views (the CLI passes the workers' governor).
        ``address``: Redis through Sentinel (then ``redis_url`` is its ``url``); the broker and
        result backend follow it unless given. ``wait_replicas`` (REDIS_WAIT_REPLICAS; None: 1
        through Sentinel, else 0): a job is enqueued only once that many replicas have its
        message and its note in the intake inbox (docs/ha.md); otherwise ReplicationTimeout,
        and the job may or may not exist: send it again with the same ``job_id``."""
        self.inputs = inputs  # only needed to send local files, or to download videos
        address = address or RedisAddress(redis_url)
        broker = broker_url or address.celery_url()
        backend = result_backend or address.celery_url()
        self.celery = Celery("animate_queue_producer", broker=broker, backend=backend)
        self.celery.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_send_sent_event=True,  # Flower sees the job the moment it is sent
            broker_connection_retry_on_startup=True,
            **celery_options(address, broker, backend),
        )
        client = connect(address)
        self.store = RedisJobStore(client, prefix=key_prefix, final_ttl=0)
        # With replicas to wait for, each new job's message is noted in the intake inbox in a
        # protected write (workers.adapters.redis.inbox): confirmed, or ReplicationTimeout.
        if wait_replicas is None:
            wait_replicas = 1 if address.uses_sentinel else 0
        self.inbox = (
            RedisInbox(
                client,
                prefix=key_prefix,
                replication=Replication(client, required=wait_replicas, timeout_ms=wait_timeout_ms),
            )
            if wait_replicas
            else None
        )
        self.profile = models.profile(model)  # the deployment's model: local files' limits
        quotas = self.profile.quotas  # DashScope's own limits, when none are given
        self.governor = governor or RedisGovernor(
            client,
            prefix=key_prefix,
            model=model,
            rates=rates or {"submit": quotas.submits_per_second,
                            "query": quotas.queries_per_second,
                            "detect": quotas.detects_per_second},
            capacity=capacity,
        )  # fmt: skip

    def submit(
        self,
        image_url: str,
        template_id: str,
        *,
        use_ref_img_bg: bool | None = None,
        video_ratio: str | None = None,
        job_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        account: str | None = None,
        priority: int | None = None,
        producer: str | None = None,
    ) -> str:
        """Enqueue a job; its id (``job_id`` if given, else the message id)."""
        kwargs: dict[str, Any] = {"image_url": image_url, "template_id": template_id}
        optional = {
            "use_ref_img_bg": use_ref_img_bg,
            "video_ratio": video_ratio,
            "job_id": job_id,
            "metadata": metadata,
            "account": account,
            "priority": priority,
            "producer": producer,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        _check_job_id(job_id)
        message_id = str(uuid.uuid4())
        queue = public_queue(INTAKE_TASK)
        self.celery.send_task(INTAKE_TASK, kwargs=kwargs, queue=queue, task_id=message_id)
        self._noted(job_id or message_id, INTAKE_TASK, queue, message_id, kwargs)
        return job_id or message_id

    def generate(
        self,
        image: str | Path,
        *,
        video: str | Path | None = None,
        template_id: str | None = None,
        detect: bool | None = None,
        use_ref_img_bg: bool | None = None,
        video_ratio: str | None = None,
        job_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        account: str | None = None,
        priority: int | None = None,
        producer: str | None = None,
        callback_task: str | None = None,
        callback_queue: str | None = None,
        webhook_url: str | None = None,
        mode: str | None = None,
        check_image: bool | None = None,
        model: str | None = None,
    ) -> str:
        """Enqueue a video job (``animate.generate``); its id.

        On an AnimateAnyone deployment the motion is either ``template_id`` or ``video`` (the
        dance video: the workers reuse or make the account's template for it), and
        ``detect=False`` skips DashScope's image check. For a Wan2.2-Animate model (``model``,
        or this queue's default) it is ``video``, with ``mode`` (``wan-std`` or ``wan-pro``). Local
        files are checked against the model's limits, then uploaded through ``inputs``;
        ``InvalidJobRequest`` (its ``code`` says why) or ``FileNotFoundError`` means nothing was
        uploaded or sent.
        """
        if (video is None) == (template_id is None):
            raise ValueError("give exactly one of video and template_id")
        image_path = self._local(image, "image")
        video_path = self._local(video, "video") if video is not None else None
        profile = models.profile(model) if model is not None else self.profile
        if image_path is not None:
            check_local_image(image_path, profile)
        if video_path is not None:
            check_local_video(video_path, profile=profile)
        kwargs: dict[str, Any] = {"image_url": self._upload(image, image_path)}
        if video is not None:
            kwargs["video_url"] = self._upload(video, video_path)
        else:
            kwargs["template_id"] = template_id
        optional = {
            "detect": detect,
            "use_ref_img_bg": use_ref_img_bg,
            "video_ratio": video_ratio,
            "job_id": job_id,
            "metadata": metadata,
            "account": account,
            "priority": priority,
            "producer": producer,
            "callback_task": callback_task,
            "callback_queue": callback_queue,
            "webhook_url": webhook_url,
            "mode": mode,
            "check_image": check_image,
            "model": model,
        }
        return self._send(INTAKE_TASK, kwargs, optional)

    def make_template(
        self,
        video: str | Path,
        *,
        account: str | None = None,
        job_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        priority: int | None = None,
        producer: str | None = None,
        callback_task: str | None = None,
        callback_queue: str | None = None,
        webhook_url: str | None = None,
    ) -> str:
        """Enqueue a template job (``animate.template``); its id.

        It ends ``READY`` with ``template_id`` on its record (or FAILED/REJECTED/CANCELED).
        A local video is checked and uploaded as in :meth:`generate`.
        """
        video_path = self._local(video, "video")
        if video_path is not None:
            check_local_video(video_path)
        kwargs: dict[str, Any] = {"video_url": self._upload(video, video_path)}
        optional = {
            "account": account,
            "job_id": job_id,
            "metadata": metadata,
            "priority": priority,
            "producer": producer,
            "callback_task": callback_task,
            "callback_queue": callback_queue,
            "webhook_url": webhook_url,
        }
        return self._send(TEMPLATE_TASK, kwargs, optional)

    def templates(self, account: str | None = None) -> list[dict[str, Any]]:
        """Known action templates (all, or one account's): id, account, source hash, seconds..."""
        return self.store.list_templates(account)

    def download(self, job_id: str, dest_dir: Path) -> Path:
        """Fetch a STORED job's video from S3 into ``dest_dir/<job_id>.mp4``, checked; its path."""
        inputs = self._require_inputs("download a video")
        view = self.get(job_id)
        if view is None:
            raise JobNotFound(f"no job {job_id}")
        bucket, key = view.get("s3_bucket"), view.get("s3_key")
        if view["state"] != "STORED" or not bucket or not key:
            raise ValueError(f"job {job_id} is {view['state']}, not STORED: it has no video")
        dest_dir.mkdir(parents=True, exist_ok=True)
        target = dest_dir / f"{job_id}.mp4"
        # A temporary name in the same directory: the target appears whole or not at all.
        with tempfile.NamedTemporaryFile(dir=dest_dir, prefix=f".{job_id}.", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            try:
                inputs.s3.download_file(bucket, key, str(partial))
            except (Boto3Error, BotoCoreError, ClientError) as exc:
                raise StorageUnavailable(
                    f"download of s3://{bucket}/{key} failed: {type(exc).__name__}: {exc}"
                ) from exc
            expected = view.get("sha256")
            if expected:
                digest = hashlib.sha256()
                with partial.open("rb") as f:
                    while chunk := f.read(1024 * 1024):
                        digest.update(chunk)
                if digest.hexdigest() != expected:
                    raise CopyMismatch(
                        f"s3://{bucket}/{key} has sha256 {digest.hexdigest()}, "
                        f"the job recorded {expected}"
                    )
            partial.replace(target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        return target

    def _local(self, value: str | Path, what: str) -> Path | None:
        """The file a local input names (checked to exist, inputs required), or None for a URL."""
        if not is_local(value):
            return None
        path = local_path(value, what)
        self._require_inputs(f"send a local {what}")
        return path

    def _upload(self, value: str | Path, path: Path | None) -> str:
        if path is None:
            return str(value)
        return self._require_inputs("send a local file").upload(path)

    def _noted(
        self, job_id: str, task: str, queue: str, message_id: str, kwargs: dict[str, Any]
    ) -> None:
        """With replicas to wait for: note the message just sent in the intake inbox, and
        return once the replicas hold both (one replication stream: the note confirms the
        message before it). A job whose message is then lost is sent again by the watchdog."""
        if self.inbox is not None:
            self.inbox.sent(job_id, task, queue, message_id, kwargs)

    def _require_inputs(self, purpose: str) -> S3Inputs:
        if self.inputs is None:
            raise ValueError(
                f"to {purpose}, the queue needs S3 inputs: set S3_BUCKET (and AWS_* credentials), "
                "or pass inputs=S3Inputs(...)"
            )
        return self.inputs

    def _send(self, task: str, kwargs: dict[str, Any], optional: dict[str, Any]) -> str:
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        _check_job_id(kwargs.get("job_id"))
        message_id = str(uuid.uuid4())
        queue = public_queue(task)
        self.celery.send_task(task, kwargs=kwargs, queue=queue, task_id=message_id)
        job_id = kwargs.get("job_id")
        named = job_id if isinstance(job_id, str) else message_id
        self._noted(named, task, queue, message_id, kwargs)
        return named

    def cancel(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        """Cancel a job through a worker (``animate.cancel``); what happened."""
        result = self.celery.send_task(CANCEL_TASK, args=(job_id,), queue=public_queue(CANCEL_TASK))
        return dict(result.get(timeout=timeout))

    def rerun(self, job_id: str) -> str:
        """Enqueue a video job that ended without its video (FAILED, EXPIRED, CANCELED) again,
        as a new job: the same request, a new id (``<id>-rerun-<n>``), ``rerun_of`` in its
        metadata. The new job's id (ValueError: the job cannot be run again)."""
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.is_template or job.state not in RERUNNABLE:
            raise ValueError(f"job {job_id} is {job.state.value}: only a video job that ended "
                             f"without its video ({', '.join(sorted(RERUNNABLE))}) runs again")  # fmt: skip
        base = job_id[:100]
        n = 1
        while self.store.get(f"{base}-rerun-{n}") is not None:
            n += 1
        request = job.request
        kwargs = {name: getattr(request, name) for name in RERUN_FIELDS}
        kwargs["metadata"] = {**request.metadata, "rerun_of": job_id}
        kwargs["job_id"] = f"{base}-rerun-{n}"
        if request.video_url is not None:
            kwargs.pop("template_id")
        else:
            kwargs.pop("video_url")
        if not models.profile(job.model).takes_templates:  # a Wan job: none of AnimateAnyone's
            for name in TEMPLATE_FAMILY_ONLY:
                kwargs.pop(name, None)
        return self._send(INTAKE_TASK, {}, kwargs)

    def retry_copy(self, job_id: str) -> dict[str, Any]:
        """Send a job waiting to retry its copy (COPYING, its video URL still alive) to its copy
        step now: the same message the step's own backoff would send later (stale once this
        one moves the job; a copy already running keeps its lease)."""
        job = self.store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.state != JobState.COPYING:
            raise ValueError(f"job {job_id} is {job.state.value}: only a job waiting for its "
                             "copy (COPYING) can retry it")  # fmt: skip
        left = (job.video_expires_at or 0) - time.time()
        if left <= 0:
            raise ValueError(f"job {job_id}'s video URL has expired: there is nothing to copy")
        self.celery.send_task(COPY_TASK, args=(job_id, job.version), queue=queue_for(COPY_TASK))
        return {"job_id": job_id, "outcome": "sent",
                "message": f"copy sent now ({left / 3600:.1f} h left on the video URL)"}  # fmt: skip

    def register_template(self, template_id: str, account: str) -> None:
        """Record which account owns a template: jobs using it then run under that account."""
        self.store.register_template(template_id, account)

    def accounts(self) -> list[dict[str, Any]]:
        """Per account: queue depth, remote running/pending, tokens, 429s received."""
        return [self.governor.account_view(a) for a in self.governor.accounts()]

    def timeline(self, job_id: str) -> list[dict[str, Any]]:
        """Every recorded move of the job, oldest first."""
        return self.store.timeline(job_id)

    def jobs(
        self,
        state: str,
        *,
        producer: str | None = None,
        older_than: float | None = None,
        limit: int = 50,
    ) -> list[dict[str, Any]]:
        """Jobs in a state, optionally one producer's, optionally older than some seconds."""
        now = time.time()
        views = [job_view(j) for j in self.store.list_jobs(state, limit=limit * 4)]
        if producer is not None:
            views = [v for v in views if v["producer"] == producer]
        if older_than is not None:
            views = [v for v in views if now - v["created_at"] >= older_than]
        return sorted(views, key=lambda v: v["created_at"])[:limit]

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's record as a dict, or None if there is none (yet)."""
        job = self.store.get(job_id)
        return job_view(job) if job else None

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        *,
        interval: float = 0.5,
        on_progress: Callable[[dict[str, Any] | None], None] | None = None,
    ) -> dict[str, Any]:
        """Block (in the producer, never in a worker) until the job is final; its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.get(job_id)
            if on_progress is not None:
                on_progress(view)
            if view is not None and view["state"] in {s.value for s in FINAL_STATES}:
                return view
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} is not final after {timeout} s")
            time.sleep(interval)

    def close(self) -> None:
        self.store.redis.close()
        self.celery.close()
