"""``animate-queue``: send a job (local files or URLs), show its status, wait for it, download it."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Column, Table

from config.settings import SettingsError, get_settings
from workers.client import AnimateQueue, JobTimeout
from workers.errors import InvalidJobRequest, WorkerError
from workers.inputs import S3Inputs
from workers.storage import make_s3_client

console = Console(stderr=True)


def _queue() -> AnimateQueue:
    try:
        settings = get_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    inputs = None
    if settings.s3_bucket:
        s3 = make_s3_client(
            endpoint_url=settings.aws_endpoint_url,
            region=settings.aws_default_region,
            checksum_calculation=settings.aws_request_checksum_calculation,
            checksum_validation=settings.aws_response_checksum_validation,
            addressing_style=settings.s3_addressing_style,
        )
        inputs = S3Inputs(s3, settings.s3_bucket, settings.input_prefix)
    return AnimateQueue(
        settings.redis_url,
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        key_prefix=settings.key_prefix,
        rates={
            "submit": settings.dashscope_submit_rate,
            "query": settings.dashscope_query_rate,
            "detect": settings.dashscope_detect_rate,
        },
        capacity=settings.dashscope_concurrency + settings.admission_lookahead,
        inputs=inputs,
    )


def render(view: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("job", view["job_id"]),
        ("state", view["state"]),
        ("remote", f"{view['remote_task_id'] or '-'} ({view['remote_status'] or '-'})"),
        ("s3", view["s3_uri"] or "-"),
        ("bytes", str(view["bytes"]) if view["bytes"] is not None else "-"),
        ("sha256", view["sha256"] or "-"),
        ("video seconds", str(view["video_duration"] or "-")),
    ]
    if view.get("template_id"):
        rows.append(("template", view["template_id"]))
    if view["error_code"]:
        rows.append(("error", f"{view['error_code']}: {view['error_message']}"))
    seconds = view["seconds"]
    rows.append(
        (
            "seconds",
            ", ".join(f"{k} {v}" for k, v in seconds.items() if v is not None) or "-",
        )
    )
    for name, value in rows:
        table.add_row(name, value)
    return table


@click.group()
def main() -> None:
    """Enqueue AnimateAnyone video jobs and follow them (REDIS_URL says where)."""


@main.command()
@click.option("--image-url", required=True)
@click.option("--template-id", required=True)
@click.option("--use-ref-img-bg/--no-use-ref-img-bg", default=None)
@click.option("--video-ratio", type=click.Choice(["9:16", "3:4"]))
@click.option("--job-id", help="idempotency key: the same id twice makes one job")
@click.option("--metadata", help="a JSON object kept with the job")
@click.option("--account", help="the DashScope account (default: the template's, else default)")
@click.option("--priority", type=int, help="higher goes first among queued jobs (-100..100)")
@click.option("--producer", help="who asks: producers of one priority take turns")
@click.option("--wait", "wait_", is_flag=True, help="wait for the job to end")
def submit(
    image_url: str,
    template_id: str,
    use_ref_img_bg: bool | None,
    video_ratio: str | None,
    job_id: str | None,
    metadata: str | None,
    account: str | None,
    priority: int | None,
    producer: str | None,
    wait_: bool,
) -> None:
    """Enqueue a job from URLs and print its id (see also ``generate``)."""
    meta = _metadata(metadata)
    queue = _queue()
    job = queue.submit(
        image_url,
        template_id,
        use_ref_img_bg=use_ref_img_bg,
        video_ratio=video_ratio,
        job_id=job_id,
        metadata=meta,
        account=account,
        priority=priority,
        producer=producer,
    )
    click.echo(job)
    if wait_:
        _wait(queue, job, None)


def _metadata(metadata: str | None) -> dict[str, Any] | None:
    if not metadata:
        return None
    try:
        meta = json.loads(metadata)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--metadata") from None
    if not isinstance(meta, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--metadata")
    return meta


def _send_failed(exc: Exception) -> NoReturn:
    """A local refusal as a usage error naming the input (exit 2), anything else as exit 1."""
    if isinstance(exc, InvalidJobRequest):
        hint = "--image" if exc.code.startswith("InvalidImage") else "--video"
        raise click.BadParameter(str(exc), param_hint=hint) from None
    if isinstance(exc, OSError):  # a missing or unreadable local file
        raise click.BadParameter(str(exc)) from None
    raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--image", required=True, help="a local image file, an http(s) URL or s3://")
@click.option("--video", help="the dance video: a local file, an http(s) URL or s3://")
@click.option("--template-id", help="an action template id (AACT.…), instead of --video")
@click.option("--no-detect", is_flag=True, help="skip DashScope's image check")
@click.option("--use-ref-img-bg/--no-use-ref-img-bg", default=None)
@click.option("--video-ratio", type=click.Choice(["9:16", "3:4"]))
@click.option("--job-id", help="idempotency key: the same id twice makes one job")
@click.option("--metadata", help="a JSON object kept with the job")
@click.option("--account", help="the DashScope account (default: the template's, else default)")
@click.option("--priority", type=int, help="higher goes first among queued jobs (-100..100)")
@click.option("--producer", help="who asks: producers of one priority take turns")
@click.option("--wait", "wait_", is_flag=True, help="wait for the job; print its s3:// URI")
@click.option("--timeout", type=float, default=None, help="give up waiting after this many s")
@click.option(
    "--download",
    type=click.Path(file_okay=False, path_type=Path),
    help="download the video into this directory (implies --wait); print its path",
)
def generate(
    image: str,
    video: str | None,
    template_id: str | None,
    no_detect: bool,
    use_ref_img_bg: bool | None,
    video_ratio: str | None,
    job_id: str | None,
    metadata: str | None,
    account: str | None,
    priority: int | None,
    producer: str | None,
    wait_: bool,
    timeout: float | None,
    download: Path | None,
) -> None:
    """Make a video of the --image person moving like --video (or --template-id); print the job id.

    Local files are checked here first (a refusal sends nothing), then uploaded once into
    S3_BUCKET under INPUT_PREFIX. Exit 1 unless a waited-for job ends STORED.
    """
    if (video is None) == (template_id is None):
        raise click.UsageError("give exactly one of --video and --template-id")
    meta = _metadata(metadata)
    queue = _queue()
    try:
        job = queue.generate(
            image,
            video=video,
            template_id=template_id,
            detect=False if no_detect else None,
            use_ref_img_bg=use_ref_img_bg,
            video_ratio=video_ratio,
            job_id=job_id,
            metadata=meta,
            account=account,
            priority=priority,
            producer=producer,
        )
    except (OSError, ValueError, WorkerError) as exc:
        _send_failed(exc)
    click.echo(job)
    if not (wait_ or download):
        return
    view = _wait(queue, job, timeout)
    if view["state"] != "STORED":
        raise click.ClickException(_ended(view))
    click.echo(view["s3_uri"])
    if download is not None:
        try:
            path = queue.download(job, download)
        except (ValueError, WorkerError) as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(str(path))


def _ended(view: dict[str, Any]) -> str:
    reason = f"{view['error_code']}: {view['error_message']}" if view["error_code"] else "no error"
    return f"job {view['job_id']} ended {view['state']} ({reason})"


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="print the record as JSON")
def status(job_id: str, as_json: bool) -> None:
    """Show a job's record."""
    queue = _queue()
    view = queue.get(job_id)
    if view is None:
        raise click.ClickException(f"no job {job_id}")
    events = queue.timeline(job_id)
    if as_json:
        click.echo(json.dumps({**view, "timeline": events}, indent=2, sort_keys=True))
        return
    out = Console()
    out.print(render(view))
    table = Table("time (UTC)", "+s", "move", "details", title="timeline")
    start = events[0]["at"] if events else 0.0
    for event in events:
        move = f"{event['from']} -> {event['to']}" if "from" in event else event["to"]
        details = ", ".join(
            f"{k}={v}" for k, v in event.items() if k not in ("at", "from", "to", "created")
        )
        when = datetime.fromtimestamp(event["at"], UTC).strftime("%H:%M:%S.%f")[:-3]
        table.add_row(when, f"{event['at'] - start:.2f}", move, details)
    out.print(table)


@main.command()
@click.argument("job_id")
@click.option("--timeout", type=float, default=None, help="give up waiting after this many s")
@click.option("--json", "as_json", is_flag=True, help="print the final record as JSON")
def wait(job_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to end, showing its progress; exit 1 unless STORED (READY: a template)."""
    view = _wait(_queue(), job_id, timeout)
    if as_json:
        click.echo(json.dumps(view, indent=2, sort_keys=True))
    sys.exit(0 if view["state"] in ("STORED", "READY") else 1)


@main.command()
@click.argument("job_id")
@click.option("--timeout", type=float, default=30.0)
def cancel(job_id: str, timeout: float) -> None:
    """Cancel a job: free while queued here, DashScope's cancel while queued there."""
    result = _queue().cancel(job_id, timeout=timeout)
    click.echo(json.dumps(result, indent=2, sort_keys=True))
    sys.exit(0 if result["outcome"] in ("canceled", "requested") else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def accounts(as_json: bool) -> None:
    """Per account: queued jobs, remote running/pending, tokens, 429s received."""
    views = _queue().accounts()
    if as_json:
        click.echo(json.dumps(views, indent=2, sort_keys=True))
        return
    table = Table("account", "queued", "running", "pending", "submitting", "capacity",
                  "submit tokens", "query tokens", "429s")  # fmt: skip
    for v in views:
        b = v["buckets"]
        table.add_row(
            v["account"],
            str(v["queued"]),
            str(v["remote_running"]),
            str(v["remote_pending"]),
            str(v["submitting"]),
            str(v["capacity"]),
            f"{b['submit']['tokens']:.2f} @ {b['submit']['rate']}/s",
            f"{b['query']['tokens']:.1f} @ {b['query']['rate']}/s",
            str(v["throttled_429"]),
        )
    Console().print(table)


@main.command()
@click.option("--state", default="QUEUED", show_default=True, help="job state to list")
@click.option("--producer", help="only this producer's jobs")
@click.option("--older-than", type=float, help="only jobs created at least this many s ago")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def jobs(
    state: str, producer: str | None, older_than: float | None, limit: int, as_json: bool
) -> None:
    """List jobs by state, producer and age."""
    views = _queue().jobs(state.upper(), producer=producer, older_than=older_than, limit=limit)
    if as_json:
        click.echo(json.dumps(views, indent=2, sort_keys=True))
        return
    now = datetime.now(UTC).timestamp()
    table = Table("job", "state", "remote", "producer", "priority", "age s", "error")
    for v in views:
        table.add_row(v["job_id"], v["state"], v["remote_status"] or "-", v["producer"],
                      str(v["priority"]), f"{now - v['created_at']:.0f}",
                      v["error_code"] or "")  # fmt: skip
    Console().print(table)


@main.group(invoke_without_command=True)
@click.option("--account", help="only this account's templates")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def templates(ctx: click.Context, account: str | None, as_json: bool) -> None:
    """Action templates and the account that owns each (lists them without a subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    views = _queue().templates(account)
    if as_json:
        click.echo(json.dumps(views, indent=2, sort_keys=True))
        return
    table = Table(
        Column("template", overflow="fold"),
        "account",
        Column("source sha256", no_wrap=True),
        "seconds",
        Column("created (UTC)", no_wrap=True),
        "revoked",
    )
    for v in sorted(views, key=lambda v: (v["account"], v.get("created_at") or 0.0)):
        created = v.get("created_at")
        seconds = v.get("video_seconds")
        table.add_row(
            v["template_id"],
            v["account"],
            (v.get("source_sha256") or "-")[:12],
            f"{seconds:.1f}" if seconds is not None else "-",
            datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%d %H:%M") if created else "-",
            "yes" if v.get("revoked") else "",
        )
    Console().print(table)


@templates.command("create")
@click.option("--video", required=True, help="the dance video: a local file, http(s) URL or s3://")
@click.option("--account", help="the DashScope account to make it under")
@click.option("--job-id", help="idempotency key: the same id twice makes one job")
@click.option("--wait", "wait_", is_flag=True, help="wait, then print the template id")
@click.option("--timeout", type=float, default=None, help="give up waiting after this many s")
def templates_create(
    video: str, account: str | None, job_id: str | None, wait_: bool, timeout: float | None
) -> None:
    """Make an action template from a dance video; print the job id (and the template id)."""
    queue = _queue()
    try:
        job = queue.make_template(video, account=account, job_id=job_id)
    except (OSError, ValueError, WorkerError) as exc:
        _send_failed(exc)
    click.echo(job)
    if not wait_:
        return
    view = _wait(queue, job, timeout)
    if view["state"] != "READY" or not view.get("template_id"):
        raise click.ClickException(_ended(view))
    click.echo(view["template_id"])


@templates.command("add")
@click.argument("template_id")
@click.option("--account", required=True, help="the account that created the template")
def templates_add(template_id: str, account: str) -> None:
    """Record a template's account, so its jobs run there."""
    _queue().register_template(template_id, account)
    click.echo(f"{template_id} -> {account}")


def _wait(queue: AnimateQueue, job_id: str, timeout: float | None) -> dict[str, Any]:
    with console.status(f"job {job_id}: waiting") as spinner:

        def progress(view: dict[str, Any] | None) -> None:
            if view is None:
                spinner.update(f"job {job_id}: not yet received by a worker")
            else:
                remote = f" (remote {view['remote_status']})" if view["remote_status"] else ""
                spinner.update(f"job {job_id}: {view['state']}{remote}")

        try:
            view = queue.wait(job_id, timeout, on_progress=progress)
        except JobTimeout as exc:
            raise click.ClickException(str(exc)) from None
    console.print(render(view))
    return view


if __name__ == "__main__":
    main()
