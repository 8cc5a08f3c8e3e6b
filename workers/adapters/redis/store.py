"""The job store on Redis: one hash per job, compare-and-set transitions in Lua, and the indexes.

Keys (``P`` is the configured prefix):

* ``P:job:<id>``        the job hash (all values are strings; ``request`` is JSON)
* ``P:state:<STATE>``   a set of job ids per state
* ``P:deadlines``       a sorted set: job id -> when its next wake-up is due (for the watchdog)
* ``P:expiring``       a sorted set: job id -> when its video URL dies, while the job is COPYING
* ``P:remote-owner``    a hash: DashScope task id -> the job that owns it (written with the job's
                        ``remote_task_id`` in one step)
* ``P:submit-lock:<lane>``  the job whose POST is in flight or unresolved in that lane, and
                        ``...:waiting`` the jobs waiting for it, oldest first
* ``P:remote-tasks``    the DashScope task ids some job owns, scored by when (reconciling an
                        ambiguous submit; DashScope lists tasks for 24 h, so old ids are swept)

A transition names the version it expects. The Lua script applies it only if the stored version
still matches, bumps the version and moves the indexes in the same step, so two workers can never
both win, and a stale message (an older version, the fencing token) changes nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import redis

from workers.adapters.redis.replication import protected
from workers.errors import StoreUnavailable

if TYPE_CHECKING:
    from redis.commands.core import Script

    from workers.adapters.redis.replication import Replication
    from workers.ports import Metrics
from workers.domain.job import Job
from workers.domain.request import JobRequest
from workers.domain.states import FINAL_STATES, JobState
from workers.domain.templates import Detection, TemplateInfo, TemplateSource

# ``P:m:jobs`` counts jobs per "state|account|kind" (the exporter's jobs-by-state gauge); it moves
# in the same script as the state, so it never drifts.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SADD', ARGV[1] .. ':state:' .. ARGV[3], ARGV[2])
-- account and kind from the fields just written (absent: their defaults, never written)
local acct, kind = 'default', 'video'
for i = 5, #ARGV - 1, 2 do
  if ARGV[i] == 'account' then acct = ARGV[i + 1] elseif ARGV[i] == 'kind' then kind = ARGV[i + 1] end
end
redis.call('HINCRBY', ARGV[1] .. ':m:jobs', ARGV[3] .. '|' .. acct .. '|' .. kind, 1)
if ARGV[4] ~= '' then redis.call('ZADD', ARGV[1] .. ':deadlines', ARGV[4], ARGV[2]) end
return 1
"""

# ARGV: prefix, job_id, expected_version, new_state, next_action_at ('' = none), ttl (0 = none),
#       n_set, set pairs..., n_del, del fields...
_TRANSITION = """
local key = KEYS[1]
-- (account and kind read here, in the same call: they label the jobs-by-state gauge)
local current = redis.call('HMGET', key, 'version', 'state', 'account', 'kind')
if not current[1] then return -1 end
if current[1] ~= ARGV[3] then return 0 end
local prefix, job_id, new_state = ARGV[1], ARGV[2], ARGV[4]
local n_set = tonumber(ARGV[7])
local at = 8 + 2 * n_set
local n_del = tonumber(ARGV[at])
-- A DashScope task id recorded with its owner in the same step: no crash or timeout can leave
-- the id marked as owned without the job holding it (reconciliation would then skip it and
-- pay again), and a task another job owns is never recorded here.
local claim = ARGV[at + n_del + 3]
if claim and claim ~= '' then
  local owner = redis.call('HGET', prefix .. ':remote-owner', claim)
  if owner and owner ~= job_id then return -2 end
end
local version = tonumber(current[1]) + 1
local fields = {'state', new_state, 'version', tostring(version)}
for i = 0, n_set - 1 do
  table.insert(fields, ARGV[8 + 2 * i])
  table.insert(fields, ARGV[9 + 2 * i])
end
redis.call('HSET', key, unpack(fields))
if n_del > 0 then redis.call('HDEL', key, unpack(ARGV, at + 1, at + n_del)) end
if claim and claim ~= '' then
  local t = redis.call('TIME')
  redis.call('HSET', prefix .. ':remote-owner', claim, job_id)
  redis.call('ZADD', prefix .. ':remote-tasks', t[1], claim)
end
if current[2] ~= new_state then
  redis.call('SREM', prefix .. ':state:' .. current[2], job_id)
  redis.call('SADD', prefix .. ':state:' .. new_state, job_id)
  local tail = '|' .. (current[3] or 'default') .. '|' .. (current[4] or 'video')
  redis.call('HINCRBY', prefix .. ':m:jobs', current[2] .. tail, -1)
  redis.call('HINCRBY', prefix .. ':m:jobs', new_state .. tail, 1)
end
-- Jobs whose paid video waits for its copy, by when its URL dies (the exporter's copies at risk).
if new_state == 'COPYING' then
  local expires = redis.call('HGET', key, 'video_expires_at')
  if expires then redis.call('ZADD', prefix .. ':expiring', expires, job_id) end
elseif current[2] == 'COPYING' then
  redis.call('ZREM', prefix .. ':expiring', job_id)
end
if ARGV[5] == '' then
  redis.call('ZREM', prefix .. ':deadlines', job_id)
else
  redis.call('ZADD', prefix .. ':deadlines', ARGV[5], job_id)
end
local ttl = tonumber(ARGV[6])
if ttl > 0 then redis.call('EXPIRE', key, ttl) end
local event = ARGV[at + n_del + 1]
if event and event ~= '' then
  local timeline = prefix .. ':timeline:' .. job_id
  -- A poll that saw nothing new replaces the one before it if that saw nothing new either:
  -- a task polled every second for minutes keeps one line, not hundreds.
  local last = nil
  if ARGV[at + n_del + 2] == '1' then last = redis.call('LINDEX', timeline, -1) end
  if last and string.find(last, '"unchanged":true', 1, true) then
    redis.call('LSET', timeline, -1, event)
  else
    if redis.call('RPUSH', timeline, event) > 200 then redis.call('LTRIM', timeline, -200, -1) end
  end
  if ttl > 0 then redis.call('EXPIRE', timeline, ttl) end
end
return version
"""

# Only an existing job: HINCRBY on a missing (expired) key would create a hash holding nothing but
# ``duplicates``, which no Job can be decoded from and which would block that job id for good.
_NOTE_DUPLICATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HINCRBY', KEYS[1], 'duplicates', 1) end
return 0
"""

# A worker takes a step: load the job and, when it is still at the message's version, clear
# ``wake`` (the message is no longer outstanding: a worker has it). No version bump: the step's
# own transitions are still fenced by the version it was sent at.
_TAKE = """
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then redis.call('HDEL', KEYS[1], 'wake') end
return redis.call('HGETALL', KEYS[1])
"""

# The lane's submit lock: one POST in flight, or unresolved, per lane (an account and model), so
# an uncertain submit's reconciliation can tell its task from another job's. Taken over when the
# holder is no longer submitting (it ended, moved on, or its record expired).
# KEYS: the lock, the lane's waiters (a sorted set: job id -> when it began waiting).
_LOCK_SUBMIT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[2] then
  local state = redis.call('HGET', ARGV[1] .. ':job:' .. holder, 'state')
  if state == 'SUBMITTING' then
    local t = redis.call('TIME')
    redis.call('ZADD', KEYS[2], 'NX', t[1] + t[2] / 1000000, ARGV[2])
    -- It waits with no message of its own: the unlock wakes it, its deadline is the fallback.
    redis.call('HSET', ARGV[1] .. ':job:' .. ARGV[2], 'wake', 'timer')
    return holder
  end
end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[2])
return ''
"""

# Free the lock if ARGV[1] holds it; hand back the longest waiter still submitting, to be woken,
# as "<job id> <version>".
_UNLOCK_SUBMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return '' end
redis.call('DEL', KEYS[1])
while true do
  local first = redis.call('ZPOPMIN', KEYS[2])
  if #first == 0 then return '' end
  local job = redis.call('HMGET', ARGV[2] .. ':job:' .. first[1], 'state', 'version')
  if job[1] == 'SUBMITTING' then return first[1] .. ' ' .. job[2] end
end
"""

# A final job's deliveries are out: one small step, no version bump (nothing is fenced by it).
_DELIVERED = """
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'delivery', 'wake')
redis.call('HSET', KEYS[1], 'published', '1')
redis.call('ZREM', ARGV[1] .. ':deadlines', ARGV[3])
return 1
"""

_FIELDS = {f.name: f for f in dataclasses.fields(Job)}


def encode(job: Job) -> dict[str, str]:
    """A job as hash fields. None and default values are left out: they read back the same,
    and a queued job's record stays small (10,000 queued jobs should cost Redis little)."""
    out: dict[str, str] = {}
    for name, spec in _FIELDS.items():
        value = getattr(job, name)
        if value is None or (spec.default is not dataclasses.MISSING and value == spec.default):
            continue
        out[name] = encode_value(name, value)
    return out


def encode_value(name: str, value: Any) -> str:
    if name == "request":
        # Only what differs from the defaults, to keep records small.
        fields = {
            f.name: getattr(value, f.name)
            for f in dataclasses.fields(value)
            if f.name in ("image_url", "template_id") or getattr(value, f.name) != _default(f)
        }
        return json.dumps(fields, separators=(",", ":"), sort_keys=True)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def decode(fields: dict[str, str]) -> Job:
    values: dict[str, Any] = {}
    for name, raw in fields.items():
        spec = _FIELDS.get(name)
        if spec is None:
            continue
        kind = str(spec.type)
        if name == "request":
            values[name] = JobRequest(**json.loads(raw))
        elif name == "state":
            values[name] = JobState(raw)
        elif kind.startswith("bool"):
            values[name] = raw == "1"
        elif kind.startswith("int"):
            values[name] = int(raw)
        elif kind.startswith("float"):
            values[name] = float(raw)
        else:
            values[name] = raw
    return Job(**values)


_EVENT_FIELDS = ("remote_status", "error_code", "error_message", "remote_task_id", "s3_uri",
                 "submit_attempts", "copy_attempts", "throttled", "token_waits", "resumes",
                 "cancel_requested", "copy_bytes", "webhook_state", "webhook_attempts",
                 "webhook_error", "bodystyle", "detect_cached", "detect_attempts", "warning",
                 "source_sha256", "prepare_attempts", "template_id", "template_job_id",
                 "template_reused", "template_recreated")  # fmt: skip


_FIRST_ATTEMPT_IMPLIED = ("submit_attempts", "copy_attempts", "detect_attempts", "prepare_attempts")


def _event(job: Job, state: JobState, changes: dict[str, Any]) -> tuple[str, bool]:
    """One line of the job's timeline, the move and what changed that a person cares about, and
    whether it may replace the line before it. No line ("") for a change nobody reads there (an
    admission: ``admitted_at`` is on the record; a step's first attempt, right after the move
    into its state); a poll that saw nothing new is marked ``"unchanged":true``, and runs of
    those keep only the latest."""
    at = changes.get("updated_at") or time.time()
    # ms: a person reads it. No "from": it is the line before's "to" (every change of state has
    # a line), added back when read (``timeline``); 20 bytes a line less in Redis.
    event: dict[str, Any] = {"at": round(at, 3), "to": state.value}
    for name in _EVENT_FIELDS:
        if name in changes and changes[name] != getattr(job, name, None):
            event[name] = changes[name]
    if "polls" in changes:
        event["poll"] = changes["polls"]
    if changes.get("s3_key"):
        event["s3_key"] = changes["s3_key"]
    if state == job.state:
        # The first attempt of a step is implied by the move into its state, the line before.
        for name in _FIRST_ATTEMPT_IMPLIED:
            if event.get(name) == 1:
                del event[name]
    quiet = state == job.state and set(event) <= {"at", "to", "poll"}
    if quiet and "poll" not in event:
        return "", False
    if quiet:
        event["unchanged"] = True
    return json.dumps(event, separators=(",", ":"), default=str), quiet


def with_moves(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Timeline lines as read: each change of state says where it came from (``from``), taken
    from the line before (lines written before this release carry their own)."""
    for before, line in itertools.pairwise(lines):
        if "from" not in line and line.get("to") != before.get("to"):
            line["from"] = before.get("to")
    return lines


def _event_args(job: Job, state: JobState, changes: dict[str, Any]) -> tuple[str, str]:
    event, quiet = _event(job, state, changes)
    return event, "1" if quiet else "0"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- the workflow's records
#
# * ``P:templates``               template id -> JSON {account, source_sha256, source_url, job_id,
#                                 created_at, video_seconds, revoked} (old records: the account)
# * ``P:tsrc:<account>:<sha256>`` a dance video's template under one account: {template_id, job,
#                                 gen}; ``job`` is the template job making (or that made) it
# * ``P:waiters:<template job>``  video jobs waiting for that template job
# * ``P:detect:<account>:<sha>``  the image check's answer for an image (expires)
# * ``P:detect-lock:<account>:<sha>`` held while one job checks that image

# Move ``job`` of a source record from ARGV[1] (or none: '') to ARGV[2], generation ARGV[3].
_CLAIM_SOURCE = """
local current = redis.call('HGET', KEYS[1], 'job') or ''
if current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'job', ARGV[2], 'gen', ARGV[3])
return 1
"""

_FORGET_TEMPLATE = """
if redis.call('HGET', KEYS[1], 'template_id') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'template_id')
end
return 0
"""


class WorkflowRecords:
    """Templates by account and source video, waiters, and the image-check cache (on Redis)."""

    redis: redis.Redis
    prefix: str

    def _init_workflow(self) -> None:
        self._claim_source = self.redis.register_script(_CLAIM_SOURCE)
        self._forget_template = self.redis.register_script(_FORGET_TEMPLATE)

    def _source_key(self, account: str, sha256: str) -> str:
        return f"{self.prefix}:tsrc:{account}:{sha256}"

    def template_info(self, template_id: str) -> TemplateInfo | None:
        try:
            raw = self.redis.hget(f"{self.prefix}:templates", template_id)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading templates: {exc}") from exc
        return None if raw is None else _template_info(template_id, _text(raw))

    def template_owner(self, template_id: str) -> str | None:
        """The account a template was registered to (templates belong to one account)."""
        info = self.template_info(template_id)
        return info.account if info else None

    def register_template(
        self,
        template_id: str,
        account: str,
        *,
        source_sha256: str | None = None,
        source_url: str | None = None,
        job_id: str | None = None,
        video_seconds: float | None = None,
    ) -> None:
        """Record a template's owner, and (when known) the video it was made from, so later jobs
        naming that video under that account reuse it."""
        record = TemplateInfo(template_id, account, source_sha256, source_url, job_id,
                              time.time(), video_seconds)  # fmt: skip
        try:
            pipe = self.redis.pipeline()
            pipe.hset(f"{self.prefix}:templates", template_id, record.to_json())
            if source_sha256:
                pipe.hset(self._source_key(account, source_sha256), "template_id", template_id)
            pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"writing templates: {exc}") from exc

    def template_source(self, account: str, sha256: str) -> TemplateSource:
        try:
            raw = self.redis.hgetall(self._source_key(account, sha256))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading templates: {exc}") from exc
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return TemplateSource(
            template_id=fields.get("template_id"),
            job_id=fields.get("job"),
            generation=int(fields.get("gen", "0")),
        )

    def claim_template_source(
        self, account: str, sha256: str, expected_job: str | None, job_id: str, generation: int
    ) -> bool:
        """Make ``job_id`` the job that makes the video's template, if ``expected_job`` still is."""
        try:
            return bool(
                self._claim_source(
                    keys=[self._source_key(account, sha256)],
                    args=[expected_job or "", job_id, str(generation)],
                )
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"writing templates: {exc}") from exc

    def forget_template(self, account: str, sha256: str | None, template_id: str) -> None:
        """DashScope no longer accepts the template: stop handing it out."""
        try:
            if sha256:
                self._forget_template(keys=[self._source_key(account, sha256)], args=[template_id])
            info = self.template_info(template_id)
            if info is not None:
                revoked = dataclasses.replace(info, revoked=True)
                self.redis.hset(f"{self.prefix}:templates", template_id, revoked.to_json())
        except redis.RedisError as exc:
            raise StoreUnavailable(f"writing templates: {exc}") from exc

    def list_templates(self, account: str | None = None) -> list[dict[str, Any]]:
        """Every template known, optionally one account's, newest first."""
        try:
            raw = self.redis.hgetall(f"{self.prefix}:templates")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading templates: {exc}") from exc
        infos = [_template_info(_text(k), _text(v)) for k, v in raw.items()]
        rows = [dataclasses.asdict(i) for i in infos if account is None or i.account == account]
        return sorted(rows, key=lambda r: -(r["created_at"] or 0))

    def add_waiter(self, template_job_id: str, job_id: str) -> None:
        try:
            key = f"{self.prefix}:waiters:{template_job_id}"
            self.redis.sadd(key, job_id)
            self.redis.expire(key, 7 * 24 * 3600)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"writing waiters: {exc}") from exc

    def waiters(self, template_job_id: str) -> list[str]:
        try:
            members = self.redis.smembers(f"{self.prefix}:waiters:{template_job_id}")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading waiters: {exc}") from exc
        return sorted(_text(m) for m in members)

    def detection(self, account: str, sha256: str) -> Detection | None:
        try:
            raw = self.redis.get(f"{self.prefix}:detect:{account}:{sha256}")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading detections: {exc}") from exc
        if raw is None:
            return None
        data = json.loads(_text(raw))
        return Detection(bool(data["check_pass"]), data.get("bodystyle"), data.get("reason"))

    def save_detection(self, account: str, sha256: str, found: Detection, ttl: int) -> None:
        try:
            self.redis.set(
                f"{self.prefix}:detect:{account}:{sha256}",
                json.dumps(dataclasses.asdict(found), separators=(",", ":")),
                ex=ttl,
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"writing detections: {exc}") from exc

    def claim_detection(self, account: str, sha256: str, job_id: str, ttl: int) -> bool:
        """Only one job checks an image at a time; the others wait for its cached answer."""
        try:
            key = f"{self.prefix}:detect-lock:{account}:{sha256}"
            if self.redis.set(key, job_id, nx=True, ex=ttl):
                return True
            return _text(self.redis.get(key) or b"") == job_id
        except redis.RedisError as exc:
            raise StoreUnavailable(f"writing detections: {exc}") from exc


def _template_info(template_id: str, raw: str) -> TemplateInfo:
    if not raw.startswith("{"):  # registered before templates carried their source
        return TemplateInfo(template_id, raw)
    data = json.loads(raw)
    data.pop("template_id", None)
    return TemplateInfo(template_id, **data)


log = logging.getLogger(__name__)


class RedisJobStore(WorkflowRecords):
    """The :class:`workers.ports.JobStore` port on a real Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        final_ttl: int,
        metrics: Metrics | None = None,
        replication: Replication | None = None,
    ) -> None:
        """``replication``: how protected writes (creating a job, every transition) wait for
        replicas (None: they do not, as on one server)."""
        self.redis = client
        self.prefix = prefix
        self.final_ttl = final_ttl
        self.metrics = metrics
        self.replication = replication
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._note_duplicate = client.register_script(_NOTE_DUPLICATE)
        self._take = client.register_script(_TAKE)
        self._lock_submit = client.register_script(_LOCK_SUBMIT)
        self._unlock_submit = client.register_script(_UNLOCK_SUBMIT)
        self._delivered = client.register_script(_DELIVERED)
        self._init_workflow()

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new job, unless one with that id exists: (the stored job, created?)."""
        flat: list[str] = []
        for name, value in encode(job).items():
            flat += [name, value]
        next_at = "" if job.next_action_at is None else repr(job.next_action_at)
        try:
            created = self._protected(
                self._create,
                [self.key(job.job_id)],
                [self.prefix, job.job_id, job.state.value, next_at, *flat],
            )
            if created:
                timeline = f"{self.prefix}:timeline:{job.job_id}"
                first = {"at": round(job.created_at, 3), "to": job.state.value, "created": True}
                if job.error_code:
                    first["error_code"] = job.error_code
                self.redis.rpush(timeline, json.dumps(first, separators=(",", ":")))
                if job.state in FINAL_STATES:
                    self.redis.expire(self.key(job.job_id), self.final_ttl)
                    self.redis.expire(timeline, self.final_ttl)
                return job, True
        except redis.RedisError as exc:
            raise StoreUnavailable(f"creating job: {exc}") from exc
        existing = self.get(job.job_id)
        if existing is None:  # vanished in between (expired): try once more
            return self.create(job)
        return existing, False

    def get(self, job_id: str) -> Job | None:
        try:
            fields = self.redis.hgetall(self.key(job_id))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading job: {exc}") from exc
        if not fields:
            return None
        return decode({_text(k): _text(v) for k, v in fields.items()})

    def take(self, job_id: str, version: int) -> Job | None:
        """Load the job for a step sent at ``version``; if the job is still there, mark the
        step taken (its message is no longer outstanding). One round trip, as ``get``."""
        try:
            flat = self._take(keys=[self.key(job_id)], args=[str(version)])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading job: {exc}") from exc
        if not flat:
            return None
        fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return decode(fields)

    def transition(self, job: Job, state: JobState, **changes: Any) -> Job | None:
        """Move ``job`` (as loaded, at its version) to ``state`` with ``changes``; None if it lost.

        A change to None deletes the field. ``next_action_at`` also updates the deadline index.
        """
        return self._apply(job, state, changes)

    def record_submission(self, job: Job, task_id: str, **changes: Any) -> Job | None:
        """``transition`` to SUBMITTED that also records ``task_id`` as this job's
        (``remote_task_id``) and marks it owned by the job, in one step. None if the job moved
        on, or if another job owns that task (then nothing is written)."""
        changes = {**changes, "remote_task_id": task_id}
        return self._apply(job, JobState.SUBMITTED, changes, task_id)

    def _apply(
        self,
        job: Job,
        state: JobState,
        changes: dict[str, Any],
        claim: str = "",
    ) -> Job | None:
        moved = state != job.state
        if moved:
            changes = {"state_since": changes.get("updated_at") or time.time(), **changes}
        updated = dataclasses.replace(job, state=state, **changes)
        to_set: list[str] = []
        to_del: list[str] = []
        for name, value in changes.items():
            spec = _FIELDS.get(name)
            if value is None or (
                spec is not None
                and spec.default is not dataclasses.MISSING
                and value == spec.default
            ):
                to_del.append(name)  # a default reads back the same: the record stays small
            else:
                to_set += [name, encode_value(name, value)]
        # A final job keeps a deadline only while its deliveries are pending (given explicitly).
        final_due = state not in FINAL_STATES or changes.get("next_action_at") is not None
        next_at = (
            "" if updated.next_action_at is None or not final_due else repr(updated.next_action_at)
        )
        ttl = self.final_ttl if state in FINAL_STATES else 0
        try:
            version = self._protected(
                self._transition,
                [self.key(job.job_id)],
                [
                    self.prefix,
                    job.job_id,
                    str(job.version),
                    state.value,
                    next_at,
                    str(ttl),
                    str(len(to_set) // 2),
                    *to_set,
                    str(len(to_del)),
                    *to_del,
                    *_event_args(job, state, changes),
                    claim,
                ],
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"updating job: {exc}") from exc
        if int(version) <= 0:
            return None
        done = dataclasses.replace(updated, version=int(version))
        if moved:
            self._moved(job, done)
        return done

    def _protected(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """A write a failover must not lose (workers.adapters.redis.replication)."""
        return protected(self.replication, script, keys, args)

    def _moved(self, before: Job, after: Job) -> None:
        """One structured log line per change of state, and the time the job spent in the last."""
        now = after.state_since or time.time()
        spent = max(0.0, now - (before.state_since or before.created_at))
        if self.metrics is not None:
            self.metrics.observe("step_seconds", spent, step=before.state.value, kind=before.kind)
        log.info(
            "job %s %s -> %s after %.3f s",
            after.job_id,
            before.state.value,
            after.state.value,
            spent,
            extra={
                "event": "job.transition",
                "job_id": after.job_id,
                "kind": after.kind,
                "from_state": before.state.value,
                "to_state": after.state.value,
                "version": after.version,
                "account": after.account,
                "producer": after.request.producer,
                "remote_task_id": after.remote_task_id,
                "remote_status": after.remote_status,
                "error_code": after.error_code,
                "seconds_in_state": round(spent, 3),
                "seconds_since_created": round(now - after.created_at, 3),
            },
        )

    def remote_owners(self, task_ids: list[str]) -> dict[str, str | None]:
        """The job owning each DashScope task id (None: no job of ours)."""
        if not task_ids:
            return {}
        try:
            owners = self.redis.hmget(f"{self.prefix}:remote-owner", task_ids)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading task owners: {exc}") from exc
        return {
            t: (_text(o) if o is not None else None) for t, o in zip(task_ids, owners, strict=True)
        }

    def _lock_key(self, lane: str) -> str:
        return f"{self.prefix}:submit-lock:{lane}"

    def lock_submit(self, lane: str, job_id: str) -> str | None:
        """Hold the lane's submit lock for ``job_id``: None when held (now or already), else the
        job that holds it (``job_id`` then waits in line, to be handed back by the unlock)."""
        keys = [self._lock_key(lane), self._lock_key(lane) + ":waiting"]
        try:
            holder = _text(self._lock_submit(keys=keys, args=[self.prefix, job_id]))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"submit lock: {exc}") from exc
        return holder or None

    def unlock_submit(self, lane: str, job_id: str) -> tuple[str, int] | None:
        """Free the lane's submit lock if ``job_id`` holds it: the job that waited longest for
        it (still submitting) and its version, to be woken, or None."""
        keys = [self._lock_key(lane), self._lock_key(lane) + ":waiting"]
        try:
            waiter = _text(self._unlock_submit(keys=keys, args=[job_id, self.prefix]))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"submit lock: {exc}") from exc
        if not waiter:
            return None
        waiter_id, version = waiter.rsplit(" ", 1)
        return waiter_id, int(version)

    def delivered(self, job: Job) -> bool:
        """Mark a final job's deliveries done (it is at ``job.version``); False if it moved."""
        try:
            done = self._delivered(keys=[self.key(job.job_id)],
                                   args=[self.prefix, str(job.version), job.job_id])  # fmt: skip
        except redis.RedisError as exc:
            raise StoreUnavailable(f"updating job: {exc}") from exc
        return bool(done)

    def note_duplicate(self, job_id: str) -> None:
        """Count a repeated intake without touching the version (the fencing token)."""
        try:
            self._note_duplicate(keys=[self.key(job_id)])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"updating job: {exc}") from exc

    def timeline(self, job_id: str) -> list[dict[str, Any]]:
        """The job's recorded moves, oldest first (the last 200)."""
        try:
            raw = self.redis.lrange(f"{self.prefix}:timeline:{job_id}", 0, -1)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading timeline: {exc}") from exc
        return with_moves([json.loads(_text(item)) for item in raw])

    def list_jobs(self, state: str, limit: int = 50) -> list[Job]:
        """Up to ``limit`` jobs in ``state`` (from the state index; expired records skipped)."""
        ids = []
        for member in self.redis.sscan_iter(f"{self.prefix}:state:{state}", count=500):
            ids.append(_text(member))
            if len(ids) >= limit:
                break
        jobs = [self.get(i) for i in ids]
        return [j for j in jobs if j is not None]

    def page_jobs(self, state: str, cursor: int = 0, count: int = 50) -> tuple[int, list[Job]]:
        """One page of the jobs in ``state``, walked with the state index's own cursor (SSCAN):
        each page costs the same however many jobs there are. The next cursor (0: the end) and
        the jobs (a page may hold a few more or fewer than ``count``; expired records skipped)."""
        try:
            next_cursor, members = self.redis.sscan(
                f"{self.prefix}:state:{state}", cursor, count=count
            )
            pipe = self.redis.pipeline(transaction=False)
            for member in members:
                pipe.hgetall(self.key(_text(member)))
            found = pipe.execute()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"listing jobs: {exc}") from exc
        jobs = [decode({_text(k): _text(v) for k, v in raw.items()}) for raw in found if raw]
        return int(next_cursor), jobs

    def request_cancel(self, job_id: str) -> None:
        """Flag the job as cancel-requested without touching its version: the steps in flight
        (a poll chain, a copy holding its lease) stay valid and read the flag."""
        try:
            if self.redis.exists(self.key(job_id)):
                self.redis.hset(self.key(job_id), "cancel_requested", "1")
                self.redis.rpush(
                    f"{self.prefix}:timeline:{job_id}",
                    json.dumps({"at": time.time(), "cancel_requested": True}),
                )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"updating job: {exc}") from exc

    def sweep(self, batch: int = 1000) -> int:
        """Drop index entries that outlived their records: ids in the final-state sets whose job
        hash expired, and remote task ids older than the job retention. One bounded step per
        call (the watchdog calls it each pass), resuming where the last one stopped. The number
        of entries removed."""
        removed = 0
        cursor_key = f"{self.prefix}:sweep-cursor"
        try:
            for state in sorted(FINAL_STATES):
                index = f"{self.prefix}:state:{state.value}"
                cursor = int(self.redis.hget(cursor_key, state.value) or 0)
                cursor, ids = self.redis.sscan(index, cursor, count=batch)
                if ids:
                    pipe = self.redis.pipeline(transaction=False)
                    for job_id in ids:
                        pipe.exists(self.key(_text(job_id)))
                    gone = [i for i, alive in zip(ids, pipe.execute(), strict=True) if not alive]
                    if gone:
                        removed += int(self.redis.srem(index, *gone))
                self.redis.hset(cursor_key, state.value, str(cursor))
            cutoff = time.time() - self.final_ttl - 24 * 3600
            tasks = f"{self.prefix}:remote-tasks"
            old = self.redis.zrangebyscore(tasks, 0, cutoff, start=0, num=batch)
            if old:
                self.redis.hdel(f"{self.prefix}:remote-owner", *old)
                removed += int(self.redis.zrem(tasks, *old))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"sweeping indexes: {exc}") from exc
        return removed

    def count_by_state(self) -> dict[str, int]:
        pipe = self.redis.pipeline()
        for state in JobState:
            pipe.scard(f"{self.prefix}:state:{state.value}")
        return {state.value: int(n) for state, n in zip(JobState, pipe.execute(), strict=True)}

    def due(self, now: float, limit: int = 100) -> list[str]:
        """Job ids whose next wake-up was due by ``now`` (the watchdog's work list)."""
        ids = self.redis.zrangebyscore(f"{self.prefix}:deadlines", "-inf", now, start=0, num=limit)
        return [_text(i) for i in ids]


class RedisClock:
    """Redis's clock, for every deadline the workers set and compare (the watchdog, timers,
    admission and quota buckets already run on Redis's ``TIME``): hosts whose clocks differ
    still agree on when a job is due. Read from Redis once per ``refresh`` seconds and carried
    forward by this host's monotonic clock, so it costs no round trip per use and does not jump
    with the host's wall clock. If Redis cannot be read before the first reading, the host's
    clock stands in."""

    def __init__(self, client: redis.Redis, refresh: float = 60.0) -> None:
        self.redis = client
        self.refresh = refresh
        self._offset: float | None = None
        self._read_at = 0.0

    def __call__(self) -> float:
        now = time.monotonic()
        if self._offset is None or now - self._read_at >= self.refresh:
            try:
                secs, micros = self.redis.time()
                self._offset = float(secs) + float(micros) / 1e6 - time.monotonic()
                self._read_at = now
            except redis.RedisError:
                if self._offset is None:
                    return time.time()
        return time.monotonic() + self._offset
