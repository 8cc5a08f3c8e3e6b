"""The job console's server side against the real job store (Redis at REDIS_URL, a key prefix of
its own): auth, the pages, paging by the state index, hostile data shown as text, and the CSRF
guard on its actions. (The browser tests drive it in headless Chromium: tests/e2e.)"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from click.testing import CliRunner

from config.settings import get_settings
from devstack import free_port, served
from workers.adapters.redis.queues import RedisQueues
from workers.domain.costs import utc_day
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import JobState
from workers.entrypoints import cli
from workers.entrypoints.console.app import create_app, parse_users
from workers.producer import AnimateQueue

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
AUTH = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
HOSTILE = "<script>alert('x')</script>"


@pytest.fixture
def queue() -> Iterator[AnimateQueue]:
    prefix = f"test-console-{uuid.uuid4().hex[:10]}"
    q = AnimateQueue(REDIS_URL, key_prefix=prefix)
    yield q
    q.close()
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def client(queue: AnimateQueue) -> Iterator[httpx.Client]:
    """The console served for real (uvicorn, a free port), and a client for it."""
    app = create_app(queue, users=parse_users("ops:s3cret"), secret=b"k" * 32,
                     presign=lambda uri: "https://s3.test/signed.mp4",
                     queues=RedisQueues(queue.store.redis, prefix=queue.store.prefix))  # fmt: skip
    with served(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        yield http


def job(queue: AnimateQueue, job_id: str, state: JobState = JobState.SUBMITTED, **kw: Any) -> Job:
    now = time.time()
    metadata = kw.pop("metadata", {})
    request = JobRequest("https://cdn.test/a.png", "AACT.x.y", job_id=job_id, metadata=metadata)
    record = Job(job_id, state, 1, request, now - 30, now, **kw)
    queue.store.create(record)
    return record


def test_every_page_needs_the_credentials(client: httpx.Client, queue: AnimateQueue) -> None:
    job(queue, "j1")
    for path in ("/", "/jobs", "/jobs/j1", "/jobs/rows", "/static/console.js"):
        assert client.get(path).status_code == 401, path
        wrong = {"Authorization": "Basic " + base64.b64encode(b"ops:nope").decode()}
        assert client.get(path, headers=wrong).status_code == 401
        assert client.get(path, headers=AUTH).status_code == 200, path
    assert client.get("/").headers.get("www-authenticate", "").startswith("Basic")


def test_the_overview_counts_jobs_by_state(client: httpx.Client, queue: AnimateQueue) -> None:
    for i in range(3):
        job(queue, f"s{i}")
    job(queue, "q1", JobState.QUEUED)
    page = client.get("/", headers=AUTH).text
    assert '<a href="/jobs?state=SUBMITTED">3</a>' in page
    assert '<a href="/jobs?state=QUEUED">1</a>' in page


def test_the_overview_shows_copies_at_risk_queues_and_cost_today(
    client: httpx.Client, queue: AnimateQueue
) -> None:
    now = time.time()
    job(queue, "soon", JobState.SUBMITTED)
    store = queue.store
    store.redis.zadd(f"{store.prefix}:expiring", {"soon": now + 3600, "later": now + 86_000})
    today = utc_day(now)
    queue.governor.add_spend("main", today, 1.2, "j1", "wan2.2-animate-move")
    queue.governor.add_spend("main", today, 0.16, "j2", "animate-anyone-gen2")
    page = client.get("/", headers=AUTH).text
    risk = page.split('id="at-risk"', 1)[1].split("</table>", 1)[0]
    assert 'href="/jobs/soon"' in risk and "later" not in risk and "1.0 h" in risk
    spend = page.split('id="spend"', 1)[1].split("</table>", 1)[0]
    assert "<td>main</td><td>wan2.2-animate-move</td><td>1.2</td>" in spend
    assert "<td>main</td><td>animate-anyone-gen2</td><td>0.16</td>" in spend
    queues = page.split('id="queues"', 1)[1].split("</table>", 1)[0]
    assert all(f"<td>{name}</td>" in queues for name in ("celery", "dashscope", "transfer"))


def test_the_list_pages_through_the_state_index(client: httpx.Client, queue: AnimateQueue) -> None:
    """300 jobs: pages of about 50 by the index's own cursor, every job once, none twice."""
    ids = {f"p{i:03d}" for i in range(300)}
    for job_id in ids:
        job(queue, job_id)
    seen: list[str] = []
    url = "/jobs?state=SUBMITTED"
    pages = 0
    while url:
        page = client.get(url, headers=AUTH).text
        pages += 1
        seen += [line.split('"')[1] for line in page.splitlines() if "<tr data-job=" in line]
        marker = 'id="next" href="'
        url = (
            page.split(marker, 1)[1].split('"', 1)[0].replace("&amp;", "&")
            if marker in page
            else ""
        )
        assert pages < 30
    assert set(seen) == ids and pages > 3


def test_free_text_finds_a_job_by_id_or_metadata_and_filters_apply(
    client: httpx.Client, queue: AnimateQueue
) -> None:
    job(queue, "order-42", metadata={"customer": "ACME Corp"})
    job(queue, "other", metadata={"customer": "Globex"})
    job(queue, "queued-1", JobState.QUEUED)
    by_id = client.get("/jobs?q=queued-1", headers=AUTH).text
    assert 'data-job="queued-1"' in by_id and 'data-job="order-42"' not in by_id
    by_meta = client.get("/jobs?state=SUBMITTED&q=acme", headers=AUTH).text
    assert 'data-job="order-42"' in by_meta and 'data-job="other"' not in by_meta
    other_account = client.get("/jobs?state=SUBMITTED&account=nobody", headers=AUTH).text
    assert "no jobs here" in other_account


def test_a_job_page_shows_hostile_data_as_text(client: httpx.Client, queue: AnimateQueue) -> None:
    job(queue, "evil", metadata={"note": HOSTILE}, error_code="Bad", error_message=HOSTILE)
    page = client.get("/jobs/evil", headers=AUTH).text
    assert HOSTILE not in page
    assert "&lt;script&gt;alert(" in page
    assert client.get("/jobs/missing", headers=AUTH).status_code == 404


def test_a_stored_job_plays_its_video_and_shows_what_it_cost(
    client: httpx.Client, queue: AnimateQueue
) -> None:
    job(queue, "done", JobState.COPYING, s3_bucket="b", s3_key="videos/done.mp4", bytes=1234,
        sha256="ab" * 32, video_duration=5.0, price_per_second=0.6)  # fmt: skip
    page = client.get("/jobs/done", headers=AUTH).text
    assert '<video id="video" src="https://s3.test/signed.mp4"' in page
    assert "5.0 s / 3.0 CNY" in page and "s3://b/videos/done.mp4" in page
    assert "submit 0, polls 0, copy 0" in page


def test_an_action_needs_its_csrf_token_and_this_origin(
    client: httpx.Client, queue: AnimateQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    job(queue, "c1")
    calls: list[str] = []

    def cancel(job_id: str, timeout: float = 30) -> dict[str, Any]:
        calls.append(job_id)
        return {"outcome": "requested", "message": "cancel requested"}

    monkeypatch.setattr(queue, "cancel", cancel)
    page = client.get("/jobs/c1", headers=AUTH).text
    token = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert client.post("/jobs/c1/cancel", headers=AUTH, data={}).status_code == 403
    assert client.post("/jobs/c1/cancel", headers=AUTH, data={"csrf": "x" * 64}).status_code == 403
    elsewhere = {**AUTH, "Origin": "https://evil.test"}
    assert (
        client.post("/jobs/c1/cancel", headers=elsewhere, data={"csrf": token}).status_code == 403
    )
    assert calls == []
    here = {**AUTH, "Origin": str(client.base_url).rstrip("/")}
    done = client.post("/jobs/c1/cancel", headers=here, data={"csrf": token},
                       follow_redirects=False)  # fmt: skip
    assert done.status_code == 303 and calls == ["c1"]
    assert "cancel+requested" in done.headers["location"]


def test_the_console_refuses_to_start_without_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSOLE_BASIC_AUTH", raising=False)
    monkeypatch.delenv("CONSOLE_ALLOW_NO_AUTH", raising=False)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.main, ["console"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code != 0 and "CONSOLE_BASIC_AUTH" in result.output


def ended(queue: AnimateQueue, job_id: str, state: JobState, **kw: Any) -> None:
    """A job record that ended (written as the workers leave it: the producer's own store
    expires final records at once, so the state is set on a live one)."""
    job(queue, job_id, **kw)
    queue.store.redis.hset(queue.store.key(job_id), "state", state.value)


def sent(queue: AnimateQueue, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    def send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> None:
        calls.append((name, args, kwargs, options.get("queue")))

    monkeypatch.setattr(queue.celery, "send_task", send_task)
    return calls


def test_rerun_sends_the_same_request_as_a_new_job(
    queue: AnimateQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = sent(queue, monkeypatch)
    ended(queue, "f1", JobState.FAILED, metadata={"order": "42"})
    assert queue.rerun("f1") == "f1-rerun-1"
    ((name, _, kwargs, q),) = calls
    assert (name, q) == ("animate.generate", "celery")
    assert kwargs["job_id"] == "f1-rerun-1" and kwargs["metadata"] == {
        "order": "42",
        "rerun_of": "f1",
    }
    assert (kwargs["image_url"], kwargs["template_id"]) == ("https://cdn.test/a.png", "AACT.x.y")
    assert "video_url" not in kwargs
    job(queue, "f1-rerun-1")  # that one exists now: the next run gets the next number
    assert queue.rerun("f1") == "f1-rerun-2"
    job(queue, "running")
    with pytest.raises(ValueError, match="only a video job that ended without its video"):
        queue.rerun("running")


def test_a_wan_rerun_sends_none_of_animate_anyones_fields(
    queue: AnimateQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = sent(queue, monkeypatch)
    now = time.time()
    request = JobRequest("https://cdn.test/a.png", video_url="https://cdn.test/d.mp4",
                         job_id="w1", detect=False, model="wan2.2-animate-mix", mode="wan-pro")  # fmt: skip
    queue.store.create(Job("w1", JobState.SUBMITTED, 1, request, now, now))
    queue.store.redis.hset(queue.store.key("w1"), "state", "EXPIRED")
    queue.rerun("w1")
    kwargs = calls[0][2]
    assert kwargs["model"] == "wan2.2-animate-mix" and kwargs["mode"] == "wan-pro"
    assert kwargs["video_url"] == "https://cdn.test/d.mp4"
    assert not {"detect", "template_id", "use_ref_img_bg", "video_ratio"} & set(kwargs)


def test_retry_copy_sends_the_copy_now_while_the_url_lives(
    queue: AnimateQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = sent(queue, monkeypatch)
    job(queue, "c1", JobState.COPYING, video_expires_at=time.time() + 7200)
    assert queue.retry_copy("c1")["outcome"] == "sent"
    assert calls == [("animate.copy", ("c1", 1), None, "transfer")]
    job(queue, "c2", JobState.COPYING, video_expires_at=time.time() - 1)
    with pytest.raises(ValueError, match="expired"):
        queue.retry_copy("c2")
    job(queue, "s1")
    with pytest.raises(ValueError, match="only a job waiting for its copy"):
        queue.retry_copy("s1")
    assert len(calls) == 1


def test_the_pages_actions_say_what_happened(
    client: httpx.Client, queue: AnimateQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent(queue, monkeypatch)
    ended(queue, "gone", JobState.FAILED)
    page = client.get("/jobs/gone", headers=AUTH).text
    assert 'id="rerun"' in page and 'id="cancel"' not in page and 'id="retry-copy"' not in page
    token = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    here = {**AUTH, "Origin": str(client.base_url).rstrip("/")}
    done = client.post("/jobs/gone/rerun", headers=here, data={"csrf": token},
                       follow_redirects=False)  # fmt: skip
    assert done.status_code == 303
    assert done.headers["location"].startswith("/jobs/gone-rerun-1?")
    refused = client.post("/jobs/gone/retry-copy", headers=here, data={"csrf": token},
                          follow_redirects=False)  # fmt: skip
    assert "retry+the+copy+not+done" in refused.headers["location"]


def test_the_timeline_says_how_long_each_step_lasted_and_why_it_retried(
    client: httpx.Client, queue: AnimateQueue
) -> None:
    created = job(queue, "t1", JobState.RECEIVED, intake_message_id="msg-123")
    moved = queue.store.transition(created, JobState.SUBMITTING, updated_at=created.created_at + 4)
    assert moved is not None
    queue.store.transition(moved, JobState.SUBMITTING, submit_attempts=2, error_code="HTTP503",
                           error_message="busy", updated_at=created.created_at + 10)  # fmt: skip
    page = client.get("/jobs/t1", headers=AUTH).text
    rows = page.split('id="timeline"', 1)[1].split("</table>", 1)[0]
    assert "<td>4.0 s</td>" in rows and "<td>6.0 s</td>" in rows
    assert (
        "submit_attempts=2" in rows
        and "error_code=HTTP503" in rows
        and "error_message=busy" in rows
    )
    assert 'id="flower-intake" href="http://localhost:5555/task/msg-123"' in page
    steps = page.split('id="steps"', 1)[1].split("</table>", 1)[0]
    received, submitting = steps.split("<td>RECEIVED</td>", 1)[1].split("<td>SUBMITTING</td>", 1)
    assert "<td>4.0 s</td>" in received  # RECEIVED until the move, 4 s later
    assert "<td>2</td>" in submitting and "HTTP503: busy" in submitting  # one row, two attempts


def test_the_list_filters_by_age(client: httpx.Client, queue: AnimateQueue) -> None:
    now = time.time()
    queue.store.create(Job("old", JobState.SUBMITTED, 1, JobRequest("https://cdn.test/a.png",
                       "AACT.x.y", job_id="old"), now - 3600, now))  # fmt: skip
    queue.store.create(Job("new", JobState.SUBMITTED, 1, JobRequest("https://cdn.test/a.png",
                       "AACT.x.y", job_id="new"), now - 5, now))  # fmt: skip
    page = client.get("/jobs?state=SUBMITTED&min_age=30", headers=AUTH).text
    assert 'data-job="old"' in page and 'data-job="new"' not in page


def test_the_overview_measures_throughput_between_reads(
    client: httpx.Client, queue: AnimateQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [time.time()]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    assert "measuring" in client.get("/", headers=AUTH).text
    key = f"{queue.store.prefix}:m:c:jobs_finished_total"
    queue.store.redis.hincrbyfloat(key, '["STORED","default","video"]', 30)
    clock[0] += 60  # a minute later, 30 more finished
    page = client.get("/", headers=AUTH).text
    assert "30.0 jobs finished a minute" in page


def test_a_job_an_action_just_enqueued_has_a_page_before_its_record(client: httpx.Client) -> None:
    page = client.get("/jobs/brand-new?message=enqueued", headers=AUTH)
    assert page.status_code == 200 and 'id="message" class="message">enqueued' in page.text
    assert 'http-equiv="refresh"' in page.text
    assert client.get("/jobs/brand-new", headers=AUTH).status_code == 404


def test_a_job_page_without_flower_still_answers(queue: AnimateQueue) -> None:
    """Flower down (nobody on its port): the job's page says so and keeps its links."""
    from workers.entrypoints.console.app import flower_tasks

    job(queue, "nf")
    app = create_app(queue, users=None, secret=b"k" * 32,
                     tasks=flower_tasks(f"http://127.0.0.1:{free_port()}", None, timeout=0.5))  # fmt: skip
    with served(app) as url:
        page = httpx.get(f"{url}/jobs/nf", timeout=10)
    assert page.status_code == 200 and 'id="flower-unreachable"' in page.text
    assert 'id="flower-tasks"' in page.text
