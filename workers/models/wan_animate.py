"""Wan2.2-Animate (Model Studio): AnimateAnyone's successors on the same async task API. One call
takes the person image and the reference video; there is no detect step and no action template.
``move`` makes the person in the image move like the one in the video; ``mix`` puts the person
in the image into the video. Sources and which facts are secondary:
../shared/docs/successor-models.md and docs/migration-wan.md."""

from __future__ import annotations

from types import MappingProxyType

from workers.models.profile import ImageLimits, ModelProfile, Quotas, RemoteModel, VideoLimits

_IMAGE = ImageLimits(formats=("JPEG", "PNG", "BMP", "WEBP"), max_bytes=5 * 1024 * 1024,
                     max_side=4096, max_aspect=3.0, min_side=200)  # fmt: skip
_VIDEO = VideoLimits(
    formats=("mp4", "mov", "avi"),
    codecs=(),  # none documented
    max_bytes=200 * 1024 * 1024,
    sides=(200, 2048),
    min_fps=0.0,  # none documented
    seconds=(2.0, 30.0),  # AnimateAnyone's templates took up to 60 s
    max_aspect=3.0,
)
# Official for mix (5 submits/s, one running task per account); assumed the same for move.
_QUOTAS = Quotas(submits_per_second=5.0, queries_per_second=20.0, detects_per_second=0.0,
                 running_tasks=1)  # fmt: skip
_REGIONS = MappingProxyType({
    "cn-beijing": "https://dashscope.aliyuncs.com/api/v1",
    "ap-southeast-1": "https://dashscope-intl.aliyuncs.com/api/v1",
})  # fmt: skip


def _wan(name: str, std: float, pro: float) -> ModelProfile:
    return ModelProfile(
        video=RemoteModel(name, "image2video", "video-synthesis"),
        steps=("validate", "prepare", "submit", "poll", "copy", "deliver"),
        image=_IMAGE,
        input_video=_VIDEO,
        input_fields=MappingProxyType({"image_url": "image_url", "video_url": "video_url"}),
        parameters=("mode", "check_image"),
        result_video_field="results.video_url",
        result_seconds_field="video_duration",
        quotas=_QUOTAS,
        regions=_REGIONS,
        modes=MappingProxyType({"wan-std": std, "wan-pro": pro}),
        # Official: output.results.video_url; some sources show output.video_url.
        result_video_paths=("results.video_url", "video_url"),
    )


# Beijing prices per second of output: mix official, move from a secondary source.
WAN_ANIMATE_MOVE = _wan("wan2.2-animate-move", std=0.4, pro=0.6)
WAN_ANIMATE_MIX = _wan("wan2.2-animate-mix", std=0.6, pro=0.9)
