"""Fakes of the ports for unit tests: a scripted API, copier and probes, a clock, and
:func:`make_services` to build a whole context over them and the in-memory twins."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from config.settings import load_settings
from workers import bootstrap
from workers.adapters.memory.governor import InMemoryGovernor
from workers.adapters.memory.store import START, InMemoryJobStore
from workers.domain.decisions import RemoteSnapshot
from workers.domain.media import ImageFacts, VideoFacts
from workers.domain.request import JobRequest
from workers.domain.templates import Detection
from workers.errors import DashScopeUncertain, TransientError
from workers.ports import StoredCopy
from workers.steps.context import Next, Services

T = TypeVar("T")


def ambiguous(exc: TransientError) -> TransientError:
    """Mark a transient error as sent-but-unanswered: :class:`FakeVideoApi` calls it ambiguous."""
    exc.ambiguous = True  # type: ignore[attr-defined]
    return exc


def next_of(script: deque[T | BaseException], what: str) -> T:
    if not script:
        raise AssertionError(f"unexpected {what}: nothing scripted")
    item = script.popleft()
    if isinstance(item, BaseException):
        raise item
    return item


class FakeVideoApi:
    """The ``VideoApi`` port, scripted: each call takes the next queued answer or raises it.

    A call with nothing scripted fails the test (an unexpected submit must never pass silently).
    ``submit_is_ambiguous`` is true for an error marked with :func:`ambiguous`. ``on_submit`` runs
    after the call is recorded and before the answer (the POST is in flight), ``on_recent_tasks``
    once before the list is read, so a test can interleave another worker or a crash there.
    """

    def __init__(
        self,
        *,
        submit: Iterable[str | BaseException] = (),
        poll: Iterable[RemoteSnapshot | BaseException] = (),
        recent: Iterable[str] = (),
        cancel: Iterable[BaseException | None] = (),
        detect: Iterable[Detection | BaseException] = (),
    ) -> None:
        self.detect_script: deque[Detection | BaseException] = deque(detect)
        self.detects: list[str] = []
        self.template_submits: list[str] = []
        self.submit_script: deque[str | BaseException] = deque(submit)
        self.poll_script: deque[RemoteSnapshot | BaseException] = deque(poll)
        self.cancel_script: deque[BaseException | None] = deque(cancel)
        self.recent: list[str] = list(recent)
        self.recent_error: BaseException | None = None
        self.submits: list[JobRequest] = []
        self.accounts_used: list[str] = []
        self.polls: list[str] = []
        self.cancels: list[str] = []
        self.recent_calls: list[tuple[float, float]] = []
        self.on_submit: Callable[[JobRequest], None] | None = None
        self.on_recent_tasks: Callable[[], None] | None = None
        self.lock = threading.Lock()

    def submit(self, account: str, request: JobRequest) -> str:
        with self.lock:
            self.submits.append(request)
            self.accounts_used.append(account)
        if self.on_submit is not None:
            self.on_submit(request)
        with self.lock:
            return next_of(self.submit_script, "submit")

    def submit_template(self, account: str, video_url: str) -> str:
        with self.lock:
            self.template_submits.append(video_url)
            self.accounts_used.append(account)
            return next_of(self.submit_script, "template submit")

    def detect(self, account: str, image_url: str) -> Detection:
        with self.lock:
            self.detects.append(image_url)
            return next_of(self.detect_script, "detect")

    def submit_is_ambiguous(self, exc: TransientError) -> bool:
        return isinstance(exc, DashScopeUncertain) or getattr(exc, "ambiguous", False) is True

    def poll(self, account: str, task_id: str) -> RemoteSnapshot:
        with self.lock:
            self.polls.append(task_id)
            return next_of(self.poll_script, "poll")

    def cancel(self, account: str, task_id: str) -> None:
        with self.lock:
            self.cancels.append(task_id)
            error = self.cancel_script.popleft() if self.cancel_script else None
        if error is not None:
            raise error

    def recent_tasks(
        self, account: str, since: float, until: float, kind: str = "video",
        model: str | None = None,
    ) -> list[str]:  # fmt: skip
        hook, self.on_recent_tasks = self.on_recent_tasks, None  # one shot: no recursion
        if hook is not None:
            hook()
        with self.lock:
            self.recent_calls.append((since, until))
            if self.recent_error is not None:
                raise self.recent_error
            return list(self.recent)


def stored_copy(key: str, *, bucket: str = "videos-bucket", size: int = 1234) -> StoredCopy:
    """A plausible successful copy of ``key``."""
    return StoredCopy(bucket, key, size, "ab" * 32)


class FakeCopier:
    """The ``Copier`` port, scripted: each copy takes the next queued answer or raises it.

    ``calls`` records ``(url, key, metadata)``; a successful copy is kept for ``find``.
    ``on_copy`` runs while the copy is under way (after the call is recorded).
    """

    def __init__(self, results: Iterable[StoredCopy | BaseException] = ()) -> None:
        self.heartbeats: list[Callable[..., None] | None] = []
        self.script: deque[StoredCopy | BaseException] = deque(results)
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.objects: dict[str, StoredCopy] = {}
        self.aborted: list[tuple[str, str]] = []
        self.resumes: list[str | None] = []  # the checkpoint each copy was given
        self.on_copy: Callable[[], None] | None = None

    def copy(
        self,
        url: str,
        key: str,
        metadata: dict[str, str],
        heartbeat: Callable[..., None] | None = None,
        resume: str | None = None,
        budget: float | None = None,
    ) -> StoredCopy:
        self.heartbeats.append(heartbeat)
        self.resumes.append(resume)
        self.calls.append((url, key, dict(metadata)))
        if self.on_copy is not None:
            self.on_copy()
        stored = next_of(self.script, "copy")
        self.objects[stored.key] = stored
        return stored

    def find(self, key: str) -> StoredCopy | None:
        return self.objects.get(key)

    def abort(self, key: str, checkpoint: str) -> None:
        self.aborted.append((key, checkpoint))


VALID_IMAGE = ImageFacts("PNG", 200_000, 768, 1024)


class FakeImageProbe:
    """The ``ImageProbe`` port: returns ``facts``, or raises it when it is an exception."""

    def __init__(self, facts: ImageFacts | BaseException = VALID_IMAGE) -> None:
        self.facts = facts
        self.probes: list[str] = []

    def probe(self, url: str, *, trusted: bool = False) -> ImageFacts:
        self.probes.append(url)
        if isinstance(self.facts, BaseException):
            raise self.facts
        return self.facts


VALID_VIDEO = VideoFacts("mp4", "h264", 2_000_000, 720, 1280, 24.0, 5.0, "cd" * 32)


class FakeVideoProbe:
    """The ``VideoProbe`` port: the next scripted facts (or error), else ``VALID_VIDEO``."""

    def __init__(self, *results: VideoFacts | BaseException) -> None:
        self.script: deque[VideoFacts | BaseException] = deque(results)
        self.probes: list[tuple[str, bool]] = []

    def probe(self, url: str, *, trusted: bool = False) -> VideoFacts:
        self.probes.append((url, trusted))
        item = self.script.popleft() if self.script else VALID_VIDEO
        if isinstance(item, BaseException):
            raise item
        return item


class FakeClock:
    """A clock that moves only when told: call it for "now"."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


# Production's tuning: every policy and limit from Settings' one default per tunable (no
# environment read), so unit tests run on the values production runs on.
TUNING = bootstrap.tuning(load_settings({}))


@dataclass(frozen=True)
class FakeServices(Services):
    """Services that keep what the use cases asked to schedule (``woken``)."""

    woken: list[Next] = field(default_factory=list)


def make_services(**overrides: Any) -> FakeServices:
    """Services over fresh fakes, production tuning, a :class:`FakeClock` and rand fixed at 0.5;
    override any field by name."""
    woken: list[Next] = []
    values: dict[str, Any] = {
        # the fakes' URLs and accounts, not a deployment's
        "accounts": frozenset({"default"}),
        "video_hosts": ("*",),
        "s3_prefix": "videos",
        "store": InMemoryJobStore(),
        "api": FakeVideoApi(),
        "governor": InMemoryGovernor(),
        "wake": woken.append,
        "woken": woken,
        "copier": FakeCopier(),
        "images": FakeImageProbe(),
        "videos": FakeVideoProbe(),
        "clock": FakeClock(),
        "rand": lambda: 0.5,
    }
    values.update(overrides)
    governor, store = values["governor"], values["store"]
    if isinstance(governor, InMemoryGovernor) and governor.store is None:
        if isinstance(store, InMemoryJobStore):
            governor.store = store
        governor.clock = values["clock"]
    return FakeServices.of(TUNING, **values)


class FakeQueueWatch:
    """The ``QueueWatch`` port: per queue (live consumers, seconds its oldest message waited)."""

    def __init__(self, states: dict[str, tuple[int, float]] | None = None) -> None:
        self.states = dict(states or {})

    def waiting(self) -> dict[str, tuple[int, float]]:
        return dict(self.states)
