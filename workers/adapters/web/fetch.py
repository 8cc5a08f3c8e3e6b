"""Fetching what a producer names (its image, its dance video): every hop through the address
guard, the connection made to the address the guard approved, all of it within a deadline.

Resolving a host to check it, then letting the HTTP client resolve it again, leaves a window for
DNS rebinding: a name that answers a public address to the check and an internal one to the
connection. So the request goes to the approved address itself (the URL's host replaced by it),
with the original ``Host`` header and, for https, the original name for SNI and the certificate
check. Redirects are followed here, one hop at a time, each checked and pinned the same way.

Per-read timeouts do not bound a download that sends one byte just often enough (a slow drip
would hold a worker process for good): :class:`Deadline` bounds the whole of it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx

from workers.adapters.web.guard import AddressGuard
from workers.errors import InvalidJobRequest

MAX_REDIRECTS = 5


@dataclass
class Deadline:
    """The end of a whole download: ``check`` raises ``make_error`` once it has passed."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.started = self.clock()

    def passed(self) -> bool:
        return self.clock() - self.started > self.seconds

    def check(self, make_error: Callable[[str], Exception]) -> None:
        if self.passed():
            raise make_error(f"the download took more than {self.seconds:g} s (a slow source)")


def pinned_request(
    http: httpx.Client,
    url: str,
    guard: AddressGuard | None,
    field: str,
    headers: Mapping[str, str] | None = None,
) -> httpx.Request:
    """A GET of ``url`` that connects to the address the guard approved (``guard`` None: a
    trusted URL, our own bucket's, sent as it is)."""
    address = guard.approve(url, field) if guard is not None else None
    if address is None:
        return http.build_request("GET", url, headers=headers)
    original = httpx.URL(url)
    return http.build_request(
        "GET",
        original.copy_with(host=address),
        headers={**(headers or {}), "Host": original.netloc.decode("ascii")},
        extensions={"sni_hostname": original.host} if original.scheme == "https" else {},
    )


@contextmanager
def guarded_get(
    http: httpx.Client,
    url: str,
    *,
    guard: AddressGuard | None,
    field: str,
    unreachable_code: str,
    headers: Mapping[str, str] | None = None,
) -> Iterator[httpx.Response]:
    """The streamed response at the end of ``url``'s redirects (each hop checked and pinned);
    ``guard`` None trusts every hop. Closed on leaving the block."""
    for _ in range(MAX_REDIRECTS + 1):
        request = pinned_request(http, url, guard, field, headers)
        response = http.send(request, stream=True, follow_redirects=False)
        try:
            if response.is_redirect and "location" in response.headers:
                try:
                    url = str(httpx.URL(url).join(response.headers["location"]))
                except httpx.InvalidURL:
                    raise InvalidJobRequest(
                        f"{field} redirects to an invalid URL", code=unreachable_code
                    ) from None
                continue
            yield response
            return
        finally:
            response.close()
    raise InvalidJobRequest(
        f"{field} redirects more than {MAX_REDIRECTS} times", code=unreachable_code
    )
