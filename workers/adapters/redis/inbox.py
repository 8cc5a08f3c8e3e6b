"""The intake inbox: new jobs a producer sent that no worker has taken yet, so none is lost.

Until a worker's intake creates its record, a job exists only as its intake message, and a
message can vanish on its way: a Redis failover can take back the last writes, and a worker whose
network drops just after its BRPOP popped the message never receives it (kombu's Redis transport
records a message as unacknowledged only once it has arrived). With replicas to wait for
(``REDIS_WAIT_REPLICAS``), ``AnimateQueue`` therefore notes each message it sends here, in a
protected write (confirmed by the replicas, which then hold the message sent before it too);
intake crosses the job off; and the watchdog sends again, with the same message id, any message
whose job has no record long after it was sent (intake is idempotent on the job id and on the
message id, so a copy that was only late changes nothing).

* ``P:inbox``      a hash: job id -> JSON ``[task, queue, message_id, kwargs]``
* ``P:inbox:due``  a sorted set: job id -> when it was sent (Redis's clock)
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from workers.adapters.redis.replication import protected
from workers.errors import StoreUnavailable

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from workers.adapters.redis.replication import Replication

# ARGV: job id, entry JSON. Redis's own clock: hosts whose clocks differ agree on the age.
_SENT = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], t[1] + t[2] / 1000000, ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Sent:
    """An intake message as its producer sent it."""

    job_id: str
    task: str
    queue: str
    message_id: str
    kwargs: dict[str, Any]
    sent_at: float


class RedisInbox:
    """``P:inbox`` on one Redis."""

    def __init__(
        self, client: redis.Redis, *, prefix: str, replication: Replication | None = None
    ) -> None:
        self.redis = client
        self.key, self.due_key = f"{prefix}:inbox", f"{prefix}:inbox:due"
        self.replication = replication
        self._sent = client.register_script(_SENT)

    def sent(
        self, job_id: str, task: str, queue: str, message_id: str, kwargs: dict[str, Any]
    ) -> None:
        """Note a message just sent (a protected write when ``replication`` is given)."""
        entry = json.dumps([task, queue, message_id, kwargs], separators=(",", ":"))
        try:
            protected(self.replication, self._sent, [self.key, self.due_key], [job_id, entry])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"noting the intake of {job_id}: {exc}") from exc

    def taken(self, *job_ids: str) -> None:
        """Intake has the job: cross it off (best effort; the watchdog cleans what is left)."""
        ids = [j for j in dict.fromkeys(job_ids) if j]
        if not ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        pipe.hdel(self.key, *ids)
        pipe.zrem(self.due_key, *ids)
        with contextlib.suppress(redis.RedisError):
            pipe.execute()

    def older_than(self, at: float, limit: int = 100) -> list[Sent]:
        """Messages sent before ``at`` (Redis time) and not crossed off, oldest first."""
        try:
            due: list[Any] = self.redis.zrangebyscore(
                self.due_key, "-inf", at, start=0, num=limit, withscores=True
            )
            if not due:
                return []
            raw: list[Any] = self.redis.hmget(self.key, [_text(j) for j, _ in due])
        except redis.RedisError as exc:
            raise StoreUnavailable(f"reading the intake inbox: {exc}") from exc
        found = []
        for (job_id, score), entry in zip(due, raw, strict=True):
            if entry is None:  # crossed off between the two reads
                continue
            try:
                task, queue, message_id, kwargs = json.loads(_text(entry))
            except ValueError:
                log.error("intake inbox: unreadable entry for %s; dropped", _text(job_id))
                self.taken(_text(job_id))
                continue
            found.append(Sent(_text(job_id), task, queue, message_id, kwargs, float(score)))
        return found

    def again(self, job_id: str, at: float) -> None:
        """Sent again at ``at``: looked at again one wait later."""
        try:
            self.redis.zadd(self.due_key, {job_id: at}, xx=True)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"intake inbox: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
