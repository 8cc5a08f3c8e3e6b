"""The DashScope client fitted to the VideoApi port (core types in and out)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx

from workers.adapters.dashscope.client import DashScopeClient, RemoteTask, VideoRequest
from workers.domain.decisions import RemoteSnapshot
from workers.domain.request import JobKind, JobRequest
from workers.domain.templates import Detection
from workers.errors import (
    DashScopeBadResponse,
    DashScopeRejected,
    DashScopeThrottled,
    DashScopeUnavailable,
    DashScopeUncertain,
    TransientError,
    WorkerError,
)
from workers.models import ModelProfile
from workers.models.retirement import gone_message
from workers.ports import Metrics

# Errors raised after the request left us: DashScope may have acted on it. (Connect errors and
# a full pool mean nothing was sent.)
_AMBIGUOUS = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.WriteError,
              httpx.RemoteProtocolError, httpx.DecodingError)  # fmt: skip


MAX_LIST_PAGES = 50  # 5,000 tasks in one submit's window: more means something else is wrong

# DashScope saying the model does not exist (a retired one: what it answers then is not
# documented, so a code of these, or a 4xx naming the model as gone).
MODEL_GONE = "ModelRetired"
_GONE_CODES = frozenset({"ModelNotFound", "Model.NotFound", "InvalidModel", "Model.Offline",
                         "ModelOffline", "Model.Retired", "ModelRetired"})  # fmt: skip
_GONE_WORDS = ("does not exist", "not exist", "retired", "offline", "下线")
# After such an answer, this process refuses the model's calls itself for this long: the jobs
# queued behind fail at once, each with the same message, not each after a call of its own.
MODEL_GONE_SECONDS = 600.0


def model_gone(exc: DashScopeRejected) -> bool:
    text = exc.message.lower()
    return exc.code in _GONE_CODES or (
        exc.status in (400, 404, 410) and "model" in text and any(w in text for w in _GONE_WORDS)
    )


@contextmanager
def _uncertain_when_unanswered() -> Iterator[None]:
    """A submit's errors that leave open whether DashScope created the (paid) task become
    :class:`DashScopeUncertain`: transport errors after sending, 5xx and 408 answers (a gateway
    may have forwarded it), and a 200 we cannot read. 429 and other 4xx stay what they are:
    DashScope documents that nothing was done."""
    try:
        yield
    except DashScopeThrottled:
        raise
    except DashScopeUnavailable as exc:
        cause = exc.__cause__
        if cause is None or isinstance(cause, _AMBIGUOUS):  # an HTTP 5xx/408, or sent and lost
            raise DashScopeUncertain(exc.message, code=exc.code) from exc
        raise
    except DashScopeBadResponse as exc:
        raise DashScopeUncertain(
            f"{exc.message} (the answer to a submit: a task may exist)", code=exc.code
        ) from exc


class DashScopeVideoApi:
    """The pipeline's ``VideoApi`` over one :class:`DashScopeClient` per account."""

    def __init__(
        self,
        clients: Mapping[str, DashScopeClient],
        profile: ModelProfile,
        *,
        metrics: Metrics | None = None,
        regions: Mapping[str, tuple[str, str]] | None = None,
        profiles: Mapping[str, ModelProfile] | None = None,
    ) -> None:
        self.metrics = metrics
        self.clients = dict(clients)
        self.regions = dict(regions or {})  # account -> (region, base URL)
        self.profile = profile  # the default model's (templates and detection are its family's)
        self.model = profile.name
        self.profiles = {profile.name: profile, **(profiles or {})}  # a job's own model
        # (account, model) -> (until, message): DashScope said the model is gone for that key
        self._gone: dict[tuple[str, str], tuple[float, str]] = {}
        self._gone_lock = threading.Lock()

    def _family(self, kind: str) -> ModelProfile:
        """The profile whose ``template`` or ``detect`` model serves that kind of call: the
        default model's family if it has one, else the first that has (AnimateAnyone's)."""
        for profile in (self.profile, *self.profiles.values()):
            if (profile.template if kind == "template" else profile.detect) is not None:
                return profile
        raise DashScopeRejected(f"no model here makes {kind} calls", code="UnknownModel")

    def model_for(self, kind: str) -> str:
        """The model name behind a call: ``video:<model>`` (a job's own), ``video`` (the
        default's), ``template`` or ``detect`` (the family that has them)."""
        if kind.startswith("video:"):
            return self._profile(kind.removeprefix("video:")).name
        if kind in ("template", "detect"):
            return self._family(kind).remote(kind).name
        return self.profile.name

    @contextmanager
    def _counted(self, op: str, account: str) -> Iterator[None]:
        """Count DashScope's refusals and failures by code (429s also on their own)."""
        try:
            try:
                yield
            except DashScopeRejected as exc:
                if exc.status != 401 or account not in self.regions:
                    raise
                raise self._refused_key(account, exc) from exc
        except WorkerError as exc:
            if self.metrics is not None:
                self.metrics.inc("remote_errors_total", account=account, op=op, code=exc.code)
                if isinstance(exc, DashScopeThrottled):
                    self.metrics.inc("throttled_total", account=account, op=op)
            raise

    def _refused_key(self, account: str, exc: DashScopeRejected) -> DashScopeRejected:
        """A 401 says the key is not valid where it was used: a key made in another region is
        the likely cause when the key itself is right, so the error says so."""
        region, url = self.regions[account]
        host = urlsplit(url).hostname or url
        message = (f"DashScope refused account {account!r}'s API key at {host} (region {region}). "
                   "An API key works only in the region it was created in: if this key is from "
                   "another region, set the account's region (DASHSCOPE_ACCOUNT_REGIONS); "
                   f"otherwise the key is wrong or revoked. ({exc.message})")  # fmt: skip
        return DashScopeRejected(message, code=exc.code, status=exc.status)

    def _profile(self, model: str | None) -> ModelProfile:
        if model is None:
            return self.profile
        found = self.profiles.get(model)
        if found is None:
            raise DashScopeRejected(f"model {model!r} is not served here", code="UnknownModel")
        return found

    @contextmanager
    def _served(self, account: str, kind: str) -> Iterator[None]:
        """Refuse a call to a model DashScope said is gone for this account's key (for
        MODEL_GONE_SECONDS); turn such an answer into one final error naming the successor."""
        name = self.model_for(kind)
        profile = self._family(kind) if kind in ("template", "detect") else self._profile(name)
        with self._gone_lock:
            gone = self._gone.get((account, name))
        if gone is not None and gone[0] > time.monotonic():
            raise DashScopeRejected(gone[1], code=MODEL_GONE)
        try:
            yield
        except DashScopeRejected as exc:
            if not model_gone(exc):
                raise
            message = gone_message(profile, f"{exc.code}: {exc.message}")
            with self._gone_lock:
                self._gone[account, name] = (time.monotonic() + MODEL_GONE_SECONDS, message)
            raise DashScopeRejected(message, code=MODEL_GONE, status=exc.status) from exc

    def _client(self, account: str) -> DashScopeClient:
        try:
            return self.clients[account]
        except KeyError:
            raise DashScopeRejected(
                f"account {account!r} is not configured on this worker", code="UnknownAccount"
            ) from None

    def submit(self, account: str, request: JobRequest) -> str:
        """A video job on the model its request names (the steps always name it)."""
        served = self._served(account, f"video:{request.model or self.model}")
        with self._counted("submit", account), served, _uncertain_when_unanswered():
            submitted = self._client(account).submit_video(
                VideoRequest(
                    image_url=request.image_url,
                    template_id=request.template_id,
                    use_ref_img_bg=request.use_ref_img_bg,
                    video_ratio=request.video_ratio,
                    video_url=request.video_url,
                    mode=request.mode,
                    check_image=request.check_image,
                ),
                profile=self._profile(request.model),
            )
            return submitted.task_id

    def submit_template(self, account: str, video_url: str) -> str:
        with (
            self._counted("template", account),
            self._served(account, "template"),
            _uncertain_when_unanswered(),
        ):
            submitted = self._client(account).submit_async(
                self._family("template").remote("template"), {"video_url": video_url}
            )
            return submitted.task_id

    def detect(self, account: str, image_url: str) -> Detection:
        with self._counted("detect", account), self._served(account, "detect"):
            output = self._client(account).detect(image_url, self._family("detect"))
            bodystyle, reason = output.get("bodystyle"), output.get("reason")
            return Detection(
                check_pass=bool(output["check_pass"]),
                bodystyle=bodystyle if isinstance(bodystyle, str) and bodystyle else None,
                reason=reason if isinstance(reason, str) and reason else None,
            )

    def upload(self, account: str, kind: str, filename: str, data: bytes) -> str:
        """DashScope's temporary storage (docs §7): an oss:// URL for one account and model."""
        with self._counted("upload", account):
            return self._client(account).upload(self.model_for(kind), filename, data)

    def submit_is_ambiguous(self, exc: TransientError) -> bool:
        return isinstance(exc, DashScopeUncertain)

    def poll(self, account: str, task_id: str) -> RemoteSnapshot:
        with self._counted("query", account):
            return snapshot(self._client(account).get_task(task_id))

    def cancel(self, account: str, task_id: str) -> None:
        with self._counted("cancel", account):
            self._client(account).cancel_task(task_id)

    def recent_tasks(
        self,
        account: str,
        since: float,
        until: float,
        kind: str = JobKind.VIDEO,
        model: str | None = None,
    ) -> list[str]:
        """Every task of the account for the kind's model (a video job's own ``model``) created
        in [since, until]: every page is read (a busy account's window may hold more than one)."""
        ids: list[str] = []
        listed_model = (model if model is not None and kind == JobKind.VIDEO
                        else self.model_for(kind))  # fmt: skip
        with self._counted("list", account):
            for page_no in range(1, MAX_LIST_PAGES + 1):
                page = self._client(account).list_tasks(
                    start=datetime.fromtimestamp(since, UTC),
                    end=datetime.fromtimestamp(until, UTC),
                    model=listed_model,
                    page_no=page_no,
                    page_size=100,
                )
                ids += [item.task_id for item in page.items]
                if not page.items or page_no >= page.total_page:
                    return ids
        raise DashScopeUnavailable(f"list: more than {MAX_LIST_PAGES} pages of tasks in the window")


def snapshot(task: RemoteTask) -> RemoteSnapshot:
    return RemoteSnapshot(
        status=task.status,
        raw_status=task.raw_status,
        video_url=task.video_url,
        video_duration=task.video_duration,
        end_time=task.end_time.timestamp() if task.end_time else None,
        code=task.code,
        message=task.message,
        template_id=task.template_id,
    )
