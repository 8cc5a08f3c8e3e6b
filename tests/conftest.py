"""Shared fixtures: a real emulator on a socket, reset between tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer

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
