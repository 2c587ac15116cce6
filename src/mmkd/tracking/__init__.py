"""Tracking: MLflow runs, and the student packaged as an MLflow model."""
