"""Prefect task: map the teachers into the stage-1 student's space and write the aligned features."""

from tasks import step_task

align = step_task("align")
