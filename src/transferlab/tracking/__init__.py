"""Run tracking: what each training run records besides its metrics."""
