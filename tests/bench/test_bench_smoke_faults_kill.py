"""Smoke test of ``bench/faults.py`` (promise asserted in faults_smoke):
a worker SIGKILLed right after DashScope accepted a submit.
"""

from __future__ import annotations

import pytest

from tests.bench.faults_smoke import run_scenarios


@pytest.mark.slow
@pytest.mark.timeout(250)
def test_the_promise_holds() -> None:
    results = run_scenarios("kill-after-submit")
    assert results["kill-after-submit"]["kills"] >= 1
