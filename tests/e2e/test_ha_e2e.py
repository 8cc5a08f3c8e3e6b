"""Jobs through a Redis failover and a cut-off worker host, on hosts made of network namespaces.

The short version of ``bench/ha.py``: real Celery workers on two namespaced hosts, beat on a
third, a master, a replica and three Sentinels on five more, all through REDIS_SENTINELS. The
master is SIGKILLed mid-run, one worker host loses its link for 12 s (the bench: two minutes),
then a Sentinel and the old master are restarted. Every job must be stored once, byte-exact,
with no second payment, and progress must resume within 30 s of the failover.
"""

from __future__ import annotations

import pytest

from bench import ha as bench_ha
from devstack.netns import unavailable

REASON = unavailable()

pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"needs network namespaces: {REASON}"),
    pytest.mark.slow,
    pytest.mark.timeout(300),
]


def test_failover_and_a_partition_lose_nothing_and_pay_once() -> None:
    short = "--jobs 16 --kill-at 4 --cut-seconds 12 --settle-seconds 3 --deadline 200"
    args = bench_ha.parse([*short.split(), "--down-after-ms", "2000"])
    result = bench_ha.run(args)
    print(result)
    assert result["lost"] == 0, result
    assert result["stored"] == result["jobs"] == result["stored_byte_exact"], result
    assert result["double_submissions"] == 0 and result["shared_remote_tasks"] == 0, result
    assert result["mismatches"] == 0, result
    assert result["remote_submissions"] == result["jobs"], result
    assert result["transitions_while_work_1_cut"] > 0, result  # work-2 went on meanwhile
    # no restart: every process found the new master by itself and said so
    assert result["logged_the_move"] == {"work-1": True, "work-2": True, "beat": True}, result
    resumed = result["resumed_after_s"]
    assert resumed["master SIGKILLed"] is not None and resumed["master SIGKILLed"] < 30, result
    # the faults were all staged, in order
    assert [what for what, _ in result["faults"]] == [
        "master SIGKILLed",
        next(w for w, _ in result["faults"] if w.startswith("replica promoted")),
        "work-1 cut off",
        "work-1 back",
        "sentinel restarted",
        "old master restarted",
        "old master rejoined as a replica",
    ], result
