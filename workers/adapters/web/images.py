"""Looking at a producer's image before paying for it: fetch it, hash it, let Pillow read the header.

The whole image is read (DashScope takes at most 5 MB; reading stops one byte past that), because
its SHA-256 keys the cache of DashScope's image check: the same image is not checked twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import time
import warnings
from collections.abc import Callable

import httpx
from PIL import Image, UnidentifiedImageError

from workers.adapters.web.fetch import Deadline, guarded_get
from workers.adapters.web.guard import AddressGuard
from workers.domain.media import ImageFacts
from workers.errors import InvalidJobRequest, TransientError
from workers.models import ANIMATE_ANYONE_GEN2

HEADER_BYTES = 256 * 1024  # enough for PNG/BMP headers and JPEG SOF after ordinary EXIF blocks
_TOTAL = re.compile(r"/(\d+)\s*$")


class ImageUnavailable(TransientError):
    code = "ImageUnavailable"


class HttpImageProbe:
    """Reads an image's format and size over HTTP with an injected ``httpx.Client``.

    Every URL, the first and each redirect's target, passes the address guard first, and the
    connection goes to the address it approved (workers.adapters.web.fetch: no DNS rebinding), so a producer
    cannot make a worker fetch from inside the network. The whole download is bounded by
    ``total_seconds`` (per-read timeouts alone let a slow drip hold a worker).
    """

    def __init__(
        self,
        http: httpx.Client,
        guard: AddressGuard | None = None,
        *,
        total_seconds: float = 30.0,
        max_bytes: int = ANIMATE_ANYONE_GEN2.image.max_bytes,  # the model's limit
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.guard = guard or AddressGuard()
        self.max_bytes = max_bytes
        self.total_seconds = total_seconds
        self.clock = clock

    def probe(self, url: str, *, trusted: bool = False) -> ImageFacts:
        """``trusted``: our own bucket's presigned URL, which the address guard need not vet."""
        deadline = Deadline(self.total_seconds, self.clock)
        try:
            with guarded_get(
                self.http,
                url,
                guard=None if trusted else self.guard,
                field="image_url",
                unreachable_code="InvalidImage.Unreachable",
            ) as response:
                return self._read(response, deadline)
        except httpx.HTTPError as exc:
            raise ImageUnavailable(f"fetching the image failed: {type(exc).__name__}") from exc

    def _read(self, response: httpx.Response, deadline: Deadline) -> ImageFacts:
        if response.status_code >= 500 or response.status_code == 429:
            raise ImageUnavailable(f"image URL answered HTTP {response.status_code}")
        if response.status_code not in (200, 206):
            raise InvalidJobRequest(
                f"image URL answered HTTP {response.status_code}",
                code="InvalidImage.Unreachable",
            )
        size = self._size(response)
        if size is not None and size >= self.max_bytes:
            return ImageFacts(None, size, 1, 1)  # refused on its size; not worth reading
        body = bytearray()
        for chunk in response.iter_bytes():
            deadline.check(ImageUnavailable)
            body += chunk
            if len(body) >= self.max_bytes:
                return facts_from_header(bytes(body[:HEADER_BYTES]), len(body), self.max_bytes)
        facts = facts_from_header(bytes(body), len(body), self.max_bytes)
        return dataclasses.replace(facts, sha256=hashlib.sha256(body).hexdigest())

    @staticmethod
    def _size(response: httpx.Response) -> int | None:
        if response.status_code == 206:
            match = _TOTAL.search(response.headers.get("content-range", ""))
            return int(match.group(1)) if match else None
        length = response.headers.get("content-length")
        return int(length) if length and length.isdigit() else None


def facts_from_header(
    head: bytes, size: int | None, max_bytes: int = ANIMATE_ANYONE_GEN2.image.max_bytes
) -> ImageFacts:
    """Format and dimensions from the first bytes of an image, or an InvalidJobRequest."""
    if size is not None and size >= max_bytes:
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
