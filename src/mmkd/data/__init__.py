"""Data: synthetic corpus, manifests, curation and the training datasets."""
