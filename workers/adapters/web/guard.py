"""Where this service may send its own requests: no loopback, private or link-local addresses
(SSRF), unless an operator allowlists them; and which hosts a result video may come from.

Pure policy over :mod:`ipaddress`; name resolution is injected so tests can lie about DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from workers.errors import InvalidJobRequest

Resolver = Callable[[str], list[str]]


def system_resolver(host: str) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6)."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class AddressGuard:
    """Refuses URLs whose host is, or resolves to, an internal address.

    ``allow`` holds host names and networks (``127.0.0.1``, ``10.0.0.0/8``, ``minio.internal``)
    that are allowed anyway, so local emulators and test servers work when configured.
    """

    allow: tuple[str, ...] = ()
    resolver: Resolver = system_resolver

    @classmethod
    def from_setting(cls, value: str, resolver: Resolver = system_resolver) -> AddressGuard:
        return cls(tuple(v.strip() for v in value.split(",") if v.strip()), resolver)

    def _allowed(self, host: str, address: str | None = None) -> bool:
        for entry in self.allow:
            if host.lower() == entry.lower():
                return True
            if address is None:
                continue
            try:
                if ipaddress.ip_address(address) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False

    def check(self, url: str, field: str = "image_url") -> None:
        """Raise ``InvalidJobRequest`` unless ``url`` may be fetched by this service."""
        self.approve(url, field)

    def approve(self, url: str, field: str = "image_url") -> str | None:
        """The address to connect to for ``url`` (one its host resolved to, every one of them
        checked), so that nothing resolves the name a second time (DNS rebinding); None for a
        host an operator allowlisted by name. Raises ``InvalidJobRequest`` as ``check``."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise InvalidJobRequest(
                f"{field} must be http or https, not {parts.scheme or 'nothing'!r}",
                code="InvalidRequest.BadUrl",
            )
        host = parts.hostname
        if not host:
            raise InvalidJobRequest(f"{field} has no host", code="InvalidRequest.BadUrl")
        if self._allowed(host):
            return host if _is_ip(host) else None
        try:
            addresses = [host] if _is_ip(host) else self.resolver(host)
        except (OSError, UnicodeError) as exc:
            raise InvalidJobRequest(
                f"{field}'s host {host!r} does not resolve ({type(exc).__name__})",
                code="InvalidImage.Unreachable",
            ) from None
        if not addresses:
            raise InvalidJobRequest(
                f"{field}'s host {host!r} does not resolve", code="InvalidImage.Unreachable"
            )
        for address in addresses:
            if _internal(address) and not self._allowed(host, address):
                raise InvalidJobRequest(
                    f"{field} points at an internal address ({address}); such URLs are refused",
                    code="InvalidRequest.PrivateAddress",
                )
        return addresses[0].split("%", 1)[0]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _internal(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )
