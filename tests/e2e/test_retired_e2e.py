"""A retired model, with real processes: DashScope (the emulator told the model is gone) answers
404 ModelNotFound; the job fails once with a message naming the successor, and the jobs behind
it fail the same way at once, not after a call of their own each (a worker of its own here: the
answer is remembered in its processes for ten minutes)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devstack import RedisServer, Worker
from workers.producer import AnimateQueue

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def retired_worker(worker_env: dict[str, str]) -> Iterator[tuple[RedisServer, Worker]]:
    with RedisServer() as server:
        w = Worker({**worker_env, "REDIS_URL": server.url}, concurrency=1, name="retired@%h")
        w.start()
        yield server, w
        w.stop()


def test_a_retired_model_fails_its_jobs_once_naming_the_successor(
    retired_worker: tuple[RedisServer, Worker], remote: Any
) -> None:
    server, _ = retired_worker
    remote.config(retired_models=["animate-anyone-gen2"])
    queue = AnimateQueue(server.url)
    try:
        template = remote.template()
        ids = [queue.submit(remote.image(), template, job_id=f"retired-{i}") for i in range(3)]
        views = [queue.wait(job_id, timeout=60) for job_id in ids]
    finally:
        queue.close()
    for view in views:
        assert (view["state"], view["error_code"]) == ("FAILED", "ModelRetired"), view
        assert "no longer serves animate-anyone-gen2" in view["error_message"]
        assert "successor is wan2.2-animate-move" in view["error_message"]
        assert view["attempts"]["submit"] == 1  # failed once: no retries
    counters = remote.counters()
    assert counters.get("submitted", 0) == 0
    assert counters["errors"] == 1  # one 404 for the worker's one process; the others: no call
