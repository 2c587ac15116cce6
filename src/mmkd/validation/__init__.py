"""Validation: the Great Expectations suite over the curated manifest."""
