"""Sample media for the demo and the tests.

:func:`make_video` writes a clip of a dancing figure in any of the codecs and containers the
template checks care about (H.264, H.265, MPEG-4 Part 2; MP4, MOV, AVI, Matroska), so tests can
produce each case DashScope refuses. :func:`make_image` draws a standing figure as PNG or JPEG,
with optional PNG text chunks (the emulator reads ``emulator_detect`` as a content trigger).
Both write a temporary file next to the target and ``os.replace`` it.
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import av
from av.video.stream import VideoStream
from PIL import Image, ImageDraw, ImageOps
from PIL.PngImagePlugin import PngInfo

# Container (PyAV muxer name) by file suffix.
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".avi": "avi", ".mkv": "matroska"}

# Software encoders only, by preference: a hardware one (hevc_nvenc) may be listed yet unusable.
# H.264 uses veryfast, not ultrafast: ultrafast has no CABAC and makes files about 3x larger.
ENCODERS: dict[str, tuple[tuple[str, dict[str, str]], ...]] = {
    "h264": (("libx264", {"preset": "veryfast", "crf": "28"}), ("libopenh264", {})),
    "hevc": (
        ("libx265", {"preset": "ultrafast", "crf": "30", "x265-params": "log-level=none"}),
        ("libkvazaar", {}),
    ),
    "mpeg4": (("mpeg4", {}),),
}

BACKGROUND_TOP = (214, 226, 240)
BACKGROUND_BOTTOM = (246, 240, 228)
INK = (40, 40, 60)
SKIN = (250, 210, 170)
ARMS = (214, 150, 110)
SHIRT = (200, 60, 60)
TROUSERS = (60, 60, 170)


@functools.cache
def encoder(codec: str) -> tuple[str, dict[str, str]] | None:
    """The encoder this PyAV build has for ``codec`` and its fast options, or None."""
    for name, options in ENCODERS.get(codec, ()):
        if name not in av.codecs_available:
            continue
        try:
            av.Codec(name, "w")
        except Exception:  # listed as a decoder only
            continue
        return name, options
    return None


def can_encode(codec: str) -> bool:
    return encoder(codec) is not None


def make_video(
    path: Path,
    *,
    width: int = 360,
    height: int = 640,
    fps: int = 24,
    seconds: float = 3.0,
    codec: str = "h264",
    container: str | None = None,
) -> Path:
    """Write ``round(seconds * fps)`` frames of a dancing figure to ``path``; return ``path``.

    ``codec`` is ``h264``, ``hevc`` or ``mpeg4``; the container comes from the suffix (``.mp4``,
    ``.mov``, ``.avi``, ``.mkv``) unless ``container`` names a PyAV muxer. Frame i has pts i in a
    1/fps time base, so the stream lasts exactly frames/fps seconds. Sides must be even (yuv420p).
    Raises ``RuntimeError`` if this PyAV build cannot encode ``codec`` (see :func:`can_encode`).
    """
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"width and height must be positive and even, got {width}x{height}")
    muxer = container or CONTAINERS.get(path.suffix.lower())
    if muxer is None:
        raise ValueError(f"no container for suffix {path.suffix!r}; pass container=")
    chosen = encoder(codec)
    if chosen is None:
        raise RuntimeError(f"this PyAV build has no {codec} encoder")
    name, options = chosen
    count = max(1, round(seconds * fps))
    time_base = Fraction(1, fps)
    # The dance repeats every second, so one second of frames is drawn and then reused.
    frames = [
        av.VideoFrame.from_image(  # type: ignore[no-untyped-call]
            _dancer(width, height, 2 * math.pi * index / fps)
        ).reformat(format="yuv420p")
        for index in range(min(count, fps))
    ]
    with _atomic_target(path) as tmp, av.open(str(tmp), "w", format=muxer) as out:
        stream = out.add_stream(name, rate=fps, options=dict(options))
        if not isinstance(stream, VideoStream):
            raise RuntimeError(f"{name} did not make a video stream")
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        for index in range(count):
            frame = frames[index % len(frames)]
            frame.pts = index
            frame.time_base = time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def make_image(
    path: Path,
    width: int = 512,
    height: int = 768,
    fmt: str = "PNG",
    text: dict[str, str] | None = None,
) -> Path:
    """Write a standing figure as ``fmt`` (PNG, JPEG or BMP); return ``path``.

    ``text`` becomes PNG text chunks (``tEXt``/``iTXt``), e.g. ``{"emulator_detect": "..."}``;
    only PNG can carry them.
    """
    fmt = fmt.upper()
    if text and fmt != "PNG":
        raise ValueError(f"text chunks need PNG, not {fmt}")
    image = _figure(width, height, arms=(30.0, 30.0), legs=(12.0, 12.0), sway=0.0)
    save: Callable[[Path], None]
    if fmt == "PNG":
        info = PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)
        save = functools.partial(image.save, format="PNG", pnginfo=info)
    elif fmt == "JPEG":
        save = functools.partial(image.save, format="JPEG", quality=85)
    else:
        save = functools.partial(image.save, format=fmt)
    with _atomic_target(path) as tmp:
        save(tmp)
    return path


def _dancer(width: int, height: int, phase: float) -> Image.Image:
    swing = math.sin(phase)
    return _figure(
        width,
        height,
        arms=(80 + 60 * swing, 80 - 60 * swing),
        legs=(15 + 12 * swing, 15 - 12 * math.cos(phase)),
        sway=0.08 * swing,
    )


@functools.cache
def _background(width: int, height: int) -> Image.Image:
    gradient = Image.linear_gradient("L").resize((width, height))
    return ImageOps.colorize(gradient, BACKGROUND_TOP, BACKGROUND_BOTTOM)


def _figure(
    width: int, height: int, *, arms: tuple[float, float], legs: tuple[float, float], sway: float
) -> Image.Image:
    """A person on a soft gradient: angles are degrees out from hanging straight down; ``sway``
    shifts the body sideways by that fraction of the width."""
    image = _background(width, height).copy()
    draw = ImageDraw.Draw(image)
    line = max(2, round(0.014 * min(width, height * 0.6)))
    cx = width / 2 + sway * width
    radius = min(0.06 * height, 0.12 * width)
    head_cy = 0.1 * height + radius
    neck_y = head_cy + radius
    shoulder_y = neck_y + 0.04 * height
    hip_y = 0.55 * height
    torso = max(line, 0.07 * width)
    arm_len = min(0.22 * height, 0.45 * width)
    leg_len = min(0.33 * height, 0.6 * width)

    draw.rounded_rectangle(
        (cx - torso, neck_y + line, cx + torso, hip_y), radius=line * 2, fill=SHIRT, outline=INK
    )
    for side, angle in zip((-1, 1), legs, strict=True):
        rad = math.radians(angle)
        start = (cx + side * torso / 2, hip_y)
        end = (start[0] + side * leg_len * math.sin(rad), hip_y + leg_len * math.cos(rad))
        draw.line((*start, *end), fill=TROUSERS, width=line * 2)
    for side, angle in zip((-1, 1), arms, strict=True):
        rad = math.radians(angle)
        start = (cx + side * torso, shoulder_y)
        end = (start[0] + side * arm_len * math.sin(rad), shoulder_y + arm_len * math.cos(rad))
        draw.line((*start, *end), fill=ARMS, width=round(line * 1.5))
    draw.ellipse(
        (cx - radius, head_cy - radius, cx + radius, head_cy + radius),
        fill=SKIN,
        outline=INK,
        width=line,
    )
    return image


@contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``, moved onto it on success and removed on failure."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
