"""Training: loop, optimizer, EMA, checkpoints, metrics."""
