"""Results the Celery way, for a producer whose environment has nothing but celery[redis]."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from devstack import RedisServer, Worker
from workers.producer import AnimateQueue

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def celery_only_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment with celery[redis] and nothing of this project."""
    import celery

    home = tmp_path_factory.mktemp("producer-venv")
    venv.EnvBuilder(with_pip=True).create(home)
    python = home / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"celery[redis]=={celery.__version__}"],
        check=True,
        timeout=280,
        capture_output=True,
    )
    probe = subprocess.run(
        [str(python), "-c", "import workers"], capture_output=True, timeout=30, cwd="/"
    )
    assert probe.returncode != 0  # really nothing of ours
    yield python


def produce(python: Path, redis_url: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    script = textwrap.dedent(
        f"""
        import json
        from celery import Celery
        app = Celery(broker={redis_url!r}, backend={redis_url!r})
        result = app.send_task("animate.generate", kwargs={kwargs!r})
        try:
            value = result.get(timeout=90)
            print(json.dumps({{"ok": True, "job_id": result.id, "value": value}}))
        except Exception as exc:
            print(json.dumps({{"ok": False, "job_id": result.id, "type": type(exc).__name__,
                              "args": [str(a) if not isinstance(a, dict) else a
                                       for a in exc.args]}}))
        """
    )
    done = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_asyncresult_get_returns_the_result(
    celery_only_python: Path, redis_server: RedisServer, worker: Worker, remote: Any
) -> None:
    """``AsyncResult(job_id).get()`` returns the final result object of a STORED job."""
    out = produce(
        celery_only_python,
        redis_server.url,
        {"image_url": remote.image(), "template_id": remote.template(), "metadata": {"n": 1}},
    )
    assert out["ok"], out
    value = out["value"]
    assert value["job_id"] == out["job_id"]
    assert value["state"] == "STORED"
    assert value["s3_uri"].startswith(f"s3://{remote.bucket}/")
    assert len(value["sha256"]) == 64 and value["bytes"] > 0
    assert value["video_seconds"] == 2.0
    assert value["metadata"] == {"n": 1}
    assert value["contract_version"] == "1"


@pytest.mark.parametrize(
    ("change", "code", "state"),
    [
        ({"image_url": "emulator_fail"}, "InternalError.Algo", "FAILED"),
        ({"template_id": "nope"}, "InvalidRequest.TemplateId", "REJECTED"),
    ],
)
def test_asyncresult_get_raises_for_a_failed_job(
    celery_only_python: Path,
    redis_server: RedisServer,
    worker: Worker,
    remote: Any,
    change: dict[str, str],
    code: str,
    state: str,
) -> None:
    """A FAILED or REJECTED job raises JobFailed(code, message, result object) in the producer."""
    kwargs = {"image_url": remote.image(), "template_id": remote.template(), **change}
    if kwargs["image_url"] == "emulator_fail":
        kwargs["image_url"] = remote.image(emulator_fail="InternalError.Algo")
    out = produce(celery_only_python, redis_server.url, kwargs)
    assert not out["ok"], out
    assert out["type"] == "JobFailed"
    assert out["args"][0] == code
    assert out["args"][1]
    assert out["args"][2]["state"] == state


CALLBACK_APP = """
import json, os
import redis
from celery import Celery

app = Celery("producer", broker=os.environ["REDIS_URL"])
app.conf.accept_content = ["json"]
sink = redis.Redis.from_url(os.environ["REDIS_URL"])


@app.task(name="producer.video_done")
def video_done(result):
    sink.rpush("producer:callbacks", json.dumps(result))
"""


def test_callback_task_in_a_producer_app(
    tmp_path: Path, redis_server: RedisServer, worker: Worker, remote: Any, job_id: str
) -> None:
    """A producer's own Celery app, on its own queue, receives the result object when jobs end."""
    (tmp_path / "producer_app.py").write_text(CALLBACK_APP)
    env = {**os.environ, "REDIS_URL": redis_server.url, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "producer_app", "worker", "-Q", "producer-q",
         "-c", "1", "--loglevel", "INFO", "-n", f"producer-{job_id}@%h"],
        env=env, cwd=tmp_path, stdout=(tmp_path / "producer.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        sink = redis.Redis.from_url(redis_server.url)
        sink.delete("producer:callbacks")
        queue = AnimateQueue(redis_server.url)
        common = {"callback_task": "producer.video_done", "callback_queue": "producer-q"}
        queue.celery.send_task("animate.generate", queue="celery", kwargs={
            "image_url": remote.image(), "template_id": remote.template(), "job_id": job_id,
            **common})  # fmt: skip
        queue.celery.send_task("animate.generate", queue="celery", kwargs={
            "image_url": remote.image(), "template_id": "bad", "job_id": f"{job_id}-bad",
            **common})  # fmt: skip
        deadline = time.monotonic() + 60
        while sink.llen("producer:callbacks") < 2:
            assert time.monotonic() < deadline, (tmp_path / "producer.log").read_text()[-3000:]
            time.sleep(0.2)
        received = {
            r["job_id"]: r for r in map(json.loads, sink.lrange("producer:callbacks", 0, -1))
        }
        assert received[job_id]["state"] == "STORED"
        assert received[job_id]["s3_uri"]
        assert received[f"{job_id}-bad"]["state"] == "REJECTED"
        assert received[f"{job_id}-bad"]["error_code"] == "InvalidRequest.TemplateId"
        queue.close()
    finally:
        proc.terminate()
        proc.wait(20)
