"""The fleet's shared view of each DashScope account: quota buckets and the admission queue, in Redis.

Every worker process on every host goes through the same Lua scripts, so the limits are global
(Celery's ``rate_limit`` is per worker and cannot do this). Keys, with ``P`` the prefix and ``A``
an account, or a *lane* where queues are concerned: DashScope runs one task at a time per account
and model, so templates queue in their own lane ``A:template`` beside the videos' ``A``:

* ``P:bucket:A:<kind>``         a token bucket (``submit`` and ``template`` are per model)
* ``P:acct:A:prios``            priorities that have queued jobs (sorted, highest first)
* ``P:acct:A:rot:<prio>``       the producers with queued jobs at that priority, in turn order
* ``P:acct:A:q:<prio>:<prod>``  one producer's queued job ids, oldest first
* ``P:acct:A:depth``            how many jobs wait in the queue
* ``P:acct:A:inflight``         admitted jobs that hold or wait for DashScope's slot
* ``P:acct:A:429:<kind>``       429s received
* ``P:accounts``                accounts that have ever queued a job

A queued job costs one list entry and its record: no message, no timer, no poll.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis

from workers.adapters.redis.replication import protected
from workers.domain.job import Job
from workers.errors import StoreUnavailable

if TYPE_CHECKING:
    from workers.adapters.redis.replication import Replication

# Token bucket with 429 feedback. The clock is Redis's own, so hosts need not agree on time.
# A 429 halves the bucket's rate (down to min_factor) and empties it; the rate then recovers
# linearly. ARGV: rate, capacity, recovery per second, min factor, mode ('take' | 'throttle' |
# 'peek'). Returns the seconds to wait (0: granted) as a string, and the tokens left.
SPEND_KEEP_SECONDS = 3 * 86400  # a day's spend is kept three days (the accounts view reads it)

# A job's bill counted once, whatever the retries. KEYS: total, jobs counted. ARGV: job, amount,
# seconds to keep them.
_SPEND = """
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  redis.call('INCRBYFLOAT', KEYS[1], ARGV[2])
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[4], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return redis.call('GET', KEYS[1]) or '0'
"""

_BUCKET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local recovery, minf, mode = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'factor')
local tokens = tonumber(b[1]) or cap
local ts = tonumber(b[2]) or now
local factor = tonumber(b[3]) or 1
local elapsed = math.max(0, now - ts)
factor = math.min(1, factor + elapsed * recovery)
local eff = rate * factor
tokens = math.min(cap, tokens + elapsed * eff)
local wait = 0
if mode == 'take' then
  if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / eff end
elseif mode == 'throttle' then
  factor = math.max(minf, factor / 2)
  tokens = math.min(tokens, 0)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now), 'factor', tostring(factor))
-- An idle bucket expires after a day; its expiry is renewed once an hour, not on every take.
if not b[2] or math.floor(now / 3600) ~= math.floor(ts / 3600) then
  redis.call('EXPIRE', KEYS[1], 86400)
end
return {tostring(wait), tostring(tokens), tostring(factor)}
"""

_ENQUEUE_BODY = """
redis.call('RPUSH', q, id)
if redis.call('LLEN', q) == 1 then redis.call('RPUSH', base .. ':rot:' .. prio, producer) end
redis.call('ZADD', base .. ':prios', -tonumber(prio), prio)
redis.call('INCR', base .. ':depth')
redis.call('SADD', p .. ':accounts', a)
return 1
"""
_LINE = """
local p, a, prio, producer, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local base = p .. ':acct:' .. a
local q = base .. ':q:' .. prio .. ':' .. producer
"""
_ENQUEUE = _LINE + _ENQUEUE_BODY
# Enqueue unless the id is already in its line or holds a slot (the watchdog's recheck).
_ENSURE = (
    _LINE
    + """
if redis.call('LPOS', q, id) then return 0 end
if redis.call('SISMEMBER', base .. ':inflight', id) == 1 then return 0 end
"""
    + _ENQUEUE_BODY
)

_DEQUEUE = """
local p, a, prio, producer, id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local base = p .. ':acct:' .. a
local q = base .. ':q:' .. prio .. ':' .. producer
local removed = redis.call('LREM', q, 1, id)
if removed == 0 then return 0 end
redis.call('DECR', base .. ':depth')
if redis.call('LLEN', q) == 0 then
  local rot = base .. ':rot:' .. prio
  redis.call('LREM', rot, 0, producer)
  if redis.call('LLEN', rot) == 0 then redis.call('ZREM', base .. ':prios', prio) end
end
return 1
"""

# Admit queued jobs while fewer than ARGV[3] hold or wait for the remote slot. When the slots
# look full, members whose job has moved past the slot (copying, final) or vanished are dropped
# first (from a sample of 64, at most once a second), so a lost release cannot leak capacity. Highest priority first; within one priority, producers take turns.
_ADMIT = """
local p, a, cap = ARGV[1], ARGV[2], tonumber(ARGV[3])
local base = p .. ':acct:' .. a
local inflight = base .. ':inflight'
local gone = {STORED=1, FAILED=1, REJECTED=1, CANCELED=1, EXPIRED=1, READY=1, COPYING=1}
local n = redis.call('SCARD', inflight)
if n >= cap and redis.call('SET', base .. ':healed', '1', 'PX', 1000, 'NX') then
  -- Full: heal from a bounded sample, at most once a second per lane, so neither a large slot
  -- count nor a busy lane makes each admission read members (64 HGETs a call cost a third of
  -- the Redis time per job in bench/overhead.py). A lost release is found within a few seconds.
  for _, id in ipairs(redis.call('SRANDMEMBER', inflight, 64)) do
    local st = redis.call('HGET', p .. ':job:' .. id, 'state')
    if (not st) or gone[st] then redis.call('SREM', inflight, id) end
  end
  n = redis.call('SCARD', inflight)
end
local admitted = {}
while n < cap do
  local top = redis.call('ZRANGE', base .. ':prios', 0, 0)
  if #top == 0 then break end
  local prio = top[1]
  local rot = base .. ':rot:' .. prio
  local producer = redis.call('LPOP', rot)
  if not producer then
    redis.call('ZREM', base .. ':prios', prio)
  else
    local q = base .. ':q:' .. prio .. ':' .. producer
    local id = redis.call('LPOP', q)
    if redis.call('LLEN', q) > 0 then redis.call('RPUSH', rot, producer) end
    if redis.call('LLEN', rot) == 0 then redis.call('ZREM', base .. ':prios', prio) end
    if id then
      redis.call('DECR', base .. ':depth')
      local job = p .. ':job:' .. id
      if redis.call('HGET', job, 'state') == 'QUEUED' then
        -- The slot and the job's admission in one step: a crash after it leaves the job
        -- admitted, due now and its message outstanding (the watchdog sends it again), never
        -- holding a slot while it waits in QUEUED unadmitted.
        redis.call('SADD', inflight, id)
        local t = redis.call('TIME')
        local now = string.format('%d.%06d', t[1], t[2])
        redis.call('HINCRBY', job, 'version', 1)
        redis.call('HSET', job, 'admitted_at', now, 'updated_at', now, 'next_action_at', now,
                   'wake', 'sent')
        redis.call('HDEL', job, 'resumes')
        redis.call('ZADD', p .. ':deadlines', now, id)
        table.insert(admitted, id)
        n = n + 1
      end
    end
  end
end
return admitted
"""

RECOVERY_PER_SECOND = 0.05  # a halved rate is whole again after 10 s without a 429
MIN_FACTOR = 0.1
KINDS = ("submit", "template", "query", "detect")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisGovernor:
    """The pipeline's ``Governor`` port on Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str,
        model: str,
        rates: dict[str, float],
        capacity: int,
        replication: Replication | None = None,
    ) -> None:
        """``replication``: admission (which moves job records) is a protected write."""
        self.redis = client
        self.replication = replication
        self.prefix = prefix
        self.model = model
        self.rates = rates
        self.capacity = capacity
        self._bucket = client.register_script(_BUCKET)
        self._enqueue = client.register_script(_ENQUEUE)
        self._dequeue = client.register_script(_DEQUEUE)
        self._ensure = client.register_script(_ENSURE)
        self._admit = client.register_script(_ADMIT)
        self._spend = client.register_script(_SPEND)

    def _bucket_key(self, account: str, kind: str) -> str:
        suffix = f"submit:{self.model}" if kind == "submit" else kind
        return f"{self.prefix}:bucket:{account}:{suffix}"

    def _run_bucket(self, account: str, kind: str, mode: str) -> tuple[float, float, float]:
        rate = self.rate(kind)
        try:
            wait, tokens, factor = self._bucket(
                keys=[self._bucket_key(account, kind)],
                args=[rate, max(1.0, rate), RECOVERY_PER_SECOND, MIN_FACTOR, mode],
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"quota bucket: {exc}") from exc
        return float(wait), float(tokens), float(factor)

    def rate(self, kind: str) -> float:
        # Templates are their own model, with the same documented submit limit as videos.
        return self.rates.get(kind) or self.rates.get("submit", 1.0)

    def take(self, account: str, kind: str) -> float:
        """Take one token: 0 when granted, else the seconds until one is due."""
        return self._run_bucket(account, kind, "take")[0]

    def throttled(self, account: str, kind: str) -> None:
        """DashScope answered 429 anyway: slow this bucket down and count it."""
        self._run_bucket(account, kind, "throttle")
        try:
            # (counted by kind: a model's own submit bucket counts as "submit")
            self.redis.incr(f"{self.prefix}:acct:{account}:429:{kind.split(':', 1)[0]}")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"quota bucket: {exc}") from exc

    def enqueue(self, job: Job) -> None:
        self._call(self._enqueue, job.lane, str(job.request.priority), job.request.producer,
                   job.job_id)  # fmt: skip

    def ensure_queued(self, job: Job) -> bool:
        """Put the job in its line unless it is there (or holds a slot); True if it was not."""
        prio, producer = str(job.request.priority), job.request.producer
        return bool(self._call(self._ensure, job.lane, prio, producer, job.job_id))

    def dequeue(self, job: Job) -> bool:
        """Take a queued job out of the queue (cancel); False if it was not there."""
        return bool(
            self._call(
                self._dequeue,
                job.lane,
                str(job.request.priority),
                job.request.producer,
                job.job_id,
            )
        )

    def admit(self, lane: str) -> list[str]:
        """Job ids moved from the queue into the remote slot's reach, in order, each already
        marked admitted on its record (admitted_at, due now, its submit message outstanding):
        the caller sends the messages."""
        try:
            ids = protected(
                self.replication, self._admit, [], [self.prefix, lane, str(self.capacity)]
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"admission: {exc}") from exc
        return [_text(i) for i in ids]

    def release(self, lane: str, job_id: str) -> None:
        """The job no longer holds or waits for the remote slot."""
        try:
            self.redis.srem(f"{self.prefix}:acct:{lane}:inflight", job_id)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"admission: {exc}") from exc

    def inflight(self, lane: str) -> list[str]:
        try:
            members = self.redis.smembers(f"{self.prefix}:acct:{lane}:inflight")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"admission: {exc}") from exc
        return sorted(_text(m) for m in members)

    # ------------------------------------------------------------------ spend

    def add_spend(
        self, account: str, day: str, amount: float, job_id: str, model: str = ""
    ) -> float:
        """``P:acct:<account>:spend:<day>``: the day's bills; ``...:spend:<day>:jobs`` the jobs
        counted (each once); ``P:spend:<day>:models`` the day's bills by "account|model". Kept
        three days."""
        key = f"{self.prefix}:acct:{account}:spend:{day}"
        by_model = f"{self.prefix}:spend:{day}:models"
        try:
            total = self._spend(
                keys=[key, f"{key}:jobs", by_model],
                args=[job_id, repr(float(amount)), SPEND_KEEP_SECONDS, f"{account}|{model}"],
            )
        except redis.RedisError as exc:
            raise StoreUnavailable(f"spend: {exc}") from exc
        return float(total)

    def spent(self, account: str, day: str) -> float:
        try:
            raw = self.redis.get(f"{self.prefix}:acct:{account}:spend:{day}")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"spend: {exc}") from exc
        return float(raw) if raw is not None else 0.0

    def spent_by_model(self, day: str) -> dict[tuple[str, str], float]:
        """The day's bills by (account, model)."""
        try:
            raw = self.redis.hgetall(f"{self.prefix}:spend:{day}:models")
        except redis.RedisError as exc:
            raise StoreUnavailable(f"spend: {exc}") from exc
        out: dict[tuple[str, str], float] = {}
        for field, value in raw.items():
            account, _, model = _text(field).partition("|")
            out[account, model] = float(value)
        return out

    def _call(self, script: Any, *args: str) -> Any:
        try:
            return script(args=[self.prefix, *args])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"admission: {exc}") from exc

    # ------------------------------------------------------------------ observing

    def accounts(self) -> list[str]:
        lanes = {_text(a) for a in self.redis.smembers(f"{self.prefix}:accounts")}
        return sorted({lane.split(":", 1)[0] for lane in lanes})

    def account_view(self, account: str) -> dict[str, Any]:
        """Queue depth, remote running/pending, tokens and 429s of one account."""
        base = f"{self.prefix}:acct:{account}"
        depth = int(self.redis.get(f"{base}:depth") or 0)
        members = [_text(m) for m in self.redis.smembers(f"{base}:inflight")]
        running = pending = submitting = 0
        for job_id in members:
            state, remote = self.redis.hmget(
                f"{self.prefix}:job:{job_id}", "state", "remote_status"
            )
            remote_status = _text(remote) if remote else None
            if remote_status in ("PRE-PROCESSING", "RUNNING", "POST-PROCESSING"):
                running += 1
            elif state and _text(state) == "SUBMITTED":
                pending += 1
            else:
                submitting += 1
        buckets = {}
        for kind in KINDS:
            _, tokens, factor = self._run_bucket(account, kind, "peek")
            buckets[kind] = {
                "tokens": round(tokens, 3),
                "rate": round(self.rate(kind) * factor, 3),
                "rate_configured": self.rate(kind),
                "throttled_429": int(self.redis.get(f"{base}:429:{kind}") or 0),
            }
        return {
            "account": account,
            "queued": depth,
            "inflight": len(members),
            "capacity": self.capacity,
            "remote_running": running,
            "remote_pending": pending,
            "submitting": submitting,
            "buckets": buckets,
            "templates": {
                "queued": int(self.redis.get(f"{base}:template:depth") or 0),
                "inflight": int(self.redis.scard(f"{base}:template:inflight")),
            },
            "throttled_429": sum(b["throttled_429"] for b in buckets.values()),
        }

    def queue_position(self, job: Job) -> int | None:
        """0-based place in its producer's line (not the account's overall order)."""
        q = (f"{self.prefix}:acct:{job.lane}:q:{job.request.priority}:"
             f"{job.request.producer}")  # fmt: skip
        position = self.redis.lpos(q, job.job_id)
        return None if position is None else int(position)  # type: ignore[arg-type]
