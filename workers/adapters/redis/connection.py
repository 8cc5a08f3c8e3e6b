"""How every process of ours reaches Redis: one server's URL, or the master that Sentinels name.

:class:`RedisAddress` is the whole answer (built once from the settings by the composition root);
:func:`connect` turns it into a client, and :func:`celery_options` into the broker's and result
backend's configuration, so the job store, the governor, the timers, the metrics exporter, the
console, the CLI and Celery all follow the same master.

With Sentinel, a client asks the Sentinels for the master's address before it connects, and asks
again after a connection error or a ``READONLY`` answer (an old master that came back as a
replica): a failover needs no restart. Each change of master is logged once per process.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

log = logging.getLogger(__name__)

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is. ``url`` alone, or ``sentinels`` naming ``master_name``; then ``url`` gives
    only the database, credentials and TLS (``rediss://``, ``ssl_*`` query parameters)."""

    url: str = field(repr=False)  # it may hold the password
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = "animate-queue"
    sentinel_password: str | None = field(default=None, repr=False)
    sentinel_tls: bool = False

    @property
    def uses_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """Where, without credentials: safe to log."""
        if not self.sentinels:
            return _redact(self.url)
        where = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"master {self.master_name!r} of Sentinels {where} (db {self.db})"

    def celery_url(self) -> str:
        """The broker's and result backend's URL: ``url``, or with Sentinel kombu's form
        ``sentinel://[:pw@]host:port/db;...`` (the password and database are ``url``'s; the
        master's name goes in the transport options, :func:`celery_options`)."""
        if not self.sentinels:
            return self.url
        parts = urlsplit(self.url)
        auth = ""
        if parts.password is not None or parts.username:
            auth = f"{parts.username or ''}:{parts.password or ''}@"
        return ";".join(
            f"sentinel://{auth}{f'[{h}]' if ':' in h else h}:{p}/{self.db}"
            for h, p in self.sentinels
        )

    @property
    def db(self) -> int:
        path = urlsplit(self.url).path.lstrip("/")
        return int(path) if path.isdigit() else 0

    def server_kwargs(self) -> dict[str, Any]:
        """The Redis servers' connection parameters taken from ``url`` (not its host)."""
        parts = urlsplit(self.url)
        kwargs: dict[str, Any] = {"db": self.db}
        if parts.username:
            kwargs["username"] = unquote(parts.username)
        if parts.password is not None:
            kwargs["password"] = unquote(parts.password)  # as redis-py and kombu read it
        if parts.scheme == "rediss":
            kwargs.update(tls_kwargs(self.url))
        return kwargs


def tls_kwargs(url: str) -> dict[str, Any]:
    """redis-py's TLS parameters for a ``rediss://`` URL (``ssl_cert_reqs``, ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile`` from its query; certificates required by default)."""
    query = dict(parse_qsl(urlsplit(url).query))
    kwargs: dict[str, Any] = {"ssl": True}
    reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    kwargs["ssl_cert_reqs"] = _CERT_REQS.get(reqs, ssl.CERT_REQUIRED)
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if query.get(name):
            kwargs[name] = query[name]
    return kwargs


class _AnnouncedMasterPool(SentinelConnectionPool):
    """Sentinel's pool, logging each master it finds: the first, then every failover."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        announce_master_changes(self)


def announce_master_changes(pool: SentinelConnectionPool) -> None:
    """Log each master ``pool`` connects to: the process's first at INFO, every change (a
    failover) as a WARNING. Its connections ask the pool's proxy for the address, so that lookup is wrapped.
    kombu's Sentinel pools get it too (workers.adapters.redis.kombu_transport)."""
    proxy = pool.proxy
    discover = proxy.get_master_address
    name = pool.service_name
    watched_by = frozenset(
        (
            c.connection_pool.connection_kwargs.get("host"),
            c.connection_pool.connection_kwargs.get("port"),
        )
        for c in pool.sentinel_manager.sentinels
    )

    def announced() -> tuple[str, int]:
        address: tuple[str, int] = discover()  # type: ignore[no-untyped-call]
        with _known_lock:
            before = _known.get((name, watched_by))
            _known[(name, watched_by)] = address
        if address != before:
            _announce(name, before, address)
        return address

    proxy.get_master_address = announced  # type: ignore[method-assign]


# The master this process last connected to, per name and Sentinels: a pool made after a failover
# (kombu makes a new one when it reconnects) still reports the move, not a first sighting.
_known: dict[tuple[str, frozenset[tuple[Any, Any]]], tuple[str, int]] = {}
_known_lock = threading.Lock()


def _announce(name: str, before: tuple[str, int] | None, now: tuple[str, int]) -> None:
    host, port = now
    if before is None:
        log.info("redis: master %r is %s:%d (Sentinel)", name, host, port)
        return
    log.warning(
        "redis: master %r moved from %s:%d to %s:%d; reconnected there",
        name,
        *before,
        host,
        port,
        extra={"event": "redis.failover", "master": f"{host}:{port}"},
    )


# redis-py names each Sentinel that did not answer by its client's whole repr (a few hundred
# characters, every connection parameter); the host and port say it.
_CLIENT_REPR = re.compile(r"<redis\.client\.Redis\(.*?host=([^,]+),port=(\d+).*?\)>\)>\)>")


class _Sentinels(Sentinel):
    """redis-py's Sentinel, whose "no master found" says which Sentinels failed in a line."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        try:
            found: tuple[str, int] = super().discover_master(service_name)
        except MasterNotFoundError as exc:
            raise MasterNotFoundError(_CLIENT_REPR.sub(r"\1:\2", str(exc))) from None
        return found


def connect(
    address: RedisAddress,
    *,
    socket_timeout: float = 10.0,
    connect_timeout: float = 5.0,
    health_check_interval: int = 30,
    retry_on_timeout: bool = True,
) -> redis.Redis:
    """A client of the server, or of whatever master the Sentinels name now and later."""
    common: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": health_check_interval,
    }
    if not address.uses_sentinel:
        if not retry_on_timeout:
            common["retry_on_timeout"] = False
        return redis.Redis.from_url(address.url, **common)
    sentinel = _Sentinels(
        list(address.sentinels),
        sentinel_kwargs=sentinel_kwargs(address, connect_timeout, socket_timeout),
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
    )
    client: redis.Redis = sentinel.master_for(
        address.master_name,
        connection_pool_class=_AnnouncedMasterPool,
        health_check_interval=health_check_interval,
        **address.server_kwargs(),
    )
    return client


def sentinel_kwargs(
    address: RedisAddress, connect_timeout: float = 5.0, socket_timeout: float = 5.0
) -> dict[str, Any]:
    """How to talk to the Sentinels themselves: timeouts, their password, TLS."""
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    if address.sentinel_password:
        kwargs["password"] = address.sentinel_password
    if address.sentinel_tls:
        tls = tls_kwargs(address.url) if urlsplit(address.url).scheme == "rediss" else {}
        kwargs.update(tls or {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED})
    return kwargs


def celery_options(address: RedisAddress, broker_url: str, result_backend: str) -> dict[str, Any]:
    """Celery settings for a broker and result backend on ``address``'s Sentinels: the
    ``master_name`` and Sentinel credentials in their transport options, TLS in ``*_use_ssl``.
    Empty for plain URLs (Celery reads those as they are)."""
    options: dict[str, Any] = {}
    sentinel = {
        "master_name": address.master_name,
        "sentinel_kwargs": sentinel_kwargs(address),
    }
    tls = tls_kwargs(address.url) if urlsplit(address.url).scheme == "rediss" else None
    if broker_url.startswith("sentinel://"):
        options["broker_transport_options"] = dict(sentinel)
        if tls:
            options["broker_use_ssl"] = {k: v for k, v in tls.items() if k != "ssl"}
    if result_backend.startswith("sentinel://"):
        options["result_backend_transport_options"] = dict(sentinel)
        if tls:
            options["redis_backend_use_ssl"] = {k: v for k, v in tls.items() if k != "ssl"}
    return options


def _redact(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    where = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{where}{parts.path}"
