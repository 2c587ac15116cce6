"""Prefect task: Validate the curated manifest with Great Expectations."""

from tasks import step_task

validate = step_task("validate")
