"""End-to-end fixtures: our own redis-server, a moto S3 server, the emulator, a real worker process."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import RedisServer, S3Server, Worker
from emulator.server import EmulatorServer
from workers.producer import AnimateQueue

API_KEY = "sk-e2e-worker-key-0123456789"
AWS_SECRET = "aws-secret-e2e-7f3a9c1d"
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"e2e-webhook-secret-0123456789abc").decode()
BUCKET = "animate-e2e"

# Short waits everywhere, so a whole job takes a second or two.
FAST_ENV = {
    "POLL_FIRST_SECONDS": "0.2",
    "POLL_RUNNING_SECONDS": "0.2",
    "POLL_PENDING_SECONDS": "0.2",
    "POLL_PENDING_MAX_SECONDS": "1",
    "POLL_ERROR_BACKOFF_MAX": "1",
    "SUBMIT_BACKOFF_BASE": "0.2",
    "SUBMIT_BACKOFF_MAX": "1",
    "SUBMIT_LIST_LAG_SECONDS": "1",  # the emulator's list does not lag (unless told to)
    "COPY_BACKOFF_BASE": "0.2",
    "COPY_BACKOFF_MAX": "1",
    "COPY_EXPIRY_MARGIN_SECONDS": "1",
}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def worker_env(
    redis_server: RedisServer, s3_server: S3Server, emulator_server: EmulatorServer
) -> dict[str, str]:
    return {
        "REDIS_URL": redis_server.url,
        "DASHSCOPE_API_KEY": API_KEY,
        "DASHSCOPE_BASE_URL": emulator_server.base_url,
        "S3_BUCKET": BUCKET,
        "S3_PREFIX": "e2e/videos",
        "URL_ALLOWLIST": "127.0.0.1",  # the emulator and S3 run on loopback
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        **S3Server.CREDENTIALS,
        # Recognisable, so tests can prove it never leaks (moto accepts any credentials).
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        **FAST_ENV,
    }


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str]) -> Iterator[Worker]:
    w = Worker(worker_env, concurrency=3)
    w.start()
    yield w
    w.stop()


@pytest.fixture
def queue(redis_server: RedisServer, worker: Worker) -> Iterator[AnimateQueue]:
    q = AnimateQueue(redis_server.url)
    yield q
    q.close()


class Remote:
    """The emulator as the tests see it: seeding, faults, stats for the worker's account."""

    api_key = API_KEY
    aws_secret = AWS_SECRET
    webhook_secret = WEBHOOK_SECRET
    bucket = BUCKET

    def __init__(self, server: EmulatorServer) -> None:
        self.server = server
        self.http = httpx.Client(base_url=server.url, timeout=10)

    def template(self, seconds: float = 2.0) -> str:
        r = self.http.post("/_emulator/templates", json={"api_key": API_KEY, "seconds": seconds})
        return str(r.json()["template_id"])

    def image(self, **query: Any) -> str:
        extra = "".join(f"&{k}={v}" for k, v in query.items())
        return f"{self.server.url}/_emulator/samples/person.png?width=256&height=512{extra}"

    def fault(self, route: str, kind: str, count: int = 1) -> None:
        r = self.http.post(
            "/_emulator/faults/next", json={"route": route, "kind": kind, "count": count}
        )
        r.raise_for_status()

    def config(self, **changes: Any) -> None:
        self.http.patch("/_emulator/config", json=changes).raise_for_status()

    def video(self, task_id: str) -> bytes:
        """What the emulator serves for a task: the bytes that were paid for."""
        headers = {"Authorization": f"Bearer {API_KEY}"}
        out = self.http.get(f"/api/v1/tasks/{task_id}", headers=headers).json()["output"]
        return self.http.get(out["video_url"]).content

    def counters(self) -> dict[str, Any]:
        accounts = self.http.get("/_emulator/stats").json()["accounts"]
        merged: dict[str, Any] = {}
        for models in accounts.values():
            merged.update(models.get("animate-anyone-gen2", {}))
        return merged


@pytest.fixture
def remote(emulator: EmulatorServer) -> Iterator[Remote]:
    r = Remote(emulator)
    yield r
    r.http.close()


@pytest.fixture
def job_id() -> str:
    return f"e2e-{uuid.uuid4().hex[:12]}"
