"""Log output: plain lines by default, one JSON object per line with LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from config import logs
from config.settings import load_settings


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    chatty = {name: logging.getLogger(name).level for name in logs.QUIET}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in chatty.items():
        logging.getLogger(name).setLevel(old)


def test_json_lines_carry_the_structured_fields(
    restore_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logs.configure(load_settings({"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}))
    logging.getLogger("workers.adapters.redis.store").info(
        "job %s %s -> %s", "j1", "QUEUED", "SUBMITTING",
        extra={"event": "job.transition", "job_id": "j1", "remote_task_id": "t-1",
               "account": "main", "seconds_in_state": 2.5},
    )  # fmt: skip
    logging.getLogger("httpx").info("a chatty library line stays out")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    (record,) = [json.loads(line) for line in lines]
    assert record["message"] == "job j1 QUEUED -> SUBMITTING"
    assert (record["level"], record["logger"], record["event"]) == (
        "INFO", "workers.adapters.redis.store", "job.transition")  # fmt: skip
    assert (record["job_id"], record["remote_task_id"], record["account"]) == ("j1", "t-1", "main")
    assert record["seconds_in_state"] == 2.5 and "time" in record


def test_text_by_default(restore_root: None, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(load_settings({}))
    logging.getLogger("workers.steps.poll").warning("plain %s", "words")
    err = capsys.readouterr().err
    assert "WARNING" in err and "workers.steps.poll: plain words" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[-1])


def test_a_steps_lines_carry_its_step_job_and_version(
    restore_root: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task binds its step and the message's job id and version, the step's ``load`` the
    job's state: every line the step logs carries them as JSON keys, not only in its text; the
    next task's lines do not inherit them."""
    from config import celery_app
    from tests.fakes import make_services
    from workers.domain.job import Job
    from workers.domain.request import JobRequest
    from workers.domain.states import JobState
    from workers.entrypoints.celery import tasks
    from workers.errors import DashScopeUnavailable

    monkeypatch.setenv("LOG_FORMAT", "json")
    monkeypatch.setattr(celery_app, "settings", load_settings({"LOG_FORMAT": "json"}))
    celery_app._logging()  # what the worker's setup_logging signal runs
    svc = make_services()
    svc.store.create(Job(job_id="j-logs", state=JobState.SUBMITTED, version=4,
                         request=JobRequest("https://cdn.test/a.png", "AACT.a.b"),
                         created_at=svc.clock(), updated_at=svc.clock(),
                         submitted_at=svc.clock(), remote_task_id="t-logs"))  # fmt: skip
    svc.api.poll_script.append(DashScopeUnavailable("502 from the gateway"))  # type: ignore[attr-defined]
    monkeypatch.setattr(tasks, "services", lambda: svc)
    monkeypatch.setattr(tasks, "schedule", lambda step: None)
    tasks.TASKS["poll"].run("j-logs", 4)
    logging.getLogger("workers.steps.poll").warning("a line outside any task")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    failed = next(line for line in lines if "poll failed" in line["message"])
    assert (failed["step"], failed["job_id"], failed["version"], failed["state"]) == (
        "poll", "j-logs", 4, "SUBMITTED")  # fmt: skip
    outside = lines[-1]
    assert outside["message"] == "a line outside any task"
    assert not {"step", "job_id", "version", "state"} & set(outside)


def test_fields_live_only_inside_their_block() -> None:
    from workers import logfields

    logfields.bind(job_id="outside")  # a step run by hand: nothing is left behind
    assert logfields.current() == {}
    with logfields.bound(step="poll"):
        logfields.bind(job_id="j1", version=3)
        with logfields.bound(step="copy"):
            assert logfields.current() == {"step": "copy", "job_id": "j1", "version": 3}
        assert logfields.current() == {"step": "poll", "job_id": "j1", "version": 3}
    assert logfields.current() == {}
