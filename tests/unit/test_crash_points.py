"""Crash at every point: the worker dies (an exception nothing catches, standing for SIGKILL) at
each write two jobs make to the store on their way from admission to STORED and delivered, and
right after DashScope accepted a POST, S3 stored a video or a result was published. Whatever the
point, each job is paid exactly once, ends STORED with its own video, and its result goes out
at least once, the watchdog resuming what the crash left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import itertools
from typing import Any

import pytest

from tests.fakes import FakeClock, make_services
from workers import steps
from workers.adapters.memory.governor import InMemoryGovernor
from workers.adapters.memory.store import InMemoryJobStore
from workers.domain.decisions import RemoteSnapshot
from workers.domain.job import Job
from workers.domain.request import JobKind, JobRequest
from workers.domain.states import JobState, RemoteStatus
from workers.ports import StoredCopy
from workers.steps.context import Next, Services

IMAGE = "https://img.test/person.png"
TEMPLATE = "AACT.acct.1234-5678"
JOBS = ("job-a", "job-b")


class Crash(BaseException):
    """The worker process dies here (SIGKILL): nothing in the pipeline catches it."""


class Points:
    """Counts the points a crash can happen at, and raises at the chosen one."""

    def __init__(self, crash_at: int | None) -> None:
        self.crash_at = crash_at
        self.seen = 0
        self.names: list[str] = []

    def hit(self, name: str) -> None:
        self.seen += 1
        self.names.append(name)
        if self.seen == self.crash_at:
            raise Crash(name)


class CrashingStore(InMemoryJobStore):
    """The in-memory store whose every write is a crash point (before it is applied)."""

    WRITES = ("create", "take", "transition", "record_submission", "lock_submit",
              "unlock_submit", "note_duplicate")  # fmt: skip

    def __init__(self, points: Points) -> None:
        super().__init__()
        self.points = points

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name in CrashingStore.WRITES:
            points = super().__getattribute__("points")

            def write(*args: Any, **kwargs: Any) -> Any:
                points.hit(name)
                return attr(*args, **kwargs)

            return write
        return attr


class Remote:
    """DashScope as far as these jobs see it: a submit creates a task (the payment) and then
    may crash the caller; a task succeeds at once with a video of its own; the list shows tasks
    by creation time."""

    def __init__(self, points: Points, clock: FakeClock) -> None:
        self.points, self.clock = points, clock
        self.created: list[tuple[str, float, str]] = []  # task id, when, the image it was for

    def submit(self, account: str, request: JobRequest) -> str:
        task_id = f"task-{len(self.created) + 1}"
        self.created.append((task_id, self.clock(), request.image_url))
        self.points.hit("after the POST was accepted")
        return task_id

    def submit_template(self, account: str, video_url: str) -> str:
        raise AssertionError("no templates here")

    def detect(self, account: str, image_url: str) -> Any:
        raise AssertionError("no image checks here")

    def submit_is_ambiguous(self, exc: Exception) -> bool:
        return False

    def poll(self, account: str, task_id: str) -> RemoteSnapshot:
        url = f"https://oss.test/{task_id}.mp4?Expires={int(self.clock()) + 86400}"
        return RemoteSnapshot(RemoteStatus.SUCCEEDED, "SUCCEEDED", video_url=url,
                              video_duration=5.0, end_time=self.clock())  # fmt: skip

    def cancel(self, account: str, task_id: str) -> None:
        pass

    def recent_tasks(
        self, account: str, since: float, until: float, kind: str = JobKind.VIDEO,
        model: str | None = None,
    ) -> list[str]:  # fmt: skip
        return [t for t, at, _ in self.created if since <= at <= until]


class Bucket:
    """S3 as the copier sees it: the object is the task's own video; a crash can follow."""

    def __init__(self, points: Points) -> None:
        self.points = points
        self.objects: dict[str, StoredCopy] = {}

    def copy(self, url: str, key: str, metadata: dict[str, str], **_: Any) -> StoredCopy:
        task_id = url.split("/")[-1].split(".mp4")[0]
        stored = StoredCopy("videos", key, 1000, hashlib.sha256(task_id.encode()).hexdigest())
        self.objects[key] = stored
        self.points.hit("after the video was stored")
        return stored

    def find(self, key: str) -> StoredCopy | None:
        return self.objects.get(key)

    def abort(self, key: str, checkpoint: str) -> None:
        pass


class Published:
    """The result backend and callbacks: what went out, and a crash right after it did."""

    def __init__(self, points: Points) -> None:
        self.points = points
        self.jobs: list[str] = []

    def publish(self, job: Job) -> None:
        self.jobs.append(job.job_id)
        self.points.hit("after the result was published")


STEPS = {
    "submit": steps.submit,
    "poll": steps.poll,
    "copy": steps.copy,
    "detect": steps.detect,
    "prepare": steps.prepare,
    "deliver": steps.deliver,
}


def run(crash_at: int | None) -> tuple[Services, Remote, Points]:
    """Two jobs of one account from intake to their end, the worker dying at ``crash_at``."""
    points = Points(crash_at)
    clock = FakeClock()
    remote, bucket = Remote(points, clock), Bucket(points)
    due: list[tuple[float, int, Next]] = []
    order = itertools.count()

    def wake(step: Next) -> None:
        heapq.heappush(due, (clock() + step.countdown, next(order), step))

    svc = make_services(store=CrashingStore(points), api=remote, copier=bucket, clock=clock,
                        governor=InMemoryGovernor(capacity=2), wake=wake,
                        results=Published(points))  # fmt: skip
    for job_id in JOBS:
        kwargs = {"image_url": f"{IMAGE}?{job_id}", "template_id": TEMPLATE, "job_id": job_id,
                  "detect": False}  # fmt: skip
        try:
            steps.intake(svc, kwargs, (), f"msg-{job_id}")
        except Crash:
            steps.intake(svc, kwargs, (), f"msg-{job_id}")  # the intake message comes back
    beat = clock() + 15  # beat sends the watchdog every 15 s, whatever else happens
    for _ in range(10_000):
        jobs = [svc.store.get(j) for j in JOBS]
        if all(j is not None and j.final and j.delivery is None for j in jobs):
            break
        if due and due[0][0] <= beat:
            at, _, step = heapq.heappop(due)
            clock.now = max(clock.now, at)
            try:
                nxt = STEPS[step.step](svc, step.job_id, step.version)
            except Crash:
                continue  # the message died with its worker (acknowledged, as Celery does)
            if nxt is not None:
                wake(nxt)
        else:
            clock.now, beat = max(clock.now, beat), beat + 15
            with contextlib.suppress(Crash):
                steps.watchdog(svc, grace=30, max_resumes=5, accounts=["default"])
    return svc, remote, points


def crash_points() -> int:
    svc, _, points = run(None)
    assert [svc.store.get(j).state for j in JOBS] == [JobState.STORED] * 2  # type: ignore[union-attr]
    return points.seen


@pytest.mark.parametrize("crash_at", range(1, crash_points() + 1))
def test_every_crash_point_pays_once_and_stores_each_jobs_own_video(crash_at: int) -> None:
    """...and delivers each job's result at least once."""
    svc, remote, points = run(crash_at)
    published = svc.results.jobs  # type: ignore[attr-defined]
    assert all(published.count(j) >= 1 for j in JOBS), published
    where = points.names[crash_at - 1] if len(points.names) >= crash_at else "?"
    jobs: list[Job] = []
    for job_id in JOBS:
        job = svc.store.get(job_id)
        assert job is not None, where
        jobs.append(job)
        assert (job.state, job.error_code) == (JobState.STORED, None), (where, job)
    assert len(remote.created) == 2, (where, remote.created)  # each job paid exactly once
    for job in jobs:
        own = [t for t, _, image in remote.created if image.endswith(job.job_id)]
        assert job.remote_task_id == own[0], (where, job.job_id, job.remote_task_id, own)
        assert job.sha256 == hashlib.sha256(own[0].encode()).hexdigest(), where  # its own video


def test_the_harness_reaches_the_dangerous_points() -> None:
    """The crash points include the window between the POST and the recorded task id, and the
    one between the stored video and the STORED record."""
    _, _, points = run(None)
    names = points.names
    assert names.count("after the POST was accepted") == 2
    assert names.count("after the video was stored") == 2
    assert names.count("after the result was published") == 2
    assert names.count("record_submission") == 2
    first_post = names.index("after the POST was accepted")
    assert names[first_post + 1 : first_post + 3] == ["record_submission", "unlock_submit"]
    assert dataclasses.is_dataclass(Job)
