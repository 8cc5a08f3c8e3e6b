"""Signed webhooks (the Standard Webhooks scheme): ``webhook-id``, ``webhook-timestamp`` and
``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``.

The id is stable per job, so a receiver that sees a retry can tell it already has it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from workers.adapters.web.fetch import pinned_request
from workers.adapters.web.guard import AddressGuard
from workers.errors import PermanentError, TransientError


def secret_bytes(secret: str) -> bytes:
    """``whsec_<base64>`` as the scheme writes secrets; any other string is used as it is."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).decode()


class WebhookUnavailable(TransientError):
    code = "WebhookUnavailable"


class WebhookRefused(PermanentError):
    code = "WebhookRefused"


class HttpWebhooks:
    """Posts signed payloads with an injected ``httpx.Client`` (its timeouts apply)."""

    def __init__(self, http: httpx.Client, secret: str, guard: AddressGuard) -> None:
        self.http = http
        self.secret = secret_bytes(secret) if secret else b""
        self.guard = guard

    def send(self, url: str, msg_id: str, payload: dict[str, Any]) -> None:
        if not self.secret:
            raise WebhookRefused("WEBHOOK_SECRET is not set: webhooks cannot be signed")
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self.secret, msg_id, timestamp, body),
        }
        try:
            # Checked again (DNS may have changed since intake), and sent to the address checked.
            request = pinned_request(self.http, url, self.guard, "webhook_url", headers)
            request = self.http.build_request(
                "POST", request.url, content=body, headers=request.headers,
                extensions=request.extensions,
            )  # fmt: skip
            response = self.http.send(request, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise WebhookUnavailable(f"webhook: {type(exc).__name__}") from exc
        if 200 <= response.status_code < 300:
            return
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise WebhookUnavailable(f"webhook answered HTTP {response.status_code}")
        # Other 4xx (and redirects, not followed): the receiver refuses it; still retried, since
        # receivers often answer 4xx while they are being deployed, but reported as such.
        raise WebhookUnavailable(f"webhook refused with HTTP {response.status_code}")
