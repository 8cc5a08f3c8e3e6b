"""Protected writes: a write a failover must not lose is acknowledged only once replicas have it.

Redis replicates asynchronously. When Sentinel promotes a replica, whatever the old master took
and had not yet sent is gone. For most of our keys that costs a retry (a metric, a bucket's
token, a poll message the watchdog replaces). For the job record it could cost money: a lost
"the POST is in flight" mark lets a resumed job submit again. So every write that moves a job
record, creates a job or parks a timer runs as ``<script>; WAIT n timeout`` on one connection
(WAIT counts that connection's writes), and fewer than ``n`` confirmations in time raises
:class:`~workers.errors.ReplicationTimeout`: the step stops before anything follows from the
write, and the watchdog resumes the job from whichever record survives.

``n`` is the settings' count, but never more than the replicas the master has connected (read
with ``ROLE``, at most once a second). A master with none has no replica a failover could
promote in its place, so its writes go on, counted (the window this leaves, and
``min-replicas-to-write`` for those who prefer writes refused, is in docs/ha.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.commands.core import Script

from workers.errors import ReplicationTimeout

if TYPE_CHECKING:
    from workers.ports import Metrics

log = logging.getLogger(__name__)


class Replication:
    """Runs protected writes on ``client`` (see the module docstring). ``required`` 0: plain
    calls, exactly as without replication."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        required: int,
        timeout_ms: int,
        metrics: Metrics | None = None,
        role_ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.required = required
        self.timeout_ms = timeout_ms
        self.metrics = metrics
        self.role_ttl = role_ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._connected = 0
        self._read_at = float("-inf")
        self._warned_at = float("-inf")

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """``script(keys, args)``, acknowledged by the replicas asked for (or ReplicationTimeout;
        a Redis error propagates as redis-py raises it)."""
        if self.required == 0:
            return script(keys=keys, args=args)
        want = min(self.required, self.connected())
        if want == 0:
            self._unreplicated("no_replica")
            return script(keys=keys, args=args)
        result, acked = self._write_and_wait(script, keys, args, want)
        if acked < want:
            self._unreplicated("timeout")
            self._read_at = float("-inf")  # the replica may be gone: look again next time
            raise ReplicationTimeout(
                f"{acked} of {want} Redis replicas confirmed the write within "
                f"{self.timeout_ms} ms (REDIS_WAIT_TIMEOUT_MS)"
            )
        return result

    def _write_and_wait(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], want: int
    ) -> tuple[Any, int]:
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            pipe.wait(want, self.timeout_ms)
            result, acked = pipe.execute(raise_on_error=False)
            if isinstance(result, redis.exceptions.NoScriptError) and attempt == 1:
                # a new master (after a failover) may not hold the script yet; WAIT was harmless
                self.client.script_load(script.script)
                continue
            for answer in (result, acked):
                if isinstance(answer, Exception):
                    raise answer
            return result, int(acked)
        raise AssertionError("unreachable")  # pragma: no cover

    def connected(self) -> int:
        """Replicas the master has connected now (ROLE, read at most once per ``role_ttl``)."""
        now = self.clock()
        with self._lock:
            if now - self._read_at < self.role_ttl:
                return self._connected
        try:
            role = self.client.role()
            count = len(role[2]) if _text(role[0]) == "master" else 0
        except redis.ResponseError:
            # ROLE refused (a managed Redis that renames it): assume the replicas asked for are
            # there, and let WAIT's own timeout say when they are not.
            count = self.required
        with self._lock:
            self._connected, self._read_at = count, now
        return count

    def _unreplicated(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("redis_writes_unreplicated_total", reason=reason)
        now = self.clock()
        if now - self._warned_at >= 60.0:  # once a minute per process, not once per write
            self._warned_at = now
            why = (
                "the master has no replica connected: protected writes go on unreplicated"
                if reason == "no_replica"
                else "a replica did not confirm a protected write in time"
            )
            log.warning(
                "redis: %s (REDIS_WAIT_REPLICAS=%d)",
                why,
                self.required,
                extra={"event": "redis.unreplicated", "reason": reason},
            )


def protected(
    replication: Replication | None, script: Script, keys: Sequence[str], args: Sequence[Any]
) -> Any:
    """``script`` as a protected write through ``replication``, or plainly where there is none
    (one server, or REDIS_WAIT_REPLICAS=0)."""
    if replication is None:
        return script(keys=keys, args=args)
    return replication.run(script, keys, args)


def replication_status(client: redis.Redis) -> dict[str, Any]:
    """What the master says of its replication: ``role``, ``replicas`` ("host:port" each),
    ``min_replicas_to_write`` (None where CONFIG is not allowed)."""
    role = client.role()
    status: dict[str, Any] = {"role": _text(role[0]), "replicas": []}
    if status["role"] == "master":
        status["replicas"] = [f"{_text(r[0])}:{_text(r[1])}" for r in role[2]]
    try:
        config = client.config_get("min-replicas-to-write")
        status["min_replicas_to_write"] = int(_text(next(iter(config.values()), 0) or 0))
    except redis.ResponseError:  # CONFIG renamed or refused (managed Redis): not ours to know
        status["min_replicas_to_write"] = None
    return status


def check_at_start(client: redis.Redis, required: int, where: str) -> dict[str, Any]:
    """Log, once at start-up, how protected writes will be kept (a warning when they will not
    be replicated as asked). Returns the status; never refuses to start (no replica is a state
    a failover passes through)."""
    status = replication_status(client)
    replicas, floor = len(status["replicas"]), status["min_replicas_to_write"]
    if status["role"] != "master":
        log.warning("redis: %s answered as a %s, not a master", where, status["role"])
    elif required and replicas < required:
        log.warning(
            "redis: %s has %d replica(s) connected; protected writes ask for %d "
            "(REDIS_WAIT_REPLICAS) and go on unreplicated until one connects",
            where,
            replicas,
            required,
        )
    else:
        log.info(
            "redis: %s has %d replica(s) connected; protected writes wait for %d; "
            "min-replicas-to-write %s",
            where,
            replicas,
            min(required, replicas),
            "unknown" if floor is None else floor,
        )
    return status


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
