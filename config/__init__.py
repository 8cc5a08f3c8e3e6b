"""Deployment configuration: settings read from the environment and the Celery app.

Settings and ``config.celery_app`` arrive with the generation-pipeline issue.
"""
