"""Smoke test of ``bench/faults.py``: every fault scenario, shortened, with real processes.

Unlike a speed benchmark this one's figures are the promise itself, so they are asserted: in
every scenario nothing is lost, nothing is paid twice, nobody gets another job's video, and every
stored video is byte-exact; the slow-drip jobs are refused, the others stored.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fault_scenarios_keep_the_promise() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=290,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])["scenarios"]
    assert set(results) == {"s3-down", "transfer-down", "submit-5xx", "kill-after-submit",
                            "slow-drip"}  # fmt: skip
    for name, row in results.items():
        assert (row["lost"], row["double_submissions"], row["swapped"]) == (0, 0, 0), (name, row)
        assert row["byte_exact"] == row["stored"], (name, row)
        assert row["remote_tasks"] == row["stored"], (name, row)  # each paid task is stored
        if name == "slow-drip":
            assert row["rejected"] == {"REJECTED:InvalidImage.Unreachable": row["jobs"] // 2}
            assert row["stored"] == row["jobs"] - row["jobs"] // 2
        else:
            assert row["stored"] == row["jobs"] and not row["failed"], (name, row)
    assert results["kill-after-submit"]["kills"] >= 1
