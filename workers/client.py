"""The producers' Python API: ``submit``, ``get``, ``wait``. It needs only the Redis URL.

>>> queue = AnimateQueue("redis://127.0.0.1:6379/0")
>>> job_id = queue.submit("https://example.com/me.png", "AACT.xxx", job_id="order-42")
>>> queue.wait(job_id, timeout=900)["state"]
'STORED'

Submitting sends the public ``animate.generate`` message (JSON kwargs) to Celery's default queue;
reading goes straight to the job records. No DashScope key or AWS credential is needed here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from workers.governor import RedisGovernor
from workers.jobs import FINAL_STATES, job_view
from workers.store import RedisJobStore

INTAKE_TASK = "animate.generate"
INTAKE_QUEUE = "celery"


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
    ) -> None:
        self.celery = Celery(
            "animate_queue_producer",
            broker=broker_url or redis_url,
            backend=result_backend or redis_url,
        )
        self.celery.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_send_sent_event=True,  # Flower sees the job the moment it is sent
            broker_connection_retry_on_startup=True,
        )
        client = redis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
        self.store = RedisJobStore(client, prefix=key_prefix, final_ttl=0)
        self.governor = RedisGovernor(
            client,
            prefix=key_prefix,
            model="animate-anyone-gen2",
            rates=rates or {"submit": 0.8, "query": 15.0, "detect": 4.0},
            capacity=capacity,
        )

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
        message_id = str(uuid.uuid4())
        self.celery.send_task(INTAKE_TASK, kwargs=kwargs, queue=INTAKE_QUEUE, task_id=message_id)
        return job_id or message_id

    def cancel(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        """Cancel a job through a worker (``animate.cancel``); what happened."""
        result = self.celery.send_task("animate.cancel", args=(job_id,), queue=INTAKE_QUEUE)
        return dict(result.get(timeout=timeout))

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
