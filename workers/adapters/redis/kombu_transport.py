"""kombu's Redis and Sentinel transports, made to survive the loss of the broker connection.

With kombu 5.7, a worker that holds an unacknowledged message (a running task, or a countdown
poll it keeps in memory) when its Redis connection drops dies with "Unrecoverable error:
AttributeError: 'NoneType' object has no attribute 'hostname'". Celery's consumer collects the
broken connection, which detaches it from its transport, and then closes it; closing the channel
restores the unacknowledged messages, which needs a new connection pool, whose parameters are
read from the detached (None) connection. The AttributeError is not a connection error, so
Celery does not reconnect: the process exits. A restarted Redis or a Sentinel failover then
stops every worker that was busy (tests/e2e/test_broker_loss_e2e.py).

Here the channel answers that case with a Redis ``ConnectionError``, one of the transport's
connection errors: the close goes on, Celery reconnects, and the messages stay in Redis's
unacknowledged set (restored after ``visibility_timeout``; the watchdog resends their steps
sooner, and the version fence makes a second copy harmless).

The Sentinel channel also logs the master its pool finds, and every change of it (as our own
clients do), so a worker's and beat's logs say when they moved to a new master.

:func:`install` points kombu's ``redis``, ``rediss`` and ``sentinel`` schemes at these classes
for the process (the Celery app module calls it). Nothing else changes.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu import transport as kombu_transports
from kombu.transport import redis as kombu_redis

from workers.adapters.redis.connection import announce_master_changes


class _Detached:
    """A channel whose connection was detached raises a connection error, not AttributeError."""

    connection: Any

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection was closed")
        return super()._connparams(asynchronous)  # type: ignore[misc]


class Channel(_Detached, kombu_redis.Channel):
    pass


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelChannel(_Detached, kombu_redis.SentinelChannel):
    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        """kombu's pool, saying in the log which master it found, and when that changes
        (workers, beat and Flower then report a failover as our own clients do)."""
        pool = super()._sentinel_managed_pool(asynchronous)  # type: ignore[misc]
        announce_master_changes(pool)
        return pool


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Make ``redis://``, ``rediss://`` and ``sentinel://`` broker URLs use these transports."""
    here = __name__
    kombu_transports.TRANSPORT_ALIASES.update(
        {
            "redis": f"{here}:Transport",
            "rediss": f"{here}:Transport",
            "sentinel": f"{here}:SentinelTransport",
        }
    )
