"""What a job costs: DashScope bills per second of output video (``usage.video_duration``) at the
model's price for the job's mode. The price is recorded on the job at submit, so a later change
of the price table does not rewrite what was paid. An account may have a daily budget (UTC
days): once its bills reach it, no new paid job of the account is admitted until the next day;
jobs already submitted run to the end (they are paid for)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

CURRENCY = "CNY"


def cost(price_per_second: float | None, seconds: float | None) -> float | None:
    """``price x seconds``, in CNY to 0.0001; None when either is unknown."""
    if price_per_second is None or seconds is None:
        return None
    return round(price_per_second * seconds, 4)


def estimated_cost(price_per_second: float | None, source_seconds: float | None) -> float | None:
    """Before the task runs: the output lasts about as long as the dance video."""
    return cost(price_per_second, source_seconds)


ALL_ACCOUNTS = "*"  # a budget for every account not named on its own


def budget_for(budgets: Mapping[str, float], account: str) -> float | None:
    """The account's daily budget in CNY (DAILY_BUDGET_CNY), or None: no budget."""
    return budgets.get(account, budgets.get(ALL_ACCOUNTS))


def utc_day(ts: float) -> str:
    """The UTC day of a timestamp (a budget's day), YYYY-MM-DD."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def next_utc_midnight(ts: float) -> float:
    """When the next UTC day (and its budget) begins."""
    day = datetime.fromtimestamp(ts, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + timedelta(days=1)).timestamp()


def budget_reached(budget: float | None, spent: float) -> bool:
    return budget is not None and spent >= budget
