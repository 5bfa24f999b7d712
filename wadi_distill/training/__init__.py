"""Training: the loop, checkpoints, prompts and their embedding cache, EMA, sharding."""
