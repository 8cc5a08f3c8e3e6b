"""Hostile input from producers and from the remote side: refused precisely, never a crash."""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from workers.adapters.dashscope.client import DashScopeClient
from workers.adapters.web.guard import AddressGuard
from workers.adapters.web.images import HttpImageProbe, facts_from_header
from workers.domain.media import check_image
from workers.domain.request import host_allowed, parse_request
from workers.errors import InvalidJobRequest, TransientError, WorkerError
from workers.models import ANIMATE_ANYONE_GEN2 as AA

PUBLIC = "93.184.216.34"


def resolver(table: dict[str, list[str]]) -> Any:
    def resolve(host: str) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


class TestAddressGuard:
    @pytest.mark.parametrize(
        "address",
        ["127.0.0.1", "10.1.2.3", "172.16.0.9", "192.168.1.1", "169.254.169.254", "0.0.0.0",
         "::1", "fe80::1", "::ffff:10.0.0.1", "224.0.0.1"],
    )  # fmt: skip
    def test_internal_addresses_are_refused(self, address: str) -> None:
        """Loopback, private, link-local (cloud metadata), mapped, multicast: all refused."""
        guard = AddressGuard(resolver=resolver({"evil.test": [address]}))
        with pytest.raises(InvalidJobRequest) as info:
            guard.check("http://evil.test/a.png")
        assert info.value.code == "InvalidRequest.PrivateAddress"

    def test_literal_ip_is_checked_without_dns(self) -> None:
        """A literal internal IP is refused before any lookup."""
        guard = AddressGuard(resolver=resolver({}))
        with pytest.raises(InvalidJobRequest, match="internal address"):
            guard.check("http://[::1]:8080/a.png")

    def test_any_internal_answer_is_enough(self) -> None:
        """A host resolving to a public and a private address is refused (DNS games)."""
        guard = AddressGuard(resolver=resolver({"mixed.test": [PUBLIC, "10.0.0.5"]}))
        with pytest.raises(InvalidJobRequest):
            guard.check("https://mixed.test/a.png")

    def test_public_is_fine(self) -> None:
        """A public address passes."""
        AddressGuard(resolver=resolver({"cdn.test": [PUBLIC]})).check("https://cdn.test/a.png")

    def test_allowlist_by_host_and_network(self) -> None:
        """Allowlisted hosts and networks pass (how the emulator and tests are reached)."""
        guard = AddressGuard.from_setting(
            "127.0.0.1, minio.internal, 10.9.0.0/16",
            resolver=resolver({"minio.internal": ["10.1.1.1"], "s3.internal": ["10.9.3.4"]}),
        )
        guard.check("http://127.0.0.1:9000/a.png")
        guard.check("http://minio.internal/a.png")
        guard.check("http://s3.internal/a.png")
        with pytest.raises(InvalidJobRequest):
            guard.check("http://127.0.0.2/a.png")

    @pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://x/", "ftp://x/a", "//x/a"])
    def test_non_http_schemes(self, url: str) -> None:
        """file:, gopher:, ftp: and scheme-less URLs are refused."""
        with pytest.raises(InvalidJobRequest) as info:
            AddressGuard(resolver=resolver({})).check(url)
        assert info.value.code == "InvalidRequest.BadUrl"

    def test_unresolvable(self) -> None:
        """A host that does not resolve is refused with its own code."""
        with pytest.raises(InvalidJobRequest) as info:
            AddressGuard(resolver=resolver({})).check("http://nowhere.test/a.png")
        assert info.value.code == "InvalidImage.Unreachable"

    def test_video_hosts(self) -> None:
        """Result videos only from the configured host patterns."""
        patterns = ("*.aliyuncs.com", "127.0.0.1")
        assert host_allowed("https://dashscope-result.oss-cn-beijing.aliyuncs.com/x.mp4", patterns)
        assert host_allowed("http://127.0.0.1:8000/x.mp4", patterns)
        assert not host_allowed("https://aliyuncs.com.evil.test/x.mp4", patterns)
        assert not host_allowed("https://169.254.169.254/x.mp4", patterns)


def png_bytes(width: int = 200, height: int = 400, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, fmt)
    return out.getvalue()


def probe_with(handler: Any, table: dict[str, list[str]]) -> HttpImageProbe:
    http = httpx.Client(transport=httpx.MockTransport(handler))
    return HttpImageProbe(http, AddressGuard(resolver=resolver(table)))


class TestImageProbe:
    def test_redirect_to_internal_address_is_refused(self) -> None:
        """A public URL that redirects to the metadata service is refused at the hop."""

        def handler(request: httpx.Request) -> httpx.Response:
            if request.headers["host"] == "cdn.test":  # (the connection goes to its address)
                return httpx.Response(302, headers={"location": "http://169.254.169.254/latest"})
            raise AssertionError("the internal address must never be fetched")

        probe = probe_with(handler, {"cdn.test": [PUBLIC]})
        with pytest.raises(InvalidJobRequest) as info:
            probe.probe("https://cdn.test/me.png")
        assert info.value.code == "InvalidRequest.PrivateAddress"

    def test_redirect_loop(self) -> None:
        """Endless redirects end with a clear refusal."""

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(302, headers={"location": "https://cdn.test/again"})

        with pytest.raises(InvalidJobRequest, match="redirects"):
            probe_with(handler, {"cdn.test": [PUBLIC]}).probe("https://cdn.test/me.png")

    def test_type_lie(self) -> None:
        """A GIF served as image/png is judged by its bytes."""

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                200, content=png_bytes(fmt="GIF"), headers={"content-type": "image/png"}
            )

        facts = probe_with(handler, {"cdn.test": [PUBLIC]}).probe("https://cdn.test/me.png")
        with pytest.raises(InvalidJobRequest) as info:
            check_image(facts, AA.image)
        assert info.value.code == "InvalidImage.Format"

    def test_html_instead_of_image(self) -> None:
        """An HTML page at the image URL is unreadable, not a crash."""

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=b"<html>login</html>")

        with pytest.raises(InvalidJobRequest) as info:
            probe_with(handler, {"cdn.test": [PUBLIC]}).probe("https://cdn.test/me.png")
        assert info.value.code == "InvalidImage.Unreadable"


def bomb_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring huge dimensions, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (
            struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def test_decompression_bomb_is_refused() -> None:
    """A header announcing 100,000 x 100,000 pixels is refused without decoding anything."""
    with pytest.raises(InvalidJobRequest) as info:
        facts_from_header(bomb_header(100_000, 100_000), 60)
    assert info.value.code == "InvalidImage.LongestSide"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = ["image_url", "template_id", "use_ref_img_bg", "video_ratio", "job_id", "metadata",
          "account", "priority", "producer", "extra"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=20), json_values, max_size=10))
def test_intake_schema_never_crashes(kwargs: dict[str, Any]) -> None:
    """Any JSON kwargs either validate or are refused with InvalidJobRequest and a code."""
    try:
        request = parse_request(kwargs)
    except InvalidJobRequest as exc:
        assert exc.code.startswith("InvalidRequest.")
        assert exc.message
    else:
        assert request.image_url.startswith(("http://", "https://"))
        assert request.template_id.startswith("AACT.")


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries({"output": json_values, "usage": json_values}),
        st.fixed_dictionaries(
            {
                "output": st.fixed_dictionaries(
                    {"task_id": st.just("t1"), "task_status": json_values}
                )
            }
        ),
    ),
    st.sampled_from([200, 400, 429, 500]),
)
def test_remote_parser_never_crashes(body: Any, status: int) -> None:
    """Whatever DashScope answers, a query gives a task or one of our errors, never a crash."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=json.dumps(body).encode())

    client = DashScopeClient(
        httpx.Client(transport=httpx.MockTransport(handler)),
        api_key="sk-hypothesis",
        base_url="https://dashscope.test/api/v1",
    )
    try:
        task = client.get_task("t1")
    except WorkerError as exc:
        assert "sk-hypothesis" not in str(exc)
    else:
        assert task.task_id == "t1"


class TestRebindingAndSlowDrip:
    """The address the guard approved is the one connected to (no second lookup), and a whole
    download is bounded, however slowly it drips."""

    def rebinding(self) -> tuple[Any, list[str]]:
        """A resolver that answers a public address once, then an internal one."""
        asked: list[str] = []

        def resolve(host: str) -> list[str]:
            asked.append(host)
            return [PUBLIC] if len(asked) == 1 else ["127.0.0.1"]

        return resolve, asked

    def test_the_image_is_fetched_from_the_address_that_was_checked(self) -> None:
        resolve, asked = self.rebinding()
        seen: list[tuple[str, str, Any]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(
                (request.url.host, request.headers["host"], request.extensions.get("sni_hostname"))
            )
            return httpx.Response(200, content=png_bytes(64, 64))

        http = httpx.Client(transport=httpx.MockTransport(handler))
        HttpImageProbe(http, AddressGuard(resolver=resolve)).probe("https://rebind.test:8443/a.png")
        assert asked == ["rebind.test"]  # one lookup: nothing resolves the name again
        assert seen == [(PUBLIC, "rebind.test:8443", "rebind.test")]  # SNI and cert: the name

    def test_a_webhook_is_posted_to_the_address_that_was_checked(self) -> None:
        from workers.adapters.web.webhooks import HttpWebhooks

        resolve, asked = self.rebinding()
        seen: list[tuple[str, str]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append((request.url.host, request.headers["host"]))
            return httpx.Response(204)

        http = httpx.Client(transport=httpx.MockTransport(handler))
        hooks = HttpWebhooks(http, "whsec_c2VjcmV0", AddressGuard(resolver=resolve))
        hooks.send("https://hooks.test/x", "msg_j1", {"a": 1})
        assert seen == [(PUBLIC, "hooks.test")] and asked == ["hooks.test"]

    def test_a_slow_drip_image_is_given_up_whole(self) -> None:
        """One byte every 10 s never trips a per-read timeout; the total deadline stops it."""
        now = [0.0]

        def drip() -> Any:
            for byte in png_bytes(64, 64):
                now[0] += 10.0
                yield bytes([byte])

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, content=drip())

        http = httpx.Client(transport=httpx.MockTransport(handler))
        probe = HttpImageProbe(http, AddressGuard(resolver=resolver({"slow.test": [PUBLIC]})),
                               total_seconds=30, clock=lambda: now[0])  # fmt: skip
        with pytest.raises(TransientError, match="more than 30 s"):
            probe.probe("https://slow.test/a.png")
        assert now[0] <= 50  # stopped within a chunk or two of the deadline
