"""Prefect task: Register the student in the MLflow model registry."""

from tasks import step_task

register = step_task("register")
