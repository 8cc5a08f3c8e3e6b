"""Action templates and image detections as records: lanes, ids, what the store keeps of them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

TEMPLATE_LANE_SUFFIX = ":template"  # ":" never appears in an account name


def template_lane(account: str) -> str:
    return account + TEMPLATE_LANE_SUFFIX


def template_job_id(account: str, source_sha256: str, generation: int) -> str:
    """The id of the template job the workers start for a dance video: one per account, video
    and generation, so two jobs asking at once share one paid template."""
    return f"tpl.{source_sha256[:40]}.{account}.{generation}"


@dataclass(frozen=True)
class Detection:
    """The detector's answer (animate-anyone-detect-gen2)."""

    check_pass: bool
    bodystyle: str | None = None  # full | half ("" when the check fails)
    reason: str | None = None


HalfBodyPolicy = str  # "reject" | "warn"


HALF_BODY_WARNING = (
    "the image shows half a body and use_ref_img_bg is false: DashScope invents the legs "
    "(its docs advise against it)"
)


@dataclass(frozen=True)
class TemplateInfo:
    """A known action template: its owner, and the dance video it was made from (if ours)."""

    template_id: str
    account: str
    source_sha256: str | None = None
    source_url: str | None = None
    job_id: str | None = None
    created_at: float | None = None
    video_seconds: float | None = None
    revoked: bool = False  # DashScope stopped accepting it

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields.pop("template_id")
        return json.dumps(fields, separators=(",", ":"))


@dataclass(frozen=True)
class TemplateSource:
    """One account's template for one dance video, and the job making (or that made) it."""

    template_id: str | None = None
    job_id: str | None = None
    generation: int = 0
