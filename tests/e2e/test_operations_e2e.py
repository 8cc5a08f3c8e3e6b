"""Operating the pipeline: Flower sees it, logs keep secrets, duplicates are harmless, bad config stops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from devstack import Flower, RedisServer, Worker
from workers.producer import AnimateQueue

pytestmark = pytest.mark.timeout(120)


def test_logs_keep_secrets(queue: AnimateQueue, remote: Any, worker: Worker, job_id: str) -> None:
    """After whole jobs (one failing), no log line, record or result holds a key or signature."""
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    assert queue.wait(job_id, timeout=60)["state"] == "STORED"
    failing = f"{job_id}-f"
    queue.submit(
        remote.image(emulator_fail="InternalError.Algo"), remote.template(), job_id=failing
    )
    assert queue.wait(failing, timeout=60)["state"] == "FAILED"
    everything = []
    for key in queue.store.redis.scan_iter("*"):
        kind = queue.store.redis.type(key)
        if kind == b"hash":
            everything.append(str(queue.store.redis.hgetall(key)))
        elif kind == b"string":
            everything.append(str(queue.store.redis.get(key)))
        elif kind == b"list":
            everything.append(str(queue.store.redis.lrange(key, 0, -1)))
    dump = "\n".join(everything)
    for secret in (remote.api_key, remote.aws_secret):
        assert secret not in dump  # job records, results, queues
        assert secret not in worker.log()
    log = worker.log()
    assert job_id in log  # the log does talk about the job...
    assert remote.api_key not in log  # ...but never shows the key
    assert "Signature=" not in log or "Signature=***" in log
    assert "Signature=" not in log.replace("Signature=***", "")


def test_duplicate_poll_chain_is_harmless(
    queue: AnimateQueue, remote: Any, worker: Worker, job_id: str
) -> None:
    """Extra poll messages carrying the current version: one chain survives, one copy, one payment."""
    remote.config(generation_seconds=3)
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    deadline = time.monotonic() + 30
    while True:
        job = queue.store.get(job_id)
        if job and job.state.value == "SUBMITTED":
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(3):
        queue.celery.send_task("animate.poll", args=(job_id, job.version), queue="dashscope")
    view = queue.wait(job_id, timeout=60)
    assert view["state"] == "STORED"
    assert view["attempts"]["copy"] == 1
    assert remote.counters()["submitted"] == 1
    stale = [line for line in worker.log().splitlines() if job_id in line and "stale" in line]
    assert len(stale) >= 2


def test_cli_submit_and_wait(
    remote: Any, redis_server: RedisServer, worker: Worker, job_id: str
) -> None:
    """``animate-queue submit --wait`` prints the job id and ends with the record; wait exits 0."""
    env = {"REDIS_URL": redis_server.url, "PATH": os.environ["PATH"]}
    cli = [sys.executable, "-m", "workers.entrypoints.cli"]
    done = subprocess.run(
        [*cli, "submit", "--image-url", remote.image(), "--template-id", remote.template(),
         "--job-id", job_id, "--metadata", '{"who": "cli"}', "--wait"],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == job_id
    assert "STORED" in done.stderr
    waited = subprocess.run(
        [*cli, "wait", job_id, "--json"], capture_output=True, text=True, timeout=30, env=env
    )
    assert waited.returncode == 0
    assert json.loads(waited.stdout)["metadata"] == {"who": "cli"}
    missing = subprocess.run(
        [*cli, "status", "no-such-job"], capture_output=True, text=True, timeout=30, env=env
    )
    assert missing.returncode == 1 and "no job no-such-job" in missing.stderr


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"DASHSCOPE_API_KEY": ""}, "DASHSCOPE_API_KEY"),
        ({"POLL_RUNNING_SECONDS": "soon"}, "POLL_RUNNING_SECONDS"),
        ({"VISIBILITY_TIMEOUT": "120"}, "VISIBILITY_TIMEOUT"),
    ],
)
def test_bad_configuration_stops_the_worker(
    worker_env: dict[str, str], change: dict[str, str], named: str
) -> None:
    """A worker with a bad or missing setting exits at start-up, naming the variable."""
    w = Worker({**worker_env, **change})
    with pytest.raises(RuntimeError, match="exited at start-up") as info:
        w.start(timeout=30)
    assert named in str(info.value)


FLOWER_AUTH = ("ops", "flower-pass-0123")


def test_flower_sees_jobs(
    queue: AnimateQueue, remote: Any, worker_env: dict[str, str], worker: Worker, job_id: str
) -> None:
    """Flower, started for real behind basic auth, lists the worker and every step's task of the
    job with its id and producer in the arguments (searchable), and shows no secret."""
    env = {**worker_env, "FLOWER_BASIC_AUTH": ":".join(FLOWER_AUTH)}
    flower = Flower(env).start()
    base = flower.url
    try:
        assert httpx.get(f"{base}/api/tasks", timeout=5).status_code == 401
        assert httpx.get(f"{base}/", timeout=5).status_code == 401
        time.sleep(1.5)  # flower enables events on the workers
        queue.submit(remote.image(), remote.template(), job_id=job_id, producer="shop")
        assert queue.wait(job_id, timeout=60)["state"] == "STORED"
        deadline = time.monotonic() + 20
        steps = {"animate.generate", "animate.detect", "animate.submit", "animate.poll",
                 "animate.copy"}  # fmt: skip
        while True:
            # The documented way to find a job's tasks: Flower's search over the arguments.
            found = httpx.get(f"{base}/api/tasks", params={"search": job_id}, auth=FLOWER_AUTH,
                              timeout=5).json()  # fmt: skip
            names = {t["name"] for t in found.values()}
            if steps <= names:
                break
            assert time.monotonic() < deadline, names
            time.sleep(0.5)
        internal = [t for t in found.values() if t["name"] != "animate.generate"]
        assert all(f"job_id='{job_id}'" in t["args"] for t in internal)
        assert all("producer='shop'" in t["args"] for t in internal)
        everything = httpx.get(f"{base}/api/tasks", auth=FLOWER_AUTH, timeout=10).json()
        assert remote.api_key not in json.dumps(everything)
        workers = httpx.get(f"{base}/api/workers", auth=FLOWER_AUTH, timeout=10).json()
        assert any(name.startswith("aq-") for name in workers)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text  # Prometheus scrapes it
        assert 'task="animate.poll"' in metrics
    finally:
        flower.stop()


def test_flower_refuses_to_start_without_auth(worker_env: dict[str, str]) -> None:
    env = {**worker_env, "FLOWER_BASIC_AUTH": "", "FLOWER_ALLOW_NO_AUTH": "false"}
    with pytest.raises(RuntimeError, match="FLOWER_BASIC_AUTH is not set"):
        Flower(env).start(timeout=15)
    opened = Flower({**env, "FLOWER_ALLOW_NO_AUTH": "true"}).start()  # an explicit choice
    try:
        assert httpx.get(f"{opened.url}/", timeout=10).status_code == 200  # the dashboard
    finally:
        opened.stop()


def test_timeline_of_a_job_with_retries(
    queue: AnimateQueue, remote: Any, redis_server: RedisServer, worker: Worker, job_id: str
) -> None:
    """``status --json`` carries every move with its time, the retries and remote statuses seen."""
    remote.fault("submit", "500")
    remote.fault("query", "503")
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    assert queue.wait(job_id, timeout=60)["state"] == "STORED"
    env = {"REDIS_URL": redis_server.url, "PATH": os.environ["PATH"]}
    cli = [sys.executable, "-m", "workers.entrypoints.cli"]
    done = subprocess.run([*cli, "status", job_id, "--json"], capture_output=True, text=True,
                          timeout=30, env=env, check=True)  # fmt: skip
    events = json.loads(done.stdout)["timeline"]
    moves = [(e.get("from"), e["to"]) for e in events if "from" in e or e.get("created")]
    assert moves[0] == (None, "RECEIVED")  # recorded, its inputs being checked
    assert moves[1] == ("RECEIVED", "DETECTING")  # then the image check, by default
    assert ("DETECTING", "QUEUED") in moves
    assert ("QUEUED", "SUBMITTING") in moves
    assert ("SUBMITTING", "SUBMITTED") in moves
    assert ("SUBMITTED", "COPYING") in moves
    assert moves[-1] == ("COPYING", "STORED")
    assert any(e.get("error_code") == "InternalError" for e in events)  # the failed submit
    assert any(e.get("error_code") == "ModelUnavailable" for e in events)  # the failed poll
    seen = {e.get("remote_status") for e in events} - {None}
    assert "SUCCEEDED" in seen and len(seen) >= 2  # what each poll saw, as it changed
    times = [e["at"] for e in events]
    assert times == sorted(times)
    table = subprocess.run([*cli, "status", job_id], capture_output=True, text=True, timeout=30,
                           env={**env, "COLUMNS": "200"}, check=True)  # fmt: skip
    assert "timeline" in table.stdout and "COPYING -> STORED" in table.stdout
    listed = subprocess.run([*cli, "jobs", "--state", "STORED", "--json", "--limit", "500"],
                            capture_output=True, text=True, timeout=30, env=env, check=True)  # fmt: skip
    assert job_id in {v["job_id"] for v in json.loads(listed.stdout)}


def health_queues(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli", "health", "queues", "--timeout", "2"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_a_routed_queue_nobody_consumes_is_red_within_a_minute(
    worker_env: dict[str, str],
) -> None:
    """A pool started with a -Q that leaves out `transfer`: health says so (and which queue),
    well within a minute; with every queue consumed it is green again."""
    with RedisServer() as own:
        env = {**worker_env, "REDIS_URL": own.url}
        partial = Worker(env, queues="celery,dashscope", name="partial@%h")
        full: Worker | None = None
        try:
            partial.start()
            deadline = time.monotonic() + 30
            while (said := health_queues(env)).returncode == 0:
                assert time.monotonic() < deadline, said.stdout
                time.sleep(1)
            assert said.returncode == 1
            assert "'transfer' has no consumer" in said.stderr, said.stderr
            assert "'celery'" not in said.stderr and "'dashscope'" not in said.stderr
            full = Worker(env, queues=None, name="full@%h").start()
            deadline = time.monotonic() + 30
            while (said := health_queues(env)).returncode != 0:
                assert time.monotonic() < deadline, said.stderr
                time.sleep(1)
            assert said.stdout.startswith("queues: ok")
        finally:
            partial.kill()
            if full is not None:
                full.kill()
