"""``python -m devstack.dev``: the local stand-ins ``make dev`` (Procfile.dev) runs beside the real
processes: a Redis that keeps nothing on disk, and a local S3 (moto) with the bucket made.

Each stays in the foreground until SIGTERM or SIGINT. honcho stops the whole stack as soon as any
one process exits, so nothing here is a one-shot: the S3 stand-in creates its bucket and then
serves, and the Redis stand-in that finds a Redis already answering waits instead of exiting.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from devstack import REDIS_TUNING, redis_answers, redis_server_binary

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
LOOPBACK = ("127.0.0.1", "localhost")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m devstack.dev", description="Local stand-ins for `make dev`."
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("redis", help="a redis-server on REDIS_URL's port, unless one answers there")
    r.add_argument("--url", required=True, help="the REDIS_URL to serve (redis://127.0.0.1:PORT/N)")
    s = sub.add_parser("s3", help="moto's S3 API on AWS_ENDPOINT_URL, with the bucket created")
    s.add_argument("--endpoint", required=True, help="the AWS_ENDPOINT_URL to serve (http://…)")
    s.add_argument("--bucket", required=True, help="the bucket to create (S3_BUCKET)")
    return p.parse_args(argv)


def _block_stop_signals() -> None:
    """Block SIGINT and SIGTERM (before any thread starts) so ``_wait_for_stop`` receives them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _wait_for_stop() -> None:
    signal.sigwait(STOP_SIGNALS)


def serve_redis(url: str) -> int:
    """Exec a redis-server on ``url``'s port (no RDB, no AOF): nothing outlives the stack."""
    parts = urlsplit(url)
    if redis_answers(url):
        _block_stop_signals()
        print(f"Redis already answers at {parts.hostname}:{parts.port}; using it", flush=True)
        _wait_for_stop()
        return 0
    if parts.hostname not in LOOPBACK or parts.port is None:
        print(f"error: nothing answers at {url}, and it is not a loopback port", file=sys.stderr)
        return 1
    binary = redis_server_binary(install=True)
    print(f"redis-server on 127.0.0.1:{parts.port}, keeping nothing on disk", flush=True)
    # exec: the server itself gets honcho's SIGTERM (and the signal mask is untouched here).
    os.execv(binary, [binary, "--bind", "127.0.0.1", "--port", str(parts.port),
                      "--save", "", "--appendonly", "no", "--dir", "/tmp",
                      "--maxmemory-policy", "noeviction", *REDIS_TUNING])  # fmt: skip


def serve_s3(endpoint: str, bucket: str) -> int:
    """moto's S3 API on ``endpoint``'s host and port, in memory, with ``bucket`` created."""
    import logging

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError
    from moto.server import ThreadedMotoServer

    parts = urlsplit(endpoint)
    if parts.hostname is None or parts.port is None:
        print(f"error: {endpoint} names no host and port", file=sys.stderr)
        return 1
    _block_stop_signals()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server: Any = ThreadedMotoServer(ip_address=parts.hostname, port=parts.port, verbose=False)
    server.start()
    try:
        region = os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or "testing",
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or "testing",
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                if region == "us-east-1":
                    client.create_bucket(Bucket=bucket)
                else:
                    client.create_bucket(
                        Bucket=bucket,
                        CreateBucketConfiguration={"LocationConstraint": region},  # type: ignore[typeddict-item]
                    )
                break
            except (BotoCoreError, ClientError) as exc:  # not up yet
                if time.monotonic() > deadline:
                    print(f"error: could not create bucket {bucket}: {exc}", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        print(f"S3 (moto, in memory) at {endpoint}, bucket {bucket}", flush=True)
        _wait_for_stop()
        return 0
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "redis":
        return serve_redis(args.url)
    return serve_s3(args.endpoint, args.bucket)


if __name__ == "__main__":
    sys.exit(main())
