"""``make demo``'s program runs end to end and leaves a playable video where it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import pytest


@pytest.mark.timeout(180)
@pytest.mark.parametrize("model", ["", "wan2.2-animate-move"])
def test_demo(tmp_path: Path, model: str) -> None:
    """The demo runs the whole chain from two local files, stores the video, downloads it to
    demo-output/<job_id>.mp4 and prints the summary and the timeline; DEMO_MODEL runs it on a
    Wan2.2-Animate deployment (one call, no image check step, no template)."""
    env = {
        **os.environ,
        "DEMO_OUTPUT": str(tmp_path),
        "COLUMNS": "220",
        "DEMO_MODEL": model,
        "DEMO_REDIS_DB": "14" if model else "13",
    }  # its own queues, should both run at once
    done = subprocess.run(
        [sys.executable, "-m", "devstack.demo"],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (video,) = tmp_path.glob("*.mp4")
    assert video.stem in done.stdout
    steps = (("wan2.2-animate-move (wan-pro)", "CNY billed") if model else
             ("bodystyle full", "AACT.", "DETECTING"))  # fmt: skip
    for label in ("STORED", "s3://animate-queue-demo/videos/", "SHA-256", "video seconds",
                  # the whole chain from the bundled local files, step by step
                  "s3://animate-queue-demo/inputs/", *steps,
                  "PREPARING", "QUEUED", "SUBMITTED", "COPYING"):  # fmt: skip
        assert label in done.stdout
    if model:
        assert "AACT." not in done.stdout and "DETECTING" not in done.stdout
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 45  # 3 s at 15 fps
    assert "stopped everything" in done.stdout
