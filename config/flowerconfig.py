"""Flower's configuration file: ``celery -A config.celery_app flower --conf=config/flowerconfig.py``.

Flower executes this file and takes the module-level names that match its options. Values come
from :mod:`config.settings` like everything else. Basic auth is on by default: without
``FLOWER_BASIC_AUTH`` Flower refuses to start, unless ``FLOWER_ALLOW_NO_AUTH=true`` records that
an operator chose an open Flower. Flower's own ``/healthcheck`` and ``/metrics`` stay open (that
is Flower's design; they carry task names and counts, never arguments); the dashboard and the API
need the password.
"""

from __future__ import annotations

import sys

from config.settings import SettingsError, get_settings

try:
    _settings = get_settings()
except SettingsError as exc:
    sys.exit(f"animate-queue flower: {exc}")

_auth = _settings.flower_basic_auth.get_secret_value() if _settings.flower_basic_auth else ""
if _auth:
    basic_auth = [pair.strip() for pair in _auth.split(",") if pair.strip()]
    if not all(":" in pair for pair in basic_auth):
        sys.exit("animate-queue flower: FLOWER_BASIC_AUTH must be user:password[,user:password]")
elif _settings.flower_allow_no_auth:
    basic_auth = []  # also when FLOWER_BASIC_AUTH is set but empty (Flower would read [""])
else:
    sys.exit(
        "animate-queue flower: FLOWER_BASIC_AUTH is not set; Flower shows every task's "
        "arguments and can send tasks, so it does not start without a password "
        "(set FLOWER_ALLOW_NO_AUTH=true to run it open on purpose)"
    )

port = _settings.flower_port
# Tasks seen survive a restart (FLOWER_DB on a volume in docker-compose.yml).
persistent = True
db = _settings.flower_db
state_save_interval = 60_000  # milliseconds: a crash loses at most a minute of history
max_tasks = 100_000
purge_offline_workers = 3600  # seconds: workers gone for an hour leave the dashboard
