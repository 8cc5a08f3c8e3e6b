"""Quota benchmark: this system against the physical limit and against the SDK a user would write.

    .venv/bin/python bench/quota.py [--jobs 60] [--generation-seconds 2] [--queued 10000]
    .venv/bin/python bench/quota.py --model wan2.2-animate-move    (the successor: 5 submits/s)

Real processes throughout: two Celery worker processes, a redis-server, moto's S3 server and the
DashScope emulator with its default quotas (1 submit/s, 1 running task, 20 queries/s). Prints
figures as it goes; the last line is one JSON object.

* limit: the makespan if DashScope's one slot were never idle (the sum of the tasks' run times).
* this system: makespan from the first enqueue to the last STORED, its ratio to the limit, the
  slot's idle time, the delay from a task's remote end to its copy starting, queries per job, 429s.
* the SDK baseline: one thread per job, ``VideoSynthesis.async_call(..., task="image2video")`` then
  ``wait``, against a fresh emulator with the same settings.
* 10,000 queued jobs: Redis memory per job, and the worker CPU and DashScope queries they cost
  while they wait behind a long-running task.

``--model wan2.2-animate-move`` (or ``-mix``) runs "this system" on a Wan2.2-Animate deployment:
each job sends the image, a 2-second dance and ``mode=wan-std`` in one call (no template), under
that model's quotas (5 submits/s, one running task). The SDK baseline and the queued part are
AnimateAnyone's only.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

from devstack import RedisServer, S3Server, Worker
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from workers.adapters.redis.governor import RedisGovernor
from workers.adapters.redis.store import RedisJobStore
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import JobState
from workers.producer import AnimateQueue

API_KEY = "sk-bench-quota-0000000001"
BUCKET = "bench-quota"


def emulator_config(generation: float) -> EmulatorConfig:
    # Default quotas; only the task time is scaled down (the real service takes minutes).
    return EmulatorConfig(
        preprocess_seconds=0.1,
        generation_seconds=generation - 0.2,
        postprocess_seconds=0.1,
        template_seconds=0.5,
        video_short_side=144,
    )


def seed(emulator: EmulatorServer) -> tuple[str, str]:
    with httpx.Client(base_url=emulator.url, timeout=10) as http:
        template = http.post("/_emulator/templates", json={"api_key": API_KEY, "seconds": 2})
        image = f"{emulator.url}/_emulator/samples/person.png?width=256&height=512"
        return str(template.json()["template_id"]), image


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children (the prefork pool), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run_system(args: argparse.Namespace) -> dict[str, Any]:
    with (
        RedisServer() as rs,
        S3Server() as s3,
        EmulatorServer(emulator_config(args.generation_seconds)) as emulator,
    ):
        s3.create_bucket(BUCKET)
        env = {
            "REDIS_URL": rs.url,
            "DASHSCOPE_API_KEY": API_KEY,
            "DASHSCOPE_BASE_URL": emulator.base_url,
            "S3_BUCKET": BUCKET,
            "URL_ALLOWLIST": "127.0.0.1",  # the emulator runs on loopback
            "AWS_ENDPOINT_URL": s3.endpoint,
            **S3Server.CREDENTIALS,
            "DASHSCOPE_MODEL": args.model,
        }
        workers = [Worker(env, concurrency=2, name=f"bench{i}@%h") for i in range(2)]
        for w in workers:
            w.start()
        try:
            template, image = seed(emulator)
            queue = AnimateQueue(rs.url, model=args.model)
            started = time.time()
            if wan(args):
                dance = f"{emulator.url}/_emulator/samples/dance.mp4?seconds=2&width=256&height=512"
                ids = [queue.generate(image, video=dance, mode="wan-std", job_id=f"bench-{i:04d}")
                       for i in range(args.jobs)]  # fmt: skip
            else:
                ids = [queue.submit(image, template, job_id=f"bench-{i:04d}")
                       for i in range(args.jobs)]  # fmt: skip
            views = [queue.wait(i, timeout=args.jobs * 30, interval=0.2) for i in ids]
            ended = max(v["finished_at"] or 0 for v in views)
            makespan = ended - started
            with httpx.Client(base_url=emulator.url, timeout=10) as http:
                tasks = http.get("/_emulator/tasks").json()
                stats = http.get("/_emulator/stats").json()["totals"]
            busy = sum(t["end_time"] - t["scheduled_time"] for t in tasks)
            first_start = min(t["scheduled_time"] for t in tasks)
            last_end = max(t["end_time"] for t in tasks)
            delays = [
                v["copy_started_at"] - v["remote_ended_at"]
                for v in views
                if v["copy_started_at"] and v["remote_ended_at"]
            ]
            result = {
                "model": args.model,
                "jobs": args.jobs,
                "makespan_s": round(makespan, 2),
                "limit_s": round(busy, 2),
                "ratio_to_limit": round(makespan / busy, 4),
                "slot_idle_s": round((last_end - first_start) - busy, 2),
                "throttled_429": int(stats.get("throttled", 0)),
                "copy_delay_p50_s": round(percentile(delays, 50), 3),
                "copy_delay_p95_s": round(percentile(delays, 95), 3),
                "queries_per_job": round(stats.get("queries", 0) / args.jobs, 2),
                "lost": sum(v["state"] != "STORED" for v in views),
                "double_submissions": int(stats.get("submitted", 0)) - args.jobs,
            }
            print("this system:", json.dumps(result), flush=True)
            if args.queued and not wan(args):
                result["queued_10k"] = run_queued(args, rs, emulator, workers, template, image)
            queue.close()
            return result
        finally:
            for w in workers:
                w.stop()


def wan(args: argparse.Namespace) -> bool:
    return bool(args.model.startswith("wan"))


def run_queued(
    args: argparse.Namespace,
    rs: RedisServer,
    emulator: EmulatorServer,
    workers: list[Worker],
    template: str,
    image: str,
) -> dict[str, Any]:
    """Many jobs waiting in our queue behind a long task: memory per job, CPU and queries spent."""
    http = httpx.Client(base_url=emulator.url, timeout=10)
    http.patch("/_emulator/config", json={"generation_seconds": 60})
    queue = AnimateQueue(rs.url)
    blockers = [queue.submit(image, template, job_id=f"blocker-{i}") for i in range(2)]
    while not all((queue.get(b) or {}).get("state") == "SUBMITTED" for b in blockers):
        time.sleep(0.1)
    client = redis.Redis.from_url(rs.url)
    store = RedisJobStore(client, prefix="animate-queue", final_ttl=0)
    governor = RedisGovernor(client, prefix="animate-queue", model="animate-anyone-gen2",
                             rates={"submit": 0.8, "query": 15, "detect": 4}, capacity=2)  # fmt: skip
    client.execute_command("MEMORY", "PURGE")
    before = int(client.info("memory")["used_memory"])
    now = time.time()
    for i in range(args.queued):
        # Exactly what intake leaves behind for a valid job: its record and a queue entry.
        job_id = f"queued-{uuid.uuid4()}"
        request = JobRequest(image, template, job_id=job_id, metadata={"order": i},
                             producer=f"team-{i % 7}")  # fmt: skip
        job = Job(
            job_id, JobState.QUEUED, 1, request, now, now, intake_message_id=str(uuid.uuid4())
        )
        store.create(job)
        governor.enqueue(job)
    after = int(client.info("memory")["used_memory"])
    queries_before = http.get("/_emulator/stats").json()["totals"].get("queries", 0)
    cpu_before = sum(cpu_seconds(w.proc.pid) for w in workers if w.proc)
    time.sleep(args.idle_seconds)
    cpu_after = sum(cpu_seconds(w.proc.pid) for w in workers if w.proc)
    queries_after = http.get("/_emulator/stats").json()["totals"].get("queries", 0)
    result = {
        "queued": args.queued,
        "redis_bytes_per_job": round((after - before) / args.queued),
        "window_s": args.idle_seconds,
        "worker_cpu_s": round(cpu_after - cpu_before, 3),
        "queries_per_s": round((queries_after - queries_before) / args.idle_seconds, 2),
        "queue_depth": governor.account_view("default")["queued"],
    }
    print("queued jobs:", json.dumps(result), flush=True)
    http.close()
    queue.close()
    return result


def run_sdk(args: argparse.Namespace) -> dict[str, Any]:
    """What a user would write today with the official SDK: a thread per job."""
    import dashscope
    from dashscope import VideoSynthesis

    with EmulatorServer(emulator_config(args.generation_seconds)) as emulator:
        template, image = seed(emulator)
        dashscope.base_http_api_url = emulator.base_url
        outcomes: list[str] = []
        lock = threading.Lock()

        def one() -> None:
            try:
                rsp = VideoSynthesis.async_call(
                    model="animate-anyone-gen2",
                    task="image2video",
                    api_key=API_KEY,
                    extra_input={"image_url": image, "template_id": template},
                )
                if rsp.status_code != 200:
                    outcome = f"submit {rsp.status_code} {rsp.code}"
                else:
                    done = VideoSynthesis.wait(rsp, api_key=API_KEY)
                    outcome = (
                        done.output.task_status
                        if done.status_code == 200
                        else f"wait {done.status_code} {done.code}"
                    )
            except Exception as exc:  # a user's thread would die with it
                outcome = f"exception {type(exc).__name__}"
            with lock:
                outcomes.append(outcome)

        started = time.time()
        threads = [threading.Thread(target=one) for _ in range(args.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        makespan = time.time() - started
        with httpx.Client(base_url=emulator.url, timeout=10) as http:
            stats = http.get("/_emulator/stats").json()["totals"]
        failed = sum(o != "SUCCEEDED" for o in outcomes)
        kinds: dict[str, int] = {}
        for o in outcomes:
            kinds[o] = kinds.get(o, 0) + 1
        result = {
            "jobs": args.jobs,
            "makespan_s": round(makespan, 2),
            "throttled_429": int(stats.get("throttled", 0)),
            "failed_jobs": failed,
            "succeeded": args.jobs - failed,
            "queries_per_job": round(stats.get("queries", 0) / args.jobs, 2),
            "outcomes": kinds,
        }
        print("sdk baseline:", json.dumps(result), flush=True)
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--generation-seconds", type=float, default=2.0)
    parser.add_argument("--queued", type=int, default=10_000, help="0 skips that part")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--skip-sdk", action="store_true")
    parser.add_argument(
        "--model", default="animate-anyone-gen2",
        choices=["animate-anyone-gen2", "wan2.2-animate-move", "wan2.2-animate-mix"],
    )  # fmt: skip
    args = parser.parse_args()
    result = run_system(args)
    result["sdk_baseline"] = None if args.skip_sdk or wan(args) else run_sdk(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
