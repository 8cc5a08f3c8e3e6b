"""Scale of jobs in flight: 20,000 jobs remote-PENDING or RUNNING at once, polled on schedule?

    .venv/bin/python -m bench.inflight [--jobs 20000] [--interval 150] [--window 150] [--quick]

Real processes: a redis-server, the DashScope emulator in a child process (quotas off,
``--remote-running`` tasks run at once, each for an hour; the rest wait remote-PENDING), and
``--workers`` Celery worker processes (``devstack.Worker``, ``-c --concurrency``). Admission lets
every job through (``DASHSCOPE_CONCURRENCY`` = ``--remote-running``, ``ADMISSION_LOOKAHEAD`` = the
rest); quota buckets are far above what the workers can spend. Every poll interval (first,
running, pending, pending max) is ``--interval``, so the workers owe ``jobs / interval`` polls a
second once all jobs are in flight; ``VISIBILITY_TIMEOUT`` is 4x that plus a minute (the
settings' rule). No beat runs: the watchdog would hide lateness by resuming late jobs.

1. ramp: ``--jobs`` ``animate.generate`` messages (template id, ``detect=False``) are enqueued at
   once; the ramp ends when all are SUBMITTED, or after ``--ramp-budget`` seconds (then the run
   goes on with what it reached, and says so).
2. window: ``--window`` seconds of steady state (default one poll interval: every job is polled in it).

Figures:

* poll lateness: every poll is recorded in the job's timeline (``P:timeline:<id>``, its ``at``);
  a poll was due at the previous event's ``at`` plus the interval (the submit's, or the last
  poll's: ``next_action_at`` is set from the same clock reading). Lateness = actual - due, for
  polls made in the window; polls due by its end that had not happened count with their
  lateness so far (SUBMITTED jobs past their ``P:deadlines`` score, however long ago it passed).
  The ramp's polls are reported apart.
* worker memory: RSS (and PSS) of each worker's whole process group, sampled every 2 s; the
  value at 1k/2k/5k/10k/20k jobs in flight shows whether it grows with the job count. Celery
  holds countdown messages in the worker until due, at most ``worker_eta_task_limit`` (1000) a
  worker; waits over ``COUNTDOWN_MAX_SECONDS`` (all of them here) are parked in the Redis timer
  instead. ``inspect().scheduled()``, the prefetch count, kombu's ``unacked`` hash and the size
  of ``P:timers`` show where the waits are.
* Redis memory per job: ``used_memory`` at the end minus before the ramp, over the jobs enqueued
  (each is in Redis as its intake message or as its record and next message; all are in flight
  when the target is reached); and per part, from ``MEMORY USAGE`` of every key (``SCAN``): a job
  hash, a timeline, the indexes per record, a broker message. A job in flight has one of each.

The last line printed is one JSON object.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as bench/inflight.py: the repository root goes first on the path, and bench/ off it
    # (a bench/copy_speed.py there would shadow the standard library's copy module).
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

import argparse
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery

from bench import common
from devstack import RedisServer, Worker
from emulator.config import EmulatorConfig
from workers.adapters.redis.store import with_moves
from workers.producer import AnimateQueue

BUCKET = "bench-inflight"
QUEUES = ("celery", "dashscope", "transfer")
P = common.PREFIX
MIB = 1024 * 1024
MEMORY_FIELDS = ("used_memory", "used_memory_dataset", "used_memory_overhead",
                 "mem_clients_normal", "used_memory_scripts", "mem_not_counted_for_evict")  # fmt: skip


def emulator_config(args: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        submit_rate=0,  # 0: unlimited
        query_rate=0,
        detect_rate=0,
        policy_rate=0,
        concurrency=args.remote_running,
        preprocess_seconds=0.0,
        generation_seconds=3600.0,  # nothing ends during the run
        postprocess_seconds=0.0,
        template_seconds=0.1,
        video_short_side=144,
    )


def worker_settings(args: argparse.Namespace) -> dict[str, Any]:
    interval = args.interval
    return {
        "dashscope_concurrency": args.remote_running,
        "admission_lookahead": max(0, args.jobs - args.remote_running) + 100,
        "dashscope_submit_rate": 100_000,
        "dashscope_query_rate": 100_000,
        "dashscope_detect_rate": 100_000,
        "poll_first_seconds": interval,
        "poll_running_seconds": interval,
        "poll_pending_seconds": interval,
        "poll_pending_max_seconds": interval,
        "visibility_timeout": int(4 * max(interval, 60) + 60),
        "log_level": args.log_level,
    }


# ----------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    t: float
    in_flight: int  # jobs SUBMITTED (remote PENDING or RUNNING)
    queued: int  # jobs not yet submitted (intake, QUEUED, SUBMITTING)
    overdue: int  # jobs whose next wake-up is more than 2 s overdue
    max_overdue_s: float
    held: int  # messages held by workers (kombu's unacked hash: countdowns and running)
    waiting: int  # messages waiting in the queues
    parked: int  # wake-ups parked in the Redis timer (P:timers)
    rss: int
    pss: int
    used_memory: int
    worker_cpu_s: float  # cumulative, all workers
    redis_cpu_s: float
    emulator_cpu_s: float


class Sampler:
    """Every ``period`` seconds: jobs by state, overdue wake-ups, messages, worker memory."""

    def __init__(
        self, url: str, workers: list[Worker], others: dict[str, int], period: float = 2.0
    ) -> None:
        self.client = redis.Redis.from_url(url)
        self.groups = common.pgids(workers)
        self.others = others  # "redis" and "emulator" pids
        self.period = period
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def take(self) -> Sample:
        now = time.time()
        counts = common.job_counts(self.client)
        pipe = self.client.pipeline()
        pipe.zcount(f"{P}:deadlines", "-inf", now - 2)
        pipe.zrange(f"{P}:deadlines", 0, 0, withscores=True)
        pipe.hlen("unacked")
        for q in QUEUES:
            pipe.llen(q)
        pipe.zcard(f"{P}:timers")
        pipe.info("memory")
        overdue, first, held, *lengths, parked, memory = pipe.execute()
        proc = common.group_sample(self.groups)
        final = sum(counts[s] for s in ("STORED", "FAILED", "REJECTED", "CANCELED", "EXPIRED"))
        return Sample(
            t=now,
            in_flight=counts["SUBMITTED"],
            queued=sum(counts.values()) - counts["SUBMITTED"] - final,
            overdue=int(overdue),
            max_overdue_s=max(0.0, now - first[0][1]) if first else 0.0,
            held=int(held),
            waiting=sum(int(n) for n in lengths),
            parked=int(parked),
            rss=proc.rss_bytes,
            pss=common.group_pss(self.groups),
            used_memory=int(memory["used_memory"]),
            worker_cpu_s=proc.cpu_s,
            redis_cpu_s=common.pid_sample(self.others["redis"]).cpu_s,
            emulator_cpu_s=common.pid_sample(self.others["emulator"]).cpu_s,
        )

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append(self.take())
            except redis.RedisError:
                continue

    def start(self) -> Sampler:
        self.samples.append(self.take())
        self._thread.start()
        return self

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)


# ----------------------------------------------------------------------------- lateness


def timelines(client: redis.Redis, ids: list[str], batch: int = 1000) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for i in range(0, len(ids), batch):
        pipe = client.pipeline()
        for job_id in ids[i : i + batch]:
            pipe.lrange(f"{P}:timeline:{job_id}", 0, -1)
        # as the store reads them: each move with its "from" (the line before's "to")
        out.extend(with_moves([json.loads(e) for e in events]) for events in pipe.execute())
    return out


def lateness(
    events_by_job: list[list[dict[str, Any]]], interval: float, since: float, until: float
) -> list[float]:
    """Actual minus due time of every poll made in [since, until)."""
    late: list[float] = []
    for events in events_by_job:
        for prev, event in itertools.pairwise(events):
            if "poll" not in event or not since <= event["at"] < until:
                continue
            # consecutive polls only: a run of polls that saw nothing new keeps its latest line
            if ("poll" in prev and event["poll"] == prev["poll"] + 1) or (
                event["poll"] == 1 and prev.get("to") == "SUBMITTED" and prev.get("from")
            ):
                late.append(event["at"] - (prev["at"] + interval))
    return late


def overdue_at(client: redis.Redis, until: float) -> list[float]:
    """Polls due before ``until`` that had not happened at ``until``: their lateness so far
    (jobs SUBMITTED with a deadline passed, however long ago it passed)."""
    due: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
        f"{P}:deadlines", "-inf", f"({until}", withscores=True
    )
    if not due:
        return []
    submitted = client.smismember(f"{P}:state:SUBMITTED", [member for member, _ in due])
    return [until - score for (_, score), ok in zip(due, submitted, strict=True) if ok]


# ----------------------------------------------------------------------------- memory


_FAMILY = re.compile(r"[0-9a-f]{8}-[0-9a-f-]{27}|fly-\d+|\d{6,}")


def family(key: str) -> str:
    """A key with its ids blanked: ``animate-queue:job:fly-000001`` -> ``animate-queue:job:*``."""
    return _FAMILY.sub("*", key)


def memory_by_family(client: redis.Redis, batch: int = 2000) -> dict[str, tuple[int, int]]:
    """Every key's ``MEMORY USAGE`` (all elements counted), summed by family: (keys, bytes)."""
    totals: dict[str, tuple[int, int]] = {}
    keys: list[str] = []

    def flush() -> None:
        pipe = client.pipeline()
        for key in keys:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(keys, pipe.execute(), strict=True):
            name = family(key)
            count, size = totals.get(name, (0, 0))
            totals[name] = (count + 1, size + int(used or 0))
        keys.clear()

    for raw in client.scan_iter(count=batch):
        keys.append(raw.decode())
        if len(keys) >= batch:
            flush()
    flush()
    return totals


def memory_split(by_family: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Bytes per unit: a job hash, a timeline, the store's indexes per job record (the parked
    wake-up in ``P:timers`` included). ``records`` adds them up; a job in flight has those, and
    a broker message only while one is queued or held for it (a wait up to
    ``COUNTDOWN_MAX_SECONDS``, or a step due now)."""
    records = max(1, by_family.get(f"{P}:job:*", (0, 0))[0])
    timelines = by_family.get(f"{P}:timeline:*", (0, 0))
    index_bytes = sum(
        size
        for name, (_, size) in by_family.items()
        if name.startswith(
            (f"{P}:state:", f"{P}:deadlines", f"{P}:remote-tasks", f"{P}:acct:", f"{P}:timers")
        )
    )
    split = {
        "job_hash": by_family.get(f"{P}:job:*", (0, 0))[1] / records,
        "timeline": timelines[1] / max(1, timelines[0]),
        "indexes": index_bytes / records,
    }
    split["records"] = sum(split.values())
    return split


def broker_bytes(client: redis.Redis, by_family: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(messages queued or held, their bytes)."""
    pipe = client.pipeline()
    for q in QUEUES:
        pipe.llen(q)
    pipe.hlen("unacked")
    messages = sum(int(n) for n in pipe.execute())
    size = sum(by_family.get(k, (0, 0))[1] for k in (*QUEUES, "unacked", "unacked_index"))
    return messages, size


def hash_encoding(client: redis.Redis, ids: list[str]) -> str:
    """How Redis stores a job hash (listpack is compact; hashtable takes about twice the room)."""
    raw = client.object("encoding", f"{P}:job:{ids[0]}") if ids else None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


# ----------------------------------------------------------------------------- the run


def inspect_workers(url: str, workers: int) -> dict[str, Any]:
    """Countdown messages each worker holds (``scheduled``), its reserved ones, prefetch count."""
    app = Celery("bench-inspect", broker=url)
    app.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
    try:
        inspect = app.control.inspect(timeout=10, limit=workers)
        scheduled: dict[str, Any] = inspect.scheduled() or {}
        reserved: dict[str, Any] = inspect.reserved() or {}
        stats: dict[str, Any] = inspect.stats() or {}
        return {
            name: {
                "scheduled": len(scheduled.get(name) or []),
                "reserved": len(reserved.get(name) or []),
                "prefetch_count": (stats.get(name) or {}).get("prefetch_count"),
            }
            for name in sorted(set(scheduled) | set(stats))
        }
    finally:
        app.close()


def at_count(samples: list[Sample], count: int) -> Sample | None:
    """The first sample with at least ``count`` jobs in flight."""
    return next((s for s in samples if s.in_flight >= count), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with RedisServer() as rs, common.emulator_child(emulator_config(args)) as emulator:
        client = redis.Redis.from_url(rs.url)
        template, image = common.seed_emulator(emulator.address)
        env = common.worker_env(rs.url, emulator.address, None, BUCKET, **worker_settings(args))
        workers = common.design_workers(env, args.workers, args.concurrency, "inflight")
        common.start_all(workers)
        queue = AnimateQueue(rs.url)
        assert rs.proc is not None and emulator.proc is not None
        sampler = Sampler(rs.url, workers, {"redis": rs.proc.pid, "emulator": emulator.proc.pid})
        profiler = common.Profiler(workers, args.profile, idle=args.idle) if args.profile else None
        try:
            client.memory_purge()
            base = common.redis_snapshot(client)
            info0 = client.info("memory")
            cpu0 = common.group_sample(common.pgids(workers)).cpu_s
            sampler.start()
            if profiler is not None:
                profiler.start()
            started = time.time()
            ids = [
                queue.generate(image, template_id=template, detect=False, job_id=f"fly-{i:06d}")
                for i in range(args.jobs)
            ]
            enqueued = time.time() - started
            ramp_deadline = started + args.ramp_budget
            while time.time() < ramp_deadline:
                if sampler.samples[-1].in_flight >= args.jobs:
                    break
                time.sleep(0.5)
            ramp_end = time.time()
            cpu_ramp = common.group_sample(common.pgids(workers)).cpu_s
            offsets = common.log_offsets(workers)
            window_end = ramp_end + args.window
            time.sleep(max(0.0, window_end - time.time()))
            cpu_window = common.group_sample(common.pgids(workers)).cpu_s
            window_messages = common.received_by_task(workers, offsets)
            if profiler is not None:
                profiler.stop()
            end = sampler.take()
            overdue = overdue_at(client, window_end)
            held = inspect_workers(rs.url, len(workers))
            per_process = {w.name: common.rss_by_process(w.proc.pid) for w in workers if w.proc}
            client.memory_purge()
            memory = common.redis_snapshot(client)
            info1 = client.info("memory")
            by_family = memory_by_family(client)
            messages, message_bytes = broker_bytes(client, by_family)
            encoding = hash_encoding(client, ids)
            events = timelines(client, ids)
            counts = common.job_counts(client)
        finally:
            sampler.stop()
            queue.close()
            common.kill_all(workers)  # their held countdowns die with this Redis anyway
    samples = sampler.samples
    in_flight = end.in_flight
    reached = max(s.in_flight for s in samples)
    ramp_s = next((s.t for s in samples if s.in_flight >= args.jobs), ramp_end) - started
    window = lateness(events, args.interval, ramp_end, window_end) + overdue
    ramp = lateness(events, args.interval, started, ramp_end)
    polls_in_window = len(window) - len(overdue)
    milestones = {
        str(count): (
            {
                "rss_mib": round(s.rss / MIB, 1),
                "pss_mib": round(s.pss / MIB, 1),
                "held": s.held,
            }
            if (s := at_count(samples, count))
            else None
        )
        for count in sorted({1000, 2000, 5000, 10_000, 20_000, args.jobs})
        if count <= args.jobs
    }
    split = {
        **memory_split(by_family),
        "broker_message": message_bytes / max(1, messages),
        "broker_per_job": message_bytes / max(1, in_flight + counts.get("QUEUED", 0)),
    }
    # Every job enqueued is in Redis: as its intake message, or as its record and its next
    # message. When the target is reached, they are all in flight.
    total_per_job = (memory.used_memory - base.used_memory) / max(1, args.jobs)
    return {
        "target": args.jobs,
        "jobs_in_flight": in_flight,
        "max_in_flight": reached,
        "reached_target": reached >= args.jobs,
        "states_at_end": dict(counts),
        "enqueue_s": enqueued,
        "ramp_s": ramp_s,
        "ramp_jobs_per_s": reached / max(1e-9, ramp_s),
        "interval_s": args.interval,
        "poll_rate_owed": in_flight / args.interval,
        "poll_rate_done": polls_in_window / args.window,
        "polls_in_window": polls_in_window,
        "overdue_at_window_end": len(overdue),
        "poll_lateness_p50_s": common.percentile(window, 50),
        "poll_lateness_p99_s": common.percentile(window, 99),
        "poll_lateness_max_s": max(window) if window else float("nan"),
        "ramp_polls": len(ramp),
        "ramp_lateness_p50_s": common.percentile(ramp, 50),
        "ramp_lateness_p99_s": common.percentile(ramp, 99),
        "worker_rss_mib": max(s.rss for s in samples) / MIB,
        "worker_pss_mib": max(s.pss for s in samples) / MIB,
        "worker_rss_start_mib": samples[0].rss / MIB,
        "rss_at": milestones,
        "workers_hold": held,
        "rss_by_process_mib": per_process,
        "held_messages_max": max(s.held for s in samples),
        "waiting_messages_end": end.waiting,
        "redis_bytes_per_job": total_per_job,
        "redis_split_per_job": split,
        "redis_keys_mib": round(sum(size for _, size in by_family.values()) / MIB, 1),
        "redis_memory_delta_mib": {
            name: round((int(info1.get(name, 0)) - int(info0.get(name, 0))) / MIB, 1)
            for name in MEMORY_FIELDS
        },
        "broker_messages_end": messages,
        "parked_end": end.parked,
        "redis_bytes_per_in_flight_job": split["records"] + split["broker_per_job"],
        "redis_keys_by_family": {
            name: {"keys": count, "bytes": size}
            for name, (count, size) in sorted(by_family.items(), key=lambda kv: -kv[1][1])[:12]
        },
        "job_hash_encoding": encoding,
        "redis_usec_per_job": common.top_usec(memory.minus(base), max(1, reached)),
        "redis_calls_per_job": common.top_commands(memory.minus(base), max(1, reached), 8),
        "worker_cpu_ramp_ms_per_job": (cpu_ramp - cpu0) * 1000 / max(1, reached),
        "window_received_by_task": dict(window_messages),
        "worker_cpu_window_ms_per_message": (cpu_window - cpu_ramp)
        * 1000
        / max(1, sum(window_messages.values())),
        "samples": samples,
        "profile": profiler.summary() if profiler is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="target in flight")
    parser.add_argument("--quick", action="store_true", help="200 jobs, 12 s polls: a smoke test")
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--concurrency", type=int, default=1, help="pool size of each worker")
    parser.add_argument("--interval", type=float, default=150, help="every POLL_* interval (s)")
    parser.add_argument(
        "--window",
        type=float,
        default=150,
        help="steady-state seconds (default: one poll interval)",
    )
    parser.add_argument(
        "--ramp-budget", type=float, default=420, help="seconds to get the jobs in flight"
    )
    parser.add_argument(
        "--remote-running", type=int, default=2000, help="tasks DashScope runs at once"
    )
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of the workers")
    parser.add_argument("--profile", type=Path, help="py-spy the workers into this directory")
    parser.add_argument("--idle", action="store_true", help="profile: count waiting too")
    args = parser.parse_args()
    if args.quick:
        # polls every 12 s: over COUNTDOWN_MAX_SECONDS (10), parked in the Redis timer as in
        # the full run
        args.jobs, args.interval, args.window, args.ramp_budget = 200, 12, 12, 60
        args.remote_running = min(args.remote_running, 100)
    args.remote_running = min(args.remote_running, args.jobs)
    r = run(args)

    samples = r.pop("samples")
    print(
        "\n  time      in_flight  queued  overdue>2s  max_overdue_s  held  waiting  parked  rss_MiB  "
        "redis_MiB  cpu: workers  redis  emulator"
    )
    step = max(1, len(samples) // 16)
    for prev, s in itertools.pairwise(samples[::step]):
        dt = max(1e-9, s.t - prev.t)
        print(
            f"  {time.strftime('%H:%M:%S', time.localtime(s.t)):<9} {s.in_flight:>9} "
            f"{s.queued:>7} {s.overdue:>11} {s.max_overdue_s:>14.1f} {s.held:>5} {s.waiting:>8} {s.parked:>7} "
            f"{s.rss / MIB:>8.0f} {s.used_memory / MIB:>10.1f} "
            f"{(s.worker_cpu_s - prev.worker_cpu_s) / dt:>13.2f} "
            f"{(s.redis_cpu_s - prev.redis_cpu_s) / dt:>6.2f} "
            f"{(s.emulator_cpu_s - prev.emulator_cpu_s) / dt:>9.2f}"
        )
    cut = "" if r["reached_target"] else "  (TARGET NOT REACHED within the ramp budget)"
    common.table(
        f"{args.jobs} jobs in flight: {args.workers} workers x {args.concurrency}, every poll "
        f"interval {args.interval:.0f} s, window {args.window:.0f} s",
        [
            ("in flight at the end / most", f"{r['jobs_in_flight']} / {r['max_in_flight']}{cut}"),
            (
                "ramp",
                f"{common.fmt(r['ramp_s'], ' s', 1)} "
                f"({common.fmt(r['ramp_jobs_per_s'], ' jobs/s', 1)}; "
                f"enqueue {common.fmt(r['enqueue_s'], ' s', 1)})",
            ),
            (
                "polls owed / made in the window",
                f"{r['poll_rate_owed']:.1f}/s / {r['poll_rate_done']:.1f}/s",
            ),
            (
                "poll lateness p50 / p99 / max",
                f"{common.fmt(r['poll_lateness_p50_s'], ' s')} / "
                f"{common.fmt(r['poll_lateness_p99_s'], ' s')} / "
                f"{common.fmt(r['poll_lateness_max_s'], ' s')}",
            ),
            (
                "  polls in the window (+ overdue)",
                f"{r['polls_in_window']} (+ {r['overdue_at_window_end']})",
            ),
            (
                "ramp poll lateness p50 / p99",
                f"{common.fmt(r['ramp_lateness_p50_s'], ' s')} / "
                f"{common.fmt(r['ramp_lateness_p99_s'], ' s')} "
                f"({r['ramp_polls']} polls)",
            ),
            (
                "worker RSS start / max",
                f"{common.fmt(r['worker_rss_start_mib'], ' MiB', 1)} / "
                f"{common.fmt(r['worker_rss_mib'], ' MiB', 1)} "
                f"(PSS max {common.fmt(r['worker_pss_mib'], ' MiB', 1)})",
            ),
            ("  at N in flight (first sample)", r["rss_at"]),
            ("  by process at the end", r["rss_by_process_mib"]),
            ("countdowns held by workers", r["workers_hold"]),
            (
                "  held (unacked) max / waiting at end",
                f"{r['held_messages_max']} / {r['waiting_messages_end']}",
            ),
            ("  parked in the Redis timer at end", r["parked_end"]),
            ("Redis bytes per job (total / enqueued)", common.fmt(r["redis_bytes_per_job"], "", 0)),
            (
                "  per job in flight (sum of parts)",
                common.fmt(r["redis_bytes_per_in_flight_job"], "", 0),
            ),
            ("  parts (bytes each)", {k: round(v) for k, v in r["redis_split_per_job"].items()}),
            ("  used_memory delta, by INFO field (MiB)", r["redis_memory_delta_mib"]),
            ("  MEMORY USAGE of every key (MiB)", r["redis_keys_mib"]),
            ("  job hash encoding", r["job_hash_encoding"]),
            (
                "  largest key families",
                {k: v["bytes"] for k, v in r["redis_keys_by_family"].items()},
            ),
            ("Redis time per job (us)", r["redis_usec_per_job"]),
            ("Redis calls per job", r["redis_calls_per_job"]),
            ("worker CPU per job (ramp)", common.fmt(r["worker_cpu_ramp_ms_per_job"], " ms")),
            ("messages received in the window", r["window_received_by_task"]),
            (
                "worker CPU per message (window)",
                common.fmt(r["worker_cpu_window_ms_per_message"], " ms"),
            ),
            ("job states at the end", r["states_at_end"]),
        ],
    )
    result = {
        "jobs_target": args.jobs,
        "jobs_in_flight": r["jobs_in_flight"],
        "reached_target": r["reached_target"],
        "poll_interval_s": args.interval,
        "poll_rate_owed_per_s": common.finite(r["poll_rate_owed"], 1),
        "poll_rate_done_per_s": common.finite(r["poll_rate_done"], 1),
        "poll_lateness_p50_s": common.finite(r["poll_lateness_p50_s"], 3),
        "poll_lateness_p99_s": common.finite(r["poll_lateness_p99_s"], 3),
        "ramp_lateness_p99_s": common.finite(r["ramp_lateness_p99_s"], 3),
        "ramp_s": common.finite(r["ramp_s"], 1),
        "worker_rss_mib": common.finite(r["worker_rss_mib"], 1),
        "worker_pss_mib": common.finite(r["worker_pss_mib"], 1),
        "rss_at": r["rss_at"],
        "workers_hold": r["workers_hold"],
        "held_messages_max": r["held_messages_max"],
        "parked_end": r["parked_end"],
        "redis_bytes_per_job": common.finite(r["redis_bytes_per_job"], 0),
        "redis_bytes_per_in_flight_job": common.finite(r["redis_bytes_per_in_flight_job"], 0),
        "redis_split_per_job": {k: round(v) for k, v in r["redis_split_per_job"].items()},
        "job_hash_encoding": r["job_hash_encoding"],
        "worker_cpu_ms_per_message": common.finite(r["worker_cpu_window_ms_per_message"], 2),
    }
    if r["profile"] is not None:
        common.table("py-spy: share of worker samples", list(r["profile"].items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
