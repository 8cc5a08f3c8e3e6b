"""A worker outlives the loss of its broker connection: Redis restarted, or a Sentinel failover.

The worker process must stay the same process (no restart by a supervisor), reconnect by itself,
say so in its log, and carry its jobs to STORED, paid once. The dangerous moment is a worker
holding an unacknowledged message, such as a poll countdown, when the connection drops: kombu
then restores it on the way out, and without our transport (workers/adapters/redis/
kombu_transport.py) that crashed the worker ("Unrecoverable error: AttributeError: 'NoneType'
object has no attribute 'hostname'").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import Beat, RedisServer, Worker
from devstack.ha import RedisHA
from workers.adapters.redis.connection import RedisAddress
from workers.producer import AnimateQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

FAST_WATCHDOG = {"WATCHDOG_INTERVAL_SECONDS": "1", "WATCHDOG_GRACE_SECONDS": "2"}


def wait_for(predicate: Any, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def holding_a_poll(queue: AnimateQueue, remote: Any, job_id: str) -> None:
    """A job whose poll countdown the worker holds (DashScope generates for 6 s)."""
    remote.config(generation_seconds=6)
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    wait_for(lambda: (queue.get(job_id) or {}).get("state") == "SUBMITTED", what="SUBMITTED")
    time.sleep(0.5)


def survived(worker: Worker, pid: int) -> None:
    assert worker.proc is not None and worker.proc.pid == pid and worker.proc.poll() is None, (
        worker.log()[-3000:]
    )
    assert "Unrecoverable error" not in worker.log()


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


def test_a_redis_restart_does_not_kill_the_worker(
    aof_redis: RedisServer, worker_env: dict[str, str], remote: Any, job_id: str
) -> None:
    env = {**worker_env, "REDIS_URL": aof_redis.url, **FAST_WATCHDOG}
    with Worker(env, concurrency=2, name=f"loss-{time.time_ns()}@%h") as worker, Beat(env):
        assert worker.proc is not None
        pid = worker.proc.pid
        queue = AnimateQueue(aof_redis.url)
        try:
            holding_a_poll(queue, remote, job_id)
            aof_redis.stop()  # SIGTERM: the AOF is written, every connection drops
            time.sleep(1)
            aof_redis.start()
            view = queue.wait(job_id, timeout=90)
        finally:
            queue.close()
        assert view["state"] == "STORED", view
        survived(worker, pid)
        assert "Connection to broker lost" in worker.log()
    assert remote.counters()["submitted"] == 1


def test_a_sentinel_failover_does_not_kill_the_worker(
    worker_env: dict[str, str], remote: Any, job_id: str
) -> None:
    with RedisHA() as ha:
        env = {**worker_env, "REDIS_URL": ha.url(), "REDIS_SENTINELS": ha.sentinel_setting(),
               **FAST_WATCHDOG}  # fmt: skip
        address = RedisAddress(ha.url(), tuple(s.address for s in ha.sentinels))
        with Worker(env, concurrency=2, name=f"failover-{time.time_ns()}@%h") as worker, Beat(env):
            assert worker.proc is not None
            pid = worker.proc.pid
            queue = AnimateQueue(ha.url(), address=address)
            try:
                holding_a_poll(queue, remote, job_id)
                old = ha.current_master()
                old.kill()
                new = ha.wait_for_failover(old)
                view = queue.wait(job_id, timeout=90)
            finally:
                queue.close()
            assert view["state"] == "STORED", view
            survived(worker, pid)
            log = worker.log()
            assert f"moved from {old.place.host}:{old.port} to {new.place.host}:{new.port}" in log
            assert "Connected to sentinel://" in log.split("Connection to broker lost")[-1]
    assert remote.counters()["submitted"] == 1


def test_flower_follows_a_failover(worker_env: dict[str, str]) -> None:
    """Flower on Sentinel: it sees the worker before and after the master dies, from the same
    process, says so in its log, and its broker page answers."""
    import httpx

    from devstack import Flower

    with RedisHA() as ha:
        env = {**worker_env, "REDIS_URL": ha.url(), "REDIS_SENTINELS": ha.sentinel_setting(),
               "FLOWER_BASIC_AUTH": "ops:flower-pw"}  # fmt: skip
        name = f"flower-ha-{time.time_ns()}@%h"
        with Worker(env, concurrency=1, name=name) as worker, Flower(env) as flower:
            auth = ("ops", "flower-pw")

            def sees_the_worker() -> bool:
                answer = httpx.get(f"{flower.url}/api/workers?refresh=1", auth=auth, timeout=20)
                return answer.status_code == 200 and any(
                    node.startswith("flower-ha-") for node in answer.json()
                )

            wait_for(sees_the_worker, 30, "Flower to see the worker")
            old = ha.current_master()
            old.kill()
            new = ha.wait_for_failover(old)
            wait_for(sees_the_worker, 60, "Flower to see the worker after the failover")
            assert httpx.get(f"{flower.url}/broker", auth=auth, timeout=20).status_code == 200
            assert flower.proc is not None and flower.proc.poll() is None
            assert worker.proc is not None and worker.proc.poll() is None
        log = (Path(flower.state_dir) / "flower.log").read_text()
        assert f"moved from {old.place.host}:{old.port} to {new.place.host}:{new.port}" in log


def test_a_frozen_replica_holds_jobs_back_until_it_answers(
    worker_env: dict[str, str], remote: Any, job_id: str
) -> None:
    """The error path of protected writes, end to end: while the replica is frozen (connected,
    silent), no job step is acknowledged (each stops with ReplicationTimeout, logged and
    counted) and nothing is paid; once it answers again the job goes on to STORED, paid once."""
    import os
    import signal

    with RedisHA() as ha:
        env = {**worker_env, "REDIS_URL": ha.url(), "REDIS_SENTINELS": ha.sentinel_setting(),
               "REDIS_WAIT_TIMEOUT_MS": "300", **FAST_WATCHDOG}  # fmt: skip
        address = RedisAddress(ha.url(), tuple(s.address for s in ha.sentinels))
        (replica,) = ha.replicas
        assert replica.proc is not None
        with Worker(env, concurrency=2, name=f"frozen-{time.time_ns()}@%h") as worker, Beat(env):
            queue = AnimateQueue(ha.url(), address=address)
            try:
                queue.submit(remote.image(), remote.template(), job_id=job_id)
                os.kill(replica.proc.pid, signal.SIGSTOP)
                try:
                    time.sleep(3)
                    view = queue.get(job_id)
                    # at most its first step got through before the freeze; nothing was paid
                    assert view is None or view["state"] in ("RECEIVED", "QUEUED"), view
                    assert remote.counters().get("submitted", 0) == 0
                finally:
                    os.kill(replica.proc.pid, signal.SIGCONT)
                view = queue.wait(job_id, timeout=90)
            finally:
                queue.close()
            assert view["state"] == "STORED", view
            assert "ReplicationTimeout" in worker.log() or "replicas confirmed" in worker.log()
    assert remote.counters()["submitted"] == 1


def test_an_intake_message_lost_on_its_way_is_sent_again(
    worker_env: dict[str, str], remote: Any, job_id: str
) -> None:
    """A new job exists only as its intake message until a worker takes it. Here the message
    vanishes from the queue before any worker has it (as when a worker's BRPOP popped it and
    the answer never crossed the network, or a failover took it back): the producer's note in
    the intake inbox lets the watchdog send it again, and the job is stored, paid once."""
    with RedisHA() as ha:
        env = {**worker_env, "REDIS_URL": ha.url(), "REDIS_SENTINELS": ha.sentinel_setting(),
               **FAST_WATCHDOG}  # fmt: skip
        address = RedisAddress(ha.url(), tuple(s.address for s in ha.sentinels))
        queue = AnimateQueue(ha.url(), address=address, wait_replicas=1)
        try:
            queue.submit(remote.image(), remote.template(), job_id=job_id)  # no worker yet
            with ha.current_master().client() as master:
                assert master.lpop("celery") is not None  # the message is gone
                assert master.llen("celery") == 0
            with Worker(env, concurrency=2, name=f"inbox-{time.time_ns()}@%h") as worker, Beat(env):
                view = queue.wait(job_id, timeout=90)
                assert "its intake message was lost" in worker.log()
            with ha.current_master().client() as master:
                assert not master.hexists("animate-queue:inbox", job_id)  # crossed off
        finally:
            queue.close()
        assert view["state"] == "STORED", view
    assert remote.counters()["submitted"] == 1
