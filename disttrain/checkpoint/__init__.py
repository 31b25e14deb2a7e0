"""Checkpoints: atomic, verified commits of model, optimizer, data and RNG state (``commit``)."""
