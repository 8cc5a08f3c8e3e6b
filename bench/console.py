"""The job console's job list with 100,000 jobs in the store: time per page, served for real.

    .venv/bin/python -m bench.console [--jobs 100000] [--pages 20]

A redis-server of its own (the shipped settings), ``--jobs`` job records written straight into
the store (SUBMITTED, with metadata), the console (``create_app``, uvicorn on a free port), then
``--pages`` consecutive pages of ``/jobs?state=SUBMITTED`` fetched over HTTP with basic auth,
following the console's own "next page" cursor, and a free-text search by job id. Prints the
time per page (p50, p95, max) and the last line is one JSON object. Target (issue 18): a page in
under 300 ms with 100,000 jobs.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

import argparse
import json
import time
from typing import Any

import httpx

from bench import common
from devstack import RedisServer, served
from workers.adapters.redis.store import encode
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import JobState
from workers.entrypoints.console.app import create_app, parse_users
from workers.producer import AnimateQueue

PREFIX = "animate-queue"


def fill(queue: AnimateQueue, jobs: int, batch: int = 2000) -> None:
    """Job records as the store writes them (hash, state index), pipelined in batches."""
    client = queue.store.redis
    now = time.time()
    for start in range(0, jobs, batch):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(jobs, start + batch)):
            job_id = f"bench-{i:06d}"
            request = JobRequest("https://cdn.example/p.png", "AACT.acct.t", job_id=job_id,
                                 metadata={"order": f"o-{i}", "customer": f"c-{i % 97}"})  # fmt: skip
            job = Job(job_id, JobState.SUBMITTED, 5, request, now - i, now,
                      remote_task_id=f"task-{i}", remote_status="RUNNING")  # fmt: skip
            pipe.hset(f"{PREFIX}:job:{job_id}", mapping=encode(job))
            pipe.sadd(f"{PREFIX}:state:SUBMITTED", job_id)
        pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, 3 pages: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.pages = 2000, 3
    with RedisServer() as rs:
        queue = AnimateQueue(rs.url, key_prefix=PREFIX)
        started = time.monotonic()
        fill(queue, args.jobs)
        filled_s = time.monotonic() - started
        app = create_app(queue, users=parse_users("bench:bench"), secret=b"b" * 32)
        times: list[float] = []
        rows = 0
        with served(app) as url, httpx.Client(base_url=url, auth=("bench", "bench"),
                                             timeout=30) as http:  # fmt: skip
            http.get("/jobs?state=SUBMITTED")  # warm-up
            url = "/jobs?state=SUBMITTED"
            for _ in range(args.pages):
                t0 = time.perf_counter()
                page = http.get(url).text
                times.append(time.perf_counter() - t0)
                rows += page.count("<tr data-job=")
                marker = 'id="next" href="'
                if marker not in page:
                    break
                url = page.split(marker, 1)[1].split('"', 1)[0].replace("&amp;", "&")
            t0 = time.perf_counter()
            found = http.get(f"/jobs?q=bench-{args.jobs // 2:06d}").text
            search_s = time.perf_counter() - t0
        queue.close()
    result: dict[str, Any] = {
        "jobs": args.jobs,
        "fill_s": round(filled_s, 1),
        "pages": len(times),
        "rows_per_page": round(rows / max(1, len(times)), 1),
        "page_ms_p50": round(common.percentile(times, 50) * 1000, 1),
        "page_ms_p95": round(common.percentile(times, 95) * 1000, 1),
        "page_ms_max": round(max(times) * 1000, 1),
        "search_by_id_ms": round(search_s * 1000, 1),
        "search_found": f"bench-{args.jobs // 2:06d}" in found,
    }
    common.table(
        f"console job list: {args.jobs:,} jobs in the store",
        [
            ("pages fetched (rows each)", f"{result['pages']} ({result['rows_per_page']})"),
            ("time per page p50 / p95 / max",
             f"{result['page_ms_p50']} / {result['page_ms_p95']} / {result['page_ms_max']} ms"),
            ("find by job id", f"{result['search_by_id_ms']} ms (found: {result['search_found']})"),
            ("writing the records", f"{result['fill_s']} s"),
        ],
    )  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
