"""The emulator's knobs: quotas, task durations, retention and URL lifetime, all settable from the CLI."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

DETECT_MODEL = "animate-anyone-detect-gen2"
TEMPLATE_MODEL = "animate-anyone-template-gen2"
VIDEO_MODEL = "animate-anyone-gen2"
# Wan2.2-Animate (../shared/docs/successor-models.md): one call, the dance video with every job.
WAN_MODELS = ("wan2.2-animate-move", "wan2.2-animate-mix")
WAN_MODES = ("wan-std", "wan-pro")

# endpoint suffix under /services/aigc/image2video/ -> the models it serves
ENDPOINT_MODELS: dict[str, tuple[str, ...]] = {
    "aa-detect": (DETECT_MODEL,),
    "aa-template-generation": (TEMPLATE_MODEL,),
    "video-synthesis": (VIDEO_MODEL, *WAN_MODELS),
}
ASYNC_MODELS = (TEMPLATE_MODEL, VIDEO_MODEL, *WAN_MODELS)


@dataclass
class EmulatorConfig:
    """Everything the emulator can be told at start-up (and most of it later, via the admin API)."""

    # Accepted keys: empty means every non-empty key is accepted and is its own account.
    # Otherwise key -> account name; several keys may share an account (RAM users).
    api_keys: dict[str, str] = field(default_factory=dict)

    # Quotas (per account, per second), documented in §6.4 of the API notes.
    submit_rate: float = 1.0  # per async model
    wan_submit_rate: float = 5.0  # per Wan2.2-Animate model (documented for animate-mix)
    # The region this emulator plays (a DashScope host serves one region), and keys that belong
    # to a region (key -> region): a key of another region is refused with 401 InvalidApiKey,
    # as DashScope refuses it. Keys not listed are accepted in any region.
    region: str = "cn-beijing"
    key_regions: dict[str, str] = field(default_factory=dict)
    # Models answered as if they did not exist (a retired model: 404 ModelNotFound on submit).
    retired_models: list[str] = field(default_factory=list)
    detect_rate: float = 5.0
    query_rate: float = 20.0  # task query, list and cancel together
    policy_rate: float = 100.0  # upload policy, per model
    concurrency: int = 1  # running tasks per (account, model); the rest wait PENDING, FIFO

    # Task durations in seconds (the real service takes minutes).
    preprocess_seconds: float = 0.5
    generation_seconds: float = 2.0
    postprocess_seconds: float = 0.5
    template_seconds: float = 2.0

    retention_seconds: float = 86400.0  # a finished task reads UNKNOWN after this
    list_lag_seconds: float = 0.0  # a new task shows in GET /tasks only this long after submit
    url_ttl_seconds: float = 86400.0  # video_url lifetime, counted from end_time
    upload_ttl_seconds: float = 48 * 3600.0  # oss:// temporary files
    policy_ttl_seconds: float = 300.0  # an upload policy's lifetime

    # Output video: 720P at the job's ratio, unless shrunk for speed.
    video_short_side: int = 720
    video_pad_bytes: int = 0  # pad every output MP4 up to this size (copy benchmarks)
    video_bytes_per_second: int = 0  # throttle result downloads (a slow path); 0: no limit

    fetch_timeout_seconds: float = 10.0  # downloading an input image or video
    seed: int | None = None  # fault injection randomness
    public_url: str | None = (
        None  # base URL put into video_url/upload_host; default from the request
    )

    def account_for(self, key: str) -> str | None:
        """The account a key belongs to, or None when the key is refused."""
        if not key:
            return None
        if self.api_keys:
            return self.api_keys.get(key)
        # An account name must never reveal the key: it shows up in template ids and stats.
        return "acct-" + hashlib.sha256(key.encode()).hexdigest()[:12]
