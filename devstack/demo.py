"""``make demo``: the whole workflow end to end on embedded defaults, then where the video went.

It uses ``REDIS_URL`` if that answers, else starts a redis-server of its own; starts the DashScope
emulator, a local S3 API (moto) and a real Celery worker. Then, from the two bundled local files
(``devstack/assets/person.png`` and ``dance.mp4``), one ``generate`` call does everything: the
files go to the bucket (content-addressed), the image is checked by DashScope's detector, an
action template is made from the dance, the video is generated and copied into S3. The demo waits
with progress, downloads the stored object to ``demo-output/<job_id>.mp4``, prints a summary and
the job's timeline, and stops everything it started.

``DEMO_MODEL=wan2.2-animate-move`` (or ``wan2.2-animate-mix``; ``make demo DEMO_MODEL=...``)
runs the same two files through a Wan2.2-Animate deployment instead: no image check step and no
template, one call with the image, the dance and ``mode=wan-pro``.
"""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console
from rich.table import Table

from devstack import RedisServer, S3Server, Worker, redis_answers
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from workers.adapters.s3.inputs import S3Inputs
from workers.producer import AnimateQueue

ASSETS = Path(__file__).parent / "assets"
BUCKET = "animate-queue-demo"
API_KEY = "sk-demo-not-a-real-key"
DEMO_DB = 13  # on a Redis that is already running (DEMO_REDIS_DB: another)
console = Console()


def _motion_rows(view: dict[str, Any]) -> list[tuple[str, str]]:
    if view["template_id"]:
        return [
            ("image check", f"passed, bodystyle {view['detection']['bodystyle']}"),
            ("action template", f"{view['template_id']} (made by job {view['template_job_id']})"),
        ]
    return [("model", f"{view['model']} ({view['request']['mode']}): image and dance in one call")]


def summary(view: dict[str, Any], local: Path) -> Table:
    table = Table(title="animate-queue demo", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    seconds = view["seconds"]
    for name, value in (
        ("job id", view["job_id"]),
        ("state", view["state"]),
        ("image", view["request"]["image_url"]),
        ("dance video", view["request"]["video_url"]),
        *_motion_rows(view),
        ("cost", f"{(view['cost'] or {}).get('billed')} CNY billed"),
        ("S3 URI", view["s3_uri"]),
        ("bytes", f"{view['bytes']:,}" if view["bytes"] else "-"),
        ("SHA-256", view["sha256"]),
        ("video seconds", str(view["video_duration"])),
        ("queued -> submitted", f"{seconds['queued']} s"),
        ("remote generation", f"{seconds['remote']} s"),
        ("copy to S3", f"{seconds['copy']} s"),
        ("total", f"{seconds['total']} s"),
        ("local copy", str(local)),
    ):
        table.add_row(name, str(value))
    return table


def timeline(queue: AnimateQueue, job_id: str) -> Table:
    table = Table(title=f"timeline of {job_id}")
    for column in ("time (UTC)", "state", "detail"):
        table.add_column(column)
    for event in queue.timeline(job_id):
        if "to" not in event:
            continue
        at = datetime.fromtimestamp(event["at"], UTC).strftime("%H:%M:%S.%f")[:-3]
        detail = ", ".join(
            f"{k}={v}" for k, v in event.items() if k not in ("at", "to", "from", "created")
        )
        table.add_row(at, event["to"], detail)
    return table


def main() -> int:
    out_dir = Path(os.environ.get("DEMO_OUTPUT", "demo-output"))
    model = os.environ.get("DEMO_MODEL") or "animate-anyone-gen2"
    wan = model.startswith("wan")
    with contextlib.ExitStack() as stack:
        redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
        if redis_answers(redis_url):
            # A shared server: its own database number and key prefix keep the demo's queues
            # and jobs apart from any worker already using that Redis.
            # (Its queues are the database's: two demos at once need two databases.)
            db = int(os.environ.get("DEMO_REDIS_DB") or DEMO_DB)
            redis_url = urlunsplit(urlsplit(redis_url)._replace(path=f"/{db}"))
            prefix = f"animate-queue-demo-{os.getpid()}"
            console.print(f"[green]✓[/] Redis at {redis_url}")
        else:
            server = stack.enter_context(RedisServer(install=True))
            redis_url, prefix = server.url, "animate-queue"
            console.print(f"[green]✓[/] started redis-server at {redis_url}")
        emulator = stack.enter_context(
            EmulatorServer(
                EmulatorConfig(
                    preprocess_seconds=0.5,
                    generation_seconds=2.0,
                    postprocess_seconds=0.5,
                    template_seconds=1.0,
                )
            )
        )
        console.print(f"[green]✓[/] DashScope emulator at {emulator.base_url}")
        s3 = stack.enter_context(S3Server())
        s3.create_bucket(BUCKET)
        console.print(f"[green]✓[/] S3 API (moto) at {s3.endpoint}, bucket {BUCKET}")
        env = {
            "REDIS_URL": redis_url,
            "KEY_PREFIX": prefix,
            "DASHSCOPE_API_KEY": API_KEY,
            "DASHSCOPE_BASE_URL": emulator.base_url,
            "S3_BUCKET": BUCKET,
            "S3_PREFIX": "videos",
            "URL_ALLOWLIST": "127.0.0.1",  # the emulator runs on loopback
            "AWS_ENDPOINT_URL": s3.endpoint,
            **S3Server.CREDENTIALS,
            "POLL_FIRST_SECONDS": "0.5",
            "POLL_RUNNING_SECONDS": "0.5",
            "POLL_PENDING_SECONDS": "1",
            "DASHSCOPE_MODEL": model,
        }
        worker = stack.enter_context(Worker(env))
        console.print(f"[green]✓[/] Celery worker running {model} (log: {worker.log_path})")

        inputs = S3Inputs(s3.client(), BUCKET)
        queue = AnimateQueue(redis_url, key_prefix=prefix, inputs=inputs, model=model)
        stack.callback(queue.close)
        image, dance = ASSETS / "person.png", ASSETS / "dance.mp4"
        job_id = queue.generate(image, video=dance, metadata={"source": "make demo"},
                                mode="wan-pro" if wan else None)  # fmt: skip
        console.print(f"[green]✓[/] enqueued job {job_id}: {image.name} dancing like {dance.name}")
        with console.status("waiting") as status:

            def progress(view: dict[str, Any] | None) -> None:
                state = view["state"] if view else "sent"
                remote = (
                    f" (remote {view['remote_status']})" if view and view["remote_status"] else ""
                )
                status.update(f"job {job_id}: {state}{remote}")

            view = queue.wait(job_id, timeout=300, interval=0.25, on_progress=progress)
        if view["state"] != "STORED":
            console.print(f"[red]job ended {view['state']}: {view['error_code']}[/]")
            console.print(worker.log()[-4000:])
            return 1
        out_dir.mkdir(parents=True, exist_ok=True)
        local = out_dir / f"{job_id}.mp4"
        s3.client().download_file(BUCKET, view["s3_key"], str(local))
        console.print(summary(view, local))
        console.print(timeline(queue, job_id))
    console.print("[green]✓[/] stopped everything the demo started")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
