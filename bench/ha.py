"""HA benchmark: jobs through a Redis failover and a network partition, on hosts made of namespaces.

    .venv/bin/python bench/ha.py [--jobs 240] [--cut-seconds 120]      (as root: it makes namespaces)

Hosts are Linux network namespaces on one bridge (devstack/netns.py; no traffic leaves the
machine): ``redis-a`` (the master), ``redis-b`` (its replica), ``sent-1..3`` (Sentinels),
``work-1`` and ``work-2`` (a Celery worker each) and ``ops`` (celery beat, the watchdog). The
DashScope emulator and S3 (moto) listen on the bridge's own address; the producer and this
script run there too. Every Redis client goes through the Sentinels (REDIS_SENTINELS).

While the jobs run, three faults, one after the other:

1. the Redis master is SIGKILLed; the Sentinels promote the replica and the run goes on;
2. ``work-1`` drops off the network (its link down) for ``--cut-seconds``, then comes back: its
   jobs move on elsewhere meanwhile, and its stale messages change nothing when it returns;
3. a Sentinel is restarted, and so is the old master (it rejoins as a replica).

It prints, per fault and in all: jobs, stored byte-exact, lost, double submissions, mismatches,
the pause in progress after each fault (the fault to the next job transition anywhere) and the
longest pause of the run. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from devstack import Beat, S3Server, Worker
from devstack.ha import RedisHA, wait_until
from devstack.netns import Network, unavailable
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from workers.adapters.redis.connection import RedisAddress
from workers.producer import AnimateQueue

API_KEY = "sk-ha-0000000000000001"
BUCKET = "ha-bench"
FINAL = {"STORED", "FAILED", "REJECTED", "CANCELED", "EXPIRED"}
HOSTS = ("redis-a", "redis-b", "sent-1", "sent-2", "sent-3", "work-1", "work-2", "ops")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=240)
    parser.add_argument("--generation-seconds", type=float, default=0.6)
    parser.add_argument("--accounts", type=int, default=2, help="DashScope accounts (lanes)")
    parser.add_argument("--kill-at", type=float, default=20.0, help="s after the first job")
    parser.add_argument("--cut-seconds", type=float, default=120.0)
    parser.add_argument("--settle-seconds", type=float, default=15.0, help="between faults")
    parser.add_argument("--down-after-ms", type=int, default=3000, help="Sentinel's")
    parser.add_argument("--deadline", type=float, default=900.0)
    parser.add_argument(
        "--spread", type=float, default=0.0,
        help="s over which the jobs are sent (default: until after the last fault)",
    )  # fmt: skip
    return parser.parse_args(argv)


class Faults:
    """The three faults, in a thread, each noted with its time."""

    def __init__(self, args: argparse.Namespace, net: Network, ha: RedisHA) -> None:
        self.args, self.net, self.ha = args, net, ha
        self.events: list[tuple[str, float]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.done = threading.Event()

    def note(self, what: str) -> None:
        self.events.append((what, time.time()))
        print(f"ha: {what}", flush=True)

    def _run(self) -> None:
        try:
            self._faults()
        except BaseException as exc:  # reported by the run, not lost in a thread
            self.error = exc
        finally:
            self.done.set()

    def _faults(self) -> None:
        a = self.args
        time.sleep(a.kill_at)
        old = self.ha.current_master()
        old.kill()
        self.note("master SIGKILLed")
        new = self.ha.wait_for_failover(old, timeout=120)
        self.note(f"replica promoted ({new.place.host})")
        time.sleep(a.settle_seconds)
        self.net.cut("work-1")
        self.note("work-1 cut off")
        time.sleep(a.cut_seconds)
        self.net.restore("work-1")
        self.note("work-1 back")
        time.sleep(a.settle_seconds)
        sentinel = self.ha.sentinels[0]
        sentinel.stop()
        sentinel.start()
        self.note("sentinel restarted")
        old.start()  # it comes back as a master; the Sentinels turn it into a replica
        self.note("old master restarted")
        wait_until(lambda: old.role() == "slave", "the old master to rejoin as a replica", 60)
        wait_until(self.ha.replicas_in_sync, "the old master in sync", 60)
        self.note("old master rejoined as a replica")


def worker_env(
    ha: RedisHA, emulator: EmulatorServer, s3: S3Server, accounts: dict[str, str]
) -> dict[str, str]:
    return {
        "REDIS_URL": ha.url(),
        "REDIS_SENTINELS": ha.sentinel_setting(),
        "REDIS_SENTINEL_PASSWORD": ha.sentinel_password or "",
        "DASHSCOPE_ACCOUNTS": json.dumps(accounts),
        "DASHSCOPE_DEFAULT_ACCOUNT": "a0",
        "DASHSCOPE_BASE_URL": emulator.base_url,
        "DASHSCOPE_READ_TIMEOUT": "5",
        "DASHSCOPE_CONNECT_TIMEOUT": "3",
        "S3_BUCKET": BUCKET,
        "AWS_ENDPOINT_URL": s3.endpoint,
        "URL_ALLOWLIST": emulator.host,
        **S3Server.CREDENTIALS,
        "POLL_FIRST_SECONDS": "0.3",
        "POLL_RUNNING_SECONDS": "0.3",
        "POLL_PENDING_SECONDS": "1",
        "POLL_PENDING_MAX_SECONDS": "3",
        "POLL_ERROR_BACKOFF_MAX": "3",
        "SUBMIT_BACKOFF_BASE": "0.5",
        "SUBMIT_BACKOFF_MAX": "5",
        "SUBMIT_LIST_LAG_SECONDS": "3",
        "COPY_BACKOFF_BASE": "1",
        "COPY_BACKOFF_MAX": "10",
        "COPY_LEASE_SECONDS": "5",
        "WATCHDOG_INTERVAL_SECONDS": "2",
        "WATCHDOG_GRACE_SECONDS": "5",
        "WATCHDOG_MAX_RESUMES": "20",
        "STEP_MARGIN_SECONDS": "3",
    }


def retrying(call: Callable[[], Any], seconds: float = 60.0) -> Any:
    """``call()``, again on any error for up to ``seconds`` (the driver lives through the faults
    as a producer would)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def produce(queue: AnimateQueue, ids: list[str], owner: dict[str, str],
            templates: dict[str, str], image: str, spread: float) -> None:  # fmt: skip
    """Send the jobs evenly over ``spread`` seconds, each until it is confirmed (same id)."""
    start = time.monotonic()
    for n, job_id in enumerate(ids):
        time.sleep(max(0.0, start + n * spread / len(ids) - time.monotonic()))
        account = owner[job_id]
        retrying(
            lambda j=job_id, a=account: queue.submit(image, templates[a], job_id=j, account=a),
            seconds=120,
        )


def progress_times(queue: AnimateQueue, ids: list[str]) -> list[float]:
    """When any job moved (every transition of every job, from their timelines), sorted."""
    times: list[float] = []
    for job_id in ids:
        times += [float(e["at"]) for e in retrying(lambda j=job_id: queue.store.timeline(j))]
    return sorted(times)


def pauses(times: list[float], events: list[tuple[str, float]], end: float) -> dict[str, Any]:
    """Per fault, the fault to the next transition anywhere; and the longest gap of the run."""
    after = {}
    for what, at in events:
        later = [t for t in times if t > at]
        after[what] = round(later[0] - at, 2) if later else None
    inside = [t for t in times if t <= end]
    gaps = [(b - a, a) for a, b in itertools.pairwise(inside)]
    longest, at = max(gaps) if gaps else (0.0, 0.0)
    return {"resumed_after_s": after, "longest_pause_s": round(longest, 2), "longest_pause_at": at}


def during(times: list[float], events: list[tuple[str, float]], first: str, last: str) -> int:
    """Job transitions anywhere between two faults (the fleet went on meanwhile)."""
    at = dict(events)
    if first not in at or last not in at:
        return 0
    return sum(1 for t in times if at[first] < t < at[last])


def verify(http: httpx.Client, s3: S3Server, views: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """(stored byte-exact, mismatches): each stored object against what the emulator served."""
    http.put("/_emulator/faults", json={"rates": {}, "task_fail_rate": 0}).raise_for_status()
    http.patch("/_emulator/config", json={"query_rate": 0}).raise_for_status()
    client = s3.client()
    exact = mismatches = 0
    for view in views.values():
        if view.get("state") != "STORED":
            continue
        body = client.get_object(Bucket=BUCKET, Key=view["s3_key"])["Body"].read()
        task = http.get(
            f"/api/v1/tasks/{view['remote_task_id']}",
            headers={"Authorization": f"Bearer {view['_api_key']}"},
        ).json()
        served = http.get(task["output"]["video_url"]).content
        if body == served and hashlib.sha256(body).hexdigest() == view["sha256"]:
            exact += 1
        else:
            mismatches += 1
    return exact, mismatches


def run(args: argparse.Namespace) -> dict[str, Any]:
    reason = unavailable()
    if reason is not None:
        raise SystemExit(f"bench/ha.py needs network namespaces: {reason}")
    accounts = {f"a{i}": f"{API_KEY[:-2]}{i:02d}" for i in range(args.accounts)}
    config = EmulatorConfig(
        preprocess_seconds=0.05,
        generation_seconds=max(args.generation_seconds - 0.1, 0.05),
        postprocess_seconds=0.05,
        video_short_side=144,
    )
    workers: list[Worker] = []
    beat: Beat | None = None
    with Network() as net:
        places = {name: net.add_host(name) for name in HOSTS}
        ha = RedisHA(
            master=places["redis-a"],
            replicas=[places["redis-b"]],
            sentinels=[places["sent-1"], places["sent-2"], places["sent-3"]],
            password="ha-redis-pw",
            sentinel_password="ha-sentinel-pw",
            down_after_ms=args.down_after_ms,
            port=6379,
            sentinel_port=26379,
        )
        try:
            with (
                S3Server(host=net.gateway.host) as s3,
                EmulatorServer(config, host=net.gateway.host) as emulator,
            ):
                ha.start()
                return _run_jobs(args, net, ha, s3, emulator, accounts, places, workers, beat)
        finally:
            for w in workers:
                w.kill()
            ha.stop()


def _run_jobs(args: argparse.Namespace, net: Network, ha: RedisHA, s3: S3Server,
              emulator: EmulatorServer, accounts: dict[str, str], places: dict[str, Any],
              workers: list[Worker], beat: Beat | None) -> dict[str, Any]:  # fmt: skip
    s3.create_bucket(BUCKET)
    http = httpx.Client(base_url=emulator.url, timeout=10)
    templates = {
        name: http.post("/_emulator/templates", json={"api_key": key, "seconds": 2}).json()[
            "template_id"
        ]
        for name, key in accounts.items()
    }
    image = f"{emulator.url}/_emulator/samples/person.png?width=256&height=512"
    env = worker_env(ha, emulator, s3, accounts)
    for i, host in enumerate(("work-1", "work-2")):
        workers.append(
            Worker(env, concurrency=3, name=f"ha{i + 1}@%h", netns=places[host].netns).start()
        )
    beat = Beat(env, netns=places["ops"].netns).start()
    address = RedisAddress(
        ha.url(),
        tuple(s.address for s in ha.sentinels),
        sentinel_password=ha.sentinel_password,
    )
    # The producer waits for the replica as a worker does (REDIS_WAIT_REPLICAS): a job sent in
    # the failover's last milliseconds is either confirmed or sent again with its id.
    queue = AnimateQueue(ha.url(), address=address, wait_replicas=1)
    ids = [f"ha-{i:04d}" for i in range(args.jobs)]
    owner = {job_id: f"a{i % len(accounts)}" for i, job_id in enumerate(ids)}
    spread = args.spread or args.kill_at + 2 * args.settle_seconds + args.cut_seconds + 12
    started = time.time()
    faults = Faults(args, net, ha)
    faults.thread.start()
    producer = threading.Thread(
        target=produce, args=(queue, ids, owner, templates, image, spread), daemon=True
    )
    producer.start()
    views: dict[str, dict[str, Any]] = {}
    limit = time.time() + args.deadline
    while time.time() < limit:
        try:
            for job_id in ids:
                if views.get(job_id, {}).get("state") not in FINAL:
                    view = queue.get(job_id)
                    if view:
                        views[job_id] = view
        except Exception:
            time.sleep(0.5)
            continue
        if faults.done.is_set() and all(views.get(j, {}).get("state") in FINAL for j in ids):
            break
        time.sleep(1)
    finished = time.time()
    producer.join(30)
    faults.done.wait(60)
    if faults.error is not None:
        raise RuntimeError(f"a fault could not be staged: {faults.error!r}")
    beat.stop()
    for w in workers:
        w.stop(30)

    by_state: dict[str, int] = {}
    for job_id in ids:
        state = views.get(job_id, {}).get("state", "MISSING")
        by_state[state] = by_state.get(state, 0) + 1
    lost = sum(views.get(j, {}).get("state") not in FINAL for j in ids)
    totals = http.get("/_emulator/stats").json()["totals"]
    task_ids = [v["remote_task_id"] for v in views.values() if v.get("remote_task_id")]
    shared = len(task_ids) - len(set(task_ids))
    double = int(totals.get("submitted", 0)) - len(set(task_ids)) + shared
    for job_id, view in views.items():
        view["_api_key"] = accounts[owner[job_id]]
    exact, mismatches = verify(http, s3, views)
    times = progress_times(queue, ids)
    cut_log = workers[0].log()
    back = next((at for what, at in faults.events if what == "work-1 back"), None)
    stale = len(re.findall(r"stale message", cut_log))
    result = {
        "jobs": args.jobs,
        "stored": by_state.get("STORED", 0),
        "stored_byte_exact": exact,
        "by_state": by_state,
        "lost": lost,
        "double_submissions": double,
        "shared_remote_tasks": shared,
        "mismatches": mismatches,
        "remote_submissions": int(totals.get("submitted", 0)),
        **pauses(times, faults.events, finished),
        "stale_messages_ignored_on_work_1": stale,
        "intake_messages_sent_again": sum(
            w.log().count("its intake message was lost") for w in workers
        ),
        "transitions_while_work_1_cut": during(
            times, faults.events, "work-1 cut off", "work-1 back"
        ),
        "work_1_back_at": back,
        # each process says it moved to the new master (workers: our clients and kombu's)
        "logged_the_move": {
            **{f"work-{i + 1}": "moved from" in w.log() for i, w in enumerate(workers)},
            "beat": "moved from" in beat.log(),
        },
        "makespan_s": round(finished - started, 1),
        "faults": [(what, round(at - started, 1)) for what, at in faults.events],
    }
    queue.close()
    http.close()
    return result


def main() -> None:
    # SIGTERM (a timeout, Ctrl-C's cousin) unwinds like an exception, so the namespaces, the
    # Redis nodes and the workers are removed instead of left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench/ha.py: terminated"))
    result = run(parse())
    for name in ("jobs", "stored", "stored_byte_exact", "lost", "double_submissions",
                 "mismatches", "resumed_after_s", "longest_pause_s", "makespan_s"):  # fmt: skip
        print(f"{name:>22}: {result[name]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
