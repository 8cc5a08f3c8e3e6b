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
from workers.errors import InvalidJobRequest
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
    with pytest.raises(ValueError, match="known: animate-anyone-gen2"):
        models.profile("wan2.2-animate-move")


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
    with pytest.raises(KeyError, match="no template model"):
        svc.api.model_for("template")


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
