"""Redis with failover, for tests and benchmarks: a master, replicas and Sentinels as real processes.

Each node runs where its :class:`Place` says: on 127.0.0.1 (the integration tests), or inside a
Linux network namespace with its own address (``bench/ha.py``'s hosts, through ``ip netns exec``).
Sentinels watch the master under :data:`MASTER_NAME`, judge it down after ``down_after_ms``, and
promote a replica; a restarted old master is turned into a replica by them.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import redis

from devstack import Service, free_port, redis_server_binary, terminate

MASTER_NAME = "animate-queue"


@dataclass(frozen=True)
class Place:
    """Where a process runs: an address on this host, or in a network namespace."""

    host: str = "127.0.0.1"
    netns: str | None = None

    def command(self, args: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args] if self.netns else args


class _Process:
    """A redis-server process (a node or a Sentinel) at ``place``:``port``: its client, whether
    it answers, SIGKILL and stop. Subclasses are dataclasses with these fields."""

    place: Place
    port: int
    password: str | None
    tls: dict[str, str] | None
    proc: subprocess.Popen[bytes] | None

    @property
    def address(self) -> tuple[str, int]:
        return self.place.host, self.port

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return _client(self.place.host, self.port, self.password, self.tls, timeout)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{type(self).__name__} on {self.place.host}:{self.port} exited")
        try:
            with self.client(0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost host would."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


@dataclass
class Node(_Process):
    """One redis-server, master or replica (``replica_of``), in ``place``."""

    place: Place
    port: int
    replica_of: tuple[str, int] | None = None
    password: str | None = None
    tls: dict[str, str] | None = None  # tls-cert-file etc.: serve TLS on ``port`` only
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="aq-ha-redis-")))
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        args = [redis_server_binary(), "--bind", self.place.host, "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--maxmemory-policy", "noeviction", "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0"]  # fmt: skip
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-replication", "yes",
                     "--tls-auth-clients", "no"]  # fmt: skip
            for name, value in self.tls.items():
                args += [f"--{name}", value]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.replica_of:
            args += ["--replicaof", *map(str, self.replica_of)]
        self.proc = subprocess.Popen(
            self.place.command(args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        wait_until(lambda: self._answers(), f"redis-server at {self.place.host}:{self.port}")
        return self

    def role(self) -> str:
        with self.client() as client:
            answer = client.role()
        return answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])


@dataclass
class SentinelNode(_Process):
    """One Sentinel (``redis-server <conf> --sentinel``) watching ``master``."""

    place: Place
    port: int
    master: tuple[str, int]
    quorum: int = 2
    down_after_ms: int = 2000
    failover_timeout_ms: int = 6000
    password: str | None = None  # the Sentinel's own
    master_password: str | None = None
    tls: dict[str, str] | None = None  # as Node's: TLS to clients and to the Redis nodes
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="aq-ha-sentinel-")))
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        conf = self.dir / "sentinel.conf"
        if not conf.exists():  # a restart keeps what it learnt (Sentinel rewrites its file)
            lines = [
                f"bind {self.place.host}",
                f"dir {self.dir}",
                "protected-mode no",
                f"sentinel monitor {MASTER_NAME} {self.master[0]} {self.master[1]} {self.quorum}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
                f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {MASTER_NAME} 1",
            ]
            if self.master_password:
                lines.append(f"sentinel auth-pass {MASTER_NAME} {self.master_password}")
            if self.password:
                lines.append(f"requirepass {self.password}")
            if self.tls:
                lines += [
                    "port 0",
                    f"tls-port {self.port}",
                    "tls-replication yes",
                    "tls-auth-clients no",
                ]
                lines += [f"{name} {value}" for name, value in self.tls.items()]
            else:
                lines.append(f"port {self.port}")
            conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            self.place.command([redis_server_binary(), str(conf), "--sentinel"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_until(self._answers, f"sentinel at {self.place.host}:{self.port}")
        return self

    def master_address(self) -> tuple[str, int] | None:
        with self.client() as client:
            found = client.sentinel_get_master_addr_by_name(MASTER_NAME)
        if not found:
            return None
        host, port = found
        return (host.decode() if isinstance(host, bytes) else str(host)), int(port)


class RedisHA(Service):
    """A master, ``replicas`` replicas and ``sentinels`` Sentinels, started in that order."""

    def __init__(
        self,
        *,
        master: Place = Place(),
        replicas: list[Place] | None = None,
        sentinels: list[Place] | None = None,
        password: str | None = None,
        sentinel_password: str | None = None,
        down_after_ms: int = 2000,
        port: int | None = None,
        sentinel_port: int | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:
        """``port``/``sentinel_port``: every node's (each has its own address), else free ones.
        ``tls``: every node and Sentinel serves TLS only (:func:`tls_files`)."""
        self.tls = tls
        self.password = password
        self.sentinel_password = sentinel_password
        self.master = Node(master, port or free_port(), password=password, tls=tls)
        self.replicas = [
            Node(p, port or free_port(), replica_of=self.master.address, password=password, tls=tls)
            for p in (replicas if replicas is not None else [Place()])
        ]
        self.sentinels = [
            SentinelNode(
                p, sentinel_port or free_port(), self.master.address,
                down_after_ms=down_after_ms, password=sentinel_password,
                master_password=password, tls=tls,
            )
            for p in (sentinels if sentinels is not None else [Place()] * 3)
        ]  # fmt: skip

    @property
    def nodes(self) -> list[Node]:
        return [self.master, *self.replicas]

    def sentinel_setting(self) -> str:
        """REDIS_SENTINELS for these Sentinels."""
        return ",".join(f"{h}:{p}" for h, p in (s.address for s in self.sentinels))

    def url(self, db: int = 0) -> str:
        """REDIS_URL to use beside REDIS_SENTINELS: only the password, db and TLS count."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            ca = self.tls["tls-ca-cert-file"]
            return f"rediss://{auth}sentinel-named-master/{db}?ssl_ca_certs={ca}"
        return f"redis://{auth}sentinel-named-master/{db}"

    def start(self) -> Self:
        """Every node, then every Sentinel; what started is stopped again if a step fails."""
        try:
            self.master.start()
            for replica in self.replicas:
                replica.start()
            wait_until(self.replicas_in_sync, "replicas in sync with the master")
            for sentinel in self.sentinels:
                sentinel.start()
            wait_until(self._sentinels_agree, "Sentinels agreeing on the master and its replicas")
        except BaseException:
            self.stop()
            raise
        return self

    def replicas_in_sync(self) -> bool:
        with self.current_master().client() as client:
            return len(client.role()[2]) == sum(1 for r in self.nodes if r.proc) - 1

    def _sentinels_agree(self) -> bool:
        want = self.current_master().address
        for s in self.sentinels:
            if s.proc is None:
                continue
            with s.client() as client:
                replicas = client.sentinel_slaves(MASTER_NAME)
                others = client.sentinel_sentinels(MASTER_NAME)
            if s.master_address() != want or len(replicas) < len(self.replicas):
                return False
            if len(others) < len(self.sentinels) - 1:
                return False
        return True

    def current_master(self) -> Node:
        """The node the live Sentinels name (the first one that answers)."""
        for s in self.sentinels:
            if s.proc is None:
                continue
            try:
                named = s.master_address()
            except redis.RedisError:
                continue
            for node in self.nodes:
                if node.address == named:
                    return node
        return self.master

    def wait_for_failover(self, old: Node, timeout: float = 60.0) -> Node:
        """The new master, once a majority of Sentinels names another than ``old`` and it
        answers as a master."""

        def moved() -> bool:
            named = [s.master_address() for s in self.sentinels if s.proc is not None]
            others = [n for n in named if n is not None and n != old.address]
            if len(others) <= len(self.sentinels) // 2:
                return False
            node = self.current_master()
            return node is not old and node.proc is not None and node.role() == "master"

        wait_until(moved, "a failover", timeout)
        return self.current_master()

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for node in self.nodes:
            node.stop()


def _client(
    host: str, port: int, password: str | None, tls: dict[str, str] | None, timeout: float
) -> redis.Redis:
    if tls:
        return redis.Redis(
            host=host, port=port, password=password, socket_timeout=timeout,
            socket_connect_timeout=timeout, ssl=True, ssl_ca_certs=tls["tls-ca-cert-file"],
        )  # fmt: skip
    return redis.Redis(
        host=host, port=port, password=password, socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )  # fmt: skip


def tls_files(where: Path, hosts: list[str]) -> dict[str, str]:
    """A throwaway CA and a server certificate for ``hosts`` (IP addresses), made with the
    openssl command: the ``tls-*`` settings of :class:`Node` and :class:`SentinelNode`."""
    where.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=animate-queue test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "redis.key", "-out", "redis.csr",
        "-subj", "/CN=redis")  # fmt: skip
    (where / "ext").write_text("subjectAltName=" + ",".join(f"IP:{h}" for h in hosts) + "\n")
    run("x509", "-req", "-in", "redis.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "redis.crt", "-days", "2", "-extfile", "ext")  # fmt: skip
    return {
        "tls-cert-file": str(where / "redis.crt"),
        "tls-key-file": str(where / "redis.key"),
        "tls-ca-cert-file": str(where / "ca.crt"),
    }


def wait_until(ok: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"waited {timeout:g} s for {what}" + (f" (last: {last})" if last else ""))
