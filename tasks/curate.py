"""Prefect task: Curate the raw manifest: decode, resize, de-duplicate, quarantine."""

from tasks import step_task

curate = step_task("curate", retries=0)
