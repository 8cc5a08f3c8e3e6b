"""The job console in a real browser: Playwright driving headless Chromium (Debian's package at
/usr/bin/chromium; `.ci/run` installs it with apt when missing), against the console served for
real (uvicorn) over the e2e stack: a worker process, the emulator, moto's S3, a redis-server.

A job enqueued on the emulator is watched moving through its states on the page, without a
reload, until STORED; its video plays (readyState and a decoded frame); a job is cancelled from
the page; without credentials the console answers 401; `<script>` in a job's metadata is shown as
text and never runs. The run leaves screenshots of the three pages in docs/screenshots/.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import RedisServer, S3Server, Worker, served
from workers.adapters.redis.queues import RedisQueues
from workers.adapters.s3.inputs import S3Inputs
from workers.entrypoints.console.app import create_app, parse_users
from workers.producer import AnimateQueue

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
USER, PASSWORD = "ops", "console-e2e-password"

pytestmark = [
    pytest.mark.timeout(180),
    # Skipped on a developer's machine without it; in CI (.ci/run installs it) never.
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and not os.environ.get("CI"),
        reason="no chromium (apt install chromium)",
    ),
]


@pytest.fixture(scope="module")
def console_url(
    redis_server: RedisServer, s3_server: S3Server, worker: Worker, remote_bucket: str
) -> Iterator[str]:
    queue = AnimateQueue(redis_server.url)
    outputs = S3Inputs(s3_server.client(), remote_bucket)
    app = create_app(queue, users=parse_users(f"{USER}:{PASSWORD}"), secret=b"e2e" * 11,
                     presign=lambda uri: outputs.presign(uri, 600),
                     queues=RedisQueues(queue.store.redis, prefix=queue.store.prefix))  # fmt: skip
    with served(app) as url:
        yield url
    queue.close()


@pytest.fixture(scope="module")
def remote_bucket() -> str:
    from tests.e2e.conftest import BUCKET

    return BUCKET


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"])  # fmt: skip
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                  viewport={"width": 1200, "height": 800})  # fmt: skip
    yield context.new_page()
    context.close()


def recorded(queue: AnimateQueue, job_id: str) -> None:
    """Wait for the intake to create the record (the page of a job that is not there is a 404)."""
    deadline = time.monotonic() + 30
    while queue.get(job_id) is None:
        assert time.monotonic() < deadline, f"no record of {job_id}"
        time.sleep(0.05)


def test_without_credentials_the_console_answers_401(browser: Any, console_url: str) -> None:
    context = browser.new_context()
    bare = context.new_page()
    bare.goto(f"{console_url}/healthz")  # the only page without auth: the probe's
    # (a top-level 401 would open a login prompt, which headless Chromium turns into an error)
    statuses = bare.evaluate(
        "async () => Promise.all(['/', '/jobs', '/static/console.js']"
        ".map(async p => (await fetch(p, {credentials: 'omit'})).status))"
    )
    assert statuses == [401, 401, 401]
    context.close()


def test_a_job_is_watched_until_stored_and_its_video_plays(
    page: Any, console_url: str, queue: AnimateQueue, remote: Any, job_id: str
) -> None:
    remote.config(generation_seconds=3.0)
    queue.submit(remote.image(), remote.template(), job_id=job_id, metadata={"order": "42"})
    recorded(queue, job_id)
    page.goto(f"{console_url}/jobs/{job_id}")
    seen = [page.inner_text("#state")]
    deadline = time.monotonic() + 60
    while "STORED" not in seen[-1]:  # the live fragment, refreshed in place: no reload
        assert time.monotonic() < deadline, seen
        page.wait_for_timeout(300)
        state = page.inner_text("#state")
        if state != seen[-1]:
            seen.append(state)
    assert len(seen) >= 2, seen  # it moved on the page, e.g. SUBMITTED -> STORED
    page.reload()  # the video element comes with the stored object
    page.wait_for_function(
        "() => { const v = document.querySelector('#video'); return v && v.readyState >= 2; }",
        timeout=20_000,
    )
    # A decoded frame, presented: requestVideoFrameCallback fires for it (the pixels of a
    # cross-origin video cannot be read back, by design), and the decoder counted frames.
    frame = page.evaluate(
        """async () => {
            const v = document.querySelector('#video');
            v.muted = true;
            const presented = new Promise(r => v.requestVideoFrameCallback((now, m) => r(m)));
            await v.play();
            const meta = await presented;
            await new Promise(r => setTimeout(r, 300));
            return {w: v.videoWidth, h: v.videoHeight, t: v.currentTime,
                    presented: meta.presentedFrames,
                    decoded: v.getVideoPlaybackQuality().totalVideoFrames};
        }"""
    )
    assert frame["w"] > 0 and frame["h"] > 0 and frame["t"] > 0, frame
    assert frame["presented"] >= 1 and frame["decoded"] >= 1, frame
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "job.png"), full_page=True)
    page.goto(f"{console_url}/jobs?state=STORED")
    assert page.locator(f'tr[data-job="{job_id}"]').count() == 1
    page.screenshot(path=str(SHOTS / "jobs.png"), full_page=True)
    page.goto(console_url)
    assert page.locator("#states").is_visible()
    page.screenshot(path=str(SHOTS / "overview.png"), full_page=True)


def test_a_job_is_cancelled_from_its_page(
    page: Any, console_url: str, queue: AnimateQueue, remote: Any, job_id: str
) -> None:
    remote.config(generation_seconds=60.0, concurrency=1)
    blocker = queue.submit(remote.image(), remote.template(), job_id=f"{job_id}-first")
    deadline = time.monotonic() + 30
    while (queue.get(blocker) or {}).get("remote_status") != "RUNNING":  # it holds the one slot
        assert time.monotonic() < deadline, queue.get(blocker)
        time.sleep(0.1)
    queue.submit(remote.image(), remote.template(), job_id=job_id)  # behind it: remote PENDING
    recorded(queue, job_id)
    page.goto(f"{console_url}/jobs/{job_id}")
    page.wait_for_function("() => document.querySelector('#state').innerText.includes('SUBMITTED')",
                           timeout=30_000)  # fmt: skip
    page.click("#cancel")
    assert "cancel" in page.inner_text("#message").lower()
    page.wait_for_function("() => document.querySelector('#state').innerText.includes('CANCELED')",
                           timeout=30_000)  # fmt: skip
    assert queue.cancel(blocker)["job_id"] == blocker  # (free the slot for the next tests)


def test_a_script_in_metadata_is_shown_as_text(
    page: Any, console_url: str, queue: AnimateQueue, remote: Any, job_id: str
) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    hostile = "<script>alert('owned')</script>"
    queue.submit(remote.image(), remote.template(), job_id=job_id, metadata={"note": hostile})
    recorded(queue, job_id)
    page.goto(f"{console_url}/jobs/{job_id}")
    assert hostile in page.inner_text("#metadata")  # the text itself, shown
    assert page.locator("#metadata script").count() == 0
    page.goto(f"{console_url}/jobs?q=owned&state=SUBMITTED")  # matched, listed, still inert
    page.wait_for_timeout(2500)  # a live refresh has run
    assert dialogs == []


def test_a_failed_job_is_run_again_from_its_page(
    page: Any, console_url: str, queue: AnimateQueue, remote: Any, job_id: str
) -> None:
    """DashScope fails the task; the page offers to run it again, as a new job with the same
    request, and lands on that job's page saying so."""
    queue.submit(remote.image(emulator_fail="InternalError.Algo"), remote.template(),
                 job_id=job_id)  # fmt: skip
    assert queue.wait(job_id, timeout=60)["state"] == "FAILED"
    page.goto(f"{console_url}/jobs/{job_id}")
    assert "InternalError.Algo" in page.inner_text("#error")
    page.click("#rerun")
    assert page.url.split("?")[0].endswith(f"/jobs/{job_id}-rerun-1")
    assert f"the run again of {job_id}" in page.inner_text("#message")
    rerun = queue.wait(f"{job_id}-rerun-1", timeout=60)
    assert rerun["metadata"] == {"rerun_of": job_id}
