"""A model's retirement, as Model Studio announces it: whether the configured model is close to
its date or past it (``animate-queue health model``, the worker's start-up log), and how to say
that DashScope no longer serves it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from workers.models.profile import ModelProfile

WARN_DAYS = 30  # warn this many days before the date


@dataclass(frozen=True)
class RetirementNotice:
    retired: bool  # the date has passed: jobs will fail at DashScope
    days_left: int  # negative: days since
    message: str


def retirement_notice(profile: ModelProfile, today: date) -> RetirementNotice | None:
    """None when the model has no announced date, or it is more than WARN_DAYS away."""
    if profile.retires is None:
        return None
    retires = date.fromisoformat(profile.retires)
    days_left = (retires - today).days
    if days_left > WARN_DAYS:
        return None
    instead = f"; its successor is {profile.successor}" if profile.successor else ""
    if days_left <= 0:
        when = "today" if days_left == 0 else f"{-days_left} days ago"
        message = (f"{profile.name} was retired by Model Studio on {profile.retires} ({when})"
                   f"{instead}: set DASHSCOPE_MODEL (docs/migration-wan.md)")  # fmt: skip
        return RetirementNotice(True, days_left, message)
    message = (f"{profile.name} retires on {profile.retires}, in {days_left} days{instead}: "
               "plan the switch (DASHSCOPE_MODEL, docs/migration-wan.md)")  # fmt: skip
    return RetirementNotice(False, days_left, message)


def gone_message(profile: ModelProfile, answer: str) -> str:
    """DashScope answered that the model does not exist (or is retired): what the job says."""
    instead = (f"; its successor is {profile.successor} (DASHSCOPE_MODEL, docs/migration-wan.md)"
               if profile.successor else "")  # fmt: skip
    return f"DashScope no longer serves {profile.name} ({answer}){instead}"
