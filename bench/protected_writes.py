"""What a protected write costs: job transitions with and without WAIT, on a master and a replica.

    .venv/bin/python bench/protected_writes.py [--transitions 5000]

A master, its replica and three Sentinels on 127.0.0.1 (devstack/ha.py). The same job store
moves one job through ``--transitions`` transitions twice through the Sentinels: without
replication (REDIS_WAIT_REPLICAS=0) and with it (1, the default with Sentinel). It prints the
time per transition (p50, p99, mean) and the Redis commands the master ran per transition in
each case. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from config.settings import load_settings
from devstack.ha import RedisHA
from workers import bootstrap
from workers.adapters.redis.store import RedisJobStore
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import JobState


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def commands(store: RedisJobStore) -> int:
    stats = store.redis.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


def one_run(ha: RedisHA, transitions: int, wait: int) -> dict[str, Any]:
    settings = load_settings(
        {
            "REDIS_URL": ha.url(),
            "REDIS_SENTINELS": ha.sentinel_setting(),
            "REDIS_WAIT_REPLICAS": str(wait),
        }
    )
    client = bootstrap.redis_client(settings)
    store = RedisJobStore(
        client,
        prefix=f"bench-protected-{wait}",
        final_ttl=3600,
        replication=bootstrap.replication(settings, client),
    )
    now = time.time()
    job, _ = store.create(
        Job(
            job_id=f"protected-{wait}",
            state=JobState.QUEUED,
            version=1,
            request=JobRequest("https://img.example.com/a.png", "AACT.t", job_id="p"),
            created_at=now,
            updated_at=now,
            next_action_at=now + 60,
        )
    )
    for _ in range(200):  # warm: scripts loaded, the replica count read
        job = store.transition(job, JobState.QUEUED, updated_at=time.time()) or job
    before = commands(store)
    took = []
    for _ in range(transitions):
        started = time.perf_counter()
        moved = store.transition(job, JobState.QUEUED, updated_at=time.time())
        took.append(time.perf_counter() - started)
        assert moved is not None
        job = moved
    ran = commands(store) - before - 1  # the INFO call itself
    client.close()
    return {
        "wait_replicas": wait,
        "p50_us": round(percentile(took, 50) * 1e6, 1),
        "p99_us": round(percentile(took, 99) * 1e6, 1),
        "mean_us": round(sum(took) / len(took) * 1e6, 1),
        "commands_per_transition": round(ran / transitions, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--transitions", type=int, default=5000)
    args = parser.parse_args()
    with RedisHA() as ha:
        runs = [one_run(ha, args.transitions, wait) for wait in (0, 1, 0, 1)]
    best = {w: min((r for r in runs if r["wait_replicas"] == w), key=lambda r: r["p50_us"])
            for w in (0, 1)}  # fmt: skip
    for w, r in best.items():
        print(f"REDIS_WAIT_REPLICAS={w}: p50 {r['p50_us']} us, p99 {r['p99_us']} us, "
              f"mean {r['mean_us']} us, {r['commands_per_transition']} commands per transition")  # fmt: skip
    print(json.dumps({"transitions": args.transitions, "runs": runs,
                      "added_p50_us": round(best[1]["p50_us"] - best[0]["p50_us"], 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
