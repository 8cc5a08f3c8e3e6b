"""A model is a profile: the endpoints, model names, input limits and field names the code uses
all come from the profile DASHSCOPE_MODEL selects, so adding a model is one profile (plus its
emulator behaviour)."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest

from config.settings import load_settings
from workers import bootstrap, models
from workers.adapters.dashscope.api import DashScopeVideoApi
from workers.adapters.dashscope.client import DashScopeClient, VideoRequest
from workers.domain.media import ImageFacts, check_image
from workers.errors import DashScopeRejected, InvalidJobRequest
from workers.models import ANIMATE_ANYONE_GEN2 as AA

# A made-up family on the same task API: other names, endpoints, limits and input field names.
OTHER = dataclasses.replace(
    AA,
    video=models.RemoteModel("made-up-video", "video-generation", "made-up-synthesis"),
    detect=models.RemoteModel("made-up-detect", "image2video", "made-up-detect"),
    template=None,
    template_video=None,
    image=dataclasses.replace(AA.image, max_side=300, formats=("PNG",)),
    input_fields={"image_url": "img_url", "template_id": "ref_template"},
)


def test_the_first_profile_is_animate_anyone() -> None:
    assert models.PROFILES["animate-anyone-gen2"] is AA
    assert AA.remote("template").name == "animate-anyone-template-gen2"
    assert AA.remote("detect").path == "/services/aigc/image2video/aa-detect"
    assert AA.quotas.running_tasks == 1 and AA.video.price_cny_per_second == 0.08
    with pytest.raises(ValueError, match=r"known: animate-anyone-gen2, wan2\.2-animate-mix, wan"):
        models.profile("made-up-model")


def test_the_selected_profile_reaches_the_steps_and_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(models, "PROFILES", {**models.PROFILES, OTHER.name: OTHER})
    settings = load_settings({"DASHSCOPE_MODEL": "made-up-video",
                              "DASHSCOPE_API_KEY": "sk-test-models", "S3_BUCKET": "b"})  # fmt: skip
    svc = bootstrap.build_services(settings)
    assert svc.profile is OTHER
    assert isinstance(svc.api, DashScopeVideoApi) and svc.api.profile is OTHER
    assert svc.api.model_for("detect") == "made-up-detect"
    # Templates are the family's that makes them (AnimateAnyone, served beside the default)...
    assert svc.api.model_for("template") == "animate-anyone-template-gen2"
    # ...and nobody's where only the default is served.
    only = load_settings({"DASHSCOPE_MODEL": "made-up-video", "DASHSCOPE_MODELS": "made-up-video",
                          "DASHSCOPE_API_KEY": "sk-test-models", "S3_BUCKET": "b"})  # fmt: skip
    api = bootstrap.build_services(only).api
    assert isinstance(api, DashScopeVideoApi)
    with pytest.raises(DashScopeRejected, match="no model here makes template calls"):
        api.model_for("template")


def test_the_client_sends_to_the_profiles_endpoints_with_its_field_names() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path.endswith("made-up-detect"):
            return httpx.Response(200, json={"output": {"check_pass": True}})
        return httpx.Response(200, json={"output": {"task_id": "t1", "task_status": "PENDING"}})

    http = httpx.Client(transport=httpx.MockTransport(answer))
    client = DashScopeClient(http, api_key="sk-x", base_url="https://ds.test/api/v1",
                             profile=OTHER)  # fmt: skip
    client.submit_video(VideoRequest("https://cdn.test/a.png", "T-1"))
    client.detect("https://cdn.test/a.png")
    assert [r.url.path for r in sent] == [
        "/api/v1/services/aigc/video-generation/made-up-synthesis",
        "/api/v1/services/aigc/image2video/made-up-detect",
    ]
    body = json.loads(sent[0].content)
    assert body["model"] == "made-up-video"
    assert body["input"] == {"img_url": "https://cdn.test/a.png", "ref_template": "T-1"}
    assert json.loads(sent[1].content)["model"] == "made-up-detect"


def test_input_limits_are_the_profiles() -> None:
    facts = ImageFacts("PNG", 10_000, 400, 400)
    check_image(facts, AA.image)  # fine for AnimateAnyone
    with pytest.raises(InvalidJobRequest) as refused:
        check_image(facts, OTHER.image)
    assert (
        refused.value.code == "InvalidImage.LongestSide" and "at most 300" in refused.value.message
    )
    with pytest.raises(InvalidJobRequest) as refused:
        check_image(dataclasses.replace(facts, format="JPEG", width=200, height=200), OTHER.image)
    assert refused.value.code == "InvalidImage.Format" and "one of PNG" in refused.value.message


# ------------------------------------------------------------------ Wan2.2-Animate (issue 17)

MOVE, MIX = models.WAN_ANIMATE_MOVE, models.WAN_ANIMATE_MIX
WAN_JOB = {"image_url": "https://cdn.test/a.png", "video_url": "https://cdn.test/d.mp4",
           "mode": "wan-pro"}  # fmt: skip


def test_the_wan_profiles_hold_the_documented_facts() -> None:
    """successor-models.md: one call at image2video/video-synthesis, 2-30 s videos, images of
    200-4096 px up to 1:3, 5 submits/s and one running task per account, prices per mode."""
    for wan in (MOVE, MIX):
        assert wan.video.path == "/services/aigc/image2video/video-synthesis"
        assert not wan.takes_templates and wan.detect is None and wan.template is None
        assert wan.input_video is not None and wan.input_video.seconds == (2.0, 30.0)
        assert (wan.image.min_side, wan.image.max_side, wan.image.max_aspect) == (200, 4096, 3.0)
        assert "WEBP" in wan.image.formats
        assert (wan.quotas.submits_per_second, wan.quotas.running_tasks) == (5.0, 1)
        assert set(wan.regions) == {"cn-beijing", "ap-southeast-1"}
    assert (MOVE.price_per_second("wan-std"), MOVE.price_per_second("wan-pro")) == (0.4, 0.6)
    assert (MIX.price_per_second("wan-std"), MIX.price_per_second("wan-pro")) == (0.6, 0.9)
    assert MIX.price_per_second(None) is None and AA.price_per_second(None) == 0.08
    assert AA.successor == "wan2.2-animate-move" and AA.retires == "2026-10-10"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"template_id": "AACT.x.y"}, "InvalidRequest.TemplateForModel"),
        ({"detect": False}, "InvalidRequest.NotForModel"),
        ({"use_ref_img_bg": True}, "InvalidRequest.NotForModel"),
        ({"mode": None}, "InvalidRequest.Mode"),
        ({"mode": "wan-max"}, "InvalidRequest.Mode"),
        ({"video_url": None}, "InvalidRequest.MissingField"),
        ({"check_image": "yes"}, "InvalidRequest.BadType"),
        ({"model": "wan2.2-animate-mix"}, "InvalidRequest.Model"),
        ({"colour": "red"}, "InvalidRequest.UnknownField"),
    ],
)
def test_a_wan_request_is_checked_against_its_profile(change: dict[str, object], code: str) -> None:
    from workers.domain.request import parse_request

    kwargs = {**WAN_JOB, **change}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with pytest.raises(InvalidJobRequest) as refused:
        parse_request(kwargs, (), MOVE)
    assert refused.value.code == code, refused.value.message


def test_a_wan_request_parses_and_animate_anyone_refuses_wan_fields() -> None:
    from workers.domain.request import parse_request

    request = parse_request({**WAN_JOB, "model": "wan2.2-animate-move", "check_image": False},
                            (), MOVE)  # fmt: skip
    assert (request.mode, request.video_url, request.detect, request.check_image) == (
        "wan-pro", "https://cdn.test/d.mp4", False, False,
    )  # fmt: skip
    aa_job = {"image_url": "https://cdn.test/a.png", "template_id": "AACT.x.y"}
    assert parse_request({**aa_job, "model": "animate-anyone-gen2"}).model == "animate-anyone-gen2"
    for extra, code in (({"mode": "wan-std"}, "InvalidRequest.NotForModel"),
                        ({"model": "wan2.2-animate-move"}, "InvalidRequest.Model")):  # fmt: skip
        with pytest.raises(InvalidJobRequest) as refused:
            parse_request({**aa_job, **extra})
        assert refused.value.code == code


def test_the_client_sends_a_wan_job_in_one_call_and_reads_results_video_url() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.method == "POST":
            return httpx.Response(200, json={"output": {"task_id": "t1", "task_status": "PENDING"}})
        return httpx.Response(200, json={
            "output": {"task_id": "t1", "task_status": "SUCCEEDED",
                       "results": {"video_url": "https://oss.test/v.mp4"}},
            "usage": {"video_duration": 4.2, "video_ratio": "standard"},
        })  # fmt: skip

    http = httpx.Client(transport=httpx.MockTransport(answer))
    client = DashScopeClient(http, api_key="sk-x", base_url="https://ds.test/api/v1", profile=MIX)
    client.submit_video(VideoRequest("https://cdn.test/a.png", video_url="https://cdn.test/d.mp4",
                                     mode="wan-std", check_image=False))  # fmt: skip
    body = json.loads(sent[0].content)
    assert sent[0].url.path == "/api/v1/services/aigc/image2video/video-synthesis"
    assert sent[0].headers["X-DashScope-Async"] == "enable"
    assert body == {
        "model": "wan2.2-animate-mix",
        "input": {"image_url": "https://cdn.test/a.png", "video_url": "https://cdn.test/d.mp4"},
        "parameters": {"mode": "wan-std", "check_image": False},
    }
    task = client.get_task("t1")
    assert (task.video_url, task.video_duration) == ("https://oss.test/v.mp4", 4.2)


# ------------------------------------------------------------------ retirement


def test_a_model_close_to_or_past_its_retirement_is_announced() -> None:
    from datetime import date

    from workers.models.retirement import retirement_notice

    assert retirement_notice(MOVE, date(2026, 12, 6)) is None  # no date announced
    assert retirement_notice(AA, date(2026, 9, 1)) is None  # 39 days ahead
    soon = retirement_notice(AA, date(2026, 9, 20))
    assert soon is not None and not soon.retired and soon.days_left == 20
    assert "in 20 days" in soon.message and "wan2.2-animate-move" in soon.message
    past = retirement_notice(AA, date(2026, 12, 6))
    assert past is not None and past.retired and past.days_left == -57
    assert "57 days ago" in past.message and "successor is wan2.2-animate-move" in past.message


def test_a_model_dashscope_says_is_gone_fails_calls_at_once_naming_the_successor() -> None:
    """The first 404 ModelNotFound becomes ModelRetired naming the successor; the calls after it
    (the jobs queued behind) fail the same way without reaching DashScope: no retry storm."""
    from workers.adapters.dashscope.api import MODEL_GONE
    from workers.domain.request import JobRequest
    from workers.errors import DashScopeRejected

    calls: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(404, json={"code": "ModelNotFound",
                                         "message": "The model animate-anyone-gen2 does not exist."})  # fmt: skip

    http = httpx.Client(transport=httpx.MockTransport(answer))
    client = DashScopeClient(http, api_key="sk-x", base_url="https://ds.test/api/v1", profile=AA)
    api = DashScopeVideoApi({"default": client}, AA)
    request = JobRequest("https://cdn.test/a.png", "AACT.x.y")
    for _ in range(5):
        with pytest.raises(DashScopeRejected) as refused:
            api.submit("default", request)
        assert refused.value.code == MODEL_GONE
        assert "no longer serves animate-anyone-gen2" in refused.value.message
        assert "successor is wan2.2-animate-move" in refused.value.message
    assert len(calls) == 1
    with pytest.raises(DashScopeRejected) as other:  # per model: the detector is still asked
        api.detect("default", "https://cdn.test/a.png")
    assert len(calls) == 2 and other.value.code == MODEL_GONE


def test_a_refused_key_is_reported_with_its_region() -> None:
    """A 401 is not a generic refusal: it names the account, the host and the region, and says
    that a key works only in the region it was made in."""
    from workers.domain.request import JobRequest
    from workers.errors import DashScopeRejected

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"code": "InvalidApiKey",
                                         "message": "Invalid API-key provided."})  # fmt: skip

    http = httpx.Client(transport=httpx.MockTransport(answer))
    url = "https://dashscope-intl.aliyuncs.com/api/v1"
    client = DashScopeClient(http, api_key="sk-secret-1234", base_url=url, profile=MOVE)
    api = DashScopeVideoApi({"sg": client}, MOVE, regions={"sg": ("ap-southeast-1", url)})
    with pytest.raises(DashScopeRejected) as refused:
        api.submit("sg", JobRequest("https://cdn.test/a.png", video_url="https://cdn.test/d.mp4",
                                    mode="wan-std"))  # fmt: skip
    message = refused.value.message
    assert refused.value.code == "InvalidApiKey" and refused.value.status == 401
    assert "account 'sg'" in message and "dashscope-intl.aliyuncs.com" in message
    assert "region ap-southeast-1" in message and "only in the region it was created in" in message
    assert "sk-secret-1234" not in message


def test_each_call_goes_to_the_jobs_own_model_whatever_the_default() -> None:
    """With a Wan model as the default, an AnimateAnyone job (named, or recorded before jobs
    named models) is sent to animate-anyone-gen2 with its template, and its image check and
    template calls go to AnimateAnyone's own detect and template models."""
    from workers.domain.request import JobRequest

    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path.endswith("aa-detect"):
            return httpx.Response(200, json={"output": {"check_pass": True, "bodystyle": "full"}})
        return httpx.Response(200, json={"output": {"task_id": "t1", "task_status": "PENDING"}})

    http = httpx.Client(transport=httpx.MockTransport(answer))
    client = DashScopeClient(http, api_key="sk-x", base_url="https://ds.test/api/v1", profile=MOVE)
    api = DashScopeVideoApi({"default": client}, MOVE, profiles={AA.name: AA, MIX.name: MIX})
    api.submit("default", JobRequest("https://cdn.test/a.png", "AACT.x.y", model=AA.name))
    api.detect("default", "https://cdn.test/a.png")
    api.submit_template("default", "https://cdn.test/d.mp4")
    api.submit("default", JobRequest("https://cdn.test/a.png", video_url="https://cdn.test/d.mp4",
                                     mode="wan-pro", model=MIX.name))  # fmt: skip
    bodies = [json.loads(r.content) for r in sent]
    assert [b["model"] for b in bodies] == [
        "animate-anyone-gen2", "animate-anyone-detect-gen2", "animate-anyone-template-gen2",
        "wan2.2-animate-mix",
    ]  # fmt: skip
    assert bodies[0]["input"] == {"image_url": "https://cdn.test/a.png", "template_id": "AACT.x.y"}
    assert api.model_for("video:wan2.2-animate-mix") == "wan2.2-animate-mix"


def test_a_model_gone_for_one_accounts_key_is_not_gone_for_another() -> None:
    from workers.domain.request import JobRequest
    from workers.errors import DashScopeRejected

    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        key = request.headers["Authorization"]
        calls.append(key)
        if key.endswith("sg-key"):
            return httpx.Response(404, json={"code": "ModelNotFound", "message": "no such model"})
        return httpx.Response(200, json={"output": {"task_id": "t1", "task_status": "PENDING"}})

    http = httpx.Client(transport=httpx.MockTransport(answer))
    clients = {name: DashScopeClient(http, api_key=f"sk-{name}-key",
                                     base_url="https://ds.test/api/v1", profile=MOVE)
               for name in ("sg", "bj")}  # fmt: skip
    api = DashScopeVideoApi(clients, MOVE)
    request = JobRequest("https://cdn.test/a.png", video_url="https://cdn.test/d.mp4",
                         mode="wan-std", model=MOVE.name)  # fmt: skip
    for _ in range(2):
        with pytest.raises(DashScopeRejected):
            api.submit("sg", request)
    assert api.submit("bj", request) == "t1"
    assert len(calls) == 2  # sg once (then refused here), bj once
