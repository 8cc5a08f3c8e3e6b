"""Celery: the app, the tasks generated from the step table, the bootsteps, result publishing."""
