"""AnimateAnyone gen2 (Model Studio, Beijing): a checked person image and an action template made
from a dance video become a video. Sources: ../shared/docs/dashscope-api.md (§3 limits, §6
quotas and prices, regions)."""

from __future__ import annotations

from types import MappingProxyType

from workers.models.profile import (
    ImageLimits,
    ModelProfile,
    Quotas,
    RemoteModel,
    VideoLimits,
)

ANIMATE_ANYONE_GEN2 = ModelProfile(
    video=RemoteModel("animate-anyone-gen2", "image2video", "video-synthesis",
                      price_cny_per_second=0.08, free_seconds=1800),
    detect=RemoteModel("animate-anyone-detect-gen2", "image2video", "aa-detect"),
    template=RemoteModel("animate-anyone-template-gen2", "image2video", "aa-template-generation",
                         price_cny_per_second=0.08, free_seconds=1800),
    steps=("validate", "detect", "prepare", "submit", "poll", "copy", "deliver"),
    image=ImageLimits(formats=("JPEG", "PNG", "BMP"), max_bytes=5 * 1024 * 1024,
                      max_side=4096, max_aspect=2.0),
    template_video=VideoLimits(
        formats=("mp4", "mov", "avi"),
        codecs=("h264", "hevc"),  # H.264 / H.265
        max_bytes=200 * 1024 * 1024,
        sides=(200, 2048),
        min_fps=23.9,  # documented as >= 24; slack for 23.976 (NTSC film) clips
        seconds=(2.0, 60.0),
        max_aspect=3.0,  # between 1:3 and 3:1
    ),
    input_fields=MappingProxyType({"image_url": "image_url", "template_id": "template_id"}),
    parameters=("use_ref_img_bg", "video_ratio"),
    result_video_field="video_url",
    result_seconds_field="video_duration",
    quotas=Quotas(submits_per_second=1.0, queries_per_second=20.0, detects_per_second=5.0,
                  running_tasks=1),
    # Beijing only: the family is not offered on dashscope-intl.
    regions=MappingProxyType({"cn-beijing": "https://dashscope.aliyuncs.com/api/v1"}),
    retires="2026-10-10",
    successor="wan2.2-animate-move",
)  # fmt: skip
