"""Non-Python producers: enqueue and read results over Flower's HTTP API, behind basic auth."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from devstack import Flower, Worker

pytestmark = pytest.mark.timeout(120)
AUTH = ("producer", "s3cret-flower-pass")


@pytest.fixture(scope="module")
def flower(worker_env: dict[str, str]) -> Iterator[str]:
    with Flower({**worker_env, "FLOWER_BASIC_AUTH": ":".join(AUTH)}) as server:
        yield server.url


def test_enqueue_and_result_over_http(
    flower: str, worker: Worker, remote: Any, job_id: str
) -> None:
    """curl-style: send-task with kwargs, then poll the result under the job id."""
    body = {"kwargs": {"image_url": remote.image(), "template_id": remote.template(),
                       "job_id": job_id}}  # fmt: skip
    sent = httpx.post(f"{flower}/api/task/send-task/animate.generate", json=body, auth=AUTH)
    assert sent.status_code == 200, sent.text
    deadline = time.monotonic() + 60
    while True:
        got = httpx.get(f"{flower}/api/task/result/{job_id}", auth=AUTH, timeout=10)
        assert got.status_code == 200, got.text
        if got.json()["state"] == "SUCCESS":
            break
        assert time.monotonic() < deadline, got.json()
        time.sleep(0.5)
    result = got.json()["result"]
    assert result["state"] == "STORED" and result["job_id"] == job_id
    assert result["s3_uri"].startswith("s3://")


def test_failed_job_over_http(flower: str, worker: Worker, remote: Any, job_id: str) -> None:
    """A REJECTED job reads as FAILURE with JobFailed's code."""
    body = {"kwargs": {"image_url": remote.image(), "template_id": "nope", "job_id": job_id}}
    httpx.post(f"{flower}/api/task/send-task/animate.generate", json=body, auth=AUTH)
    deadline = time.monotonic() + 30
    while True:
        got = httpx.get(f"{flower}/api/task/result/{job_id}", auth=AUTH, timeout=10).json()
        if got["state"] == "FAILURE":
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    assert "InvalidRequest.TemplateId" in str(got["result"])


def test_no_auth_is_refused(flower: str) -> None:
    """Without the password the API answers 401 and nothing is sent."""
    r = httpx.post(f"{flower}/api/task/send-task/animate.generate", json={"kwargs": {}})
    assert r.status_code == 401
    assert httpx.get(f"{flower}/api/task/result/x").status_code == 401
