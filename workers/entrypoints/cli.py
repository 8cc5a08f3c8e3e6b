"""``animate-queue``: send a job (local files or URLs), show its status, wait for it, download it;
probe the components (``health``) and run the Prometheus exporter (``metrics``)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.table import Column, Table

from config.settings import Settings, SettingsError, get_settings
from workers.errors import InvalidJobRequest, WorkerError

if TYPE_CHECKING:
    from workers.producer import AnimateQueue

console = Console(stderr=True)
T = TypeVar("T")


def _queue() -> AnimateQueue:
    # Imported here: the health probes must not pay for Celery, boto3 and the job store.
    from workers.adapters.s3.inputs import S3Inputs
    from workers.bootstrap import governor, redis_address, s3_client
    from workers.producer import AnimateQueue

    try:
        settings = get_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    inputs = None
    if settings.s3_bucket:
        inputs = S3Inputs(s3_client(settings), settings.s3_bucket, settings.input_prefix)
    return AnimateQueue(
        settings.redis_url,
        broker_url=settings.celery_broker_url,  # unset: the job store's (through Sentinel)
        result_backend=settings.celery_result_backend,
        key_prefix=settings.key_prefix,
        inputs=inputs,
        model=settings.dashscope_model,
        governor=governor(settings),  # the workers' own rates and capacity
        address=redis_address(settings),
        wait_replicas=settings.wait_replicas,
        wait_timeout_ms=settings.redis_wait_timeout_ms,
    )


def _cost(cost: dict[str, Any] | None) -> str:
    """``billed 1.2 CNY (estimated 1.0, 0.6/s)``, or ``-`` when nothing is known."""
    if not cost or cost.get("price_per_second") is None:
        return "-"
    parts = []
    if cost.get("billed") is not None:
        parts.append(f"billed {cost['billed']:g} {cost['currency']}")
    if cost.get("estimated") is not None:
        parts.append(f"estimated {cost['estimated']:g}")
    parts.append(f"{cost['price_per_second']:g}/s")
    return parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")


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
        ("model", view.get("model") or "-"),
        ("cost", _cost(view.get("cost"))),
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
@click.option("--model", help="the video model (default: the service's DASHSCOPE_MODEL)")
@click.option("--mode", type=click.Choice(["wan-std", "wan-pro"]),
              help="Wan2.2-Animate's service tier (required by those models)")  # fmt: skip
@click.option(
    "--check-image/--no-check-image",
    default=None,
    help="Wan2.2-Animate: DashScope's image check inside the call (default on)",
)
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
    model: str | None,
    mode: str | None,
    check_image: bool | None,
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
            model=model,
            mode=mode,
            check_image=check_image,
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
@click.argument("job_id")
def rerun(job_id: str) -> None:
    """Run a video job that ended without its video (FAILED, EXPIRED, CANCELED) again, as a new
    job with the same request; print the new job's id."""
    try:
        click.echo(_queue().rerun(job_id))
    except (ValueError, WorkerError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command("retry-copy")
@click.argument("job_id")
def retry_copy(job_id: str) -> None:
    """Send a job waiting to retry its copy (COPYING, its video URL alive) to its copy now."""
    try:
        click.echo(json.dumps(_queue().retry_copy(job_id), indent=2, sort_keys=True))
    except (ValueError, WorkerError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def accounts(as_json: bool) -> None:
    """Per account: queued jobs, remote running/pending, tokens, 429s received, today's bills
    against the daily budget (UTC)."""
    from workers.domain.costs import budget_for, utc_day

    settings = _settings()
    queue = _queue()
    views = queue.accounts()
    today = utc_day(time.time())
    for v in views:
        v["spent_today_cny"] = round(queue.governor.spent(v["account"], today), 4)
        v["daily_budget_cny"] = budget_for(settings.daily_budget_cny, v["account"])
    if as_json:
        click.echo(json.dumps(views, indent=2, sort_keys=True))
        return
    table = Table("account", "queued", "running", "pending", "submitting", "capacity",
                  "submit tokens", "query tokens", "429s", "CNY today / budget")  # fmt: skip
    for v in views:
        b = v["buckets"]
        budget = v["daily_budget_cny"]
        spend = f"{v['spent_today_cny']:g} / {'-' if budget is None else f'{budget:g}'}"
        if budget is not None and v["spent_today_cny"] >= budget:
            spend += " (reached)"
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
            spend,
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
    table = Table("job", "state", "remote", "producer", "priority", "age s", "cost CNY", "error")
    for v in views:
        cost = v.get("cost") or {}
        spent = cost.get("billed") if cost.get("billed") is not None else cost.get("estimated")
        table.add_row(v["job_id"], v["state"], v["remote_status"] or "-", v["producer"],
                      str(v["priority"]), f"{now - v['created_at']:.0f}",
                      "-" if spent is None else f"{spent:g}" + ("" if cost.get("billed") is not None
                                                                else " (est.)"),
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


# ----------------------------------------------------------------------------- operations


def _settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def beat_heartbeat_key(prefix: str) -> str:
    """Where the watchdog (sent by beat) stamps ``time.time()``: the watchdog task writes it."""
    return f"{prefix}:beat-heartbeat"


def redact(url: str) -> str:
    """A URL without its credentials, path parameters or query: safe to print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    where = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{where}{parts.path}" if parts.scheme else "(unparsable URL)"


def _healthy(component: str, detail: str) -> None:
    click.echo(f"{component}: ok ({detail})")


def _unhealthy(component: str, reason: str) -> NoReturn:
    """One line on stderr, exit 1 (what probes and orchestrators read)."""
    click.echo(f"{component}: unhealthy: {' '.join(reason.split())}", err=True)
    sys.exit(1)


def _timeout_option(default: float = 5.0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--timeout",
        type=click.FloatRange(min=0.1),
        default=default,
        show_default=True,
        help="seconds to wait for an answer",
    )


@main.command("console")
@click.option("--host", help="address to listen on (default CONSOLE_ADDR)")
@click.option("--port", type=int, help="port (default CONSOLE_PORT)")
def console_command(host: str | None, port: int | None) -> None:
    """Serve the job console: every job, its timeline, video, expiry and cost, in a browser.
    Refuses to start without CONSOLE_BASIC_AUTH unless CONSOLE_ALLOW_NO_AUTH=true."""
    import secrets

    import uvicorn

    from workers.adapters.s3.inputs import S3Inputs
    from workers.bootstrap import s3_client
    from workers.entrypoints.console.app import create_app, parse_users

    settings = _settings()
    auth = settings.console_basic_auth.get_secret_value() if settings.console_basic_auth else ""
    if not auth and not settings.console_allow_no_auth:
        raise click.ClickException(
            "the console needs CONSOLE_BASIC_AUTH=user:password (or CONSOLE_ALLOW_NO_AUTH=true "
            "for an open console, as an operator's choice)"
        )
    try:
        users = parse_users(auth) if auth else None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    secret = (settings.console_secret.get_secret_value().encode() if settings.console_secret
              else secrets.token_bytes(32))  # fmt: skip
    outputs = (S3Inputs(s3_client(settings), settings.s3_bucket, settings.s3_prefix)
               if settings.s3_bucket else None)  # fmt: skip

    def presign(uri: str) -> str | None:
        """A link to the stored video, valid an hour (None without a bucket)."""
        if outputs is None:
            return None
        try:
            return outputs.presign(uri, 3600)
        except (ValueError, WorkerError):
            return None

    from workers.adapters.redis.queues import RedisQueues
    from workers.bootstrap import broker_redis, redis_client
    from workers.entrypoints.console.app import flower_tasks

    broker = broker_redis(settings) or redis_client(settings)
    flower_auth = None
    if settings.flower_basic_auth:
        user, _, password = (
            settings.flower_basic_auth.get_secret_value().split(",")[0].partition(":")
        )
        flower_auth = (user, password)
    app = create_app(_queue(), users=users, secret=secret, flower_url=settings.flower_url,
                     presign=presign,
                     queues=RedisQueues(broker, prefix=settings.key_prefix),
                     tasks=flower_tasks(settings.flower_api_url or settings.flower_url,
                                        flower_auth))  # fmt: skip
    uvicorn.run(app, host=host or settings.console_addr, port=port or settings.console_port,
                log_level="warning")  # fmt: skip


@main.group()
def bucket() -> None:
    """The S3 bucket the videos go to."""


@bucket.command("setup")
@click.option(
    "--days",
    type=click.IntRange(1, 365),
    default=2,
    show_default=True,
    help="abort multipart uploads still unfinished this many days after they began",
)
def bucket_setup(days: int) -> None:
    """Add (or update) the lifecycle rule that sweeps unfinished multipart uploads under
    S3_PREFIX. Copies keep an upload open between attempts on purpose; the workers abort one
    whose job ended, and this rule removes what a crash left. Other rules are kept."""
    from workers.adapters.s3.storage import ensure_abort_rule
    from workers.bootstrap import s3_client

    settings = _settings()
    if not settings.s3_bucket:
        raise click.ClickException("S3_BUCKET is not set")
    s3 = s3_client(settings)
    try:
        rule = ensure_abort_rule(s3, settings.s3_bucket, settings.s3_prefix, days)
    except WorkerError as exc:
        raise click.ClickException(str(exc)) from None
    where = rule["Filter"]["Prefix"] or "(the whole bucket)"
    click.echo(
        f"s3://{settings.s3_bucket}: unfinished multipart uploads under {where} are aborted "
        f"{days} day(s) after they began (rule {rule['ID']})"
    )


@main.group(invoke_without_command=True)
@click.pass_context
def health(ctx: click.Context) -> None:
    """Probe one component: exit 0 if healthy, else 1 with the reason on stderr. Without a
    component, the configured model against Model Studio's retirement list (``health model``)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(health_model)


@health.command("model")
def health_model() -> None:
    """The configured model (DASHSCOPE_MODEL) against its announced retirement: a warning from
    30 days before the date, unhealthy once it has passed (the successor named)."""
    from workers import models
    from workers.models.retirement import WARN_DAYS, retirement_notice

    settings = _settings()
    profile = models.profile(settings.dashscope_model)
    notice = retirement_notice(profile, datetime.now(UTC).date())
    if notice is None:
        _healthy("model", f"{profile.name}: no retirement within {WARN_DAYS} days")
        return
    if notice.retired:
        _unhealthy("model", notice.message)
    click.echo(f"model: warning: {notice.message}", err=True)
    _healthy("model", f"{profile.name}: {notice.days_left} days left")


@health.command("worker")
@click.option("--name", help="the worker's node name (default celery@<this host>; %h works)")
@_timeout_option()
def health_worker(name: str | None, timeout: float) -> None:
    """Ping one Celery worker node through the broker."""
    from celery.utils.nodenames import host_format

    settings = _settings()
    node = host_format(name or "celery@%h")  # %h: this host's name, as the worker expands it
    from config.celery_app import app
    from workers.adapters.redis.connection import celery_options
    from workers.bootstrap import celery_urls, redis_address

    broker = celery_urls(settings)[0]  # with Sentinel, the sentinel:// list
    sentinel = celery_options(redis_address(settings), broker, "").get("broker_transport_options")

    def ping() -> list[dict[str, Any]]:
        bounded = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "max_retries": 1}
        bounded.update(sentinel or {})
        with app.connection_for_write(
            url=broker, connect_timeout=timeout, transport_options=bounded
        ) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=math.ceil(timeout))
            return app.control.ping(destination=[node], timeout=timeout, connection=conn) or []

    try:
        # kombu retries a lost broker connection without end; the probe must not.
        replies = _bounded(ping, 2 * timeout + 5)
    except Exception as exc:
        why = _why(exc, settings.redis_url if broker.startswith("sentinel") else broker)
        shown = redact(broker.split(";")[0])
        _unhealthy(f"worker {node}", f"broker {shown}: {why}")
    answered = [reply[node] for reply in replies if node in reply]
    if not answered:
        _unhealthy(f"worker {node}", f"no answer to ping within {timeout:g} s")
    _healthy(f"worker {node}", str(answered[0].get("ok", answered[0])))


@health.command("beat")
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    help="oldest acceptable heartbeat, s (default 3 x WATCHDOG_INTERVAL_SECONDS + 30)",
)
@_timeout_option()
def health_beat(max_age: float | None, timeout: float) -> None:
    """Check that celery beat's watchdog ran lately (its heartbeat in Redis is fresh)."""
    settings = _settings()
    limit = max_age if max_age is not None else 3 * settings.watchdog_interval_seconds + 30
    key = beat_heartbeat_key(settings.key_prefix)
    try:
        raw = _redis_call(settings, timeout, lambda client: client.get(key))
    except Exception as exc:
        why = _why(exc, settings.redis_url)
        _unhealthy("beat", f"cannot read {key} from {redact(settings.redis_url)}: {why}")
    if raw is None:
        _unhealthy("beat", f"no heartbeat at {key}: no watchdog ran lately (is beat running?)")
    try:
        stamp = float(raw)
    except ValueError:
        _unhealthy("beat", f"unreadable heartbeat at {key}")
    age = time.time() - stamp
    if age > limit:
        _unhealthy("beat", f"last heartbeat {age:.1f} s ago, older than {limit:g} s")
    _healthy("beat", f"last heartbeat {max(age, 0.0):.1f} s ago")


@health.command("redis")
@_timeout_option()
def health_redis(timeout: float) -> None:
    """PING Redis: the job store (REDIS_URL, or the master REDIS_SENTINELS name, after asking
    each Sentinel), and the broker too when it is another Redis."""
    settings = _settings()
    from workers.bootstrap import redis_address

    address = redis_address(settings)
    if address.uses_sentinel:
        _check_sentinels(address, timeout)
    where = address.describe()
    try:
        took = _redis_call(settings, timeout, _timed_ping)
    except Exception as exc:
        _unhealthy("redis", f"{where}: {_why(exc, settings.redis_url)}")
    _healthy("redis", f"{where} answered PING in {took * 1000:.1f} ms")
    if address.uses_sentinel or settings.wait_replicas:
        _check_replicas(settings, timeout)
    broker = settings.celery_broker_url
    if broker and broker != settings.redis_url and broker.split(":", 1)[0] in _PLAIN_REDIS:
        try:
            took = _redis_call(settings, timeout, _timed_ping, url=broker)
        except Exception as exc:
            _unhealthy("redis", f"{redact(broker)}: {_why(exc, broker)}")
        _healthy("redis", f"{redact(broker)} answered PING in {took * 1000:.1f} ms")


_PLAIN_REDIS = ("redis", "rediss", "unix")


def _check_sentinels(address: Any, timeout: float) -> None:
    """Each Sentinel answers and names a master; unhealthy when fewer than a majority do, or
    when they disagree."""
    import redis

    from workers.adapters.redis.connection import sentinel_kwargs

    named: dict[str, str] = {}
    for host, port in address.sentinels:
        client = redis.Redis(host=host, port=port, **sentinel_kwargs(address, timeout, timeout))
        try:
            found: Any = client.sentinel_get_master_addr_by_name(address.master_name)
            master = ":".join(v.decode() if isinstance(v, bytes) else str(v) for v in found or [])
            named[f"{host}:{port}"] = master or "(does not know the master)"
        except Exception as exc:
            named[f"{host}:{port}"] = _why(exc)
        finally:
            client.close()
    masters = {m for m in named.values() if m.count(":") == 1 and m[-1].isdigit()}
    answered = sum(1 for m in named.values() if m in masters)
    shown = ", ".join(f"{k} -> {v}" for k, v in named.items())
    if len(masters) != 1 or answered <= len(named) // 2:
        _unhealthy("sentinel", f"no majority names one master {address.master_name!r}: {shown}")
    _healthy("sentinel", shown)


def _check_replicas(settings: Settings, timeout: float) -> None:
    from workers.adapters.redis.replication import replication_status

    try:
        status = _redis_call(settings, timeout, replication_status)
    except Exception as exc:
        _unhealthy("replication", _why(exc, settings.redis_url))
    replicas, want = status["replicas"], settings.wait_replicas
    detail = (
        f"role {status['role']}, {len(replicas)} replica(s) connected "
        f"({', '.join(replicas) or 'none'}); protected writes wait for {min(want, len(replicas))}"
        f" of REDIS_WAIT_REPLICAS={want}; min-replicas-to-write "
        f"{'unknown' if status['min_replicas_to_write'] is None else status['min_replicas_to_write']}"
    )
    if status["role"] != "master" or len(replicas) < want:
        _unhealthy("replication", detail)
    _healthy("replication", detail)


@health.command("queues")
@click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="oldest acceptable wait of a queue's oldest message, s",
)
@_timeout_option()
def health_queues(max_age: float, timeout: float) -> None:
    """Every routed queue has a live consumer and no message older than --max-age."""
    from workers.adapters.redis.queues import RedisQueues, problems
    from workers.domain.routes import QUEUES

    settings = _settings()
    url = settings.broker_url
    separate = settings.celery_broker_url is not None and url != settings.redis_url
    try:
        states = _redis_call(
            settings,
            timeout,
            lambda c: RedisQueues(c, prefix=settings.key_prefix).sample(QUEUES),
            url=url if separate else None,
        )
    except Exception as exc:
        _unhealthy("queues", f"{redact(url)}: {_why(exc, url)}")
    found = problems(states, max_age)
    if found:
        _unhealthy("queues", "; ".join(found))
    _healthy(
        "queues",
        ", ".join(
            f"{s.name}: {s.length} waiting, {s.consumers} consumer(s), oldest {s.oldest_seconds:.0f} s"
            for s in states
        ),
    )


@health.command("flower")
@click.option("--url", help="Flower's base URL (default http://127.0.0.1:FLOWER_PORT)")
@_timeout_option()
def health_flower(url: str | None, timeout: float) -> None:
    """GET Flower's /healthcheck (no auth needed): healthy when it answers 200 OK."""
    base = url or f"http://127.0.0.1:{_settings().flower_port}"
    _http_probe("flower", base, "/healthcheck", timeout, expect_body="OK")


@health.command("console")
@click.option("--url", help="the console's base URL (default http://127.0.0.1:CONSOLE_PORT)")
@_timeout_option()
def health_console(url: str | None, timeout: float) -> None:
    """GET the job console's /healthz (no auth needed): healthy when it answers 200 OK."""
    base = url or f"http://127.0.0.1:{_settings().console_port}"
    _http_probe("console", base, "/healthz", timeout, expect_body="OK")


@health.command("exporter")
@click.option("--url", help="the exporter's base URL (default http://127.0.0.1:METRICS_PORT)")
@_timeout_option()
def health_exporter(url: str | None, timeout: float) -> None:
    """GET the Prometheus exporter's /metrics: healthy when it answers 200."""
    base = url or f"http://127.0.0.1:{_settings().metrics_port}"
    _http_probe("exporter", base, "/metrics", timeout)


def _why(exc: BaseException, url: str = "") -> str:
    """The exception in one line, with ``url``'s credentials (if any) blanked out."""
    text = " ".join(str(exc).split())
    if url:
        text = text.replace(url, redact(url))
        parts = urlsplit(url)
        for secret in (parts.password, parts.username):
            if secret:
                text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _bounded(call: Callable[[], T], seconds: float) -> T:
    """``call()`` in a daemon thread; ``TimeoutError`` if it has not returned after ``seconds``."""
    import threading

    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="health-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer within {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(T, value)


def _timed_ping(client: Any) -> float:
    started = time.monotonic()
    client.ping()
    return time.monotonic() - started


def _redis_call(
    settings: Settings, timeout: float, call: Callable[[Any], Any], *, url: str | None = None
) -> Any:
    """``call(client)`` on the job store's Redis (through Sentinel when configured), or on the
    plain Redis at ``url``, with ``timeout`` on every socket and no retries."""
    import redis

    from workers.bootstrap import redis_client

    if url is None:
        client = redis_client(
            settings, socket_timeout=timeout, connect_timeout=timeout, retry_on_timeout=False
        )
    else:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
    try:
        return call(client)
    finally:
        client.close()


def _http_probe(
    component: str, base: str, path: str, timeout: float, *, expect_body: str | None = None
) -> None:
    import httpx

    target = base.rstrip("/") + path
    shown = redact(target)
    try:
        response = httpx.get(target, timeout=timeout, follow_redirects=False)
    except (httpx.HTTPError, ValueError) as exc:
        _unhealthy(component, f"{shown}: {_why(exc, target)}")
    if response.status_code != 200:
        _unhealthy(component, f"{shown} answered HTTP {response.status_code}")
    if expect_body is not None and response.text.strip() != expect_body:
        _unhealthy(component, f"{shown} answered 200 but not {expect_body!r}")
    _healthy(component, f"{shown} answered 200")


@main.command()
@click.option("--addr", help="listen address (default METRICS_ADDR)")
@click.option("--port", type=click.IntRange(1, 65535), help="listen port (default METRICS_PORT)")
def metrics(addr: str | None, port: int | None) -> None:
    """Run the Prometheus exporter (blocks): job states, queues, quotas, from Redis."""
    settings = _settings()
    from workers.adapters.redis.metrics import serve
    from workers.bootstrap import redis_client

    serve(
        settings.redis_url,
        settings.key_prefix,
        broker_url=settings.celery_broker_url,
        client=redis_client(settings, socket_timeout=5.0, connect_timeout=3.0),
        addr=addr if addr is not None else settings.metrics_addr,
        port=port if port is not None else settings.metrics_port,
    )


def _wait(queue: AnimateQueue, job_id: str, timeout: float | None) -> dict[str, Any]:
    from workers.producer import JobTimeout

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
