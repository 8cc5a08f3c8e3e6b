"""Resumable multipart copies: the checkpoint of an unfinished upload, and the parts in flight.

A big video on a slow path may not fit in one copy attempt's time limit. Starting over each time
would never finish, so a multipart copy keeps its upload open between attempts and records where
it stands (a :class:`Checkpoint`: the upload id, how many parts are done, and the SHA-256 state
after them). The next attempt lists the parts S3 holds, asks the source for the rest with an
HTTP ``Range`` (``If-Range`` the source's ETag, so a changed source starts over), and goes on.

The SHA-256 of the whole video is needed at the end, so its running state must survive between
processes: hashlib's cannot be saved, so the hash runs in ``rehashes`` (RustCrypto's SHA-256 with
a serialisable state; as fast as hashlib here: about 1.5 GB/s).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from rehashes import PySha256


@dataclass(frozen=True)
class Checkpoint:
    """Where an unfinished multipart copy stands: parts ``1..parts`` of ``part_size`` bytes are
    in upload ``upload_id``, and ``sha_state`` is the SHA-256 state after exactly those bytes."""

    upload_id: str
    part_size: int
    total: int  # the whole video's length
    parts: int
    sha_state: str  # hex of rehashes' serialised SHA-256 state
    etag: str | None = None  # the source's ETag (If-Range on the next attempt)

    @property
    def offset(self) -> int:
        return min(self.parts * self.part_size, self.total)

    @property
    def complete(self) -> bool:
        return self.offset >= self.total

    def sha256(self) -> str:
        """The hex digest of the bytes so far (of the whole video once ``complete``)."""
        return str(restore_hash(self.sha_state).finalize())

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | None) -> Checkpoint | None:
        """The checkpoint in ``raw``, or None for nothing or anything unreadable (start over)."""
        if not raw:
            return None
        try:
            data = json.loads(raw)
            point = cls(**data)
            restore_hash(point.sha_state)
        except (ValueError, TypeError):
            return None
        ok = (
            isinstance(point.upload_id, str)
            and point.upload_id
            and all(
                isinstance(v, int) and v >= 0 for v in (point.part_size, point.total, point.parts)
            )
            and point.part_size > 0
        )
        return point if ok else None


def new_hash() -> PySha256:
    return PySha256()


def hash_state(hasher: PySha256) -> str:
    return bytes(hasher.serialize()).hex()


def restore_hash(state: str) -> PySha256:
    return PySha256.deserialize(bytes.fromhex(state))


class PartUploads:
    """Parts of one multipart upload in flight on a thread pool, at most ``in_flight`` at once
    (their bytes are the copy's memory), and the longest prefix ``1..done`` that S3 has.

    ``upload(number, data)`` runs in a pool thread and returns the part's ETag.
    """

    def __init__(
        self,
        upload: Callable[[int, bytes], str],
        *,
        concurrency: int,
        in_flight: int,
        first: int = 1,
        etags: dict[int, str] | None = None,
    ) -> None:
        self._upload = upload
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-part")
        self._limit = max(1, in_flight)
        self._running: dict[Future[str], int] = {}
        self.etags: dict[int, str] = dict(etags or {})
        self.done = first - 1  # parts 1..done are in S3
        self.error: BaseException | None = None

    def submit(self, number: int, data: bytes, beat: Callable[[], None]) -> None:
        """Queue a part; blocks (calling ``beat`` every few seconds) while the pool is full."""
        while len(self._running) >= self._limit:
            self.collect(timeout=5.0)
            beat()
        self._running[self._pool.submit(self._upload, number, data)] = number

    def collect(self, timeout: float | None = 0.0) -> None:
        """Take in finished parts (waiting up to ``timeout``); raise the first part's error."""
        if self._running:
            finished, _ = wait(list(self._running), timeout=timeout, return_when=FIRST_COMPLETED)
            for future in finished:
                number = self._running.pop(future)
                try:
                    self.etags[number] = future.result()
                except BaseException as exc:
                    self.error = self.error or exc
        while self.done + 1 in self.etags:
            self.done += 1
        if self.error is not None:
            raise self.error

    def finish(self, beat: Callable[[], None]) -> None:
        """Wait for every part in flight (raising the first error once all have stopped)."""
        try:
            while self._running:
                self.collect(timeout=5.0)
                beat()
        finally:
            self.drain()

    def drain(self) -> None:
        """Let the parts in flight end, whatever they do (after a failure elsewhere)."""
        started = time.monotonic()
        while self._running and time.monotonic() - started < 120:
            try:
                self.collect(timeout=5.0)
            except BaseException:
                continue
        self._pool.shutdown(wait=False, cancel_futures=True)

    def parts(self) -> list[dict[str, Any]]:
        """``Parts`` for CompleteMultipartUpload: 1..done in order."""
        return [{"PartNumber": n, "ETag": self.etags[n]} for n in range(1, self.done + 1)]
