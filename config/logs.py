"""Logging for every process: plain lines, or one JSON object per line (``LOG_FORMAT=json``).

Celery would install its own handlers; ``config.celery_app`` hands logging to :func:`configure`
instead (the ``setup_logging`` signal), so workers, beat and the exporter log alike. Structured
fields passed as ``extra=`` (the job store's ``job.transition`` lines carry job id, remote task
id, account and timings) become JSON keys. Secrets are never passed to a logger.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from config.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(processName)s %(message)s"
# Chatty libraries stay at WARNING whatever the level (their DEBUG lines can carry headers).
QUIET = ("httpx", "httpcore", "botocore", "boto3", "s3transfer", "urllib3")


def configure(settings: Settings) -> None:
    """Replace the root logger's handlers with one stderr handler in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                JSON_FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                timestamp=False,
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
