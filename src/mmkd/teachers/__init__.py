"""Teachers: the registry that loads every teacher family, and training of the embedded specialists."""
