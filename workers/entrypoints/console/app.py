"""The job console: the page an operator opens first (``animate-queue console``).

It owns the web app only. Everything it shows is read from the job store, the governor and the
metrics through the producer's API (:class:`~workers.producer.AnimateQueue`), the same code the
CLI uses; it keeps no state of its own, so it never becomes a second source of truth. Its actions
go through the same calls as the CLI (``cancel`` sends ``animate.cancel`` to a worker).

Decisions:

* Server-rendered pages (Starlette + Jinja2, autoescaped) and a few lines of plain JavaScript
  that re-fetch marked fragments every two seconds: live without a front-end build step or a
  script from a CDN. Anything a producer or DashScope wrote (metadata, errors, file names) is
  only ever inserted as escaped text.
* HTTP basic auth like Flower's; the console refuses to start without it unless told
  (``CONSOLE_ALLOW_NO_AUTH``). Browsers send basic credentials with cross-site requests, so
  every action also carries a CSRF token (an HMAC of the user) and must come from this origin.
* Pages are plain functions (Starlette runs them in its thread pool) and actions run their
  blocking calls there too: a slow Redis, Flower or worker never stalls the other pages.
* The job list walks the state index with its own cursor (one page costs the same with
  100,000 jobs); free text is a job id (looked up directly) or a metadata value (matched within
  the page).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from workers.adapters.redis.metrics import counter_key
from workers.adapters.redis.queues import RedisQueues
from workers.domain.costs import utc_day
from workers.domain.routes import QUEUES
from workers.domain.states import FINAL_STATES, JobState
from workers.domain.views import job_view
from workers.producer import AnimateQueue

HERE = Path(__file__).parent
PAGE_SIZE = 50
AT_RISK_SECONDS = 6 * 3600.0  # a paid video whose URL has less than this left is at risk
THROUGHPUT_WINDOW = 900.0
ACTIVE = [s.value for s in JobState if s not in FINAL_STATES]

Presign = Callable[[str], str | None]
# A job's Celery tasks as Flower knows them: (task id, name, state, received) oldest first, or
# None when Flower could not be asked.
FlowerTasks = Callable[[str], list[dict[str, Any]] | None]


def flower_tasks(api_url: str, auth: tuple[str, str] | None, timeout: float = 2.0) -> FlowerTasks:
    """Flower's ``/api/tasks?search=<job id>``: our tasks carry the job id in their arguments."""

    def tasks(job_id: str) -> list[dict[str, Any]] | None:
        try:
            answer = httpx.get(f"{api_url.rstrip('/')}/api/tasks", params={"search": job_id},
                               auth=auth, timeout=timeout)  # fmt: skip
            answer.raise_for_status()
            found = answer.json()
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(found, dict):
            return None
        rows = [{"id": str(task_id), "name": str(t.get("name") or ""),
                 "state": str(t.get("state") or ""), "received": t.get("received")}
                for task_id, t in found.items() if isinstance(t, dict)]  # fmt: skip
        return sorted(rows, key=lambda r: r["received"] or 0)

    return tasks


def parse_users(setting: str) -> dict[str, str]:
    """``user:password[,user:password...]`` (CONSOLE_BASIC_AUTH) as a mapping."""
    users = {}
    for pair in setting.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("CONSOLE_BASIC_AUTH must be user:password[,user:password...]")
        users[user] = password
    return users


class Auth(BaseHTTPMiddleware):
    """HTTP basic auth on every page (``users`` None: open, as the operator chose)."""

    def __init__(self, app: Any, users: Mapping[str, str] | None) -> None:
        super().__init__(app)
        self.users = users

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if self.users is None or request.url.path == "/healthz":  # (the probe needs no user)
            request.state.user = "anonymous"
            return await call_next(request)
        user = self._user(request.headers.get("authorization", ""))
        if user is None:
            return PlainTextResponse(
                "authentication required", 401, {"WWW-Authenticate": 'Basic realm="console"'}
            )
        request.state.user = user
        return await call_next(request)

    def _user(self, header: str) -> str | None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or self.users is None:
            return None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        expected = self.users.get(user)
        if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
            return None
        return user


class Console:
    """The routes over one :class:`AnimateQueue`."""

    def __init__(
        self,
        queue: AnimateQueue,
        *,
        secret: bytes,
        flower_url: str,
        presign: Presign,
        queues: RedisQueues | None = None,
        tasks: FlowerTasks | None = None,
    ) -> None:
        self.queue = queue
        self.queues = queues  # the broker's queues (length, consumers, oldest wait)
        self.tasks = tasks  # a job's Celery tasks, from Flower (None: not asked)
        # (when, jobs finished so far) as the overview read them: the throughput is the rate
        # between the oldest sample of the last quarter hour and now (a display cache only)
        self.finished: deque[tuple[float, float]] = deque(maxlen=240)
        self.secret = secret
        self.flower_url = flower_url.rstrip("/")
        self.presign = presign
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters["utc"] = _utc
        # Plain text, escaped by the template like any other (Jinja's tojson writes <, > and &
        # as \u escapes, which would show the reader escapes instead of what was sent).
        self.templates.env.filters["pretty"] = lambda value: json.dumps(
            value, indent=2, ensure_ascii=False, sort_keys=True, default=str
        )

    def csrf(self, request: Request) -> str:
        user = getattr(request.state, "user", "")
        return hmac.new(self.secret, f"csrf:{user}".encode(), hashlib.sha256).hexdigest()

    def render(self, request: Request, name: str, **context: Any) -> HTMLResponse:
        context.update(request=request, csrf=self.csrf(request), flower_url=self.flower_url)
        return self.templates.TemplateResponse(request, name, context)

    # ------------------------------------------------------------------ pages

    def overview(self, request: Request) -> Response:
        now = time.time()
        today = utc_day(now)
        accounts = self.queue.accounts()
        for view in accounts:
            view["spent_today"] = round(self.queue.governor.spent(view["account"], today), 4)
        by_model = sorted(self.queue.governor.spent_by_model(today).items())
        return self.render(
            request,
            "overview.html",
            counts=self.queue.store.count_by_state(),
            accounts=accounts,
            day=today,
            spend=[(account, model, round(cost, 4)) for (account, model), cost in by_model],
            queues=self.queues.sample(QUEUES) if self.queues is not None else [],
            at_risk=self._at_risk(now),
            throughput=self._throughput(now),
            now=now,
        )

    def _throughput(self, now: float) -> float | None:
        """Jobs finished per minute over the last quarter hour of overview reads (None until
        two reads at least ten seconds apart)."""
        store = self.queue.store
        raw = store.redis.hvals(counter_key(store.prefix, "jobs_finished_total"))
        total = sum(float(v) for v in raw)
        self.finished.append((now, total))
        while self.finished and now - self.finished[0][0] > THROUGHPUT_WINDOW:
            self.finished.popleft()
        first_at, first_total = self.finished[0]
        if now - first_at < 10:
            return None
        return round((total - first_total) / (now - first_at) * 60, 2)

    def _at_risk(self, now: float) -> list[tuple[str, float]]:
        """Paid videos not yet copied whose URL dies within AT_RISK_SECONDS, soonest first."""
        store = self.queue.store
        found: list[tuple[bytes, float]] = store.redis.zrangebyscore(  # type: ignore[assignment]
            f"{store.prefix}:expiring", "-inf", now + AT_RISK_SECONDS, start=0, num=50,
            withscores=True,
        )  # fmt: skip
        return [(_text(job_id), float(at) - now) for job_id, at in found]

    def jobs(self, request: Request) -> Response:
        return self.render(request, "jobs.html", **self._listing(request))

    def rows(self, request: Request) -> Response:
        return self.render(request, "_rows.html", **self._listing(request))

    def _listing(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        state = q.get("state") or "SUBMITTED"
        text = (q.get("q") or "").strip()
        account, model = q.get("account") or "", q.get("model") or ""
        try:
            min_age = max(0.0, float(q.get("min_age") or 0)) * 60  # minutes, in the form
        except ValueError:
            min_age = 0.0
        try:
            cursor = max(0, int(q.get("cursor") or 0))
        except ValueError:
            cursor = 0
        direct = self.queue.get(text) if text else None
        if direct is not None:
            views, next_cursor = [direct], 0
        else:
            next_cursor, jobs = self.queue.store.page_jobs(state, cursor, PAGE_SIZE)
            views = [job_view(job) for job in jobs]
            views = [v for v in views if _matches(v, account, model, text)
                     and time.time() - v["created_at"] >= min_age]  # fmt: skip
        filters = {"state": state, "account": account, "model": model, "q": text,
                   "min_age": q.get("min_age") or ""}  # fmt: skip
        more = urlencode({**filters, "cursor": next_cursor}) if next_cursor else None
        return {
            "views": views,
            "filters": filters,
            "states": [s.value for s in JobState],
            "more": more,
            "live": "/jobs/rows?" + urlencode({**filters, "cursor": cursor}),
            "now": time.time(),
        }

    def job(self, request: Request) -> Response:
        return self._job_page(request, "job.html")

    def job_live(self, request: Request) -> Response:
        return self._job_page(request, "_job_live.html")

    def _job_page(self, request: Request, template: str) -> Response:
        job_id = request.path_params["job_id"]
        view = self.queue.get(job_id)
        message = request.query_params.get("message")
        if view is None and message and template == "job.html":
            # An action just enqueued it: its record comes with its intake, in a moment.
            return self.render(request, "pending.html", job_id=job_id, message=message)
        if view is None:
            return PlainTextResponse(f"no job {job_id}", 404)
        video = self.presign(view["s3_uri"]) if view["s3_uri"] else None
        lines, now = self.queue.timeline(job_id), time.time()
        return self.render(
            request,
            template,
            view=view,
            timeline=steps_of(lines, view, now),
            steps=by_step(lines, view, now),
            tasks=self.tasks(job_id) if self.tasks is not None and template == "job.html" else None,
            video=video,
            now=now,
            at_risk=AT_RISK_SECONDS,
            message=message,
        )

    # ------------------------------------------------------------------ actions

    async def cancel(self, request: Request) -> Response:
        def act(job_id: str) -> tuple[str, str]:
            outcome = self.queue.cancel(job_id, timeout=30)
            return job_id, f"{outcome.get('outcome')}: {outcome.get('message')}"

        return await self._act(request, "cancel", act)

    async def retry_copy(self, request: Request) -> Response:
        def act(job_id: str) -> tuple[str, str]:
            outcome = self.queue.retry_copy(job_id)
            return job_id, f"{outcome['outcome']}: {outcome['message']}"

        return await self._act(request, "retry the copy", act)

    async def rerun(self, request: Request) -> Response:
        def act(job_id: str) -> tuple[str, str]:
            new = self.queue.rerun(job_id)
            return new, f"enqueued as a new job, {new}, the run again of {job_id}"

        return await self._act(request, "run again", act)

    async def _act(
        self, request: Request, what: str, act: Callable[[str], tuple[str, str]]
    ) -> Response:
        """An action through the producer's API (the CLI's code path); the page it lands on
        says what happened, or why nothing did."""
        job_id = request.path_params["job_id"]
        refused = await self._refuse(request)
        if refused is not None:
            return refused
        try:  # (blocking calls, a cancel waits for a worker: off the event loop)
            shown, message = await run_in_threadpool(act, job_id)
        except Exception as exc:  # refused, no worker answered, Redis down: say so on the page
            shown, message = job_id, f"{what} not done: {type(exc).__name__}: {exc}"
        target = f"/jobs/{shown}?" + urlencode({"message": message[:300]})
        return RedirectResponse(target, status_code=303)

    async def _refuse(self, request: Request) -> Response | None:
        """A POST must carry this user's CSRF token and come from this origin."""
        form = await request.form()
        token = str(form.get("csrf") or "")
        if not hmac.compare_digest(token, self.csrf(request)):
            return PlainTextResponse("missing or wrong CSRF token", 403)
        origin = request.headers.get("origin") or request.headers.get("referer")
        if origin and urlsplit(origin).netloc != request.url.netloc:
            return PlainTextResponse("cross-origin request refused", 403)
        return None


def steps_of(lines: list[dict[str, Any]], view: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Timeline lines with how long each lasted (until the next line; the last one: until now
    while the job runs), and the detail a person reads (attempts, the reason of a retry)."""
    rows = []
    for i, line in enumerate(lines):
        end = lines[i + 1]["at"] if i + 1 < len(lines) else (None if view["final"] else now)
        detail = {k: v for k, v in line.items() if k not in ("at", "to", "from", "created")}
        rows.append({**line, "seconds": None if end is None else round(end - line["at"], 1),
                     "detail": detail})  # fmt: skip
    return rows


def by_step(lines: list[dict[str, Any]], view: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """The timeline folded into one row per stay in a state: when it began, how long it lasted,
    its attempts (the highest count a line names, else 1) and the reason of each retry (a line
    with an error)."""
    rows: list[dict[str, Any]] = []
    for line in lines:
        state = line.get("to")
        if state is None:
            continue
        if not rows or rows[-1]["state"] != state or "from" in line:
            rows.append({"state": state, "at": line["at"], "attempts": 1, "retries": []})
        row = rows[-1]
        for name in ("submit_attempts", "copy_attempts", "detect_attempts", "prepare_attempts"):
            if isinstance(line.get(name), int):
                row["attempts"] = max(row["attempts"], line[name])
        if line.get("error_code"):
            row["retries"].append(f"{line['error_code']}: {line.get('error_message', '')}")
    for i, row in enumerate(rows):
        end = rows[i + 1]["at"] if i + 1 < len(rows) else (None if view["final"] else now)
        row["seconds"] = None if end is None else round(end - row["at"], 1)
    return rows


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _utc(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")


def _matches(view: dict[str, Any], account: str, model: str, text: str) -> bool:
    if account and view["account"] != account:
        return False
    if model and view["model"] != model:
        return False
    if text:
        metadata = view.get("metadata") or {}
        values = [str(v) for v in metadata.values()] if isinstance(metadata, dict) else []
        return any(text.lower() in v.lower() for v in values) or text in view["job_id"]
    return True


def create_app(
    queue: AnimateQueue,
    *,
    users: Mapping[str, str] | None,
    secret: bytes,
    flower_url: str = "http://localhost:5555",
    presign: Presign = lambda uri: None,
    queues: RedisQueues | None = None,
    tasks: FlowerTasks | None = None,
) -> Starlette:
    """The console over ``queue``. ``users`` None means no auth (the operator chose it)."""
    console = Console(queue, secret=secret, flower_url=flower_url, presign=presign, queues=queues,
                      tasks=tasks)  # fmt: skip
    routes = [
        Route("/healthz", lambda request: PlainTextResponse("OK")),
        Route("/", console.overview),
        Route("/jobs", console.jobs),
        Route("/jobs/rows", console.rows),
        Route("/jobs/{job_id}", console.job),
        Route("/jobs/{job_id}/live", console.job_live),
        Route("/jobs/{job_id}/cancel", console.cancel, methods=["POST"]),
        Route("/jobs/{job_id}/retry-copy", console.retry_copy, methods=["POST"]),
        Route("/jobs/{job_id}/rerun", console.rerun, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Auth, users=users)])
