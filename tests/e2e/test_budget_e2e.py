"""A daily budget with real processes: the job whose bill crosses the account's budget runs to the
end (it is paid for); the next one waits queued, nothing sent for it, and `animate-queue
accounts` says the budget is reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devstack import RedisServer, Worker
from workers.producer import AnimateQueue

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def budget_stack(worker_env: dict[str, str]) -> Iterator[tuple[RedisServer, dict[str, str]]]:
    with RedisServer() as server:
        env = {**worker_env, "REDIS_URL": server.url, "DAILY_BUDGET_CNY": '{"*": 0.1}'}
        w = Worker(env, concurrency=2, name="budget@%h")
        w.start()
        yield server, env
        w.stop()


def test_the_bill_that_reaches_the_budget_holds_the_next_job(
    budget_stack: tuple[RedisServer, dict[str, str]], remote: Any
) -> None:
    server, env = budget_stack
    queue = AnimateQueue(server.url)
    try:
        template = remote.template(seconds=2.0)
        first = queue.submit(remote.image(), template, job_id="budget-1")
        view = queue.wait(first, timeout=60)
        assert view["state"] == "STORED", view
        assert view["cost"]["billed"] == pytest.approx(0.08 * view["video_duration"])
        assert view["cost"]["billed"] >= 0.1  # this bill reached the budget
        second = queue.submit(remote.image(), template, job_id="budget-2")
        time.sleep(3)  # admission passes, polls, the lot: nothing may send it
        waiting = queue.get(second)
    finally:
        queue.close()
    assert waiting is not None and waiting["state"] == "QUEUED", waiting
    assert remote.counters()["submitted"] == 1
    shown = subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli", "accounts", "--json"],
        capture_output=True, text=True, timeout=30, env={**os.environ, **env}, check=True,
    )  # fmt: skip
    (account,) = json.loads(shown.stdout)
    assert account["daily_budget_cny"] == 0.1
    assert account["spent_today_cny"] == pytest.approx(view["cost"]["billed"])
