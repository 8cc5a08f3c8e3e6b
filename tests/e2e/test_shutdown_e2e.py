"""SIGTERM shutdown loses no countdown task: during polling, and during a copy.

Each test runs twice, once per way a worker takes SIGTERM (``mode``):
- "warm": a bare ``celery worker`` (and devstack's Worker): Celery's warm shutdown;
- "remapped": REMAP_SIGTERM=SIGQUIT, as the Procfile and the Docker image run workers: Celery's
  soft shutdown (worker_soft_shutdown_timeout, WORKER_SOFT_SHUTDOWN_SECONDS: 30 s by default,
  6 s here to keep the suite short; always waited out because
  worker_enable_soft_shutdown_on_idle is on), then a cold shutdown.
Either way the countdown messages a worker holds go back to Redis when its channel closes.

The workers here run on their own Redis (no other worker consumes their queues) and no celery
beat runs, so no watchdog can resume a job whose message was lost: each job completes only if its
messages survived the shutdown. The broker is read directly (kombu's Redis layout: a list per
queue, the ``unacked`` hash of messages a worker holds) to show where each message is.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis

from devstack import RedisServer, S3Server, Worker
from workers.producer import AnimateQueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

VISIBILITY_TIMEOUT = 300  # the default; every bound below is far under it
SOFT_SHUTDOWN = 6
SHUTDOWN_ENV = {
    # Polls are countdown messages of 2 s that the worker holds (reserved, unacknowledged).
    "POLL_FIRST_SECONDS": "2",
    "POLL_RUNNING_SECONDS": "2",
    "POLL_PENDING_SECONDS": "2",
    "POLL_PENDING_MAX_SECONDS": "4",
    "VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
    # Long enough that the watchdog-free test never relies on a lease running out.
    "COPY_LEASE_SECONDS": "120",
    # The remapped mode always waits this out (30 s by default); the copy below has ~3 s left.
    "WORKER_SOFT_SHUTDOWN_SECONDS": str(SOFT_SHUTDOWN),
}


@pytest.fixture(scope="module")
def shutdown_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def shutdown_env(shutdown_redis: RedisServer, worker_env: dict[str, str]) -> dict[str, str]:
    return {**worker_env, "REDIS_URL": shutdown_redis.url, **SHUTDOWN_ENV}


# How SIGTERM reaches Celery: "warm" as a bare `celery worker` (and devstack) takes it, a warm
# shutdown; "remapped" as the Procfile and the Docker image run workers (REMAP_SIGTERM=SIGQUIT):
# Celery's soft shutdown (worker_soft_shutdown_timeout), then a cold one.
MODES = {"warm": {}, "remapped": {"REMAP_SIGTERM": "SIGQUIT"}}


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(shutdown_env: dict[str, str], mode: str) -> dict[str, str]:
    return {**shutdown_env, **MODES[mode]}


@pytest.fixture
def sq(shutdown_redis: RedisServer) -> Iterator[AnimateQueue]:
    q = AnimateQueue(shutdown_redis.url)
    yield q
    q.close()


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    """The workers a test starts; whatever still runs at the end is killed."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()


class Broker:
    """kombu's Redis transport as it sits in Redis: queue lists and the ``unacked`` hash."""

    def __init__(self, url: str) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=5)

    @staticmethod
    def _decode(payload: dict[str, Any]) -> dict[str, Any]:
        body = json.loads(base64.b64decode(payload["body"]))
        headers = payload["headers"]
        return {
            "task": headers["task"],
            "id": headers["id"],
            "eta": headers.get("eta"),
            "args": body[0],
        }

    def unacked(self) -> list[dict[str, Any]]:
        """Messages some worker holds: fetched, not yet acknowledged."""
        return [self._decode(json.loads(v)[0]) for v in self.redis.hvals("unacked")]

    def queued(self, queue: str) -> list[dict[str, Any]]:
        """Messages waiting in ``queue`` (every priority list of it)."""
        out = []
        for key in self.redis.scan_iter(f"{queue}*"):
            if self.redis.type(key) == b"list":
                out += [self._decode(json.loads(m)) for m in self.redis.lrange(key, 0, -1)]
        return out

    def everything(self) -> dict[str, list[dict[str, Any]]]:
        return {
            "unacked": self.unacked(),
            **{q: self.queued(q) for q in ("celery", "dashscope", "transfer")},
        }

    def close(self) -> None:
        self.redis.close()


@pytest.fixture
def broker(shutdown_redis: RedisServer) -> Iterator[Broker]:
    b = Broker(shutdown_redis.url)
    yield b
    b.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def sigterm(worker: Worker) -> tuple[float, int | None]:
    """SIGTERM to the worker's main process, as an orchestrator sends it; (seconds to exit, code).

    A worker still running after 60 s is SIGKILLed and the test fails.
    """
    proc = worker.proc
    assert proc is not None
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        worker.kill()
        pytest.fail(f"the worker ignored SIGTERM for 60 s:\n{worker.log()}")
    took = time.monotonic() - started
    worker.stop()  # already gone: closes its log file
    return took, proc.returncode


def shut_down_as_configured(mode: str, took: float, log: str) -> None:
    """Which shutdown ran, and how long it took, for each way SIGTERM is taken."""
    if mode == "warm":
        # Celery's warm shutdown: running tasks finish, then the worker exits at once.
        # worker_soft_shutdown_timeout plays no part: it bounds only cold shutdowns.
        assert "Warm shutdown" in log and "Soft Shutdown" not in log, log
        assert took < 20, f"warm shutdown took {took:.1f} s"
    else:
        # Soft shutdown: worker_soft_shutdown_timeout is always waited out, busy or idle
        # (worker_enable_soft_shutdown_on_idle), then the cold shutdown requeues what is left.
        assert f"Initiating Soft Shutdown, terminating in {SOFT_SHUTDOWN:.1f} seconds" in log, log
        assert "Cold shutdown" in log, log
        assert SOFT_SHUTDOWN <= took < SOFT_SHUTDOWN + 15, f"soft shutdown took {took:.1f} s"
    # Held countdown messages go back to Redis when the worker's channel closes.
    assert "Restoring 1 unacknowledged message(s)" in log, log


def for_job(messages: list[dict[str, Any]], job_id: str, task: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["task"] == task and m["args"][:1] == [job_id]]


def no_job_left_behind(sq: AnimateQueue) -> None:
    for state in ("RECEIVED", "DETECTING", "PREPARING", "QUEUED", "SUBMITTING", "SUBMITTED",
                  "COPYING"):  # fmt: skip
        assert sq.jobs(state) == [], state


def ping(env: dict[str, str], node: str) -> subprocess.CompletedProcess[str]:
    """``animate-queue health worker`` as an operator (or a probe) runs it."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.entrypoints.cli",
            "health",
            "worker",
            "--name",
            node,
            "--timeout",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_sigterm_while_a_poll_waits(
    sq: AnimateQueue,
    remote: Any,
    broker: Broker,
    workers: list[Worker],
    env: dict[str, str],
    mode: str,
    job_id: str,
) -> None:
    """SIGTERM while the worker holds the job's countdown poll: the message goes back to Redis.

    The poll is a countdown message: fetched by the worker at once and held, unacknowledged, until
    its ETA. The shutdown must hand it back (kombu restores unacknowledged messages when the
    worker's channel closes), or the job would wait VISIBILITY_TIMEOUT (300 s) for Redis to
    re-deliver it: no beat runs here, so no watchdog would rescue it either. A new worker then
    finishes the job within seconds, polling the same remote task, paid once.
    Observed: "warm" exits about 2-3 s after SIGTERM, "remapped" about 32 s (the soft-shutdown
    wait); the held poll does not run during either shutdown.
    """
    remote.config(generation_seconds=6)
    first = Worker(env, concurrency=2, name="shutdown1@%h")
    workers.append(first)
    first.start()
    health = ping({**os.environ, **env}, "shutdown1@%h")
    assert health.returncode == 0, health.stderr
    assert health.stdout.startswith("worker shutdown1@") and "ok (pong)" in health.stdout

    sq.generate(remote.image(), template_id=remote.template(), detect=False, job_id=job_id)

    poll = wait_for(lambda: held_poll(sq, broker, job_id), 30, "a countdown poll held")
    before = sq.get(job_id)
    assert before is not None
    assert before["remote_status"] in ("PENDING", "PRE-PROCESSING", "RUNNING")
    assert for_job(broker.queued("dashscope"), job_id, "animate.poll") == []

    took, code = sigterm(first)
    assert code == 0, f"not a clean shutdown (exit {code}):\n{first.log()}"
    shut_down_as_configured(mode, took, first.log())

    # The very message is back in its queue, ETA intact; nothing is left as "held".
    assert broker.unacked() == []
    back = for_job(broker.queued("dashscope"), job_id, "animate.poll")
    assert [(m["id"], m["eta"]) for m in back] == [(poll["id"], poll["eta"])]
    view = sq.get(job_id)
    assert view is not None
    assert (view["state"], view["attempts"]["polls"]) == ("SUBMITTED", before["attempts"]["polls"])

    restarted = time.monotonic()
    workers.append(Worker(env, concurrency=2, name="shutdown2@%h").start())
    view = sq.wait(job_id, timeout=60, interval=0.1)
    recovered = time.monotonic() - restarted
    assert view["state"] == "STORED", view
    assert recovered < 30 < VISIBILITY_TIMEOUT  # the message, not a redelivery, carried the job
    assert view["remote_task_id"] == before["remote_task_id"]
    assert view["attempts"]["submit"] == 1
    assert view["attempts"]["polls"] > before["attempts"]["polls"]
    assert remote.counters()["submitted"] == 1
    assert f"Task animate.poll[{poll['id']}] received" in workers[-1].log()
    wait_for(lambda: broker.everything() == empty_broker(), 10, "an empty broker")
    no_job_left_behind(sq)
    print(f"\n[{mode}] SIGTERM -> exit {took:.2f} s; new worker -> STORED {recovered:.2f} s")


def empty_broker() -> dict[str, list[dict[str, Any]]]:
    return {"unacked": [], "celery": [], "dashscope": [], "transfer": []}


class SlowProxy:
    """A loopback HTTP proxy to the emulator that streams bodies at ``rate`` bytes per second.

    The emulator's ``public_url`` points video URLs here, so the worker's copy downloads through
    it: a real, steady trickle of bytes, for as long as the test needs a copy under way.
    """

    def __init__(self, upstream: str, rate: float) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.served: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.served.append(self.path)
                try:
                    with httpx.stream("GET", proxy.upstream + self.path, timeout=30) as upstream:
                        self.send_response(upstream.status_code)
                        for name in ("Content-Type", "Content-Length"):
                            if name in upstream.headers:
                                self.send_header(name, upstream.headers[name])
                        self.end_headers()
                        started, sent = time.monotonic(), 0
                        for chunk in upstream.iter_raw(64 * 1024):
                            self.wfile.write(chunk)
                            sent += len(chunk)
                            ahead = sent / proxy.rate - (time.monotonic() - started)
                            if ahead > 0:
                                time.sleep(ahead)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the downloader went away

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> SlowProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


VIDEO_BYTES = 12 * 1024 * 1024
RATE = 1.5 * 1024 * 1024  # a copy takes about 8 s; its first progress report comes at 5 s


def held_poll(sq: AnimateQueue, broker: Broker, job_id: str) -> dict[str, Any] | None:
    """The job's countdown poll, held by a worker with its ETA at least 0.7 s away (else None)."""
    view = sq.get(job_id) or {}
    if view.get("state") != "SUBMITTED" or view["attempts"]["polls"] < 1:
        return None
    polls = for_job(broker.unacked(), job_id, "animate.poll")
    if len(polls) != 1 or polls[0]["eta"] is None:
        return None
    left = datetime.fromisoformat(polls[0]["eta"]).timestamp() - time.time()
    return polls[0] if left > 0.7 else None


def test_sigterm_during_a_copy(
    sq: AnimateQueue,
    remote: Any,
    emulator: Any,
    broker: Broker,
    workers: list[Worker],
    env: dict[str, str],
    mode: str,
    s3_server: S3Server,
) -> None:
    """SIGTERM while bytes flow into S3 and another job's countdown poll is held: nothing lost.

    Job A is being copied (COPYING, copy_bytes > 0: a slow proxy feeds the download); job B,
    still generating remotely, has its countdown poll held by the same worker (one process
    copies, the other is free, so the worker fetched B's poll and keeps it until its ETA).

    For A's copy two outcomes are acceptable, and the test asserts which one it saw:
    - "finished": the shutdown lets the running copy complete; the task is acknowledged after
      the work; A is STORED before the old worker exits, after one copy attempt;
    - "returned": the copy message goes back to the ``transfer`` queue and a new worker makes a
      second, complete copy.
    Observed with the current config (celery 5.7 prefork, acks_late), in both modes: "finished".
    "warm": Celery's warm shutdown waits for running tasks however long they take (it logs
    "Warm shutdown", never "Initiating Soft Shutdown": worker_soft_shutdown_timeout bounds only
    cold shutdowns); exit about 5 s after SIGTERM, when the 8 s copy is done. "remapped": the
    copy (3 s left) completes inside the soft-shutdown wait (6 s here); exit about 2 s after it.
    A copy longer than that wait would be cancelled and its message returned instead.

    B's poll goes back to Redis when the worker's channel closes, after the copy ("Restoring 1
    unacknowledged message(s)"), and a new worker finishes B on the same remote task. No beat or
    watchdog runs; the S3 objects hold exactly the bytes the emulator serves; DashScope saw one
    submission per job; no message or job is left behind.
    """
    stamp = time.time_ns()
    job_a, job_b = f"e2e-copy-a-{stamp}", f"e2e-copy-b-{stamp}"
    with SlowProxy(emulator.url, RATE) as proxy:
        remote.config(public_url=proxy.url, video_pad_bytes=VIDEO_BYTES)
        first = Worker(env, concurrency=2, name="shutdown3@%h")
        workers.append(first)
        first.start()
        template = remote.template()
        sq.generate(remote.image(), template_id=template, detect=False, job_id=job_a)
        wait_for(lambda: (sq.get(job_a) or {}).get("remote_task_id"), 20, "A submitted")
        # Durations are fixed per remote task when it is created: B generates for 12 s, so it
        # is still polling when A's copy is interrupted (A's remote task ends first: FIFO).
        remote.config(generation_seconds=12)
        sq.generate(remote.image(), template_id=template, detect=False, job_id=job_b)

        def copying_while_b_polls() -> tuple[dict[str, Any], dict[str, Any]] | None:
            view = sq.get(job_a) or {}
            if view.get("state") != "COPYING" or not (view.get("copy_bytes") or 0) > 0:
                return None
            poll = held_poll(sq, broker, job_b)
            return (view, poll) if poll else None

        during, poll_b = wait_for(copying_while_b_polls, 40, "A copying while B's poll is held")
        assert 0 < during["copy_bytes"] < VIDEO_BYTES
        assert len(for_job(broker.unacked(), job_a, "animate.copy")) == 1
        b_before = sq.get(job_b)
        assert b_before is not None
        assert b_before["remote_status"] in ("PENDING", "PRE-PROCESSING", "RUNNING")
        terminated = time.time()
        took, code = sigterm(first)
        assert code == 0, f"not a clean shutdown (exit {code}):\n{first.log()}"
        exited = time.time()
        shut_down_as_configured(mode, took, first.log())

        # B's held poll is back in its queue, the same message, ETA intact.
        back = for_job(broker.queued("dashscope"), job_b, "animate.poll")
        assert [(m["id"], m["eta"]) for m in back] == [(poll_b["id"], poll_b["eta"])]
        assert for_job(broker.unacked(), job_b, "animate.poll") == []

        after = sq.get(job_a)
        assert after is not None
        if after["state"] == "STORED":
            outcome = "finished"
            assert terminated < after["finished_at"] <= exited
            assert after["attempts"]["copy"] == 1
            assert for_job(broker.everything()["transfer"], job_a, "animate.copy") == []
        else:
            outcome = "returned"
            assert after["state"] == "COPYING", after
            assert len(for_job(broker.queued("transfer"), job_a, "animate.copy")) == 1
        assert broker.unacked() == []

        proxy.rate = 1e9  # B's copy need not crawl
        restarted = time.monotonic()
        workers.append(Worker(env, concurrency=2, name="shutdown4@%h").start())
        view_a = sq.wait(job_a, timeout=60, interval=0.1)
        view_b = sq.wait(job_b, timeout=60, interval=0.1)
        recovered = time.monotonic() - restarted
        assert (view_a["state"], view_b["state"]) == ("STORED", "STORED"), (view_a, view_b)
        assert view_a["attempts"]["copy"] == (1 if outcome == "finished" else 2)
        assert view_b["remote_task_id"] == b_before["remote_task_id"]
        assert f"Task animate.poll[{poll_b['id']}] received" in workers[-1].log()
        assert recovered < 45 < VISIBILITY_TIMEOUT

        for view in (view_a, view_b):
            body = s3_server.client().get_object(Bucket=remote.bucket, Key=view["s3_key"])
            stored = body["Body"].read()
            assert len(stored) == view["bytes"] == VIDEO_BYTES
            assert hashlib.sha256(stored).hexdigest() == view["sha256"]
            assert stored == served_video(remote, view["remote_task_id"], proxy.url, emulator.url)
            assert view["attempts"]["submit"] == 1
        assert remote.counters()["submitted"] == 2  # one per job
        wait_for(lambda: broker.everything() == empty_broker(), 10, "an empty broker")
        no_job_left_behind(sq)
        print(
            f"\n[{mode}] copy outcome: {outcome}; SIGTERM -> exit {took:.2f} s; "
            f"new worker -> both STORED {recovered:.2f} s"
        )
        assert outcome == "finished"  # what this config does (see the docstring)


def served_video(remote: Any, task_id: str, proxy_url: str, emulator_url: str) -> bytes:
    """The bytes the emulator serves for the task, fetched from it directly (not the proxy)."""
    headers = {"Authorization": f"Bearer {remote.api_key}"}
    out = remote.http.get(f"/api/v1/tasks/{task_id}", headers=headers).json()["output"]
    url = str(out["video_url"])
    assert url.startswith(proxy_url)
    return bytes(remote.http.get(emulator_url + url.removeprefix(proxy_url)).content)
