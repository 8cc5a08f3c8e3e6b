"""Protected writes and the Sentinel settings, without servers: what is waited for, and when.

The behaviour against real processes (a frozen replica, a master alone, a failover) is in
tests/integration/test_sentinel_redis.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import redis

from config.settings import SettingsError, load_settings
from workers import bootstrap
from workers.adapters.redis.connection import RedisAddress, celery_options, tls_kwargs
from workers.adapters.redis.replication import Replication
from workers.errors import ReplicationTimeout, StoreUnavailable


class Script:
    sha = "f" * 40
    script = "return 1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, keys: Any, args: Any) -> int:
        self.calls += 1
        return 7


class Pipeline:
    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.commands: list[tuple[Any, ...]] = []

    def evalsha(self, *args: Any) -> None:
        self.commands.append(("EVALSHA", *args))

    def incr(self, key: str) -> None:
        self.commands.append(("INCR", key))

    def wait(self, n: int, timeout: int) -> None:
        self.commands.append(("WAIT", n, timeout))

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.client.pipelines.append(self.commands)
        return [7, self.client.acks]


class FakeRedis:
    def __init__(self, replicas: int | None, acks: int = 1) -> None:
        self.replicas, self.acks = replicas, acks
        self.pipelines: list[list[tuple[Any, ...]]] = []
        self.role_calls = 0

    def role(self) -> list[Any]:
        self.role_calls += 1
        if self.replicas is None:
            raise redis.ResponseError("unknown command 'ROLE'")
        return [b"master", 100, [[b"10.0.0.2", b"6379", b"100"]] * self.replicas]

    def pipeline(self, transaction: bool = True) -> Pipeline:
        assert transaction is False  # one connection, in order: the write, then its WAIT
        return Pipeline(self)


def test_nothing_is_waited_for_when_none_is_asked() -> None:
    client, script = FakeRedis(replicas=1), Script()
    assert Replication(client, required=0, timeout_ms=100).run(script, ["k"], []) == 7  # type: ignore[arg-type]
    assert script.calls == 1 and client.pipelines == [] and client.role_calls == 0


def test_the_write_and_its_wait_go_together() -> None:
    client = FakeRedis(replicas=2, acks=1)
    replication = Replication(client, required=1, timeout_ms=250)  # type: ignore[arg-type]
    assert replication.run(Script(), ["k"], ["a"]) == 7  # type: ignore[arg-type]
    ((write, wait),) = client.pipelines
    assert write == ("EVALSHA", "f" * 40, 1, "k", "a")
    assert wait == ("WAIT", 1, 250)  # what was asked, not every replica there is


def test_never_waits_for_more_replicas_than_are_connected() -> None:
    client = FakeRedis(replicas=1, acks=1)
    Replication(client, required=3, timeout_ms=250).run(Script(), ["k"], [])  # type: ignore[arg-type]
    assert client.pipelines[0][1] == ("WAIT", 1, 250)


def test_too_few_confirmations_raise_a_transient_store_error() -> None:
    client = FakeRedis(replicas=1, acks=0)
    replication = Replication(client, required=1, timeout_ms=250)  # type: ignore[arg-type]
    with pytest.raises(ReplicationTimeout) as raised:
        replication.run(Script(), ["k"], [])
    assert isinstance(raised.value, StoreUnavailable)  # retried, never a job failure


def test_a_refused_role_command_still_waits() -> None:
    """A managed Redis that renames ROLE: WAIT's own timeout decides."""
    client = FakeRedis(replicas=None, acks=1)
    Replication(client, required=1, timeout_ms=250).run(Script(), ["k"], [])  # type: ignore[arg-type]
    assert client.pipelines[0][1] == ("WAIT", 1, 250)


def test_settings_for_sentinel() -> None:
    plain = load_settings({})
    assert plain.sentinel_addresses() == [] and plain.wait_replicas == 0
    assert bootstrap.celery_urls(plain) == (plain.redis_url, plain.redis_url)
    ha = load_settings(
        {
            "REDIS_URL": "rediss://:pw@ignored/4?ssl_ca_certs=/ca.pem",
            "REDIS_SENTINELS": "s1:26380, s2 ,[fd00::3]:26381",
            "REDIS_MASTER_NAME": "prod",
            "REDIS_SENTINEL_PASSWORD": "spw",
        }
    )
    assert ha.sentinel_addresses() == [("s1", 26380), ("s2", 26379), ("fd00::3", 26381)]
    assert ha.wait_replicas == 1
    broker, backend = bootstrap.celery_urls(ha)
    assert (
        broker
        == backend
        == ("sentinel://:pw@s1:26380/4;sentinel://:pw@s2:26379/4;sentinel://:pw@[fd00::3]:26381/4")
    )
    address = bootstrap.redis_address(ha)
    assert "pw" not in address.describe() and "spw" not in repr(address)
    options = celery_options(address, broker, backend)
    assert options["broker_transport_options"]["master_name"] == "prod"
    assert options["broker_transport_options"]["sentinel_kwargs"]["password"] == "spw"
    assert options["broker_use_ssl"]["ssl_ca_certs"] == "/ca.pem"
    assert options["redis_backend_use_ssl"]["ssl_ca_certs"] == "/ca.pem"
    assert address.server_kwargs() == {"db": 4, "password": "pw", **tls_kwargs(ha.redis_url)}
    explicit = load_settings({"REDIS_SENTINELS": "s1", "CELERY_BROKER_URL": "redis://other/1"})
    assert bootstrap.celery_urls(explicit)[0] == "redis://other/1"
    assert load_settings({"REDIS_SENTINELS": "s1", "REDIS_WAIT_REPLICAS": "0"}).wait_replicas == 0


@pytest.mark.parametrize("bad", ["s1:port", "s1:0", ":26379", "s1:70000"])
def test_a_bad_sentinel_list_names_the_entry(bad: str) -> None:
    with pytest.raises(SettingsError, match="REDIS_SENTINELS"):
        load_settings({"REDIS_SENTINELS": f"ok:26379,{bad}"})


def test_plain_addresses_describe_themselves_without_credentials() -> None:
    assert RedisAddress("redis://:secret@h:6380/2").describe() == "redis://h:6380/2"


# ------------------------------------------------------------ intake messages lost on their way


@dataclass
class Noted:
    job_id: str
    queue: str
    sent_at: float
    task: str = "animate.generate"


def EMPTY(queue: str) -> int:
    return 0


class FakeInbox:
    def __init__(self, *entries: Noted) -> None:
        self.entries = {e.job_id: e for e in entries}
        self.crossed: list[str] = []
        self.rescored: dict[str, float] = {}

    def older_than(self, at: float, limit: int = 100) -> list[Noted]:
        return [e for e in self.entries.values() if e.sent_at <= at][:limit]

    def taken(self, *job_ids: str) -> None:
        for j in job_ids:
            self.crossed.append(j)
            self.entries.pop(j, None)

    def again(self, job_id: str, at: float) -> None:
        self.rescored[job_id] = at
        self.entries[job_id].sent_at = at


def test_a_job_without_a_record_long_after_its_message_is_sent_again() -> None:
    from tests.fakes import FakeQueueWatch, make_services
    from workers.steps.watchdog import resend_lost_intakes

    svc = make_services(queues=FakeQueueWatch({"celery": (1, 0.0)}))
    now = svc.clock()
    inbox = FakeInbox(Noted("lost", "celery", now - 60), Noted("young", "celery", now - 5))
    sent: list[str] = []
    resent = resend_lost_intakes(svc, inbox, lambda s: sent.append(s.job_id), EMPTY, grace=30)
    assert resent == sent == ["lost"]
    assert inbox.rescored == {"lost": now}  # looked at again one grace later, not every pass
    assert resend_lost_intakes(svc, inbox, lambda s: sent.append(s.job_id), EMPTY, grace=30) == []


def test_a_job_with_a_record_only_leaves_the_inbox() -> None:
    from tests.fakes import make_services
    from tests.integration.test_store_contract import new_job
    from workers.steps.watchdog import resend_lost_intakes

    svc = make_services()
    svc.store.create(new_job("arrived"))
    inbox = FakeInbox(Noted("arrived", "celery", svc.clock() - 600))
    assert (
        resend_lost_intakes(svc, inbox, lambda s: pytest.fail("sent again"), EMPTY, grace=30) == []
    )
    assert inbox.crossed == ["arrived"]


@pytest.mark.parametrize(
    ("consumers", "length"), [(0, 0), (2, 1), (2, 5000)], ids=["no consumer", "one", "a backlog"]
)
def test_a_message_that_may_still_be_queued_is_not_sent_again(consumers: int, length: int) -> None:
    """Messages waiting in the queue (however young its head: a long queue that drains keeps
    a young head) may include this one: no resend until the queue is empty."""
    from tests.fakes import FakeQueueWatch, make_services
    from workers.steps.watchdog import resend_lost_intakes

    svc = make_services(queues=FakeQueueWatch({"celery": (consumers, 0.5)}))
    inbox = FakeInbox(Noted("queued", "celery", svc.clock() - 90))
    fail = lambda s: pytest.fail("sent again")  # noqa: E731
    assert resend_lost_intakes(svc, inbox, fail, lambda q: length, grace=30) == []
    assert inbox.entries  # still watched


def test_one_entry_that_fails_does_not_stop_the_others() -> None:
    from tests.fakes import make_services
    from workers.steps.watchdog import resend_lost_intakes

    svc = make_services()
    inbox = FakeInbox(
        Noted("a", "celery", svc.clock() - 90), Noted("b", "celery", svc.clock() - 80)
    )
    sent: list[str] = []

    def send(s: Noted) -> None:
        if s.job_id == "a":
            raise ConnectionError("broker down")
        sent.append(s.job_id)

    assert resend_lost_intakes(svc, inbox, send, EMPTY, grace=30) == ["b"] == sent


def test_after_a_day_the_inbox_gives_up() -> None:
    from tests.fakes import make_services
    from workers.steps.watchdog import resend_lost_intakes

    svc = make_services()
    inbox = FakeInbox(Noted("ancient", "celery", svc.clock() - 2 * 86400))
    assert (
        resend_lost_intakes(svc, inbox, lambda s: pytest.fail("sent again"), EMPTY, grace=30) == []
    )
    assert inbox.crossed == ["ancient"]


def test_a_password_is_read_as_redis_py_reads_it_and_never_shown() -> None:
    """Percent-escapes decoded (kombu and redis-py's from_url do the same for the broker), and
    the URL, which holds it, is not in the address's repr."""
    address = RedisAddress("redis://user%3A1:p%40ss@sentinel/2", (("s1", 26379),))
    assert address.server_kwargs() == {"db": 2, "username": "user:1", "password": "p@ss"}
    assert "p%40ss" not in repr(address) and "p@ss" not in repr(address)
    assert "p%40ss" not in address.describe()
