"""What a job costs: DashScope bills per second of output video (``usage.video_duration``) at the
model's price for the job's mode. The price is recorded on the job at submit, so a later change
of the price table does not rewrite what was paid."""

from __future__ import annotations

CURRENCY = "CNY"


def cost(price_per_second: float | None, seconds: float | None) -> float | None:
    """``price x seconds``, in CNY to 0.0001; None when either is unknown."""
    if price_per_second is None or seconds is None:
        return None
    return round(price_per_second * seconds, 4)


def estimated_cost(price_per_second: float | None, source_seconds: float | None) -> float | None:
    """Before the task runs: the output lasts about as long as the dance video."""
    return cost(price_per_second, source_seconds)
