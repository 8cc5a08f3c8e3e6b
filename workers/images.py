"""Looking at a producer's image before paying for it: fetch its first bytes, let Pillow read the header.

Only the header is downloaded (a Range request, or the start of the body when the server ignores
Range); the byte size comes from ``Content-Range`` or ``Content-Length``.
"""

from __future__ import annotations

import io
import re
import warnings

import httpx
from PIL import Image, UnidentifiedImageError

from workers.errors import InvalidJobRequest, TransientError
from workers.guard import AddressGuard
from workers.jobs import IMAGE_MAX_BYTES, ImageFacts

HEADER_BYTES = 256 * 1024  # enough for PNG/BMP headers and JPEG SOF after ordinary EXIF blocks
_TOTAL = re.compile(r"/(\d+)\s*$")


class ImageUnavailable(TransientError):
    code = "ImageUnavailable"


class HttpImageProbe:
    """Reads an image's format and size over HTTP with an injected ``httpx.Client``.

    Every URL, the first and each redirect's target, passes the address guard first, so a
    producer cannot make a worker fetch from inside the network.
    """

    MAX_REDIRECTS = 5

    def __init__(self, http: httpx.Client, guard: AddressGuard | None = None) -> None:
        self.http = http
        self.guard = guard or AddressGuard()

    def probe(self, url: str) -> ImageFacts:
        try:
            for _ in range(self.MAX_REDIRECTS + 1):
                self.guard.check(url)
                with self.http.stream(
                    "GET",
                    url,
                    headers={"Range": f"bytes=0-{HEADER_BYTES - 1}"},
                    follow_redirects=False,
                ) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = str(response.url.join(response.headers["location"]))
                        continue
                    return self._read(response)
        except httpx.HTTPError as exc:
            raise ImageUnavailable(f"fetching the image failed: {type(exc).__name__}") from exc
        raise InvalidJobRequest(
            f"image_url redirects more than {self.MAX_REDIRECTS} times",
            code="InvalidImage.Unreachable",
        )

    def _read(self, response: httpx.Response) -> ImageFacts:
        if response.status_code >= 500 or response.status_code == 429:
            raise ImageUnavailable(f"image URL answered HTTP {response.status_code}")
        if response.status_code not in (200, 206):
            raise InvalidJobRequest(
                f"image URL answered HTTP {response.status_code}",
                code="InvalidImage.Unreachable",
            )
        size = self._size(response)
        head = bytearray()
        for chunk in response.iter_bytes():
            head += chunk
            if len(head) >= HEADER_BYTES:
                break
        if size is None and len(head) < HEADER_BYTES:
            size = len(head)  # we read it all
        return facts_from_header(bytes(head), size)

    @staticmethod
    def _size(response: httpx.Response) -> int | None:
        if response.status_code == 206:
            match = _TOTAL.search(response.headers.get("content-range", ""))
            return int(match.group(1)) if match else None
        length = response.headers.get("content-length")
        return int(length) if length and length.isdigit() else None


def facts_from_header(head: bytes, size: int | None) -> ImageFacts:
    """Format and dimensions from the first bytes of an image, or an InvalidJobRequest."""
    if size is not None and size >= IMAGE_MAX_BYTES:
        # Reported before the format, which a header-only read may not settle.
        return ImageFacts(None if not head else _format(head), size, 1, 1)
    try:
        with warnings.catch_warnings():
            # A header announcing more pixels than Pillow allows is a decompression bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(head)) as image:
                return ImageFacts(image.format, size, image.width, image.height)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidJobRequest(
            "image_url declares more pixels than any usable image (a decompression bomb)",
            code="InvalidImage.LongestSide",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidJobRequest(
            "image_url does not point to a readable image (JPEG, PNG or BMP)",
            code="InvalidImage.Unreadable",
        ) from None


def _format(head: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(head)) as image:
            return image.format
    except Exception:
        return None
