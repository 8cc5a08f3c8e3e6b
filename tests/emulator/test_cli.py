"""``python -m emulator`` as a real process: flags reach the config, and it stops cleanly on SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest


@pytest.fixture
def cli() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emulator",
            "--port",
            "0",
            "--api-key",
            "sk-one=team",
            "--api-key",
            "sk-two=team",
            "--submit-rate",
            "3",
            "--detect-rate",
            "7",
            "--query-rate",
            "11",
            "--policy-rate",
            "13",
            "--concurrency",
            "2",
            "--generation-seconds",
            "0.25",
            "--template-seconds",
            "0.75",
            "--retention-seconds",
            "99",
            "--url-ttl",
            "77",
            "--video-pad-mb",
            "1",
            "--fault-503",
            "0.5",
            "--fault-routes",
            "query,list",
            "--seed",
            "3",
            "--task-fail-rate",
            "0.25",
            "--task-fail-code",
            "InternalError.Timeout",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
    assert match, (line, proc.stderr.read() if proc.stderr else "")
    yield proc, match.group(1)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def test_flags_reach_the_config(cli: tuple[subprocess.Popen[str], str]) -> None:
    """Every quota, duration and fault flag shows in the running emulator's config."""
    _, url = cli
    config = httpx.get(f"{url}/_emulator/config").json()
    assert config["submit_rate"] == 3 and config["detect_rate"] == 7
    assert config["query_rate"] == 11 and config["policy_rate"] == 13
    assert config["concurrency"] == 2
    assert config["generation_seconds"] == 0.25 and config["template_seconds"] == 0.75
    assert config["retention_seconds"] == 99 and config["url_ttl_seconds"] == 77
    assert config["video_pad_bytes"] == 1024 * 1024
    assert config["api_keys"] == ["team"]  # account names, never the keys
    faults = httpx.get(f"{url}/_emulator/faults").json()
    assert faults["rates"]["503"] == 0.5
    assert faults["routes"] == ["list", "query"]
    assert faults["task_fail_rate"] == 0.25 and faults["task_fail_code"] == "InternalError.Timeout"


def test_keys_of_one_account_share_it(cli: tuple[subprocess.Popen[str], str]) -> None:
    """Two keys naming one account share its templates; a third key is refused."""
    _, url = cli
    template = httpx.post(f"{url}/_emulator/templates", json={"api_key": "sk-one"}).json()
    assert template["template_id"].startswith("AACT.team.")
    refused = httpx.get(f"{url}/api/v1/uploads", headers={"Authorization": "Bearer sk-three"})
    assert refused.status_code == 401


def test_sigterm_stops_it(cli: tuple[subprocess.Popen[str], str]) -> None:
    """SIGTERM ends the process with status 0."""
    proc, _ = cli
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_bad_fault_flag_is_refused() -> None:
    """A fault share above 1 stops the CLI with exit status 2 and a message."""
    done = subprocess.run(
        [sys.executable, "-m", "emulator", "--port", "0", "--fault-500", "1.5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "rates" in done.stderr
