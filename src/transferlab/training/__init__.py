"""Freezing, parameter groups, max-norm, optimisers and the training loop."""
