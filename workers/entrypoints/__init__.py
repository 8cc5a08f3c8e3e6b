"""The ways in: the Celery app and its tasks, and the operators' CLI."""
