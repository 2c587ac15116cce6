"""Evaluation: zero-shot, linear probe and retrieval metrics for students and teachers."""
