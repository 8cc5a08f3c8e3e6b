"""What a model profile holds: everything specific to one remote model family, as data.

A profile names the remote models a job uses (the video model, and where the family has them the
image detector and the template maker) with their endpoints and prices; the steps a job of the
family runs; the documented limits of its inputs; the names of its request and result fields;
DashScope's documented quotas for it; and the regions that serve it. The code reads these from
the profile the deployment selected (``DASHSCOPE_MODEL``), never from constants of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RemoteModel:
    """One model on DashScope's async task API, at ``/services/aigc/{service}/{endpoint}``."""

    name: str
    service: str
    endpoint: str
    price_cny_per_second: float | None = None  # of output video (usage.video_duration)
    free_seconds: int = 0  # the free quota of a new account

    @property
    def path(self) -> str:
        return f"/services/aigc/{self.service}/{self.endpoint}"


@dataclass(frozen=True)
class ImageLimits:
    """The person image the model accepts (documented; checked before anything is paid)."""

    formats: tuple[str, ...]
    max_bytes: int  # strictly under this
    max_side: int
    max_aspect: float
    min_side: int = 1


@dataclass(frozen=True)
class VideoLimits:
    """A source video the model accepts (the dance video a template is made from)."""

    formats: tuple[str, ...]  # containers
    codecs: tuple[str, ...]  # empty: none documented, any is taken
    max_bytes: int
    sides: tuple[int, int]  # each side within
    min_fps: float
    seconds: tuple[float, float]
    max_aspect: float


@dataclass(frozen=True)
class Quotas:
    """DashScope's documented limits per account and model. The fleet spends less
    (DASHSCOPE_*_RATE), so jitter never earns a 429."""

    submits_per_second: float
    queries_per_second: float
    detects_per_second: float
    running_tasks: int


@dataclass(frozen=True)
class ModelProfile:
    video: RemoteModel
    steps: tuple[str, ...]  # the steps a video job of this family runs, in order
    image: ImageLimits
    input_fields: Mapping[str, str]  # our request field -> the API's input field
    parameters: tuple[str, ...]  # request fields sent as the API's parameters
    result_video_field: str  # in a SUCCEEDED task's output
    result_seconds_field: str  # in its usage: the billed seconds
    quotas: Quotas
    regions: Mapping[str, str]  # region -> API base URL
    detect: RemoteModel | None = None
    template: RemoteModel | None = None
    template_video: VideoLimits | None = None
    # A family that takes the dance video with every job (no templates): its limits.
    input_video: VideoLimits | None = None
    # Modes (parameters.mode) -> price in CNY per second of output; empty: the family has none.
    modes: Mapping[str, float] = field(default_factory=dict)
    retires: str | None = None  # Model Studio's announced retirement date
    successor: str | None = None  # the model Model Studio's guide points to instead
    # Where a SUCCEEDED task's video URL is, in order of preference (dotted paths in output).
    result_video_paths: tuple[str, ...] = ("video_url",)

    @property
    def name(self) -> str:
        return self.video.name

    @property
    def takes_templates(self) -> bool:
        """Whether a job names its motion by an action template (AnimateAnyone) rather than
        sending the dance video with every call (Wan2.2-Animate)."""
        return self.input_video is None

    def price_per_second(self, mode: str | None) -> float | None:
        """CNY per second of output video for a job in ``mode`` (None: not known)."""
        if self.modes:
            return self.modes.get(mode or "")
        return self.video.price_cny_per_second

    def remote(self, kind: str) -> RemoteModel:
        """The model behind a kind of call: ``video``, ``template`` or ``detect``."""
        chosen = {"video": self.video, "template": self.template, "detect": self.detect}.get(kind)
        if chosen is None:
            raise KeyError(f"{self.name} has no {kind} model")
        return chosen
