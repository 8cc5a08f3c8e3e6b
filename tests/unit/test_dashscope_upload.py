"""DashScopeClient.upload through httpx.MockTransport: getPolicy, the OSS form post, error mapping."""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from workers.adapters.dashscope.client import DashScopeClient
from workers.errors import (
    DashScopeBadResponse,
    DashScopeRejected,
    DashScopeThrottled,
    DashScopeUnavailable,
)

KEY = "sk-unit-upload-8d2f4e61a9c0"
BASE = "https://dashscope.test/api/v1"
HOST = "https://dashscope-file-test.oss-cn-beijing.aliyuncs.com"
UPLOAD_DIR = "dashscope-instant/acct/2025-01-01/abc123"
MODEL = "animate-anyone-detect-gen2"
REQUEST_ID = "52f4383a-c67d-9f8c-0000-000000000000"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64

Reply = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


def policy_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "policy": "eyJleHBpcmF0aW9uIjoxfQ==",
        "signature": "c2lnbmF0dXJl",
        "upload_dir": UPLOAD_DIR,
        "upload_host": HOST,
        "expire_in_seconds": 300,
        "max_file_size_mb": 10,
        "capacity_limit_mb": 999999999,
        "oss_access_key_id": "LTAItest",
        "x_oss_object_acl": "private",
        "x_oss_forbid_overwrite": "true",
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def policy(**changes: Any) -> httpx.Response:
    return httpx.Response(200, json={"request_id": REQUEST_ID, "data": policy_data(**changes)})


def oss_error(status: int, code: str, message: str) -> httpx.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n'
        f"  <Code>{code}</Code>\n  <Message>{message}</Message>\n"
        "  <RequestId>65D4C3B2A1</RequestId>\n  <HostId>oss</HostId>\n</Error>\n"
    )
    return httpx.Response(status, text=body, headers={"Content-Type": "application/xml"})


class Server:
    """Records requests and plays queued replies back in order."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            if isinstance(reply, httpx.RequestError):
                reply.request = request
            raise reply
        if isinstance(reply, httpx.Response):
            return reply
        return reply(request)


def make(*replies: Reply, **client_kwargs: Any) -> tuple[DashScopeClient, Server]:
    server = Server(*replies)
    http = httpx.Client(transport=httpx.MockTransport(server), timeout=7, **client_kwargs)
    return DashScopeClient(http, api_key=KEY, base_url=BASE), server


def form_parts(request: httpx.Request) -> list[tuple[str, str | None, str | None, bytes]]:
    """(name, filename, content type, body) of each multipart part, in wire order."""
    head = f"Content-Type: {request.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.content)
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        parts.append(
            (
                str(part.get_param("name", header="content-disposition")),
                part.get_filename(),
                part.get_content_type() if part.get("Content-Type") else None,
                payload,
            )
        )
    return parts


def assert_no_key(exc: BaseException) -> None:
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert all(KEY not in str(arg) for arg in exc.args)


class TestRequests:
    def test_policy_then_form_post_in_sdk_order(self) -> None:
        """getPolicy with the key, then a multipart post to upload_host in the SDK's field order."""
        client, server = make(policy(), httpx.Response(200))
        url = client.upload(MODEL, "person.png", PNG)
        assert url == f"oss://{UPLOAD_DIR}/person.png"

        get, post = server.requests
        assert get.method == "GET"
        assert get.url.copy_with(query=None) == f"{BASE}/uploads"
        assert dict(get.url.params) == {"action": "getPolicy", "model": MODEL}
        assert get.headers["Authorization"] == f"Bearer {KEY}"

        assert post.method == "POST"
        assert str(post.url) == HOST
        assert post.headers["Content-Type"].startswith("multipart/form-data; boundary=")
        parts = form_parts(post)
        assert [p[0] for p in parts] == [
            "OSSAccessKeyId",
            "Signature",
            "policy",
            "key",
            "x-oss-object-acl",
            "x-oss-forbid-overwrite",
            "success_action_status",
            "x-oss-content-type",
            "file",
        ]
        fields = {name: body.decode() for name, _, _, body in parts[:-1]}
        assert fields == {
            "OSSAccessKeyId": "LTAItest",
            "Signature": "c2lnbmF0dXJl",
            "policy": "eyJleHBpcmF0aW9uIjoxfQ==",
            "key": f"{UPLOAD_DIR}/person.png",
            "x-oss-object-acl": "private",
            "x-oss-forbid-overwrite": "true",
            "success_action_status": "200",
            "x-oss-content-type": "image/png",
        }
        assert parts[-1][1:] == ("person.png", "image/png", PNG)

    def test_no_key_goes_to_the_upload_host(self) -> None:
        """Neither the request headers nor client defaults (headers, auth) reach the upload host."""
        client, server = make(
            policy(),
            httpx.Response(200),
            headers={"Authorization": f"Bearer {KEY}"},
            auth=httpx.BasicAuth("user", KEY),
        )
        client.upload(MODEL, "person.png", PNG)
        _, post = server.requests
        assert "Authorization" not in post.headers
        assert KEY.encode() not in post.content
        assert all(KEY not in value for value in post.headers.values())

    def test_explicit_and_guessed_content_types(self) -> None:
        """content_type wins; otherwise it is guessed from the name, else octet-stream."""
        client, server = make(
            policy(),
            httpx.Response(200),
            policy(),
            httpx.Response(200),
            policy(),
            httpx.Response(200),
        )
        client.upload(MODEL, "clip.mp4", b"x")
        client.upload(MODEL, "blob", b"x")
        client.upload(MODEL, "person.png", b"x", content_type="image/x-test")
        posts = server.requests[1::2]
        types = [dict((n, b) for n, _, _, b in form_parts(p))["x-oss-content-type"] for p in posts]
        assert types == [b"video/mp4", b"application/octet-stream", b"image/x-test"]

    def test_size_cap_refused_without_posting(self) -> None:
        """Over max_file_size_mb: InvalidFile.Size, and only the policy request was made."""
        client, server = make(policy(max_file_size_mb=1))
        with pytest.raises(DashScopeRejected) as caught:
            client.upload(MODEL, "big.png", b"\0" * (1024 * 1024 + 1))
        assert caught.value.code == "InvalidFile.Size"
        assert caught.value.status == 400
        assert [r.method for r in server.requests] == ["GET"]

    def test_exactly_the_cap_is_posted(self) -> None:
        client, server = make(policy(max_file_size_mb=1), httpx.Response(200))
        client.upload(MODEL, "edge.png", b"\0" * (1024 * 1024))
        assert [r.method for r in server.requests] == ["GET", "POST"]


class TestErrors:
    @pytest.mark.parametrize(
        ("status", "kind", "code"),
        [
            (429, DashScopeThrottled, "Throttling.RateQuota"),
            (500, DashScopeUnavailable, "InternalError"),
            (401, DashScopeRejected, "InvalidApiKey"),
        ],
    )
    def test_policy_errors_map_like_every_call(
        self, status: int, kind: type[Exception], code: str
    ) -> None:
        """The policy request's HTTP errors map as _send maps them; nothing is posted."""
        body = {"request_id": REQUEST_ID, "code": code, "message": f"no ({KEY})"}
        client, server = make(httpx.Response(status, json=body))
        with pytest.raises(kind) as caught:
            client.upload(MODEL, "person.png", PNG)
        assert type(caught.value) is kind
        assert getattr(caught.value, "code", None) == code
        assert f"HTTP {status}" in str(caught.value)
        assert_no_key(caught.value)
        assert len(server.requests) == 1

    def test_policy_transport_error(self) -> None:
        client, _ = make(httpx.ConnectError("refused"))
        with pytest.raises(DashScopeUnavailable, match="upload policy: could not connect"):
            client.upload(MODEL, "person.png", PNG)

    @pytest.mark.parametrize(
        "reply",
        [
            httpx.Response(200, text='{"data": {"policy": "abc"'),
            httpx.Response(200, json=["not", "an", "object"]),
            httpx.Response(200, json={"request_id": REQUEST_ID}),
            httpx.Response(200, json={"data": "policy"}),
        ],
        ids=["garbled", "list", "no-data", "data-not-object"],
    )
    def test_garbled_policy(self, reply: httpx.Response) -> None:
        client, server = make(reply)
        with pytest.raises(DashScopeBadResponse, match="upload policy"):
            client.upload(MODEL, "person.png", PNG)
        assert len(server.requests) == 1

    @pytest.mark.parametrize(
        "field",
        [
            "policy",
            "signature",
            "upload_dir",
            "upload_host",
            "oss_access_key_id",
            "x_oss_object_acl",
            "x_oss_forbid_overwrite",
            "max_file_size_mb",
        ],
    )
    def test_missing_policy_field(self, field: str) -> None:
        """Each field the post needs is required; nothing is posted without it."""
        client, server = make(policy(**{field: None}))
        with pytest.raises(DashScopeBadResponse, match=f"data.{field} missing"):
            client.upload(MODEL, "person.png", PNG)
        assert len(server.requests) == 1

    @pytest.mark.parametrize(
        "changes",
        [
            {"max_file_size_mb": "100"},
            {"max_file_size_mb": True},
            {"max_file_size_mb": 0},
            {"signature": 42},
            {"upload_host": "ftp://files.test/"},
            {"upload_host": "file:///etc/passwd"},
            {"upload_host": "oss-cn-beijing.aliyuncs.com"},
        ],
    )
    def test_bad_policy_values(self, changes: dict[str, Any]) -> None:
        client, server = make(policy(**changes))
        with pytest.raises(DashScopeBadResponse, match="upload policy: data"):
            client.upload(MODEL, "person.png", PNG)
        assert len(server.requests) == 1

    def test_upload_403_with_oss_xml(self) -> None:
        """OSS's XML Code becomes the error code; its Message and RequestId are in the text."""
        client, _ = make(
            policy(), oss_error(403, "AccessDenied", "Invalid according to Policy: Policy expired.")
        )
        with pytest.raises(DashScopeRejected) as caught:
            client.upload(MODEL, "person.png", PNG)
        assert caught.value.code == "AccessDenied"
        assert caught.value.status == 403
        assert "Policy expired." in str(caught.value)
        assert "65D4C3B2A1" in str(caught.value)
        assert str(caught.value).startswith("AccessDenied: upload: HTTP 403")

    def test_upload_4xx_without_xml(self) -> None:
        client, _ = make(policy(), httpx.Response(400, text="<html>bad request</html>"))
        with pytest.raises(DashScopeRejected) as caught:
            client.upload(MODEL, "person.png", PNG)
        assert caught.value.code == "HTTP400"
        assert "bad request" in str(caught.value)

    @pytest.mark.parametrize("status", [500, 503])
    def test_upload_5xx_is_unavailable(self, status: int) -> None:
        client, _ = make(policy(), oss_error(status, "InternalError", "We encountered an error."))
        with pytest.raises(DashScopeUnavailable) as caught:
            client.upload(MODEL, "person.png", PNG)
        assert type(caught.value) is DashScopeUnavailable
        assert caught.value.code == "InternalError"

    def test_upload_429_is_throttled(self) -> None:
        client, _ = make(policy(), httpx.Response(429))
        with pytest.raises(DashScopeThrottled):
            client.upload(MODEL, "person.png", PNG)

    @pytest.mark.parametrize(
        ("exc", "text"),
        [
            (httpx.ConnectError("refused"), "could not connect"),
            (httpx.ReadTimeout("slow"), "read timed out"),
            (httpx.RemoteProtocolError("hung up"), "connection dropped"),
        ],
    )
    def test_upload_transport_errors(self, exc: Exception, text: str) -> None:
        client, _ = make(policy(), exc)
        with pytest.raises(DashScopeUnavailable, match=f"upload: {text}"):
            client.upload(MODEL, "person.png", PNG)

    def test_key_never_in_upload_errors(self) -> None:
        """Even an upload host that echoes the key does not get it into the error."""
        client, _ = make(policy(), oss_error(403, f"Bad{KEY}", f"key {KEY} refused"))
        with pytest.raises(DashScopeRejected) as caught:
            client.upload(MODEL, "person.png", PNG)
        assert_no_key(caught.value)
        assert "***" in str(caught.value)

    def test_key_never_in_size_refusal(self) -> None:
        client, _ = make(policy(max_file_size_mb=1))
        with pytest.raises(DashScopeRejected) as caught:
            client.upload(MODEL, "person.png", b"\0" * (2 * 1024 * 1024))
        assert_no_key(caught.value)


class TestArguments:
    @pytest.mark.parametrize(
        "filename",
        [
            "",
            ".",
            "..",
            "dir/person.png",
            "../person.png",
            "/abs.png",
            "dir\\person.png",
            "person\n.png",
            "person\x00.png",
            "person\x7f.png",
            "tab\t.png",
            "q?.png",
            "frag#.png",
            "pct%2F.png",
            "x" * 256,
        ],
    )
    def test_bad_filename_refused_before_any_request(self, filename: str) -> None:
        client, server = make()
        with pytest.raises(ValueError, match="filename"):
            client.upload(MODEL, filename, PNG)
        assert server.requests == []

    @pytest.mark.parametrize("filename", ["person.png", "my photo.jpg", "人物.png", "a-b_c.v2.mp4"])
    def test_plain_names_accepted(self, filename: str) -> None:
        client, _ = make(policy(), httpx.Response(200))
        assert client.upload(MODEL, filename, PNG) == f"oss://{UPLOAD_DIR}/{filename}"

    @pytest.mark.parametrize("model", ["", "animate anyone", "gen2\n"])
    def test_bad_model_refused(self, model: str) -> None:
        client, server = make()
        with pytest.raises(ValueError, match="model"):
            client.upload(model, "person.png", PNG)
        assert server.requests == []
