"""Our Prometheus metrics in Redis: writers in several processes add up, the collector reads them
back as Prometheus families, the exporter answers over HTTP, and a dead Redis never breaks a job.

What the writers promise on either twin (sums, labels, buckets, batches, the producer cap, bad
names and values) is in test_metrics_contract.py; here is what only Redis has."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from workers.adapters.redis import metrics
from workers.adapters.redis.metrics import (
    METRICS,
    NoMetrics,
    RedisMetrics,
    jobs_field,
    jobs_key,
    make_app_registry,
)
from workers.domain.routes import QUEUES

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "animate-queue.json"


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(REDIS_URL)
    try:
        c.ping()
    except redis.RedisError:
        pytest.skip("no Redis at REDIS_URL")
    yield c
    c.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    p = f"test-metrics-{uuid.uuid4().hex[:8]}"
    yield p
    for key in client.scan_iter(f"{p}:*"):
        client.delete(key)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(client: redis.Redis, prefix: str) -> dict[str, list[Sample]]:
    """Every sample the collector yields, by sample name, through the text format."""
    text = generate_latest(make_app_registry(client, prefix)).decode()
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, []) if s.labels == labels]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


WRITER = textwrap.dedent(
    """
    import sys, redis
    from workers.adapters.redis.metrics import RedisMetrics
    m = RedisMetrics(redis.Redis.from_url(sys.argv[1]), sys.argv[2])
    for _ in range(50):
        m.inc("copy_bytes_total", 1000, account="main")
    for _ in range(10):
        m.inc("remote_errors_total", account="main", op="submit", code="Throttling.RateQuota")
    m.inc("video_seconds_total", 4.5, account="main", producer="shop", kind="video")
    for _ in range(20):
        m.observe("step_seconds", 3.0, step="QUEUED", kind="video")
    for v in (0.2, 7, 5000):
        m.observe("copy_delay_seconds", v)
    """
)


class TestAcrossProcesses:
    def test_counters_and_histograms_add_up(self, client: redis.Redis, prefix: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER, REDIS_URL, prefix], env=env)
            for _ in range(2)
        ]
        assert [p.wait(timeout=30) for p in procs] == [0, 0]

        s = scrape(client, prefix)
        assert value(s, "animate_queue_copy_bytes_total", account="main") == 100_000
        errors = {"account": "main", "op": "submit", "code": "Throttling.RateQuota"}
        assert value(s, "animate_queue_remote_errors_total", **errors) == 20
        bill = {"account": "main", "producer": "shop", "kind": "video"}
        assert value(s, "animate_queue_video_seconds_total", **bill) == 9.0

        step = {"step": "QUEUED", "kind": "video"}
        assert value(s, "animate_queue_step_seconds_bucket", le="2.0", **step) == 0
        assert value(s, "animate_queue_step_seconds_bucket", le="5.0", **step) == 40
        assert value(s, "animate_queue_step_seconds_bucket", le="+Inf", **step) == 40
        assert value(s, "animate_queue_step_seconds_count", **step) == 40
        assert value(s, "animate_queue_step_seconds_sum", **step) == 120.0

        # Cumulative: 0.2 -> le 0.5, 7 -> le 10, 5000 -> only +Inf; from two processes each.
        delay = "animate_queue_copy_delay_seconds"
        cumulative = {x.labels["le"]: x.value for x in s[f"{delay}_bucket"]}
        assert cumulative["0.5"] == 2
        assert cumulative["5.0"] == 2
        assert cumulative["10.0"] == 4
        assert cumulative["3600.0"] == 4
        assert cumulative["+Inf"] == 6
        assert list(cumulative.values()) == sorted(cumulative.values())
        assert value(s, f"{delay}_count") == 6
        assert value(s, f"{delay}_sum") == pytest.approx(2 * 5007.2)

        # Metric keys live under P:m: and never expire.
        keys = [k.decode() for k in client.scan_iter(f"{prefix}:*")]
        assert keys and all(k.startswith(f"{prefix}:m:") for k in keys)
        assert all(client.ttl(k) == -1 for k in keys)

    def test_empty_metrics_are_described_without_samples(
        self, client: redis.Redis, prefix: str
    ) -> None:
        text = generate_latest(make_app_registry(client, prefix)).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert set(families) == {
            m.exposed_name.removesuffix("_total") if m.kind == "counter" else m.exposed_name
            for m in METRICS.values()
        }
        timers = {
            "animate_queue_timers_parked",
            "animate_queue_timers_overdue_seconds",
            "animate_queue_copies_at_risk",
        }
        queues = {
            f"animate_queue_broker_queue_{n}" for n in ("length", "consumers", "oldest_seconds")
        }
        assert all(not f.samples for name, f in families.items() if name not in timers | queues)
        # the dispatchers' health is always reported: 0 parked, 0 s overdue
        # ... and so is the count of paid videos at risk: 0
        assert [[s.value for s in families[name].samples] for name in sorted(timers)] == [
            [0],
            [0],
            [0],
        ]
        # so is every routed queue's (the lists are shared on this Redis; the consumers are
        # counted under this test's prefix: none)
        for name in queues:
            assert {s.labels["queue"] for s in families[name].samples} == set(QUEUES)
        consumers = families["animate_queue_broker_queue_consumers"].samples
        assert [s.value for s in consumers] == [0, 0, 0]


class TestGaugesFromRedis:
    def test_jobs_gauge_reads_the_store_hash(self, client: redis.Redis, prefix: str) -> None:
        client.hset(
            jobs_key(prefix),
            mapping={
                jobs_field("QUEUED", "main", "video"): 3,
                jobs_field("STORED", "main", "video"): 7,
                jobs_field("SUBMITTED", "alt", "template"): 1,
                jobs_field("CANCELED", "alt", "video"): 0,
                "not-a-field": 5,
            },
        )
        s = scrape(client, prefix)
        jobs = {
            (x.labels["state"], x.labels["account"], x.labels["kind"]): x.value
            for x in s["animate_queue_jobs"]
        }
        assert jobs == {
            ("QUEUED", "main", "video"): 3,
            ("STORED", "main", "video"): 7,  # final states are reported: "jobs by state"
            ("SUBMITTED", "alt", "template"): 1,
            ("CANCELED", "alt", "video"): 0,
        }

    def test_queue_depth_and_inflight_by_lane(self, client: redis.Redis, prefix: str) -> None:
        client.sadd(f"{prefix}:accounts", "main", "main:template", "idle")
        client.set(f"{prefix}:acct:main:depth", 4)
        client.set(f"{prefix}:acct:main:template:depth", 1)
        client.sadd(f"{prefix}:acct:main:inflight", "j1", "j2")
        client.sadd(f"{prefix}:acct:main:template:inflight", "t1")
        s = scrape(client, prefix)
        assert value(s, "animate_queue_queue_depth", lane="main") == 4
        assert value(s, "animate_queue_queue_depth", lane="main:template") == 1
        assert value(s, "animate_queue_queue_depth", lane="idle") == 0
        assert value(s, "animate_queue_inflight", lane="main") == 2
        assert value(s, "animate_queue_inflight", lane="main:template") == 1
        assert value(s, "animate_queue_inflight", lane="idle") == 0

    def test_parked_wake_ups_and_how_overdue_the_oldest_is(
        self, client: redis.Redis, prefix: str
    ) -> None:
        """The dispatchers' health: parked wake-ups due long ago mean no worker sends them."""
        s = scrape(client, prefix)
        assert value(s, "animate_queue_timers_parked") == 0
        assert value(s, "animate_queue_timers_overdue_seconds") == 0
        secs, micros = client.time()
        now = secs + micros / 1e6
        client.zadd(f"{prefix}:timers", {"a": now - 42, "b": now + 100})
        s = scrape(client, prefix)
        assert value(s, "animate_queue_timers_parked") == 2
        assert 42 <= value(s, "animate_queue_timers_overdue_seconds") < 45
        client.zrem(f"{prefix}:timers", "a")
        assert value(scrape(client, prefix), "animate_queue_timers_overdue_seconds") == 0


class TestLabels:
    def test_bad_names_and_label_sets_raise(self, client: redis.Redis, prefix: str) -> None:
        for sink in (RedisMetrics(client, prefix), NoMetrics()):
            with pytest.raises(ValueError, match="unknown metric"):
                sink.inc("copy_bytes", account="main")
            with pytest.raises(ValueError, match="not a counter"):
                sink.inc("step_seconds", step="QUEUED", kind="video")
            with pytest.raises(ValueError, match="not a counter"):
                sink.inc("jobs", state="QUEUED", account="main", kind="video")
            with pytest.raises(ValueError, match="not a histogram"):
                sink.observe("copy_bytes_total", 1.0, account="main")
            with pytest.raises(ValueError, match="takes labels"):
                sink.inc("copy_bytes_total", 1.0)
            with pytest.raises(ValueError, match="takes labels"):
                sink.inc("copy_bytes_total", 1.0, account="main", producer="p")
            with pytest.raises(ValueError, match="takes labels"):
                sink.observe("copy_delay_seconds", 1.0, account="main")
        assert list(client.scan_iter(f"{prefix}:*")) == []

    def test_bad_values_are_dropped(self, client: redis.Redis, prefix: str) -> None:
        m = RedisMetrics(client, prefix)
        m.inc("copy_bytes_total", -5, account="main")
        m.inc("copy_bytes_total", float("nan"), account="main")
        m.observe("copy_delay_seconds", float("inf"))
        assert list(client.scan_iter(f"{prefix}:*")) == []

    def test_an_old_bucket_bound_folds_into_the_next(
        self, client: redis.Redis, prefix: str
    ) -> None:
        key = f"{prefix}:m:h:copy_delay_seconds"
        client.hset(key, mapping={'["3.0"]': 2, '["not-a-number"]': 9, "junk": 1, '["sum"]': 6})
        s = scrape(client, prefix)
        cumulative = {x.labels["le"]: x.value for x in s["animate_queue_copy_delay_seconds_bucket"]}
        assert cumulative["2.0"] == 0
        assert cumulative["5.0"] == 2
        assert cumulative["+Inf"] == 2
        assert value(s, "animate_queue_copy_delay_seconds_sum") == 6


class TestRedisDown:
    def test_writes_never_raise_and_warn_once(self, caplog: pytest.LogCaptureFixture) -> None:
        down = redis.Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0")
        m = RedisMetrics(down, "down", pause_seconds=0)
        with caplog.at_level(logging.WARNING, logger="workers.adapters.redis.metrics"):
            started = time.monotonic()
            for _ in range(3):
                m.inc("copy_bytes_total", 10, account="main")
                m.observe("step_seconds", 1.0, step="COPYING", kind="video")
            assert time.monotonic() - started < 5
        warnings = [r for r in caplog.records if r.name == "workers.adapters.redis.metrics"]
        assert len(warnings) == 1
        assert "dropped" in warnings[0].getMessage()
        down.close()

    def test_a_failed_write_pauses_the_next_ones(self, monkeypatch: pytest.MonkeyPatch) -> None:
        down = redis.Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0")
        m = RedisMetrics(down, "down", pause_seconds=60)
        m.inc("copy_bytes_total", 10, account="main")
        calls: list[object] = []
        monkeypatch.setattr(down, "hincrbyfloat", lambda *a: calls.append(a))
        m.inc("copy_bytes_total", 10, account="main")
        assert calls == []
        down.close()

    def test_a_scrape_fails_loudly(self) -> None:
        down = redis.Redis.from_url(f"redis://127.0.0.1:{closed_port()}/0")
        registry = make_app_registry(down, "down")  # registering does not touch Redis
        with pytest.raises(redis.ConnectionError):
            generate_latest(registry)
        down.close()


SERVE = textwrap.dedent(
    """
    import sys
    from workers.adapters.redis.metrics import serve
    serve(sys.argv[1], sys.argv[2], addr="127.0.0.1", port=int(sys.argv[3]))
    """
)


def test_serve_answers_over_http_and_stops_on_sigterm(client: redis.Redis, prefix: str) -> None:
    RedisMetrics(client, prefix).inc("copy_bytes_total", 42, account="main")
    port = closed_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, REDIS_URL, prefix, str(port)],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        body = ""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    assert r.status == 200
                    body = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.1)
        assert 'animate_queue_copy_bytes_total{account="main"} 42.0' in body
        assert "process_cpu_seconds_total" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


# ----------------------------------------------------------------------------- the Grafana dashboard

SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(?=\{|\[)")
OURS = re.compile(r"\b(animate_queue_[a-z0-9_]+|flower_[a-z0-9_]+)\b")
FLOWER = {
    "flower_events_total",
    "flower_task_runtime_seconds_bucket",
    "flower_task_runtime_seconds_sum",
    "flower_task_runtime_seconds_count",
    "flower_task_prefetch_time_seconds",
    "flower_worker_prefetched_tasks",
    "flower_worker_online",
    "flower_worker_number_of_currently_executing_tasks",
}


def _panels(panels: list[dict[str, object]]) -> Iterator[dict[str, object]]:
    for panel in panels:
        yield panel
        nested = panel.get("panels")
        if isinstance(nested, list):
            yield from _panels(nested)


def test_grafana_dashboard_uses_only_known_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"

    known = set(FLOWER)
    for m in METRICS.values():
        known |= m.sample_names
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))

    exprs = []
    for panel in panels:
        if panel["type"] == "row":
            continue
        targets = panel["targets"]
        assert isinstance(targets, list) and targets, panel["title"]
        for target in targets:
            expr = target["expr"]
            exprs.append(expr)
            names = set(OURS.findall(expr))
            assert names, (panel["title"], expr)
            assert names <= known, (panel["title"], names - known)
            selected = set(SELECTOR.findall(expr)) - {"by", "without"}
            assert selected <= known, (panel["title"], selected - known)

    used = {n for e in exprs for n in OURS.findall(e)}
    unused = {m.name for m in METRICS.values() if not (m.sample_names & used)}
    assert unused == set(), f"metrics no panel shows: {unused}"
    assert metrics.NAMESPACE == "animate_queue_"


def test_a_batch_sends_its_writes_in_one_transaction_at_its_end(
    client: redis.Redis, prefix: str
) -> None:
    """What the task layer wraps each task in: one round trip for a step's metrics."""
    own = redis.Redis.from_url(REDIS_URL)  # the metrics' own client: scraping is not counted
    m = RedisMetrics(own, prefix)
    sent: list[int] = []
    real = own.pipeline

    def counting(*args: object, **kwargs: object) -> object:
        pipe = real(*args, **kwargs)  # type: ignore[arg-type]
        execute = pipe.execute

        def counted(*a: object, **k: object) -> object:
            sent.append(len(pipe.command_stack))
            return execute(*a, **k)  # type: ignore[arg-type]

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    own.pipeline = counting  # type: ignore[method-assign]
    with pytest.raises(RuntimeError), m.batch():
        m.inc("copy_bytes_total", 10, account="main")
        with m.batch():  # nested: the outer one sends
            m.observe("copy_delay_seconds", 3.0)
        assert scrape(client, prefix).get("animate_queue_copy_bytes_total", []) == []
        raise RuntimeError("the step failed; its metrics still count")
    assert sent == [3]  # one transaction: the counter, the bucket and the sum
    s = scrape(client, prefix)
    assert value(s, "animate_queue_copy_bytes_total", account="main") == 10
    assert value(s, "animate_queue_copy_delay_seconds_count") == 1
    m.inc("copy_bytes_total", 5, account="main")  # outside a batch: sent at once
    assert sent == [3, 1]
    with m.batch():  # the bill is never held back: a worker killed next must not lose it
        m.inc("video_seconds_total", 4.0, account="main", producer="p", kind="video")
        assert sent == [3, 1, 1]
        m.inc("copy_bytes_total", 1, account="main")
    assert sent == [3, 1, 1, 1]


def test_copies_at_risk_follow_the_jobs_copying(client: redis.Redis, prefix: str) -> None:
    """A paid video not yet stored whose URL has under 6 h left is counted at risk; stored, it is
    not. The soonest URL's time left is served too (nothing when no job is copying)."""
    from workers.adapters.redis.store import RedisJobStore
    from workers.domain.job import Job
    from workers.domain.request import JobRequest
    from workers.domain.states import JobState

    store = RedisJobStore(client, prefix=prefix, final_ttl=3600)
    now = time.time()

    def copying(job_id: str, expires: float) -> Job:
        job, _ = store.create(
            Job(job_id, JobState.SUBMITTED, 1, JobRequest("u", "AACT.x"), now, now)
        )
        moved = store.transition(job, JobState.COPYING, video_expires_at=expires)
        assert moved is not None
        return moved

    def gauges() -> dict[str, list[float]]:
        text = generate_latest(make_app_registry(client, prefix)).decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        names = ("animate_queue_copies_at_risk", "animate_queue_copy_url_left_seconds")
        return {n: [s.value for s in families[n].samples] for n in names}

    assert gauges() == {
        "animate_queue_copies_at_risk": [0.0],
        "animate_queue_copy_url_left_seconds": [],
    }
    soon = copying("soon", now + 2 * 3600)
    copying("later", now + 20 * 3600)
    seen = gauges()
    assert seen["animate_queue_copies_at_risk"] == [1.0]
    [left] = seen["animate_queue_copy_url_left_seconds"]
    assert 2 * 3600 - 60 < left <= 2 * 3600
    store.transition(soon, JobState.STORED, finished_at=now)
    seen = gauges()
    assert seen["animate_queue_copies_at_risk"] == [0.0]
    assert seen["animate_queue_copy_url_left_seconds"][0] > 19 * 3600


def test_a_forked_child_sends_none_of_what_its_parent_holds(
    client: redis.Redis, prefix: str
) -> None:
    """METRICS_FLUSH_SECONDS holds sums in the process: a pool process forked from it starts
    with nothing held (and its own lock), so nothing is counted twice."""
    m = RedisMetrics(redis.Redis.from_url(REDIS_URL), prefix, flush_seconds=60)
    with m.batch():
        m.inc("copy_bytes_total", 5, account="main")
    key = f"{prefix}:m:c:copy_bytes_total"
    child = os.fork()
    if child == 0:  # the child: flush and leave at once
        code = 1
        try:
            m.flush()
            with m.batch():
                m.inc("copy_bytes_total", 1, account="child")
            m.flush()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert {k.decode(): float(v) for k, v in client.hgetall(key).items()} == {'["child"]': 1.0}
    m.flush()
    assert float(client.hget(key, '["main"]') or 0) == 5.0
