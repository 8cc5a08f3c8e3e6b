"""Shared helpers for ``bench/overhead.py`` and ``bench/inflight.py``.

* the emulator and moto's S3 server each in a child process of their own (``spawn``), so their
  Python threads never take the benchmark's GIL, and their CPU time can be read apart;
* CPU time and memory of whole process groups, read from ``/proc`` (a Celery worker is a process
  group: its main process and its prefork pool);
* Redis counters (``INFO stats``/``commandstats``/``memory``) and their deltas;
* Celery messages: published ones from Redis's LPUSH count, received ones by task name from the
  workers' INFO log lines, and waiting until the queues are drained;
* a no-op Celery worker (``bench/noop_app.py``) for Celery's own floor;
* ``py-spy record`` on the workers, and a ranking of the functions it saw;
* small printing helpers: a table, percentiles.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import redis

from devstack import S3Server, Worker, free_port
from emulator.config import EmulatorConfig

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-bench-overhead-00000001"
PREFIX = "animate-queue"  # KEY_PREFIX's default: the workers' job store keys
_CTX = mp.get_context("spawn")
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- numbers


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[k]


def finite(value: float, digits: int = 3) -> float | None:
    """A JSON-safe number: rounded, or None for NaN and infinities."""
    return round(value, digits) if math.isfinite(value) else None


def table(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    """Print a two-column table (name, value)."""
    rows = list(rows)
    width = max((len(name) for name, _ in rows), default=0)
    print(f"\n{title}")
    print("-" * len(title))
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    sys.stdout.flush()


def fmt(value: float | None, unit: str = "", digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


# ----------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcSample:
    """CPU seconds (user + system, reaped children included) and memory of some processes."""

    cpu_s: float
    rss_bytes: int
    processes: int


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # Fields after the command name; index 0 is field 3 (state) of proc(5).
    return raw.rsplit(")", 1)[1].split()


def group_pids(pgids: Iterable[int]) -> list[int]:
    """Every live process whose process group is one of ``pgids``."""
    wanted = set(pgids)
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(entry.name)
            if fields is not None and int(fields[2]) in wanted:
                pids.append(int(entry.name))
    return pids


def group_sample(pgids: Iterable[int]) -> ProcSample:
    """Sum over every live process whose process group is one of ``pgids``.

    A Celery worker started with ``start_new_session`` is its own group: the main process and its
    pool children. CPU counts utime + stime of each process plus cutime + cstime (children that
    already exited and were reaped); RSS is the sum of resident set sizes (shared pages of forked
    children count once per process, as ``ps`` would show them).
    """
    cpu = 0.0
    rss = 0
    pids = group_pids(pgids)
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            cpu += sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICK
            rss += int(fields[21]) * _PAGE
    return ProcSample(cpu, rss, len(pids))


def rss_by_process(pgid: int) -> dict[str, float]:
    """MiB resident per process of one group: ``main`` (the group leader) and its children."""
    out: dict[str, float] = {}
    for pid in sorted(group_pids([pgid])):
        fields = _stat_fields(pid)
        if fields is not None:
            name = "main" if pid == pgid else f"child {pid}"
            out[name] = round(int(fields[21]) * _PAGE / 2**20, 1)
    return out


def group_pss(pgids: Iterable[int]) -> int:
    """Proportional set size of the groups' processes (shared pages split among them)."""
    total = 0
    for pid in group_pids(pgids):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def pid_sample(pid: int) -> ProcSample:
    """One process (its threads included)."""
    fields = _stat_fields(pid)
    if fields is None:
        return ProcSample(0.0, 0, 0)
    cpu = sum(int(fields[i]) for i in (11, 12, 13, 14)) / _TICK
    return ProcSample(cpu, int(fields[21]) * _PAGE, 1)


def self_cpu() -> float:
    """This process's own CPU seconds."""
    t = os.times()
    return t.user + t.system


# ----------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class RedisSnapshot:
    commands: int  # total_commands_processed (commands run inside Lua scripts included)
    per_command: dict[str, int]  # INFO commandstats calls, by command
    usec: dict[str, int]  # INFO commandstats microseconds, by command
    used_memory: int
    lua_memory: int

    def minus(self, earlier: RedisSnapshot) -> RedisSnapshot:
        per = {
            name: calls - earlier.per_command.get(name, 0)
            for name, calls in self.per_command.items()
            if calls - earlier.per_command.get(name, 0) > 0
        }
        usec = {
            name: spent - earlier.usec.get(name, 0)
            for name, spent in self.usec.items()
            if spent - earlier.usec.get(name, 0) > 0
        }
        return RedisSnapshot(
            self.commands - earlier.commands,
            per,
            usec,
            self.used_memory - earlier.used_memory,
            self.lua_memory - earlier.lua_memory,
        )


def redis_snapshot(client: redis.Redis) -> RedisSnapshot:
    stats = client.info("stats")
    memory = client.info("memory")
    commandstats = client.info("commandstats")
    per = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in commandstats.items()}
    usec = {name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in commandstats.items()}
    return RedisSnapshot(
        int(stats["total_commands_processed"]),
        per,
        usec,
        int(memory["used_memory"]),
        int(memory.get("used_memory_lua", 0) or memory.get("used_memory_vm_eval", 0)),
    )


def top_commands(delta: RedisSnapshot, jobs: int, n: int = 12) -> list[tuple[str, float]]:
    """The most-called commands per job (script-internal calls included)."""
    ranked = sorted(delta.per_command.items(), key=lambda kv: -kv[1])[:n]
    return [(name, round(calls / jobs, 2)) for name, calls in ranked]


def top_usec(delta: RedisSnapshot, jobs: int, n: int = 6) -> list[tuple[str, float]]:
    """Redis time per job by command, microseconds (EVALSHA includes its script's commands)."""
    ranked = sorted(delta.usec.items(), key=lambda kv: -kv[1])[:n]
    return [(name, round(spent / jobs, 1)) for name, spent in ranked]


def job_counts(client: redis.Redis, prefix: str = PREFIX) -> Counter[str]:
    """Jobs per state, from the job store's own per-state counter hash (one command)."""
    counts: Counter[str] = Counter()
    raw: dict[bytes, bytes] = client.hgetall(f"{prefix}:m:jobs")  # type: ignore[assignment]
    for key, value in raw.items():
        state = key.decode().split("|", 1)[0]
        counts[state] += int(value)
    return counts


# ----------------------------------------------------------------------------- child services


def _serve_emulator(config: EmulatorConfig, conn: Connection, stop: Any) -> None:
    from emulator.server import EmulatorServer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    server = EmulatorServer(config).start()
    conn.send(server.url)
    stop.wait()
    server.stop()


def _serve_s3(bucket: str, conn: Connection, stop: Any) -> None:
    import logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server().start()
    server.create_bucket(bucket)
    conn.send(server.endpoint)
    stop.wait()
    server.stop()


class ChildService:
    """A service (the emulator, or moto's S3) served from a child process of its own."""

    def __init__(self, target: Callable[..., None], *args: Any, name: str) -> None:
        self._target = target
        self._args = args
        self.name = name
        self._stop = _CTX.Event()
        self.proc: Any = None
        self.address = ""

    def start(self, timeout: float = 60) -> ChildService:
        parent, child = _CTX.Pipe()
        self.proc = _CTX.Process(
            target=self._target, args=(*self._args, child, self._stop), name=self.name, daemon=True
        )
        self.proc.start()
        if not parent.poll(timeout):
            self.stop()
            raise RuntimeError(f"{self.name} did not start in {timeout} s")
        self.address = str(parent.recv())
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self._stop.set()
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.proc = None

    def cpu_s(self) -> float:
        return pid_sample(self.proc.pid).cpu_s if self.proc is not None else 0.0

    def __enter__(self) -> ChildService:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def emulator_child(config: EmulatorConfig) -> ChildService:
    """``EmulatorServer(config)`` in a child process; ``.address`` is its root URL."""
    return ChildService(_serve_emulator, config, name="emulator")


def s3_child(bucket: str) -> ChildService:
    """moto's S3 server with ``bucket`` created, in a child process; ``.address`` is its endpoint."""
    return ChildService(_serve_s3, bucket, name="s3")


def seed_emulator(emulator_url: str, api_key: str = API_KEY) -> tuple[str, str]:
    """An action template for ``api_key`` and a person image hosted as a static file (the sample
    route would draw a new PNG for every request). Returns (template_id, image_url)."""
    from emulator.media import sample_person_png

    with httpx.Client(base_url=emulator_url, timeout=30) as http:
        template = http.post("/_emulator/templates", json={"api_key": api_key, "seconds": 2})
        template.raise_for_status()
        put = http.put(
            "/_emulator/files/person.png",
            content=sample_person_png(256, 512),
            headers={"Content-Type": "image/png"},
        )
        put.raise_for_status()
        return str(template.json()["template_id"]), str(put.json()["url"])


def emulator_stats(emulator_url: str) -> dict[str, Any]:
    with httpx.Client(base_url=emulator_url, timeout=30) as http:
        totals: dict[str, Any] = http.get("/_emulator/stats").json()["totals"]
        return totals


# ----------------------------------------------------------------------------- workers


def start_all(workers: Sequence[Any]) -> None:
    """Start workers side by side (each start waits for its " ready." line)."""
    errors: list[BaseException] = []

    def one(w: Any) -> None:
        try:
            w.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        stop_all(workers)
        raise errors[0]


def stop_all(workers: Sequence[Any]) -> None:
    threads = [threading.Thread(target=w.stop) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def kill_all(workers: Sequence[Worker]) -> None:
    """SIGKILL each worker's process group (when nothing they hold matters any more)."""
    for w in workers:
        w.kill()
        w.stop()  # closes its log


def pgids(workers: Sequence[Any]) -> list[int]:
    """Process groups of started workers (``start_new_session``: pgid == pid)."""
    return [w.proc.pid for w in workers if w.proc is not None]


def design_workers(env: Mapping[str, str], count: int, concurrency: int, tag: str) -> list[Worker]:
    return [
        Worker(env, concurrency=concurrency, name=f"{tag}{i}-{os.getpid()}@%h")
        for i in range(count)
    ]


def NoopWorker(
    env: Mapping[str, str],
    *,
    queues: str = "celery,dashscope,transfer",
    concurrency: int = 1,
    name: str,
) -> Worker:
    """``celery -A bench.noop_app worker``, started exactly like our workers (``devstack.Worker``:
    ``-E --without-gossip --without-mingle``, INFO log to a file, own session)."""
    return Worker({**env, "PYTHONPATH": str(REPO)}, queues=queues, concurrency=concurrency,
                  name=name, app="bench.noop_app")  # fmt: skip


# ----------------------------------------------------------------------------- profiling

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")
_OURS = re.compile(r"(^|/)(workers|config)/[^/]+\.py$")


class Profiler:
    """``py-spy record`` on each worker's process group (``--subprocesses``) into ``directory``
    (raw collapsed stacks, one file a worker); ``summary()`` ranks the functions. Needs py-spy
    (``pip install py-spy``) and ptrace permission; costs some CPU of its own while it samples."""

    def __init__(
        self, workers: Sequence[Any], directory: Path, *, rate: int = 50, idle: bool = False
    ) -> None:
        self.workers = workers
        self.directory = directory
        self.rate = rate
        self.idle = idle
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Path] = []

    def start(self) -> Profiler:
        spy = Path(sys.executable).with_name("py-spy")
        self.directory.mkdir(parents=True, exist_ok=True)
        for w in self.workers:
            out = self.directory / f"{w.name.split('@')[0]}{'-idle' if self.idle else ''}.txt"
            args = [str(spy), "record", "--pid", str(w.proc.pid), "--subprocesses", "--rate",
                    str(self.rate), "--format", "raw", "--output", str(out), "--nonblocking"]  # fmt: skip
            if self.idle:
                args.append("--idle")
            self.procs.append(
                subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            self.files.append(out)
        return self

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stacks(self) -> Counter[tuple[str, ...]]:
        stacks: Counter[tuple[str, ...]] = Counter()
        for path in self.files:
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                frames, _, count = line.rpartition(" ")
                if frames and count.isdigit():
                    stacks[tuple(frames.split(";"))] += int(count)
        return stacks

    def summary(self, top: int = 15) -> dict[str, list[tuple[str, float]]]:
        """Shares of all samples: ``ours`` inclusive per function of workers/ and config/,
        ``self`` per innermost frame (any code), each as "function (file)"."""
        stacks = self.stacks()
        total = sum(stacks.values()) or 1
        ours: Counter[str] = Counter()
        leaves: Counter[str] = Counter()
        for frames, count in stacks.items():
            seen = set()
            for frame in frames:
                match = _FRAME.match(frame)
                if match and _OURS.search(match["file"]):
                    name = f"{match['func']} ({Path(match['file']).name})"
                    if name not in seen:
                        seen.add(name)
                        ours[name] += count
            leaf = _FRAME.match(frames[-1])
            leaves[f"{leaf['func']} ({Path(leaf['file']).name})" if leaf else frames[-1]] += count
        return {
            "ours": [(k, round(v / total, 3)) for k, v in ours.most_common(top)],
            "self": [(k, round(v / total, 3)) for k, v in leaves.most_common(top)],
        }


# ----------------------------------------------------------------------------- messages

_RECEIVED = re.compile(rb"Task ([\w.]+)\[[0-9a-f-]+\] received")


def log_offsets(workers: Sequence[Any]) -> list[int]:
    """Where each worker's log ends now (to count what it logs from here on)."""
    return [w.log_path.stat().st_size for w in workers]


def received_by_task(workers: Sequence[Any], offsets: Sequence[int]) -> Counter[str]:
    """Messages each worker took off the broker since ``offsets``, by task name: Celery logs
    ``Task <name>[<id>] received`` (INFO) for every message it receives, countdowns included."""
    counts: Counter[str] = Counter()
    for worker, offset in zip(workers, offsets, strict=True):
        with worker.log_path.open("rb") as f:
            f.seek(offset)
            counts.update(m.group(1).decode() for m in _RECEIVED.finditer(f.read()))
    return counts


def queued_messages(client: redis.Redis, queues: Sequence[str]) -> int:
    """Messages waiting in the queues plus those held by workers (kombu's ``unacked`` hash:
    running, prefetched, or waiting for their countdown)."""
    pipe = client.pipeline()
    for q in queues:
        pipe.llen(q)
    pipe.hlen("unacked")
    return sum(int(n) for n in pipe.execute())


def wait_drained(
    client: redis.Redis, queues: Sequence[str], timeout: float, interval: float = 0.05
) -> float:
    """Until no message waits or is held (seen twice in a row); the time it was first seen."""
    deadline = time.monotonic() + timeout
    first = 0.0
    while time.monotonic() < deadline:
        if queued_messages(client, queues) == 0:
            if first:
                return first
            first = time.time()
        else:
            first = 0.0
        time.sleep(interval)
    raise TimeoutError(f"messages still queued after {timeout:.0f} s")


# ----------------------------------------------------------------------------- environment


def worker_env(
    redis_url: str,
    emulator_url: str,
    s3_endpoint: str | None,
    bucket: str,
    **settings: str | float | int,
) -> dict[str, str]:
    """The design workers' environment; ``settings`` are more variables (upper-cased)."""
    env = {
        "REDIS_URL": redis_url,
        "DASHSCOPE_API_KEY": API_KEY,
        "DASHSCOPE_BASE_URL": f"{emulator_url}/api/v1",
        "S3_BUCKET": bucket,
        "URL_ALLOWLIST": "127.0.0.1",  # the emulator and S3 run on loopback
        # Without an S3 server, nothing reaches this port (the client is made lazily).
        "AWS_ENDPOINT_URL": s3_endpoint or f"http://127.0.0.1:{free_port()}",
        **S3Server.CREDENTIALS,
    }
    env.update({name.upper(): str(value) for name, value in settings.items()})
    return env
