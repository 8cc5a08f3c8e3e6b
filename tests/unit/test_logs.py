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
