"""Prefect task: Stage 2: multi-teacher feature distillation."""

from tasks import step_task

distill = step_task("distill")
