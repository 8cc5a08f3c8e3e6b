"""Redis commands per step: what each step of a job costs the job store, counted exactly.

    .venv/bin/python -m bench.steps --jobs 50      (bench/overhead.py runs it after its jobs)

It runs the real steps, in this process, against a Redis nothing else uses while it counts (the
workers are stopped), the emulator and S3 named by the environment (``REDIS_URL``,
``DASHSCOPE_BASE_URL``, ... as the workers get them; ``BENCH_IMAGE_URL`` and
``BENCH_TEMPLATE_ID`` name the job's inputs). Jobs go one after another: intake (what
``animate.generate`` runs), then each step the previous one asked for, as its Celery task runs
it (inside the task's metrics batch), waiting out its countdown; side wake-ups (admissions) are
run too. ``INFO commandstats`` is read before and after every step, so each command Redis ran,
commands inside Lua scripts included, is charged to the step that caused it.

Not counted here: Celery's own commands (delivering, acknowledging, the task events, the result
backend's SETEX/PUBLISH are counted: they are our delivery), which bench/overhead.py measures as
its no-op floor; and the metrics flush. Each process holds its step metrics for
``METRICS_FLUSH_SECONDS`` and sends them summed (one transaction a second per busy process):
this run holds them to its end and prints that one flush's size.

The last line printed is one JSON object: per step, calls per job, commands per call and per
job, and the commands it ran most.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import redis

EXCLUDED = {"info"}  # the counting itself


def commandstats(client: redis.Redis) -> Counter[str]:
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def trace(jobs: int, image_url: str, template_id: str, detail: bool = False) -> dict[str, Any]:
    # Imported here: settings are read from the environment at import.
    from config.celery_app import app
    from workers import bootstrap, steps
    from workers.entrypoints.celery.results import CeleryResults
    from workers.steps.context import Next
    from workers.steps.table import STEPS

    due: list[tuple[float, int, Next]] = []
    order = itertools.count()

    def wake(step: Next | None) -> None:
        if step is not None:
            heapq.heappush(due, (time.monotonic() + step.countdown, next(order), step))

    bootstrap.install(wake=wake, results=CeleryResults(app))
    svc = bootstrap.services()
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    batch = svc.metrics.batch
    calls: Counter[str] = Counter()
    per_step: dict[str, Counter[str]] = {}

    def charged(name: str, run: Any) -> Any:
        before = commandstats(client)
        with batch():
            result = run()
        delta = commandstats(client) - before
        for excluded in EXCLUDED:
            delta.pop(excluded, None)
        calls[name] += 1
        per_step.setdefault(name, Counter()).update(delta)
        return result

    for i in range(jobs):
        kwargs = {"image_url": image_url, "template_id": template_id, "detect": False,
                  "job_id": f"steps-{os.getpid()}-{i:05d}"}  # fmt: skip
        intake = charged("intake", lambda: steps.intake(svc, kwargs, (), f"msg-{i}"))  # noqa: B023
        wake(intake.next)
        while due:
            when, _, step = heapq.heappop(due)
            time.sleep(max(0.0, when - time.monotonic()))
            row = STEPS[step.step]
            wake(charged(step.step, lambda: row.run(svc, step.job_id, step.version)))  # noqa: B023
    before = commandstats(client)
    flush = getattr(svc.metrics, "flush", None)
    if flush is not None:
        flush()
    flushed = sum((commandstats(client) - before).values()) - 1
    rows = {
        name: {
            "calls_per_job": round(calls[name] / jobs, 3),
            "commands_per_call": round(sum(c.values()) / calls[name], 1),
            "commands_per_job": round(sum(c.values()) / jobs, 1),
            "evalsha_per_job": round(c.get("evalsha", 0) / jobs, 2),
            "top": [(cmd, round(n / jobs, 2)) for cmd, n in c.most_common(None if detail else 6)],
        }
        for name, c in per_step.items()
    }
    return {
        "jobs": jobs,
        "steps": rows,
        "commands_per_job": round(sum(sum(c.values()) for c in per_step.values()) / jobs, 1),
        "metrics_flush_commands": flushed,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\nRedis commands per step ({result['jobs']} jobs, Lua scripts' own commands included; "
          "Celery's not)")  # fmt: skip
    print(f"  {'step':<10} {'calls/job':>9} {'cmds/call':>9} {'cmds/job':>9}  top commands per job")
    for name, row in result["steps"].items():
        top = ", ".join(f"{cmd} {n:g}" for cmd, n in row["top"])
        print(f"  {name:<10} {row['calls_per_job']:>9} {row['commands_per_call']:>9} "
              f"{row['commands_per_job']:>9}  {top}")  # fmt: skip
    print(f"  {'all steps':<10} {'':>9} {'':>9} {result['commands_per_job']:>9}")
    print(
        f"  one metrics flush (everything this run held): {result['metrics_flush_commands']} "
        "commands"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--detail", action="store_true", help="every command of each step")
    args = parser.parse_args()
    result = trace(
        args.jobs, os.environ["BENCH_IMAGE_URL"], os.environ["BENCH_TEMPLATE_ID"], args.detail
    )
    print_table(result)
    print(json.dumps(result), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
