"""``animate-queue health ...``: each probe against the real thing it probes.

Redis is the one at 127.0.0.1:6379 (keys under a unique KEY_PREFIX, removed afterwards); Flower and
the exporter are stood in for by a tiny HTTP server in a thread, answering 200 or 500; a closed
port is a port nobody listens on. No worker answers the names pinged here.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result

# The Celery app reads the settings once, at import: import it here, under the process's own
# environment, not later under a test's monkeypatched one (other tests share the module).
import config.celery_app
from config.settings import get_settings
from devstack import free_port
from workers.entrypoints import cli

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A unique KEY_PREFIX on the local Redis, the settings re-read, its keys removed after."""
    name = f"aq-health-test-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    monkeypatch.setenv("KEY_PREFIX", name)
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.setenv("WATCHDOG_INTERVAL_SECONDS", "10")  # default max age: 3 x 10 + 30 = 60 s
    get_settings.cache_clear()
    yield name
    get_settings.cache_clear()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for key in client.scan_iter(f"{name}:*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def store() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    yield client
    client.close()


def run(*args: str) -> Result:
    return CliRunner().invoke(cli.main, ["health", *args])


def assert_unhealthy(result: Result, *words: str) -> str:
    """Exit 1, nothing on stdout, one line on stderr naming the reason."""
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- beat


def test_heartbeat_key_is_the_one_the_watchdog_writes() -> None:
    from workers.entrypoints.celery import tasks

    prefix = config.celery_app.settings.key_prefix
    assert cli.beat_heartbeat_key(prefix) == tasks.BEAT_HEARTBEAT_KEY


def test_beat_fresh_heartbeat_is_healthy(prefix: str, store: redis.Redis) -> None:
    store.set(f"{prefix}:beat-heartbeat", repr(time.time() - 5))
    result = run("beat")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("beat: ok (last heartbeat 5.")
    assert result.stderr == ""


def test_beat_stale_heartbeat_says_its_age(prefix: str, store: redis.Redis) -> None:
    store.set(f"{prefix}:beat-heartbeat", repr(time.time() - 95))
    line = assert_unhealthy(run("beat"), "beat: unhealthy", "older than 60 s")
    assert "last heartbeat 95." in line
    # --max-age moves the limit both ways
    assert run("beat", "--max-age", "120").exit_code == 0
    store.set(f"{prefix}:beat-heartbeat", repr(time.time() - 3))
    assert_unhealthy(run("beat", "--max-age", "1"), "older than 1 s")


def test_beat_missing_heartbeat_is_unhealthy(prefix: str) -> None:
    assert_unhealthy(run("beat"), f"no heartbeat at {prefix}:beat-heartbeat")


def test_beat_unreadable_heartbeat_is_unhealthy(prefix: str, store: redis.Redis) -> None:
    store.set(f"{prefix}:beat-heartbeat", "not a time")
    assert_unhealthy(run("beat"), "unreadable heartbeat")


# ----------------------------------------------------------------------------- redis


def test_redis_answers_ping(prefix: str) -> None:
    result = run("redis")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("redis: ok (redis://127.0.0.1:6379/0 answered PING")


def test_redis_down_is_unhealthy_and_keeps_its_password(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2-secret@127.0.0.1:{port}/0")
    get_settings.cache_clear()
    started = time.monotonic()
    line = assert_unhealthy(run("redis", "--timeout", "1"), f"redis://127.0.0.1:{port}/0")
    assert time.monotonic() - started < 5
    assert "hunter2" not in line
    # The same for the beat probe, which reads the same Redis.
    line = assert_unhealthy(run("beat", "--timeout", "1"), "cannot read")
    assert "hunter2" not in line


# ----------------------------------------------------------------------------- flower, exporter


class Probe(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        known = self.path in ("/healthcheck", "/metrics")
        status = self.server.status if known else 404  # type: ignore[attr-defined]
        body = (b"OK" if self.path == "/healthcheck" else b"# metrics\n") if known else b"no"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[Any]:
    """A loopback HTTP server in a thread; set ``.status`` to what it answers."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), Probe)
    server.status = 200
    server.paths = []
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize(
    ("command", "path"), [("flower", "/healthcheck"), ("exporter", "/metrics")]
)
def test_http_probe_healthy_on_200(http_server: Any, command: str, path: str) -> None:
    result = run(command, "--url", http_server.url + "/")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{command}: ok ({http_server.url}{path} answered 200)\n"
    assert http_server.paths == [path]


@pytest.mark.parametrize("command", ["flower", "exporter"])
def test_http_probe_unhealthy_on_500(http_server: Any, command: str) -> None:
    http_server.status = 500
    assert_unhealthy(run(command, "--url", http_server.url), f"{command}: unhealthy", "HTTP 500")


@pytest.mark.parametrize("command", ["flower", "exporter"])
def test_http_probe_unhealthy_on_a_closed_port(command: str) -> None:
    url = f"http://user:pw-secret-9@127.0.0.1:{free_port()}"
    line = assert_unhealthy(run(command, "--url", url, "--timeout", "1"), "ConnectError")
    assert "pw-secret-9" not in line
    assert "user" not in line


def test_flower_default_url_uses_flower_port(
    http_server: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWER_PORT", str(http_server.server_address[1]))
    monkeypatch.setenv("METRICS_PORT", str(http_server.server_address[1]))
    get_settings.cache_clear()
    assert run("flower").exit_code == 0
    assert run("exporter").exit_code == 0
    assert http_server.paths == ["/healthcheck", "/metrics"]


def test_flower_body_must_be_ok(http_server: Any) -> None:
    """A 200 from something that is not Flower's health endpoint is not health."""

    class Other(Probe):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")

    http_server.RequestHandlerClass = Other
    assert_unhealthy(run("flower", "--url", http_server.url), "not 'OK'")


# ----------------------------------------------------------------------------- worker


def test_worker_nobody_answers(prefix: str) -> None:
    name = f"nobody-{uuid.uuid4().hex[:8]}@nowhere"
    started = time.monotonic()
    assert_unhealthy(
        run("worker", "--name", name, "--timeout", "1"),
        f"worker {name}: unhealthy",
        "no answer to ping within 1 s",
    )
    assert time.monotonic() - started < 5


def test_worker_broker_down(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2-secret@127.0.0.1:{port}/0")
    get_settings.cache_clear()
    started = time.monotonic()
    line = assert_unhealthy(run("worker", "--timeout", "1"), f"broker redis://127.0.0.1:{port}/0")
    assert time.monotonic() - started < 8
    assert "hunter2" not in line


# ----------------------------------------------------------------------------- metrics


def test_metrics_serves_with_the_settings(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``animate-queue metrics`` hands REDIS_URL, KEY_PREFIX and the listen address to serve."""
    from workers.adapters.redis import metrics

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(metrics, "serve", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setenv("METRICS_ADDR", "127.0.0.2")
    monkeypatch.setenv("METRICS_PORT", "9999")
    get_settings.cache_clear()
    assert CliRunner().invoke(cli.main, ["metrics"]).exit_code == 0
    result = CliRunner().invoke(cli.main, ["metrics", "--addr", "127.0.0.1", "--port", "9100"])
    assert result.exit_code == 0, result.output
    # the exporter reads through a client made like every other (through Sentinel when set)
    clients = [kw.pop("client") for _, kw in calls]
    for client in clients:
        pool = client.connection_pool.connection_kwargs
        assert f"redis://{pool['host']}:{pool['port']}/{pool['db']}" == REDIS_URL
        assert pool["socket_timeout"] == 5.0
    assert calls == [
        ((REDIS_URL, prefix), {"broker_url": None, "addr": "127.0.0.2", "port": 9999}),
        ((REDIS_URL, prefix), {"broker_url": None, "addr": "127.0.0.1", "port": 9100}),
    ]


@pytest.mark.parametrize(
    ("model", "today", "code", "says"),
    [
        ("wan2.2-animate-move", "2026-12-06", 0, "no retirement within 30 days"),
        ("animate-anyone-gen2", "2026-08-01", 0, "no retirement within 30 days"),
        ("animate-anyone-gen2", "2026-09-25", 0, "retires on 2026-10-10, in 15 days"),
        ("animate-anyone-gen2", "2026-12-06", 1, "retired by Model Studio on 2026-10-10"),
    ],
)
def test_health_model_warns_before_the_retirement_and_fails_after(
    monkeypatch: pytest.MonkeyPatch, model: str, today: str, code: int, says: str
) -> None:
    """``animate-queue health`` (and ``health model``): the configured model against Model
    Studio's retirement list; past the date it is unhealthy and names the successor."""
    import datetime as dt

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Clock:
            return cls.fromisoformat(today + "T12:00:00+00:00")

    monkeypatch.setattr(cli, "datetime", Clock)
    monkeypatch.setenv("DASHSCOPE_MODEL", model)
    get_settings.cache_clear()
    try:
        for args in (["health"], ["health", "model"]):
            result = CliRunner().invoke(cli.main, args)
            assert result.exit_code == code, result.output
            assert says in result.output
            if code:
                assert "successor is wan2.2-animate-move" in result.output
    finally:
        get_settings.cache_clear()
