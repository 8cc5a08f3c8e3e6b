"""The structured log fields of the job at hand: the step a task runs, and the job id and version
a step loaded. They are bound once (the task binds its step, ``load`` the job) and added to every
log record made meanwhile by :class:`JobFields`, a logging filter the Celery app installs on its
handlers; JSON lines (``LOG_FORMAT=json``) carry them as keys."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# The fields of the innermost bound() block; None outside any.
_FIELDS: ContextVar[dict[str, object] | None] = ContextVar("animate_queue_log_fields", default=None)


@contextmanager
def bound(**fields: object) -> Iterator[None]:
    """Fields for every record made inside the block (and by what it calls); gone after it."""
    token = _FIELDS.set({**(_FIELDS.get() or {}), **fields})
    try:
        yield
    finally:
        _FIELDS.reset(token)


def bind(**fields: object) -> None:
    """Add fields until the enclosing :func:`bound` block ends; outside one, nothing (so a step
    run by hand, a CLI or a test, leaves nothing behind)."""
    block = _FIELDS.get()
    if block is not None:
        block.update(fields)


def current() -> dict[str, object]:
    return dict(_FIELDS.get() or {})


class JobFields(logging.Filter):
    """Puts the bound fields on each record (a field the call passed as ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_FIELDS.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True
