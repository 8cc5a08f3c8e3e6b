"""Smoke test of ``bench/copy_speed.py``: the short version runs end to end and ends with its JSON line.

No timing is asserted (CI machines differ); only that every step ran, the copy was byte-exact (the
benchmark raises otherwise) and the five figures the issue names are finite numbers.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "copy_speed.py"
KEYS = (
    "throughput_mb_s",
    "limit_mb_s",
    "throughput_ratio",
    "peak_rss_growth_mib",
    "sha256_overhead",
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_copy_benchmark_quick_run_ends_with_its_json_line() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    for key in KEYS:
        value = summary[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
        assert math.isfinite(value), (key, value)
    assert summary["size_mib"] == 16
    assert summary["throughput_mb_s"] > 0 and summary["limit_mb_s"] > 0
    assert summary["peak_rss_growth_mib"] > 0
    assert "copy" in done.stdout and "upload_file" in done.stdout  # the human table came first
