"""Queue visibility on a real Redis: consumers by heartbeat, the age of a queue's oldest message
(published by a real Celery producer), and the exporter's gauges."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from prometheus_client import generate_latest

from devstack import RedisServer
from workers.adapters.redis.metrics import make_app_registry
from workers.adapters.redis.queues import RedisQueues, problems
from workers.domain.routes import QUEUES


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: the queues are named as in production."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def client(own_redis: RedisServer) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(own_redis.url)
    c.flushdb()
    yield c
    c.close()


def publish(url: str, queue: str) -> None:
    producer = Celery("producer", broker=url)
    producer.conf.update(task_serializer="json", accept_content=["json"])
    producer.send_task("animate.copy", args=("j", 1), queue=queue)
    producer.close()


def test_consumers_are_counted_while_they_beat(client: redis.Redis) -> None:
    queues = RedisQueues(client, prefix="p")
    queues.heartbeat("w1@h", ["celery", "dashscope"])
    queues.heartbeat("w2@h", ["celery"])
    counts = {s.name: s.consumers for s in queues.sample(QUEUES)}
    assert counts == {"celery": 2, "dashscope": 1, "transfer": 0}
    time.sleep(0.6)
    assert {s.consumers for s in queues.sample(QUEUES, window=0.5)} == {0}


def test_the_oldest_message_ages_until_it_is_taken(
    own_redis: RedisServer, client: redis.Redis
) -> None:
    """A message nobody takes keeps getting older; once consumed, the age is back to zero."""
    queue = f"q-{uuid.uuid4().hex[:6]}"
    queues = RedisQueues(client, prefix="p")
    queues.heartbeat("w1@h", [queue])
    publish(own_redis.url, queue)
    [first] = queues.sample([queue])
    assert (first.length, first.oldest_seconds) == (1, 0.0)
    time.sleep(1.2)
    [later] = queues.sample([queue])
    assert later.length == 1 and later.oldest_seconds >= 1.0
    assert problems([later], max_age=1.0) and queue in problems([later], max_age=1.0)[0]
    assert problems([later], max_age=60.0) == []
    publish(own_redis.url, queue)  # a newer one behind it does not reset the head's age
    [behind] = queues.sample([queue])
    assert behind.length == 2 and behind.oldest_seconds >= 1.0
    client.rpop(queue)  # the oldest is consumed (kombu BRPOPs from the right)
    [next_one] = queues.sample([queue])
    assert (next_one.length, next_one.oldest_seconds) == (1, 0.0)
    client.rpop(queue)
    [empty] = queues.sample([queue])
    assert (empty.length, empty.oldest_seconds) == (0, 0.0)
    assert client.hget("p:qwatch", queue) is None


def test_a_queue_nobody_consumes_is_a_problem_even_when_empty(client: redis.Redis) -> None:
    queues = RedisQueues(client, prefix="p")
    queues.heartbeat("w1@h", ["celery", "dashscope"])
    found = problems(queues.sample(QUEUES), max_age=60)
    assert len(found) == 1 and "'transfer' has no consumer" in found[0]


def test_the_exporter_serves_the_queue_gauges(own_redis: RedisServer, client: redis.Redis) -> None:
    RedisQueues(client, prefix="p").heartbeat("w1@h", ["celery"])
    publish(own_redis.url, "transfer")
    text = generate_latest(make_app_registry(client, "p")).decode()
    assert 'animate_queue_broker_queue_consumers{queue="celery"} 1.0' in text
    assert 'animate_queue_broker_queue_consumers{queue="transfer"} 0.0' in text
    assert 'animate_queue_broker_queue_length{queue="transfer"} 1.0' in text
    assert 'animate_queue_broker_queue_oldest_seconds{queue="transfer"}' in text
