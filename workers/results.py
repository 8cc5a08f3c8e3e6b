"""Final outcomes into Celery's result backend, under the job id, for ``AsyncResult(job_id)``."""

from __future__ import annotations

import logging
from typing import Any

from workers.errors import JobFailed
from workers.jobs import Job, JobState, result_object

log = logging.getLogger(__name__)


class CeleryResults:
    """The pipeline's ``Results`` port over a Celery app's result backend.

    STORED becomes SUCCESS with the result object; every other final state becomes FAILURE with
    :class:`JobFailed` ``(code, message, result object)``. Results live ``result_expires``.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def publish(self, job: Job) -> None:
        outcome = result_object(job)
        if job.state == JobState.STORED:
            self.backend.store_result(job.job_id, outcome, "SUCCESS")
        else:
            error = JobFailed(job.error_code or job.state.value, job.error_message or "", outcome)
            self.backend.store_result(job.job_id, error, "FAILURE")
