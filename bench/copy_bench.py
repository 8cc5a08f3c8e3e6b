"""Copy benchmark: one emulator video of --mb MiB streamed into a local S3 by S3Copier.

    .venv/bin/python bench/copy_bench.py [--mb 200] [--part-mb 8] [--concurrency 4] [--in-memory 2]

It starts the DashScope emulator (in this process, padding every video to --mb MiB) and a moto
``ThreadedMotoServer`` (in a child process, so the S3 side's copy of the object does not count in
this process's memory), makes one generation task, then copies its video twice:

1. timed: MB/s and peak RSS growth (``resource.getrusage().ru_maxrss`` before/after);
2. under ``tracemalloc``: the peak of Python-level allocations during the copy (slower).

It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time
import tracemalloc
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from workers.storage import S3Copier, make_s3_client

MiB = 1024 * 1024
BUCKET = "bench-videos"


def run_moto(conn: Connection) -> None:
    """Child process: a ThreadedMotoServer until the parent says stop."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access line per part otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    conn.send(server.get_host_and_port())
    conn.recv()  # wait for "stop"
    server.stop()


def make_video(emulator: EmulatorServer) -> str:
    url = emulator.finished_video_url("sk-bench-0001")
    # render and pad the file now, so the copies time only the transfer
    httpx.get(url, headers={"Range": "bytes=0-0"}, timeout=120).raise_for_status()
    return url


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="video size in MiB (default 200)")
    parser.add_argument("--part-mb", type=int, default=8, help="part size in MiB (default 8)")
    parser.add_argument("--concurrency", type=int, default=4, help="max_concurrency (default 4)")
    parser.add_argument("--in-memory", type=int, default=2, help="max_in_memory_chunks (default 2)")
    args = parser.parse_args()

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    size = args.mb * MiB
    parent, child = multiprocessing.get_context("spawn").Pipe()
    moto = multiprocessing.get_context("spawn").Process(target=run_moto, args=(child,))
    moto.start()
    host, port = parent.recv()
    config = EmulatorConfig(
        preprocess_seconds=0.1,
        generation_seconds=0.3,
        postprocess_seconds=0.1,
        template_seconds=0.3,
        video_short_side=144,
        video_pad_bytes=size,
    )
    try:
        with EmulatorServer(config) as emulator, httpx.Client(timeout=60) as http:
            s3: Any = make_s3_client(endpoint_url=f"http://{host}:{port}", region="us-east-1")
            s3.create_bucket(Bucket=BUCKET)
            url = make_video(emulator)
            copier = S3Copier(
                s3,
                http,
                bucket=BUCKET,
                part_size=args.part_mb * MiB,
                max_concurrency=args.concurrency,
                max_in_memory_chunks=args.in_memory,
            )
            bound = (args.in_memory + args.concurrency) * args.part_mb + 1
            print(
                f"video {size / MiB:.0f} MiB; part {args.part_mb} MiB, max_concurrency "
                f"{args.concurrency}, in-memory chunks {args.in_memory} "
                f"(expected bound ~{bound} MiB)"
            )

            rss_before = maxrss_mib()
            start = time.perf_counter()
            stored = copier.copy(url, "bench/timed.mp4", metadata={"job-id": "bench"})
            elapsed = time.perf_counter() - start
            rss_after = maxrss_mib()
            assert_size = "ok" if stored.size == size else f"MISMATCH {stored.size}"
            print(
                f"copy: {stored.size / MiB:.1f} MiB in {elapsed:.2f} s = "
                f"{stored.size / MiB / elapsed:.1f} MiB/s (size {assert_size})"
            )
            print(
                f"peak RSS: {rss_before:.1f} -> {rss_after:.1f} MiB "
                f"(growth {rss_after - rss_before:+.1f} MiB)"
            )
            s3.delete_object(Bucket=BUCKET, Key="bench/timed.mp4")

            tracemalloc.start()
            start = time.perf_counter()
            copier.copy(url, "bench/traced.mp4", metadata={"job-id": "bench"})
            elapsed = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            print(
                f"tracemalloc: Python-level peak {peak / MiB:.1f} MiB during a copy "
                f"({elapsed:.2f} s under tracing)"
            )
    finally:
        parent.send("stop")
        moto.join(30)


if __name__ == "__main__":
    main()
