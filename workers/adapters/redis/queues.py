"""The broker's queues as operators need to see them: length, live consumers, age of the oldest
message, per queue of the route table (workers/routes.py).

A routed queue that nobody consumes (a worker started with the wrong ``-Q``, a transfer pool that
is down) silently stops every job at that step; a queue whose oldest message keeps getting older
is a pool that cannot keep up. Neither shows in the job store until deadlines pass, so both are
measured here, from Redis, and read by the exporter (metrics), ``animate-queue health queues``
and the alert rules in ``deploy/prometheus/alerts.yml``.

Keys (``P`` is the prefix):

* ``P:consumers:<queue>``  a sorted set: worker node -> when it last said it consumes the queue
                           (every worker's main process, every few seconds; Redis's clock)
* ``P:qwatch``             a hash: queue -> ``"<delivery tag>|<first seen>"`` of the message at
                           the queue's head (the oldest): when the head stays the same message,
                           its age keeps growing

Kombu's Redis transport keeps a queue as a list named after it: ``LPUSH`` to publish and
``BRPOP`` to consume, so the oldest message is at index -1. A message's JSON carries its
``properties.delivery_tag`` but no sending time, hence the first-seen bookkeeping: the age is a
lower bound of the true age, exact to within one sampling interval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 5.0  # how often a worker says which queues it consumes
CONSUMER_WINDOW_SECONDS = 30.0  # a consumer silent this long no longer counts

# ARGV: window, node, queue keys... (KEYS are the consumer sets). Redis's clock.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - 10 * tonumber(ARGV[1]))
  redis.call('EXPIRE', KEYS[i], 86400)
end
return 1
"""


@dataclass(frozen=True)
class QueueState:
    """One queue as sampled now."""

    name: str
    length: int
    consumers: int
    oldest_seconds: float  # how long the current head message has been waiting (0: empty)


class RedisQueues:
    """Consumer heartbeats and queue samples on the broker's Redis (the store's prefix)."""

    def __init__(self, client: redis.Redis, *, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self._heartbeat = client.register_script(_HEARTBEAT)

    def _consumers_key(self, queue: str) -> str:
        return f"{self.prefix}:consumers:{queue}"

    def heartbeat(self, node: str, queues: Iterable[str]) -> None:
        """``node`` consumes ``queues`` (now)."""
        keys = [self._consumers_key(q) for q in queues]
        if keys:
            self._heartbeat(keys=keys, args=[repr(CONSUMER_WINDOW_SECONDS), node])

    def sample(
        self, queues: Iterable[str], window: float = CONSUMER_WINDOW_SECONDS
    ) -> list[QueueState]:
        """Length, live consumers and head age of each queue; records heads seen for the first
        time (so the age grows between samples while the head stays)."""
        names = list(queues)
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(f"{self.prefix}:qwatch")
        for name in names:
            pipe.llen(name)
            pipe.lindex(name, -1)
        (secs, micros), watched, *rest = pipe.execute()
        now = float(secs) + float(micros) / 1e6
        seen = {_text(k): _text(v) for k, v in watched.items()}
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zcount(self._consumers_key(name), now - window, "+inf")
        consumers = pipe.execute()
        states: list[QueueState] = []
        updates: dict[str, str] = {}
        gone: list[str] = []
        for i, name in enumerate(names):
            length, head = int(rest[2 * i]), rest[2 * i + 1]
            tag = _delivery_tag(head) if head is not None else None
            age = 0.0
            if tag is None:
                if name in seen:
                    gone.append(name)
            else:
                old_tag, _, first = seen.get(name, "").partition("|")
                if old_tag == tag and first:
                    age = max(0.0, now - float(first))
                else:
                    updates[name] = f"{tag}|{now!r}"
            states.append(QueueState(name, length, int(consumers[i]), round(age, 3)))
        if updates or gone:
            pipe = self.redis.pipeline(transaction=False)
            if updates:
                pipe.hset(f"{self.prefix}:qwatch", mapping=dict(updates.items()))
            if gone:
                pipe.hdel(f"{self.prefix}:qwatch", *gone)
            pipe.execute()
        return states


def _delivery_tag(raw: Any) -> str:
    """The head message's identity: kombu's delivery tag, else a digest of the raw message."""
    try:
        message = json.loads(raw)
        tag = message["properties"]["delivery_tag"]
        if isinstance(tag, str) and tag:
            return tag
    except (ValueError, KeyError, TypeError):
        pass
    data = raw if isinstance(raw, bytes) else str(raw).encode()
    return hashlib.sha256(data).hexdigest()[:32]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def problems(states: Iterable[QueueState], max_age: float) -> list[str]:
    """What is wrong with the queues, one sentence each (empty: healthy)."""
    found = []
    for state in states:
        if state.consumers == 0:
            found.append(
                f"queue {state.name!r} has no consumer ({state.length} waiting): start a worker "
                f"with -Q {state.name} (or no -Q at all)"
            )
        elif state.oldest_seconds > max_age:
            found.append(
                f"queue {state.name!r}: its oldest message has waited {state.oldest_seconds:.0f} s "
                f"({state.length} waiting, {state.consumers} consumer(s)): the pool cannot keep up"
            )
    return found


class Heartbeats:
    """A thread in a worker's main process: every ``interval`` it says which queues this node
    consumes, and samples the routed queues so that head ages keep growing while nobody looks.
    """

    def __init__(
        self,
        queues: RedisQueues,
        node: str,
        consumed: Callable[[], Iterable[str]],
        routed: Iterable[str],
        *,
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.queues = queues
        self.node = node
        self.consumed = consumed
        self.routed = tuple(routed)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.queues.heartbeat(self.node, self.consumed())
        self.queues.sample(self.routed)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="animate-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # Redis is down: keep trying, say so
                log.warning("queue heartbeat failed (will retry): %s", exc)
            self._stop.wait(self.interval)
