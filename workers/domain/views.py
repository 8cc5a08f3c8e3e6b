"""What a job looks like from outside: the status view and the result object (docs/contract.md)."""

from __future__ import annotations

from typing import Any

from workers.domain.costs import CURRENCY
from workers.domain.job import Job


def job_view(job: Job) -> dict[str, Any]:
    """A job as producers see it: JSON-safe, no signed URL, with the time each step took."""
    return {
        "job_id": job.job_id,
        "kind": job.kind,
        "state": job.state.value,
        "final": job.final,
        "account": job.account,
        "priority": job.request.priority,
        "producer": job.request.producer,
        "token_waits": job.token_waits,
        "throttled_429": job.throttled,
        "cancel_requested": job.cancel_requested,
        "remote_task_id": job.remote_task_id,
        "remote_status": job.remote_status,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "s3_bucket": job.s3_bucket,
        "s3_key": job.s3_key,
        "s3_uri": job.s3_uri,
        "bytes": job.bytes,
        "sha256": job.sha256,
        "video_duration": job.video_duration,
        "video_url_expires_at": job.video_expires_at,
        "model": job.model if not job.is_template else None,
        "cost": _cost(job),
        "request": _request(job),
        **_motion(job),
        "warning": job.warning,
        "metadata": job.request.metadata,
        "attempts": {"submit": job.submit_attempts, "polls": job.polls, "copy": job.copy_attempts},
        "copy_bytes": job.copy_bytes,
        "webhook": {
            "state": job.webhook_state,
            "attempts": job.webhook_attempts,
            "delivered_at": job.webhook_delivered_at,
            "error": job.webhook_error,
        },
        "duplicates": job.duplicates,
        "intake_message_id": job.intake_message_id,  # its animate.generate task (Flower)
        **_times(job),
    }


def _cost(job: Job) -> dict[str, Any]:
    return {
        "currency": CURRENCY,
        "price_per_second": job.price_per_second,
        "estimated": job.estimated_cost,
        "billed": job.billed_cost,
    }


def _request(job: Job) -> dict[str, Any]:
    """What the producer asked for (the inputs as sent, not as resolved)."""
    request = job.request
    return {
        "image_url": request.image_url or None,
        "template_id": request.template_id or None,
        "video_url": request.video_url,
        "detect": request.detect,
        "use_ref_img_bg": request.use_ref_img_bg,
        "video_ratio": request.video_ratio,
        "model": request.model,
        "mode": request.mode,
        "check_image": request.check_image,
    }


def _motion(job: Job) -> dict[str, Any]:
    """The image check, the dance video and the template it became."""
    return {
        "template_id": job.template_id or job.request.template_id or None,
        "template_job_id": job.template_job_id,
        "template_reused": job.template_reused,
        "template_recreated": job.template_recreated,
        "detection": {
            "bodystyle": job.bodystyle,
            "cached": job.detect_cached,
            "attempts": job.detect_attempts,
            "image_sha256": job.image_sha256,
        },
        "source_video": {"sha256": job.source_sha256, "seconds": job.source_seconds},
    }


def _times(job: Job) -> dict[str, Any]:
    """When each step happened, and how long the stages took."""

    def span(start: float | None, end: float | None) -> float | None:
        return round(end - start, 3) if start is not None and end is not None else None

    return {
        "created_at": job.created_at,
        "admitted_at": job.admitted_at,
        "submitted_at": job.submitted_at,
        "remote_started_at": job.remote_started_at,
        "remote_ended_at": job.remote_ended_at,
        "copy_started_at": job.copy_started_at,
        "finished_at": job.finished_at,
        "updated_at": job.updated_at,
        "seconds": {
            "queued": span(job.created_at, job.submitted_at),
            "remote": span(job.submitted_at, job.remote_ended_at),
            "copy": span(job.remote_ended_at, job.finished_at if job.s3_key else None),
            "total": span(job.created_at, job.finished_at),
        },
    }


RESULT_CONTRACT_VERSION = "1"


def result_object(job: Job) -> dict[str, Any]:
    """The final result object of the public contract (docs/contract.md, version 1)."""
    return {
        "contract_version": RESULT_CONTRACT_VERSION,
        "job_id": job.job_id,
        "kind": job.kind,
        "state": job.state.value,
        "template_id": job.template_id or job.request.template_id or None,
        "s3_bucket": job.s3_bucket,
        "s3_key": job.s3_key,
        "s3_uri": job.s3_uri,
        "bytes": job.bytes,
        "sha256": job.sha256,
        "video_seconds": job.video_duration,
        "remote_task_id": job.remote_task_id,
        "error_code": job.error_code,
        "error_message": job.error_message,
        "cancel_requested": job.cancel_requested,
        "account": job.account,
        "metadata": job.request.metadata,
        "created_at": job.created_at,
        "submitted_at": job.submitted_at,
        "finished_at": job.finished_at,
    }
