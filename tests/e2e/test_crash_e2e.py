"""SIGKILL at each dangerous point: the watchdog resumes the job, nothing is paid twice or lost."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devstack import Beat, RedisServer, S3Server, Worker
from workers.producer import AnimateQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WATCHDOG_ENV = {
    "WATCHDOG_INTERVAL_SECONDS": "1",
    "WATCHDOG_GRACE_SECONDS": "2",
    "COPY_LEASE_SECONDS": "3",
    # A detect or submit attempt is presumed dead after 1 + 5 + 4 s (the default is 45 s).
    "DASHSCOPE_CONNECT_TIMEOUT": "1",
    "DASHSCOPE_READ_TIMEOUT": "5",
    "STEP_MARGIN_SECONDS": "4",
}


@pytest.fixture(scope="module")
def crash_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def crash_env(crash_redis: RedisServer, worker_env: dict[str, str]) -> dict[str, str]:
    return {**worker_env, "REDIS_URL": crash_redis.url, **WATCHDOG_ENV}


@pytest.fixture(scope="module")
def beat(crash_env: dict[str, str]) -> Iterator[Beat]:
    with Beat(crash_env) as b:
        yield b


@pytest.fixture
def victim(crash_env: dict[str, str], beat: Beat) -> Iterator[list[Worker]]:
    """A worker to kill; the test appends the replacement so both are cleaned up."""
    workers = [Worker(crash_env, concurrency=2, name=f"victim-{time.time_ns()}@%h").start()]
    yield workers
    for w in workers:
        w.kill()


@pytest.fixture
def cq(crash_redis: RedisServer) -> Iterator[AnimateQueue]:
    q = AnimateQueue(crash_redis.url)
    yield q
    q.close()


def wait_for(predicate: Any, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def state(cq: AnimateQueue, job_id: str) -> str | None:
    view = cq.get(job_id)
    return view["state"] if view else None


def restart(victim: list[Worker], crash_env: dict[str, str]) -> float:
    """SIGKILL the worker (and its pool), start a fresh one; when the kill happened."""
    victim[0].kill()
    killed = time.monotonic()
    victim.append(Worker(crash_env, concurrency=2, name=f"fresh-{time.time_ns()}@%h").start())
    return killed


def test_killed_after_submit_before_task_id(
    cq: AnimateQueue, remote: Any, victim: list[Worker], crash_env: dict[str, str], job_id: str
) -> None:
    """The POST created the task but the worker died before recording it: found, not re-sent."""
    remote.http.post(
        "/_emulator/faults/next", json={"route": "submit", "kind": "slow_after", "seconds": 6}
    ).raise_for_status()
    cq.submit(remote.image(), remote.template(), job_id=job_id)
    wait_for(lambda: remote.counters().get("submitted") == 1, what="the remote task")
    assert state(cq, job_id) == "SUBMITTING"
    killed = restart(victim, crash_env)
    view = cq.wait(job_id, timeout=90)
    assert view["state"] == "STORED", view
    assert remote.counters()["submitted"] == 1  # adopted from the task list, not re-sent
    assert view["attempts"]["submit"] == 1
    assert time.monotonic() - killed < 60


def test_killed_while_a_poll_waits(
    cq: AnimateQueue, remote: Any, victim: list[Worker], crash_env: dict[str, str], job_id: str
) -> None:
    """The worker holding the countdown poll dies: the poll is resumed, the job completes."""
    remote.config(generation_seconds=4)
    cq.submit(remote.image(), remote.template(), job_id=job_id)
    wait_for(lambda: state(cq, job_id) == "SUBMITTED", what="SUBMITTED")
    time.sleep(0.5)  # a poll countdown is now held by the worker
    killed = restart(victim, crash_env)
    view = cq.wait(job_id, timeout=90)
    assert view["state"] == "STORED", view
    assert remote.counters()["submitted"] == 1
    assert time.monotonic() - killed < 60
    assert "resumed" in "".join(w.log() for w in victim)


def test_killed_mid_copy(
    cq: AnimateQueue,
    remote: Any,
    victim: list[Worker],
    crash_env: dict[str, str],
    s3_server: S3Server,
    job_id: str,
) -> None:
    """The copier dies mid-download: the lease runs out, another worker copies, bytes intact."""
    remote.http.post(
        "/_emulator/faults/next", json={"route": "video", "kind": "slow", "seconds": 8}
    ).raise_for_status()
    cq.submit(remote.image(), remote.template(), job_id=job_id)
    wait_for(lambda: state(cq, job_id) == "COPYING", what="COPYING")
    time.sleep(0.5)
    killed = restart(victim, crash_env)
    view = cq.wait(job_id, timeout=90)
    assert view["state"] == "STORED", view
    assert view["attempts"]["copy"] >= 2
    body = s3_server.client().get_object(Bucket=remote.bucket, Key=view["s3_key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == view["sha256"]
    assert body == remote.video(view["remote_task_id"])
    assert remote.counters()["submitted"] == 1
    assert time.monotonic() - killed < 60


def test_two_beats_one_watchdog(
    crash_env: dict[str, str], beat: Beat, victim: list[Worker]
) -> None:
    """A second beat started by mistake: the watchdog still acts at most once per interval."""
    with Beat(crash_env):
        time.sleep(6)
    log = victim[0].log()
    received = log.count("Task animate.watchdog[")
    acted = log.count("watchdog pass:")
    assert received >= 8  # both beats kept sending
    assert acted <= 7  # but about one pass a second acted


def test_poison_job_stops(
    crash_env: dict[str, str], beat: Beat, cq: AnimateQueue, remote: Any, job_id: str
) -> None:
    """A job whose image check kills its worker every time ends FAILED PoisonJob before any
    video is paid for, not in a loop (a paid job is never failed this way: tests/unit)."""
    # Short DashScope timeouts: a detect attempt's deadline (its timeouts plus a margin) is what
    # the watchdog waits out before each resume.
    env = {**crash_env, "WATCHDOG_MAX_RESUMES": "2", "DASHSCOPE_READ_TIMEOUT": "2",
           "STEP_MARGIN_SECONDS": "2"}  # fmt: skip
    remote.http.post(
        "/_emulator/faults/next",
        json={"route": "detect", "kind": "slow", "seconds": 60, "count": 10},
    ).raise_for_status()
    workers = [Worker(env, concurrency=1, name=f"poison-{time.time_ns()}@%h").start()]
    try:
        # An image of its own size: no other test's image check is cached for it.
        image = f"{remote.server.url}/_emulator/samples/person.png?width=301&height=503"
        cq.submit(image, remote.template(), job_id=job_id)
        deaths = 0
        deadline = time.monotonic() + 120
        while state(cq, job_id) not in ("FAILED", "STORED"):
            assert time.monotonic() < deadline
            view = cq.get(job_id) or {}
            detecting_now = (
                view.get("state") == "DETECTING" and view["detection"]["attempts"] > deaths
            )
            if detecting_now:
                time.sleep(0.3)
                workers[-1].kill()  # the "poison": this step takes its worker down
                deaths += 1
                workers.append(
                    Worker(env, concurrency=1, name=f"poison-{time.time_ns()}@%h").start()
                )
            time.sleep(0.1)
        view = cq.get(job_id)
        assert view is not None
        assert (view["state"], view["error_code"]) == ("FAILED", "PoisonJob"), view
        assert deaths == 3  # the first check, then two resumes
        assert remote.counters().get("submitted", 0) == 0  # nothing paid
    finally:
        for w in workers:
            w.kill()
