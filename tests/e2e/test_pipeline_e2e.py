"""The whole pipeline with real processes: a worker, Redis, the emulator over HTTP, S3 (moto)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from typing import Any

import httpx
import pytest

from devstack import RedisServer, S3Server
from workers.producer import AnimateQueue

pytestmark = pytest.mark.timeout(120)


def test_happy_path(queue: AnimateQueue, remote: Any, s3_server: S3Server, job_id: str) -> None:
    """A job ends STORED; S3 holds exactly the bytes the emulator served, with its SHA-256."""
    queue.submit(remote.image(), remote.template(), job_id=job_id, metadata={"order": 42})
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "STORED", view
    assert view["s3_uri"] == f"s3://{remote.bucket}/e2e/videos/{job_id}.mp4"
    assert view["video_duration"] == 2.0
    assert view["metadata"] == {"order": 42}
    stored = s3_server.client().get_object(Bucket=remote.bucket, Key=view["s3_key"])
    body = stored["Body"].read()
    assert body == remote.video(view["remote_task_id"])
    assert len(body) == view["bytes"]
    assert hashlib.sha256(body).hexdigest() == view["sha256"]
    assert stored["Metadata"]["sha256"] == view["sha256"]
    assert stored["Metadata"]["job-id"] == job_id
    assert remote.counters()["submitted"] == 1
    assert all(v is not None for v in view["seconds"].values())


def test_remote_failure(queue: AnimateQueue, remote: Any, job_id: str) -> None:
    """A task DashScope fails ends FAILED with DashScope's code and message."""
    image = remote.image(emulator_fail="InternalError.Algo")
    queue.submit(image, remote.template(), job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "FAILED"
    assert view["error_code"] == "InternalError.Algo"
    assert "algorithm" in view["error_message"]
    assert view["s3_uri"] is None


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"template_id": "not-a-template"}, "InvalidRequest.TemplateId"),
        ({"video_ratio": "3:4"}, "InvalidRequest.VideoRatioWithoutRefBg"),
        ({"image_url": "ftp://example.com/a.png"}, "InvalidRequest.BadUrl"),
        ({"image_url": "wide"}, "InvalidImage.AspectRatio"),
        ({"image_url": "http://127.0.0.2:9/a.png"}, "InvalidRequest.PrivateAddress"),
        ({"image_url": "http://169.254.169.254/latest/meta-data"}, "InvalidRequest.PrivateAddress"),
        ({"image_url": "file:///etc/passwd"}, "InvalidRequest.BadUrl"),
        ({"metadata": {"blob": "x" * 5000}}, "InvalidRequest.Metadata"),
    ],
)
def test_rejected_input_costs_nothing(
    queue: AnimateQueue, remote: Any, job_id: str, change: dict[str, str], code: str
) -> None:
    """Bad input ends REJECTED with a specific code, and DashScope sees no submission."""
    kwargs = {"image_url": remote.image(), "template_id": remote.template(), **change}
    if kwargs["image_url"] == "wide":
        kwargs["image_url"] = (
            f"{remote.server.url}/_emulator/samples/person.png?width=900&height=300"
        )
    queue.submit(**kwargs, job_id=job_id)
    view = queue.wait(job_id, timeout=30)
    assert view["state"] == "REJECTED"
    assert view["error_code"] == code
    assert remote.counters().get("submitted", 0) == 0


def test_garbage_kwargs_are_recorded(queue: AnimateQueue, remote: Any, job_id: str) -> None:
    """Unknown fields are refused by name; the job record says so and nothing is sent."""
    queue.celery.send_task(
        "animate.generate",
        kwargs={"job_id": job_id, "image": "x", "template_id": remote.template()},
        queue="celery",
    )
    view = queue.wait(job_id, timeout=30)
    assert view["state"] == "REJECTED"
    assert view["error_code"] == "InvalidRequest.UnknownField"
    assert "'image'" in view["error_message"]
    assert remote.counters().get("submitted", 0) == 0


def test_throttling_and_5xx_pay_once(queue: AnimateQueue, remote: Any, job_id: str) -> None:
    """429 and 5xx on submit and on poll are retried, and exactly one submission is paid."""
    remote.fault("submit", "500")
    remote.fault("submit", "429")
    remote.fault("submit", "503")
    remote.fault("query", "503", count=2)
    remote.fault("query", "429")
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "STORED", view
    counters = remote.counters()
    assert counters["submitted"] == 1
    assert view["attempts"]["submit"] == 3  # a 429 is a wait, not a failed attempt
    assert view["throttled_429"] == 2


def test_dropped_submit_is_not_paid_twice(queue: AnimateQueue, remote: Any, job_id: str) -> None:
    """A submit whose answer is lost (the task was created) is found again, not resubmitted."""
    remote.fault("submit", "drop_after")
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "STORED", view
    assert remote.counters()["submitted"] == 1
    assert view["attempts"]["submit"] == 1


def test_duplicate_job_id(queue: AnimateQueue, remote: Any, job_id: str) -> None:
    """The same job_id twice makes one job and one remote submission."""
    image, template = remote.image(), remote.template()
    queue.submit(image, template, job_id=job_id)
    queue.submit(image, template, job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "STORED"
    assert remote.counters()["submitted"] == 1
    assert queue.wait(job_id, timeout=10)["duplicates"] == 1


def test_celery_only_producer(queue: AnimateQueue, remote: Any, redis_server: RedisServer) -> None:
    """Another service with only celery installed: send_task by name, the message id is the job id."""
    script = textwrap.dedent(
        f"""
        from celery import Celery
        app = Celery(broker={redis_server.url!r})
        app.conf.task_serializer = "json"
        result = app.send_task("animate.generate", kwargs={{
            "image_url": {remote.image()!r}, "template_id": {remote.template()!r}}})
        print(result.id)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    job_id = done.stdout.strip().splitlines()[-1]
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "STORED", view


def test_url_expired_before_copy(queue: AnimateQueue, remote: Any, job_id: str) -> None:
    """A video URL that dies before the copy ends the job EXPIRED, not retried forever."""
    remote.config(url_ttl_seconds=0)
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "EXPIRED"
    assert view["error_code"] == "VideoUrlExpired"
    assert view["s3_uri"] is None


def test_truncated_download_is_retried(
    queue: AnimateQueue, remote: Any, s3_server: S3Server, job_id: str
) -> None:
    """A download cut short is never stored; the retry stores the whole video."""
    remote.fault("video", "truncate")
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "STORED", view
    assert view["attempts"]["copy"] == 2
    body = s3_server.client().get_object(Bucket=remote.bucket, Key=view["s3_key"])["Body"].read()
    assert body == remote.video(view["remote_task_id"])


def test_always_truncated_is_retried_until_the_url_dies(
    queue: AnimateQueue, remote: Any, s3_server: S3Server, job_id: str
) -> None:
    """Every download ends short: the copy is retried (no fixed count) until its URL is about
    to die, then the job is EXPIRED with the last error, and S3 holds nothing under its key."""
    remote.config(url_ttl_seconds=5)
    remote.fault("video", "truncate", count=1000)
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert (view["state"], view["error_code"]) == ("EXPIRED", "VideoUrlExpired"), view
    assert "copy attempts failed" in view["error_message"]
    assert "expected" in view["error_message"]  # the last error: a body cut short
    assert view["attempts"]["copy"] >= 3
    listed = s3_server.client().list_objects_v2(Bucket=remote.bucket, Prefix=f"e2e/videos/{job_id}")
    assert listed.get("KeyCount", 0) == 0


def test_a_403_that_is_not_an_expiry_is_retried(
    queue: AnimateQueue, remote: Any, s3_server: S3Server, job_id: str
) -> None:
    """A 403 from the video URL whose body does not say the request expired (and before the
    URL's Expires) is retried: the video is stored."""
    remote.fault("video", "403", count=2)
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "STORED", view
    assert view["attempts"]["copy"] == 3
    body = s3_server.client().get_object(Bucket=remote.bucket, Key=view["s3_key"])["Body"].read()
    assert body == remote.video(view["remote_task_id"])


def test_status_cli(
    queue: AnimateQueue, remote: Any, redis_server: RedisServer, job_id: str
) -> None:
    """``animate-queue status JOB --json`` prints the record; secrets never appear in it."""
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    queue.wait(job_id, timeout=60)
    done = subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli", "status", job_id, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"REDIS_URL": redis_server.url, "PATH": "/usr/bin:/bin"},
        check=True,
    )
    view = json.loads(done.stdout)
    assert view["state"] == "STORED"
    assert remote.api_key not in done.stdout and "Signature=" not in done.stdout
    raw = httpx.get(remote.server.url + "/_emulator/health").json()
    assert raw == {"ok": True}


def test_a_bare_worker_runs_a_job_end_to_end(
    worker_env: dict[str, str], remote: Any, job_id: str
) -> None:
    """`celery -A config.celery_app worker` with no -Q (the form a Celery user types first) takes
    a job through intake, detect, submit, poll and copy: it consumes every queue of the table."""
    from devstack import Worker

    with RedisServer() as own:
        bare = Worker({**worker_env, "REDIS_URL": own.url}, queues=None, name=f"bare-{job_id}@%h")
        q = AnimateQueue(own.url)
        try:
            bare.start()
            q.generate(remote.image(), template_id=remote.template(), job_id=job_id)
            view = q.wait(job_id, timeout=60)
            assert view["state"] == "STORED", view
            assert "dashscope" in bare.log() and "transfer" in bare.log()  # its queue banner
        finally:
            bare.stop()
            q.close()


def test_a_key_from_another_region_is_reported_as_that(
    queue: AnimateQueue, remote: Any, job_id: str
) -> None:
    """The emulator plays Singapore's host and the worker's key is a Beijing key: DashScope's
    401 ends the job FAILED with a message that names the account, the host and the region."""
    template = remote.template()
    remote.config(region="ap-southeast-1", key_regions={remote.api_key: "cn-beijing"})
    queue.submit(remote.image(), template, job_id=job_id)
    view = queue.wait(job_id, timeout=60)
    assert (view["state"], view["error_code"]) == ("FAILED", "InvalidApiKey"), view
    assert "account 'default'" in view["error_message"]
    assert "region cn-beijing" in view["error_message"]
    assert "only in the region it was created in" in view["error_message"]
    assert remote.api_key not in view["error_message"]
    assert remote.counters().get("submitted", 0) == 0
