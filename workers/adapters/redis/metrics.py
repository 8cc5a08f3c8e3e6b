"""Prometheus metrics of our own, kept in Redis so that every worker process on every host adds to
the same numbers; one exporter serves them.

This module owns the metric definitions (:data:`METRICS`), the writers' side
(:class:`RedisMetrics`, and :class:`NoMetrics` that records nothing), the exporter's side
(:class:`RedisCollector`, read at scrape time) and the exporter itself (:func:`serve`, run by
``animate-queue metrics``). Workers never open a port: the numbers live in Redis, so they add up
across processes and hosts and survive a worker's restart.

Keys (``P`` is the configured prefix). None of them expires:

* ``P:m:jobs``        hash ``"<state>|<account>|<kind>"`` -> jobs in that state. The job store's
                      transition script keeps it (HINCRBY -1 on the old state, +1 on the new).
* ``P:m:c:<name>``    a counter: hash, field = the label values as a JSON array (in the declared
                      label order) -> the total (HINCRBYFLOAT).
* ``P:m:h:<name>``    a histogram: hash, field = JSON ``[label values..., bound]`` -> observations
                      in that bucket only (non-cumulative; ``bound`` is written the way Prometheus
                      writes ``le``, ``"+Inf"`` last), and ``[label values..., "sum"]`` -> the sum.

Read at scrape time and never written here: the governor's ``P:accounts`` (the lanes),
``P:acct:<lane>:depth`` and ``P:acct:<lane>:inflight``.

Decisions:

* Buckets are stored non-cumulative: an observation writes one bucket field and the sum, in one
  MULTI/EXEC round trip, so a scrape never sees a bucket without its sum. The collector makes the
  buckets cumulative and derives ``_count`` from the ``+Inf`` total, so the two always agree. A
  bound no longer in the definition (buckets changed) is folded into the next bound above it.
* Changing a metric's labels means renaming it: fields with another number of labels are skipped.
* When Redis fails during a scrape, :meth:`RedisCollector.collect` raises: the exporter answers
  HTTP 500 and Prometheus records ``up == 0`` for it. Reporting nothing, or zeros, would look like
  an idle fleet; a failed scrape is what the outage is.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Generic, Literal, Protocol, TypeVar

import redis
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from workers.adapters.redis.queues import RedisQueues
from workers.domain.routes import QUEUES

log = logging.getLogger(__name__)

NAMESPACE = "animate_queue_"
MAX_LABEL_LENGTH = 100
JOBS_FIELD_SEPARATOR = "|"  # never in a state, an account (NAME_RE) or a kind
WARN_INTERVAL_SECONDS = 60.0  # at most one warning a minute about failed writes, per process
Op = TypeVar("Op")  # one write, as a metrics backend applies it
# One write before a backend sees it: a metric, a field of its hash, the amount to add.
Write = tuple[str, str, float]

Kind = Literal["counter", "histogram", "gauge"]


@dataclass(frozen=True)
class MetricDef:
    """One metric. ``name`` is what writers pass; Prometheus sees ``animate_queue_<name>``.

    ``gauge`` metrics are read from Redis at scrape time and cannot be written through
    :class:`RedisMetrics`.
    """

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exposed_name(self) -> str:
        return NAMESPACE + self.name

    @property
    def sample_names(self) -> frozenset[str]:
        """The series names Prometheus stores for this metric."""
        base = self.exposed_name
        if self.kind == "histogram":
            return frozenset({base + "_bucket", base + "_sum", base + "_count"})
        return frozenset({base})


STEP_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400,
                28800, 86400)  # fmt: skip

JOBS = MetricDef(
    "jobs",
    "gauge",
    "Jobs in each state, as the job store counts them. Final states (STORED, FAILED, ...) are "
    "reported too: their counts only grow, one for every job that ever ended there.",
    ("state", "account", "kind"),
)
STEP_SECONDS = MetricDef(
    "step_seconds",
    "histogram",
    "Time a job spent in a state (step) before leaving it.",
    ("step", "kind"),
    STEP_BUCKETS,
)
COPY_DELAY_SECONDS = MetricDef(
    "copy_delay_seconds",
    "histogram",
    "From the remote task's end to the video stored in S3.",
    (),
    (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
EXPIRY_MARGIN_SECONDS = MetricDef(
    "expiry_margin_seconds",
    "histogram",
    "Time left on the 24 h video URL when the copy finished.",
    (),
    (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 43200, 64800, 86400),
)
COPY_BYTES_TOTAL = MetricDef(
    "copy_bytes_total", "counter", "Bytes of video copied into S3.", ("account",)
)
COPY_THROUGHPUT_MB_S = MetricDef(
    "copy_throughput_mb_s",
    "histogram",
    "Throughput of one finished copy, in megabytes (10^6 bytes) per second.",
    (),
    (1, 5, 10, 25, 50, 100, 200, 400, 800),
)
REMOTE_ERRORS_TOTAL = MetricDef(
    "remote_errors_total",
    "counter",
    "Errors DashScope answered (op: submit, query, cancel, list, detect, upload, template; "
    "code: DashScope's code, or HTTP<status>).",
    ("account", "op", "code"),
)
THROTTLED_TOTAL = MetricDef(
    "throttled_total", "counter", "429 answers from DashScope.", ("account", "op")
)
VIDEO_SECONDS_TOTAL = MetricDef(
    "video_seconds_total",
    "counter",
    "Billed seconds of video (usage.video_duration): the bill.",
    ("account", "producer", "kind"),
)
COST_CNY_TOTAL = MetricDef(
    "cost_cny_total",
    "counter",
    "What DashScope bills, in CNY: usage.video_duration times the model's price for the job's "
    "mode (the price recorded at submit).",
    ("account", "model"),
)
JOBS_FINISHED_TOTAL = MetricDef(
    "jobs_finished_total",
    "counter",
    "Jobs that reached a final state.",
    ("state", "account", "kind"),
)
QUEUE_DEPTH = MetricDef(
    "queue_depth", "gauge", "Jobs waiting in the local admission queue of a lane.", ("lane",)
)
INFLIGHT = MetricDef(
    "inflight", "gauge", "Admitted jobs holding or waiting for DashScope's slot.", ("lane",)
)
AT_RISK_SECONDS = 6 * 3600.0  # a paid video whose URL has less than this left is at risk
COPIES_AT_RISK = MetricDef(
    "copies_at_risk",
    "gauge",
    "Paid videos not yet stored (jobs COPYING) whose 24 h URL has less than 6 h left: each is "
    "a video about to be lost. Pages (deploy/prometheus/alerts.yml).",
    (),
)
COPY_URL_LEFT_SECONDS = MetricDef(
    "copy_url_left_seconds",
    "gauge",
    "Time left on the soonest-dying video URL among jobs not yet stored (no sample when none).",
    (),
)
REMOTE_TASKS_UNCLAIMED_TOTAL = MetricDef(
    "remote_tasks_unclaimed_total",
    "counter",
    "DashScope tasks found in an uncertain submit's window that no job could claim as its own "
    "(someone else used the key meanwhile): never adopted; each may be paid and unwatched.",
    ("account",),
)
WATCHDOG_RESUMES_TOTAL = MetricDef(
    "watchdog_resumes_total",
    "counter",
    "Steps the watchdog sent again (reason: lost, a message that vanished; died, a step whose "
    "worker died in it; timer, a deadline that was itself the wake-up).",
    ("reason", "step"),
)
REDIS_WRITES_UNREPLICATED_TOTAL = MetricDef(
    "redis_writes_unreplicated_total",
    "counter",
    "Protected writes (job transitions, new jobs, parked timers) acknowledged without the "
    "replicas REDIS_WAIT_REPLICAS asks for. reason: no_replica, the master had none connected "
    "(written, unprotected); timeout, a replica did not confirm within REDIS_WAIT_TIMEOUT_MS "
    "(the step stopped; the watchdog resumes the job).",
    ("reason",),
)
BROKER_QUEUE_LENGTH = MetricDef(
    "broker_queue_length",
    "gauge",
    "Messages waiting in a broker queue of the route table.",
    ("queue",),
)
BROKER_QUEUE_CONSUMERS = MetricDef(
    "broker_queue_consumers",
    "gauge",
    "Worker nodes that said in the last 30 s that they consume the queue. 0: every job that "
    "reaches this queue's step stops there.",
    ("queue",),
)
BROKER_QUEUE_OLDEST_SECONDS = MetricDef(
    "broker_queue_oldest_seconds",
    "gauge",
    "How long the queue's oldest message has been waiting (0 when empty); growing: its pool "
    "cannot keep up, or nobody consumes it.",
    ("queue",),
)
TIMERS_PARKED = MetricDef(
    "timers_parked", "gauge", "Wake-ups parked in the Redis timer (P:timers), due or not.", ()
)
TIMERS_OVERDUE_SECONDS = MetricDef(
    "timers_overdue_seconds",
    "gauge",
    "How long the oldest parked wake-up has been due without a dispatcher sending it (0 when "
    "none is due). Above a few seconds, no worker is dispatching.",
    (),
)

METRICS: Mapping[str, MetricDef] = {
    m.name: m
    for m in (
        JOBS,
        STEP_SECONDS,
        COPY_DELAY_SECONDS,
        EXPIRY_MARGIN_SECONDS,
        COPY_BYTES_TOTAL,
        COPY_THROUGHPUT_MB_S,
        REMOTE_ERRORS_TOTAL,
        THROTTLED_TOTAL,
        VIDEO_SECONDS_TOTAL,
        COST_CNY_TOTAL,
        JOBS_FINISHED_TOTAL,
        QUEUE_DEPTH,
        INFLIGHT,
        TIMERS_PARKED,
        TIMERS_OVERDUE_SECONDS,
        WATCHDOG_RESUMES_TOTAL,
        REMOTE_TASKS_UNCLAIMED_TOTAL,
        REDIS_WRITES_UNREPLICATED_TOTAL,
        COPIES_AT_RISK,
        COPY_URL_LEFT_SECONDS,
        BROKER_QUEUE_LENGTH,
        BROKER_QUEUE_CONSUMERS,
        BROKER_QUEUE_OLDEST_SECONDS,
    )
}
_WRITTEN = tuple(m for m in METRICS.values() if m.kind != "gauge")
MAX_PRODUCER_LABELS = 100  # distinct producer label values; the rest are counted as "other"
OTHER_LABEL = "other"
_ADMIT_LABEL = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""
_AT_ONCE = frozenset({VIDEO_SECONDS_TOTAL.name, COST_CNY_TOTAL.name, JOBS_FINISHED_TOTAL.name})


def sanitise_label(value: object) -> str:
    """A label value safe anywhere: printable, no quote or backslash, at most 100 characters."""
    text = value if isinstance(value, str) else str(value)
    text = text[:MAX_LABEL_LENGTH]
    return "".join(c if c.isprintable() and c not in '"\\' else "_" for c in text)


def jobs_field(state: str, account: str, kind: str) -> str:
    """The ``P:m:jobs`` field of one (state, account, kind), as the transition script writes it."""
    return JOBS_FIELD_SEPARATOR.join((state, account, kind))


def counter_key(prefix: str, name: str) -> str:
    return f"{prefix}:m:c:{name}"


def histogram_key(prefix: str, name: str) -> str:
    return f"{prefix}:m:h:{name}"


def jobs_key(prefix: str) -> str:
    return f"{prefix}:m:jobs"


def _lookup(name: str, kind: Kind) -> MetricDef:
    metric = METRICS.get(name)
    if metric is None:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}")
    if metric.kind != kind:
        raise ValueError(f"metric {name!r} is a {metric.kind}, not a {kind}")
    return metric


def _label_values(metric: MetricDef, labels: Mapping[str, object]) -> list[str]:
    if set(labels) != set(metric.labels):
        raise ValueError(
            f"metric {metric.name!r} takes labels {sorted(metric.labels)}, got {sorted(labels)}"
        )
    return [sanitise_label(labels[n]) for n in metric.labels]


def _field(parts: list[str]) -> str:
    # JSON of the whole tuple: no separator a label value could contain, so no two collide.
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes ``le`` ("0.5", "60.0", "+Inf")."""
    return "+Inf" if bound == math.inf else repr(float(bound))


def _bucket_bound(metric: MetricDef, value: float) -> str:
    index = bisect.bisect_left(metric.buckets, value)
    bound = metric.buckets[index] if index < len(metric.buckets) else math.inf
    return _le(bound)


class Metrics(Protocol):
    """What the pipeline needs to record metrics."""

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None: ...

    def observe(self, name: str, value: float, **labels: str) -> None: ...


class NoMetrics:
    """Records nothing (tests, producers), but checks names and labels like :class:`RedisMetrics`
    so a misspelt metric fails in unit tests too."""

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        _label_values(_lookup(name, "counter"), labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        _label_values(_lookup(name, "histogram"), labels)


def _forked(writer: weakref.ref[MetricsWriter[Any]]) -> None:
    found = writer()
    if found is not None:
        found._after_fork()


class MetricsWriter(Generic[Op]):
    """What every metrics writer does the same way, whatever holds the numbers: the checks of a
    name, its labels and its value, the producer-label cap, batching a thread's writes to the end
    of a block (the bill and the outcomes never held), holding batches in this process for up to
    ``flush_seconds`` and sending them summed, and the rate-limited warning about dropped writes.
    A backend says how to add to a counter or a histogram field (``_incr``), how to apply a list
    of such writes (``_send``) and how producer labels are admitted.

    Decision (``METRICS_FLUSH_SECONDS``, bench/overhead.py): with ``flush_seconds`` > 0 a batch's
    writes go into this process's running sums; the sums are sent in one transaction when a
    batch ends at least ``flush_seconds`` after the last send, else by a background thread
    ``flush_seconds`` later, and by :meth:`flush` (the worker calls it when a pool process
    exits). A busy worker then sends about one metrics transaction a second instead of one per
    task (four per job). What it costs: a process killed with SIGKILL loses at most its last
    ``flush_seconds`` of step histograms and counters. Never the bill or the outcomes: those are
    written at once, whatever the setting. ``flush_seconds`` = 0 sends each batch at its end.
    """

    def __init__(
        self, *, max_producers: int = MAX_PRODUCER_LABELS, flush_seconds: float = 0.0
    ) -> None:
        self.max_producers = max_producers
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._last_warning = -math.inf
        self._dropped = 0
        self._local = threading.local()
        self._held: dict[tuple[str, str], float] = {}
        self._last_flush = time.monotonic()
        self._flusher: threading.Timer | None = None
        # A forked child starts with its own lock and nothing held: the parent's sums are the
        # parent's to send, and a lock its timer held at the fork would never be released here.
        mine = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forked(mine))

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._held, self._flusher = {}, None

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add ``amount`` (>= 0) to a counter."""
        metric = _lookup(name, "counter")
        _label_values(metric, labels)  # a wrong label set raises before anything is written
        if "producer" in labels:
            labels = {**labels, "producer": self._producer(labels["producer"])}
        field = _field(_label_values(metric, labels))
        if not (math.isfinite(amount) and amount >= 0):
            self._drop(f"{name}: bad increment {amount!r}")
            return
        if amount == 0:
            return
        # The bill and the outcomes are written at once, even inside a batch: a worker killed
        # before the end of its task must not lose what was paid for.
        self._write([(name, field, float(amount))], at_once=name in _AT_ONCE)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Count one observation in a histogram."""
        metric = _lookup(name, "histogram")
        values = _label_values(metric, labels)
        if not math.isfinite(value):
            self._drop(f"{name}: bad observation {value!r}")
            return
        bucket, total = _field([*values, _bucket_bound(metric, value)]), _field([*values, "sum"])
        self._write([(name, bucket, 1), (name, total, float(value))])

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Hold this thread's writes and send them together at the end.

        The task layer wraps each Celery task in one: a job's step then costs one round trip for
        its metrics, not one per observation, or none when ``flush_seconds`` holds them for a
        later send (bench/overhead.py). Whatever the step raises, what it recorded is still
        sent. The bill (``video_seconds_total``) and ``jobs_finished_total`` are not held: they
        are written at once. A nested batch leaves the sending to the outer.
        """
        if getattr(self._local, "pending", None) is not None:
            yield
            return
        self._local.pending = []
        try:
            yield
        finally:
            pending, self._local.pending = self._local.pending, None
            if pending:
                self._hold_or_send(pending)

    def flush(self) -> None:
        """Send what this process holds now (a pool process calls it on its way out)."""
        with self._lock:
            held = self._take_held()
        if held:
            self._send_writes(held)

    def _write(self, writes: list[Write], *, at_once: bool = False) -> None:
        pending = getattr(self._local, "pending", None)
        if pending is not None and not at_once:
            pending.extend(writes)
        else:
            self._send_writes(writes)

    def _hold_or_send(self, writes: list[Write]) -> None:
        if self.flush_seconds <= 0:
            self._send_writes(writes)
            return
        with self._lock:
            for name, field, amount in writes:
                self._held[name, field] = self._held.get((name, field), 0) + amount
            if time.monotonic() - self._last_flush >= self.flush_seconds:
                due = self._take_held()
            else:
                due = []
                if self._flusher is None:
                    self._flusher = threading.Timer(self.flush_seconds, self.flush)
                    self._flusher.daemon = True
                    self._flusher.start()
        if due:
            self._send_writes(due)

    def _take_held(self) -> list[Write]:
        """The held sums, emptied (the caller holds the lock)."""
        held = [(name, field, amount) for (name, field), amount in self._held.items()]
        self._held = {}
        self._last_flush = time.monotonic()
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        return held

    def _send_writes(self, writes: list[Write]) -> None:
        self._send([self._incr(name, field, amount) for name, field, amount in writes])

    def _drop(self, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._dropped += 1
            if now - self._last_warning < WARN_INTERVAL_SECONDS:
                return
            self._last_warning, dropped, self._dropped = now, self._dropped, 0
        logging.getLogger(type(self).__module__).warning(  # the backend's own logger
            "metrics: %d write(s) dropped (best effort); last: %s", dropped, reason
        )

    def _producer(self, value: str) -> str:
        raise NotImplementedError

    def _incr(self, name: str, field: str, amount: float) -> Op:
        """Add ``amount`` to one field of a metric's hash (an int: a bucket's count)."""
        raise NotImplementedError

    def _send(self, ops: list[Op]) -> None:
        raise NotImplementedError


class RedisMetrics(MetricsWriter[Callable[[Any], None]]):
    """The writers' side: counters and histograms added up in Redis by every process.

    Best effort: metrics never break a job. A Redis error is logged (at most one WARNING a
    minute per process, with the number of writes dropped) and swallowed, and for
    ``pause_seconds`` afterwards writes are dropped without trying: during an outage a process
    spends at most one failed attempt per pause, not one per step. A value that is not finite,
    or a negative counter increment, is dropped the same way. An unknown metric name or a wrong
    set of labels is a programming error and raises :class:`ValueError`. A batch is sent as one
    transaction.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        pause_seconds: float = 5.0,
        max_producers: int = MAX_PRODUCER_LABELS,
        flush_seconds: float = 0.0,
    ) -> None:
        super().__init__(max_producers=max_producers, flush_seconds=flush_seconds)
        self.redis = client
        self.prefix = prefix
        self.pause_seconds = pause_seconds
        self._producers: set[str] = set()  # producers this process knows are labelled
        self._admit_label = client.register_script(_ADMIT_LABEL)
        self._paused_until = 0.0

    def _incr(self, name: str, field: str, amount: float) -> Callable[[Any], None]:
        metric = METRICS[name]
        key = (counter_key if metric.kind == "counter" else histogram_key)(self.prefix, name)
        if isinstance(amount, int):  # a bucket's count
            return lambda pipe: pipe.hincrby(key, field, amount)
        return lambda pipe: pipe.hincrbyfloat(key, field, amount)

    def _producer(self, value: str) -> str:
        """The producer as a label, or ``other`` once ``max_producers`` distinct ones are in
        use: producers choose the name, and every new one would be a new series for good."""
        if value in self._producers:
            return value
        try:
            admitted = self._admit_label(
                keys=[f"{self.prefix}:m:labels:producer"], args=[value, self.max_producers]
            )
        except redis.RedisError:
            return OTHER_LABEL
        if admitted:
            self._producers.add(value)
            return value
        return OTHER_LABEL

    def _send(self, ops: list[Callable[[Any], None]]) -> None:
        if self._paused():
            return
        try:
            # One write needs no MULTI/EXEC (the bill, an outcome): two commands fewer.
            pipe = self.redis.pipeline(transaction=len(ops) > 1)
            for op in ops:
                op(pipe)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)

    def _paused(self) -> bool:
        if time.monotonic() >= self._paused_until:
            return False
        with self._lock:
            self._dropped += 1
        return True

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._paused_until = time.monotonic() + self.pause_seconds
        self._drop(f"Redis: {exc}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_parts(raw: Any, n_labels: int) -> list[str] | None:
    try:
        parts = json.loads(_text(raw))
    except ValueError:
        return None
    if not (
        isinstance(parts, list)
        and len(parts) == n_labels
        and all(isinstance(p, str) for p in parts)
    ):
        return None
    return parts


class RedisCollector:
    """The exporter's side: reads every metric from Redis at scrape time, in two round trips
    (one pipeline for the metric hashes and the lanes, one for each lane's depth and inflight).

    A Redis error propagates (see the module docstring): the scrape fails with HTTP 500.
    """

    def __init__(self, client: redis.Redis, prefix: str, broker: redis.Redis | None = None) -> None:
        self.redis = client
        self.prefix = prefix
        # The broker's queues (and the workers' consumer heartbeats) live on the broker's Redis.
        self.queues = RedisQueues(broker if broker is not None else client, prefix=prefix)

    def describe(self) -> Iterator[Metric]:
        """The families without samples, so registering does not touch Redis."""
        for metric in METRICS.values():
            yield _family(metric)

    def collect(self) -> Iterator[Metric]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.smembers(f"{self.prefix}:accounts")
        pipe.zcard(f"{self.prefix}:timers")
        pipe.zrange(f"{self.prefix}:timers", 0, 0, withscores=True)
        pipe.time()
        pipe.zrange(f"{self.prefix}:expiring", 0, 0, withscores=True)
        pipe.hgetall(jobs_key(self.prefix))
        for metric in _WRITTEN:
            if metric.kind == "counter":
                pipe.hgetall(counter_key(self.prefix, metric.name))
            else:
                pipe.hgetall(histogram_key(self.prefix, metric.name))
        raw_lanes, parked, oldest, (secs, micros), soonest, raw_jobs, *written = pipe.execute()
        now = float(secs) + float(micros) / 1e6
        at_risk = int(self.redis.zcount(f"{self.prefix}:expiring", "-inf", now + AT_RISK_SECONDS))

        lanes = sorted({_text(lane) for lane in raw_lanes})
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.get(f"{self.prefix}:acct:{lane}:depth")
            pipe.scard(f"{self.prefix}:acct:{lane}:inflight")
        per_lane = pipe.execute() if lanes else []

        families: list[Metric] = [_jobs_family(raw_jobs)]
        for metric, fields in zip(_WRITTEN, written, strict=True):
            if metric.kind == "counter":
                families.append(_counter_family(metric, fields))
            else:
                families.append(_histogram_family(metric, fields))
        depth, inflight = _gauge(QUEUE_DEPTH), _gauge(INFLIGHT)
        for i, lane in enumerate(lanes):
            name = sanitise_label(lane)
            depth.add_metric([name], _number(per_lane[2 * i]))
            inflight.add_metric([name], _number(per_lane[2 * i + 1]))
        families += [depth, inflight]
        # Redis's clock, which the dispatchers' due times are compared with (hosts kept in sync)
        overdue = max(0.0, now - float(oldest[0][1])) if oldest else 0.0
        for metric, value in ((TIMERS_PARKED, float(parked)), (TIMERS_OVERDUE_SECONDS, overdue)):
            gauge = _gauge(metric)
            gauge.add_metric([], value)
            families.append(gauge)
        risk = _gauge(COPIES_AT_RISK)
        risk.add_metric([], float(at_risk))
        left = _gauge(COPY_URL_LEFT_SECONDS)
        if soonest:
            left.add_metric([], float(soonest[0][1]) - now)
        families += [risk, left]
        length, consumers, oldest = (
            _gauge(BROKER_QUEUE_LENGTH),
            _gauge(BROKER_QUEUE_CONSUMERS),
            _gauge(BROKER_QUEUE_OLDEST_SECONDS),
        )
        for state in self.queues.sample(QUEUES):
            length.add_metric([state.name], float(state.length))
            consumers.add_metric([state.name], float(state.consumers))
            oldest.add_metric([state.name], state.oldest_seconds)
        families += [length, consumers, oldest]
        yield from families


def _family(metric: MetricDef) -> Metric:
    if metric.kind == "counter":
        return _counter(metric)
    if metric.kind == "histogram":
        return _histogram(metric)
    return _gauge(metric)


def _counter(metric: MetricDef) -> CounterMetricFamily:
    return CounterMetricFamily(metric.exposed_name, metric.help, labels=metric.labels)


def _histogram(metric: MetricDef) -> HistogramMetricFamily:
    return HistogramMetricFamily(metric.exposed_name, metric.help, labels=metric.labels)


def _gauge(metric: MetricDef) -> GaugeMetricFamily:
    return GaugeMetricFamily(metric.exposed_name, metric.help, labels=metric.labels)


def _number(raw: Any) -> float:
    if raw is None:
        return 0.0
    try:
        return float(_text(raw))
    except ValueError:
        return 0.0


def _jobs_family(fields: Mapping[Any, Any]) -> GaugeMetricFamily:
    family = _gauge(JOBS)
    for raw_field, raw_count in sorted(fields.items()):
        state, sep, rest = _text(raw_field).partition(JOBS_FIELD_SEPARATOR)
        account, sep2, kind = rest.rpartition(JOBS_FIELD_SEPARATOR)
        if not (sep and sep2):
            continue
        labels = [sanitise_label(state), sanitise_label(account), sanitise_label(kind)]
        family.add_metric(labels, _number(raw_count))
    return family


def _counter_family(metric: MetricDef, fields: Mapping[Any, Any]) -> CounterMetricFamily:
    family = _counter(metric)
    for raw_field, raw_value in sorted(fields.items()):
        labels = _parse_parts(raw_field, len(metric.labels))
        if labels is not None:
            family.add_metric(labels, _number(raw_value))
    return family


def _histogram_family(metric: MetricDef, fields: Mapping[Any, Any]) -> HistogramMetricFamily:
    bounds = (*metric.buckets, math.inf)
    series: dict[tuple[str, ...], tuple[list[float], list[float]]] = {}
    for raw_field, raw_value in fields.items():
        parts = _parse_parts(raw_field, len(metric.labels) + 1)
        if parts is None:
            continue
        counts, total = series.setdefault(tuple(parts[:-1]), ([0.0] * len(bounds), [0.0]))
        if parts[-1] == "sum":
            total[0] += _number(raw_value)
            continue
        try:
            bound = float(parts[-1])
        except ValueError:
            continue
        counts[min(bisect.bisect_left(bounds, bound), len(bounds) - 1)] += _number(raw_value)
    family = _histogram(metric)
    for labels, (counts, total) in sorted(series.items()):
        running, buckets = 0.0, []
        for bound, count in zip(bounds, counts, strict=True):
            running += count
            buckets.append((_le(bound), running))
        family.add_metric(list(labels), buckets, total[0])
    return family


def make_app_registry(
    client: redis.Redis, prefix: str, broker: redis.Redis | None = None
) -> CollectorRegistry:
    """A registry holding only our Redis-backed metrics."""
    registry = CollectorRegistry()
    registry.register(RedisCollector(client, prefix, broker))
    return registry


def serve(
    redis_url: str,
    prefix: str,
    *,
    addr: str,
    port: int,
    stop: threading.Event | None = None,
    broker_url: str | None = None,
    client: redis.Redis | None = None,
) -> None:
    """Run the exporter until SIGTERM or SIGINT (or ``stop`` is set): ``GET /metrics`` on
    ``addr:port`` reads Redis (``client``, e.g. through Sentinel; else ``redis_url``'s). The
    exporter's own ``process_*`` metrics come along (cheap: /proc). Signal handlers are
    installed only when called from the main thread."""
    # Timeouts keep a hung Redis from holding a scrape past Prometheus's own timeout.
    if client is None:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=3, socket_timeout=5)
    broker = None
    if (
        broker_url
        and broker_url != redis_url
        and broker_url.startswith(("redis:", "rediss:", "unix:"))
    ):
        broker = redis.Redis.from_url(broker_url, socket_connect_timeout=3, socket_timeout=5)
    registry = make_app_registry(client, prefix, broker)
    ProcessCollector(registry=registry)
    done = stop if stop is not None else threading.Event()
    restore = _stop_on_signals(done)
    server, thread = start_http_server(port, addr, registry=registry)
    log.info("metrics exporter on http://%s:%d/metrics (prefix %s)", addr, port, prefix)
    try:
        while not done.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        restore()
        client.close()
        log.info("metrics exporter stopped")


def _stop_on_signals(done: threading.Event) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for s, old in previous.items():
            signal.signal(s, old)

    return restore
