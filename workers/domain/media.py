"""The checks of a probed image or dance video against the selected model's documented limits
(its profile: workers/models), made before anything is paid."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from workers.domain.request import reject
from workers.models.profile import ImageLimits, VideoLimits


@dataclass(frozen=True)
class ImageFacts:
    format: str | None
    byte_size: int | None  # None when the server did not say
    width: int
    height: int
    sha256: str | None = None  # of the whole file, when it was read whole


def check_image(facts: ImageFacts, limits: ImageLimits) -> None:
    """Refuse an image DashScope would refuse, before any paid call."""
    if facts.format not in limits.formats:
        raise reject(
            "InvalidImage.Format",
            f"image format {facts.format or 'unknown'} is not one of {', '.join(limits.formats)}",
        )
    if facts.byte_size is not None and facts.byte_size >= limits.max_bytes:
        raise reject(
            "InvalidImage.Size",
            f"image is {facts.byte_size} bytes; it must be under {_mb(limits.max_bytes)} MB",
        )
    if min(facts.width, facts.height) <= 0:
        raise reject("InvalidImage.Dimensions", "image has no pixels")
    if min(facts.width, facts.height) < limits.min_side:
        raise reject(
            "InvalidImage.ShortestSide",
            f"image is {facts.width}x{facts.height}; each side must be at least {limits.min_side}",
        )
    if max(facts.width, facts.height) > limits.max_side:
        raise reject(
            "InvalidImage.LongestSide",
            f"image is {facts.width}x{facts.height}; the longest side must be at most "
            f"{limits.max_side}",
        )
    aspect = max(facts.width, facts.height) / min(facts.width, facts.height)
    if aspect > limits.max_aspect:
        raise reject(
            "InvalidImage.AspectRatio",
            f"image is {facts.width}x{facts.height} (aspect {aspect:.2f}); at most "
            f"{limits.max_aspect:g}",
        )


@dataclass(frozen=True)
class VideoFacts:
    """What a probe (PyAV) learned about a template video, and its content hash."""

    format: str | None  # "mp4" | "mov" | "avi" | another container name | None (unreadable)
    codec: str | None  # "h264" | "hevc" | ...
    byte_size: int
    width: int
    height: int
    fps: float
    seconds: float
    sha256: str


def check_template_video(facts: VideoFacts, limits: VideoLimits) -> None:
    """Refuse a template video DashScope would refuse (its documented limits), before paying."""
    if facts.format not in limits.formats:
        raise reject(
            "InvalidVideo.Format",
            f"video container is {facts.format or 'unreadable'}; it must be "
            f"{_one_of(f.upper() for f in limits.formats)}",
        )
    if limits.codecs and facts.codec not in limits.codecs:
        raise reject(
            "InvalidVideo.Codec",
            f"video codec is {facts.codec or 'unknown'}; it must be "
            f"{_one_of(CODEC_NAMES.get(c, c) for c in limits.codecs)}",
        )
    if facts.byte_size > limits.max_bytes:
        raise reject(
            "InvalidVideo.Size",
            f"video is {facts.byte_size} bytes; at most {_mb(limits.max_bytes)} MB "
            f"({limits.max_bytes} bytes)",
        )
    low, high = limits.sides
    if not (low <= facts.width <= high and low <= facts.height <= high):
        raise reject(
            "InvalidVideo.Resolution",
            f"video is {facts.width}x{facts.height}; each side must be {low}-{high} px",
        )
    if facts.fps < limits.min_fps:
        raise reject(
            "InvalidVideo.FPS",
            f"video is {facts.fps:.2f} fps; at least {round(limits.min_fps)} fps",
        )
    shortest, longest = limits.seconds
    if not shortest <= facts.seconds <= longest:
        raise reject(
            "InvalidVideo.Duration",
            f"video lasts {facts.seconds:.2f} s; it must last {shortest:.0f}-{longest:.0f} s",
        )
    aspect = max(facts.width, facts.height) / min(facts.width, facts.height)
    if aspect > limits.max_aspect:
        raise reject(
            "InvalidVideo.AspectRatio",
            f"video is {facts.width}x{facts.height} (aspect {aspect:.2f}); "
            "it must be between 1:3 and 3:1",
        )


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):g}"


CODEC_NAMES = {"h264": "H.264", "hevc": "H.265"}


def _one_of(names: Iterable[str]) -> str:
    *rest, last = list(names)
    return f"{', '.join(rest)} or {last}" if rest else last
