"""Model profiles, one per remote model family (workers/models/profile.py says what one holds).
Adding a model is one profile here, plus its behaviour in the emulator."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from workers.models.animate_anyone import ANIMATE_ANYONE_GEN2
from workers.models.profile import ImageLimits, ModelProfile, Quotas, RemoteModel, VideoLimits
from workers.models.wan_animate import WAN_ANIMATE_MIX, WAN_ANIMATE_MOVE

PROFILES: Mapping[str, ModelProfile] = MappingProxyType(
    {profile.name: profile for profile in (ANIMATE_ANYONE_GEN2, WAN_ANIMATE_MOVE, WAN_ANIMATE_MIX)}
)


def profile(name: str) -> ModelProfile:
    """The profile of the video model ``name`` (DASHSCOPE_MODEL); ValueError for an unknown one."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"DASHSCOPE_MODEL={name!r} has no profile; known: {', '.join(sorted(PROFILES))}"
        ) from None


__all__ = [
    "ANIMATE_ANYONE_GEN2",
    "PROFILES",
    "WAN_ANIMATE_MIX",
    "WAN_ANIMATE_MOVE",
    "ImageLimits",
    "ModelProfile",
    "Quotas",
    "RemoteModel",
    "VideoLimits",
    "profile",
]
