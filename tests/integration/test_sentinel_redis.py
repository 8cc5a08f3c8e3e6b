"""Redis through Sentinel, on real processes: a master, a replica and three Sentinels on 127.0.0.1.

What the settings promise (docs/ha.md): every client follows the master the Sentinels name,
across a failover and without a restart, saying so in the log; protected writes (new jobs, job
transitions, parked timers) are confirmed by a replica before they count, a replica that does
not confirm in time stops the step with ReplicationTimeout, and a master with no replica at all
goes on, counted; passwords for Redis and for the Sentinels, and TLS.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from config.settings import Settings, get_settings, load_settings
from devstack.ha import RedisHA, tls_files, wait_until
from workers import bootstrap
from workers.adapters.redis.connection import RedisAddress, celery_options
from workers.adapters.redis.replication import Replication, check_at_start
from workers.adapters.redis.store import RedisJobStore
from workers.adapters.redis.timers import Parked, RedisTimers
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import JobState
from workers.entrypoints import cli
from workers.errors import ReplicationTimeout

pytestmark = pytest.mark.slow  # real processes for a while: scheduled first (tests/conftest.py)

PASSWORD, SENTINEL_PASSWORD = "redis-pw-7f3a", "sentinel-pw-91c2"
IMAGE, TEMPLATE = "https://img.example.com/a.png", "AACT.tmpl-1"


class Counted:
    """A Metrics port that remembers its increments."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counts[key] = self.counts.get(key, 0.0) + amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        pass

    def unreplicated(self, reason: str) -> float:
        return self.counts.get(("redis_writes_unreplicated_total", (("reason", reason),)), 0.0)


@pytest.fixture(scope="module")
def shared_ha() -> Iterator[RedisHA]:
    """One group for the tests that leave it as they found it (a frozen replica is thawed)."""
    with RedisHA(password=PASSWORD, sentinel_password=SENTINEL_PASSWORD) as group:
        yield group


@pytest.fixture
def ha() -> Iterator[RedisHA]:
    """A group of the test's own, for those that kill a node."""
    group = RedisHA(password=PASSWORD, sentinel_password=SENTINEL_PASSWORD).start()
    try:
        yield group
    finally:
        group.stop()


def settings_for(ha: RedisHA, **extra: str) -> Settings:
    return load_settings(
        {
            "REDIS_URL": ha.url(),
            "REDIS_SENTINELS": ha.sentinel_setting(),
            "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
            "REDIS_WAIT_TIMEOUT_MS": "500",
            **extra,
        }
    )


def new_job(job_id: str) -> Job:
    now = time.time()
    return Job(
        job_id=job_id,
        state=JobState.QUEUED,
        version=1,
        request=JobRequest(IMAGE, TEMPLATE, job_id=job_id),
        created_at=now,
        updated_at=now,
        next_action_at=now + 60,
    )


def store_for(settings: Settings, metrics: Counted | None = None) -> RedisJobStore:
    client = bootstrap.redis_client(settings)
    return RedisJobStore(
        client,
        prefix="ha-test",
        final_ttl=3600,
        metrics=metrics,
        replication=bootstrap.replication(settings, client, metrics),  # type: ignore[arg-type]
    )


def on_replicas(ha: RedisHA, key: str) -> list[dict[bytes, bytes]]:
    """The hash ``key`` as each live replica holds it now."""
    found = []
    for node in ha.nodes:
        if node.proc is not None and node.role() == "slave":
            with node.client() as client:
                found.append(client.hgetall(key))
    return found


def test_a_protected_write_is_on_the_replica_when_it_returns(shared_ha: RedisHA) -> None:
    """WAIT on the write's own connection: when create or a transition returns, the replica
    already holds that version; nothing had to be counted as unreplicated."""
    metrics = Counted()
    store = store_for(settings_for(shared_ha), metrics)
    job, created = store.create(new_job("ha-1"))
    assert created
    for _ in range(20):  # each one checked the moment it returns, no sleeping in between
        moved = store.transition(job, JobState.QUEUED, updated_at=time.time())
        assert moved is not None
        job = moved
        (copy,) = on_replicas(shared_ha, store.key("ha-1"))
        assert copy[b"version"] == str(job.version).encode()
    assert metrics.counts == {}


def test_clients_follow_a_failover_without_a_restart_and_say_so(
    ha: RedisHA, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL the master: the same store object reads the job (replicated before it was
    acknowledged) and moves it on the promoted replica; the log names the new master."""
    store = store_for(settings_for(ha))
    job, _ = store.create(new_job("ha-2"))
    job = store.transition(job, JobState.QUEUED, updated_at=time.time()) or job
    old = ha.current_master()
    caplog.set_level(logging.INFO, logger="workers.adapters.redis.connection")
    old.kill()
    new = ha.wait_for_failover(old)
    assert new is not old
    found = None
    deadline = time.monotonic() + 20
    while found is None and time.monotonic() < deadline:
        try:
            found = store.get("ha-2")
        except Exception:  # StoreUnavailable while the old address still refuses
            time.sleep(0.2)
    assert found is not None and found.version == job.version
    assert store.transition(found, JobState.QUEUED, updated_at=time.time()) is not None
    moved = [r for r in caplog.records if "moved from" in r.getMessage()]
    assert moved, [r.getMessage() for r in caplog.records]
    assert f"{new.place.host}:{new.port}" in moved[-1].getMessage()
    assert PASSWORD not in caplog.text and SENTINEL_PASSWORD not in caplog.text


def test_a_replica_that_does_not_confirm_stops_the_step(shared_ha: RedisHA) -> None:
    """A replica still connected but frozen (SIGSTOP): WAIT times out, the transition raises
    ReplicationTimeout (a StoreUnavailable: the step is retried or resumed), counted."""
    metrics = Counted()
    store = store_for(settings_for(shared_ha), metrics)
    job, _ = store.create(new_job("ha-3"))
    (replica,) = shared_ha.replicas
    assert replica.proc is not None
    os.kill(replica.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ReplicationTimeout, match="0 of 1 Redis replicas"):
            store.transition(job, JobState.QUEUED, updated_at=time.time())
        assert 0.4 < time.monotonic() - started < 5  # REDIS_WAIT_TIMEOUT_MS=500
        timers = RedisTimers(
            store.redis,
            prefix="ha-test",
            replication=bootstrap.replication(settings_for(shared_ha), store.redis),
        )
        with pytest.raises(ReplicationTimeout):
            timers.park(Parked("poll", "ha-3", 2, "p"), 30.0)
    finally:
        os.kill(replica.proc.pid, signal.SIGCONT)
    assert metrics.unreplicated("timeout") == 1
    # the write is on the master (not undone): whoever resumes the job starts from it
    stored = store.get("ha-3")
    assert stored is not None and stored.version == job.version + 1


def test_a_master_without_replicas_goes_on_and_counts(ha: RedisHA) -> None:
    """With its only replica gone, no failover can lose a write to a stale replica: writes go
    on without waiting (not REDIS_WAIT_TIMEOUT_MS each), counted as no_replica."""
    metrics = Counted()
    store = store_for(settings_for(ha, REDIS_WAIT_TIMEOUT_MS="3000"), metrics)
    (replica,) = ha.replicas
    replica.kill()
    wait_until(lambda: not ha.master.client().role()[2], "the master to drop its replica")
    time.sleep(1.1)  # the replica count is read at most once a second
    started = time.monotonic()
    job, _ = store.create(new_job("ha-4"))
    assert store.transition(job, JobState.QUEUED, updated_at=time.time()) is not None
    assert time.monotonic() - started < 1.0
    assert metrics.unreplicated("no_replica") == 2


def test_without_replication_settings_nothing_waits(redis_client: redis.Redis) -> None:
    """Plain REDIS_URL: no Replication at all, and a store on the shared server works as ever."""
    settings = load_settings({"REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert settings.wait_replicas == 0
    assert bootstrap.replication(settings, redis_client) is None
    assert bootstrap.redis_address(settings) == RedisAddress("redis://127.0.0.1:6379/0")
    assert bootstrap.celery_urls(settings) == (settings.redis_url, settings.redis_url)
    assert celery_options(bootstrap.redis_address(settings), *bootstrap.celery_urls(settings)) == {}


def test_start_up_check_and_health_report_the_layout(
    ha: RedisHA, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's start-up line, and `animate-queue health redis`: each Sentinel's answer,
    the master's PING, its replicas; no password printed."""
    settings = settings_for(ha)
    caplog.set_level(logging.INFO)
    status = check_at_start(
        bootstrap.redis_client(settings), 1, bootstrap.redis_address(settings).describe()
    )
    assert status["role"] == "master" and len(status["replicas"]) == 1
    assert "1 replica(s) connected; protected writes wait for 1" in caplog.text
    for name, value in {
        "REDIS_URL": ha.url(),
        "REDIS_SENTINELS": ha.sentinel_setting(),
        "REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.main, ["health", "redis", "--timeout", "3"])
        assert result.exit_code == 0, result.output
        master = ha.current_master()
        assert f"-> {master.place.host}:{master.port}" in result.output
        assert "sentinel: ok" in result.output and "replication: ok" in result.output
        assert PASSWORD not in result.output and SENTINEL_PASSWORD not in result.output
        (replica,) = ha.replicas
        replica.kill()
        wait_until(lambda: not master.client().role()[2], "the master to drop its replica")
        result = CliRunner().invoke(cli.main, ["health", "redis", "--timeout", "3"])
        assert result.exit_code == 1
        assert "replication: unhealthy: role master, 0 replica(s) connected" in result.stderr
    finally:
        get_settings.cache_clear()


def test_a_wrong_sentinel_password_is_a_clear_error(shared_ha: RedisHA) -> None:
    settings = settings_for(shared_ha, REDIS_SENTINEL_PASSWORD="wrong")
    client = bootstrap.redis_client(settings, socket_timeout=2.0, retry_on_timeout=False)
    with pytest.raises(redis.RedisError) as failed:
        client.ping()
    assert "wrong" not in str(failed.value)


def test_celery_options_carry_master_name_and_sentinel_password(shared_ha: RedisHA) -> None:
    settings = settings_for(shared_ha)
    broker, backend = bootstrap.celery_urls(settings)
    assert broker == backend
    assert broker.count("sentinel://") == 3 and f":{PASSWORD}@" in broker
    options = celery_options(bootstrap.redis_address(settings), broker, backend)
    for name in ("broker_transport_options", "result_backend_transport_options"):
        assert options[name]["master_name"] == "animate-queue"
        assert options[name]["sentinel_kwargs"]["password"] == SENTINEL_PASSWORD
    # kombu takes them as they are: a message goes through the master the Sentinels name
    from kombu import Connection

    with Connection(broker, transport_options=options["broker_transport_options"]) as conn:
        queue = conn.SimpleQueue("ha-test-queue")
        queue.put({"hello": "sentinel"})
        assert queue.get(timeout=5).payload == {"hello": "sentinel"}
        queue.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_to_redis_and_sentinels(tmp_path: Path) -> None:
    """rediss:// with its CA, REDIS_SENTINEL_TLS: every hop is TLS (the nodes serve nothing
    else), and a protected write still waits for the replica."""
    tls = tls_files(tmp_path / "tls", ["127.0.0.1"])
    with RedisHA(password=PASSWORD, tls=tls) as group:
        settings = load_settings(
            {
                "REDIS_URL": group.url(),
                "REDIS_SENTINELS": group.sentinel_setting(),
                "REDIS_SENTINEL_TLS": "true",
            }
        )
        assert bootstrap.redis_address(settings).server_kwargs()["ssl"] is True
        store = store_for(settings)
        job, _ = store.create(new_job("ha-tls"))
        assert store.transition(job, JobState.QUEUED, updated_at=time.time()) is not None
        (copy,) = on_replicas(group, store.key("ha-tls"))
        assert copy[b"version"] == b"2"
        options: dict[str, Any] = celery_options(
            bootstrap.redis_address(settings), *bootstrap.celery_urls(settings)
        )
        assert options["broker_use_ssl"]["ssl_ca_certs"] == tls["tls-ca-cert-file"]


def test_replication_reads_the_replica_count_at_most_once_a_second(shared_ha: RedisHA) -> None:
    calls = 0
    client = bootstrap.redis_client(settings_for(shared_ha))
    original = client.role

    def counted() -> Any:
        nonlocal calls
        calls += 1
        return original()

    client.role = counted  # type: ignore[method-assign]
    replication = Replication(client, required=1, timeout_ms=500)
    script = client.register_script("return redis.call('INCR', KEYS[1])")
    for _ in range(50):
        replication.run(script, ["ha-test:count"], [])
    assert calls == 1


def test_a_producer_returns_once_the_replica_holds_the_message(shared_ha: RedisHA) -> None:
    """A job exists only as its intake message until a worker takes it: with REDIS_WAIT_REPLICAS
    the producer's submit returns once the replica has that message (a protected write after
    it confirms everything before it), and raises ReplicationTimeout when it cannot know."""
    from workers.producer import AnimateQueue

    settings = settings_for(shared_ha)
    queue = AnimateQueue(
        shared_ha.url(),
        address=bootstrap.redis_address(settings),
        key_prefix="ha-test",
        wait_replicas=1,
        wait_timeout_ms=500,
    )
    (replica,) = shared_ha.replicas
    try:
        for n in range(1, 6):
            queue.submit(IMAGE, TEMPLATE, job_id=f"ha-producer-{n}")
            with replica.client() as client:
                assert client.llen("celery") == n  # already there when submit returned
                # and noted in the intake inbox, where the watchdog looks for lost messages
                assert client.hexists("ha-test:inbox", f"ha-producer-{n}")
                assert client.zscore("ha-test:inbox:due", f"ha-producer-{n}") is not None
        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ReplicationTimeout, match="confirmed the write"):
                queue.submit(IMAGE, TEMPLATE, job_id="ha-producer-unconfirmed")
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
    finally:
        queue.close()


def test_the_exporter_follows_a_failover(ha: RedisHA, caplog: pytest.LogCaptureFixture) -> None:
    """`animate-queue metrics` through Sentinel: scrapes answer again after the master dies,
    from the same process, and its log names the new master."""
    import threading

    import httpx

    from devstack import free_port
    from workers.adapters.redis.metrics import serve

    settings = settings_for(ha)
    caplog.set_level(logging.INFO, logger="workers.adapters.redis.connection")
    port, stop = free_port(), threading.Event()
    client = bootstrap.redis_client(settings, socket_timeout=5.0, connect_timeout=3.0)
    thread = threading.Thread(
        target=serve,
        args=(settings.redis_url, "ha-test"),
        kwargs={"addr": "127.0.0.1", "port": port, "stop": stop, "client": client},
        daemon=True,
    )
    thread.start()
    url = f"http://127.0.0.1:{port}/metrics"

    def scraped() -> bool:
        try:
            answer = httpx.get(url, timeout=5)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200 and "animate_queue_timers_parked" in answer.text

    try:
        wait_until(scraped, "a first scrape")
        old = ha.current_master()
        old.kill()
        new = ha.wait_for_failover(old)
        wait_until(scraped, "a scrape after the failover", 30)
    finally:
        stop.set()
        thread.join(10)
    assert f"to {new.place.host}:{new.port}; reconnected there" in caplog.text


def test_no_master_found_is_one_readable_line(ha: RedisHA) -> None:
    """Every Sentinel unreachable: the error names each by host:port and why, in one line,
    without the clients' whole reprs and without a password."""
    settings = settings_for(ha)
    client = bootstrap.redis_client(settings, socket_timeout=1.0, connect_timeout=1.0)
    for sentinel in ha.sentinels:
        sentinel.kill()
    with pytest.raises(redis.RedisError) as failed:
        client.ping()
    text = str(failed.value)
    assert "No master found for 'animate-queue'" in text
    for host, port in (s.address for s in ha.sentinels):
        assert f"{host}:{port} - network:ConnectionError: Error 111" in text
    assert "ConnectionPool" not in text and len(text) < 800, text
    assert PASSWORD not in text and SENTINEL_PASSWORD not in text
