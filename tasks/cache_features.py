"""Prefect task: Cache every teacher's features for every curated pair."""

from tasks import step_task

cache_features = step_task("cache_features", retries=0)
