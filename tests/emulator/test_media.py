"""Tests for emulator.media: DashScope's input limits, the rendered MP4, padding and samples."""

from __future__ import annotations

import io
import os
import struct
import time
import wave
from dataclasses import replace
from pathlib import Path

import av
import pytest
from PIL import Image, ImageChops, ImageStat

from emulator.media import (
    OUTPUT_FPS,
    ImageInfo,
    MediaError,
    VideoInfo,
    check_template_video,
    output_duration,
    output_frame_count,
    pad_mp4,
    probe_image,
    probe_video,
    render_animation,
    sample_dance_mp4,
    sample_person_png,
)

OPEN_ERROR = "Invalid file, cannot open file as video/audio/image."
FORMAT_ERROR = (
    "Invalid file format\uff0cthe request file format is one of the following types: "
    "MP4, AVI, MOV, MP3, WAV, AAC, JPEG, JPG, PNG, BMP, and WEBP."
)
MIB = 1024 * 1024


def encode(image: Image.Image, fmt: str) -> bytes:
    """Save a Pillow image to bytes in `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A plain image of the given size (compresses to almost nothing)."""
    return Image.new(mode, (width, height), "white" if mode == "1" else (200, 120, 40))


def decode_all(path: Path) -> tuple[av.VideoFrame, ...]:
    """Every decoded video frame of a file."""
    with av.open(str(path)) as container:
        return tuple(container.decode(video=0))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small 2 s render of the sample person, shared by the read-only tests."""
    path = tmp_path_factory.mktemp("render") / "out.mp4"
    render_animation(sample_person_png(256, 512), 2.0, path, width=144, height=256)
    return path


# --------------------------------------------------------------------------------- probe_image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_probe_image_accepts_jpeg_png_bmp(fmt: str) -> None:
    """JPEG, PNG and BMP within limits are accepted and described."""
    data = encode(solid(300, 500), fmt)
    assert probe_image(data) == ImageInfo(format=fmt, width=300, height=500, size_bytes=len(data))


def test_probe_image_sample_person_is_valid_and_deterministic() -> None:
    """The sample person PNG passes probe_image and is byte-identical across calls."""
    data = sample_person_png()
    assert data == sample_person_png()
    assert probe_image(data) == ImageInfo("PNG", 512, 1024, len(data))


@pytest.mark.parametrize(
    "data",
    [b"", b"this is not an image at all" * 10, encode(solid(64, 64), "PNG")[:60]],
    ids=["empty", "garbage", "truncated-png"],
)
def test_probe_image_openerror(data: bytes) -> None:
    """Bytes Pillow cannot open (or verify) are InvalidFile.Openerror."""
    with pytest.raises(MediaError) as err:
        probe_image(data)
    assert (err.value.code, err.value.message) == ("InvalidFile.Openerror", OPEN_ERROR)


def test_probe_image_truncated_png_with_valid_header_is_openerror() -> None:
    """A PNG cut in half (header intact, data chunks missing) fails verify: Openerror."""
    data = sample_person_png()
    with Image.open(io.BytesIO(data[: len(data) // 2])) as im:  # Pillow still opens it lazily...
        assert im.size == (512, 1024)
    with pytest.raises(MediaError) as err:  # ...but verify() catches the truncation
        probe_image(data[: len(data) // 2])
    assert err.value.code == "InvalidFile.Openerror"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_probe_image_other_formats_are_format_errors(fmt: str) -> None:
    """GIF, WEBP and TIFF open in Pillow but are refused with InvalidFile.Format, verbatim."""
    with pytest.raises(MediaError) as err:
        probe_image(encode(solid(100, 100), fmt))
    assert (err.value.code, err.value.message) == ("InvalidFile.Format", FORMAT_ERROR)
    assert str(err.value) == f"InvalidFile.Format: {FORMAT_ERROR}"


def test_probe_image_format_is_checked_before_size_and_dimensions() -> None:
    """A GIF with a bad aspect ratio reports the format, the first rule."""
    with pytest.raises(MediaError) as err:
        probe_image(encode(solid(100, 1000), "GIF"))
    assert err.value.code == "InvalidFile.Format"


def test_probe_image_noise_png_over_5mib_is_size_error() -> None:
    """A 1400x1400 random-noise PNG (over 5 MiB) is InvalidFile.Size."""
    data = encode(Image.frombytes("RGB", (1400, 1400), os.urandom(1400 * 1400 * 3)), "PNG")
    assert len(data) > 5 * MIB
    with pytest.raises(MediaError) as err:
        probe_image(data)
    assert (err.value.code, err.value.message) == (
        "InvalidFile.Size",
        "Invalid file size, The image file size must be smaller than 5MB.",
    )


def test_probe_image_size_limit_is_strictly_below_5mib() -> None:
    """Exactly 5 MiB is refused, one byte less is accepted (trailing bytes after IEND)."""
    png = encode(solid(100, 100), "PNG")
    assert probe_image(png + b"\0" * (5 * MIB - 1 - len(png))).size_bytes == 5 * MIB - 1
    with pytest.raises(MediaError) as err:
        probe_image(png + b"\0" * (5 * MIB - len(png)))
    assert err.value.code == "InvalidFile.Size"


def test_probe_image_size_is_checked_before_dimensions() -> None:
    """A too-big file with a bad aspect ratio reports the size."""
    png = encode(solid(100, 1000), "PNG")
    with pytest.raises(MediaError) as err:
        probe_image(png + b"\0" * (5 * MIB))
    assert err.value.code == "InvalidFile.Size"


@pytest.mark.parametrize(
    ("width", "height"),
    [(100, 250), (250, 100), (100, 4100), (4097, 2100), (2100, 4097)],
    ids=["1:2.5", "2.5:1", "100x4100", "wide-over-4096", "tall-over-4096"],
)
def test_probe_image_dimension_errors(width: int, height: int) -> None:
    """Aspect ratio over 2:1 or a side over 4096 px is InvalidFile.ImageSize."""
    with pytest.raises(MediaError) as err:
        probe_image(encode(solid(width, height, "1"), "PNG"))
    assert (err.value.code, err.value.message) == (
        "InvalidFile.ImageSize",
        "The size of image is beyond limit.",
    )


def test_probe_image_decompression_bomb_is_image_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dimensions Pillow refuses outright (a decompression bomb) are InvalidFile.ImageSize."""
    data = encode(solid(100, 100, "1"), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px is over twice the limit
    with pytest.raises(MediaError) as err:
        probe_image(data)
    assert err.value.code == "InvalidFile.ImageSize"


@pytest.mark.parametrize(("width", "height"), [(100, 200), (200, 100), (4096, 2048), (1, 1)])
def test_probe_image_dimension_limits_are_inclusive(width: int, height: int) -> None:
    """Exactly 2:1 and a 4096 px longest side are accepted."""
    info = probe_image(encode(solid(width, height, "1"), "PNG"))
    assert (info.width, info.height) == (width, height)


# --------------------------------------------------------------------------------- template video

GOOD = VideoInfo(
    container="mov,mp4,m4a,3gp,3g2,mj2",
    codec="h264",
    width=720,
    height=1280,
    fps=30.0,
    duration=10.0,
    size_bytes=10 * MIB,
)


@pytest.mark.parametrize(
    "info",
    [
        GOOD,
        replace(GOOD, container="avi", codec="hevc"),
        replace(GOOD, size_bytes=200 * MIB),
        replace(GOOD, width=200, height=200),
        replace(GOOD, width=2048, height=2048),
        replace(GOOD, fps=24_000 / 1001),
        replace(GOOD, fps=60.0),
        replace(GOOD, duration=2.0),
        replace(GOOD, duration=60.0),
        replace(GOOD, width=600, height=1800),
        replace(GOOD, width=1800, height=600),
    ],
    ids=lambda i: f"{i.container[:4]}-{i.codec}-{i.width}x{i.height}-{i.fps:.2f}-{i.duration}s",
)
def test_check_template_video_accepts_within_limits(info: VideoInfo) -> None:
    """Videos at (or inside) every documented limit are accepted."""
    check_template_video(info)


@pytest.mark.parametrize(
    ("info", "code", "message"),
    [
        (replace(GOOD, container="matroska,webm"), "InvalidFile.Format", FORMAT_ERROR),
        (replace(GOOD, codec="vp9"), "InvalidFile.Format", FORMAT_ERROR),
        (replace(GOOD, codec="mpeg4", size_bytes=300 * MIB, fps=10), "InvalidFile.Format", None),
        (
            replace(GOOD, size_bytes=200 * MIB + 1),
            "InvalidFile.Size",
            "Invalid file size. The video file size must be less than 200MB, "
            "and the duration must be less than 60s.",
        ),
        (replace(GOOD, size_bytes=300 * MIB, width=100), "InvalidFile.Size", None),
        (
            replace(GOOD, width=199),
            "InvalidFile.Resolution",
            "Invalid video resolution. The height or width of video must be 200 ~ 2048.",
        ),
        (replace(GOOD, height=2049), "InvalidFile.Resolution", None),
        (replace(GOOD, width=100, fps=10), "InvalidFile.Resolution", None),
        (
            replace(GOOD, fps=23.8),
            "InvalidFile.FPS",
            "Invalid video FPS. The video FPS must be 24 ~ 60.",
        ),
        (replace(GOOD, fps=15.0, duration=100.0), "InvalidFile.FPS", None),
        (
            replace(GOOD, duration=1.99),
            "InvalidFile.Duration",
            "Invalid file duration. The file duration must be 2 s ~ 60 s.",
        ),
        (replace(GOOD, duration=60.01), "InvalidFile.Duration", None),
        (replace(GOOD, duration=1.0, width=200, height=2000), "InvalidFile.Duration", None),
        (
            replace(GOOD, width=600, height=1801),
            "InvalidFile.AspectRatio",
            "Invalid file ratio. The file aspect ratio (height/width) must be between 3:1 and 1:3.",
        ),
        (replace(GOOD, width=1801, height=600), "InvalidFile.AspectRatio", None),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("InvalidFile.") else None,
)
def test_check_template_video_refusals(info: VideoInfo, code: str, message: str | None) -> None:
    """Each rule raises its DashScope code (earlier rules win when several are broken)."""
    with pytest.raises(MediaError) as err:
        check_template_video(info)
    assert err.value.code == code
    if message is not None:
        assert err.value.message == message


def test_sample_dance_mp4_passes_template_checks(tmp_path: Path) -> None:
    """The default dance sample probes as a 3 s, 24 fps, 360x640 H.264 MP4 and is accepted."""
    path = tmp_path / "dance.mp4"
    sample_dance_mp4(path)
    info = probe_video(path)
    assert info == VideoInfo(
        container="mov,mp4,m4a,3gp,3g2,mj2",
        codec="h264",
        width=360,
        height=640,
        fps=24.0,
        duration=3.0,
        size_bytes=path.stat().st_size,
    )
    check_template_video(info)
    frames = decode_all(path)
    assert len(frames) == 72
    assert _mean_difference(frames[0], frames[6]) > 0.5  # the figure moves
    assert os.listdir(tmp_path) == ["dance.mp4"]  # no temporary file left behind


def test_low_fps_sample_fails_fps_check(tmp_path: Path) -> None:
    """A real 15 fps sample probes at 15 fps and is refused with InvalidFile.FPS."""
    path = tmp_path / "slow.mp4"
    sample_dance_mp4(path, seconds=2.0, fps=15, width=240, height=320)
    info = probe_video(path)
    assert (info.fps, info.duration, info.width, info.height) == (15.0, 2.0, 240, 320)
    with pytest.raises(MediaError) as err:
        check_template_video(info)
    assert err.value.code == "InvalidFile.FPS"


def test_probe_video_garbage_is_openerror(tmp_path: Path) -> None:
    """A file PyAV cannot open is InvalidFile.Openerror."""
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"\x00\x01garbage" * 1000)
    with pytest.raises(MediaError) as err:
        probe_video(path)
    assert (err.value.code, err.value.message) == ("InvalidFile.Openerror", OPEN_ERROR)


def test_probe_video_audio_only_is_openerror(tmp_path: Path) -> None:
    """A file with no video stream (a WAV) is InvalidFile.Openerror."""
    path = tmp_path / "audio.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(b"\0\0" * 8000)
    with pytest.raises(MediaError) as err:
        probe_video(path)
    assert err.value.code == "InvalidFile.Openerror"


def test_probe_video_of_an_image_fails_the_format_check(tmp_path: Path) -> None:
    """A PNG posing as the template opens in PyAV but is refused as InvalidFile.Format."""
    path = tmp_path / "person.png"
    path.write_bytes(sample_person_png())
    info = probe_video(path)
    assert info.codec == "png"
    with pytest.raises(MediaError) as err:
        check_template_video(info)
    assert err.value.code == "InvalidFile.Format"


def test_probe_video_missing_file_is_a_caller_error(tmp_path: Path) -> None:
    """A path that does not exist raises FileNotFoundError, not a DashScope refusal."""
    with pytest.raises(FileNotFoundError):
        probe_video(tmp_path / "nope.mp4")


# --------------------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    ("seconds", "frames"),
    [(4.0, 60), (2.0, 30), (0.01, 1), (0.0, 1), (1.0 / 15, 1), (3.3, 50), (60.0, 900)],
)
def test_output_frame_count_and_duration(seconds: float, frames: int) -> None:
    """round(seconds * 15) frames, at least one; the duration is that many 1/15 s frames."""
    assert output_frame_count(seconds) == frames
    assert output_duration(seconds) == frames / OUTPUT_FPS


def _image(frame: av.VideoFrame) -> Image.Image:
    """A decoded frame as an RGB Pillow image."""
    image: Image.Image = frame.to_image()  # type: ignore[no-untyped-call]
    return image


def _mean_difference(a: av.VideoFrame, b: av.VideoFrame) -> float:
    """Mean absolute per-channel difference between two decoded frames (0-255)."""
    diff = ImageChops.difference(_image(a), _image(b))
    return sum(ImageStat.Stat(diff).mean) / 3


def test_render_animation_is_h264_15fps_with_exact_frames(rendered: Path) -> None:
    """The render is a yuv420p H.264 MP4 at 15 fps, 30 frames, no audio, exactly 2 s long."""
    with av.open(str(rendered)) as container:
        assert container.format.name == "mov,mp4,m4a,3gp,3g2,mj2"
        assert len(container.streams.audio) == 0
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.codec_context.width, stream.codec_context.height) == (144, 256)
        assert stream.average_rate == OUTPUT_FPS
        assert stream.frames == 30
        frames = list(container.decode(stream))
    assert len(frames) == output_frame_count(2.0) == 30
    assert [round(f.time * OUTPUT_FPS, 6) for f in frames] == list(range(30))
    info = probe_video(rendered)
    assert abs(info.duration - output_duration(2.0)) < 1e-9  # observed: exactly equal
    assert info.fps == OUTPUT_FPS


def test_render_animation_frames_move(rendered: Path) -> None:
    """The frames are animated: not one static picture."""
    frames = decode_all(rendered)
    distinct = {_image(f).tobytes() for f in frames}
    assert len(distinct) > len(frames) // 2
    assert _mean_difference(frames[0], frames[7]) > 0.5  # a quarter sway apart


def test_render_animation_returns_nominal_duration_and_is_atomic(tmp_path: Path) -> None:
    """It returns output_duration, the probe agrees, and only the target file is left."""
    out = tmp_path / "result.mp4"
    image = encode(solid(300, 300), "JPEG")
    assert render_animation(image, 1.3, out, width=144, height=192) == output_duration(1.3)
    assert probe_video(out).duration == pytest.approx(output_duration(1.3), abs=1e-9)
    assert len(decode_all(out)) == output_frame_count(1.3) == 20
    assert os.listdir(tmp_path) == ["result.mp4"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    """This process's umask (read by setting and restoring it)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def test_render_animation_replaces_an_existing_file(tmp_path: Path) -> None:
    """An existing target is replaced whole."""
    out = tmp_path / "result.mp4"
    out.write_bytes(b"old")
    render_animation(sample_person_png(128, 256), 0.2, out, width=144, height=256)
    assert len(decode_all(out)) == 3


def test_render_animation_bad_image_leaves_nothing(tmp_path: Path) -> None:
    """An image that cannot be decoded raises Openerror and writes no file."""
    with pytest.raises(MediaError) as err:
        render_animation(b"nope", 1.0, tmp_path / "x.mp4", width=144, height=256)
    assert err.value.code == "InvalidFile.Openerror"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(("width", "height"), [(145, 256), (144, 255), (0, 256)])
def test_render_animation_needs_even_sizes(tmp_path: Path, width: int, height: int) -> None:
    """yuv420p needs even, positive dimensions: anything else is a ValueError."""
    with pytest.raises(ValueError, match="even"):
        render_animation(sample_person_png(), 1.0, tmp_path / "x.mp4", width=width, height=height)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------- padding


def test_pad_mp4_small_pads_are_exact_and_still_decode(rendered: Path, tmp_path: Path) -> None:
    """Padding by 8 bytes (the smallest box) or 1000 bytes gives the exact size and same video."""
    src_size = rendered.stat().st_size
    for gap in (8, 1000):
        dst = tmp_path / f"pad{gap}.mp4"
        pad_mp4(rendered, dst, src_size + gap)
        data = dst.read_bytes()
        assert len(data) == src_size + gap
        assert data[:src_size] == rendered.read_bytes()
        assert data[src_size : src_size + 8] == struct.pack(">I4s", gap, b"free")
        assert len(decode_all(dst)) == 30
        assert probe_video(dst).duration == probe_video(rendered).duration


def test_pad_mp4_50mb_is_fast_sparse_and_decodes(rendered: Path, tmp_path: Path) -> None:
    """A 50 MB pad takes no time and (almost) no disk, and the video still plays the same."""
    dst = tmp_path / "big.mp4"
    total = 50 * 1000 * 1000
    started = time.perf_counter()
    pad_mp4(rendered, dst, total)
    assert time.perf_counter() - started < 1.0
    stat = dst.stat()
    assert stat.st_size == total
    assert stat.st_blocks * 512 < total // 10
    frames = decode_all(dst)
    assert len(frames) == 30
    info = probe_video(dst)
    assert info.duration == probe_video(rendered).duration
    assert info.size_bytes == total
    assert os.listdir(tmp_path) == ["big.mp4"]


def test_pad_mp4_over_4gib_uses_largesize(rendered: Path, tmp_path: Path) -> None:
    """A gap over 2**32-1 bytes gets a 64-bit largesize free box; the file is sparse."""
    dst = tmp_path / "huge.mp4"
    src_size = rendered.stat().st_size
    gap = 2**32 + 100
    pad_mp4(rendered, dst, src_size + gap)
    stat = dst.stat()
    assert stat.st_size == src_size + gap
    if stat.st_blocks * 512 > 100 * MIB:
        pytest.fail("the pad was not sparse")
    with dst.open("rb") as f:
        f.seek(src_size)
        assert f.read(16) == struct.pack(">I4sQ", 1, b"free", gap)
    assert len(decode_all(dst)) == 30


def test_pad_mp4_without_growth_is_a_plain_copy(rendered: Path, tmp_path: Path) -> None:
    """A total at or below the source size copies the source unchanged."""
    src_size = rendered.stat().st_size
    for total in (src_size, src_size - 1, 0):
        dst = tmp_path / "copy.mp4"
        pad_mp4(rendered, dst, total)
        assert dst.read_bytes() == rendered.read_bytes()


@pytest.mark.parametrize("gap", [1, 7])
def test_pad_mp4_gap_too_small_for_a_box(rendered: Path, tmp_path: Path, gap: int) -> None:
    """A gap of 1-7 bytes cannot hold a free box: ValueError, and no file is written."""
    with pytest.raises(ValueError, match="free box"):
        pad_mp4(rendered, tmp_path / "x.mp4", rendered.stat().st_size + gap)
    assert os.listdir(tmp_path) == []
