"""Webhooks: a receiver checks the Standard Webhooks signature and de-duplicates retries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from workers.producer import AnimateQueue

pytestmark = pytest.mark.timeout(120)


class Receiver:
    """A receiver as a producer would write one, from the scheme's text, not from our code."""

    def __init__(self, secret: str, fail_first: int) -> None:
        self.key = base64.b64decode(secret.removeprefix("whsec_"))
        self.fail_first = fail_first
        self.attempts = 0
        self.bad_signatures = 0
        self.seen: dict[str, dict[str, Any]] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                code = receiver.handle(dict(self.headers), body)
                self.send_response(code)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/video"

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        self.attempts += 1
        msg_id, stamp = headers["webhook-id"], headers["webhook-timestamp"]
        signed = f"{msg_id}.{stamp}.".encode() + body
        expected = base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest()).decode()
        offered = [s.split(",", 1)[1] for s in headers["webhook-signature"].split() if "," in s]
        if not any(hmac.compare_digest(expected, s) for s in offered):
            self.bad_signatures += 1
            return 401
        if abs(time.time() - int(stamp)) > 300:
            return 401
        if self.attempts <= self.fail_first:
            return 503  # the receiver is not up yet
        self.seen.setdefault(msg_id, json.loads(body))  # a retry of a known id changes nothing
        return 200


@pytest.fixture
def receiver(remote: Any) -> Iterator[Receiver]:
    r = Receiver(remote.webhook_secret, fail_first=2)
    r.thread.start()
    yield r
    r.server.shutdown()


def test_webhook_signed_retried_deduplicated(
    queue: AnimateQueue, remote: Any, receiver: Receiver, job_id: str
) -> None:
    """The receiver fails twice, then takes one signed delivery; the job records it."""
    queue.submit(remote.image(), remote.template(), job_id=job_id)
    queue.celery.send_task("animate.generate", queue="celery", kwargs={
        "image_url": remote.image(), "template_id": remote.template(),
        "job_id": f"{job_id}-w", "webhook_url": receiver.url})  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        view = queue.store.get(f"{job_id}-w")
        if view is not None and view.webhook_state == "delivered":
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    assert receiver.bad_signatures == 0
    assert receiver.attempts == 3
    assert list(receiver.seen) == [f"msg_{job_id}-w"]
    payload = receiver.seen[f"msg_{job_id}-w"]
    assert payload["type"] == "job.finished"
    assert payload["data"]["state"] == "STORED" and payload["data"]["job_id"] == f"{job_id}-w"
    assert view.webhook_attempts == 3 and view.webhook_delivered_at is not None
    assert remote.api_key not in json.dumps(payload)


def test_webhook_to_internal_address_is_refused(
    queue: AnimateQueue, remote: Any, job_id: str
) -> None:
    """A webhook_url at an internal address is refused at intake, before anything is paid."""
    queue.celery.send_task("animate.generate", queue="celery", kwargs={
        "image_url": remote.image(), "template_id": remote.template(), "job_id": job_id,
        "webhook_url": "http://10.0.0.7/hook"})  # fmt: skip
    view = queue.wait(job_id, timeout=30)
    assert (view["state"], view["error_code"]) == ("REJECTED", "InvalidRequest.PrivateAddress")
    assert remote.counters().get("submitted", 0) == 0
