"""Jobs in flight survive an upgrade: jobs enqueued by the release before the layered regrouping
(issue 16) and run partly by its workers finish on this code.

The old release is the repository's own history (commit ``BEFORE``), unpacked into a directory:
its client enqueues, its worker admits, submits and polls. Then the old worker gets SIGTERM (a
deploy's warm shutdown: its held countdown polls go back to Redis), the old client enqueues one
more job while no worker runs, and this code's worker and beat take over the same Redis. Every
job is stored with its own video, and DashScope saw one submission per job: the task names,
queues, message arguments, job records, timers and indexes written by the old code are read by
the new.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import Beat, RedisServer, S3Server, Worker
from workers.producer import AnimateQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
BEFORE = "4922b23"  # the last commit before workers/ was regrouped into layers


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The code of ``BEFORE``, unpacked from git (the CI checkout is a full clone)."""
    found = subprocess.run(["git", "cat-file", "-e", f"{BEFORE}^{{commit}}"], cwd=ROOT,
                           capture_output=True, check=False)  # fmt: skip
    if found.returncode != 0:
        pytest.skip(f"needs the repository's history (commit {BEFORE})")
    where = tmp_path_factory.mktemp("old-release")
    archive = subprocess.run(["git", "archive", BEFORE], cwd=ROOT, capture_output=True,
                             check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    assert (where / "workers" / "pipeline.py").exists()  # the flat layout, before the move
    return where


def old_submit(old: Path, redis_url: str, image: str, template: str, job_id: str) -> None:
    """The old release's client, in its own process, enqueues one job."""
    script = (
        "import sys; from workers.client import AnimateQueue; "
        "q = AnimateQueue(sys.argv[1]); q.submit(sys.argv[2], sys.argv[3], job_id=sys.argv[4]); "
        "import workers; print(workers.__file__)"
    )
    done = subprocess.run([sys.executable, "-c", script, redis_url, image, template, job_id],
                          cwd=old, env={"PYTHONPATH": str(old), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(old / "workers" / "__init__.py")  # the old code ran


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_jobs_in_flight_finish_after_the_upgrade(
    old_release: Path,
    own_redis: RedisServer,
    worker_env: dict[str, str],
    remote: Any,
    s3_server: S3Server,
) -> None:
    env = {**worker_env, "REDIS_URL": own_redis.url, "POLL_RUNNING_SECONDS": "2",
           "WATCHDOG_INTERVAL_SECONDS": "1", "WATCHDOG_GRACE_SECONDS": "3"}  # fmt: skip
    remote.config(generation_seconds=6)
    template = remote.template()
    stamp = time.time_ns()
    ids = [f"upgrade-{stamp}-{i}" for i in range(3)]
    # Images of their own size: each job's task can be told by the image DashScope was given.
    sample = f"{remote.server.url}/_emulator/samples/person.png"
    images = {job: f"{sample}?width={300 + 2 * i}&height=512" for i, job in enumerate(ids)}
    q = AnimateQueue(own_redis.url)
    old = Worker({**env, "PYTHONPATH": str(old_release)}, concurrency=2, cwd=old_release,
                 name=f"old-{stamp}@%h")  # fmt: skip
    workers: list[Worker] = []
    beat: Beat | None = None
    try:
        old.start()
        for job in ids[:2]:
            old_submit(old_release, own_redis.url, images[job], template, job)
        deadline = time.monotonic() + 60
        while (q.get(ids[0]) or {}).get("state") != "SUBMITTED":
            assert time.monotonic() < deadline, q.get(ids[0])
            time.sleep(0.1)
        time.sleep(1)  # a poll of the old release is now held or parked
        before = {job: (q.get(job) or {}).get("state") for job in ids[:2]}
        old.stop()  # SIGTERM: a deploy's warm shutdown
        # A job enqueued by the old client while no worker runs: its message waits in Redis.
        old_submit(old_release, own_redis.url, images[ids[2]], template, ids[2])

        workers.append(Worker(env, concurrency=2, name=f"new-{stamp}@%h").start())
        beat = Beat(env).start()
        views = [q.wait(job, timeout=90, interval=0.2) for job in ids]
        new_log = workers[0].log()
    finally:
        old.kill()
        for w in workers:
            w.stop()
        if beat is not None:
            beat.stop()
        q.close()

    assert before[ids[0]] == "SUBMITTED"
    # The old release's messages themselves carried the jobs on (the held poll, the waiting
    # intake): none was unknown to the new worker, and the watchdog resumed nothing.
    assert "unregistered task" not in new_log.lower(), new_log
    assert ": resumed, overdue" not in new_log, new_log
    assert "Task animate.poll[" in new_log and "Task animate.generate[" in new_log
    assert [v["state"] for v in views] == ["STORED"] * 3, json.dumps(views, default=str)
    tasks = [v["remote_task_id"] for v in views]
    assert len(set(tasks)) == 3
    assert all(v["attempts"]["submit"] == 1 for v in views)
    s3 = s3_server.client()
    for view in views:
        body = s3.get_object(Bucket=remote.bucket, Key=view["s3_key"])["Body"].read()
        expected = remote.video(view["remote_task_id"])
        assert body == expected and view["sha256"] == hashlib.sha256(expected).hexdigest()
    # Each job's own task (the image DashScope was given is the job's own), one per job.
    tasks_seen = remote.http.get("/_emulator/tasks").json()
    by_image = {t["image_sha256"]: t["task_id"] for t in tasks_seen
                if t["model"] == "animate-anyone-gen2" and t["task_id"] in tasks}  # fmt: skip
    for view, job in zip(views, ids, strict=True):
        own = hashlib.sha256(httpx.get(images[job], timeout=10).content).hexdigest()
        assert by_image[own] == view["remote_task_id"], job
    assert len(by_image) == 3
