"""Smoke test of ``bench/faults.py`` (promise asserted in faults_smoke):
S3 down, then the transfer pool SIGKILLed and kept down.
"""

from __future__ import annotations

import pytest

from tests.bench.faults_smoke import run_scenarios


@pytest.mark.slow
@pytest.mark.timeout(250)
def test_the_promise_holds() -> None:
    results = run_scenarios("s3-down", "transfer-down")
    assert results
