"""Looking at a template (dance) video before paying for a template: download it (capped), hash it, probe it with PyAV.

:func:`probe_file` reads a local file's container, codec, size, frame rate and length;
:class:`HttpVideoProbe` streams a URL into a temporary file first (at most ``max_bytes``, hashed on
the way, every redirect guarded). Neither applies DashScope's limits: the caller passes the facts to
:func:`workers.domain.media.check_template_video`.

The file is handed to FFmpeg as a Python file object, never as a path, and every nested open is
refused: a "video" that is really an HLS playlist or an ffconcat list must not make a worker fetch
URLs or read local files. PyAV turns FFmpeg's logging off unless ``av.logging.set_level`` is
called, so a hostile file costs no log noise; its failures come back as exceptions, handled here.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import av
import httpx
from av.container import InputContainer
from av.video.stream import VideoStream

from workers.adapters.web.fetch import Deadline, guarded_get
from workers.adapters.web.guard import AddressGuard
from workers.domain.media import VideoFacts
from workers.errors import InvalidJobRequest, TransientError
from workers.models import ANIMATE_ANYONE_GEN2

_LIMITS = ANIMATE_ANYONE_GEN2.template_video
_TEMPLATE_MAX_BYTES = _LIMITS.max_bytes if _LIMITS is not None else 0  # the default model's

CHUNK_BYTES = 1 << 20
# PyAV's one demuxer for the ISO family: mp4 and mov (and m4a, 3gp...) look alike to it.
ISO_DEMUXER_PARTS = frozenset({"mov", "mp4"})
QUICKTIME_BRAND = "qt"  # "qt  " in the file; compared stripped


class VideoUnavailable(TransientError):
    code = "VideoUnavailable"


class _NestedOpenRefused(Exception):
    """Raised into FFmpeg when a demuxer tries to open another file or URL."""


def _refuse_nested_open(url: str, flags: int, options: dict[str, Any]) -> Any:
    raise _NestedOpenRefused(url)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def probe_file(path: Path, *, sha256: str | None = None) -> VideoFacts:
    """What PyAV learns about the video file at ``path``; never raises for an unreadable file.

    A file FFmpeg cannot open gets ``format=None``; one without a video stream gets its container
    name and ``codec=None``; both with zero sides, fps and length, so
    :func:`~workers.domain.media.check_template_video` refuses them (``InvalidVideo.Format``/``.Codec``).
    A missing file raises ``FileNotFoundError`` (a caller bug, not a bad video).
    """
    byte_size = path.stat().st_size
    digest = sha256 if sha256 is not None else sha256_file(path)

    def unreadable(container: str | None) -> VideoFacts:
        return VideoFacts(container, None, byte_size, 0, 0, 0.0, 0.0, digest)

    try:
        with (
            path.open("rb") as f,
            av.open(f, "r", metadata_errors="replace", io_open=_refuse_nested_open) as container,
        ):
            name = _container_name(container.format.name, dict(container.metadata), path)
            if not container.streams.video:
                return unreadable(name)
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            return VideoFacts(
                format=name,
                codec=stream.codec_context.name,
                byte_size=byte_size,
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                fps=fps,
                seconds=_seconds(container, stream, fps),
                sha256=digest,
            )
    except (av.FFmpegError, _NestedOpenRefused, OSError, ValueError):
        # FFmpegError covers InvalidDataError & co.; OSError/ValueError what FFmpeg maps to them.
        return unreadable(None)


def _seconds(container: InputContainer, stream: VideoStream, fps: float) -> float:
    """The stream's own duration, else the container's, else frames / fps."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration / av.time_base)
    if fps <= 0:
        return 0.0
    frames: int = stream.frames
    if not frames:
        try:
            for packet in container.demux(stream):
                if packet.size > 0:  # the demuxer ends with an empty flush packet
                    frames += 1
        except av.FFmpegError:
            pass  # a damaged tail: count the frames read so far
    return frames / fps


def _container_name(demuxer: str, metadata: dict[str, str], path: Path) -> str:
    """``mp4``, ``mov`` or ``avi`` for the accepted containers, else PyAV's first demuxer name.

    PyAV calls both MP4 and QuickTime files ``mov,mp4,m4a,3gp,3g2,mj2``; the ``ftyp`` box's major
    brand tells them apart: ``qt  `` is QuickTime (mov), any other brand is an ISO file (mp4).
    A file without an ``ftyp`` box is classic QuickTime, unless its name ends in ``.mp4``/``.m4v``.
    Other demuxers report their first name (``matroska,webm`` -> ``matroska``, ``gif``).
    """
    parts = demuxer.split(",")
    if not ISO_DEMUXER_PARTS.intersection(parts):
        return parts[0]
    brand = metadata.get("major_brand") or _ftyp_brand(path)
    if brand is None:
        return "mp4" if path.suffix.lower() in (".mp4", ".m4v") else "mov"
    return "mov" if brand.strip() == QUICKTIME_BRAND else "mp4"


def _ftyp_brand(path: Path) -> str | None:
    with path.open("rb") as f:
        head = f.read(12)
    if len(head) == 12 and head[4:8] == b"ftyp":
        return head[8:12].decode("latin-1")
    return None


class HttpVideoProbe:
    """Downloads a template video with an injected ``httpx.Client`` and probes it.

    The body goes to a temporary file (in ``tmp_dir``; removed afterwards, whatever happens) in
    1 MiB chunks, hashed on the way, so memory stays flat at any size. A body of more than
    ``max_bytes`` (by its Content-Length, or once that many bytes have arrived) is refused with
    ``InvalidVideo.Size``; nothing past the limit is stored. Every URL, the first and each
    redirect's target, passes the address guard first, unless the URL is ``trusted`` (our own
    presigned S3 URLs). A compressed body is refused rather than inflated (no compression bomb).
    """

    MAX_REDIRECTS = 5

    def __init__(
        self,
        http: httpx.Client,
        guard: AddressGuard | None = None,
        *,
        max_bytes: int = _TEMPLATE_MAX_BYTES,
        tmp_dir: str | None = None,
        total_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.guard = guard or AddressGuard()
        self.max_bytes = max_bytes
        self.tmp_dir = tmp_dir
        self.total_seconds = total_seconds  # the whole download, however slowly it drips
        self.clock = clock

    def probe(self, url: str, *, trusted: bool = False) -> VideoFacts:
        try:
            with tempfile.NamedTemporaryFile(
                prefix="aq-video-", suffix=_suffix(url), dir=self.tmp_dir
            ) as spool:
                digest = self._download(url, spool, trusted=trusted)
                return probe_file(Path(spool.name), sha256=digest)
        except OSError as exc:  # our disk (full, or tmp_dir missing): worth another try later
            raise VideoUnavailable(f"could not spool the video: {exc}") from exc

    def _download(self, url: str, spool: IO[bytes], *, trusted: bool) -> str:
        """Follow redirects to the body (each hop checked and pinned: workers.fetch), write it
        to ``spool``; return its SHA-256 (hex)."""
        deadline = Deadline(self.total_seconds, self.clock)
        try:
            with guarded_get(
                self.http,
                url,
                guard=None if trusted else self.guard,
                field="video_url",
                unreachable_code="InvalidVideo.Unreachable",
                headers={"Accept-Encoding": "identity"},
            ) as response:
                return self._save(response, spool, deadline)
        except InvalidJobRequest as exc:
            if exc.code == "InvalidImage.Unreachable":  # the guard's code for a host with no DNS
                raise InvalidJobRequest(exc.message, code="InvalidVideo.Unreachable") from None
            raise
        except httpx.HTTPError as exc:
            raise VideoUnavailable(f"downloading the video failed: {type(exc).__name__}") from exc

    def _save(self, response: httpx.Response, spool: IO[bytes], deadline: Deadline) -> str:
        status = response.status_code
        if status >= 500 or status == 429:
            raise VideoUnavailable(f"video URL answered HTTP {status}")
        if status != 200:
            raise InvalidJobRequest(
                f"video URL answered HTTP {status}", code="InvalidVideo.Unreachable"
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Inflating would let a small body become an unbounded one in memory (br, zstd).
            raise InvalidJobRequest(
                f"video URL sent a compressed body (Content-Encoding: {encoding}) although "
                "asked for identity; serve the video file as is",
                code="InvalidVideo.Unreachable",
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidJobRequest(
                f"video is {int(declared)} bytes (its Content-Length); "
                f"at most {self.max_bytes} bytes",
                code="InvalidVideo.Size",
            )
        digest = hashlib.sha256()
        total = 0
        # Whole chunks of at most max_bytes + 1: the read stops within one chunk past the limit.
        for chunk in response.iter_raw(min(CHUNK_BYTES, self.max_bytes + 1)):
            deadline.check(VideoUnavailable)
            total += len(chunk)
            if total > self.max_bytes:
                raise InvalidJobRequest(
                    f"video is larger than {self.max_bytes} bytes (the download stopped there); "
                    f"at most {self.max_bytes} bytes",
                    code="InvalidVideo.Size",
                )
            digest.update(chunk)
            spool.write(chunk)
        spool.flush()
        return digest.hexdigest()


def _suffix(url: str) -> str:
    """The URL path's extension, if it is a plain one (only used for files without a brand)."""
    try:
        suffix = Path(urlsplit(url).path).suffix.lower()
    except ValueError:
        return ""
    return suffix if 2 <= len(suffix) <= 5 and suffix[1:].isascii() and suffix[1:].isalnum() else ""
