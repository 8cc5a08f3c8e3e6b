"""Orchestration overhead: what one job costs us, against Celery's own floor for the same messages.

    .venv/bin/python -m bench.overhead [--jobs 5000] [--remote-slots 64] [--quick]

Real processes: a redis-server (broker, result backend and job store), moto's S3 server and the
DashScope emulator (each in a child process of its own, off this process's GIL), and
``--workers`` Celery worker processes (``devstack.Worker``, ``-c --concurrency`` each: by
default 2 x 1, one pool process per core). The emulator runs ``--remote-slots`` tasks at once (a
dedicated deployment's concurrency) with quotas off and near-zero task time, and renders a small
video (144p, a few kB). The workers' admission capacity is the same number
(``DASHSCOPE_CONCURRENCY``); their own quota buckets are far above what they can spend.

1. Our jobs: ``animate.generate`` through ``AnimateQueue.generate`` with a template id and
   ``detect=False`` (the pure intake -> submit -> poll -> copy path; the image is still fetched
   and checked at intake, as for every job), after a warm-up. Jobs are fed so that at most
   ``--outstanding`` are unfinished (default: twice the admission capacity, so a backlog always
   waits for the slots); feeding stops at ``--jobs`` or when ``--budget`` seconds have passed
   (then fewer jobs go through, and the output says so), and every job fed is waited for, so each
   figure covers whole jobs. The clock runs from the first enqueue to the last ``finished_at``.
2. Celery's floor: the same worker settings and topology running ``bench/noop_app.py`` (its own
   Redis database on the same server): ``jobs x messages_per_job`` messages (at most
   ``--noop-max``) sent by us, the workers only receive, run and acknowledge them; with
   ``--chain``, also as chains whose links each send the next from the worker.

Figures: jobs/s; worker CPU ms per job (every process of each worker's process group, from
/proc); Redis commands per job (``total_commands_processed``, commands run inside Lua scripts
included) with the top commands by calls and by time (``INFO commandstats``); Celery messages per
job: every message is one LPUSH (Redis counts them exactly), and by task from the workers' own
``Task <name>[<id>] received`` log lines (stale wake-ups included);
``ratio_to_noop_floor`` = (our wall time / our messages) / (no-op wall time / no-op messages), our
time per message over Celery's floor per message; ``jobs_ratio_to_noop_floor`` = our time per job
over the floor's time for the design's minimum of 4 messages. ``--profile DIR`` runs py-spy on
the workers; ``--flower`` runs Flower (one more subscriber to every task event) during our jobs.
The last line printed is one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as bench/overhead.py: the repository root goes first on the path, and bench/ off it
    # (a bench/copy_speed.py there would shadow the standard library's copy module).
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

import argparse
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from bench import common
from devstack import Flower, RedisServer
from emulator.config import EmulatorConfig
from workers.producer import AnimateQueue

BUCKET = "bench-overhead"
FINAL = ("STORED", "FAILED", "REJECTED", "CANCELED", "EXPIRED")
DESIGN_MIN_MESSAGES = 4  # generate, submit, one poll, copy (detect=False, remote task already done)
QUEUES = ("celery", "dashscope", "transfer")


def emulator_config(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        submit_rate=0,  # 0: unlimited
        query_rate=0,
        detect_rate=0,
        policy_rate=0,
        concurrency=args.remote_slots,
        preprocess_seconds=0.0,
        generation_seconds=args.generation_seconds,
        postprocess_seconds=0.0,
        template_seconds=0.1,
        video_short_side=144,
    )


def worker_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dashscope_concurrency": args.remote_slots,
        # Our own buckets far above what two cores can spend: we measure us, not a quota.
        "dashscope_submit_rate": 100_000,
        "dashscope_query_rate": 100_000,
        "dashscope_detect_rate": 100_000,
        # The remote task is over long before the first poll: one poll per job.
        "poll_first_seconds": args.poll_first,
        "poll_running_seconds": 0.5,
        "poll_pending_seconds": 0.5,
        "poll_pending_max_seconds": 2,
        "log_level": args.log_level,
    }


# ----------------------------------------------------------------------------- our jobs


def final_count(client: redis.Redis) -> int:
    counts = common.job_counts(client)
    return sum(counts[s] for s in FINAL)


def wait_final(client: redis.Redis, total: int, budget: float) -> bool:
    """Until ``total`` jobs are final (True), or the budget is spent (False)."""
    deadline = time.monotonic() + budget
    while final_count(client) < total:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


def job_facts(client: redis.Redis, ids: list[str]) -> dict[str, Any]:
    pipe = client.pipeline()
    for job_id in ids:
        pipe.hmget(f"{common.PREFIX}:job:{job_id}", "state", "finished_at", "created_at", "polls")
    rows = pipe.execute()
    states = Counter((r[0] or b"?").decode() for r in rows)
    finished = [float(r[1]) for r in rows if r[1]]
    latency = [float(r[1]) - float(r[2]) for r in rows if r[1] and r[2]]
    polls = [int(r[3] or 0) for r in rows if r[1]]
    return {
        "states": dict(states),
        "finished": len(finished),
        "last_finished": max(finished) if finished else float("nan"),
        "latency_p50_s": common.percentile(latency, 50),
        "latency_p99_s": common.percentile(latency, 99),
        "polls_per_job": sum(polls) / max(1, len(polls)),
    }


def outstanding_limit(args: argparse.Namespace) -> int:
    """Jobs enqueued but not final at any time: twice what admission lets go to DashScope (its
    capacity is DASHSCOPE_CONCURRENCY + ADMISSION_LOOKAHEAD = slots + 1), so a queue of jobs
    always waits for the slots, as with a long backlog (queued jobs cost nothing)."""
    if args.outstanding:
        return int(args.outstanding)
    return 2 * (int(args.remote_slots) + 1) + 2 * int(args.workers) * int(args.concurrency)


def feed(
    client: redis.Redis,
    enqueue: Callable[[int, str, int], list[str]],
    args: argparse.Namespace,
    already: int,
    stop_at: float,
) -> list[str]:
    """Enqueue ``--jobs`` jobs, keeping at most ``outstanding_limit`` of them unfinished, until
    all are enqueued or ``stop_at`` (the budget) passes; the ids enqueued. Every job enqueued is
    then waited for, so each figure covers whole jobs only."""
    limit = outstanding_limit(args)
    ids: list[str] = []
    while len(ids) < args.jobs and time.time() < stop_at:
        room = limit - (len(ids) - (final_count(client) - already))
        if room > 0:
            ids += enqueue(min(room, args.jobs - len(ids)), "job", len(ids))
        else:
            time.sleep(0.05)
    return ids


def side_cpu(rs: RedisServer, s3: Any, emulator: Any, flower: Flower | None) -> dict[str, float]:
    """CPU seconds of everything else on the machine that takes part."""
    cpu = {
        "redis": common.pid_sample(rs.proc.pid).cpu_s if rs.proc else 0.0,
        "emulator": emulator.cpu_s(),
        "s3": s3.cpu_s(),
        "benchmark": common.self_cpu(),
    }
    if flower is not None and flower.proc is not None:
        cpu["flower"] = common.pid_sample(flower.proc.pid).cpu_s
    return cpu


def run_ours(args: argparse.Namespace, rs: RedisServer) -> dict[str, Any]:
    client = redis.Redis.from_url(rs.url)
    with (
        common.s3_child(BUCKET) as s3,
        common.emulator_child(emulator_config(args)) as emulator,
    ):
        template, image = common.seed_emulator(emulator.address)
        env = common.worker_env(
            rs.url, emulator.address, s3.address, BUCKET, **worker_settings(args)
        )
        workers = common.design_workers(env, args.workers, args.concurrency, "overhead")
        common.start_all(workers)
        # Flower, as operators run it: one more subscriber to every task event.
        flower = Flower({**env, "FLOWER_ALLOW_NO_AUTH": "true"}).start() if args.flower else None
        queue = AnimateQueue(rs.url)

        def enqueue(n: int, tag: str, first: int) -> list[str]:
            return [
                queue.generate(image, template_id=template, detect=False, job_id=f"{tag}-{i:06d}")
                for i in range(first, first + n)
            ]

        try:
            # Warm-up: imports, connection pools, boto3 clients, the emulator's render cache.
            warm = max(4, 2 * args.workers * args.concurrency)
            enqueue(warm, "warm", 0)
            if not wait_final(client, warm, 120):
                raise RuntimeError("the warm-up jobs did not finish")
            common.wait_drained(client, QUEUES, 60)
            groups = common.pgids(workers)
            offsets = common.log_offsets(workers)
            profiler = common.Profiler(workers, args.profile) if args.profile else None
            if profiler is not None:
                profiler.start()
            cpu0 = common.group_sample(groups).cpu_s
            side0 = side_cpu(rs, s3, emulator, flower)
            redis0 = common.redis_snapshot(client)
            queries0 = common.emulator_stats(emulator.address).get("queries", 0)
            started = time.time()
            ids = feed(client, enqueue, args, warm, started + args.budget)
            if not wait_final(client, warm + len(ids), args.timeout):
                raise RuntimeError(f"the fed jobs were not final after {args.timeout:.0f} s")
            # Stale wake-ups sent for these jobs still count as their messages.
            common.wait_drained(client, QUEUES, 120)
            cpu1 = common.group_sample(groups).cpu_s
            side1 = side_cpu(rs, s3, emulator, flower)
            redis1 = common.redis_snapshot(client)
            if profiler is not None:
                profiler.stop()
            queries1 = common.emulator_stats(emulator.address).get("queries", 0)
            facts = job_facts(client, ids)
            by_task = common.received_by_task(workers, offsets)
        finally:
            queue.close()
            common.stop_all(workers)
            if flower is not None:
                flower.stop()
        by_step = step_breakdown(args, env, image, template)
    done = len(ids)
    wall = facts["last_finished"] - started
    delta = redis1.minus(redis0)
    per = max(1, done)
    messages = delta.per_command.get("lpush", 0)  # every message published is one LPUSH
    return {
        "jobs": done,
        "complete": done == args.jobs,
        "outstanding_max": outstanding_limit(args),
        "wall_s": wall,
        "jobs_per_s": done / wall,
        "cpu_ms_per_job": (cpu1 - cpu0) * 1000 / per,
        "redis_commands_per_job": delta.commands / per,
        "evalsha_per_job": delta.per_command.get("evalsha", 0) / per,
        "top_commands_per_job": common.top_commands(delta, per),
        "messages": messages,
        "messages_per_job": messages / per,
        "received_by_task_per_job": {k: round(v / per, 3) for k, v in sorted(by_task.items())},
        "received": sum(by_task.values()),
        "states": facts["states"],
        "polls_per_job": facts["polls_per_job"],
        "remote_queries_per_job": (queries1 - queries0) / per,
        "latency_p50_s": facts["latency_p50_s"],
        "latency_p99_s": facts["latency_p99_s"],
        "side_cpu_s": {k: side1[k] - side0[k] for k in side0},
        "usec_per_job": common.top_usec(delta, per),
        "profile": profiler.summary() if profiler is not None else None,
        "by_step": by_step,
    }


def step_breakdown(
    args: argparse.Namespace, env: dict[str, str], image: str, template: str
) -> dict[str, Any] | None:
    """bench/steps.py on the same Redis, emulator and S3, the workers stopped: Redis commands
    per step, counted exactly. Its first poll comes sooner (the jobs go one after another)."""
    if args.steps_jobs <= 0:
        return None
    trace_env = {**os.environ, **env, "BENCH_IMAGE_URL": image, "BENCH_TEMPLATE_ID": template,
                 "METRICS_FLUSH_SECONDS": "60", "POLL_FIRST_SECONDS": "0.2",
                 "PYTHONPATH": str(common.REPO)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "bench.steps", "--jobs", str(args.steps_jobs),
         *(["--detail"] if args.steps_detail else [])],
        env=trace_env, capture_output=True, text=True, timeout=args.timeout, cwd=common.REPO,
    )  # fmt: skip
    if done.returncode != 0:
        print(f"bench.steps failed:\n{done.stderr[-3000:]}", flush=True)
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------- Celery's floor


def run_noop(args: argparse.Namespace, rs: RedisServer, total: int, hops: int) -> dict[str, Any]:
    """``total`` no-op messages, flat (all sent by us) and, with ``--chain``, as chains of
    ``hops`` links, through workers like ours (``bench/noop_app.py``, Redis database 1)."""
    url = f"redis://127.0.0.1:{rs.port}/1"
    client = redis.Redis.from_url(url)
    producer = Celery("bench-noop-producer", broker=url)
    producer.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_send_sent_event=True,  # as AnimateQueue sends
        broker_connection_retry_on_startup=True,
    )
    workers = [
        common.NoopWorker(
            {"NOOP_BROKER_URL": url}, concurrency=args.concurrency, name=f"noop{i}@%h"
        )
        for i in range(args.workers)
    ]
    out: dict[str, Any] = {}
    common.start_all(workers)
    try:
        for _ in range(20):  # warm-up
            producer.send_task("bench.noop", queue="celery")
        common.wait_drained(client, QUEUES, 60)
        groups = common.pgids(workers)
        chains = max(1, round(total / hops))
        modes = [("flat", total, 1)] + ([("chain", chains, hops)] if args.chain else [])
        for mode, sends, links in modes:
            cpu0 = common.group_sample(groups).cpu_s
            redis0 = common.redis_snapshot(client)
            started = time.time()
            for _ in range(sends):
                if links == 1:
                    producer.send_task("bench.noop", queue="celery")
                else:
                    producer.send_task("bench.hop", args=(links, "celery"), queue="celery")
            expected = sends * links
            deadline = time.monotonic() + args.timeout
            while (
                common.redis_snapshot(client).per_command.get("lpush", 0)
                - redis0.per_command.get("lpush", 0)
                < expected
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no-op {mode}: not all {expected} messages were sent")
                time.sleep(0.2)
            ended = common.wait_drained(client, QUEUES, args.timeout)
            cpu1 = common.group_sample(groups).cpu_s
            delta = common.redis_snapshot(client).minus(redis0)
            wall = ended - started
            out[mode] = {
                "messages": expected,
                "wall_s": wall,
                "ms_per_message": wall * 1000 / expected,
                "cpu_ms_per_message": (cpu1 - cpu0) * 1000 / expected,
                "redis_commands_per_message": delta.commands / expected,
            }
    finally:
        common.stop_all(workers)
        producer.close()
        client.close()
    return out


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="30 jobs, 2,000 no-ops: a smoke test")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--concurrency", type=int, default=1, help="pool size of each worker")
    parser.add_argument(
        "--remote-slots",
        type=int,
        default=64,
        help="tasks DashScope runs at once (emulator) = DASHSCOPE_CONCURRENCY (admission)",
    )
    parser.add_argument("--generation-seconds", type=float, default=0.05)
    parser.add_argument("--poll-first", type=float, default=1.0, help="POLL_FIRST_SECONDS")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of the workers")
    parser.add_argument(
        "--budget",
        type=float,
        default=360,
        help="seconds to feed jobs; jobs not yet enqueued by then are left out (and reported)",
    )
    parser.add_argument(
        "--outstanding", type=int, default=0, help="most jobs unfinished at once (0: automatic)"
    )
    parser.add_argument("--profile", type=Path, help="py-spy the workers into this directory")
    parser.add_argument("--flower", action="store_true", help="run Flower during our jobs")
    parser.add_argument(
        "--noop-max", type=int, default=30_000, help="at most this many no-op messages"
    )
    parser.add_argument("--chain", action="store_true", help="also time no-op chains")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for a phase")
    parser.add_argument("--skip-noop", action="store_true")
    parser.add_argument(
        "--steps-jobs", type=int, default=50,
        help="jobs for the per-step breakdown (bench/steps.py); 0: none",
    )  # fmt: skip
    parser.add_argument("--steps-detail", action="store_true", help="every command, per step")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.noop_max, args.steps_jobs = 30, 2000, min(args.steps_jobs, 5)
    n = args.jobs
    with RedisServer() as rs:
        ours = run_ours(args, rs)
        latency = f"{ours['latency_p50_s']:.2f} s / {ours['latency_p99_s']:.2f} s"
        title = (
            f"our jobs: {n} through {args.workers} workers x {args.concurrency} "
            f"(remote slots {args.remote_slots}, first poll {args.poll_first} s)"
        )
        cut = "" if ours["complete"] else f" (the {args.budget:.0f} s budget was spent first)"
        common.table(
            title,
            [
                ("jobs through", f"{ours['jobs']} of {n}{cut}"),
                ("  most unfinished at once", ours["outstanding_max"]),
                ("wall time", common.fmt(ours["wall_s"], " s")),
                ("jobs/s", common.fmt(ours["jobs_per_s"])),
                ("worker CPU per job", common.fmt(ours["cpu_ms_per_job"], " ms")),
                ("Redis commands per job", common.fmt(ours["redis_commands_per_job"], "", 1)),
                ("  of which EVALSHA (Lua)", common.fmt(ours["evalsha_per_job"], "", 2)),
                ("  top commands per job", ours["top_commands_per_job"]),
                ("  Redis time per job (us)", ours["usec_per_job"]),
                ("Celery messages per job", common.fmt(ours["messages_per_job"], "", 3)),
                ("  received, by task", ours["received_by_task_per_job"]),
                ("  design minimum", DESIGN_MIN_MESSAGES),
                ("DashScope polls per job", common.fmt(ours["polls_per_job"], "", 3)),
                ("DashScope queries per job", common.fmt(ours["remote_queries_per_job"], "", 3)),
                ("job latency p50 / p99", latency),
                ("job states", ours["states"]),
                ("CPU elsewhere (s)", {k: round(v, 1) for k, v in ours["side_cpu_s"].items()}),
            ],
        )
        if ours["by_step"] is not None:
            from bench.steps import print_table

            print_table(ours["by_step"])
        hops = max(1, round(ours["messages_per_job"]))
        total = max(1, min(args.noop_max, ours["messages"]))
        floor = None if args.skip_noop else run_noop(args, rs, total, hops)
    if ours["profile"] is not None:
        common.table("py-spy: share of worker samples (CPU)", list(ours["profile"].items()))
    ours_ms = ours["wall_s"] * 1000 / max(1, ours["messages"])
    ours_cpu_ms = ours["cpu_ms_per_job"] / max(1e-9, ours["messages_per_job"])
    result: dict[str, Any] = {
        "jobs": n,
        "jobs_through": ours["jobs"],
        "complete": ours["complete"],
        "workers": args.workers,
        "concurrency": args.concurrency,
        "remote_slots": args.remote_slots,
        "flower": args.flower,
        "jobs_per_s": common.finite(ours["jobs_per_s"], 2),
        "cpu_ms_per_job": common.finite(ours["cpu_ms_per_job"], 2),
        "redis_commands_per_job": common.finite(ours["redis_commands_per_job"], 1),
        "messages_per_job": common.finite(ours["messages_per_job"], 3),
        "design_min_messages_per_job": DESIGN_MIN_MESSAGES,
        "ms_per_message": common.finite(ours_ms, 3),
        "cpu_ms_per_message": common.finite(ours_cpu_ms, 3),
        "ratio_to_noop_floor": None,
    }
    if floor is not None:
        flat = floor["flat"]
        common.table(
            f"Celery's floor: {total} no-op messages"
            + (f" (chain: {hops}-link chains)" if args.chain else ""),
            [
                (f"{mode} {what}", common.fmt(row[key], unit, 3))
                for mode, row in floor.items()
                for what, key, unit in (
                    ("wall time", "wall_s", " s"),
                    ("time per message", "ms_per_message", " ms"),
                    ("worker CPU per message", "cpu_ms_per_message", " ms"),
                    ("Redis commands per message", "redis_commands_per_message", ""),
                )
            ],
        )
        result.update(
            noop_messages=total,
            noop_ms_per_message=common.finite(flat["ms_per_message"], 3),
            noop_cpu_ms_per_message=common.finite(flat["cpu_ms_per_message"], 3),
            ratio_to_noop_floor=common.finite(ours_ms / flat["ms_per_message"], 2),
            cpu_ratio_to_noop_floor=common.finite(ours_cpu_ms / flat["cpu_ms_per_message"], 2),
            jobs_ratio_to_noop_floor=common.finite(
                ours_ms * ours["messages_per_job"] / (flat["ms_per_message"] * DESIGN_MIN_MESSAGES),
                2,
            ),
            ratio_definition=(
                "ratio_to_noop_floor = (our wall time / our messages) / (no-op wall time / "
                "no-op messages); jobs_ratio_to_noop_floor = our wall time per job / (no-op "
                f"time per message x {DESIGN_MIN_MESSAGES}, the design's minimum messages per job)"
            ),
        )
        rows = [
            ("ours", f"{ours_ms:.3f} ms wall, {ours_cpu_ms:.3f} ms worker CPU"),
            ("ratio to the no-op floor (wall)", result["ratio_to_noop_floor"]),
            ("ratio to the no-op floor (worker CPU)", result["cpu_ratio_to_noop_floor"]),
            ("per job vs floor x design minimum", result["jobs_ratio_to_noop_floor"]),
        ]
        if "chain" in floor:
            result["ratio_to_noop_chain"] = common.finite(
                ours_ms / floor["chain"]["ms_per_message"], 2
            )
            rows.append(("ratio to the no-op chain (wall)", result["ratio_to_noop_chain"]))
        common.table("per message: ours vs Celery's floor", rows)
    result["received_by_task_per_job"] = ours["received_by_task_per_job"]
    result["polls_per_job"] = common.finite(ours["polls_per_job"], 3)
    result["latency_p99_s"] = common.finite(ours["latency_p99_s"], 2)
    if ours["by_step"] is not None:
        result["redis_commands_by_step"] = {
            name: row["commands_per_job"] for name, row in ours["by_step"]["steps"].items()
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
