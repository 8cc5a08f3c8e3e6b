"""Time and quotas: a clock tests can move forward, and token buckets keyed by account and model."""

from __future__ import annotations

import time


class Clock:
    """Wall-clock time plus an offset that the admin API can advance (for expiry and retention tests)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Buckets:
    """Token buckets: ``rate`` tokens a second, holding at most ``max(rate, 1)``.

    With rate 1 that is one request a second and no burst, which is how DashScope answers a second
    submit inside the same second.
    """

    def __init__(self) -> None:
        self._state: dict[tuple[str, ...], tuple[float, float]] = {}

    def take(self, key: tuple[str, ...], rate: float, now: float) -> bool:
        if rate <= 0:
            return True  # 0 means unlimited
        capacity = max(rate, 1.0)
        tokens, stamp = self._state.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - stamp) * rate)
        if tokens < 1.0:
            self._state[key] = (tokens, now)
            return False
        self._state[key] = (tokens - 1.0, now)
        return True

    def clear(self) -> None:
        self._state.clear()
