"""Training: the corpus and packed batches, balancing methods, metrics."""
