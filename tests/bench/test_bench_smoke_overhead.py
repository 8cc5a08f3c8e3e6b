"""Smoke tests of ``bench/overhead.py`` and ``bench/inflight.py``: their short versions run end to
end (real redis-server, emulator, workers; moto for the overhead one) and end with their JSON line.

No timing is asserted (CI machines differ): only that each run finished, that every figure the
issue names is a finite number, and that the counts hang together.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_quick(module: str) -> tuple[dict[str, Any], str]:
    """``python -m bench.<module> --quick``: its last line as JSON, and all it printed."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]), done.stdout


def assert_numbers(summary: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = summary[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_overhead_benchmark_quick_run_ends_with_its_json_line() -> None:
    summary, printed = run_quick("overhead")
    assert_numbers(
        summary,
        ("jobs_per_s", "cpu_ms_per_job", "messages_per_job", "ratio_to_noop_floor",
         "redis_commands_per_job", "noop_ms_per_message"),
    )  # fmt: skip
    assert summary["jobs_through"] == summary["jobs"] == 30 and summary["complete"] is True
    assert summary["jobs_per_s"] > 0 and summary["cpu_ms_per_job"] > 0
    # Each job takes at least intake, submit, one poll and the copy: four messages.
    assert summary["messages_per_job"] >= summary["design_min_messages_per_job"] == 4
    by_task = summary["received_by_task_per_job"]
    for task in ("animate.generate", "animate.submit", "animate.poll", "animate.copy"):
        assert by_task[task] >= 1, by_task
    assert "Celery's floor" in printed and "our jobs" in printed  # the human tables came first


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_inflight_benchmark_quick_run_ends_with_its_json_line() -> None:
    summary, printed = run_quick("inflight")
    assert_numbers(
        summary,
        ("jobs_in_flight", "poll_lateness_p50_s", "poll_lateness_p99_s", "worker_rss_mib",
         "redis_bytes_per_job", "poll_rate_done_per_s"),
    )  # fmt: skip
    assert summary["jobs_in_flight"] == summary["jobs_target"] == 200
    assert summary["reached_target"] is True
    assert summary["worker_rss_mib"] > 0 and summary["redis_bytes_per_job"] > 0
    assert summary["poll_rate_done_per_s"] > 0  # polls happened in the window
    # Every worker answered inspect(): the countdown messages it holds.
    assert len(summary["workers_hold"]) == 2
    # 12 s polls are over COUNTDOWN_MAX_SECONDS: the waits are in the Redis timer, not the
    # workers (each holds at most the message it is running)
    assert summary["parked_end"] > 0
    assert summary["held_messages_max"] <= 2
    assert "jobs in flight" in printed


@pytest.mark.timeout(120)
def test_console_benchmark_quick_run_ends_with_its_json_line() -> None:
    summary, printed = run_quick("console")
    assert_numbers(summary, ("page_ms_p50", "page_ms_p95", "search_by_id_ms", "rows_per_page"))
    assert summary["jobs"] == 2000 and summary["pages"] == 3 and summary["search_found"] is True
    assert summary["rows_per_page"] >= 10  # a page of the state index, not the whole set
    assert "console job list" in printed
