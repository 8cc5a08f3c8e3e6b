"""Our Prometheus counters and histograms in memory: RedisMetrics' twin, held to the same contract
suite (tests/integration/test_metrics_contract.py).

It owns, in one process, what the ``P:m:c:<name>`` and ``P:m:h:<name>`` hashes hold in Redis
(:class:`MetricsState`: the totals, the non-cumulative bucket counts and sums, and the producers
admitted as labels), the writers' side over it (:class:`InMemoryMetrics`: ``inc``, ``observe``,
``batch``) and the exporter's side for those metrics (``collect``). Several writers over one
state add up as several processes on one Redis do. The metric definitions, the checks on names
and labels, the bucketing and the families served are the Redis module's own, imported from it,
so both twins yield the same Prometheus text for the same writes.

Not modelled: the gauges (``jobs``, ``queue_depth``, ...), which RedisCollector reads from other
parts of Redis at scrape time; and Redis failures (nothing here can fail, so nothing pauses).

Decision: a total grows the way Redis's ``HINCRBYFLOAT`` grows it, not as a Python float sum.
Redis adds the amount's decimal text in long double and keeps 17 decimal places, so
0.1 + 0.2 reads back 0.3 (a float sum gives 0.30000000000000004). The state adds the same
decimal text exactly and keeps 17 decimal places, which reads back as the same float.
"""

from __future__ import annotations

import decimal
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal

from prometheus_client.core import Metric

from workers.adapters.redis.metrics import (
    _WRITTEN,
    MAX_PRODUCER_LABELS,
    OTHER_LABEL,
    MetricsWriter,
    _counter_family,
    _family,
    _histogram_family,
)

# Enough digits for any finite float with its 17 decimal places (Redis's HINCRBYFLOAT output).
_CONTEXT = decimal.Context(prec=400)
_PLACES = Decimal("1e-17")


def _redis_sum(total: Decimal, amount: float) -> Decimal:
    """``total + amount`` as ``HINCRBYFLOAT`` leaves it: the amount as redis-py sends it (its
    shortest decimal text), the sum kept to 17 decimal places."""
    step = Decimal(amount) if isinstance(amount, int) else Decimal(repr(float(amount)))
    return _CONTEXT.add(total, step).quantize(_PLACES, context=_CONTEXT)


class MetricsState:
    """What one Redis holds for the metrics: per metric, the hash fields RedisMetrics writes
    (the same JSON fields, so the Redis module's family builders read them as they are), and the
    producer names admitted as labels. Share one between writers to add up like processes."""

    def __init__(self) -> None:
        self.hashes: dict[str, dict[str, Decimal]] = {m.name: {} for m in _WRITTEN}
        self.producers: set[str] = set()
        self.lock = threading.Lock()

    def apply(self, ops: list[Callable[[MetricsState], None]]) -> None:
        """Run ``ops`` as one step (MULTI/EXEC): a reader sees all of them or none."""
        with self.lock:
            for op in ops:
                op(self)

    def incr(self, name: str, field: str, amount: float) -> None:
        """HINCRBYFLOAT (the caller holds the lock)."""
        fields = self.hashes[name]
        fields[field] = _redis_sum(fields.get(field, Decimal(0)), amount)

    def snapshot(self) -> dict[str, dict[str, Decimal]]:
        with self.lock:
            return {name: dict(fields) for name, fields in self.hashes.items()}


class InMemoryMetrics(MetricsWriter[Callable[[MetricsState], None]]):
    """The writers' side over a :class:`MetricsState`, with RedisMetrics' semantics (the checks,
    batching and warnings are their shared :class:`MetricsWriter`'s).

    An unknown metric name or a wrong set of labels raises :class:`ValueError`; a value that is
    not finite, or a negative increment, is dropped with a warning (at most one a minute); a
    zero increment writes nothing. Past ``max_producers`` distinct producers (counted in the
    shared state), a new one is labelled ``other``. :meth:`batch` holds this thread's writes to
    its end, except the bill and the outcomes, which are written at once.
    """

    def __init__(
        self,
        state: MetricsState | None = None,
        *,
        max_producers: int = MAX_PRODUCER_LABELS,
        flush_seconds: float = 0.0,
    ) -> None:
        super().__init__(max_producers=max_producers, flush_seconds=flush_seconds)
        self.state = state if state is not None else MetricsState()

    def _incr(self, name: str, field: str, amount: float) -> Callable[[MetricsState], None]:
        return lambda state: state.incr(name, field, amount)

    def _send(self, ops: list[Callable[[MetricsState], None]]) -> None:
        self.state.apply(ops)

    def describe(self) -> Iterator[Metric]:
        """The families :meth:`collect` yields, without samples."""
        for metric in _WRITTEN:
            yield _family(metric)

    def collect(self) -> Iterator[Metric]:
        """The counters and histograms as RedisCollector yields them, from one snapshot."""
        hashes = self.state.snapshot()
        for metric in _WRITTEN:
            if metric.kind == "counter":
                yield _counter_family(metric, hashes[metric.name])
            else:
                yield _histogram_family(metric, hashes[metric.name])

    def _producer(self, value: str) -> str:
        with self.state.lock:
            if value in self.state.producers:
                return value
            if len(self.state.producers) >= self.max_producers:
                return OTHER_LABEL
            self.state.producers.add(value)
            return value
