"""Quota-aware scheduling with two real worker processes, their own Redis and the emulator."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import RedisServer, S3Server, Worker
from emulator.server import EmulatorServer
from workers.producer import AnimateQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEYS = {"a": "sk-quota-account-a-0001", "b": "sk-quota-account-b-0002"}


@pytest.fixture(scope="module")
def fleet_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def fleet(
    fleet_redis: RedisServer,
    s3_server: S3Server,
    emulator_server: EmulatorServer,
    worker_env: dict[str, str],
) -> Iterator[list[Worker]]:
    """Two worker processes sharing one Redis: the limits must hold across them."""
    env = {
        **worker_env,
        "REDIS_URL": fleet_redis.url,
        "DASHSCOPE_API_KEY": "",
        "DASHSCOPE_ACCOUNTS": json.dumps(KEYS),
        "DASHSCOPE_DEFAULT_ACCOUNT": "a",
        "POLL_RUNNING_SECONDS": "0.2",
    }
    workers = [Worker(env, concurrency=2, name=f"fleet{i}@%h") for i in range(2)]
    for w in workers:
        w.start()
    yield workers
    for w in workers:
        w.stop()


@pytest.fixture
def fq(fleet_redis: RedisServer, fleet: list[Worker]) -> Iterator[AnimateQueue]:
    q = AnimateQueue(fleet_redis.url)
    yield q
    q.close()


class Emu:
    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=10)

    def template(self, account: str) -> str:
        r = self.http.post("/_emulator/templates", json={"api_key": KEYS[account], "seconds": 1})
        return str(r.json()["template_id"])

    def image(self) -> str:
        return f"{self.server.url}/_emulator/samples/person.png?width=256&height=512"

    def config(self, **changes: Any) -> None:
        self.http.patch("/_emulator/config", json=changes).raise_for_status()

    def tasks(self) -> list[dict[str, Any]]:
        return list(self.http.get("/_emulator/tasks").json())

    def totals(self) -> dict[str, Any]:
        """Counters summed over this fleet's two accounts only (other tests' jobs excluded)."""
        accounts = self.http.get("/_emulator/stats").json()["accounts"]
        ours = {"acct-" + hashlib.sha256(k.encode()).hexdigest()[:12] for k in KEYS.values()}
        total: dict[str, Any] = {}
        for name, models in accounts.items():
            if name not in ours:
                continue
            for counters in models.values():
                for key, value in counters.items():
                    if isinstance(value, int):
                        total[key] = total.get(key, 0) + value
        return total


@pytest.fixture
def emu(emulator: EmulatorServer) -> Iterator[Emu]:
    e = Emu(emulator)
    yield e
    e.http.close()


def wait_all(q: AnimateQueue, ids: list[str], timeout: float = 90) -> list[dict[str, Any]]:
    return [q.wait(i, timeout=timeout, interval=0.2) for i in ids]


def max_overlap(tasks: list[dict[str, Any]]) -> int:
    """Most tasks alive at DashScope (submitted, not ended) at one moment."""
    events = []
    for t in tasks:
        events += [(t["submit_time"], 1), (t["end_time"], -1)]
    alive = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        alive += delta
        peak = max(peak, alive)
    return peak


def test_limits_hold_across_processes(fq: AnimateQueue, emu: Emu, fleet: list[Worker]) -> None:
    """Two processes, eight jobs: no 429, submissions spaced by the bucket, two tasks remote."""
    emu.config(generation_seconds=0.6)
    template = emu.template("a")
    ids = [fq.submit(emu.image(), template, job_id=f"lim-{i}-{time.time_ns()}") for i in range(8)]
    views = wait_all(fq, ids)
    assert [v["state"] for v in views] == ["STORED"] * 8
    totals = emu.totals()
    assert totals["submitted"] == 8
    assert totals.get("throttled", 0) == 0
    tasks = sorted(emu.tasks(), key=lambda t: t["submit_time"])
    gaps = [b["submit_time"] - a["submit_time"] for a, b in itertools.pairwise(tasks)]
    assert min(gaps) >= 1.0  # 0.8 submits/s fleet-wide, under DashScope's 1/s
    assert max_overlap(tasks) <= 2  # the running task plus one queued behind it
    both = [w for w in fleet if "animate.submit" in w.log() or "animate.poll" in w.log()]
    assert len(both) == 2  # both processes did the work


def test_429_storm_slows_without_failing(fq: AnimateQueue, emu: Emu) -> None:
    """Half of all submits and queries answered 429: every job still ends STORED, paid once."""
    emu.config(generation_seconds=0.3)
    emu.http.put(
        "/_emulator/faults", json={"rates": {"429": 0.5}, "routes": ["submit", "query"], "seed": 3}
    ).raise_for_status()
    template = emu.template("a")
    ids = [fq.submit(emu.image(), template, job_id=f"storm-{i}-{time.time_ns()}") for i in range(5)]
    views = wait_all(fq, ids, timeout=150)
    assert [v["state"] for v in views] == ["STORED"] * 5
    assert emu.totals()["submitted"] == 5
    assert sum(v["throttled_429"] for v in views) > 0
    (account,) = [a for a in fq.accounts() if a["account"] == "a"]
    assert account["throttled_429"] > 0


def queued_by(fq: AnimateQueue, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while (fq.get(job_id) or {}).get("state") != "QUEUED":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def block(fq: AnimateQueue, emu: Emu, tag: str) -> list[str]:
    """Two long jobs that fill the account's room (one running, one queued at DashScope)."""
    emu.config(generation_seconds=3)
    template = emu.template("a")
    ids = [fq.submit(emu.image(), template, job_id=f"{tag}-block-{i}-{time.time_ns()}")
           for i in range(2)]  # fmt: skip
    deadline = time.monotonic() + 20
    while not all((fq.get(i) or {}).get("state") == "SUBMITTED" for i in ids):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    emu.config(generation_seconds=0.3)
    return ids


def test_priorities_and_fairness(fq: AnimateQueue, emu: Emu) -> None:
    """Queued jobs go out by priority, then producers in turn, then arrival."""
    blockers = block(fq, emu, "order")
    template = emu.template("a")
    stamp = time.time_ns()
    plan = [("x1", 0, "x"), ("x2", 0, "x"), ("x3", 0, "x"), ("y1", 0, "y"), ("y2", 0, "y"),
            ("h1", 5, "x")]  # fmt: skip
    ids = {}
    for name, p, who in plan:
        # Arrival is when intake queues the job; intakes run in parallel, so send one at a time.
        ids[name] = fq.submit(emu.image(), template, job_id=f"{name}-{stamp}", priority=p,
                              producer=who)  # fmt: skip
        queued_by(fq, ids[name])
    views = wait_all(fq, [*blockers, *ids.values()], timeout=120)
    assert {v["state"] for v in views} == {"STORED"}
    by_id = {v["job_id"]: v for v in views}
    order = sorted(ids, key=lambda name: by_id[ids[name]]["admitted_at"])
    assert order == ["h1", "x1", "y1", "x2", "y2", "x3"]


def test_queued_job_cancels_for_free(fq: AnimateQueue, emu: Emu) -> None:
    """A job still in our queue is cancelled without any call to DashScope."""
    blockers = block(fq, emu, "cancel")
    job_id = fq.submit(emu.image(), emu.template("a"), job_id=f"cancel-{time.time_ns()}")
    queued_by(fq, job_id)
    result = fq.cancel(job_id)
    assert result["outcome"] == "canceled"
    view = fq.get(job_id)
    assert view is not None and view["state"] == "CANCELED"
    assert view["remote_task_id"] is None
    wait_all(fq, blockers)
    assert emu.totals()["submitted"] == 2  # the blockers only
    assert fq.cancel(job_id)["outcome"] == "final"


def test_two_accounts_in_parallel(fq: AnimateQueue, emu: Emu) -> None:
    """Two accounts run at the same time, each within its own quota."""
    emu.config(generation_seconds=1.5)
    ta, tb = emu.template("a"), emu.template("b")
    stamp = time.time_ns()
    ids = [fq.submit(emu.image(), ta, job_id=f"acct-a{i}-{stamp}", account="a") for i in range(2)]
    ids += [fq.submit(emu.image(), tb, job_id=f"acct-b{i}-{stamp}", account="b") for i in range(2)]
    views = wait_all(fq, ids)
    assert [v["state"] for v in views] == ["STORED"] * 4
    assert [v["account"] for v in views] == ["a", "a", "b", "b"]
    tasks = emu.tasks()
    by_account: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        by_account.setdefault(t["account"], []).append(t)
    assert len(by_account) == 2
    (first_a, first_b) = (min(ts, key=lambda t: t["scheduled_time"]) for ts in by_account.values())
    # The two accounts' first tasks ran at the same time.
    assert first_a["scheduled_time"] < first_b["end_time"]
    assert first_b["scheduled_time"] < first_a["end_time"]
    assert emu.totals().get("throttled", 0) == 0


def test_accounts_cli(fq: AnimateQueue, emu: Emu, fleet_redis: RedisServer) -> None:
    """``animate-queue accounts --json`` shows each account's queue, slot, tokens and 429s."""
    emu.config(generation_seconds=0.2)
    stamp = time.time_ns()
    ids = [
        fq.submit(emu.image(), emu.template(a), job_id=f"cli-{a}-{stamp}", account=a)
        for a in ("a", "b")
    ]
    wait_all(fq, ids)
    done = subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli", "accounts", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"REDIS_URL": fleet_redis.url, "PATH": os.environ["PATH"]},
        check=True,
    )
    views = {v["account"]: v for v in json.loads(done.stdout)}
    assert {"a", "b"} <= set(views)
    for view in views.values():
        assert {"queued", "remote_running", "remote_pending", "buckets", "throttled_429"} <= set(
            view
        )
        assert view["buckets"]["submit"]["rate_configured"] == 0.8
    table = subprocess.run(
        [sys.executable, "-m", "workers.entrypoints.cli", "accounts"],
        capture_output=True, text=True, timeout=30, check=True,
        env={"REDIS_URL": fleet_redis.url, "PATH": os.environ["PATH"], "COLUMNS": "200"},
    )  # fmt: skip
    assert "submit tokens" in table.stdout and "0.8/s" in table.stdout


def test_template_of_another_account_is_refused(fq: AnimateQueue, emu: Emu) -> None:
    """A template registered to account b cannot run under account a: REJECTED, nothing sent."""
    tb = emu.template("b")
    fq.register_template(tb, "b")
    job_id = fq.submit(emu.image(), tb, job_id=f"wrong-{time.time_ns()}", account="a")
    view = fq.wait(job_id, timeout=30)
    assert (view["state"], view["error_code"]) == ("REJECTED", "InvalidRequest.TemplateAccount")
    routed = fq.submit(emu.image(), tb, job_id=f"routed-{time.time_ns()}")  # no account named
    assert fq.wait(routed, timeout=60)["account"] == "b"
    assert emu.totals()["submitted"] == 1


def test_cancel_remote_pending_and_running(fq: AnimateQueue, emu: Emu) -> None:
    """Queued at DashScope: cancelled there. Running there: too late, and the video is stored."""
    blockers = block(fq, emu, "rcancel")
    deadline = time.monotonic() + 20
    active = ("PRE-PROCESSING", "RUNNING")
    while not any((fq.get(b) or {}).get("remote_status") in active for b in blockers):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    running = next(b for b in blockers if (fq.get(b) or {}).get("remote_status") in active)
    (pending,) = [b for b in blockers if b != running]
    pending_cancel = fq.cancel(pending)
    assert pending_cancel["outcome"] == "canceled", pending_cancel
    assert (fq.get(pending) or {})["state"] == "CANCELED"
    running_cancel = fq.cancel(running)
    assert running_cancel["outcome"] == "too_late", running_cancel
    view = fq.wait(running, timeout=60)
    assert view["state"] == "STORED" and view["cancel_requested"] is True
    assert emu.totals()["canceled"] == 1
