"""workers.adapters.web.videos on real files: PyAV probes of generated clips, each template limit refused with
its exact code, and the capped, guarded, hashed download through httpx.MockTransport."""

from __future__ import annotations

import dataclasses
import hashlib
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from devstack.media import can_encode, make_image, make_video
from emulator.media import pad_mp4
from workers.adapters.web.guard import AddressGuard
from workers.adapters.web.images import facts_from_header
from workers.adapters.web.videos import HttpVideoProbe, VideoUnavailable, probe_file
from workers.domain.media import VideoFacts, check_image, check_template_video
from workers.errors import InvalidJobRequest, TransientError
from workers.models import ANIMATE_ANYONE_GEN2 as AA

ASSETS = Path(__file__).parents[2] / "devstack" / "assets"
PUBLIC = "93.184.216.34"

assert AA.template_video is not None
LIMITS = AA.template_video


def refusal(facts: VideoFacts) -> str:
    with pytest.raises(InvalidJobRequest) as caught:
        check_template_video(facts, LIMITS)
    return caught.value.code


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid template: 3 s, 24 fps, 360x640, H.264 in MP4."""
    return make_video(tmp_path_factory.mktemp("clip") / "dance.mp4")


# ----------------------------------------------------------------------------- probe_file


def test_probe_reads_a_valid_clip(clip: Path) -> None:
    facts = probe_file(clip)
    assert facts.format == "mp4"
    assert facts.codec == "h264"
    assert (facts.width, facts.height) == (360, 640)
    assert facts.fps == pytest.approx(24.0)
    assert facts.seconds == pytest.approx(3.0, abs=0.05)
    assert facts.byte_size == clip.stat().st_size
    assert facts.sha256 == hashlib.sha256(clip.read_bytes()).hexdigest()
    check_template_video(facts, LIMITS)


def test_probe_keeps_a_given_hash(clip: Path) -> None:
    assert probe_file(clip, sha256="abc").sha256 == "abc"


def test_the_bundled_dance_passes() -> None:
    path = ASSETS / "dance.mp4"
    facts = probe_file(path)
    check_template_video(facts, LIMITS)
    assert (facts.format, facts.codec, facts.width, facts.height) == ("mp4", "h264", 360, 640)
    assert facts.fps == pytest.approx(24.0)
    assert facts.seconds == pytest.approx(3.0, abs=0.05)
    assert facts.byte_size < 200_000


@pytest.mark.parametrize(
    ("name", "container", "expected"),
    [
        ("clip.mov", None, "mov"),
        ("clip.avi", None, "avi"),
        ("clip.mkv", None, "matroska"),  # PyAV says "matroska,webm"
        ("clip.mp4", "mov", "mov"),  # the ftyp brand ("qt  ") decides, not the name
        ("clip.mov", "mp4", "mp4"),
    ],
)
def test_container_names(tmp_path: Path, name: str, container: str | None, expected: str) -> None:
    facts = probe_file(make_video(tmp_path / name, seconds=2.5, container=container))
    assert facts.format == expected
    assert facts.codec == "h264"
    assert facts.seconds == pytest.approx(2.5, abs=0.05)


def test_mov_and_avi_pass(tmp_path: Path) -> None:
    for name in ("clip.mov", "clip.avi"):
        check_template_video(probe_file(make_video(tmp_path / name, seconds=2.5)), LIMITS)


@pytest.mark.skipif(not can_encode("hevc"), reason="this PyAV build has no H.265 encoder")
def test_hevc_passes(tmp_path: Path) -> None:
    facts = probe_file(make_video(tmp_path / "clip.mp4", codec="hevc", seconds=2.5))
    assert (facts.format, facts.codec) == ("mp4", "hevc")
    check_template_video(facts, LIMITS)


@pytest.mark.parametrize(
    ("name", "options", "code"),
    [
        ("clip.mkv", {}, "InvalidVideo.Format"),
        ("clip.avi", {"codec": "mpeg4"}, "InvalidVideo.Codec"),
        ("clip.mp4", {"codec": "mpeg4"}, "InvalidVideo.Codec"),
        ("clip.mp4", {"width": 160, "height": 320}, "InvalidVideo.Resolution"),
        ("clip.mp4", {"width": 2100, "height": 800, "seconds": 2.1}, "InvalidVideo.Resolution"),
        ("clip.mp4", {"fps": 15}, "InvalidVideo.FPS"),
        ("clip.mp4", {"seconds": 1.0}, "InvalidVideo.Duration"),
        ("clip.mp4", {"width": 200, "height": 200, "seconds": 61.0}, "InvalidVideo.Duration"),
        ("clip.mp4", {"width": 200, "height": 700, "seconds": 2.1}, "InvalidVideo.AspectRatio"),
    ],
)
def test_each_limit_is_refused_with_its_code(
    tmp_path: Path, name: str, options: dict[str, Any], code: str
) -> None:
    facts = probe_file(make_video(tmp_path / name, **options))
    # The probe saw what was written, so the refusal is about that property alone.
    assert facts.width == options.get("width", 360)
    assert facts.height == options.get("height", 640)
    assert facts.fps == pytest.approx(options.get("fps", 24))
    assert facts.seconds == pytest.approx(options.get("seconds", 3.0), abs=0.05)
    assert facts.codec == options.get("codec", "h264")
    assert refusal(facts) == code


def test_too_large_a_file_is_refused(tmp_path: Path, clip: Path) -> None:
    big = tmp_path / "big.mp4"
    pad_mp4(clip, big, LIMITS.max_bytes + 1)  # a trailing sparse `free` box: still a playable MP4
    facts = probe_file(big)
    assert (facts.format, facts.codec, facts.byte_size) == ("mp4", "h264", LIMITS.max_bytes + 1)
    assert refusal(facts) == "InvalidVideo.Size"


def test_size_limit_boundary(clip: Path) -> None:
    facts = probe_file(clip)
    check_template_video(dataclasses.replace(facts, byte_size=LIMITS.max_bytes), LIMITS)
    assert (
        refusal(dataclasses.replace(facts, byte_size=LIMITS.max_bytes + 1)) == "InvalidVideo.Size"
    )


def unreadable(facts: VideoFacts) -> bool:
    return (facts.codec, facts.width, facts.height, facts.fps, facts.seconds) == (None, 0, 0, 0, 0)


def test_a_text_file_named_mp4_is_refused_as_format(tmp_path: Path) -> None:
    path = tmp_path / "dance.mp4"
    path.write_text("this is not a video\n" * 50)
    facts = probe_file(path)
    assert facts.format is None and unreadable(facts)
    assert facts.byte_size == path.stat().st_size
    assert facts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert refusal(facts) == "InvalidVideo.Format"


@pytest.mark.parametrize(
    "content", [b"", b"\x00" * 100_000, b"\x00\x00\x00\x18ftypisom" + b"x" * 40]
)
def test_garbage_is_refused_not_raised(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(content)
    facts = probe_file(path)
    assert unreadable(facts)
    assert refusal(facts) == "InvalidVideo.Format"


def test_a_cut_short_download_is_refused(tmp_path: Path, clip: Path) -> None:
    path = tmp_path / "half.mp4"
    path.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # the moov box is at the end
    facts = probe_file(path)
    assert unreadable(facts)
    assert refusal(facts) == "InvalidVideo.Format"


def test_an_image_is_refused_as_format(tmp_path: Path) -> None:
    facts = probe_file(make_image(tmp_path / "person.png"))
    assert facts.format == "png_pipe"  # FFmpeg reads a PNG as a one-frame video
    assert refusal(facts) == "InvalidVideo.Format"


def test_a_playlist_cannot_make_ffmpeg_open_other_files(tmp_path: Path, clip: Path) -> None:
    # Opened by path, FFmpeg's HLS demuxer would read the clip (or fetch a URL) and report h264.
    playlist = tmp_path / "dance.mp4"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:3\n#EXTINF:3,\n{clip}\n#EXT-X-ENDLIST\n")
    facts = probe_file(playlist)
    assert facts.format is None and unreadable(facts)


def test_a_missing_file_is_a_caller_bug(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        probe_file(tmp_path / "nope.mp4")


# ----------------------------------------------------------------------------- devstack.media


def test_make_image_writes_a_usable_person_with_text_chunks(tmp_path: Path) -> None:
    path = make_image(tmp_path / "person.png", text={"emulator_detect": "no_person"})
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (512, 768))
        assert image.text == {"emulator_detect": "no_person"}  # type: ignore[attr-defined]
    check_image(facts_from_header(path.read_bytes(), path.stat().st_size), AA.image)
    with Image.open(make_image(tmp_path / "person.jpg", 300, 500, fmt="JPEG")) as image:
        assert (image.format, image.size) == ("JPEG", (300, 500))
    with pytest.raises(ValueError, match="PNG"):
        make_image(tmp_path / "x.jpg", fmt="JPEG", text={"emulator_detect": "x"})


def test_make_video_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        make_video(tmp_path / "odd.mp4", width=361)
    with pytest.raises(ValueError, match="container"):
        make_video(tmp_path / "clip.xyz")
    with pytest.raises(RuntimeError, match="vp9"):
        make_video(tmp_path / "clip.mkv", codec="vp9")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# ----------------------------------------------------------------------------- HttpVideoProbe

Handler = Callable[[httpx.Request], httpx.Response]


def served(body: bytes, **headers: str) -> httpx.Response:
    """A streamed response, as a real transport gives (a bytes body would arrive pre-read)."""
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]
    return httpx.Response(
        200, headers={"content-length": str(len(body)), **headers}, content=iter(chunks)
    )


class Resolver:
    """Every name is public; records which hosts the guard looked up."""

    def __init__(self) -> None:
        self.hosts: list[str] = []

    def __call__(self, host: str) -> list[str]:
        self.hosts.append(host)
        if host.endswith(".invalid"):
            raise OSError("no such host")
        return [PUBLIC]


def public_guard() -> AddressGuard:
    return AddressGuard(resolver=lambda host: [PUBLIC])


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.fixture
def resolver() -> Resolver:
    return Resolver()


@pytest.fixture
def make_probe(spool: Path, resolver: Resolver) -> Callable[..., HttpVideoProbe]:
    def make(handler: Handler, **kwargs: Any) -> HttpVideoProbe:
        http = httpx.Client(transport=httpx.MockTransport(handler))
        return HttpVideoProbe(http, AddressGuard(resolver=resolver), tmp_dir=str(spool), **kwargs)

    return make


def test_download_probes_and_hashes(
    make_probe: Callable[..., HttpVideoProbe], spool: Path, clip: Path
) -> None:
    body = clip.read_bytes()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return served(body)

    facts = make_probe(handler).probe("https://cdn.example/videos/dance.mp4?sig=1")
    assert facts == probe_file(clip)
    assert facts.sha256 == hashlib.sha256(body).hexdigest()
    assert seen[0].headers["accept-encoding"] == "identity"
    assert list(spool.iterdir()) == []


def test_redirects_are_followed_and_each_hop_guarded(
    make_probe: Callable[..., HttpVideoProbe], resolver: Resolver, clip: Path
) -> None:
    hops = {
        "a.example": httpx.Response(302, headers={"location": "https://b.example/next"}),
        "b.example": httpx.Response(307, headers={"location": "//c.example/dance.mp4"}),
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return hops.get(request.headers["host"]) or served(clip.read_bytes())

    facts = make_probe(handler).probe("https://a.example/start")
    assert facts.format == "mp4"
    assert resolver.hosts == ["a.example", "b.example", "c.example"]


def test_a_redirect_inside_the_network_is_refused(
    make_probe: Callable[..., HttpVideoProbe], spool: Path
) -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.headers["host"])
        return httpx.Response(302, headers={"location": "http://10.0.0.1/latest/meta-data"})

    with pytest.raises(InvalidJobRequest) as caught:
        make_probe(handler).probe("https://cdn.example/dance.mp4")
    assert caught.value.code == "InvalidRequest.PrivateAddress"
    assert hosts == ["cdn.example"]  # 10.0.0.1 was never asked
    assert list(spool.iterdir()) == []


def test_trusted_urls_skip_the_guard(
    make_probe: Callable[..., HttpVideoProbe], resolver: Resolver, clip: Path
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "s3.internal":
            return httpx.Response(302, headers={"location": "http://10.0.0.1/bucket/dance.mp4"})
        return served(clip.read_bytes())

    facts = make_probe(handler).probe("http://s3.internal/bucket/dance.mp4", trusted=True)
    assert facts.codec == "h264"
    assert resolver.hosts == []


def test_too_many_redirects(make_probe: Callable[..., HttpVideoProbe]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": f"/hop{len(request.url.path)}"})

    with pytest.raises(InvalidJobRequest) as caught:
        make_probe(handler).probe("https://cdn.example/x")
    assert caught.value.code == "InvalidVideo.Unreachable"


def test_a_redirect_to_a_broken_url(make_probe: Callable[..., HttpVideoProbe]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"location": "http://[::1"})

    # httpx refuses the Location itself (RemoteProtocolError), like any protocol fault: retried.
    with pytest.raises(VideoUnavailable):
        make_probe(handler).probe("https://cdn.example/x")


def test_a_compressed_body_is_refused(make_probe: Callable[..., HttpVideoProbe]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return served(b"\x1f\x8b" + b"\x00" * 100, **{"content-encoding": "gzip"})

    with pytest.raises(InvalidJobRequest) as caught:
        make_probe(handler).probe("https://cdn.example/x.mp4")
    assert caught.value.code == "InvalidVideo.Unreachable"
    assert "gzip" in caught.value.message


def test_a_host_that_does_not_resolve(make_probe: Callable[..., HttpVideoProbe]) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        make_probe(lambda request: httpx.Response(200)).probe("https://gone.invalid/x.mp4")
    assert caught.value.code == "InvalidVideo.Unreachable"


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_trouble_is_transient(
    make_probe: Callable[..., HttpVideoProbe], spool: Path, status: int
) -> None:
    with pytest.raises(VideoUnavailable) as caught:
        make_probe(lambda request: httpx.Response(status)).probe("https://cdn.example/x.mp4")
    assert isinstance(caught.value, TransientError)
    assert caught.value.code == "VideoUnavailable"
    assert str(status) in caught.value.message
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize("status", [404, 403, 206, 204])
def test_other_statuses_are_refused(make_probe: Callable[..., HttpVideoProbe], status: int) -> None:
    with pytest.raises(InvalidJobRequest) as caught:
        make_probe(lambda request: httpx.Response(status)).probe("https://cdn.example/x.mp4")
    assert caught.value.code == "InvalidVideo.Unreachable"
    assert f"HTTP {status}" in caught.value.message


def test_transport_errors_are_transient(make_probe: Callable[..., HttpVideoProbe]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(VideoUnavailable):
        make_probe(handler).probe("https://cdn.example/x.mp4")


def test_a_body_cut_mid_stream_is_transient_and_leaves_nothing(
    make_probe: Callable[..., HttpVideoProbe], spool: Path
) -> None:
    def body() -> Iterator[bytes]:
        yield b"\x00" * 300_000
        raise httpx.ReadError("connection reset")

    with pytest.raises(VideoUnavailable):
        make_probe(lambda request: httpx.Response(200, content=body())).probe("https://c.example/x")
    assert list(spool.iterdir()) == []


def test_a_missing_spool_directory_is_transient(tmp_path: Path, clip: Path) -> None:
    http = httpx.Client(transport=httpx.MockTransport(lambda request: served(clip.read_bytes())))
    probe = HttpVideoProbe(http, public_guard(), tmp_dir=str(tmp_path / "nope"))
    with pytest.raises(VideoUnavailable, match="spool"):
        probe.probe("https://c.example/x.mp4")


def test_the_cap_is_exact(make_probe: Callable[..., HttpVideoProbe], clip: Path) -> None:
    body = clip.read_bytes()

    def handler(request: httpx.Request) -> httpx.Response:
        return served(body)

    facts = make_probe(handler, max_bytes=len(body)).probe("https://c.example/x")
    assert facts.byte_size == len(body)
    with pytest.raises(InvalidJobRequest) as caught:
        make_probe(handler, max_bytes=len(body) - 1).probe("https://c.example/x")
    assert caught.value.code == "InvalidVideo.Size"
    assert f"{len(body)} bytes" in caught.value.message  # from Content-Length, before any read


def test_an_endless_body_is_cut_at_the_cap(
    make_probe: Callable[..., HttpVideoProbe], spool: Path
) -> None:
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        while sent < 50_000_000:
            sent += 100
            yield b"x" * 100

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())  # chunked: no Content-Length

    with pytest.raises(InvalidJobRequest) as caught:
        make_probe(handler, max_bytes=10_000).probe("https://c.example/x")
    assert caught.value.code == "InvalidVideo.Size"
    assert "larger than 10000 bytes" in caught.value.message
    assert sent <= 10_100  # reading stopped at the limit
    assert list(spool.iterdir()) == []


def test_memory_stays_flat_for_a_large_body(
    make_probe: Callable[..., HttpVideoProbe], spool: Path
) -> None:
    piece = bytes(range(256)) * 256  # 64 KiB
    total = 64 * 1024 * 1024

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([piece] * (total // len(piece))))

    expected = hashlib.sha256()
    for _ in range(total // len(piece)):
        expected.update(piece)
    tracemalloc.start()
    try:
        facts = make_probe(handler).probe("https://c.example/big.mp4")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert facts.byte_size == total
    assert facts.sha256 == expected.hexdigest()
    assert facts.format is None  # not a video, but probed without error
    assert peak < 8 * 1024 * 1024
    assert list(spool.iterdir()) == []
