"""A job's states and the moves between them; DashScope's task states."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

URL_TTL_SECONDS = 24 * 3600  # DashScope keeps video_url valid 24 h after the task ends


class JobState(StrEnum):
    RECEIVED = "RECEIVED"  # recorded; its inputs are being checked (nothing sent; free to cancel)
    DETECTING = "DETECTING"  # the image check (animate-anyone-detect-gen2) is due (free to cancel)
    PREPARING = "PREPARING"  # the template video is checked, or its template is being made
    QUEUED = "QUEUED"  # accepted and validated; nothing sent yet (free to cancel)
    SUBMITTING = "SUBMITTING"  # a worker holds the right to submit; the POST may be in flight
    SUBMITTED = "SUBMITTED"  # DashScope has the task; remote_status says where it is
    COPYING = "COPYING"  # the video is being streamed into S3
    STORED = "STORED"  # final: the video is in S3 and verified
    FAILED = "FAILED"  # final: DashScope failed it, refused it, or we gave up
    REJECTED = "REJECTED"  # final: bad input; no remote call was made
    CANCELED = "CANCELED"  # final
    EXPIRED = "EXPIRED"  # final: the video URL ran out before the copy finished
    READY = "READY"  # final (template jobs): the action template exists; template_id says which


FINAL_STATES = frozenset(
    {
        JobState.STORED,
        JobState.FAILED,
        JobState.REJECTED,
        JobState.CANCELED,
        JobState.EXPIRED,
        JobState.READY,
    }
)


SUCCESS_STATES = frozenset({JobState.STORED, JobState.READY})


# Every allowed move. A self-move records progress (a poll, a retry) and bumps the version, which
# is the fencing token: a message carrying an older version is stale and does nothing.
TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset(
        {
            JobState.RECEIVED,
            JobState.DETECTING,
            JobState.PREPARING,
            JobState.QUEUED,
            JobState.REJECTED,
            JobState.FAILED,
            JobState.CANCELED,
        }
    ),
    JobState.DETECTING: frozenset(
        {
            JobState.DETECTING,
            JobState.PREPARING,
            JobState.QUEUED,
            JobState.REJECTED,
            JobState.FAILED,
            JobState.CANCELED,
        }
    ),
    JobState.PREPARING: frozenset(
        {
            JobState.PREPARING,
            JobState.QUEUED,
            JobState.READY,  # a template job whose template already existed
            JobState.REJECTED,
            JobState.FAILED,
            JobState.CANCELED,
        }
    ),
    JobState.QUEUED: frozenset(
        {JobState.QUEUED, JobState.SUBMITTING, JobState.REJECTED, JobState.CANCELED}
    ),
    JobState.SUBMITTING: frozenset(
        {
            JobState.SUBMITTING,
            JobState.SUBMITTED,
            JobState.FAILED,
            JobState.CANCELED,
            JobState.PREPARING,  # DashScope no longer accepts the template: make it again
        }
    ),
    JobState.SUBMITTED: frozenset(
        {
            JobState.SUBMITTED,
            JobState.COPYING,
            JobState.FAILED,
            JobState.CANCELED,
            JobState.EXPIRED,
            JobState.READY,
        }
    ),
    JobState.COPYING: frozenset(
        {JobState.COPYING, JobState.STORED, JobState.FAILED, JobState.EXPIRED}
    ),
}


def can_move(source: JobState, target: JobState) -> bool:
    return target in TRANSITIONS.get(source, frozenset())


class RemoteStatus(StrEnum):
    """DashScope's ``output.task_status`` values.

    A string DashScope sends that is not listed here (the SDK knows ``SUSPENDED``) parses as
    ``UNKNOWN``; the string itself is kept alongside as the raw status.
    """

    PENDING = "PENDING"
    PRE_PROCESSING = "PRE-PROCESSING"
    RUNNING = "RUNNING"
    POST_PROCESSING = "POST-PROCESSING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, raw: str) -> RemoteStatus:
        """The member for ``raw``, or ``UNKNOWN`` for a string this module does not know."""
        try:
            return cls(raw)
        except ValueError:
            return cls.UNKNOWN


ACTIVE_REMOTE = frozenset(
    {RemoteStatus.PRE_PROCESSING, RemoteStatus.RUNNING, RemoteStatus.POST_PROCESSING}
)
