"""Tracking checks that run before any work: the store, the server, the URIs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transferlab.errors import TrackingError

if TYPE_CHECKING:
    from transferlab.config.schema import ExperimentConfig


def check_tracking(cfg: "ExperimentConfig") -> None:
    """Fail fast, before any stage does work, on a tracking setup that cannot work."""
