"""Smoke test of ``bench/faults.py`` (promise asserted in faults_smoke):
submits that create the task then fail or stall; slow-drip image URLs.
"""

from __future__ import annotations

import pytest

from tests.bench.faults_smoke import run_scenarios


@pytest.mark.slow
@pytest.mark.timeout(250)
def test_the_promise_holds() -> None:
    results = run_scenarios("submit-5xx", "slow-drip")
    assert results
