"""The local stack from ``Procfile.dev`` under honcho (``make dev``): a job runs through it, both
``/metrics`` endpoints (ours and Flower's) count it, and Flower answers only with its password."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from workers.adapters.s3.inputs import S3Inputs
from workers.producer import AnimateQueue

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "devstack" / "assets"
pytestmark = pytest.mark.timeout(240)


def dev_env() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (ROOT / ".env.dev").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


ENV = dev_env()
FLOWER = f"http://127.0.0.1:{ENV['FLOWER_PORT']}"
EXPORTER = f"http://127.0.0.1:{ENV['METRICS_PORT']}"
CONSOLE = "http://127.0.0.1:5566"  # CONSOLE_PORT's default


def wait_for(url: str, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{url} never answered; honcho said:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    log = tmp_path_factory.mktemp("honcho") / "honcho.log"
    honcho = Path(sys.executable).with_name("honcho")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(honcho), "-e", ".env.dev", "-f", "Procfile.dev", "start"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group: the whole stack stops together
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        )
    try:
        deadline = time.monotonic() + 90
        wait_for(f"{FLOWER}/healthcheck", deadline, proc, log)
        wait_for(f"{EXPORTER}/metrics", deadline, proc, log)
        wait_for(f"{CONSOLE}/healthz", deadline, proc, log)
        wait_for(ENV["DASHSCOPE_BASE_URL"].rsplit("/api/", 1)[0] + "/_emulator/health",
                 deadline, proc, log)  # fmt: skip
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # honcho passes it to every process
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_a_job_through_the_dev_stack_is_counted(stack: subprocess.Popen[bytes]) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=ENV["AWS_ENDPOINT_URL"],
        aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=ENV["AWS_DEFAULT_REGION"],
    )
    queue = AnimateQueue(
        ENV["REDIS_URL"], key_prefix=ENV["KEY_PREFIX"], inputs=S3Inputs(s3, ENV["S3_BUCKET"])
    )
    try:
        job_id = queue.generate(
            ASSETS / "person.png", video=ASSETS / "dance.mp4", producer="honcho-test"
        )
        view = queue.wait(job_id, timeout=120)
    finally:
        queue.close()
    assert view["state"] == "STORED", view

    # Step histograms reach Redis within METRICS_FLUSH_SECONDS (1 s) of the step's end.
    deadline = time.monotonic() + 10
    while True:
        ours = httpx.get(f"{EXPORTER}/metrics", timeout=10).text
        if samples(ours, "animate_queue_copy_delay_seconds_count") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    stored = [v for labels, v in samples(ours, "animate_queue_jobs") if labels["state"] == "STORED"]
    assert sum(stored) >= 1
    billed = {
        labels["kind"]: v
        for labels, v in samples(ours, "animate_queue_video_seconds_total")
        if labels["producer"] == "honcho-test"
    }
    assert billed["video"] == view["video_duration"] and billed["template"] > 0
    copies = samples(ours, "animate_queue_copy_delay_seconds_count")
    assert copies and copies[0][1] >= 1

    deadline = time.monotonic() + 30
    while True:  # Flower's counters follow the workers' events
        flowers = httpx.get(f"{FLOWER}/metrics", timeout=10).text
        events = samples(flowers, "flower_events_total")
        if any(
            labels.get("task") == "animate.copy" and labels.get("type") == "task-succeeded"
            for labels, _ in events
        ):
            break
        assert time.monotonic() < deadline, events
        time.sleep(0.5)

    user, _, password = ENV["FLOWER_BASIC_AUTH"].partition(":")
    assert httpx.get(f"{FLOWER}/api/tasks", timeout=10).status_code == 401
    assert httpx.get(f"{FLOWER}/", timeout=10).status_code == 401
    found = httpx.get(
        f"{FLOWER}/api/tasks", params={"search": job_id}, auth=(user, password), timeout=10
    )
    assert found.status_code == 200
    assert {"animate.detect", "animate.prepare", "animate.copy"} <= {
        t["name"] for t in found.json().values()
    }

    # The job console shows the same job, stored, behind its own credentials.
    console_user, _, console_password = ENV["CONSOLE_BASIC_AUTH"].partition(":")
    assert httpx.get(f"{CONSOLE}/jobs/{job_id}", timeout=10).status_code == 401
    page = httpx.get(f"{CONSOLE}/jobs/{job_id}", auth=(console_user, console_password), timeout=10)
    assert page.status_code == 200 and '<td id="state">STORED' in page.text
    assert '<video id="video" src="http' in page.text  # a presigned link to the stored video
    # Each of its Celery tasks, as Flower (running here for real) knows them, linked.
    tasks = page.text.split('id="celery-tasks"', 1)[1].split("</table>", 1)[0]
    for name in ("animate.generate", "animate.detect", "animate.prepare", "animate.copy"):
        assert f"<td>{name}</td>" in tasks, name
    assert f'href="{FLOWER}/task/' in tasks
