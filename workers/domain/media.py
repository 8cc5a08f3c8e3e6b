"""Input media limits (DashScope's documented ones) and the checks of a probed image or dance video."""

from __future__ import annotations

from dataclasses import dataclass

from workers.domain.request import reject

# DashScope's documented image limits for animate-anyone-gen2.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP")


IMAGE_MAX_BYTES = 5 * 1024 * 1024  # "smaller than 5 MB"


IMAGE_MAX_ASPECT = 2.0


IMAGE_MAX_SIDE = 4096


@dataclass(frozen=True)
class ImageFacts:
    format: str | None
    byte_size: int | None  # None when the server did not say
    width: int
    height: int
    sha256: str | None = None  # of the whole file, when it was read whole


def check_image(facts: ImageFacts) -> None:
    """Refuse an image DashScope would refuse, before any paid call."""
    if facts.format not in IMAGE_FORMATS:
        raise reject(
            "InvalidImage.Format",
            f"image format {facts.format or 'unknown'} is not one of JPEG, PNG, BMP",
        )
    if facts.byte_size is not None and facts.byte_size >= IMAGE_MAX_BYTES:
        raise reject(
            "InvalidImage.Size", f"image is {facts.byte_size} bytes; it must be under 5 MB"
        )
    if min(facts.width, facts.height) <= 0:
        raise reject("InvalidImage.Dimensions", "image has no pixels")
    if max(facts.width, facts.height) > IMAGE_MAX_SIDE:
        raise reject(
            "InvalidImage.LongestSide",
            f"image is {facts.width}x{facts.height}; the longest side must be at most 4096",
        )
    aspect = max(facts.width, facts.height) / min(facts.width, facts.height)
    if aspect > IMAGE_MAX_ASPECT:
        raise reject(
            "InvalidImage.AspectRatio",
            f"image is {facts.width}x{facts.height} (aspect {aspect:.2f}); at most 2",
        )


# DashScope's documented limits for template (dance) videos (animate-anyone-template-gen2, §3).
VIDEO_FORMATS = ("mp4", "mov", "avi")  # containers


VIDEO_CODECS = ("h264", "hevc")  # H.264 / H.265


VIDEO_MAX_BYTES = 200 * 1024 * 1024


VIDEO_SIDES = (200, 2048)


VIDEO_MIN_FPS = 23.9  # documented as >= 24; slack for 23.976 (NTSC film) clips


VIDEO_SECONDS = (2.0, 60.0)


VIDEO_MAX_ASPECT = 3.0  # between 1:3 and 3:1


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


def check_template_video(facts: VideoFacts) -> None:
    """Refuse a template video DashScope would refuse (its documented limits), before paying."""
    if facts.format not in VIDEO_FORMATS:
        raise reject(
            "InvalidVideo.Format",
            f"video container is {facts.format or 'unreadable'}; it must be MP4, MOV or AVI",
        )
    if facts.codec not in VIDEO_CODECS:
        raise reject(
            "InvalidVideo.Codec",
            f"video codec is {facts.codec or 'unknown'}; it must be H.264 or H.265",
        )
    if facts.byte_size > VIDEO_MAX_BYTES:
        raise reject(
            "InvalidVideo.Size",
            f"video is {facts.byte_size} bytes; at most 200 MB ({VIDEO_MAX_BYTES} bytes)",
        )
    low, high = VIDEO_SIDES
    if not (low <= facts.width <= high and low <= facts.height <= high):
        raise reject(
            "InvalidVideo.Resolution",
            f"video is {facts.width}x{facts.height}; each side must be {low}-{high} px",
        )
    if facts.fps < VIDEO_MIN_FPS:
        raise reject("InvalidVideo.FPS", f"video is {facts.fps:.2f} fps; at least 24 fps")
    shortest, longest = VIDEO_SECONDS
    if not shortest <= facts.seconds <= longest:
        raise reject(
            "InvalidVideo.Duration",
            f"video lasts {facts.seconds:.2f} s; it must last {shortest:.0f}-{longest:.0f} s",
        )
    aspect = max(facts.width, facts.height) / min(facts.width, facts.height)
    if aspect > VIDEO_MAX_ASPECT:
        raise reject(
            "InvalidVideo.AspectRatio",
            f"video is {facts.width}x{facts.height} (aspect {aspect:.2f}); "
            "it must be between 1:3 and 3:1",
        )
