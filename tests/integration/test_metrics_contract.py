"""The metrics contract, run on InMemoryMetrics and RedisMetrics alike: counters add up across
calls and writers, labels are kept apart, observations land in their buckets, a batch holds its
writes to its end and loses none, and bad names or labels raise the same way on both.

Each twin is read the way the exporter reads it: its families (RedisCollector's for Redis, the
twin's own ``collect()`` in memory) through a registry, as Prometheus text. Only the counters and
histograms are compared: the gauges are read from other parts of Redis (test_metrics_redis.py).

Redis is the real one at ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Each test works
under its own ``test-<uuid>`` key prefix and deletes exactly those keys afterwards (never FLUSHDB).
Two writers on one Redis stand for two processes; in memory, two writers over one MetricsState.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from workers.adapters.memory.metrics import InMemoryMetrics, MetricsState
from workers.adapters.redis.metrics import (
    METRICS,
    STEP_BUCKETS,
    RedisCollector,
    RedisMetrics,
)

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
WRITTEN = [m for m in METRICS.values() if m.kind != "gauge"]

Writer = InMemoryMetrics | RedisMetrics


@dataclass
class Twin:
    """One implementation: a new writer over its one store each call, and its families."""

    name: str
    writer: Callable[..., Writer]
    families: Callable[[], Iterable[Metric]]
    logger: str  # where its warnings go


class _Written:
    """A collector serving a twin's counter and histogram families only."""

    def __init__(self, twin: Twin) -> None:
        self.twin = twin

    def collect(self) -> Iterator[Metric]:
        for family in self.twin.families():
            if family.type in ("counter", "histogram"):
                yield family


def exposition(twin: Twin) -> str:
    registry = CollectorRegistry()
    registry.register(_Written(twin))
    return generate_latest(registry).decode()


def scrape(twin: Twin) -> dict[str, list[Sample]]:
    """Every sample the twin serves, by sample name, through the text format."""
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(exposition(twin)):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if s.labels == labels]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def buckets(samples: dict[str, list[Sample]], name: str, **labels: str) -> dict[str, float]:
    """A histogram series' cumulative buckets, ``le`` -> count."""
    return {
        s.labels["le"]: s.value
        for s in samples.get(f"{name}_bucket", [])
        if {k: v for k, v in s.labels.items() if k != "le"} == labels
    }


@pytest.fixture
def redis_twin(redis_client: redis.Redis) -> Iterator[Twin]:
    prefix = f"test-{uuid.uuid4().hex}"
    clients: list[redis.Redis] = []

    def writer(**kwargs: Any) -> RedisMetrics:
        own = redis.Redis.from_url(REDIS_URL)  # a client of its own, as another process has
        clients.append(own)
        return RedisMetrics(own, prefix, **kwargs)

    yield Twin(
        "redis",
        writer,
        lambda: RedisCollector(redis_client, prefix).collect(),
        "workers.adapters.redis.metrics",
    )
    for own in clients:
        own.close()
    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=500))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def memory_twin() -> Twin:
    state = MetricsState()  # what one Redis is to several processes

    def writer(**kwargs: Any) -> InMemoryMetrics:
        return InMemoryMetrics(state, **kwargs)

    return Twin(
        "memory",
        writer,
        lambda: InMemoryMetrics(state).collect(),
        "workers.adapters.memory.metrics",
    )


@pytest.fixture(params=["memory", "redis"])
def twin(request: pytest.FixtureRequest) -> Twin:
    found: Twin = request.getfixturevalue(f"{request.param}_twin")
    return found


# ----------------------------------------------------------------------------------- counters


def test_counters_add_up_across_calls_and_writers(twin: Twin) -> None:
    first, second = twin.writer(), twin.writer()
    for _ in range(50):
        first.inc("copy_bytes_total", 1000, account="main")
        second.inc("copy_bytes_total", 1000, account="main")
    errors: dict[str, Any] = {"account": "main", "op": "submit", "code": "Throttling.RateQuota"}
    for _ in range(10):
        first.inc("remote_errors_total", **errors)  # amount 1 by default
    second.inc("remote_errors_total", 2.5, **errors)
    twin.writer().inc("copy_bytes_total", 7, account="main")  # one that started later adds too
    s = scrape(twin)
    assert value(s, "animate_queue_copy_bytes_total", account="main") == 100_007
    assert value(s, "animate_queue_remote_errors_total", **errors) == 12.5


def test_fractions_add_up_as_redis_adds_them(twin: Twin) -> None:
    """HINCRBYFLOAT adds decimal text and keeps 17 decimal places: 0.1 + 0.2 reads 0.3, not
    0.30000000000000004, and an amount below 1e-17 vanishes."""
    m = twin.writer()
    bill = {"account": "main", "producer": "shop", "kind": "video"}
    for amount in (0.1, 0.2):
        m.inc("video_seconds_total", amount, **bill)
    for amount in (4.2, 5.04, 1.1):
        twin.writer().inc("copy_bytes_total", amount, account="main")
    for _ in range(10):
        m.inc("throttled_total", 0.1, account="main", op="query")
    m.inc("throttled_total", 1e-20, account="tiny", op="query")
    for v in (0.1, 0.2):
        m.observe("copy_delay_seconds", v)
    s = scrape(twin)
    assert value(s, "animate_queue_video_seconds_total", **bill) == 0.3
    assert value(s, "animate_queue_copy_bytes_total", account="main") == 10.34
    assert value(s, "animate_queue_throttled_total", account="main", op="query") == 1.0
    assert value(s, "animate_queue_throttled_total", account="tiny", op="query") == 0.0
    assert value(s, "animate_queue_copy_delay_seconds_sum") == 0.3


def test_labels_are_kept_apart(twin: Twin) -> None:
    m = twin.writer()
    m.inc("remote_errors_total", 1, account="main", op="submit", code="A")
    m.inc("remote_errors_total", 2, account="main", op="submit", code="B")
    m.inc("remote_errors_total", 4, account="alt", op="submit", code="A")
    m.inc("remote_errors_total", 8, code="A", op="submit", account="main")  # any keyword order
    m.inc("throttled_total", 16, account="main", op="submit")
    s = scrape(twin)
    series = {
        (x.labels["account"], x.labels["op"], x.labels["code"]): x.value
        for x in s["animate_queue_remote_errors_total"]
    }
    assert series == {
        ("main", "submit", "A"): 9,
        ("main", "submit", "B"): 2,
        ("alt", "submit", "A"): 4,
    }
    assert value(s, "animate_queue_throttled_total", account="main", op="submit") == 16


def test_label_tuples_never_collide(twin: Twin) -> None:
    m = twin.writer()
    m.inc("remote_errors_total", account="a", op="b|c", code="d")
    m.inc("remote_errors_total", account="a|b", op="c", code="d")
    m.inc("remote_errors_total", account='a","b', op="c", code="d")
    s = scrape(twin)
    assert len(s["animate_queue_remote_errors_total"]) == 3


def test_label_values_are_sanitised(twin: Twin) -> None:
    m = twin.writer()
    m.inc("throttled_total", account='evil"\n} 1e9\\', op="x" * 500)
    s = scrape(twin)
    [sample] = s["animate_queue_throttled_total"]
    assert sample.labels == {"account": "evil__} 1e9_", "op": "x" * 100}
    assert sample.value == 1


def test_a_zero_increment_creates_no_series(twin: Twin) -> None:
    m = twin.writer()
    m.inc("copy_bytes_total", 0, account="idle")
    m.inc("copy_bytes_total", 3, account="busy")
    s = scrape(twin)
    assert [x.labels for x in s["animate_queue_copy_bytes_total"]] == [{"account": "busy"}]


def test_producer_labels_are_capped_across_writers(twin: Twin) -> None:
    """Producers name themselves: past the cap (counted over every writer), new names are
    counted under "other"; the bill is kept whole, the series stop growing."""
    first, second = twin.writer(max_producers=2), twin.writer(max_producers=2)
    bill = {"account": "a", "kind": "video"}
    first.inc("video_seconds_total", 5.0, producer="shop", **bill)
    first.inc("video_seconds_total", 5.0, producer="billing", **bill)
    second.inc("video_seconds_total", 5.0, producer="spam-1", **bill)  # the cap is shared
    second.inc("video_seconds_total", 5.0, producer="billing", **bill)  # admitted by the first
    first.inc("video_seconds_total", 5.0, producer="spam-2", **bill)
    second.inc("video_seconds_total", 5.0, producer="shop", **bill)
    s = scrape(twin)
    bills = {x.labels["producer"]: x.value for x in s["animate_queue_video_seconds_total"]}
    assert bills == {"shop": 10.0, "billing": 10.0, "other": 10.0}


# --------------------------------------------------------------------------------- histograms


def test_observations_land_in_their_buckets_with_sum_and_count(twin: Twin) -> None:
    """``le`` is inclusive (a value on a bound counts there), below the first bound counts in
    the first, above the last only in +Inf; buckets are cumulative; writers add up."""
    first, second = twin.writer(), twin.writer()
    queued = {"step": "QUEUED", "kind": "video"}
    seen = [0.1, 0.05, -1.0, 3.0, 5.0, 86400.0, 86400.5]
    for i, v in enumerate(seen):
        (first if i % 2 else second).observe("step_seconds", v, **queued)
    first.observe("step_seconds", 2.0, step="COPYING", kind="video")
    s = scrape(twin)

    expected = {repr(float(b)): sum(1 for v in seen if v <= b) for b in STEP_BUCKETS}
    expected["+Inf"] = len(seen)
    assert buckets(s, "animate_queue_step_seconds", **queued) == expected
    assert value(s, "animate_queue_step_seconds_count", **queued) == len(seen)
    assert value(s, "animate_queue_step_seconds_sum", **queued) == 172807.65  # decimal sum

    copying = buckets(s, "animate_queue_step_seconds", step="COPYING", kind="video")
    assert copying["1.0"] == 0
    assert copying["2.0"] == copying["+Inf"] == 1
    assert value(s, "animate_queue_step_seconds_sum", step="COPYING", kind="video") == 2.0


def test_histograms_without_labels(twin: Twin) -> None:
    m = twin.writer()
    for v in (0.2, 7, 5000):
        m.observe("copy_delay_seconds", v)
    s = scrape(twin)
    cumulative = buckets(s, "animate_queue_copy_delay_seconds")
    assert (cumulative["0.5"], cumulative["5.0"], cumulative["10.0"]) == (1, 1, 2)
    assert (cumulative["3600.0"], cumulative["+Inf"]) == (2, 3)
    assert value(s, "animate_queue_copy_delay_seconds_count") == 3
    assert value(s, "animate_queue_copy_delay_seconds_sum") == 5007.2


def test_every_written_metric_is_served_empty_before_any_write(twin: Twin) -> None:
    families = {f.name: f for f in text_string_to_metric_families(exposition(twin))}
    assert set(families) == {m.exposed_name.removesuffix("_total") for m in WRITTEN}
    assert all(not f.samples for f in families.values())
    assert {families[m.exposed_name.removesuffix("_total")].type for m in WRITTEN} == {
        "counter",
        "histogram",
    }


# ------------------------------------------------------------------------------------ batches


def test_a_batch_holds_its_writes_to_its_end_and_loses_none(twin: Twin) -> None:
    m, other = twin.writer(), twin.writer()
    with m.batch():
        m.inc("copy_bytes_total", 10, account="main")
        m.observe("copy_delay_seconds", 3.0)
        other.inc("copy_bytes_total", 1, account="other")  # another writer is not held
        with m.batch():  # nested: the outer one sends
            m.inc("copy_bytes_total", 5, account="main")
            m.observe("copy_delay_seconds", 30.0)
        s = scrape(twin)
        assert [x.labels for x in s["animate_queue_copy_bytes_total"]] == [{"account": "other"}]
        assert "animate_queue_copy_delay_seconds_count" not in s
    s = scrape(twin)
    assert value(s, "animate_queue_copy_bytes_total", account="main") == 15
    assert value(s, "animate_queue_copy_delay_seconds_count") == 2
    assert value(s, "animate_queue_copy_delay_seconds_sum") == 33.0
    m.inc("copy_bytes_total", 1, account="main")  # outside a batch: written at once
    assert value(scrape(twin), "animate_queue_copy_bytes_total", account="main") == 16


def test_held_batches_are_summed_and_sent_together(twin: Twin) -> None:
    """METRICS_FLUSH_SECONDS: batches are summed in the process and sent together by a timer
    ``flush_seconds`` after the first one held, so an idle process does not sit on them; a batch
    ending when the interval since the last send has passed is sent at its end."""
    m = twin.writer(flush_seconds=0.3)
    for amount in (1, 2, 3):
        with m.batch():
            m.inc("copy_bytes_total", amount, account="main")
            m.observe("copy_delay_seconds", 3.0)
    assert "animate_queue_copy_bytes_total" not in scrape(twin)  # held, not lost: see below
    deadline = time.monotonic() + 5
    while "animate_queue_copy_bytes_total" not in scrape(twin):
        assert time.monotonic() < deadline, "the held writes were never sent"
        time.sleep(0.02)
    s = scrape(twin)
    assert value(s, "animate_queue_copy_bytes_total", account="main") == 6
    assert value(s, "animate_queue_copy_delay_seconds_count") == 3
    assert value(s, "animate_queue_copy_delay_seconds_sum") == 9.0
    assert buckets(s, "animate_queue_copy_delay_seconds")["5.0"] == 3
    time.sleep(0.35)
    with m.batch():
        m.observe("copy_delay_seconds", 30.0)
    s = scrape(twin)  # sent at the batch's end, no timer needed
    assert value(s, "animate_queue_copy_delay_seconds_count") == 4
    assert value(s, "animate_queue_copy_delay_seconds_sum") == 39.0


def test_flush_sends_what_is_held_and_the_bill_is_never_held(twin: Twin) -> None:
    m = twin.writer(flush_seconds=60)
    bill = {"account": "main", "producer": "p", "kind": "video"}
    with m.batch():
        m.inc("video_seconds_total", 4.0, **bill)
        m.inc("copy_bytes_total", 1, account="main")
    s = scrape(twin)
    assert value(s, "animate_queue_video_seconds_total", **bill) == 4.0
    assert "animate_queue_copy_bytes_total" not in s
    m.flush()  # what a pool process does on its way out
    assert value(scrape(twin), "animate_queue_copy_bytes_total", account="main") == 1
    m.flush()  # nothing held: nothing sent twice
    assert value(scrape(twin), "animate_queue_copy_bytes_total", account="main") == 1


def test_a_batch_holds_only_its_own_threads_writes(twin: Twin) -> None:
    m = twin.writer()
    with m.batch():
        m.inc("copy_bytes_total", 1, account="held")
        worker = threading.Thread(
            target=m.inc, args=("copy_bytes_total", 2), kwargs={"account": "free"}
        )
        worker.start()
        worker.join()
        s = scrape(twin)
        assert [x.labels for x in s["animate_queue_copy_bytes_total"]] == [{"account": "free"}]
    assert value(scrape(twin), "animate_queue_copy_bytes_total", account="held") == 1


def test_the_bill_and_the_outcomes_are_never_held(twin: Twin) -> None:
    """A worker killed before its batch ends must not lose what was paid for."""
    m = twin.writer()
    bill = {"account": "main", "producer": "p", "kind": "video"}
    outcome: dict[str, Any] = {"state": "STORED", "account": "main", "kind": "video"}
    with m.batch():
        m.inc("video_seconds_total", 4.0, **bill)
        m.inc("jobs_finished_total", **outcome)
        m.inc("copy_bytes_total", 1, account="main")
        s = scrape(twin)
        assert value(s, "animate_queue_video_seconds_total", **bill) == 4.0
        assert value(s, "animate_queue_jobs_finished_total", **outcome) == 1
        assert "animate_queue_copy_bytes_total" not in s
    assert value(scrape(twin), "animate_queue_copy_bytes_total", account="main") == 1


def test_writes_in_a_batch_whose_block_raises_are_still_recorded(twin: Twin) -> None:
    m = twin.writer()
    with pytest.raises(RuntimeError, match="the step failed"), m.batch():
        m.inc("copy_bytes_total", 10, account="main")
        with m.batch():
            m.observe("copy_delay_seconds", 3.0)
        raise RuntimeError("the step failed; its metrics still count")
    with pytest.raises(ValueError, match="unknown metric"), m.batch():
        m.inc("copy_bytes_total", 5, account="main")
        m.inc("copy_bytes", 1, account="main")  # a programming error still raises in a batch
    s = scrape(twin)
    assert value(s, "animate_queue_copy_bytes_total", account="main") == 15
    assert value(s, "animate_queue_copy_delay_seconds_count") == 1
    with m.batch():  # the batch ended: the next one starts empty and sends again
        m.inc("copy_bytes_total", 1, account="main")
    assert value(scrape(twin), "animate_queue_copy_bytes_total", account="main") == 16


# ------------------------------------------------------------------------------- bad writes


BAD_CALLS: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = [
    ("unknown metric", "inc", ("copy_bytes",), {"account": "main"}),
    ("unknown metric", "observe", ("copy_delay", 1.0), {}),
    ("not a counter", "inc", ("step_seconds",), {"step": "QUEUED", "kind": "video"}),
    ("not a counter", "inc", ("jobs",), {"state": "QUEUED", "account": "main", "kind": "video"}),
    ("not a histogram", "observe", ("copy_bytes_total", 1.0), {"account": "main"}),
    ("not a histogram", "observe", ("queue_depth", 1.0), {"lane": "main"}),
    ("takes labels", "inc", ("copy_bytes_total", 1.0), {}),
    ("takes labels", "inc", ("copy_bytes_total", 1.0), {"account": "main", "producer": "p"}),
    ("takes labels", "inc", ("video_seconds_total", 1.0), {"account": "a", "producer": "p"}),
    ("takes labels", "observe", ("copy_delay_seconds", 1.0), {"account": "main"}),
]


def test_unknown_names_and_wrong_labels_raise_and_record_nothing(twin: Twin) -> None:
    """A programming error, not an outage: ValueError on both, with the same message, before
    anything is written (not even a producer's place under the cap)."""
    m = twin.writer(max_producers=1)
    for match, method, args, labels in BAD_CALLS:
        with pytest.raises(ValueError, match=match):
            getattr(m, method)(*args, **labels)
        with pytest.raises(ValueError, match=match), m.batch():
            getattr(m, method)(*args, **labels)
    assert scrape(twin) == {}
    m.inc("video_seconds_total", 1.0, account="a", producer="q", kind="video")
    s = scrape(twin)
    assert [x.labels["producer"] for x in s["animate_queue_video_seconds_total"]] == ["q"]


def test_bad_values_are_dropped_with_one_warning(
    twin: Twin, caplog: pytest.LogCaptureFixture
) -> None:
    m = twin.writer()
    with caplog.at_level(logging.WARNING, logger=twin.logger):
        m.inc("copy_bytes_total", -5, account="main")
        m.inc("copy_bytes_total", float("nan"), account="main")
        m.inc("copy_bytes_total", float("inf"), account="main")
        m.observe("copy_delay_seconds", float("inf"))
        m.observe("copy_delay_seconds", float("nan"))
    assert scrape(twin) == {}
    warnings = [r for r in caplog.records if r.name == twin.logger]
    assert len(warnings) == 1  # at most one a minute
    assert "dropped" in warnings[0].getMessage()


# ------------------------------------------------------------------------------- both at once

WORKLOAD = [
    ("inc", ("copy_bytes_total", 123456789.25), {"account": "main"}),
    ("inc", ("copy_bytes_total", 0.1), {"account": "main"}),
    ("inc", ("remote_errors_total",), {"account": "a", "op": "query", "code": "HTTP503"}),
    ("inc", ("video_seconds_total", 4.2), {"account": "a", "producer": "p", "kind": "video"}),
    ("inc", ("video_seconds_total", 5.04), {"account": "a", "producer": "p", "kind": "video"}),
    ("inc", ("watchdog_resumes_total",), {"reason": "lost", "step": "poll"}),
    ("inc", ("jobs_finished_total",), {"state": "FAILED", "account": "a", "kind": "template"}),
    ("observe", ("step_seconds", 0.3), {"step": "SUBMITTED", "kind": "video"}),
    ("observe", ("step_seconds", 1e6), {"step": "SUBMITTED", "kind": "video"}),
    ("observe", ("copy_throughput_mb_s", 42.7), {}),
    ("observe", ("expiry_margin_seconds", 80000.1), {}),
]


def test_both_twins_serve_the_same_text_for_the_same_writes(
    memory_twin: Twin, redis_twin: Twin
) -> None:
    texts = []
    for twin in (memory_twin, redis_twin):
        first, second = twin.writer(), twin.writer()
        with second.batch():
            for i, (method, args, labels) in enumerate(WORKLOAD * 3):
                getattr(first if i % 2 else second, method)(*args, **labels)
        texts.append(exposition(twin))
    assert "animate_queue_copy_bytes_total" in texts[0]
    assert texts[0] == texts[1]
