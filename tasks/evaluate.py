"""Prefect task: Evaluate the students and every teacher on the held-out sets."""

from tasks import step_task

evaluate = step_task("evaluate", retries=0)
