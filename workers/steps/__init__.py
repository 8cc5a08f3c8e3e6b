"""The steps (use cases), one module each. Each loads a job, decides (the domain), applies."""

from workers.steps.admission import admit
from workers.steps.cancel import CancelResult, cancel
from workers.steps.context import Next, Services
from workers.steps.copy import copy, copy_interrupted
from workers.steps.detect import detect
from workers.steps.finish import deliver, deliver_webhook, finish
from workers.steps.intake import IntakeResult, intake, validate
from workers.steps.poll import poll
from workers.steps.prepare import prepare
from workers.steps.submit import submit
from workers.steps.watchdog import WatchdogReport, resend_lost_intakes, watchdog

__all__ = [
    "CancelResult",
    "IntakeResult",
    "Next",
    "Services",
    "WatchdogReport",
    "admit",
    "cancel",
    "copy",
    "copy_interrupted",
    "deliver",
    "deliver_webhook",
    "detect",
    "finish",
    "intake",
    "poll",
    "prepare",
    "resend_lost_intakes",
    "submit",
    "validate",
    "watchdog",
]
