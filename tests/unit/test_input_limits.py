"""What producers control is bounded: s3:// inputs stay in the inputs prefix, an unusable job_id
is refused where the producer can see it, echoed field names are capped."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fakes import make_services
from workers import steps
from workers.domain.request import parse_request
from workers.domain.states import JobState
from workers.entrypoints.celery.results import CeleryResults
from workers.errors import InvalidJobRequest
from workers.producer import AnimateQueue

TEMPLATE = "AACT.acct.1234-5678"


@pytest.mark.parametrize(
    "ref",
    [
        "s3://our-bucket/videos/someone-elses-job.mp4",  # another job's stored video
        "s3://our-bucket/inputs/../videos/x.mp4",
        "s3://our-bucket/inputs/",
    ],
)
def test_s3_inputs_are_confined_to_the_inputs_prefix(ref: str) -> None:
    """A producer may name only what was uploaded as an input: never another job's output, which
    would be handed to DashScope (and billed) as this job's image."""
    svc = make_services(input_bucket="our-bucket")
    result = steps.intake(svc, {"image_url": ref, "template_id": TEMPLATE, "job_id": "j"}, (), "m")
    job = svc.store.get("j")
    assert result.state == JobState.REJECTED and job is not None
    assert job.error_code == "InvalidRequest.BadUrl" and "inputs/" in (job.error_message or "")
    assert svc.images.probes == []  # type: ignore[attr-defined]


def test_an_input_under_the_prefix_is_accepted() -> None:
    svc = make_services(input_bucket="our-bucket")
    ref = "s3://our-bucket/inputs/ab12.png"
    svc.inputs.for_us = lambda r: ("https://presigned.test/ab12.png", True)  # type: ignore[method-assign]
    steps.intake(svc, {"image_url": ref, "template_id": TEMPLATE, "job_id": "j"}, (), "m")
    assert svc.store.get("j").state != JobState.REJECTED  # type: ignore[union-attr]


class TestUnusableJobId:
    def test_the_client_refuses_it_before_sending(self, monkeypatch: Any) -> None:
        """AnimateQueue used to send it and return it: wait() then never resolved."""
        queue = AnimateQueue("redis://127.0.0.1:1/0")
        sent: list[Any] = []
        monkeypatch.setattr(queue.celery, "send_task", lambda *a, **kw: sent.append(a))
        for bad in ("has space", "x" * 200, "-leading", "line\\n"):
            with pytest.raises(InvalidJobRequest) as caught:
                queue.submit("https://cdn.test/a.png", TEMPLATE, job_id=bad)
            assert caught.value.code == "InvalidRequest.JobId"
        assert sent == []

    def test_a_celery_producer_hears_why_under_the_id_it_sent(self) -> None:
        """Sent with only celery: the record is REJECTED under the message id, and the refusal
        is also stored as the result of the job_id the producer sent (its AsyncResult)."""
        stored: dict[str, tuple[Any, str]] = {}

        class Backend:
            def store_result(self, task_id: str, result: Any, state: str) -> None:
                stored[task_id] = (result, state)

        class App:
            backend = Backend()

        svc = make_services(results=CeleryResults(App()))
        steps.intake(svc, {"image_url": "https://cdn.test/a.png", "template_id": TEMPLATE,
                              "job_id": "order 42"}, (), "msg-1")  # fmt: skip
        job = svc.store.get("msg-1")
        assert job is not None and (job.state, job.error_code) == (
            JobState.REJECTED,
            "InvalidRequest.JobId",
        )
        assert job.requested_id == "order 42"
        assert stored["order 42"][1] == "FAILURE" and stored["msg-1"][1] == "FAILURE"
        assert stored["order 42"][0].args[0] == "InvalidRequest.JobId"


def test_unknown_field_names_echoed_are_capped() -> None:
    """A thousand made-up 10 kB field names: the error (which lands in the record and the logs)
    stays small and says how many more there were."""
    kwargs: dict[str, Any] = {"image_url": "https://cdn.test/a.png", "template_id": TEMPLATE}
    kwargs.update({f"{i:04d}" + "x" * 10_000: 1 for i in range(1000)})
    with pytest.raises(InvalidJobRequest) as caught:
        parse_request(kwargs)
    assert caught.value.code == "InvalidRequest.UnknownField"
    assert len(caught.value.message) < 1000
    assert "and 995 more" in caught.value.message
