"""``make demo``'s program runs end to end and leaves a playable video where it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import av
import pytest


@pytest.mark.timeout(180)
def test_demo(tmp_path: Path) -> None:
    """The demo runs the whole chain from two local files, stores the video, downloads it to
    demo-output/<job_id>.mp4 and prints the summary and the timeline."""
    env = {**os.environ, "DEMO_OUTPUT": str(tmp_path), "COLUMNS": "220"}
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
    for label in ("STORED", "s3://animate-queue-demo/videos/", "SHA-256", "video seconds",
                  # the whole chain from the bundled local files, step by step
                  "s3://animate-queue-demo/inputs/", "bodystyle full", "AACT.", "DETECTING",
                  "PREPARING", "QUEUED", "SUBMITTED", "COPYING"):  # fmt: skip
        assert label in done.stdout
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 45  # 3 s at 15 fps
    assert "stopped everything" in done.stdout
