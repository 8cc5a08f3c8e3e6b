"""A big video on a slow path outlives one copy attempt's time budget: the next attempt goes on
from the checkpoint (the parts already in S3 are kept, the source is asked for the rest with a
Range), instead of starting over forever."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from devstack import RedisServer, S3Server, Worker
from workers.producer import AnimateQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

MiB = 1024 * 1024
SIZE = 32 * MiB
RATE = 1 * MiB  # bytes a second: the video takes 32 s, more than an attempt's hard limit (30 s)


@pytest.fixture
def slow_path(worker_env: dict[str, str], remote: Any) -> Iterator[AnimateQueue]:
    remote.config(video_pad_bytes=SIZE, video_bytes_per_second=RATE)
    with RedisServer() as own:
        env = {
            **worker_env,
            "REDIS_URL": own.url,
            "COPY_TIME_LIMIT": "30",  # the budget of one attempt: 15 s
            "COPY_PART_SIZE_MB": "5",
        }
        worker = Worker(env, concurrency=2, name="slowpath@%h").start()
        queue = AnimateQueue(own.url)
        try:
            yield queue
        finally:
            worker.stop()
            queue.close()


def test_a_copy_longer_than_its_time_limit_resumes(
    slow_path: AnimateQueue, remote: Any, s3_server: S3Server, job_id: str
) -> None:
    slow_path.submit(remote.image(), remote.template(), job_id=job_id)
    view = slow_path.wait(job_id, timeout=120)
    assert view["state"] == "STORED", view
    assert view["attempts"]["copy"] >= 3  # paused after about 15 s each time, went on
    served = remote.http.get("/_emulator/stats").json()["accounts"]
    counters: dict[str, Any] = {}
    for models in served.values():
        counters.update(models.get("animate-anyone-gen2", {}))
    # the second attempt fetched only the rest: about one video in all, not two
    assert SIZE <= counters["video_bytes_served"] < 1.3 * SIZE
    remote.config(video_bytes_per_second=0)
    expected = remote.video(view["remote_task_id"])
    body = s3_server.client().get_object(Bucket=remote.bucket, Key=view["s3_key"])["Body"].read()
    assert body == expected and len(body) == SIZE
    assert view["sha256"] == hashlib.sha256(expected).hexdigest()
    uploads = s3_server.client().list_multipart_uploads(Bucket=remote.bucket).get("Uploads", [])
    assert not [u for u in uploads if job_id in u["Key"]]
