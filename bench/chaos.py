"""Chaos benchmark: jobs through faults, SIGKILLed workers, a Redis restart and an S3 outage.

    .venv/bin/python bench/chaos.py [--jobs 300] [--seed 1]

Real processes: three Celery workers (one SIGKILLed and replaced every few seconds), a beat for
the watchdog, a redis-server with AOF (restarted once), moto's S3 server (down for 20 s), and the
emulator with faults on (5% 5xx, 5% 429, 2% dropped connections, 3% slow answers, 3% FAILED
tasks). It reports jobs by final state, lost jobs, double submissions, S3 objects that differ
from what the emulator served, and how long the system took to move again after each fault.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import threading
import time
from typing import Any

import httpx

from devstack import Beat, RedisServer, S3Server, Worker, free_port
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from workers.producer import AnimateQueue

API_KEY = "sk-chaos-000000000000001"
BUCKET = "chaos"
FINAL = {"STORED", "FAILED", "REJECTED", "CANCELED", "EXPIRED"}


class Chaos:
    """Runs the faults on a timeline in a background thread, noting when each happened."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], redis_server: RedisServer,
                 s3: S3Server, workers: list[Worker]) -> None:  # fmt: skip
        self.args = args
        self.env = env
        self.redis_server = redis_server
        self.s3 = s3
        self.workers = workers
        self.rng = random.Random(args.seed)
        self.events: list[tuple[str, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.kills = 0

    def note(self, what: str) -> None:
        self.events.append((what, time.time()))
        print(f"chaos: {what}", flush=True)

    def run(self) -> None:
        start = time.monotonic()
        redis_done = s3_done = False
        while not self.stop.wait(self.args.kill_every):
            elapsed = time.monotonic() - start
            victim = self.rng.randrange(len(self.workers))
            self.workers[victim].kill()
            self.kills += 1
            self.note(f"SIGKILL worker {victim}")
            self.workers[victim] = Worker(
                self.env, concurrency=2, name=f"chaos{victim}-{self.kills}@%h"
            )
            self.workers[victim].start()
            if not redis_done and elapsed > self.args.redis_restart_at:
                redis_done = True
                self.redis_server.stop()  # SIGTERM: Redis writes its AOF and exits
                self.note("redis stopped")
                time.sleep(2)
                self.redis_server.start()
                self.note("redis restarted")
            if not s3_done and elapsed > self.args.s3_outage_at:
                s3_done = True
                self.s3.stop()
                self.note("S3 down")
                time.sleep(self.args.s3_outage_seconds)
                self.s3.start()
                self.note("S3 back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--generation-seconds", type=float, default=0.5)
    parser.add_argument("--kill-every", type=float, default=4.0)
    parser.add_argument("--redis-restart-at", type=float, default=20.0)
    parser.add_argument("--s3-outage-at", type=float, default=35.0)
    parser.add_argument("--s3-outage-seconds", type=float, default=20.0)
    parser.add_argument("--deadline", type=float, default=0.0, help="default: from --jobs")
    args = parser.parse_args()
    deadline = args.deadline or 240 + args.jobs * args.generation_seconds * 3

    config = EmulatorConfig(
        preprocess_seconds=0.05,
        generation_seconds=args.generation_seconds - 0.1,
        postprocess_seconds=0.05,
        video_short_side=144,
        seed=args.seed,
    )
    with (
        RedisServer(appendonly=True, port=free_port()) as redis_server,
        S3Server() as s3,
        EmulatorServer(config) as emulator,
    ):
        s3.create_bucket(BUCKET)
        http = httpx.Client(base_url=emulator.url, timeout=10)
        http.put(
            "/_emulator/faults",
            json={
                "rates": {"500": 0.03, "503": 0.02, "429": 0.05, "drop": 0.02, "slow": 0.03},
                "routes": ["submit", "query", "list", "video"],
                "slow_seconds": 1.5,
                "task_fail_rate": 0.03,
                "task_fail_code": "InternalError.Algo",
                "seed": args.seed,
            },
        ).raise_for_status()
        template = http.post(
            "/_emulator/templates", json={"api_key": API_KEY, "seconds": 2}
        ).json()["template_id"]
        image = f"{emulator.url}/_emulator/samples/person.png?width=256&height=512"
        env = {
            "REDIS_URL": redis_server.url,
            "DASHSCOPE_API_KEY": API_KEY,
            "DASHSCOPE_BASE_URL": emulator.base_url,
            "DASHSCOPE_READ_TIMEOUT": "5",
            "S3_BUCKET": BUCKET,
            "AWS_ENDPOINT_URL": s3.endpoint,
            "URL_ALLOWLIST": "127.0.0.1",
            **S3Server.CREDENTIALS,
            "POLL_FIRST_SECONDS": "0.3",
            "POLL_RUNNING_SECONDS": "0.3",
            "POLL_PENDING_SECONDS": "1",
            "POLL_PENDING_MAX_SECONDS": "3",
            "POLL_ERROR_BACKOFF_MAX": "3",
            "SUBMIT_BACKOFF_BASE": "0.5",
            "SUBMIT_BACKOFF_MAX": "5",
            "SUBMIT_LIST_LAG_SECONDS": "3",  # the emulator's list does not lag here
            "COPY_BACKOFF_BASE": "1",
            "COPY_BACKOFF_MAX": "10",
            "COPY_LEASE_SECONDS": "5",
            "WATCHDOG_INTERVAL_SECONDS": "2",
            "WATCHDOG_GRACE_SECONDS": "5",
            "WATCHDOG_MAX_RESUMES": "10",
        }
        workers = [Worker(env, concurrency=2, name=f"chaos{i}@%h").start() for i in range(3)]
        beat = Beat(env).start()
        chaos = Chaos(args, env, redis_server, s3, workers)
        queue = AnimateQueue(redis_server.url)
        started = time.time()
        ids = [f"chaos-{i:04d}" for i in range(args.jobs)]
        for job_id in ids:
            for _ in range(50):  # the producer too must live through the Redis restart
                try:
                    queue.submit(image, template, job_id=job_id)
                    break
                except Exception:
                    time.sleep(0.2)
        chaos.thread.start()
        views: dict[str, dict[str, Any]] = {}
        limit = time.time() + deadline
        while time.time() < limit:
            try:
                for job_id in ids:
                    if job_id not in views or views[job_id]["state"] not in FINAL:
                        view = queue.get(job_id)
                        if view:
                            views[job_id] = view
            except Exception:
                time.sleep(0.5)
                continue
            if all(views.get(j, {}).get("state") in FINAL for j in ids) and chaos.events:
                break
            time.sleep(1)
        chaos.stop.set()
        chaos.thread.join(60)
        finished = time.time()

        by_state: dict[str, int] = {}
        for job_id in ids:
            state = views.get(job_id, {}).get("state", "MISSING")
            by_state[state] = by_state.get(state, 0) + 1
        lost = sum(views.get(j, {}).get("state") not in FINAL for j in ids)
        stats = http.get("/_emulator/stats").json()["totals"]
        task_ids = [v["remote_task_id"] for v in views.values() if v.get("remote_task_id")]
        shared = len(task_ids) - len(set(task_ids))
        double = int(stats.get("submitted", 0)) - len(set(task_ids)) + shared
        # Verification is not part of the chaos: faults off, no query quota.
        http.put("/_emulator/faults", json={"rates": {}, "task_fail_rate": 0}).raise_for_status()
        http.patch("/_emulator/config", json={"query_rate": 0}).raise_for_status()
        s3_client = s3.client()
        mismatches = 0
        for view in views.values():
            if view["state"] != "STORED":
                continue
            body = s3_client.get_object(Bucket=BUCKET, Key=view["s3_key"])["Body"].read()
            out = http.get(f"/api/v1/tasks/{view['remote_task_id']}",
                           headers={"Authorization": f"Bearer {API_KEY}"}).json()["output"]  # fmt: skip
            served = http.get(out["video_url"]).content
            if body != served or hashlib.sha256(body).hexdigest() != view["sha256"]:
                mismatches += 1
        failed_without_code = sum(
            1 for v in views.values() if v["state"] == "FAILED" and not v.get("error_code")
        )
        failed_codes: dict[str, int] = {}
        for v in views.values():
            if v["state"] == "FAILED":
                failed_codes[v["error_code"]] = failed_codes.get(v["error_code"], 0) + 1
        # Recovery: after each fault, how long until some job next reached STORED.
        stored_times = sorted(v["finished_at"] for v in views.values() if v["state"] == "STORED")
        recovery = {}
        for what, at in chaos.events:
            if what.startswith("SIGKILL"):
                continue
            after = [t for t in stored_times if t > at]
            recovery[what] = round(after[0] - at, 2) if after else None
        kill_gaps = []
        for what, at in chaos.events:
            if what.startswith("SIGKILL"):
                after = [t for t in stored_times if t > at]
                if after:
                    kill_gaps.append(after[0] - at)
        result = {
            "jobs": args.jobs,
            "stored": by_state.get("STORED", 0),
            "failed": by_state.get("FAILED", 0),
            "by_state": by_state,
            "failed_codes": failed_codes,
            "failed_without_code": failed_without_code,
            "lost": lost,
            "double_submissions": double,
            "shared_remote_tasks": shared,
            "mismatches": mismatches,
            "remote_submissions": int(stats.get("submitted", 0)),
            "worker_kills": chaos.kills,
            "recovery_s": recovery,
            "recovery_after_kill_max_s": round(max(kill_gaps), 2) if kill_gaps else None,
            "makespan_s": round(finished - started, 1),
        }
        beat.stop()
        for w in chaos.workers:
            w.kill()
        queue.close()
        http.close()
        print(json.dumps(result))


if __name__ == "__main__":
    main()
