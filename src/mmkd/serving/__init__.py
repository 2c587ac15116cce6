"""Inference for users: read any input as curation does, load a registered student, zero-shot predict, embed."""
