"""Prefect task: Train the embedded domain-specialist teachers."""

from tasks import step_task

teachers = step_task("teachers")
