"""The job store on Redis: one hash per job, compare-and-set transitions in Lua, and the indexes.

Keys (``P`` is the configured prefix):

* ``P:job:<id>``        the job hash (all values are strings; ``request`` is JSON)
* ``P:state:<STATE>``   a set of job ids per state
* ``P:deadlines``       a sorted set: job id -> when its next wake-up is due (for the watchdog)
* ``P:remote-tasks``    the DashScope task ids some job owns (reconciling an ambiguous submit)

A transition names the version it expects. The Lua script applies it only if the stored version
still matches, bumps the version and moves the indexes in the same step, so two workers can never
both win, and a stale message (an older version, the fencing token) changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import redis

from workers.errors import StoreUnavailable
from workers.jobs import FINAL_STATES, Job, JobRequest, JobState

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SADD', ARGV[1] .. ':state:' .. ARGV[3], ARGV[2])
if ARGV[4] ~= '' then redis.call('ZADD', ARGV[1] .. ':deadlines', ARGV[4], ARGV[2]) end
return 1
"""

# ARGV: prefix, job_id, expected_version, new_state, next_action_at ('' = none), ttl (0 = none),
#       n_set, set pairs..., n_del, del fields...
_TRANSITION = """
local key = KEYS[1]
local current = redis.call('HMGET', key, 'version', 'state')
if not current[1] then return -1 end
if current[1] ~= ARGV[3] then return 0 end
local prefix, job_id, new_state = ARGV[1], ARGV[2], ARGV[4]
local version = tonumber(current[1]) + 1
local fields = {'state', new_state, 'version', tostring(version)}
local n_set = tonumber(ARGV[7])
for i = 0, n_set - 1 do
  table.insert(fields, ARGV[8 + 2 * i])
  table.insert(fields, ARGV[9 + 2 * i])
end
redis.call('HSET', key, unpack(fields))
local at = 8 + 2 * n_set
local n_del = tonumber(ARGV[at])
for i = 1, n_del do redis.call('HDEL', key, ARGV[at + i]) end
if current[2] ~= new_state then
  redis.call('SREM', prefix .. ':state:' .. current[2], job_id)
  redis.call('SADD', prefix .. ':state:' .. new_state, job_id)
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
  redis.call('RPUSH', timeline, event)
  redis.call('LTRIM', timeline, -200, -1)
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
                 "webhook_error")  # fmt: skip


def _event(job: Job, state: JobState, changes: dict[str, Any]) -> str:
    """One line of the job's timeline: the move, and what changed that a person cares about."""
    event: dict[str, Any] = {"at": changes.get("updated_at") or time.time(), "to": state.value}
    if state != job.state:
        event["from"] = job.state.value
    for name in _EVENT_FIELDS:
        if name in changes and changes[name] != getattr(job, name, None):
            event[name] = changes[name]
    if "polls" in changes:
        event["poll"] = changes["polls"]
    if changes.get("s3_key"):
        event["s3_key"] = changes["s3_key"]
    return json.dumps(event, separators=(",", ":"), default=str)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisJobStore:
    """The :class:`workers.pipeline.JobStore` port on a real Redis."""

    def __init__(self, client: redis.Redis, *, prefix: str, final_ttl: int) -> None:
        self.redis = client
        self.prefix = prefix
        self.final_ttl = final_ttl
        self._create = client.register_script(_CREATE)
        self._transition = client.register_script(_TRANSITION)
        self._note_duplicate = client.register_script(_NOTE_DUPLICATE)

    def key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new job, unless one with that id exists: (the stored job, created?)."""
        flat: list[str] = []
        for name, value in encode(job).items():
            flat += [name, value]
        next_at = "" if job.next_action_at is None else repr(job.next_action_at)
        try:
            created = self._create(
                keys=[self.key(job.job_id)],
                args=[self.prefix, job.job_id, job.state.value, next_at, *flat],
            )
            if created:
                timeline = f"{self.prefix}:timeline:{job.job_id}"
                first = {"at": job.created_at, "to": job.state.value, "created": True}
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

    def transition(self, job: Job, state: JobState, **changes: Any) -> Job | None:
        """Move ``job`` (as loaded, at its version) to ``state`` with ``changes``; None if it lost.

        A change to None deletes the field. ``next_action_at`` also updates the deadline index.
        """
        updated = dataclasses.replace(job, state=state, **changes)
        to_set: list[str] = []
        to_del: list[str] = []
        for name, value in changes.items():
            if value is None:
                to_del.append(name)
            else:
                to_set += [name, encode_value(name, value)]
        next_at = (
            ""
            if updated.next_action_at is None or state in FINAL_STATES
            else repr(updated.next_action_at)
        )
        ttl = self.final_ttl if state in FINAL_STATES else 0
        try:
            version = self._transition(
                keys=[self.key(job.job_id)],
                args=[
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
                    _event(job, state, changes),
                ],
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"updating job: {exc}") from exc
        if int(version) <= 0:
            return None
        return dataclasses.replace(updated, version=int(version))

    def claim_remote_task(self, task_id: str) -> bool:
        """Mark a DashScope task id as owned; False if some job owns it already."""
        try:
            return bool(self.redis.sadd(f"{self.prefix}:remote-tasks", task_id))
        except redis.RedisError as exc:
            raise StoreUnavailable(f"claiming remote task: {exc}") from exc

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
        return [json.loads(_text(item)) for item in raw]

    def list_jobs(self, state: str, limit: int = 50) -> list[Job]:
        """Up to ``limit`` jobs in ``state`` (from the state index; expired records skipped)."""
        ids = []
        for member in self.redis.sscan_iter(f"{self.prefix}:state:{state}", count=500):
            ids.append(_text(member))
            if len(ids) >= limit:
                break
        jobs = [self.get(i) for i in ids]
        return [j for j in jobs if j is not None]

    def template_owner(self, template_id: str) -> str | None:
        """The account a template was registered to (templates belong to one account)."""
        try:
            owner = self.redis.hget(f"{self.prefix}:templates", template_id)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading templates: {exc}") from exc
        return _text(owner) if owner is not None else None

    def register_template(self, template_id: str, account: str) -> None:
        try:
            self.redis.hset(f"{self.prefix}:templates", template_id, account)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"writing templates: {exc}") from exc

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

    def count_by_state(self) -> dict[str, int]:
        pipe = self.redis.pipeline()
        for state in JobState:
            pipe.scard(f"{self.prefix}:state:{state.value}")
        return {state.value: int(n) for state, n in zip(JobState, pipe.execute(), strict=True)}

    def due(self, now: float, limit: int = 100) -> list[str]:
        """Job ids whose next wake-up was due by ``now`` (the watchdog's work list)."""
        ids = self.redis.zrangebyscore(f"{self.prefix}:deadlines", "-inf", now, start=0, num=limit)
        return [_text(i) for i in ids]
