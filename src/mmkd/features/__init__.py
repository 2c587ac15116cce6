"""Features: the on-disk teacher feature cache and the multi-teacher projector to the student's dimension."""
