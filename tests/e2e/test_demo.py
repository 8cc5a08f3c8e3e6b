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
    """The demo stores a job, downloads it to demo-output/<job_id>.mp4 and prints the summary."""
    env = {**os.environ, "DEMO_OUTPUT": str(tmp_path)}
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
    for label in ("STORED", "s3://animate-queue-demo/videos/", "SHA-256", "video seconds"):
        assert label in done.stdout
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 45  # 3 s at 15 fps
    assert "stopped everything" in done.stdout
