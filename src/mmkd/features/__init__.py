"""Features: the sharded teacher feature store, filling it in work units, and aligning it to the student."""
