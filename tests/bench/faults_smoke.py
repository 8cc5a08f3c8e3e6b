"""Shared by the ``bench/faults.py`` smoke tests: run some scenarios, shortened, and assert the
promise on each.

Unlike a speed benchmark, this one's figures are the promise itself, so they are asserted: in
every scenario nothing is lost, nothing is paid twice, nobody gets another job's video, and every
stored video is byte-exact; the slow-drip jobs are refused, the others stored. The scenarios are
split over three test files so that the test processes run them side by side (each mostly waits
on its outage).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_scenarios(*names: str) -> dict[str, Any]:
    """``python -m bench.faults --quick --scenarios ...``: each scenario's row, promise checked."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--quick", "--scenarios", ",".join(names)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,  # typically 30-40 s; a slow CI machine has been seen past 170 s once
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])["scenarios"]
    assert set(results) == set(names)
    for name, row in results.items():
        assert (row["lost"], row["double_submissions"], row["swapped"]) == (0, 0, 0), (name, row)
        assert row["byte_exact"] == row["stored"], (name, row)
        assert row["remote_tasks"] == row["stored"], (name, row)  # each paid task is stored
        if name == "slow-drip":
            assert row["rejected"] == {"REJECTED:InvalidImage.Unreachable": row["jobs"] // 2}
            assert row["stored"] == row["jobs"] - row["jobs"] // 2
        else:
            assert row["stored"] == row["jobs"] and not row["failed"], (name, row)
    return results
