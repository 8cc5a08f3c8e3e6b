"""Media for the emulator: probing inputs with Pillow/PyAV, rendering the output MP4, padding, samples.

DashScope's AnimateAnyone refuses inputs outside its documented limits with specific error codes;
`probe_image`, `probe_video` and `check_template_video` reproduce those codes and messages
(`MediaError`). `render_animation` turns the person image into a real, playable H.264 MP4 (a cheap
sway/zoom of the image, not a model), `pad_mp4` grows a video to an exact byte size with a
trailing `free` box (sparse, so "large" results cost no disk), and `sample_person_png` /
`sample_dance_mp4` make valid inputs for tests and demos.

All writers are atomic: they write a temporary file next to the target and `os.replace` it.
"""

from __future__ import annotations

import functools
import io
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
from av.video.stream import VideoStream
from PIL import Image, ImageDraw, ImageOps

__all__ = [
    "OUTPUT_FPS",
    "ImageInfo",
    "MediaError",
    "VideoInfo",
    "check_template_video",
    "output_duration",
    "output_frame_count",
    "pad_mp4",
    "probe_image",
    "probe_video",
    "render_animation",
    "sample_dance_mp4",
    "sample_person_png",
]

# DashScope's messages, verbatim (including the full-width comma in the format message).
MSG_OPENERROR = "Invalid file, cannot open file as video/audio/image."
MSG_FORMAT = (
    "Invalid file format，the request file format is one of the following types: "
    "MP4, AVI, MOV, MP3, WAV, AAC, JPEG, JPG, PNG, BMP, and WEBP."
)
MSG_IMAGE_SIZE = "Invalid file size, The image file size must be smaller than 5MB."
MSG_IMAGE_DIMENSIONS = "The size of image is beyond limit."
MSG_VIDEO_SIZE = (
    "Invalid file size. The video file size must be less than 200MB, "
    "and the duration must be less than 60s."
)
MSG_RESOLUTION = "Invalid video resolution. The height or width of video must be 200 ~ 2048."
MSG_FPS = "Invalid video FPS. The video FPS must be 24 ~ 60."
MSG_DURATION = "Invalid file duration. The file duration must be 2 s ~ 60 s."
MSG_ASPECT = "Invalid file ratio. The file aspect ratio (height/width) must be between 3:1 and 1:3."

IMAGE_FORMATS = frozenset({"JPEG", "PNG", "BMP"})
IMAGE_MAX_BYTES = 5 * 1024 * 1024  # the file must be *smaller* than this
IMAGE_MAX_SIDE = 4096
IMAGE_MAX_ASPECT = 2.0

# PyAV's demuxer names: the first covers both .mp4 and .mov.
VIDEO_CONTAINERS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "avi"})
VIDEO_CODECS = frozenset({"h264", "hevc"})
VIDEO_MAX_BYTES = 200 * 1024 * 1024
VIDEO_MIN_SIDE = 200
VIDEO_MAX_SIDE = 2048
VIDEO_MIN_FPS = 23.9  # documented as >= 24; a little slack for 23.976 rounding
VIDEO_MIN_SECONDS = 2.0
VIDEO_MAX_SECONDS = 60.0
VIDEO_MAX_ASPECT = 3.0

OUTPUT_FPS = 15

_FREE_BOX_MIN = 8  # 4-byte size + 4-byte type
_FREE_BOX_LARGE_HEADER = 16  # size field 1 + type + 8-byte largesize
_BOX32_MAX = 2**32 - 1


class MediaError(Exception):
    """A media input that DashScope would refuse. `code`/`message` are DashScope error codes/messages."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageInfo:
    """What `probe_image` learned about an accepted person image."""

    format: str  # Pillow's format name: "JPEG" | "PNG" | "BMP"
    width: int
    height: int
    size_bytes: int
    # PNG text chunks (tEXt/zTXt/iTXt) ahead of the image data, where Pillow writes them; the
    # emulator reads its content triggers here. Empty for other formats.
    text: Mapping[str, str] = field(default_factory=dict, hash=False)


WAN_IMAGE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "WEBP"})
WAN_IMAGE_MIN_SIDE = 200
WAN_IMAGE_MAX_ASPECT = 3.0
WAN_VIDEO_MAX_SECONDS = 30.0
MSG_WAN_DURATION = "Invalid file duration. The file duration must be 2 s ~ 30 s."


def probe_image(
    data: bytes,
    *,
    formats: frozenset[str] = IMAGE_FORMATS,
    max_aspect: float = IMAGE_MAX_ASPECT,
    min_side: int = 1,
) -> ImageInfo:
    """Identify a person image and apply DashScope's limits, raising `MediaError` on refusal.

    Checks, in order: Pillow can open (and verify) it; JPEG/PNG/BMP; under 5 MiB; aspect ratio at
    most 2 and longest side at most 4096. The pixels are not decoded, so only text chunks that
    come before the image data are seen.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
            width, height = im.size
            # Pillow files text chunks in ``info`` next to dpi, gamma, icc_profile...: the
            # string values are the text ones.
            text = {
                k: str(v)
                for k, v in im.info.items()
                if fmt == "PNG" and isinstance(k, str) and isinstance(v, str)
            }
            im.verify()  # walks the chunks/CRCs: catches truncated or corrupt files cheaply
    except Image.DecompressionBombError as exc:
        # Pillow refuses absurd dimensions before we can look at them: that is a size refusal.
        raise MediaError("InvalidFile.ImageSize", MSG_IMAGE_DIMENSIONS) from exc
    except Exception as exc:
        raise MediaError("InvalidFile.Openerror", MSG_OPENERROR) from exc

    if fmt not in formats:
        raise MediaError("InvalidFile.Format", MSG_FORMAT)
    if len(data) >= IMAGE_MAX_BYTES:
        raise MediaError("InvalidFile.Size", MSG_IMAGE_SIZE)
    short, long = min(width, height), max(width, height)
    if short < min_side or long / short > max_aspect or long > IMAGE_MAX_SIDE:
        raise MediaError("InvalidFile.ImageSize", MSG_IMAGE_DIMENSIONS)
    return ImageInfo(format=fmt, width=width, height=height, size_bytes=len(data), text=text)


# --------------------------------------------------------------------------------------- videos


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learned about a template (dance) video."""

    container: str  # PyAV's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or "avi"
    codec: str  # "h264" | "hevc" | ...
    width: int
    height: int
    fps: float
    duration: float  # seconds
    size_bytes: int
    comment: str | None = None  # the container's ``comment`` metadata tag (content triggers)


def probe_video(path: Path) -> VideoInfo:
    """Probe a video file with PyAV; `MediaError` InvalidFile.Openerror if it has no video stream.

    A missing file raises `FileNotFoundError` (a caller bug, not a bad upload).
    """
    size_bytes = path.stat().st_size
    try:
        with av.open(str(path), "r") as container:
            if not container.streams.video:
                raise MediaError("InvalidFile.Openerror", MSG_OPENERROR)
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
                duration = frames / fps if fps > 0 else 0.0
            return VideoInfo(
                container=container.format.name,
                codec=stream.codec_context.name,
                width=stream.codec_context.width,
                height=stream.codec_context.height,
                fps=fps,
                duration=duration,
                size_bytes=size_bytes,
                comment=container.metadata.get("comment") or None,
            )
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError("InvalidFile.Openerror", MSG_OPENERROR) from exc


def probe_wan_image(data: bytes) -> ImageInfo:
    """Wan2.2-Animate's person image: JPEG/PNG/BMP/WEBP, 200-4096 px a side, 1:3 to 3:1, < 5 MB."""
    return probe_image(
        data,
        formats=WAN_IMAGE_FORMATS,
        max_aspect=WAN_IMAGE_MAX_ASPECT,
        min_side=WAN_IMAGE_MIN_SIDE,
    )


def check_wan_video(info: VideoInfo) -> None:
    """Wan2.2-Animate's reference video: MP4/MOV/AVI, at most 200 MB, 200-2048 px a side,
    2-30 s, 1:3 to 3:1 (no frame-rate or codec limit is documented)."""
    if info.container not in VIDEO_CONTAINERS:
        raise MediaError("InvalidFile.Format", MSG_FORMAT)
    if info.size_bytes > VIDEO_MAX_BYTES:
        raise MediaError("InvalidFile.Size", MSG_VIDEO_SIZE)
    if not all(VIDEO_MIN_SIDE <= side <= VIDEO_MAX_SIDE for side in (info.width, info.height)):
        raise MediaError("InvalidFile.Resolution", MSG_RESOLUTION)
    if not VIDEO_MIN_SECONDS <= info.duration <= WAN_VIDEO_MAX_SECONDS:
        raise MediaError("InvalidFile.Duration", MSG_WAN_DURATION)
    if info.height / info.width > VIDEO_MAX_ASPECT or info.width / info.height > VIDEO_MAX_ASPECT:
        raise MediaError("InvalidFile.AspectRatio", MSG_ASPECT)


def check_template_video(info: VideoInfo) -> None:
    """Apply DashScope's template-video limits to a probed video, raising `MediaError` on refusal.

    Checks, in order: MP4/MOV/AVI with H.264/H.265; at most 200 MB; each side 200-2048 px;
    at least 24 fps; 2-60 s; aspect ratio between 1:3 and 3:1.
    """
    if info.container not in VIDEO_CONTAINERS or info.codec not in VIDEO_CODECS:
        raise MediaError("InvalidFile.Format", MSG_FORMAT)
    if info.size_bytes > VIDEO_MAX_BYTES:
        raise MediaError("InvalidFile.Size", MSG_VIDEO_SIZE)
    if not all(VIDEO_MIN_SIDE <= side <= VIDEO_MAX_SIDE for side in (info.width, info.height)):
        raise MediaError("InvalidFile.Resolution", MSG_RESOLUTION)
    if info.fps < VIDEO_MIN_FPS:
        raise MediaError("InvalidFile.FPS", MSG_FPS)
    if not VIDEO_MIN_SECONDS <= info.duration <= VIDEO_MAX_SECONDS:
        raise MediaError("InvalidFile.Duration", MSG_DURATION)
    if info.height / info.width > VIDEO_MAX_ASPECT or info.width / info.height > VIDEO_MAX_ASPECT:
        raise MediaError("InvalidFile.AspectRatio", MSG_ASPECT)


# --------------------------------------------------------------------------------------- output


def output_frame_count(seconds: float) -> int:
    """Frames in a rendered result of `seconds`: round(seconds * 15), at least 1."""
    return max(1, round(seconds * OUTPUT_FPS))


def output_duration(seconds: float) -> float:
    """The exact duration `render_animation` produces for `seconds`: whole frames at 15 fps."""
    return output_frame_count(seconds) / OUTPUT_FPS


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success `os.replace` it onto `path`."""
    # A unique name, not mkstemp: the writer creates the file, so it gets the usual umask mode.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@functools.cache
def _h264_encoder() -> tuple[str, dict[str, str]]:
    """The H.264 encoder this PyAV build has and its fast options (libx264 ultrafast if present)."""
    candidates: list[tuple[str, dict[str, str]]] = [
        ("libx264", {"preset": "ultrafast", "crf": "23"}),
        ("libopenh264", {}),
        ("h264", {}),  # FFmpeg's default encoder for the codec, whichever it is
    ]
    for name, options in candidates:
        if name not in av.codecs_available:
            continue
        try:
            av.Codec(name, "w")
        except Exception:  # a decoder only, or not usable for encoding
            continue
        return name, options
    raise RuntimeError("this PyAV build has no H.264 encoder")


def _check_even_size(width: int, height: int) -> None:
    """yuv420p needs positive, even dimensions."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"width and height must be positive and even, got {width}x{height}")


def _write_h264(
    path: Path,
    frames: Iterable[Image.Image],
    *,
    fps: int,
    width: int,
    height: int,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Encode RGB images to an H.264/yuv420p MP4 of width x height at a constant `fps`.

    `metadata` becomes container tags (``{"comment": ...}`` is what `probe_video` reads back).

    Images of another size are scaled (bilinear) by swscale while it converts them to yuv420p,
    which is much faster than resampling in Pillow. Frame i gets pts i in a 1/fps time base, so
    the stream lasts exactly n/fps seconds.
    """
    _check_even_size(width, height)
    codec_name, options = _h264_encoder()
    time_base = Fraction(1, fps)
    with _atomic_target(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        container.metadata.update(metadata or {})
        stream = container.add_stream(codec_name, rate=fps, options=dict(options))
        if not isinstance(stream, VideoStream):
            raise RuntimeError(f"{codec_name} did not make a video stream")
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.time_base = time_base
        for index, image in enumerate(frames):
            rgb = av.VideoFrame.from_image(image)  # type: ignore[no-untyped-call]
            frame = rgb.reformat(
                width=width, height=height, format="yuv420p", interpolation="BILINEAR"
            )
            frame.pts = index
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _open_rgb(image: bytes) -> Image.Image:
    """Decode image bytes to an upright RGB image, or `MediaError` InvalidFile.Openerror."""
    try:
        with Image.open(io.BytesIO(image)) as im:
            upright = ImageOps.exif_transpose(im)
            return upright.convert("RGB")
    except Exception as exc:
        raise MediaError("InvalidFile.Openerror", MSG_OPENERROR) from exc


def _animation_frames(base: Image.Image, count: int) -> Iterator[Image.Image]:
    """Crops of `base` that zoom gently (3 s period) and sway sideways (2 s period).

    Each crop is scaled back to full size by `_write_h264`; whole-pixel crop boxes keep this cheap.
    """
    width, height = base.size
    for index in range(count):
        t = index / OUTPUT_FPS
        zoom = 1.06 + 0.03 * math.sin(2 * math.pi * t / 3.0)  # 1.03 .. 1.09
        crop_w = max(2, round(width / zoom))
        crop_h = max(2, round(height / zoom))
        margin_x = (width - crop_w) / 2
        sway = 0.8 * margin_x * math.sin(2 * math.pi * t / 2.0)  # stays inside the margin
        left = round(margin_x + sway)
        top = (height - crop_h) // 2
        yield base.crop((left, top, left + crop_w, top + crop_h))


def render_animation(
    image: bytes, seconds: float, out_path: Path, *, width: int, height: int
) -> float:
    """Render `image` as a width x height, 15 fps H.264 MP4 of `output_frame_count(seconds)` frames.

    The image is letterboxed onto a black canvas and gently swayed and zoomed, so every frame
    differs. The write is atomic. Returns `output_duration(seconds)`, which is exactly the
    duration PyAV reports for the file.
    """
    _check_even_size(width, height)
    count = output_frame_count(seconds)
    source = _open_rgb(image)
    base = ImageOps.pad(source, (width, height), method=Image.Resampling.BILINEAR, color=(0, 0, 0))
    _write_h264(
        out_path, _animation_frames(base, count), fps=OUTPUT_FPS, width=width, height=height
    )
    return output_duration(seconds)


# --------------------------------------------------------------------------------------- padding


def pad_mp4(src: Path, dst: Path, total_bytes: int) -> None:
    """Copy `src` to `dst`, growing it to exactly `total_bytes` with one trailing `free` box.

    Players skip top-level `free` boxes, so the video still plays the same. The box payload is
    never written: the file is extended with `truncate` (sparse zeros). Boxes over 4 GiB use the
    64-bit largesize header. If `total_bytes` <= the size of `src`, `dst` is a plain copy; a gap
    of 1-7 bytes cannot hold a box and raises `ValueError`. Atomic.
    """
    gap = total_bytes - src.stat().st_size
    if 0 < gap < _FREE_BOX_MIN:
        raise ValueError(f"cannot pad by {gap} bytes: a free box needs at least {_FREE_BOX_MIN}")
    with _atomic_target(dst) as tmp:
        shutil.copyfile(src, tmp)
        if gap > 0:
            if gap > _BOX32_MAX:
                header = struct.pack(">I4sQ", 1, b"free", gap)
            else:
                header = struct.pack(">I4s", gap, b"free")
            with tmp.open("r+b") as f:
                f.seek(0, os.SEEK_END)
                f.write(header)
                f.truncate(total_bytes)


# --------------------------------------------------------------------------------------- samples


def _draw_stick_figure(
    image: Image.Image, *, arm_angles: tuple[float, float], leg_angles: tuple[float, float]
) -> None:
    """Draw a stick person centred on `image`; angles are degrees out from hanging straight down."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    ink = (40, 40, 60)
    line = max(2, round(0.012 * height))
    cx = width / 2
    radius = min(0.06 * height, 0.12 * width)
    head_cy = 0.1 * height + radius
    neck_y = head_cy + radius
    shoulder_y = neck_y + 0.04 * height
    hip_y = 0.55 * height
    arm_len = min(0.22 * height, 0.45 * width)
    leg_len = min(0.33 * height, 0.6 * width)

    draw.ellipse(
        (cx - radius, head_cy - radius, cx + radius, head_cy + radius),
        fill=(250, 210, 170),
        outline=ink,
        width=line,
    )
    draw.line((cx, neck_y, cx, hip_y), fill=ink, width=line)
    for side, angle in zip((-1, 1), arm_angles, strict=True):
        rad = math.radians(angle)
        end = (cx + side * arm_len * math.sin(rad), shoulder_y + arm_len * math.cos(rad))
        draw.line((cx, shoulder_y, *end), fill=(200, 60, 60), width=line)
    for side, angle in zip((-1, 1), leg_angles, strict=True):
        rad = math.radians(angle)
        end = (cx + side * leg_len * math.sin(rad), hip_y + leg_len * math.cos(rad))
        draw.line((cx, hip_y, *end), fill=(60, 60, 200), width=line)


def sample_person_png(width: int = 512, height: int = 1024) -> bytes:
    """A deterministic PNG of a stick-figure person on a plain background."""
    image = Image.new("RGB", (width, height), (235, 240, 245))
    _draw_stick_figure(image, arm_angles=(30.0, 30.0), leg_angles=(15.0, 15.0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample_dance_mp4(
    path: Path,
    *,
    seconds: float = 3.0,
    fps: int = 24,
    width: int = 360,
    height: int = 640,
    comment: str | None = None,
) -> None:
    """Write an H.264 MP4 of a dancing stick figure: round(seconds * fps) frames at `fps`.

    With the defaults it passes `check_template_video`. `comment` sets the container's
    ``comment`` tag (``"emulator_fail=CODE"`` makes the emulator fail its template task). Atomic.
    """
    count = max(1, round(seconds * fps))

    def frames() -> Iterator[Image.Image]:
        for index in range(count):
            phase = 2 * math.pi * index / fps  # one move per second
            image = Image.new("RGB", (width, height), (235, 240, 245))
            _draw_stick_figure(
                image,
                arm_angles=(80 + 60 * math.sin(phase), 80 - 60 * math.sin(phase)),
                leg_angles=(15 + 12 * math.sin(phase), 15 - 12 * math.cos(phase)),
            )
            yield image

    metadata = {"comment": comment} if comment else None
    _write_h264(path, frames(), fps=fps, width=width, height=height, metadata=metadata)
