"""Prefect task: Generate the embedded synthetic corpus into data/."""

from tasks import step_task

synth = step_task("synth")
