"""Prefect task: Train the multi-teacher projector over the feature store and write the aligned features."""

from tasks import step_task

align = step_task("align")
