"""Final outcomes into Celery's result backend, under the job id, for ``AsyncResult(job_id)``."""

from __future__ import annotations

import logging
from typing import Any

from workers.domain.job import Job
from workers.domain.states import SUCCESS_STATES
from workers.domain.views import result_object
from workers.errors import JobFailed

log = logging.getLogger(__name__)


class CeleryResults:
    """The pipeline's ``Results`` port over a Celery app.

    STORED (and READY, for template jobs) becomes SUCCESS with the result object; every other final state becomes FAILURE with
    :class:`JobFailed` ``(code, message, result object)``. Results live ``result_expires``. A
    job's ``callback_task`` is then sent, by name, with the result object as its one argument.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    def publish(self, job: Job) -> None:
        outcome = result_object(job)
        backend = self.app.backend
        if job.state in SUCCESS_STATES:
            backend.store_result(job.job_id, outcome, "SUCCESS")
        else:
            error = JobFailed(job.error_code or job.state.value, job.error_message or "", outcome)
            backend.store_result(job.job_id, error, "FAILURE")
            if job.requested_id:  # the producer waits on the job_id it sent, unusable as it was
                backend.store_result(job.requested_id, error, "FAILURE")
        if job.request.callback_task:
            # At least once: sent again if the worker died before the job was marked delivered.
            # The message id is the job's (plus ".callback"): the producer's key to deduplicate.
            # Jobs from before callback_queue was required may have none: their old default.
            self.app.send_task(
                job.request.callback_task,
                args=[outcome],
                queue=job.request.callback_queue or "celery",
                task_id=f"{job.job_id}.callback",
            )
            log.info("job %s: callback %s sent", job.job_id, job.request.callback_task)
