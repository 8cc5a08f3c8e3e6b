"""Fault scenarios with real processes: the product's promise (a paid video is stored while its
URL lives; nothing is paid twice; nobody gets another's video) under long faults and crashes.

    .venv/bin/python -m bench.faults [--scenarios s3-down,transfer-down,...] [--jobs 12]
                                      [--scale 1.0] [--quick]

Each scenario gets its own Redis (AOF on), moto S3, emulator, workers and beat, and jobs whose
images all differ, so every DashScope task can be traced to the job it was made for:

* ``s3-down``: S3 answers nothing for 20 minutes while videos finish (the copies retry until
  their URL is about to die; a fixed count of 20 retries once failed them after ~13 minutes).
* ``transfer-down``: the transfer pool is SIGKILLed and stays down 8 minutes (copy messages
  wait in a backlog; the watchdog once failed every such job PoisonJob after ~5.5 minutes).
* ``submit-5xx``: a quarter of the submits create the task and then answer 502 or 504, stall
  past the read timeout, or drop the connection.
* ``kill-after-submit``: the worker is SIGKILLed a few milliseconds after DashScope accepted a
  submit (the task exists, its id never reached the record), again and again.
* ``slow-drip``: half the jobs name an image URL that sends one byte every second.

Per scenario it prints jobs, stored, byte-exact (S3 holds exactly the video of the job's own
task), failed and rejected with their codes, double submissions (tasks made for one job beyond
the first), swapped videos, lost jobs (not final when the scenario ends), and how long it took.
``--scale`` multiplies the outages' lengths (``--quick``: a few seconds each, the CI smoke
test). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from devstack import Beat, RedisServer, S3Server, Worker
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from workers.producer import AnimateQueue

API_KEY = "sk-faults-0000000000000001"
BUCKET = "faults"
FINAL = {"STORED", "FAILED", "REJECTED", "CANCELED", "EXPIRED"}
SCENARIOS = ("s3-down", "transfer-down", "submit-5xx", "kill-after-submit", "slow-drip")


@dataclass
class Stack:
    """One scenario's processes and clients."""

    args: argparse.Namespace
    redis: RedisServer
    s3: S3Server
    emulator: EmulatorServer
    env: dict[str, str]
    http: httpx.Client
    queue: AnimateQueue
    workers: list[Worker] = field(default_factory=list)
    events: list[tuple[str, float]] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.events.append((what, time.time()))
        print(f"  {time.strftime('%H:%M:%S')} {what}", flush=True)

    def worker(self, queues: str | None, name: str) -> Worker:
        w = Worker(self.env, queues=queues, concurrency=2, name=f"{name}-{time.time_ns()}@%h")
        self.workers.append(w.start())
        return w

    def submitted(self) -> int:
        totals = self.http.get("/_emulator/stats").json()["totals"]
        return int(totals.get("submitted", 0))


@contextmanager
def stack(args: argparse.Namespace, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    config = EmulatorConfig(preprocess_seconds=0.2, generation_seconds=args.generation_seconds,
                            postprocess_seconds=0.2, video_short_side=144, seed=args.seed)  # fmt: skip
    with (
        RedisServer(appendonly=True) as redis_server,
        S3Server() as s3,
        EmulatorServer(config) as emulator,
    ):
        s3.create_bucket(BUCKET)
        env = {
            "REDIS_URL": redis_server.url,
            "DASHSCOPE_API_KEY": API_KEY,
            "DASHSCOPE_BASE_URL": emulator.base_url,
            "DASHSCOPE_READ_TIMEOUT": "5",
            "S3_BUCKET": BUCKET,
            "AWS_ENDPOINT_URL": s3.endpoint,
            "URL_ALLOWLIST": "127.0.0.1",
            **S3Server.CREDENTIALS,
            "POLL_FIRST_SECONDS": "0.5",
            "POLL_RUNNING_SECONDS": "0.5",
            "POLL_PENDING_SECONDS": "1",
            "POLL_PENDING_MAX_SECONDS": "3",
            "SUBMIT_BACKOFF_BASE": "0.5",
            "SUBMIT_BACKOFF_MAX": "5",
            "SUBMIT_LIST_LAG_SECONDS": "5",
            "INTAKE_SECONDS": "20",
            # Copies and the watchdog keep their production settings: the faults are long
            # (--quick shortens the watchdog's, or a crash takes a minute to be seen).
            **(
                {
                    "WATCHDOG_INTERVAL_SECONDS": "2",
                    "WATCHDOG_GRACE_SECONDS": "5",
                    # A SIGKILL between a job's QUEUED transition and its enqueue leaves it out of
                    # its lane's queue until this recheck (production: an hour); seen under load.
                    "QUEUED_RECHECK_SECONDS": "10",
                    "DASHSCOPE_CONNECT_TIMEOUT": "2",
                    "DASHSCOPE_READ_TIMEOUT": "3",
                }
                if args.quick
                else {}
            ),
            **(extra_env or {}),
        }
        http = httpx.Client(base_url=emulator.url, timeout=30)
        queue = AnimateQueue(redis_server.url)
        st = Stack(args, redis_server, s3, emulator, env, http, queue)
        beat = Beat(env).start()
        try:
            yield st
        finally:
            beat.stop()
            for w in st.workers:
                w.kill()
            queue.close()
            http.close()


def image_url(st: Stack, i: int) -> str:
    """A person image of its own (its width differs): each job's task can be traced back."""
    return f"{st.emulator.url}/_emulator/samples/person.png?width={300 + 2 * i}&height=512"


def submit_jobs(st: Stack, n: int, image: Callable[[int], str] | None = None) -> list[str]:
    template = st.http.post("/_emulator/templates", json={"api_key": API_KEY, "seconds": 2}).json()[
        "template_id"
    ]
    ids = [f"job-{i:03d}" for i in range(n)]
    for i, job_id in enumerate(ids):
        st.queue.submit((image or (lambda k: image_url(st, k)))(i), template, job_id=job_id)
    return ids


def wait_final(st: Stack, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    views: dict[str, dict[str, Any]] = {}
    limit = time.time() + timeout
    while time.time() < limit:
        for job_id in ids:
            if views.get(job_id, {}).get("state") not in FINAL:
                try:
                    view = st.queue.get(job_id)
                except Exception:
                    continue
                if view:
                    views[job_id] = view
        if all(views.get(j, {}).get("state") in FINAL for j in ids):
            break
        time.sleep(1)
    return views


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    limit = time.time() + timeout
    while time.time() < limit:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def verify(st: Stack, ids: list[str], views: dict[str, dict[str, Any]], started: float,
           images: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """What the customers got, traced through the emulator's own records."""
    st.http.put("/_emulator/faults", json={"rates": {}}).raise_for_status()
    st.http.patch("/_emulator/config", json={"query_rate": 0}).raise_for_status()
    tasks = [
        t for t in st.http.get("/_emulator/tasks").json() if t["model"] == "animate-anyone-gen2"
    ]
    by_image: dict[str, list[str]] = {}
    for task in tasks:
        by_image.setdefault(task["image_sha256"], []).append(task["task_id"])
    s3 = st.s3.client()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    states: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    exact = swapped = double = 0
    for job_id in ids:
        view = views.get(job_id, {})
        state = view.get("state", "MISSING")
        states[state] += 1
        if state in ("FAILED", "REJECTED", "EXPIRED"):
            codes[f"{state}:{view.get('error_code')}"] += 1
        own = by_image.get(images[job_id], [])
        double += max(0, len(own) - 1)
        if state != "STORED":
            continue
        body = s3.get_object(Bucket=BUCKET, Key=view["s3_key"])["Body"].read()
        if view["remote_task_id"] not in own:
            swapped += 1
            continue
        out = st.http.get(f"/api/v1/tasks/{view['remote_task_id']}", headers=auth).json()
        served = st.http.get(out["output"]["video_url"]).content
        if body == served and hashlib.sha256(body).hexdigest() == view["sha256"]:
            exact += 1
    return {
        "jobs": len(ids),
        "stored": states["STORED"],
        "byte_exact": exact,
        "failed": {k: v for k, v in codes.items() if not k.startswith("REJECTED")},
        "rejected": {k: v for k, v in codes.items() if k.startswith("REJECTED")},
        "double_submissions": double,
        "swapped": swapped,
        "lost": sum(1 for j in ids if views.get(j, {}).get("state") not in FINAL),
        "remote_tasks": len(tasks),
        "seconds": round(time.time() - started, 1),
    }


def image_hashes(st: Stack, urls: dict[str, str]) -> dict[str, str]:
    return {
        j: hashlib.sha256(httpx.get(u, timeout=30).content).hexdigest() for j, u in urls.items()
    }


# ----------------------------------------------------------------------------- scenarios


def s3_down(args: argparse.Namespace) -> dict[str, Any]:
    outage = 20 * 60 * args.scale
    with stack(args) as st:
        st.worker(None, "all")
        started = time.time()
        ids = submit_jobs(st, args.jobs)
        wait_for(lambda: st.submitted() >= 1, 60)
        st.s3.stop()
        st.note(f"S3 down for {outage:.0f} s")
        time.sleep(outage)
        st.s3.start()
        st.note("S3 back")
        views = wait_final(st, ids, 900 + outage)
        return verify(st, ids, views, started,
                      image_hashes(st, {j: image_url(st, i) for i, j in enumerate(ids)}))  # fmt: skip


def transfer_down(args: argparse.Namespace) -> dict[str, Any]:
    outage = 8 * 60 * args.scale
    with stack(args) as st:
        st.worker("celery,dashscope", "remote")
        transfer = st.worker("transfer", "transfer")
        started = time.time()
        transfer.kill()
        st.note(f"transfer pool SIGKILLed, down for {outage:.0f} s")
        ids = submit_jobs(st, args.jobs)
        time.sleep(outage)
        st.worker("transfer", "transfer")
        st.note("transfer pool back")
        views = wait_final(st, ids, 600)
        return verify(st, ids, views, started,
                      image_hashes(st, {j: image_url(st, i) for i, j in enumerate(ids)}))  # fmt: skip


def submit_5xx(args: argparse.Namespace) -> dict[str, Any]:
    with stack(args) as st:
        st.http.put("/_emulator/faults", json={
            "rates": {"502_after": 0.08, "504_after": 0.07, "slow_after": 0.05, "drop_after": 0.05},
            "routes": ["submit"], "slow_seconds": 8, "seed": args.seed,
        }).raise_for_status()  # fmt: skip
        for kind in ("502_after", "slow_after"):  # at least these, whatever the draw
            st.http.post("/_emulator/faults/next",
                         json={"route": "submit", "kind": kind, "seconds": 8})  # fmt: skip
        st.worker(None, "a")
        st.worker(None, "b")
        started = time.time()
        ids = submit_jobs(st, args.jobs)
        views = wait_final(st, ids, 900)
        return verify(st, ids, views, started,
                      image_hashes(st, {j: image_url(st, i) for i, j in enumerate(ids)}))  # fmt: skip


def kill_after_submit(args: argparse.Namespace) -> dict[str, Any]:
    with stack(args) as st:
        st.worker(None, "victim")
        started = time.time()
        ids = submit_jobs(st, args.jobs)
        kills = 0
        while kills < args.kills and time.time() - started < 300:
            seen = st.submitted()
            st.http.post("/_emulator/faults/next",
                         json={"route": "submit", "kind": "slow_after", "seconds": 2})  # fmt: skip
            if not wait_for(lambda s=seen: st.submitted() > s, 60):  # type: ignore[misc]
                break
            for w in st.workers:
                w.kill()  # a few milliseconds after DashScope accepted (and billed) the task
            kills += 1
            st.note(f"SIGKILL {kills} right after an accepted submit")
            st.worker(None, "victim")
        views = wait_final(st, ids, 600)
        result = verify(st, ids, views, started,
                        image_hashes(st, {j: image_url(st, i) for i, j in enumerate(ids)}))  # fmt: skip
        result["kills"] = kills
        return result


class Drip(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100_000):
                self.wfile.write(b"\x89")
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


def slow_drip(args: argparse.Namespace) -> dict[str, Any]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    drip = f"http://127.0.0.1:{server.server_address[1]}/me.png"
    try:
        with stack(args) as st:
            st.worker(None, "all")
            started = time.time()
            urls = {f"job-{i:03d}": (drip if i % 2 else image_url(st, i)) for i in range(args.jobs)}
            ids = submit_jobs(st, args.jobs, lambda i: urls[f"job-{i:03d}"])
            views = wait_final(st, ids, 600)
            hashes = image_hashes(st, {j: u for j, u in urls.items() if u != drip})
            hashes.update({j: "drip" for j, u in urls.items() if u == drip})
            return verify(st, ids, views, started, hashes)
    finally:
        server.shutdown()


RUN = {
    "s3-down": s3_down,
    "transfer-down": transfer_down,
    "submit-5xx": submit_5xx,
    "kill-after-submit": kill_after_submit,
    "slow-drip": slow_drip,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="x the outages' lengths")
    parser.add_argument("--generation-seconds", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="short outages, few jobs: CI")
    args = parser.parse_args()
    if args.quick:
        args.scale, args.jobs, args.kills = 0.01, 4, 1
    results: dict[str, Any] = {}
    for name in args.scenarios.split(","):
        print(f"{name}:", flush=True)
        results[name] = RUN[name](args)
        row = results[name]
        print(f"  jobs {row['jobs']}, stored {row['stored']} ({row['byte_exact']} byte-exact), "
              f"failed {row['failed'] or 0}, rejected {row['rejected'] or 0}, double "
              f"submissions {row['double_submissions']}, swapped {row['swapped']}, lost "
              f"{row['lost']}, {row['seconds']} s", flush=True)  # fmt: skip
    print(json.dumps({"scale": args.scale, "scenarios": results}))


if __name__ == "__main__":
    main()
