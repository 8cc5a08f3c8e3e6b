"""The tunable policies of the steps. They hold values and no defaults: bootstrap builds them
from settings, where each tunable has its one default."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: a delay drawn from [base*2^n / 2, base*2^n], capped."""

    base: float
    cap: float

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        try:
            grown = self.base * 2.0 ** max(0, attempt - 1)
        except OverflowError:  # a long run of attempts (poll errors under a long deadline)
            grown = math.inf
        ceiling = min(self.cap, grown)
        return ceiling / 2 + rand() * ceiling / 2


@dataclass(frozen=True)
class PollPolicy:
    """How often to ask about a remote task, and for how long."""

    first_delay: float  # after the submit
    running_interval: float  # PRE-PROCESSING, RUNNING, POST-PROCESSING
    pending_interval: float  # first interval while queued remotely...
    pending_max: float  # ...growing by half each time up to this
    deadline: float  # from submission; DashScope itself gives up after 3 h
    unknown_grace: int  # UNKNOWN answers in a row that end the job
    error_backoff: Backoff


@dataclass(frozen=True)
class CopyPolicy:
    """A copy is retried while its video URL lives, not a fixed number of times: S3 outages
    can outlast any count of backoffs, and a paid video is lost only when its URL dies."""

    lease_seconds: float  # a copy that stops renewing this long is resumed elsewhere
    backoff: Backoff
    expiry_margin: float  # the last retry starts this long before the URL's expiry
    attempt_seconds: float | None  # one attempt's budget; then it pauses and goes on


@dataclass(frozen=True)
class DetectPolicy:
    max_attempts: int
    attempt_seconds: float  # a detect call's timeouts plus a margin
    cache_seconds: int
    half_body: str  # HALF_BODY_WITHOUT_REF_BG: reject | warn
    backoff: Backoff


@dataclass(frozen=True)
class PreparePolicy:
    max_attempts: int
    attempt_seconds: float  # one download and probe of a dance video, at most
    recheck_seconds: float  # the watchdog looks at a job waiting for its template
    backoff: Backoff


@dataclass(frozen=True)
class WebhookPolicy:
    give_up_after: float  # seconds after the job ended
    backoff: Backoff


@dataclass(frozen=True)
class SubmitPolicy:
    max_attempts: int
    attempt_seconds: float  # the longest a POST may take (its timeouts) plus a margin
    backoff: Backoff
    list_lag: float  # an uncertain POST's task may take this long to show in the list
    clock_skew: float  # ours against DashScope's, around a POST's window
