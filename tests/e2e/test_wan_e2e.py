"""Wan2.2-Animate (move and mix) end to end, with real processes: a deployment that runs the model
(``DASHSCOPE_MODEL``: a job that names no model runs on it), a producer with only ``celery``
installed, the emulator over HTTP, S3.

One call per job: the person image and the dance video go to DashScope together, with a mode; no
detect step, no action template. What the model refuses is refused before anything is paid: a
45-second dance (the limit is 30 s), a ``template_id``, a missing mode, an image under 200 px.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from devstack import RedisServer, S3Server, Worker
from devstack.media import make_image, make_video
from emulator.server import EmulatorServer
from workers.producer import AnimateQueue

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module", params=["wan2.2-animate-move", "wan2.2-animate-mix"])
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def wan_redis(model: str) -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def wan_worker(wan_redis: RedisServer, worker_env: dict[str, str], model: str) -> Iterator[Worker]:
    env = {**worker_env, "REDIS_URL": wan_redis.url, "DASHSCOPE_MODEL": model}
    w = Worker(env, concurrency=2, name=f"{model}@%h")
    w.start()
    yield w
    w.stop()


@pytest.fixture
def wq(
    wan_redis: RedisServer, wan_worker: Worker, emulator: EmulatorServer
) -> Iterator[AnimateQueue]:
    q = AnimateQueue(wan_redis.url)
    yield q
    q.close()


def image(server: EmulatorServer, width: int = 512, height: int = 768) -> str:
    return f"{server.url}/_emulator/samples/person.png?width={width}&height={height}"


def dance(server: EmulatorServer, seconds: float = 2.5) -> str:
    return f"{server.url}/_emulator/samples/dance.mp4?seconds={seconds}&width=360&height=640"


def counters(server: EmulatorServer, model: str) -> dict[str, Any]:
    accounts = httpx.get(f"{server.url}/_emulator/stats", timeout=10).json()["accounts"]
    merged: dict[str, Any] = {}
    for models in accounts.values():
        for name, values in models.items():
            if name == model:
                merged.update(values)
            else:
                assert not values.get("submitted"), f"{name} was called in a {model} deployment"
    return merged


def send_with_celery_only(redis_url: str, kwargs: dict[str, Any]) -> str:
    """Another service with only celery installed: ``send_task`` by name, JSON on the wire."""
    script = textwrap.dedent(
        f"""
        from celery import Celery
        app = Celery(broker={redis_url!r})
        app.conf.task_serializer = "json"
        result = app.send_task("animate.generate", kwargs={kwargs!r}, queue="celery")
        print(result.id)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.strip().splitlines()[-1]


def test_a_job_from_a_celery_only_producer_is_stored(
    wq: AnimateQueue, wan_redis: RedisServer, emulator: EmulatorServer, model: str,
    s3_server: S3Server,
) -> None:  # fmt: skip
    job_id = send_with_celery_only(
        wan_redis.url,
        {"image_url": image(emulator), "video_url": dance(emulator, 2.5), "mode": "wan-pro",
         "model": model, "producer": "wan-e2e"},
    )  # fmt: skip
    view = wq.wait(job_id, timeout=90)
    assert view["state"] == "STORED", (view["error_code"], view["error_message"])
    assert counters(emulator, model)["submitted"] == 1
    assert view["video_duration"] == pytest.approx(2.5, abs=0.5)
    # The price of the mode, recorded at submit; the estimate from the dance's 2.5 s; the bill
    # from usage.video_duration, also counted (at once) in cost_cny_total by account and model.
    price = {"wan2.2-animate-move": 0.6, "wan2.2-animate-mix": 0.9}[model]
    assert view["model"] == model
    assert view["cost"]["price_per_second"] == price
    assert view["cost"]["estimated"] == pytest.approx(price * 2.5, abs=0.05)
    assert view["cost"]["billed"] == pytest.approx(price * view["video_duration"], abs=1e-4)
    counted = redis.Redis.from_url(wan_redis.url).hgetall("animate-queue:m:c:cost_cny_total")
    assert {k.decode(): float(v) for k, v in counted.items()} == {
        f'["default","{model}"]': pytest.approx(view["cost"]["billed"])
    }
    bucket, _, key = view["s3_uri"].removeprefix("s3://").partition("/")
    head = s3_server.client().head_object(Bucket=bucket, Key=key)
    assert head["ContentLength"] > 0 and head["ContentType"] == "video/mp4"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"video_url": "long"}, "InvalidVideo.Duration"),  # 45 s: the limit is 30
        ({"template_id": "AACT.someone.abc"}, "InvalidRequest.TemplateForModel"),
        ({"mode": None}, "InvalidRequest.Mode"),
        ({"mode": "wan-turbo"}, "InvalidRequest.Mode"),
        ({"image_url": "small"}, "InvalidImage.ShortestSide"),
        ({"model": "wan2.5-animate-move"}, "InvalidRequest.Model"),  # no such model here
        ({"model": "animate-anyone-gen2"}, "InvalidRequest.NotForModel"),  # its fields differ
        ({"detect": True}, "InvalidRequest.NotForModel"),
    ],
)
def test_what_the_model_refuses_is_refused_before_any_paid_call(
    wq: AnimateQueue, emulator: EmulatorServer, model: str, change: dict[str, Any], code: str,
    job_id: str,
) -> None:  # fmt: skip
    kwargs: dict[str, Any] = {"job_id": job_id, "image_url": image(emulator),
                              "video_url": dance(emulator), "mode": "wan-std"}  # fmt: skip
    for name, value in change.items():
        if value == "long":
            value = dance(emulator, 45)
        elif value == "small":
            value = image(emulator, 150, 300)
        if value is None:
            kwargs.pop(name)
        else:
            kwargs[name] = value
    wq.celery.send_task("animate.generate", kwargs=kwargs, queue="celery")
    view = wq.wait(job_id, timeout=60)
    assert (view["state"], view["error_code"]) == ("REJECTED", code), view
    assert counters(emulator, model).get("submitted", 0) == 0


def test_the_cli_sends_local_files_to_a_wan_deployment(
    wan_worker: Worker, worker_env: dict[str, str], wan_redis: RedisServer, model: str,
    emulator: EmulatorServer, tmp_path: Path,
) -> None:  # fmt: skip
    """``animate-queue generate --model ... --mode wan-pro --image me.png --video dance.mp4
    --wait``: local files checked against the model's limits, uploaded, the job stored; a
    45-second dance is refused on the spot, before anything is uploaded or sent."""
    env = {**os.environ, **worker_env, "REDIS_URL": wan_redis.url, "DASHSCOPE_MODEL": model}
    cli = [sys.executable, "-m", "workers.entrypoints.cli", "generate", "--model", model,
           "--mode", "wan-pro", "--image", str(make_image(tmp_path / "me.png"))]  # fmt: skip
    dance_file = make_video(tmp_path / "dance.mp4", seconds=2.5)
    done = subprocess.run([*cli, "--video", str(dance_file), "--wait", "--timeout", "90"],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("s3://")
    long_dance = make_video(tmp_path / "long.mp4", seconds=31)
    refused = subprocess.run([*cli, "--video", str(long_dance)], capture_output=True, text=True,
                             timeout=60, env=env)  # fmt: skip
    assert refused.returncode != 0 and "2-30 s" in refused.stderr, refused.stderr[-2000:]
    assert counters(emulator, model)["submitted"] == 1


def test_one_deployment_runs_each_job_on_the_model_it_names(
    worker: Worker, queue: AnimateQueue, emulator: EmulatorServer, remote: Any
) -> None:
    """The default deployment (DASHSCOPE_MODEL=animate-anyone-gen2) takes a job that names a
    Wan model too. Each model has its own lane (and submit bucket) per account: with
    AnimateAnyone's lane full (two jobs: its running task and the one queued behind it), the
    Wan job is still admitted at once, and its task runs beside AnimateAnyone's first."""
    remote.config(generation_seconds=3.0)
    template = remote.template()
    aa = [queue.submit(image(emulator), template) for _ in range(2)]
    deadline = time.monotonic() + 30
    while not all((queue.get(j) or {}).get("remote_task_id") for j in aa):  # both at DashScope
        assert time.monotonic() < deadline, [queue.get(j) for j in aa]
        time.sleep(0.05)
    wan = queue.generate(image(emulator), video=dance(emulator), mode="wan-std",
                         model="wan2.2-animate-mix")  # fmt: skip
    views = [queue.wait(job, timeout=90) for job in (*aa, wan)]
    assert [v["state"] for v in views] == ["STORED"] * 3, views
    assert [v["model"] for v in views] == ["animate-anyone-gen2"] * 2 + ["wan2.2-animate-mix"]
    assert views[2]["cost"]["price_per_second"] == 0.6
    tasks = httpx.get(f"{emulator.url}/_emulator/tasks", timeout=10).json()
    first_aa = min((t for t in tasks if t["model"] == "animate-anyone-gen2"),
                   key=lambda t: t["scheduled_time"])  # fmt: skip
    (wan_task,) = [t for t in tasks if t["model"] == "wan2.2-animate-mix"]
    assert wan_task["scheduled_time"] < first_aa["end_time"], "the Wan job waited in AA's lane"


def test_faults_on_the_wan_path_pay_once(
    wq: AnimateQueue, emulator: EmulatorServer, model: str, remote: Any, job_id: str
) -> None:
    """The emulator's fault injection applies to the Wan models too: a 500 and a 429 on the
    submit, a 503 on a query; the job is stored and paid for once."""
    remote.fault("submit", "500")
    remote.fault("submit", "429")
    remote.fault("query", "503")
    wq.generate(image(emulator), video=dance(emulator), mode="wan-std", job_id=job_id)
    view = wq.wait(job_id, timeout=90)
    assert view["state"] == "STORED", (view["error_code"], view["error_message"])
    assert counters(emulator, model)["submitted"] == 1
    assert view["throttled_429"] == 1
