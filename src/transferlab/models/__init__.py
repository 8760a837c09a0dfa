"""Backbones, heads and their assembly into one model."""
