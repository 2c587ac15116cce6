"""Prefect task: Stage 1: CLIP pretraining of the student."""

from tasks import step_task

pretrain = step_task("pretrain")
