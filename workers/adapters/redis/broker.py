"""The broker's queues fitted to the QueueWatch port."""

from __future__ import annotations

from workers.adapters.redis.queues import RedisQueues
from workers.domain.routes import QUEUES


class BrokerQueues:
    """The pipeline's ``QueueWatch`` over the broker's queues of the route table."""

    def __init__(self, queues: RedisQueues) -> None:
        self.queues = queues

    def waiting(self) -> dict[str, tuple[int, float]]:
        return {s.name: (s.consumers, s.oldest_seconds) for s in self.queues.sample(QUEUES)}
