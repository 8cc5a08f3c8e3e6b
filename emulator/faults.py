"""Fault injection: random shares of failing requests and tasks, one-shot queued faults, URL triggers.

Route groups a fault can target: ``submit`` (both async endpoints), ``detect``, ``query`` (task
query), ``list``, ``cancel``, ``policy`` (upload policy), ``upload`` (the upload sink), ``video``
(downloading a result), or ``any``.

Fault kinds:

* ``500`` -> 500 ``InternalError``; ``503`` -> 503 ``ModelUnavailable``; ``429`` -> 429
  ``Throttling.RateQuota``. Nothing is done: no task is created.
* ``drop``: the connection is closed before the request is handled; nothing is done.
* ``drop_after``: the request is handled (a submit creates its task) and then the connection is
  closed without an answer: the ambiguous submission.
* ``slow``: the answer comes ``seconds`` late, before anything is done.
* ``slow_after``: the request is handled at once and the answer is held back ``seconds``.
* ``truncate`` (``video`` only): the full ``Content-Length`` is announced, half the body is sent,
  then the connection is closed: a download that ends short.
* ``403``: refused before anything is done. On ``video`` an OSS ``AccessDenied`` that does *not*
  say the request expired (a bucket-policy blip, a proxy); elsewhere DashScope's
  ``AccessDenied``.
* ``502_after`` / ``504_after``: the request is handled (a submit creates its task, and is
  paid), then a gateway answers 502 Bad Gateway / 504 Gateway Timeout with an HTML page.
* ``garbled_after``: the request is handled, then the answer is HTTP 200 with a body that is
  not DashScope's JSON.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROUTES = frozenset(
    {"submit", "detect", "query", "list", "cancel", "policy", "upload", "video", "any"}
)
KINDS = frozenset(
    {"500", "503", "429", "403", "drop", "drop_after", "slow", "slow_after", "truncate",
     "502_after", "504_after", "garbled_after"}
)  # fmt: skip
RANDOM_KINDS = ("500", "503", "429", "403", "drop", "slow", "drop_after", "slow_after",
                "502_after", "504_after", "garbled_after")  # fmt: skip
AFTER_KINDS = frozenset({"drop_after", "slow_after", "502_after", "504_after", "garbled_after"})


@dataclass(frozen=True)
class Fault:
    kind: str
    seconds: float = 0.0


class FaultError(ValueError):
    """A fault description that makes no sense."""


@dataclass
class FaultPlan:
    """What is to go wrong. Queued one-shot faults win over random ones."""

    rates: dict[str, float] = field(default_factory=dict)  # kind -> share of requests
    routes: frozenset[str] = frozenset({"any"})
    slow_seconds: float = 2.0
    task_fail_rate: float = 0.0
    task_fail_code: str = "InternalError.Algo"
    queued: dict[str, deque[Fault]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=random.Random)

    def configure(self, body: dict[str, Any]) -> None:
        """Apply ``PUT /_emulator/faults``: any of rates, routes, slow_seconds, task_fail_*."""
        rates = body.get("rates", self.rates)
        if not isinstance(rates, dict) or any(
            k not in RANDOM_KINDS or not isinstance(v, int | float) or not 0 <= v <= 1
            for k, v in rates.items()
        ):
            raise FaultError(f"rates maps {sorted(RANDOM_KINDS)} to shares between 0 and 1")
        if sum(rates.values()) > 1:
            raise FaultError("the shares in rates add up to more than 1")
        routes = body.get("routes", sorted(self.routes))
        if not isinstance(routes, list) or not set(routes) <= ROUTES or not routes:
            raise FaultError(f"routes is a non-empty list drawn from {sorted(ROUTES)}")
        fail_rate = body.get("task_fail_rate", self.task_fail_rate)
        if not isinstance(fail_rate, int | float) or not 0 <= fail_rate <= 1:
            raise FaultError("task_fail_rate is a share between 0 and 1")
        fail_code = body.get("task_fail_code", self.task_fail_code)
        if not isinstance(fail_code, str) or not fail_code:
            raise FaultError("task_fail_code is a DashScope error code")
        slow = body.get("slow_seconds", self.slow_seconds)
        if not isinstance(slow, int | float) or slow < 0:
            raise FaultError("slow_seconds is a non-negative number")
        self.rates = {k: float(v) for k, v in rates.items()}
        self.routes = frozenset(routes)
        self.task_fail_rate = float(fail_rate)
        self.task_fail_code = fail_code
        self.slow_seconds = float(slow)
        if "seed" in body:
            self.rng.seed(body["seed"])

    def enqueue(self, body: dict[str, Any]) -> None:
        """Apply ``POST /_emulator/faults/next``: the next ``count`` requests to ``route`` fail."""
        route, kind = body.get("route", "any"), body.get("kind")
        count, seconds = body.get("count", 1), body.get("seconds", self.slow_seconds)
        if route not in ROUTES:
            raise FaultError(f"route must be one of {sorted(ROUTES)}")
        if kind not in KINDS:
            raise FaultError(f"kind must be one of {sorted(KINDS)}")
        if not isinstance(count, int) or count < 1:
            raise FaultError("count is a positive integer")
        if not isinstance(seconds, int | float) or seconds < 0:
            raise FaultError("seconds is a non-negative number")
        queue = self.queued.setdefault(route, deque())
        queue.extend(Fault(kind, float(seconds)) for _ in range(count))

    def reset(self) -> None:
        self.rates = {}
        self.routes = frozenset({"any"})
        self.task_fail_rate = 0.0
        self.task_fail_code = "InternalError.Algo"
        self.queued.clear()

    def pick(self, route: str) -> Fault | None:
        """The fault for this request, if any (consumes a queued one)."""
        for key in (route, "any"):
            queue = self.queued.get(key)
            if queue:
                return queue.popleft()
        if not self.rates or not ({route, "any"} & self.routes):
            return None
        draw = self.rng.random()
        for kind in RANDOM_KINDS:
            share = self.rates.get(kind, 0.0)
            if draw < share:
                return Fault(kind, self.slow_seconds)
            draw -= share
        return None

    def task_failure(self, trigger: str | None) -> str | None:
        """The code a new task is to fail with: the URL trigger first, then the random share."""
        if trigger:
            return trigger
        if self.task_fail_rate and self.rng.random() < self.task_fail_rate:
            return self.task_fail_code
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "rates": self.rates,
            "routes": sorted(self.routes),
            "slow_seconds": self.slow_seconds,
            "task_fail_rate": self.task_fail_rate,
            "task_fail_code": self.task_fail_code,
            "queued": {r: [f.__dict__ for f in q] for r, q in self.queued.items() if q},
        }


def url_trigger(url: str, name: str) -> str | None:
    """A deterministic trigger carried in an input URL's query: ``?emulator_fail=InternalError.Algo``."""
    try:
        values = parse_qs(urlsplit(url).query).get(name)
    except ValueError:
        return None
    return values[0] if values else None
