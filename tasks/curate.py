"""Prefect task: curate every configured source into the WebDataset store (incremental; quarantines bad records)."""

from tasks import step_task

curate = step_task("curate")
