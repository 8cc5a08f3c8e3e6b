"""``python -m emulator``: run the DashScope emulator in the foreground (see emulator/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from emulator.config import EmulatorConfig
from emulator.faults import RANDOM_KINDS, ROUTES, FaultError
from emulator.server import EmulatorServer


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m emulator", description="An offline DashScope (AnimateAnyone) emulator."
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port (printed)")
    p.add_argument("--public-url", help="base put into video_url/upload_host (default: Host)")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY[=ACCOUNT]",
        help="accept only these keys (repeat); keys naming the same ACCOUNT share its quota",
    )
    q = p.add_argument_group("quotas (per account, per second; 0 = unlimited)")
    q.add_argument("--submit-rate", type=float, default=1.0, help="per async model")
    q.add_argument("--wan-submit-rate", type=float, default=5.0,
                   help="per Wan2.2-Animate model (move, mix)")  # fmt: skip
    q.add_argument("--detect-rate", type=float, default=5.0)
    q.add_argument("--query-rate", type=float, default=20.0, help="query + list + cancel")
    q.add_argument("--policy-rate", type=float, default=100.0, help="upload policy, per model")
    q.add_argument("--concurrency", type=int, default=1, help="running tasks per model")
    t = p.add_argument_group("task life (seconds)")
    t.add_argument("--preprocess-seconds", type=float, default=0.5)
    t.add_argument("--generation-seconds", type=float, default=2.0)
    t.add_argument("--postprocess-seconds", type=float, default=0.5)
    t.add_argument("--template-seconds", type=float, default=2.0)
    t.add_argument("--retention-seconds", type=float, default=86400.0)
    t.add_argument("--url-ttl", type=float, default=86400.0, help="video_url lifetime")
    t.add_argument("--upload-ttl", type=float, default=48 * 3600.0)
    t.add_argument("--policy-ttl", type=float, default=300.0)
    o = p.add_argument_group("output")
    o.add_argument("--video-short-side", type=int, default=720, help="720 = 720P")
    o.add_argument("--video-pad-mb", type=float, default=0.0, help="pad output MP4s to this size")
    f = p.add_argument_group("fault injection (shares between 0 and 1)")
    for kind in RANDOM_KINDS:
        f.add_argument(f"--fault-{kind}", type=float, default=0.0, dest=f"fault_{kind}")
    f.add_argument("--slow-seconds", type=float, default=2.0)
    f.add_argument(
        "--fault-routes", default="any", help=f"comma list from {','.join(sorted(ROUTES))}"
    )
    f.add_argument("--task-fail-rate", type=float, default=0.0)
    f.add_argument("--task-fail-code", default="InternalError.Algo")
    f.add_argument("--seed", type=int)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    keys: dict[str, str] = {}
    for item in args.api_key:
        key, _, account = item.partition("=")
        keys[key] = account or f"account-{len(keys) + 1}"
    return EmulatorConfig(
        api_keys=keys,
        submit_rate=args.submit_rate,
        wan_submit_rate=args.wan_submit_rate,
        detect_rate=args.detect_rate,
        query_rate=args.query_rate,
        policy_rate=args.policy_rate,
        concurrency=args.concurrency,
        preprocess_seconds=args.preprocess_seconds,
        generation_seconds=args.generation_seconds,
        postprocess_seconds=args.postprocess_seconds,
        template_seconds=args.template_seconds,
        retention_seconds=args.retention_seconds,
        url_ttl_seconds=args.url_ttl,
        upload_ttl_seconds=args.upload_ttl,
        policy_ttl_seconds=args.policy_ttl,
        video_short_side=args.video_short_side,
        video_pad_bytes=int(args.video_pad_mb * 1024 * 1024),
        seed=args.seed,
        public_url=args.public_url,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    server = EmulatorServer(config_from_args(args), host=args.host, port=args.port)
    server.start()
    try:
        server.emulator.faults.configure(
            {
                "rates": {k: getattr(args, f"fault_{k}") for k in RANDOM_KINDS},
                "routes": args.fault_routes.split(","),
                "slow_seconds": args.slow_seconds,
                "task_fail_rate": args.task_fail_rate,
                "task_fail_code": args.task_fail_code,
            }
        )
    except FaultError as exc:
        server.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def wait_for_signal() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        # Announce only once a signal can be handled: callers wait for this line.
        print(
            f"DashScope emulator listening on {server.url} (base URL {server.base_url})", flush=True
        )
        await stop.wait()

    try:
        asyncio.run(wait_for_signal())
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
