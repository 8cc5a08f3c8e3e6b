"""Copy benchmark: speed and memory of S3Copier against the limits of the same machine.

    .venv/bin/python bench/copy_speed.py               # a 1 GiB video, 3 rounds (5-7 minutes on 2 cores)
    .venv/bin/python bench/copy_speed.py --quick       # 16 MiB, every step once (the CI smoke test)
    .venv/bin/python bench/copy_speed.py --mb 256 --repeat 1 --sweep 8x3x3,16x2x2
    .venv/bin/python bench/copy_speed.py --copy-env MALLOC_MMAP_THRESHOLD_=1048576   # allocator trials

The DashScope emulator (``python -m emulator --video-pad-mb N``) and moto's S3 server
(``python -m moto.server``, its objects spooled to /dev/shm when that fits) run as separate
processes, and every measurement runs in a fresh child process, so each memory figure is that of
the process doing the transfer and nothing else. In one run, on the same bytes (one padded
emulator video of ``--mb`` MiB) and the same S3 server:

1. ``download``: the signed URL streamed by httpx (``iter_raw``, as the copier does) to
   /dev/null, three times, median;
2. ``upload_file``: the same bytes (downloaded to a local file first) uploaded by
   ``boto3 upload_file`` with the copier's TransferConfig (part size, concurrency, classic
   client) and with boto3's default TransferConfig;
3. ``copy``: ``S3Copier.copy`` with the default settings (8 MiB parts, concurrency 4, 2 parts in
   memory): total time (GET, managed upload, HEAD, the ``put_object_tagging`` that records the
   SHA-256; a server without tagging gets a ``copy_object`` stamp instead, and it is timed too),
   its phases (client methods timed), CPU seconds, and the peak RSS growth of its process;
4. ``copy, no sha256``: the same with ``hashlib.sha256`` replaced by a no-op inside
   ``workers.adapters.s3.storage`` (a benchmark-only monkeypatch: the copier has no switch), and
   ``sha256 alone``: the time ``hashlib.sha256`` takes over the same bytes in 1 MiB chunks;
5. the sweep: the copy again for each ``PARTxCONCURRENCYxIN_MEMORY`` of ``--sweep`` (MiB, threads,
   ``max_in_memory_chunks``), the measured growth beside the bound ``(in_memory + 1) x part +
   1 MiB``: s3transfer's ``TaskSemaphore`` lets ``max_in_memory_upload_chunks`` parts be submitted
   (so at most ``min(concurrency, in_memory)`` part uploads run at once) while its submission
   thread holds one more part read ahead, and the BufferedReader holds 1 MiB.

The transfers into S3 run ``--repeat`` rounds (default 3), interleaved so that drift (moto, other
load on the machine) spreads evenly; rates and times are medians, memory the maximum. No new round
starts if it would end after ``--budget`` seconds (default 480), so a loaded machine still
finishes in under 10 minutes; the JSON says how many rounds ran, and the load average.

Figures: sizes and rates are in MiB (2^20 bytes), so "MB/s" means MiB/s.
``limit_mb_s = min(download, best upload_file)``; ``throughput_ratio = copy / limit`` (the copy's
whole time, the hash's recording included; ``copy_upload_phase_mb_s`` is its managed upload alone).
``peak_rss_growth_mib`` is the copy process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``, cross-checked by a 10 ms ``VmRSS`` sampler) minus its RSS once its
clients exist, before any transfer (so one-time set-up such as botocore's lazily loaded models
counts); a warm figure, after a 16 MiB copy in the same process, is printed beside it.
``sha256_overhead`` is the hashing time over the copy time without recording it (an upper bound:
``update`` releases the GIL on large chunks and overlaps the upload threads); the A/B difference of
``copy`` and ``copy, no sha256`` and the recording's share are printed beside it.

Targets (from the issue): ratio >= 0.8, peak RSS growth <= 64 MiB, SHA-256 overhead <= 10 %.
The size falls back (halving) when the disk or the RAM cannot hold it (moto's RSS peaks near
6 x size, its spool near 3 x size; the local file is 1 x size); it says so.
It prints a table, asserts nothing, and its last line is one JSON object.
"""

from __future__ import annotations

import os
import sys

# Run as a script, bench/ is on sys.path; the repository root must be there too.
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

MiB = 1024 * 1024
BUCKET = "bench-copy"
REGION = "us-east-1"
API_KEY = "sk-bench-copy-0001"
WARM_MIB = 16  # the warm-up copy before the measured one (same process)
DEFAULT_SWEEP = "8x2x2,8x4x4,16x4x2,32x2x2"
QUICK_SWEEP = "16x2x2"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


# ---------------------------------------------------------------------------------- memory


def _status_kib(field: str, pid: int | str = "self") -> int:
    """One ``VmRSS``/``VmHWM`` figure of ``/proc/<pid>/status``, in KiB (0 if unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Memory:
    """This process's RSS: a baseline, a resettable kernel peak, and a 10 ms sampler."""

    def __init__(self) -> None:
        self.baseline = _status_kib("VmRSS")
        self.sampled_peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hwm_reset = self.reset_peak()

    @staticmethod
    def rss() -> int:
        return _status_kib("VmRSS")

    @staticmethod
    def reset_peak() -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is refused."""
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            return True
        except OSError:
            return False

    def peak(self) -> int:
        """The highest RSS since the last reset, in KiB (kernel figure and sampler agree or the
        larger wins)."""
        return max(_status_kib("VmHWM") if self.hwm_reset else 0, self.sampled_peak)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        def run() -> None:
            while not self._stop.wait(0.01):
                self.sampled_peak = max(self.sampled_peak, _status_kib("VmRSS"))

        self._stop.clear()
        self._thread = threading.Thread(target=run, name="rss-sampler", daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()
            self.sampled_peak = max(self.sampled_peak, _status_kib("VmRSS"))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            return " ".join(loadavg.read().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------- children
# Each measurement is one ``bench/copy_speed.py --child SPEC`` process; its last stdout line is JSON.


def _transfer_config(part: int, concurrency: int, in_memory: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(
        multipart_threshold=part * MiB,
        multipart_chunksize=part * MiB,
        max_concurrency=concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )
    config.max_in_memory_upload_chunks = in_memory
    return config


def _timed_methods(obj: Any, names: tuple[str, ...]) -> dict[str, float]:
    """Wrap ``obj``'s methods so that their cumulated wall time lands in the returned dict."""
    spent = dict.fromkeys(names, 0.0)

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return timed

    for name in names:
        setattr(obj, name, wrap(name, getattr(obj, name)))
    return spent


class _NoHash:
    """Stands in for ``hashlib.sha256()`` (single PUT) and the resumable SHA-256 (multipart) in
    the ``copy-nosha`` run."""

    def update(self, data: object, /) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 64

    def finalize(self) -> str:
        return "0" * 64


class _NoHashlib:
    @staticmethod
    def sha256() -> _NoHash:
        return _NoHash()


def child_download(spec: dict[str, Any]) -> dict[str, Any]:
    import httpx

    memory = Memory()
    count = 0
    with (
        httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0)) as http,
        open(spec["dest"], "wb") as out,
        memory.sampling(),
    ):
        start, cpu = time.perf_counter(), time.process_time()
        with http.stream("GET", spec["url"], headers={"Accept-Encoding": "identity"}) as response:
            response.raise_for_status()
            for chunk in response.iter_raw():
                out.write(chunk)
                count += len(chunk)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "bytes": count,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "growth_kib": memory.peak() - memory.baseline,
    }


def child_hash(spec: dict[str, Any]) -> dict[str, Any]:
    sha = hashlib.sha256()
    spent = 0.0
    with open(spec["path"], "rb", buffering=0) as source:
        buffer = bytearray(MiB)
        view = memoryview(buffer)
        while n := source.readinto(buffer):
            start = time.perf_counter()
            sha.update(view[:n])
            spent += time.perf_counter() - start
    return {"seconds": spent, "sha256": sha.hexdigest()}


def child_upload_file(spec: dict[str, Any]) -> dict[str, Any]:
    from boto3.s3.transfer import TransferConfig

    from workers.adapters.s3.storage import make_s3_client

    s3: Any = make_s3_client(endpoint_url=spec["endpoint"], region=REGION)
    config = _transfer_config(*spec["config"]) if spec["config"] else TransferConfig()
    memory = Memory()
    with memory.sampling():
        start, cpu = time.perf_counter(), time.process_time()
        s3.upload_file(spec["path"], spec["bucket"], spec["key"], Config=config)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    size = int(s3.head_object(Bucket=spec["bucket"], Key=spec["key"])["ContentLength"])
    return {
        "bytes": size,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "growth_kib": memory.peak() - memory.baseline,
    }


def child_copy(spec: dict[str, Any]) -> dict[str, Any]:
    import httpx

    from workers.adapters.s3 import storage as storage
    from workers.adapters.s3.storage import S3Copier, make_s3_client

    if not spec["sha"]:
        storage.hashlib = _NoHashlib()  # type: ignore[assignment]
        storage.new_hash = _NoHash  # type: ignore[assignment]
        storage.hash_state = lambda hasher: ""  # type: ignore[assignment]
    s3: Any = make_s3_client(endpoint_url=spec["endpoint"], region=REGION)
    http = httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0), follow_redirects=True)
    part, concurrency, in_memory = spec["config"]
    copier = S3Copier(
        s3,
        http,
        bucket=spec["bucket"],
        part_size=part * MiB,
        max_concurrency=concurrency,
        max_in_memory_chunks=in_memory,
    )
    spent = _timed_methods(s3, ("head_object", "put_object_tagging", "copy_object"))
    memory = Memory()  # baseline: clients built, nothing transferred yet
    cold_peak = 0
    if spec.get("warm_url"):
        with memory.sampling():
            copier.copy(spec["warm_url"], spec["key"] + ".warm", metadata={"job-id": "warm"})
        s3.delete_object(Bucket=spec["bucket"], Key=spec["key"] + ".warm")
        cold_peak = memory.peak()
    for name in spent:
        spent[name] = 0.0
    warm_base = memory.rss()
    memory.sampled_peak = 0
    memory.reset_peak()
    with memory.sampling():
        start, cpu = time.perf_counter(), time.process_time()
        stored = copier.copy(spec["url"], spec["key"], metadata={"job-id": "bench"})
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = memory.peak()
    http.close()
    return {
        "bytes": stored.size,
        "sha256": stored.sha256,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        # the streaming part: download, hash and upload overlap (parts go up in threads)
        "upload_seconds": elapsed
        - spent["head_object"]
        - spent["put_object_tagging"]
        - spent["copy_object"],
        "head_seconds": spent["head_object"],
        "record_seconds": spent["put_object_tagging"] + spent["copy_object"],
        "stamped": spent["copy_object"] > 0,
        "growth_kib": max(peak, cold_peak) - memory.baseline,
        "warm_growth_kib": peak - warm_base,
        "hwm_reset": memory.hwm_reset,
    }


CHILDREN = {
    "download": child_download,
    "hash": child_hash,
    "upload_file": child_upload_file,
    "copy": child_copy,
}


def child_main(spec_text: str) -> None:
    for name, value in CREDENTIALS.items():
        os.environ.setdefault(name, value)
    spec = json.loads(spec_text)
    result = CHILDREN[spec["mode"]](spec)
    print(json.dumps(result), flush=True)


def run_child(
    spec: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 900
) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        cwd=_ROOT,
        env={**os.environ, **CREDENTIALS, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['mode']} child failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# ---------------------------------------------------------------------------------- services


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_emulator(pad_mib: int, tmp: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m emulator`` on a free port, every video padded to ``pad_mib`` MiB."""
    args = [sys.executable, "-m", "emulator", "--port", "0", "--video-pad-mb", str(pad_mib),
            "--video-short-side", "144", "--preprocess-seconds", "0.1",
            "--generation-seconds", "0.3", "--postprocess-seconds", "0.1",
            "--template-seconds", "0.3", "--submit-rate", "0", "--query-rate", "0"]  # fmt: skip
    proc = subprocess.Popen(
        args,
        cwd=_ROOT,
        env={**os.environ, "TMPDIR": tmp, "PYTHONPATH": _ROOT},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            found = re.search(r"listening on (http://\S+)", line)
            if found:
                return proc, found.group(1)
        if proc.poll() is not None:
            break
    _stop(proc)
    raise RuntimeError("the emulator did not start")


def start_moto(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m moto.server`` on a free port (its spooled objects go to ``tmp``)."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "TMPDIR": tmp},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(endpoint, timeout=2)
            return proc, endpoint
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    _stop(proc)
    raise RuntimeError("moto's S3 server did not start")


def finished_video_url(base: str) -> str:
    """Seed a template, run one generation to SUCCEEDED, return its signed ``video_url``."""
    import httpx

    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=base, timeout=60) as client:
        seeded = client.post("/_emulator/templates", json={"api_key": API_KEY, "seconds": 2})
        template_id = seeded.raise_for_status().json()["template_id"]
        submitted = client.post(
            "/api/v1/services/aigc/image2video/video-synthesis",
            headers={**auth, "X-DashScope-Async": "enable"},
            json={
                "model": "animate-anyone-gen2",
                "input": {
                    "image_url": f"{base}/_emulator/samples/person.png",
                    "template_id": template_id,
                },
                "parameters": {},
            },
        )
        task_id = submitted.raise_for_status().json()["output"]["task_id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            output = client.get(f"/api/v1/tasks/{task_id}", headers=auth).json()["output"]
            if output["task_status"] == "SUCCEEDED":
                url = str(output["video_url"])
                # render and pad the file now, so that no measurement includes it
                client.get(url, headers={"Range": "bytes=0-0"}, timeout=600).raise_for_status()
                return url
            if output["task_status"] in ("FAILED", "CANCELED", "UNKNOWN"):
                raise RuntimeError(f"task {task_id} ended {output['task_status']}")
            time.sleep(0.1)
    raise TimeoutError(f"task {task_id} did not succeed")


def host_warm_file(base: str, mib: int) -> str:
    import httpx

    data = os.urandom(mib * MiB)
    answer = httpx.put(f"{base}/_emulator/files/warm.bin", content=data, timeout=60)
    return str(answer.raise_for_status().json()["url"])


# ---------------------------------------------------------------------------------- sizing


def _meminfo_kib(field: str) -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fit_size(wanted: int, tmp: str, spool: str) -> tuple[int, str, str | None]:
    """The largest size <= ``wanted`` MiB (halving) that the disk and the RAM can hold, and where
    moto spools its objects: "memory" (/dev/shm) or "disk" (``tmp``).

    moto keeps every object in a spooled temporary file and assembles a multipart object (and, on a
    server without tagging, the stamping copy) in memory: its RSS peaks near 6 x size, its spool near
    3 x size.
    """
    free_disk = shutil.disk_usage(tmp).free // MiB
    free_shm = shutil.disk_usage("/dev/shm").free // MiB if os.path.isdir("/dev/shm") else 0
    free_ram = _meminfo_kib("MemAvailable") // 1024 or 1 << 30
    size = wanted
    while True:
        in_memory = spool == "memory" or (
            spool == "auto" and 3 * size + 512 <= free_shm and 9 * size + 1024 <= free_ram
        )
        ram_need = 6 * size + 1024 + (3 * size if in_memory else 0)
        disk_need = size + 512 + (0 if in_memory else 3 * size)
        if size <= 16 or (ram_need <= free_ram and disk_need <= free_disk):
            break
        size //= 2
    where = "memory" if in_memory else "disk"
    if size == wanted:
        return size, where, None
    return (
        size,
        where,
        (
            f"--mb {wanted} does not fit (disk {free_disk} MiB free, RAM {free_ram} MiB available; "
            f"moto needs ~6 x size of RAM and ~3 x size of spool, the local file 1 x size): "
            f"ran at {size} MiB"
        ),
    )


def parse_sweep(text: str) -> list[tuple[int, int, int]]:
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        numbers = tuple(int(n) for n in item.lower().split("x"))
        if len(numbers) != 3 or numbers[0] < 5 or min(numbers) < 1:
            raise argparse.ArgumentTypeError(
                f"bad sweep entry {item!r}: PARTxCONCURRENCYxIN_MEMORY"
            )
        configs.append((numbers[0], numbers[1], numbers[2]))
    return configs


# ---------------------------------------------------------------------------------- main


@dataclass
class Row:
    name: str
    config: str
    mib_s: float
    seconds: float
    growth_mib: float | None = None
    warm_mib: float | None = None
    bound_mib: float | None = None
    cpu: float | None = None
    moto_cpu: float | None = None
    note: str = ""


def _mib_s(result: dict[str, Any]) -> float:
    return float(result["bytes"]) / MiB / max(float(result["seconds"]), 1e-9)


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    header = ("run", "part x conc x mem", "MiB/s", "s", "cpu s", "moto cpu s", "RSS growth",
              "warm", "bound", "note")  # fmt: skip
    table = [header] + [
        (
            r.name,
            r.config,
            _fmt(r.mib_s),
            _fmt(r.seconds, ".2f"),
            _fmt(r.cpu, ".2f"),
            _fmt(r.moto_cpu, ".2f"),
            _fmt(r.growth_mib),
            _fmt(r.warm_mib),
            _fmt(r.bound_mib, ".0f"),
            r.note,
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    for i, line in enumerate(table):
        print("  ".join(str(cell).ljust(widths[j]) for j, cell in enumerate(line)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


@dataclass
class Case:
    """One measured transfer into S3, run ``--repeat`` times (interleaved with the others)."""

    name: str
    mode: str  # "upload_file" or "copy"
    config: tuple[int, int, int] | None  # None: boto3's default TransferConfig
    sha: bool = True
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "8x10 (default)" if self.config is None else "x".join(map(str, self.config))

    @property
    def key(self) -> str:
        return f"bench/{self.mode}-{self.label.split()[0]}-{'sha' if self.sha else 'nosha'}.mp4"

    def median(self, name: str) -> float:
        return float(statistics.median(float(r[name]) for r in self.results))

    def mib_s(self) -> float:
        return float(statistics.median(_mib_s(r) for r in self.results))

    def peak_mib(self, name: str = "growth_kib") -> float:
        return max(float(r[name]) for r in self.results) / 1024

    def spread(self) -> str:
        return "/".join(f"{_mib_s(r):.0f}" for r in self.results)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="video size in MiB (default 1024)")
    parser.add_argument("--quick", action="store_true", help="16 MiB, one run of each, one sweep")
    parser.add_argument(
        "--sweep",
        type=parse_sweep,
        help=f"PARTxCONCURRENCYxIN_MEMORY list (default {DEFAULT_SWEEP}; --quick {QUICK_SWEEP})",
    )
    parser.add_argument(
        "--repeat", type=int, help="runs of each S3 transfer, interleaved (default 3; --quick 1)"
    )
    parser.add_argument(
        "--spool",
        choices=("auto", "memory", "disk"),
        default="auto",
        help="where moto keeps objects: /dev/shm (auto when it fits) or a temporary directory",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=480,
        help="seconds: no new round of S3 transfers starts if it would end later (default 480)",
    )
    parser.add_argument(
        "--copy-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the copy processes only (e.g. MALLOC_ARENA_MAX=2; repeatable)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return 0
    wanted = 16 if args.quick else args.mb
    repeat = max(1, args.repeat or (1 if args.quick else 3))
    sweep = args.sweep or parse_sweep(QUICK_SWEEP if args.quick else DEFAULT_SWEEP)
    child_env = dict(item.partition("=")[::2] for item in args.copy_env)
    default = (8, 4, 2)  # S3Copier's and the settings' defaults
    sweep = [c for c in sweep if c != default]

    started = time.monotonic()
    load_before = _loadavg()
    tmp = tempfile.mkdtemp(prefix="aq-copy-bench-")
    spool_dir: str | None = None
    emulator: subprocess.Popen[str] | None = None
    moto: subprocess.Popen[bytes] | None = None
    notes: list[str] = []
    try:
        size_mib, where, fallback = fit_size(wanted, tmp, args.spool)
        if fallback:
            notes.append(fallback)
            print(f"note: {fallback}", flush=True)
        size = size_mib * MiB
        spool_dir = (
            tempfile.mkdtemp(prefix="aq-copy-bench-moto-", dir="/dev/shm")
            if where == "memory"
            else tmp
        )
        emulator, base = start_emulator(size_mib, tmp)
        moto, endpoint = start_moto(spool_dir)
        from workers.adapters.s3.storage import make_s3_client

        for name, value in CREDENTIALS.items():
            os.environ.setdefault(name, value)
        s3: Any = make_s3_client(endpoint_url=endpoint, region=REGION)
        s3.create_bucket(Bucket=BUCKET)
        url = finished_video_url(base)
        warm_url = host_warm_file(base, min(WARM_MIB, size_mib))
        local = os.path.join(tmp, "video.mp4")
        common = {"endpoint": endpoint, "bucket": BUCKET, "url": url}
        print(
            f"video {size_mib} MiB from the emulator (pid {emulator.pid}) into moto "
            f"(pid {moto.pid}, objects spooled to {where}); {os.cpu_count()} cores; "
            f"{repeat} run(s) of each S3 transfer"
            + (f"; copy processes with {' '.join(args.copy_env)}" if args.copy_env else ""),
            flush=True,
        )

        # 1. the source's limit, and the bytes for upload_file and the hash
        downloads = [
            run_child({**common, "mode": "download", "dest": os.devnull}) for _ in range(3)
        ]
        for d in downloads:
            if d["bytes"] != size:
                raise RuntimeError(f"download got {d['bytes']} bytes, not {size}")
        download = statistics.median(_mib_s(d) for d in downloads)
        fetched = run_child({**common, "mode": "download", "dest": local})
        hashed = run_child({"mode": "hash", "path": local})

        # 2. to 5.: every transfer into S3, interleaved so that moto's drift spreads evenly
        cases = [
            Case("upload_file (copier config)", "upload_file", default),
            Case("upload_file (boto3 defaults)", "upload_file", None),
            Case("copy", "copy", default),
            Case("copy, no sha256", "copy", default, sha=False),
            *(Case("copy", "copy", config) for config in sweep),
        ]
        for done in range(1, repeat + 1):
            round_start = time.monotonic()
            for case in cases:
                spec = {**common, "mode": case.mode, "key": case.key, "config": case.config}
                if case.mode == "upload_file":
                    spec["path"] = local
                else:
                    spec.update(sha=case.sha, warm_url=warm_url)
                moto_cpu = _cpu_seconds(moto.pid)
                result = run_child(spec, env=child_env if case.mode == "copy" else None)
                result["moto_cpu_seconds"] = _cpu_seconds(moto.pid) - moto_cpu
                s3.delete_object(Bucket=BUCKET, Key=case.key)
                if result["bytes"] != size:
                    raise RuntimeError(f"{case.name} stored {result['bytes']} bytes, not {size}")
                if case.mode == "copy" and case.sha and result["sha256"] != hashed["sha256"]:
                    raise RuntimeError(f"{case.name}: the SHA-256 differs from the bytes'")
                case.results.append(result)
            now = time.monotonic()
            if done < repeat and now + (now - round_start) - started > args.budget:
                notes.append(
                    f"stopped after {done} of {repeat} rounds: another would pass the "
                    f"{args.budget:.0f} s budget (load average {_loadavg()})"
                )
                break
        os.remove(local)
        up_copier, up_default, ours, nosha = cases[:4]

        left = s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0)
        moto_peak = _status_kib("VmHWM", moto.pid) / 1024

        rows = [
            Row("download → /dev/null", "httpx iter_raw", download,
                statistics.median(d["seconds"] for d in downloads),
                max(d["growth_kib"] for d in downloads) / 1024,
                cpu=statistics.median(d["cpu_seconds"] for d in downloads),
                note="3 runs: " + "/".join(f"{_mib_s(d):.0f}" for d in downloads)),
            Row("sha256 alone", "1 MiB chunks", size / MiB / hashed["seconds"],
                hashed["seconds"], note=f"(download to disk {_mib_s(fetched):.0f} MiB/s)"),
        ]  # fmt: skip
        for case in cases:
            part, _, in_memory = case.config or (8, 10, 0)
            copying = case.mode == "copy"
            note = f"runs {case.spread()}"
            if copying:
                note += (
                    f"; upload {case.median('upload_seconds'):.2f} s,"
                    f" sha256 recorded {case.median('record_seconds'):.3f} s"
                )
            rows.append(
                Row(case.name, case.label, case.mib_s(), case.median("seconds"),
                    case.peak_mib(), case.peak_mib("warm_growth_kib") if copying else None,
                    (in_memory + 1) * part + 1 if copying else None,
                    case.median("cpu_seconds"), case.median("moto_cpu_seconds"), note)
            )  # fmt: skip

        throughput = ours.mib_s()
        upload_limit = max(up_copier.mib_s(), up_default.mib_s())
        limit = min(download, upload_limit)
        ratio = throughput / limit
        growth = ours.peak_mib()
        no_record = ours.median("seconds") - ours.median("record_seconds")
        sha_overhead = hashed["seconds"] / no_record
        ab = ours.median("seconds") / nosha.median("seconds") - 1
        ab_upload = ours.median("upload_seconds") / nosha.median("upload_seconds") - 1
        record_share = ours.median("record_seconds") / ours.median("seconds")
        upload_only = size / MiB / ours.median("upload_seconds")

        print()
        print_table(rows)
        print()
        print(
            f"limit {limit:.1f} MiB/s = min(download {download:.1f}, best upload_file "
            f"{upload_limit:.1f}); copy {throughput:.1f} MiB/s, ratio {ratio:.3f} (target >= 0.8); "
            f"its upload phase alone {upload_only:.1f} MiB/s"
        )
        print(
            f"peak RSS growth {growth:.1f} MiB from a cold process (target <= 64), "
            f"{ours.peak_mib('warm_growth_kib'):.1f} MiB after a {min(WARM_MIB, size_mib)} MiB "
            f"warm-up copy (max of {repeat}); VmHWM reset: "
            f"{'yes' if ours.results[0]['hwm_reset'] else 'refused, 10 ms sampler only'}"
        )
        print(
            f"sha256 overhead {sha_overhead:.1%} = hash {hashed['seconds']:.2f} s / copy without "
            f"recording it {no_record:.2f} s (target <= 10%); A/B against a no-op hash, medians: "
            f"total {ab:+.1%}, upload phase {ab_upload:+.1%}"
        )
        how = "copy_object onto itself" if ours.results[0]["stamped"] else "put_object_tagging"
        print(
            f"recording the sha256 ({how}) {ours.median('record_seconds'):.3f} s "
            f"= {record_share:.1%} of the copy"
        )
        print(
            f"moto peak RSS {moto_peak:.0f} MiB (it assembles a multipart object in "
            f"memory); objects left: {left}; ran {time.monotonic() - started:.0f} s; "
            f"load average {load_before} before, {_loadavg()} after ({os.cpu_count()} cores)"
        )
        for note in notes:
            print(f"note: {note}")
        summary: dict[str, Any] = {
            "throughput_mb_s": round(throughput, 2),
            "limit_mb_s": round(limit, 2),
            "throughput_ratio": round(ratio, 4),
            "peak_rss_growth_mib": round(growth, 2),
            "sha256_overhead": round(sha_overhead, 4),
            "size_mib": size_mib,
            "download_mb_s": round(download, 2),
            "upload_file_mb_s": round(up_copier.mib_s(), 2),
            "upload_file_default_mb_s": round(up_default.mib_s(), 2),
            "copy_upload_phase_mb_s": round(upload_only, 2),
            "copy_nosha_mb_s": round(nosha.mib_s(), 2),
            "sha256_ab_overhead": round(ab, 4),
            "record_share": round(record_share, 4),
            "warm_rss_growth_mib": round(ours.peak_mib("warm_growth_kib"), 2),
            "moto_peak_rss_mib": round(moto_peak, 1),
            "sweep": {
                case.label: {
                    "mb_s": round(case.mib_s(), 2),
                    "peak_rss_growth_mib": round(case.peak_mib(), 2),
                }
                for case in cases
                if case.mode == "copy" and case.sha
            },
            "rounds": len(ours.results),
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
            "seconds": round(time.monotonic() - started, 1),
        }
        if not all(math.isfinite(v) for v in summary.values() if isinstance(v, float)):
            raise RuntimeError(f"a figure is not finite: {summary}")
        print(json.dumps(summary), flush=True)
        return 0
    finally:
        _stop(moto)
        _stop(emulator)
        shutil.rmtree(tmp, ignore_errors=True)
        if spool_dir is not None and spool_dir != tmp:
            shutil.rmtree(spool_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
