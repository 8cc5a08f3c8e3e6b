"""DashScope's error shapes: the HTTP error the emulator answers with, and the verbatim messages."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error response: ``{"request_id", "code", "message"}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def body(self, request_id: str) -> dict[str, Any]:
        return {"request_id": request_id, "code": self.code, "message": self.message}


def invalid_api_key(missing: bool) -> ApiError:
    text = "No API-key provided." if missing else "Invalid API-key provided."
    return ApiError(401, "InvalidApiKey", text)


def illegal_input() -> ApiError:
    return ApiError(400, "BadRequest.IllegalInput", "The input parameter requires json format.")


def empty_model() -> ApiError:
    return ApiError(
        400, "BadRequest.EmptyModel", 'Required parameter "model" missing from request.'
    )


def empty_input() -> ApiError:
    return ApiError(400, "BadRequest.EmptyInput", "Required input parameter missing from request.")


def async_required() -> ApiError:
    return ApiError(403, "AccessDenied", "current user api does not support synchronous calls.")


def sync_only() -> ApiError:
    return ApiError(403, "AccessDenied", "Current user api does not support asynchronous calls.")


def url_error() -> ApiError:
    return ApiError(400, "InvalidParameter", "url error, please check url!")


def model_not_found(model: str) -> ApiError:
    return ApiError(404, "ModelNotFound", f"The model {model} does not exist.")


def field_required(field: str) -> ApiError:
    return ApiError(400, "InvalidParameter", f"Field required: {field}")


def invalid_parameter(message: str) -> ApiError:
    return ApiError(400, "InvalidParameter", message)


def invalid_url(message: str | None = None) -> ApiError:
    return ApiError(
        400,
        "InvalidURL",
        message or "Required URL is missing or invalid, please check the request URL.",
    )


def connection_refused(url: str) -> ApiError:
    return ApiError(
        400,
        "InvalidURL.ConnectionRefused",
        f"Connection to {url} refused, please provide available URL.",
    )


def download_timeout(url: str) -> ApiError:
    return ApiError(
        400, "InvalidURL.Timeout", f"Download {url} timeout, please check network connection."
    )


def template_content() -> ApiError:
    return ApiError(400, "InvalidFile.Template.Content", "Invalid template content.")


def throttled() -> ApiError:
    return ApiError(429, "Throttling.RateQuota", "Requests rate limit exceeded, try again later.")


def not_found() -> ApiError:
    return ApiError(404, "NotFound", "Not found!")


def unsupported_cancel() -> ApiError:
    return ApiError(
        400,
        "UnsupportedOperation",
        "Failed to cancel the task, please confirm if the task is in PENDING status.",
    )


def policy_expired() -> ApiError:
    return ApiError(403, "AccessDenied", "Invalid according to Policy: Policy expired.")


def internal_error() -> ApiError:
    return ApiError(
        500,
        "InternalError",
        "An internal error has occured, try again later or contact service support.",
    )


def model_unavailable() -> ApiError:
    return ApiError(503, "ModelUnavailable", "Model is unavailable, try again later.")


# Task-level failure messages (HTTP 200, output.task_status=FAILED), by code.
TASK_FAILURE_MESSAGES: dict[str, str] = {
    "InternalError.Algo": "An internal error has occured during algorithm execution.",
    "InternalError.Timeout": (
        "An internal timeout error has occured during execution, "
        "try again later or contact service support."
    ),
    "InternalError.FileUpload": "oss upload error.",
    "InvalidFile.Content": "The first frame of input video has no human body. "
    "Please choose another clip.",
    "InvalidFile.FullBody": "The human is not fullbody in the first frame of input video. "
    "Please choose another clip.",
    "InvalidFile.Template.Content": "Invalid template content.",
    "DataInspectionFailed": "Output data may contain inappropriate content.",
}


def task_failure_message(code: str) -> str:
    return TASK_FAILURE_MESSAGES.get(
        code, "An internal error has occured during algorithm execution."
    )
